"""Request bodies of the OpenAI API, checked field by field and turned into typed parameters.

Every check raises :class:`~skulk_core.RequestError` naming the offending parameter, with OpenAI's
error codes (``missing_required_parameter``, ``invalid_type``, ``invalid_value``, ...), so a bad
value is always a 400 that says what to fix. Unknown fields are ignored, as OpenAI ignores them.
Nothing here needs a model; the checks that do (token ids against the vocabulary) are in the app.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

from skulk_core import RequestError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP = 4
MAX_EMBEDDING_INPUTS = 2048
MAX_PROMPTS = 256  # prompts in one text completion: each is a sequence for the scheduler
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_MISSING = object()


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def invalid_type(param: str, expected: str, value: object) -> RequestError:
    return RequestError(f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead.", param=param, code="invalid_type")


def invalid_value(param: str, message: str) -> RequestError:
    return RequestError(f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def unsupported(param: str, message: str) -> RequestError:
    return RequestError(message, param=param, code="unsupported_parameter")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, float) and value.is_integer())


class Fields:
    """Typed access to one JSON object's fields; ``None`` (null) reads as absent."""

    def __init__(self, body: Mapping[str, Any], prefix: str = "") -> None:
        self.body = body
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def present(self, key: str) -> bool:
        return self.body.get(key) is not None

    def required(self, key: str) -> Any:
        value = self.body.get(key)
        if value is None:
            raise RequestError(f"Missing required parameter: '{self.name(key)}'.", param=self.name(key), code="missing_required_parameter")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise invalid_type(self.name(key), "a number", value)
        if value < low:
            raise RequestError(
                f"Invalid '{self.name(key)}': number below minimum value. Expected a value >= {low}, but got {value} instead.",
                param=self.name(key),
                code="decimal_below_min_value",
            )
        if value > high:
            raise RequestError(
                f"Invalid '{self.name(key)}': number above maximum value. Expected a value <= {high}, but got {value} instead.",
                param=self.name(key),
                code="decimal_above_max_value",
            )
        return float(value)

    def integer(self, key: str, default: int | None, low: int | None = None, high: int | None = None) -> int | None:
        value = self.body.get(key)
        if value is None:
            return default
        if not _is_int(value):
            raise invalid_type(self.name(key), "an integer", value)
        value = int(value)
        if low is not None and value < low:
            raise RequestError(
                f"Invalid '{self.name(key)}': integer below minimum value. Expected a value >= {low}, but got {value} instead.",
                param=self.name(key),
                code="integer_below_min_value",
            )
        if high is not None and value > high:
            raise RequestError(
                f"Invalid '{self.name(key)}': integer above maximum value. Expected a value <= {high}, but got {value} instead.",
                param=self.name(key),
                code="integer_above_max_value",
            )
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid_type(self.name(key), "a boolean", value)
        return value

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise invalid_type(self.name(key), "a string", value)
        return value

    def obj(self, key: str) -> Mapping[str, Any] | None:
        value = self.body.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise invalid_type(self.name(key), "an object", value)
        return value


@frozen
class Sampling:
    """The sampling fields shared by chat and text completions."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(factory=dict)


@frozen
class Generation:
    """What a chat or text completion asks for, model-independent."""

    model: str
    sampling: Sampling
    max_tokens: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool  # report the sampled tokens' log-probabilities
    top_logprobs: int  # and this many alternatives per position
    ignore_eos: bool = False
    response_format: str = "text"  # or "json_object": the output is one JSON object


@frozen
class ChatParams:
    generation: Generation
    messages: tuple[Mapping[str, Any], ...] = field(converter=tuple)


@frozen
class CompletionParams:
    generation: Generation
    prompts: tuple[str | tuple[int, ...], ...]  # one choice each, in this order
    batched: bool = False  # the prompt was an array of prompts: errors name prompt[i]
    echo: bool = False

    @property
    def prompt_logprobs(self) -> int | None:
        """How many alternatives each prompt token's score lists (echo with logprobs); None: the
        prompt is not scored."""
        return self.generation.top_logprobs if self.echo and self.generation.logprobs else None


@frozen
class EmbeddingParams:
    model: str
    inputs: tuple[str | tuple[int, ...], ...]
    encoding_format: str = "float"


def require_object(body: object) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"The request body must be a JSON object, not {_type_name(body)}.", code="invalid_type")
    return body


def _model(f: Fields) -> str:
    model = f.required("model")
    if not isinstance(model, str):
        raise invalid_type("model", "a string", model)
    if not model:
        raise invalid_value("model", "the model id is empty; GET /v1/models lists the models this node serves.")
    return model


def _seed(f: Fields) -> int | None:
    seed = f.integer("seed", None, INT64_MIN, INT64_MAX)
    # The sampler's generator takes an unsigned 64-bit seed; OpenAI's range is signed.
    return None if seed is None else seed & (2**64 - 1)


def _logit_bias(f: Fields) -> dict[int, float]:
    bias = f.obj("logit_bias")
    if bias is None:
        return {}
    out = {}
    for key, value in bias.items():
        param = f"logit_bias.{key}"
        try:
            token = int(key)
        except ValueError:
            raise invalid_value("logit_bias", f"the key {key!r} is not a token id; keys are token ids written as strings.") from None
        if token < 0:
            raise invalid_value("logit_bias", f"the key {key!r} is not a token id (negative).")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise invalid_type(param, "a number", value)
        if not -100 <= value <= 100:
            raise invalid_value(param, f"a bias must be between -100 and 100, got {value}.")
        out[token] = float(value)
    return out


def _stop(f: Fields) -> tuple[str, ...]:
    stop = f.body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if not isinstance(stop, list):
        raise invalid_type("stop", "a string or an array of strings", stop)
    if len(stop) > MAX_STOP:
        raise invalid_value("stop", f"at most {MAX_STOP} stop sequences are allowed, got {len(stop)}.")
    for index, item in enumerate(stop):
        if not isinstance(item, str):
            raise invalid_type(f"stop[{index}]", "a string", item)
    return tuple(s for s in stop if s)


def _sampling(f: Fields) -> Sampling:
    top_k = f.integer("top_k", 0, -1, 1 << 20)
    return Sampling(
        temperature=f.number("temperature", 1.0, 0.0, 2.0),
        top_p=f.number("top_p", 1.0, 0.0, 1.0),
        top_k=max(top_k or 0, 0),  # -1 means "off", as in vLLM and llama.cpp
        min_p=f.number("min_p", 0.0, 0.0, 1.0),
        presence_penalty=f.number("presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=f.number("frequency_penalty", 0.0, -2.0, 2.0),
        seed=_seed(f),
        logit_bias=_logit_bias(f),
    )


def _n(f: Fields, key: str = "n") -> None:
    n = f.integer(key, 1, 1, 128)
    if n != 1:
        raise RequestError(f"Only {key}=1 is supported by this server; send one request per choice.", param=key, code="unsupported_value")


def _stream(f: Fields) -> tuple[bool, bool]:
    stream = f.boolean("stream", False)
    options = f.obj("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid_value("stream_options", "stream_options is only allowed when 'stream' is true.")
        include_usage = Fields(options, "stream_options.").boolean("include_usage", False)
    return stream, include_usage


def _max_tokens(f: Fields, default: int | None, minimum: int = 1) -> int | None:
    max_tokens = f.integer("max_tokens", default, minimum)
    # max_completion_tokens is the newer name; it wins when both are given.
    return f.integer("max_completion_tokens", max_tokens, minimum)


def _text_of(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_type(param, "a string or an array of content parts", content)
    texts = []
    for index, part in enumerate(content):
        part_param = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise invalid_type(part_param, "an object", part)
        kind = part.get("type")
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise invalid_type(f"{part_param}.{kind}", "a string", text)
            texts.append(text)
        elif isinstance(kind, str):
            raise RequestError(
                f"Content parts of type '{kind}' are not supported: this server's models read text only; send "
                f"parts of type 'text'.",
                param=f"{part_param}.type",
                code="unsupported_value",
            )
        else:
            raise RequestError(f"Missing required parameter: '{part_param}.type'.", param=f"{part_param}.type", code="missing_required_parameter")
    # Parts are joined with newlines (as vLLM and llama.cpp's server do), so "a", "b" stay two lines.
    return "\n".join(texts)


def _messages(f: Fields) -> list[dict[str, Any]]:
    messages = f.required("messages")
    if not isinstance(messages, list):
        raise invalid_type("messages", "an array", messages)
    if not messages:
        raise invalid_value("messages", "the array is empty; send at least one message.")
    out = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid_type(param, "an object", message)
        m = Fields(message, f"{param}.")
        role = m.required("role")
        if not isinstance(role, str):
            raise invalid_type(f"{param}.role", "a string", role)
        if role not in CHAT_ROLES:
            raise invalid_value(f"{param}.role", f"{role!r} is not a role; use one of {', '.join(sorted(CHAT_ROLES))}.")
        content = message.get("content")
        if content is None:
            if role != "assistant":  # an assistant turn that only called tools has no content
                m.required("content")
            text = ""
        else:
            text = _text_of(content, f"{param}.content")
        # "developer" is OpenAI's newer name for "system"; model templates know only the older one.
        rendered: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        for key in ("name", "tool_call_id"):
            value = m.string(key)
            if value is not None:
                rendered[key] = value
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if not isinstance(tool_calls, list) or not all(isinstance(c, dict) for c in tool_calls):
                raise invalid_type(f"{param}.tool_calls", "an array of objects", tool_calls)
            rendered["tool_calls"] = tool_calls
        out.append(rendered)
    return out


def _response_format(f: Fields) -> str:
    fmt = f.obj("response_format")
    if fmt is None:
        return "text"
    kind = Fields(fmt, "response_format.").required("type")
    if kind in ("text", "json_object"):
        return kind
    if kind == "json_schema":
        raise RequestError(
            "response_format of type 'json_schema' is not supported by this server: it constrains sampling to "
            "any JSON object, not to a schema. Use {'type': 'json_object'} and describe the schema in the prompt.",
            param="response_format.type",
            code="unsupported_value",
        )
    raise invalid_value("response_format.type", f"{kind!r} is not a response format; use 'text' or 'json_object'.")


def _no_tools(f: Fields) -> None:
    for key in ("tools", "functions"):
        value = f.body.get(key)
        if value is None or value == []:
            continue
        if not isinstance(value, list):
            raise invalid_type(key, "an array", value)
        raise RequestError(f"'{key}' is not supported by this server: its models do not call tools.", param=key, code="unsupported_parameter")
    choice = f.body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto"):
        raise RequestError("'tool_choice' is not supported by this server: its models do not call tools.", param="tool_choice", code="unsupported_parameter")


def parse_chat(body: object) -> ChatParams:
    f = Fields(require_object(body))
    model = _model(f)
    messages = _messages(f)
    _n(f)
    response_format = _response_format(f)
    _no_tools(f)
    f.string("user")
    stream, include_usage = _stream(f)
    logprobs = f.boolean("logprobs", False)
    top_logprobs = f.integer("top_logprobs", None, 0, 20)
    if top_logprobs is not None and not logprobs:
        raise invalid_value("top_logprobs", "'logprobs' must be true when 'top_logprobs' is set.")
    generation = Generation(
        model=model,
        sampling=_sampling(f),
        max_tokens=_max_tokens(f, None),
        stop=_stop(f),
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
        ignore_eos=f.boolean("ignore_eos", False),
        response_format=response_format,
    )
    return ChatParams(generation, messages)


def _batch(f: Fields, name: str, limit: int) -> tuple[tuple[str | tuple[int, ...], ...], bool]:
    """``name``'s inputs, as OpenAI takes them: a string, an array of strings, token ids, or an array
    of token-id arrays. Also whether it was an array of inputs (whose errors then name ``name[i]``)."""
    value = f.required(name)
    if isinstance(value, str):
        return (value,), False
    if not isinstance(value, list):
        raise invalid_type(name, "a string, an array of strings, an array of token ids or an array of token-id arrays", value)
    if not value:
        raise invalid_value(name, "the array is empty; send a string, strings, or token ids.")
    if all(_is_int(t) for t in value):
        return (_token_ids(value, name),), False
    if all(isinstance(t, str) for t in value):
        inputs: list[str | tuple[int, ...]] = list(value)
    elif all(isinstance(t, list) for t in value):
        inputs = [_token_ids(t, f"{name}[{i}]") for i, t in enumerate(value)]
    else:
        raise invalid_type(name, "a string, an array of strings, an array of token ids or an array of token-id arrays", value)
    if len(inputs) > limit:
        raise invalid_value(name, f"at most {limit} inputs per request, got {len(inputs)}.")
    return tuple(inputs), True


def _token_ids(values: list[Any], param: str) -> tuple[int, ...]:
    if not values:
        raise invalid_value(param, "the list of token ids is empty.")
    for index, token in enumerate(values):
        if not _is_int(token):
            raise invalid_type(f"{param}[{index}]", "an integer token id", token)
        if token < 0:
            raise invalid_value(f"{param}[{index}]", f"{int(token)} is not a token id (negative).")
    return tuple(int(t) for t in values)


def parse_completion(body: object) -> CompletionParams:
    f = Fields(require_object(body))
    model = _model(f)
    prompts, batched = _batch(f, "prompt", MAX_PROMPTS)
    _n(f)
    _n(f, "best_of")
    response_format = _response_format(f)  # an extension here, as in llama.cpp's server
    f.string("user")
    suffix = f.string("suffix")
    if suffix:
        raise RequestError("'suffix' (fill-in-the-middle) is not supported by this server.", param="suffix", code="unsupported_parameter")
    echo = f.boolean("echo", False)  # with logprobs: the prompt's tokens are scored too
    logprobs = f.integer("logprobs", None, 0, 5)
    stream, include_usage = _stream(f)
    generation = Generation(
        model=model,
        sampling=_sampling(f),
        # OpenAI's default for text completions; 0 with echo: the prompt alone (scored, with logprobs)
        max_tokens=_max_tokens(f, 16, 0 if echo else 1),
        stop=_stop(f),
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs is not None,
        top_logprobs=logprobs or 0,
        ignore_eos=f.boolean("ignore_eos", False),
        response_format=response_format,
    )
    return CompletionParams(generation, prompts, batched, echo)


@frozen
class TokenizeParams:
    """``POST /tokenize``: a prompt, or chat messages rendered with the model's template."""

    model: str | None  # None: the node's one model
    prompt: str | None
    messages: tuple[Mapping[str, Any], ...] | None
    add_special_tokens: bool  # a prompt: the model's BOS, where it wants one; messages: the template's own
    add_generation_prompt: bool


def _optional_model(f: Fields) -> str | None:
    return _model(f) if f.present("model") else None


def parse_tokenize(body: object) -> TokenizeParams:
    f = Fields(require_object(body))
    model = _optional_model(f)
    if f.present("prompt") == f.present("messages"):
        raise invalid_value("prompt", "send either 'prompt' (a string) or 'messages' (a chat), not both and not neither.")
    if f.present("prompt"):
        prompt = f.string("prompt")
        return TokenizeParams(model, prompt, None, f.boolean("add_special_tokens", True), False)
    messages = tuple(_messages(f))
    return TokenizeParams(model, None, messages, f.boolean("add_special_tokens", False), f.boolean("add_generation_prompt", True))


def parse_detokenize(body: object) -> tuple[str | None, tuple[int, ...]]:
    """``POST /detokenize``: (the model or None, the token ids; an empty list is allowed)."""
    f = Fields(require_object(body))
    model = _optional_model(f)
    tokens = f.required("tokens")
    if not isinstance(tokens, list):
        raise invalid_type("tokens", "an array of token ids", tokens)
    return model, _token_ids(tokens, "tokens") if tokens else ()


def parse_embedding(body: object) -> EmbeddingParams:
    f = Fields(require_object(body))
    model = _model(f)
    inputs, batched = _batch(f, "input", MAX_EMBEDDING_INPUTS)
    for index, item in enumerate(inputs):
        if item == "":
            raise invalid_value(f"input[{index}]" if batched else "input", "an input is an empty string.")
    encoding = f.string("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise invalid_value("encoding_format", f"{encoding!r} is not an encoding; use 'float' or 'base64'.")
    if f.present("dimensions"):
        f.integer("dimensions", None, 1)
        raise RequestError(
            "'dimensions' is not supported: this server returns each model's embeddings at their full size.",
            param="dimensions",
            code="unsupported_parameter",
        )
    f.string("user")
    return EmbeddingParams(model, inputs, encoding)
