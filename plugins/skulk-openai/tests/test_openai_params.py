"""Request parsing without a node: what each body turns into, and the param each refusal names."""

from __future__ import annotations

import pytest

from skulk_core import RequestError
from skulk_openai.params import MAX_PROMPTS, parse_chat, parse_completion, parse_embedding

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_defaults() -> None:
    params = parse_chat(CHAT)
    g = params.generation
    assert (g.model, g.max_tokens, g.stop, g.stream, g.include_usage, g.logprobs, g.top_logprobs) == ("m", None, (), False, False, False, 0)
    assert (g.sampling.temperature, g.sampling.top_p, g.sampling.top_k, g.sampling.seed) == (1.0, 1.0, 0, None)
    assert params.messages == ({"role": "user", "content": "hi"},)


def test_chat_messages_are_normalised_for_templates() -> None:
    params = parse_chat(
        {
            **CHAT,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "42", "tool_call_id": "1"},
            ],
        }
    )
    assert params.messages[0] == {"role": "system", "content": "be brief"}
    assert params.messages[1] == {"role": "user", "content": "a\nb", "name": "ann"}
    assert params.messages[2]["content"] == "" and params.messages[2]["tool_calls"][0]["id"] == "1"
    assert params.messages[3] == {"role": "tool", "content": "42", "tool_call_id": "1"}


def test_chat_fields_are_read() -> None:
    g = parse_chat(
        {
            **CHAT,
            "max_tokens": 7,
            "max_completion_tokens": 9,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": -1,
            "min_p": 0.1,
            "seed": -1,
            "stop": "x",
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 3,
            "logit_bias": {"5": -100, "6": 2.5},
            "presence_penalty": 1,
            "frequency_penalty": -1,
            "response_format": {"type": "text"},
            "user": "u",
            "n": 1,
            "some_future_field": {"anything": True},
        }
    ).generation
    assert g.max_tokens == 9  # max_completion_tokens wins
    assert g.sampling.top_k == 0  # -1 means off
    assert g.sampling.seed == 2**64 - 1  # signed seeds map onto the sampler's unsigned range
    assert g.sampling.logit_bias == {5: -100.0, 6: 2.5}
    assert (g.stop, g.stream, g.include_usage, g.logprobs, g.top_logprobs) == (("x",), True, True, True, 3)
    assert (g.sampling.temperature, g.sampling.top_p, g.sampling.min_p) == (0.0, 0.5, 0.1)


def test_response_formats() -> None:
    assert parse_chat(CHAT).generation.response_format == "text"
    assert parse_chat({**CHAT, "response_format": {"type": "json_object"}}).generation.response_format == "json_object"
    completion = parse_completion({"model": "m", "prompt": "hi", "response_format": {"type": "json_object"}})
    assert completion.generation.response_format == "json_object"
    with pytest.raises(RequestError, match="json_object") as info:
        parse_chat({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}})
    assert (info.value.param, info.value.code) == ("response_format.type", "unsupported_value")
    assert "not supported" in str(info.value) and "json mode" not in str(info.value).lower()


def test_null_reads_as_absent() -> None:
    g = parse_chat({**CHAT, "temperature": None, "max_tokens": None, "stop": None, "stream": None, "seed": None, "logit_bias": None}).generation
    assert (g.sampling.temperature, g.max_tokens, g.stop, g.stream, g.sampling.seed) == (1.0, None, (), False, None)


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"temperature": True}, "temperature", "invalid_type"),
        ({"temperature": 2.01}, "temperature", "decimal_above_max_value"),
        ({"max_tokens": True}, "max_tokens", "invalid_type"),
        ({"max_tokens": 2.5}, "max_tokens", "invalid_type"),
        ({"max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        ({"seed": 2**63}, "seed", "integer_above_max_value"),
        ({"stream": 1}, "stream", "invalid_type"),
        ({"stop": ["a", 1]}, "stop[1]", "invalid_type"),
        ({"logit_bias": {"1": "x"}}, "logit_bias.1", "invalid_type"),
        ({"logit_bias": {"1": 101}}, "logit_bias.1", "invalid_value"),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0].type", "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text", "invalid_type"),
        ({"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name", "invalid_type"),
        ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
        ({"tool_choice": "required"}, "tool_choice", "unsupported_parameter"),
    ],
)
def test_chat_refusals_name_the_param(extra: dict, param: str, code: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_chat({**CHAT, **extra})
    assert (info.value.param, info.value.code) == (param, code)


def test_completion_prompts() -> None:
    def prompts(value: object) -> tuple[tuple, bool]:
        params = parse_completion({"model": "m", "prompt": value})
        return params.prompts, params.batched

    assert prompts("hi") == (("hi",), False)
    assert prompts([1, 2.0, 3]) == (((1, 2, 3),), False)
    # an array of prompts, even of one: each is a choice, and errors name prompt[i]
    assert prompts(["hi"]) == (("hi",), True)
    assert prompts([[4, 5]]) == (((4, 5),), True)
    assert prompts(["a", "", "c"]) == (("a", "", "c"), True)  # an empty prompt is the model's BOS alone
    assert prompts([[1], [2, 3]]) == (((1,), (2, 3)), True)
    assert len(prompts(["x"] * MAX_PROMPTS)[0]) == MAX_PROMPTS
    with pytest.raises(RequestError) as info:
        parse_completion({"model": "m", "prompt": ["x"] * (MAX_PROMPTS + 1)})
    assert (info.value.param, info.value.code) == ("prompt", "invalid_value")
    with pytest.raises(RequestError) as info:
        parse_completion({"model": "m", "prompt": [[1], "a"]})
    assert (info.value.param, info.value.code) == ("prompt", "invalid_type")
    params = parse_completion({"model": "m", "prompt": "hi", "logprobs": 0, "echo": False})
    assert params.generation.max_tokens == 16 and params.generation.logprobs and params.generation.top_logprobs == 0


def test_embedding_inputs() -> None:
    assert parse_embedding({"model": "m", "input": "a"}).inputs == ("a",)
    assert parse_embedding({"model": "m", "input": ["a", "b"]}).inputs == ("a", "b")
    assert parse_embedding({"model": "m", "input": [1, 2]}).inputs == ((1, 2),)
    assert parse_embedding({"model": "m", "input": [[1], [2, 3]], "encoding_format": "base64"}).inputs == ((1,), (2, 3))
