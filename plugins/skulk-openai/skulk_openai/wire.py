"""OpenAI's response shapes: completions, chunks, log-probabilities, usage and server-sent events."""

from __future__ import annotations

import codecs
import json
import math
import secrets
import string
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from skulk_core import Tokenizer

_ALPHABET = string.ascii_letters + string.digits
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token the model gives (almost) no chance


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(29))


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def sse(value: Any) -> bytes:
    return b"data: " + dumps(value) + b"\n\n"


TEXT_SLOT = "\x00skulk:text\x00"  # where sse_with_text puts each text; no id or model name holds it


def sse_with_text(value: Any) -> Callable[[str], bytes]:
    """An encoder for events shaped like ``value``, which holds the string :data:`TEXT_SLOT` once:
    ``sse_with_text(value)(text)`` is ``sse(value)`` with ``text`` in that place. It encodes one
    string per event instead of the whole object, and a stream sends one event per token."""
    slot = dumps(TEXT_SLOT)
    head, found, tail = sse(value).partition(slot)
    if not found or slot in tail:
        raise ValueError("the value must hold TEXT_SLOT exactly once")

    def event(text: str) -> bytes:
        return head + json.dumps(text, ensure_ascii=False).encode() + tail

    return event


SSE_DONE = b"data: [DONE]\n\n"
SSE_OPEN = b": ok\n\n"  # a comment: sent first so the client sees the headers at once


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens`` where a kept cache held some of the
    prompt (as OpenAI reports its prompt caching)."""
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


class TokenText:
    """Token ids as OpenAI shows them in log-probabilities: text, and the raw bytes beside it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def raw(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id)

    def text(self, token_id: int) -> str:
        data = self.raw(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: OpenAI writes such tokens as "bytes:\xe2\x80"
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def shown(self, tokens: Iterable[Any]) -> list[Any]:
        """Tokens that stand for text (control tokens such as end-of-turn are left out)."""
        return [t for t in tokens if not self.tokenizer.is_control(t.token_id)]

    def chat_content(self, tokens: Iterable[Any]) -> list[dict[str, Any]]:
        out = []
        for token in self.shown(tokens):
            out.append(
                {
                    "token": self.text(token.token_id),
                    "logprob": _finite(token.logprob),
                    "bytes": list(self.raw(token.token_id)),
                    "top_logprobs": [
                        {"token": self.text(t.token_id), "logprob": _finite(t.logprob), "bytes": list(self.raw(t.token_id))} for t in token.top
                    ],
                }
            )
        return out


class LegacyLogprobs:
    """One text completion's log-probabilities in the legacy format (tokens, token_logprobs,
    top_logprobs, text_offset), built chunk by chunk. Offsets are characters of the returned text,
    counted the way the text itself is decoded (UTF-8, a broken byte as one replacement character).

    Every token has its entry, control tokens too (a generated ``<|endoftext|>`` is listed, as
    OpenAI lists it, at the offset where the text ends), so that a client can line the entries up
    with the tokens it sent: a scored prompt's (:meth:`prompt`) and then one per generated token."""

    def __init__(self, tokens: TokenText, offset: int = 0) -> None:
        self.tokens = tokens
        self.offset = offset
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, generated: Iterable[Any]) -> dict[str, list[Any]]:
        out = _legacy_entries()
        for token in generated:
            self._entry(out, token.token_id, _finite(token.logprob), self._top(token.top))
            if not self.tokens.tokenizer.is_control(token.token_id):
                self.offset += len(self._decoder.decode(self.tokens.raw(token.token_id)))
        return out

    def prompt(self, prompt: Sequence[int], scores: Sequence[Any], echoed: str) -> dict[str, list[Any]]:
        """The entries of a scored prompt, echoed as ``echoed``: one a prompt token, the first
        without a log-probability (nothing comes before it), then ``scores`` (each token's, after
        the ones before it). A control token's offset moves on only where the echoed text spells
        it out (a BOS the tokenizer added is not in it)."""
        out = _legacy_entries()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for index, token_id in enumerate(prompt):
            score = scores[index - 1] if 0 < index <= len(scores) else None
            if score is None:
                self._entry(out, token_id, None, None)
            else:
                self._entry(out, token_id, _finite(score.logprob), self._top(score.top))
            if not self.tokens.tokenizer.is_control(token_id):
                self.offset += len(decoder.decode(self.tokens.raw(token_id)))
            elif echoed.startswith(text := self.tokens.text(token_id), self.offset):
                self.offset += len(text)
        self.offset = len(echoed)  # the completion's offsets start where the echoed prompt ends
        return out

    def _top(self, alternatives: Iterable[Any]) -> dict[str, float]:
        top: dict[str, float] = {}
        for alt in alternatives:
            top.setdefault(self.tokens.text(alt.token_id), _finite(alt.logprob))
        return top

    def _entry(self, out: dict[str, list[Any]], token_id: int, logprob: float | None, top: dict[str, float] | None) -> None:
        out["tokens"].append(self.tokens.text(token_id))
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(self.offset)


def _legacy_entries() -> dict[str, list[Any]]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def joined_legacy(first: dict[str, list[Any]], second: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Two runs of legacy log-probabilities as one (a scored prompt's, then its completion's)."""
    return {key: first[key] + second[key] for key in first}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def json_loads(data: bytes) -> Any:
    """``json.loads``, refusing the NaN and Infinity literals Python would otherwise accept."""
    return json.loads(data, parse_constant=_reject_constant)
