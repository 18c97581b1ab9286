"""The wire protocol against an in-process node serving the fake model: response and stream
shapes, the error table, disconnects, a loading model, unexpected failures, the OpenAPI document.

The fake model answers ``abcdefghijklmnopqrstuvwxyz`` greedily (see fake_backend.py), so texts,
token counts and finish reasons are known exactly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import struct
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from openai_fake_backend import BOS, fake_logits
from openai_testing import FAKE_MODEL_ID, start_fake_node, wait_for_idle, wait_until_ready

from skulk_core.node import Node
from skulk_core.sampling import log_softmax

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": FAKE_MODEL_ID, "messages": USER}


def fake_token_count(text: str) -> int:
    """Tokens the fake's tokenizer gives ``text``: one per chat marker, one per other byte."""
    markers = text.count("<|im_start|>") + text.count("<|im_end|>")
    return markers + len(text.replace("<|im_start|>", "").replace("<|im_end|>", "").encode())


CHAT_PROMPT_TOKENS = fake_token_count("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture
def client(fake_node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_node.api_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def events(response: httpx.Response) -> list[Any]:
    """The data of each server-sent event, JSON-decoded ("[DONE]" kept as is); comments dropped."""
    out = []
    for block in response.text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert all(line.startswith("data: ") for line in lines), block
        data = "\n".join(line[6:] for line in lines)
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- successful requests ---------------------------------------------------------------------


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == FAKE_MODEL_ID and abs(reply.created - time.time()) < 60
    choice = reply.choices[0]
    assert (choice.index, choice.message.role, choice.message.content, choice.finish_reason) == (0, "assistant", ALPHABET, "stop")
    assert choice.logprobs is None
    # 26 letters and the end-of-turn token
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (CHAT_PROMPT_TOKENS, 27, CHAT_PROMPT_TOKENS + 27)


def test_chat_max_tokens_and_stop(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, temperature=0, max_tokens=5)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("abcde", "length", 5)
    reply = client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, temperature=0, max_completion_tokens=3)
    assert reply.choices[0].message.content == "abc"
    reply = client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, temperature=0, stop=["xyz", "fg"])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("abcde", "stop")


def test_chat_content_parts_and_roles(http: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
        {"role": "tool", "content": "d", "tool_call_id": "t"},
    ]
    body = http.post("/v1/chat/completions", json={**CHAT, "messages": messages, "temperature": 0, "max_tokens": 1}).json()
    expected = "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\nc<|im_end|>\n<|im_start|>tool\nd<|im_end|>\n<|im_start|>assistant\n"
    assert body["usage"]["prompt_tokens"] == fake_token_count(expected)


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, temperature=0, max_tokens=3, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert [t.token for t in content] == ["a", "b", "c"]
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob < 0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    reply = client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, temperature=0, logprobs=True)
    # the end-of-turn token is not text: it has no entry
    assert "".join(t.token for t in reply.choices[0].logprobs.content) == ALPHABET
    assert all(t.top_logprobs == [] for t in reply.choices[0].logprobs.content)


def test_chat_stream_shape(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={**CHAT, "temperature": 0, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = events(response)
    assert data[-1] == "[DONE]"
    chunks = data[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == FAKE_MODEL_ID for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2]]
    assert "".join(content) == "abcd"
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": CHAT_PROMPT_TOKENS, "completion_tokens": 4, "total_tokens": CHAT_PROMPT_TOKENS + 4}
    assert all(c["usage"] is None for c in chunks[:-1])


def test_chat_stream_with_openai_client(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, temperature=0, stream=True, logprobs=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ALPHABET
    assert chunks[-1].choices[0].finish_reason == "stop"
    tokens = [t.token for c in chunks for t in ((c.choices[0].logprobs.content or []) if c.choices[0].logprobs else [])]
    assert "".join(tokens) == ALPHABET
    # without include_usage no chunk carries usage
    assert all(c.usage is None for c in chunks)


def test_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=FAKE_MODEL_ID, prompt="hi:", temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    # OpenAI's default max_tokens for text completions is 16; a string prompt gets the model's BOS
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (ALPHABET[:16], "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 16)
    reply = client.completions.create(model=FAKE_MODEL_ID, prompt=[104, 58], temperature=0, max_tokens=30, stop="k")
    assert (reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.prompt_tokens) == ("abcdefghij", "stop", 2)
    reply = client.completions.create(model=FAKE_MODEL_ID, prompt=[[104, 58]], temperature=0, max_tokens=2, echo=True)
    assert reply.choices[0].text == "h:ab"


def test_completion_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=FAKE_MODEL_ID, prompt="hi:", temperature=0, max_tokens=3, logprobs=2)
    lp = reply.choices[0].logprobs
    assert lp.tokens == ["a", "b", "c"] and lp.text_offset == [0, 1, 2]
    assert all(v < 0 for v in lp.token_logprobs)
    assert all(len(top) == 2 and token in top for top, token in zip(lp.top_logprobs, lp.tokens))
    reply = client.completions.create(model=FAKE_MODEL_ID, prompt="hi:", temperature=0, max_tokens=2, logprobs=0)
    assert reply.choices[0].logprobs.top_logprobs == [{}, {}]


def expected_score(previous: int, token: int) -> float:
    """The fake model's log-probability of ``token`` right after ``previous``."""
    return float(log_softmax(fake_logits(previous))[token])


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI) -> None:
    # max_tokens 0: the prompt alone, each token after the first scored (what evaluation harnesses send)
    reply = client.completions.create(model=FAKE_MODEL_ID, prompt=[[104, 58, 120]], echo=True, logprobs=2, max_tokens=0)
    choice = reply.choices[0]
    assert (choice.text, choice.finish_reason) == ("h:x", "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 0)
    lp = choice.logprobs
    assert lp.tokens == ["h", ":", "x"] and lp.text_offset == [0, 1, 2]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first
    assert lp.token_logprobs[1:] == pytest.approx([expected_score(104, 58), expected_score(58, 120)], abs=1e-5)
    # after "h" the fake expects "i", after ":" an "a": the two most likely tokens are listed
    assert [max(top, key=top.get) for top in lp.top_logprobs[1:]] == ["i", "a"] and all(len(top) == 2 for top in lp.top_logprobs[1:])
    # then the completion goes on after the prompt's entries; a string prompt's BOS has its entry at 0
    reply = client.completions.create(model=FAKE_MODEL_ID, prompt="h:", echo=True, logprobs=1, max_tokens=3, temperature=0)
    lp = reply.choices[0].logprobs
    assert reply.choices[0].text == "h:abc"
    assert lp.tokens == ["<s>", "h", ":", "a", "b", "c"] and lp.text_offset == [0, 0, 1, 2, 3, 4]
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1:3] == pytest.approx([expected_score(BOS, 104), expected_score(104, 58)], abs=1e-5)
    assert lp.token_logprobs[3:] == pytest.approx([expected_score(58, 97), expected_score(97, 98), expected_score(98, 99)], abs=1e-5)
    # echo without logprobs and max_tokens 0: the prompt back, nothing computed
    reply = client.completions.create(model=FAKE_MODEL_ID, prompt="hi:", echo=True, max_tokens=0)
    assert (reply.choices[0].text, reply.choices[0].finish_reason, reply.choices[0].logprobs, reply.usage.completion_tokens) == ("hi:", "length", None, 0)


def test_prompt_loglikelihoods_as_lm_evaluation_harness_asks_for_them(http: httpx.Client) -> None:
    # lm-evaluation-harness's local-completions: token prompts in a batch, echo, logprobs 1, max_tokens 1;
    # it sums token_logprobs[ctxlen:-1] (the continuation) and checks each against its top_logprobs
    # (context of 2 tokens, then the continuation: the fake itself would say "ab" after ":" and "y"
    # after "x", but not "z" after "a")
    prompts = [[104, 58, 97, 98], [119, 120, 121], [10, 97, 122, 97]]
    body = {"model": FAKE_MODEL_ID, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    reply = http.post("/v1/completions", json=body).json()
    greedy = []
    for choice, prompt in zip(sorted(reply["choices"], key=lambda c: c["index"]), prompts):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + 1  # one a prompt token, one the generated token
        continuation = lp["token_logprobs"][2:-1]
        assert sum(continuation) == pytest.approx(sum(expected_score(a, b) for a, b in zip(prompt[1:], prompt[2:])), abs=1e-4)
        greedy.append(all(token == max(top.values()) for token, top in zip(continuation, lp["top_logprobs"][2:-1])))
    assert greedy == [True, True, False]
    # a generated end of text is listed too, so the entries still line up with the tokens sent
    reply = http.post("/v1/completions", json={**body, "prompt": [[121, 122]]}).json()
    assert reply["choices"][0]["logprobs"]["tokens"] == ["y", "z", "<|im_end|>"] and reply["choices"][0]["text"] == "yz"


def test_a_scored_prompt_streams_its_echo_with_its_scores(http: httpx.Client) -> None:
    body = {"model": FAKE_MODEL_ID, "prompt": [[104, 58], [120]], "temperature": 0, "max_tokens": 2, "stream": True, "echo": True, "logprobs": 1}
    data = events(http.post("/v1/completions", json=body))
    assert data[-1] == "[DONE]"
    for index, (prompt, text) in enumerate([([104, 58], "h:"), ([120], "x")]):
        mine = [c["choices"][0] for c in data[:-1] if c["choices"][0]["index"] == index]
        echo = mine[0]  # the echoed prompt comes first, with its tokens' scores
        assert echo["text"] == text and echo["logprobs"]["tokens"] == [chr(t) for t in prompt]
        assert echo["logprobs"]["token_logprobs"] == [None, *([pytest.approx(expected_score(104, 58), abs=1e-5)] if len(prompt) == 2 else [])]
        assert "".join(c["text"] for c in mine) == text + ("ab" if index == 0 else "yz")
        assert [o for c in mine for o in c["logprobs"]["text_offset"]] == list(range(len(prompt) + 2))


def test_the_tokenizer_endpoints(http: httpx.Client) -> None:
    # vLLM's /tokenize, /detokenize and /tokenizer_info, at the server's root
    assert http.post("/tokenize", json={"prompt": "hi"}).json() == {"count": 3, "max_model_len": 4096, "tokens": [BOS, 104, 105]}
    assert http.post("/tokenize", json={"model": FAKE_MODEL_ID, "prompt": "hi<|im_end|>", "add_special_tokens": False}).json()["tokens"] == [104, 105, 257]
    chat = http.post("/tokenize", json={"messages": USER}).json()
    assert chat["count"] == CHAT_PROMPT_TOKENS and chat["tokens"][0] == 256  # the template's own markers, no BOS
    assert http.post("/tokenize", json={"messages": USER, "add_generation_prompt": False}).json()["count"] < CHAT_PROMPT_TOKENS
    assert http.post("/detokenize", json={"tokens": [104, 105, 257]}).json() == {"prompt": "hi<|im_end|>"}
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}
    info = http.get("/tokenizer_info").json()
    assert (info["model"], info["bos_token"], info["eos_token"], info["model_max_length"], info["vocab_size"]) == (FAKE_MODEL_ID, "<s>", "<|im_end|>", 4096, 260)
    assert "<|im_start|>" in info["chat_template"] and http.get(f"/tokenizer_info?model={FAKE_MODEL_ID}").json() == info


def test_lm_evaluation_harness_finds_and_uses_the_remote_tokenizer(http: httpx.Client) -> None:
    # what lm-evaluation-harness's check_remote_tokenizer_support and RemoteTokenizer ask, in order
    info = http.get("/tokenizer_info").json()
    assert isinstance(info, dict) and "eos_token" in info
    assert isinstance(http.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json().get("tokens"), list)
    eos_token_id = http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"][0]
    assert eos_token_id == 257
    context = http.post("/tokenize", json={"prompt": "h:", "add_special_tokens": False}).json()["tokens"]
    continuation = http.post("/tokenize", json={"prompt": "ab", "add_special_tokens": False}).json()["tokens"]
    body = {"model": FAKE_MODEL_ID, "prompt": [context + continuation], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    lp = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert sum(lp["token_logprobs"][len(context) : -1]) == pytest.approx(expected_score(58, 97) + expected_score(97, 98), abs=1e-4)
    assert http.post("/detokenize", json={"tokens": context + continuation}).json()["prompt"] == "h:ab"


def test_completion_stream(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"model": FAKE_MODEL_ID, "prompt": "hi:", "temperature": 0, "max_tokens": 3, "stream": True, "logprobs": 1, "stream_options": {"include_usage": True}})
    assert response.text.startswith(": ok\n\n")  # headers and a first byte before any token
    data = events(response)
    assert data[-1] == "[DONE]"
    chunks = data[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and all(c["object"] == "text_completion" for c in chunks)
    text_chunks = chunks[:-1]
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == "abc"
    assert [o for c in text_chunks for o in c["choices"][0]["logprobs"]["text_offset"]] == [0, 1, 2]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_completion_stream_with_openai_client(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=FAKE_MODEL_ID, prompt="hi:", temperature=0, max_tokens=40, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ALPHABET
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_with_several_prompts(client: openai.OpenAI) -> None:
    # one choice a prompt, each its own prompt's continuation (after a letter the fake goes on with
    # the alphabet), in the prompts' order; the usage adds up every prompt and every completion
    reply = client.completions.create(model=FAKE_MODEL_ID, prompt=["hi:", "w", ""], temperature=0, max_tokens=3, echo=True)
    assert [(c.index, c.text, c.finish_reason) for c in reply.choices] == [(0, "hi:abc", "length"), (1, "wxyz", "length"), (2, "abc", "length")]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (4 + 2 + 1, 9, 16)
    reply = client.completions.create(model=FAKE_MODEL_ID, prompt=[[104, 58], [104]], temperature=0, max_tokens=30, stop=["d", "f"], logprobs=1)
    assert [(c.index, c.text, c.finish_reason) for c in reply.choices] == [(0, "abc", "stop"), (1, ALPHABET[8:], "stop")]
    assert reply.choices[0].logprobs.tokens[:3] == ["a", "b", "c"] and reply.choices[1].logprobs.tokens[:2] == ["i", "j"]
    assert reply.usage.prompt_tokens == 3


def test_completion_stream_with_several_prompts(http: httpx.Client) -> None:
    body = {"model": FAKE_MODEL_ID, "prompt": ["hi:", "hello:"], "temperature": 0, "stream": True, "echo": True, "stream_options": {"include_usage": True}}
    data = events(http.post("/v1/completions", json={**body, "max_tokens": 4}))
    assert data[-1] == "[DONE]"
    chunks = data[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    # the echoed prompts come first, then each choice's text as it is generated
    assert [c["choices"][0] for c in chunks[:2]] == [{"index": i, "text": p, "logprobs": None, "finish_reason": None} for i, p in enumerate(["hi:", "hello:"])]
    text_chunks = [c["choices"][0] for c in chunks[:-1]]
    assert {c["index"] for c in text_chunks} == {0, 1}
    for index, prompt in enumerate(["hi:", "hello:"]):
        mine = [c for c in text_chunks if c["index"] == index]
        assert "".join(c["text"] for c in mine) == prompt + "abcd"
        assert [c["finish_reason"] for c in mine].count("length") == 1 and mine[-1]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 8, "total_tokens": 19}


def test_completion_stream_with_several_prompts_and_the_openai_client(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=FAKE_MODEL_ID, prompt=["a", "b", "c"], temperature=0, max_tokens=40, stream=True)
    texts: dict[int, str] = {}
    finished: dict[int, str | None] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            finished[choice.index] = choice.finish_reason or finished.get(choice.index)
    assert texts == {0: ALPHABET[1:], 1: ALPHABET[2:], 2: ALPHABET[3:]} and finished == {0: "stop", 1: "stop", 2: "stop"}


def test_json_mode_turns_the_fake_alphabet_into_one_object(client: openai.OpenAI, http: httpx.Client) -> None:
    # The fake wants "abc...", which is not JSON; in JSON mode it writes "{", its favourite
    # whitespace up to the constraint's bound, then "}", and stops there.
    reply = client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, temperature=0, response_format={"type": "json_object"})
    content, choice = reply.choices[0].message.content or "", reply.choices[0]
    assert json.loads(content) == {} and content.startswith("{") and choice.finish_reason == "stop"
    assert reply.usage.completion_tokens == len(content)  # one token per byte, and no end-of-turn token
    streamed = list(client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, temperature=0, response_format={"type": "json_object"}, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == content
    assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] == ["stop"]
    cut = client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, temperature=0, response_format={"type": "json_object"}, max_tokens=3)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == (content[:3], "length")
    text = http.post("/v1/completions", json={"model": FAKE_MODEL_ID, "prompt": "x", "temperature": 0.8, "seed": 5, "max_tokens": 100, "response_format": {"type": "json_object"}}).json()
    assert isinstance(json.loads(text["choices"][0]["text"]), dict) and text["choices"][0]["finish_reason"] == "stop"
    # "text" is the default and changes nothing
    plain = client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, temperature=0, response_format={"type": "text"})
    assert plain.choices[0].message.content == ALPHABET


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        reply = client.completions.create(model=FAKE_MODEL_ID, prompt=[1], temperature=2, max_tokens=24, seed=seed, extra_body={"ignore_eos": True})
        return reply.choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


def test_models(client: openai.OpenAI, http: httpx.Client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [FAKE_MODEL_ID]
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    entry = raw["data"][0]
    assert entry == {"id": FAKE_MODEL_ID, "object": "model", "created": entry["created"], "owned_by": "skulk", "status": "ready"}
    assert client.models.retrieve(FAKE_MODEL_ID).id == FAKE_MODEL_ID
    assert http.get("/v1/models/").json() == raw  # a trailing slash is no redirect


def test_embeddings(client: openai.OpenAI, http: httpx.Client) -> None:
    reply = client.embeddings.create(model=FAKE_MODEL_ID, input=["hello", "world"], encoding_format="float")
    assert reply.object == "list" and reply.model == FAKE_MODEL_ID
    assert [d.index for d in reply.data] == [0, 1] and all(len(d.embedding) == 16 for d in reply.data)
    assert sum(v * v for v in reply.data[0].embedding) == pytest.approx(1.0)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == 12  # BOS + 5 bytes, twice
    raw = http.post("/v1/embeddings", json={"model": FAKE_MODEL_ID, "input": [[104, 105]], "encoding_format": "base64"}).json()
    vector = struct.unpack("<16f", base64.b64decode(raw["data"][0]["embedding"]))
    floats = http.post("/v1/embeddings", json={"model": FAKE_MODEL_ID, "input": [104, 105]}).json()["data"][0]["embedding"]
    assert vector == pytest.approx(floats)
    # the official client asks for base64 by default and decodes it
    assert client.embeddings.create(model=FAKE_MODEL_ID, input="hello").data[0].embedding == pytest.approx(reply.data[0].embedding)


def test_concurrent_streams_all_complete(fake_node: Node) -> None:
    async def main() -> list[tuple[str, int]]:
        client = openai.AsyncOpenAI(base_url=fake_node.api_url + "/v1", api_key="unused", max_retries=0, timeout=60)

        async def one(i: int) -> tuple[str, int]:
            stream = await client.chat.completions.create(
                model=FAKE_MODEL_ID, messages=USER, temperature=0, max_tokens=5 + i % 3, stream=True, stream_options={"include_usage": True}
            )
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage is not None:
                    usage = chunk.usage
            assert usage is not None and usage.prompt_tokens == CHAT_PROMPT_TOKENS
            return text, usage.completion_tokens

        try:
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert results == [(ALPHABET[: 5 + i % 3], 5 + i % 3) for i in range(16)]
    wait_for_idle(fake_node, FAKE_MODEL_ID)


# -- disconnects -----------------------------------------------------------------------------


def _engine(node: Node) -> Any:
    served = node.models.get(FAKE_MODEL_ID)
    assert served.chain is not None
    return served.chain.head


DISCONNECTS = [
    # (path, the request's own fields, the sequences it decodes)
    ("/v1/chat/completions", {"messages": USER}, 1),
    ("/v1/completions", {"prompt": "hi"}, 1),
    ("/v1/completions", {"prompt": ["a", "b", "c"]}, 3),  # one sequence a prompt: all freed
]


@pytest.mark.parametrize(("path", "fields", "sequences"), DISCONNECTS)
def test_disconnect_mid_stream_frees_the_sequence(fake_node: Node, path: str, fields: dict[str, Any], sequences: int) -> None:
    body = {"model": FAKE_MODEL_ID, "ignore_eos": True, "stream": True, "max_tokens": 3000, **fields}
    runner = fake_node.models.get(FAKE_MODEL_ID).runner
    with httpx.Client(base_url=fake_node.api_url, timeout=10) as http, http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen == 5:
                break
        assert runner.load == (sequences, 0)
    # the client closed its connection: within a second the sequence is released and nothing runs
    assert wait_for_idle(fake_node, FAKE_MODEL_ID, timeout=1.0) < 1.0
    assert _engine(fake_node).live == set()


@pytest.mark.parametrize(("path", "fields", "sequences"), DISCONNECTS)
def test_disconnect_during_a_plain_request_frees_the_sequence(fake_node: Node, path: str, fields: dict[str, Any], sequences: int) -> None:
    with pytest.raises(httpx.TimeoutException):
        httpx.post(fake_node.api_url + path, json={"model": FAKE_MODEL_ID, "ignore_eos": True, "max_tokens": 3000, **fields}, timeout=0.3)
    assert wait_for_idle(fake_node, FAKE_MODEL_ID, timeout=1.0) < 1.0
    assert _engine(fake_node).live == set()


def test_headers_arrive_before_the_first_token(fake_node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """The role chunk is on the wire while the model is still busy with the first step."""
    engine = _engine(fake_node)
    original = engine.step

    async def slow_step(batch: Any) -> Any:
        await anyio.sleep(1.5)
        return await original(batch)

    monkeypatch.setattr(engine, "step", slow_step)
    with socket.create_connection(fake_node.api_address) as sock:  # type: ignore[arg-type]
        body = json.dumps({**CHAT, "stream": True, "max_tokens": 1}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.settimeout(1.0)
        received = b""
        while b'"role":"assistant"' not in received:
            received += sock.recv(65536)  # raises TimeoutError if the first chunk waits for the model
    assert received.startswith(b"HTTP/1.1 200")
    monkeypatch.undo()
    wait_for_idle(fake_node, FAKE_MODEL_ID, timeout=3)


# -- the error table -------------------------------------------------------------------------

LONG = "x" * 5000  # the fake's context is 4096 tokens, one per byte
M = FAKE_MODEL_ID

ERRORS: list[tuple[str, Any, int, str | None, str | None]] = [
    # (path, body (bytes sent as they are, anything else as JSON), status, param, code)
    ("/v1/chat/completions", b"{", 400, None, "invalid_json"),
    ("/v1/chat/completions", b"", 400, None, "invalid_json"),
    ("/v1/chat/completions", b"\xff\xfe\x00", 400, None, "invalid_json"),
    ("/v1/chat/completions", b'{"model": "fake-tiny", "messages": [], "temperature": NaN}', 400, None, "invalid_json"),
    ("/v1/chat/completions", b"[" * 100_000, 400, None, "invalid_json"),
    ("/v1/chat/completions", [1], 400, None, "invalid_type"),
    ("/v1/chat/completions", "hello", 400, None, "invalid_type"),
    ("/v1/chat/completions", None, 400, None, "invalid_type"),
    ("/v1/chat/completions", {"messages": USER}, 400, "model", "missing_required_parameter"),
    ("/v1/chat/completions", {"model": 5, "messages": USER}, 400, "model", "invalid_type"),
    ("/v1/chat/completions", {"model": "nope", "messages": USER}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": M}, 400, "messages", "missing_required_parameter"),
    ("/v1/chat/completions", {"model": M, "messages": "hi"}, 400, "messages", "invalid_type"),
    ("/v1/chat/completions", {"model": M, "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": M, "messages": [{"content": "x"}]}, 400, "messages[0].role", "missing_required_parameter"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user"}]}, 400, "messages[0].content", "missing_required_parameter"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content[0].type", "unsupported_value"),
    ("/v1/chat/completions", {**CHAT, "temperature": 3}, 400, "temperature", "decimal_above_max_value"),
    ("/v1/chat/completions", {**CHAT, "temperature": -0.1}, 400, "temperature", "decimal_below_min_value"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, 400, "top_p", "decimal_above_max_value"),
    ("/v1/chat/completions", {**CHAT, "top_k": -2}, 400, "top_k", "integer_below_min_value"),
    ("/v1/chat/completions", {**CHAT, "min_p": 2}, 400, "min_p", "decimal_above_max_value"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 3}, 400, "presence_penalty", "decimal_above_max_value"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": -3}, 400, "frequency_penalty", "decimal_below_min_value"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", "integer_below_min_value"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 1.5}, 400, "max_tokens", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "10"}, 400, "max_tokens", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -1}, 400, "max_completion_tokens", "integer_below_min_value"),
    ("/v1/chat/completions", {**CHAT, "seed": "x"}, 400, "seed", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "stop": 5}, 400, "stop", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "n": 2}, 400, "n", "unsupported_value"),
    ("/v1/chat/completions", {**CHAT, "n": "1"}, 400, "n", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": []}, 400, "stream_options", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "logprobs": "yes"}, 400, "logprobs", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "integer_above_max_value"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"abc": 1}}, 400, "logit_bias", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 200}}, 400, "logit_bias.5", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"999999": 1}}, 400, "logit_bias", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": [1]}, 400, "logit_bias", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, "response_format.type", "unsupported_value"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400, "response_format.type", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "response_format": "json"}, 400, "response_format", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "user": 5}, 400, "user", "invalid_type"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": LONG}]}, 400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": LONG}], "stream": True}, 400, "messages", "context_length_exceeded"),
    ("/v1/completions", {"model": M}, 400, "prompt", "missing_required_parameter"),
    ("/v1/completions", {"model": M, "prompt": 5}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"model": M, "prompt": []}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": M, "prompt": ["a", 5]}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"model": M, "prompt": [[1, 2], 3]}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"model": M, "prompt": ["a"] * 257}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": M, "prompt": [[1, 2], []]}, 400, "prompt[1]", "invalid_value"),
    ("/v1/completions", {"model": M, "prompt": [[1], [2, 999999]]}, 400, "prompt[1][1]", "invalid_value"),
    ("/v1/completions", {"model": M, "prompt": ["a", LONG]}, 400, "prompt[1]", "context_length_exceeded"),
    ("/v1/completions", {"model": M, "prompt": ["a", LONG], "stream": True}, 400, "prompt[1]", "context_length_exceeded"),
    ("/v1/completions", {"model": M, "prompt": [-1]}, 400, "prompt[0]", "invalid_value"),
    ("/v1/completions", {"model": M, "prompt": [1, 999999]}, 400, "prompt[1]", "invalid_value"),
    ("/v1/completions", {"model": M, "prompt": [[1, "a"]]}, 400, "prompt[0][1]", "invalid_type"),
    ("/v1/completions", {"model": M, "prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": M, "prompt": LONG, "stream": True}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": M, "prompt": "x", "suffix": "y"}, 400, "suffix", "unsupported_parameter"),
    ("/v1/completions", {"model": M, "prompt": "x", "response_format": {"type": "json_schema"}}, 400, "response_format.type", "unsupported_value"),
    ("/v1/completions", {"model": M, "prompt": "x", "response_format": {"type": "yaml"}}, 400, "response_format.type", "invalid_value"),
    ("/v1/completions", {"model": M, "prompt": "x", "echo": "yes"}, 400, "echo", "invalid_type"),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "integer_below_min_value"),
    ("/tokenize", {}, 400, "prompt", "invalid_value"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt", "invalid_value"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "invalid_type"),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ("/tokenize", [1], 400, None, "invalid_type"),
    ("/tokenize", b"{", 400, None, "invalid_json"),
    ("/detokenize", {}, 400, "tokens", "missing_required_parameter"),
    ("/detokenize", {"tokens": "hi"}, 400, "tokens", "invalid_type"),
    ("/detokenize", {"tokens": [1, -2]}, 400, "tokens[1]", "invalid_value"),
    ("/detokenize", {"tokens": [1, 999999]}, 400, "tokens[1]", "invalid_value"),
    ("/v1/completions", {"model": M, "prompt": "x", "echo": True, "logprobs": 1, "max_tokens": -1}, 400, "max_tokens", "integer_below_min_value"),
    ("/v1/completions", {"model": M, "prompt": "x", "logprobs": 6}, 400, "logprobs", "integer_above_max_value"),
    ("/v1/completions", {"model": M, "prompt": "x", "logprobs": True}, 400, "logprobs", "invalid_type"),
    ("/v1/completions", {"model": M, "prompt": "x", "best_of": 2}, 400, "best_of", "unsupported_value"),
    ("/v1/completions", {"model": M, "prompt": "x", "n": 3}, 400, "n", "unsupported_value"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/embeddings", {"model": M}, 400, "input", "missing_required_parameter"),
    ("/v1/embeddings", {"model": M, "input": 5}, 400, "input", "invalid_type"),
    ("/v1/embeddings", {"model": M, "input": []}, 400, "input", "invalid_value"),
    ("/v1/embeddings", {"model": M, "input": [1, "a"]}, 400, "input", "invalid_type"),
    ("/v1/embeddings", {"model": M, "input": ["a", ""]}, 400, "input[1]", "invalid_value"),
    ("/v1/embeddings", {"model": M, "input": [[1], [999999]]}, 400, "input[1][0]", "invalid_value"),
    ("/v1/embeddings", {"model": M, "input": "a", "encoding_format": "int8"}, 400, "encoding_format", "invalid_value"),
    ("/v1/embeddings", {"model": M, "input": "a", "dimensions": 8}, 400, "dimensions", "unsupported_parameter"),
    ("/v1/embeddings", {"model": M, "input": "x" * 5000}, 400, "input", "context_length_exceeded"),
    ("/v1/embeddings", {"model": "nope", "input": "a"}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), ERRORS, ids=[f"{i}-{e[0].rsplit('/', 1)[1]}-{e[3]}-{e[4]}" for i, e in enumerate(ERRORS)])
def test_bad_requests_get_openai_errors(http: httpx.Client, path: str, body: Any, status: int, param: str | None, code: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert isinstance(error["message"], str) and len(error["message"]) > 10


def test_unknown_parameters_are_ignored(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1, "store": True, "metadata": {"a": "b"}, "service_tier": "auto", "frobnicate": [1]})
    assert response.status_code == 200


def test_unknown_model_with_the_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=USER)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=FAKE_MODEL_ID, messages=USER, n=2)
    assert bad.value.param == "n"


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/v1/chat/completions", 405, "POST"),
        ("PUT", "/v1/completions", 405, "POST"),
        ("POST", "/v1/models", 405, "GET"),
        ("DELETE", f"/v1/models/{FAKE_MODEL_ID}", 405, "GET"),
        ("POST", "/openapi.json", 405, "GET"),
        ("GET", "/v1/nope", 404, None),
        ("GET", "/v1", 404, None),
        ("POST", "/v1/engines/x/completions", 404, None),
        ("GET", "/nope", 404, None),
    ],
)
def test_wrong_paths_and_methods_are_json(http: httpx.Client, method: str, path: str, status: int, allow: str | None) -> None:
    response = http.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    if allow:
        assert allow in response.headers["allow"]


def test_model_lookup_404(http: httpx.Client) -> None:
    response = http.get("/v1/models/nope/with/slashes")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_body_over_the_limit_is_a_json_413(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", content=b" " * (16 * 1024 * 1024 + 1), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_unexpected_failure_is_a_logged_json_500(fake_node: Node, http: httpx.Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(fake_node.models, "render_chat", broken)
    with caplog.at_level(logging.ERROR, logger="skulk.openai"):
        response = http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "boom" not in response.text  # internals stay in the log
    assert any("boom" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_a_failing_engine_ends_the_stream_with_an_error_event(fake_node: Node, http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(fake_node)

    async def broken(batch: Any) -> Any:
        raise RuntimeError("the fake engine broke")

    monkeypatch.setattr(engine, "step", broken)
    data = events(http.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    assert data[0]["choices"][0]["delta"]["role"] == "assistant"
    assert data[-1]["error"]["type"] == "server_error" and "[DONE]" not in data
    response = http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    wait_for_idle(fake_node, FAKE_MODEL_ID)


def test_a_failing_engine_ends_a_several_prompt_stream_with_an_error_event(fake_node: Node, http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(fake_node)

    async def broken(batch: Any) -> Any:
        raise RuntimeError("the fake engine broke")

    monkeypatch.setattr(engine, "step", broken)
    body = {"model": FAKE_MODEL_ID, "prompt": ["a", "b"], "max_tokens": 5}
    data = events(http.post("/v1/completions", json={**body, "stream": True}))
    assert data[-1]["error"]["type"] == "server_error" and "[DONE]" not in data
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    wait_for_idle(fake_node, FAKE_MODEL_ID)


def test_loading_model_is_503(tmp_path: Path, fake_model: Path) -> None:
    with ExitStack() as stack:
        node = start_fake_node(stack, tmp_path / "node", fake_model, fake={"load_delay": 30})
        deadline = time.monotonic() + 10
        while not node.models.models() and time.monotonic() < deadline:
            time.sleep(0.02)
        with httpx.Client(base_url=node.api_url, timeout=10) as http:
            assert http.get("/v1/models").json()["data"][0]["status"] == "loading"
            for path, body in [("/v1/chat/completions", CHAT), ("/v1/completions", {"model": M, "prompt": "x"}), ("/v1/embeddings", {"model": M, "input": "x"})]:
                response = http.post(path, json=body)
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"]
                assert response.json()["error"]["code"] == "model_not_ready"
            # a bad body is still a 400, not a 503
            assert http.post("/v1/chat/completions", json={**CHAT, "n": 5}).status_code == 400


def test_api_key(tmp_path: Path, fake_model: Path) -> None:
    with ExitStack() as stack:
        node = start_fake_node(stack, tmp_path / "node", fake_model, api={"key": "sekrit"})
        wait_until_ready(node, FAKE_MODEL_ID)
        for path in ("/v1/models", "/openapi.json"):
            response = httpx.get(node.api_url + path)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert httpx.get(node.api_url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=node.api_url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=node.api_url + "/v1", api_key="sekrit", max_retries=0)
        assert client.chat.completions.create(model=M, messages=USER, temperature=0, max_tokens=2).choices[0].message.content == "ab"


# -- the app and its document ----------------------------------------------------------------


def test_quart_timeouts_do_not_cut_streams(fake_node: Node) -> None:
    from skulk_openai.app import create_app

    app = create_app(fake_node)
    assert app.config["RESPONSE_TIMEOUT"] is None
    assert app.config["MAX_CONTENT_LENGTH"] == 16 * 1024 * 1024
    assert app.config["BODY_TIMEOUT"] >= 30


def test_openapi_document_describes_every_route(fake_node: Node, http: httpx.Client) -> None:
    from skulk_openai.app import create_app

    doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    app = create_app(fake_node)
    routes = {(rule.rule.replace("<path:model_id>", "{model}"), method.lower()) for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"} if rule.endpoint != "static"}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routes | {("/health", "get")} == documented

    def refs(value: Any) -> list[str]:
        if isinstance(value, dict):
            return [r for k, v in value.items() for r in ([v] if k == "$ref" else refs(v))]
        if isinstance(value, list):
            return [r for v in value for r in refs(v)]
        return []

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in doc["components"]["schemas"], ref
    for item in doc["paths"].values():
        for operation in item.values():
            assert "200" in operation["responses"]
            if "requestBody" in operation:
                assert {"400", "404", "503"} <= set(operation["responses"])
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["required"] == ["model", "messages"]
    assert chat["properties"]["temperature"]["maximum"] == 2 and chat["properties"]["top_logprobs"]["maximum"] == 20
    completion = doc["components"]["schemas"]["CompletionRequest"]
    assert completion["properties"]["max_tokens"]["minimum"] == 0 and "scored" in completion["properties"]["echo"]["description"]
    # the node's models are the examples of `model`, and token ids are bounded by their vocabulary
    assert doc["components"]["schemas"]["ModelId"]["examples"] == [FAKE_MODEL_ID]
    assert doc["components"]["schemas"]["TokenIds"]["items"]["maximum"] == 259
