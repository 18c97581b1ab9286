"""Chat templates: turn OpenAI-style messages into the prompt text the model was trained on.

The template comes from the model itself (a GGUF's ``tokenizer.chat_template``) and is rendered
with jinja2 the way Hugging Face transformers renders it: a sandboxed environment, ``trim_blocks``
and ``lstrip_blocks``, ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps non-ASCII.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from skulk_core.errors import RequestError

# ChatML, for models that ship no template of their own.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(RequestError):
    """The template refused the messages (its own ``raise_exception``), or failed to render."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the model's chat template refused the messages: {message}", param="messages")


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None, ensure_ascii=False, sort_keys=False: json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """Render ``messages`` with ``template`` (the fallback ChatML template when None)."""
    from jinja2 import TemplateError as JinjaTemplateError

    try:
        compiled = _compile(template or FALLBACK_TEMPLATE)
        return compiled.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            tools=list(tools) if tools else None,
            **extra,
        )
    except RequestError:
        raise
    except (JinjaTemplateError, TypeError, KeyError, ValueError) as exc:
        raise TemplateError(f"the model's chat template failed on these messages: {exc}", param="messages") from exc
