"""End to end with the official ``openai`` client: the default model (SmolLM2-135M-Instruct) on
the llama.cpp backend, in one in-process node for the module, and once in a real ``skulk run``.

Generations are kept short (a few tokens), so the module runs in about a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai_testing import wait_for_idle

from skulk_core import DEFAULT_MODEL_ID
from skulk_core.node import Node
from skulk_core.testing import find_free_port

pytest.importorskip("skulk_llamacpp", reason="the llama.cpp backend plugin (plugins/skulk-llamacpp) is not installed")

NODE = "llama_node"  # the `http` fixture's node
MODEL = DEFAULT_MODEL_ID
HI = [{"role": "user", "content": "Hi"}]
SMOLLM2_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
)
# What Hugging Face's tokenizer for SmolLM2 gives SMOLLM2_PROMPT (apply_chat_template, tokenize=True):
# the markers are the special tokens 1 (<|im_start|>) and 2 (<|im_end|>), and no BOS is added.
SMOLLM2_TOKENS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198,
    1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198,
]  # fmt: skip


@pytest.fixture(scope="module")
def client(llama_node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=llama_node.api_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_prompt_is_the_models_template_tokenized_as_hugging_face_does(llama_node: Node, client: openai.OpenAI) -> None:
    text = llama_node.models.render_chat(MODEL, HI)
    assert text == SMOLLM2_PROMPT
    assert llama_node.models.encode(MODEL, text, add_special=False) == SMOLLM2_TOKENS
    reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert reply.usage is not None and reply.usage.prompt_tokens == len(SMOLLM2_TOKENS)


def test_the_tokenizer_endpoints_give_the_models_tokens(http: httpx.Client) -> None:
    assert http.post("/tokenize", json={"messages": HI}).json()["tokens"] == SMOLLM2_TOKENS
    assert http.post("/detokenize", json={"tokens": SMOLLM2_TOKENS}).json()["prompt"] == SMOLLM2_PROMPT
    info = http.get("/tokenizer_info").json()
    assert (info["model"], info["eos_token"], info["vocab_size"]) == (MODEL, "<|im_end|>", 49152)
    assert http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"] == [2]


def test_chat(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=12)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12


def test_chat_stream_matches_the_plain_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10)
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (plain.usage.prompt_tokens, plain.usage.completion_tokens)


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_tokens_are_drawn_on_the_compute_thread(client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    # The llama.cpp engine is a DrawingEngine: each token is drawn by the request's own sampler on
    # the process's compute thread, from llama.cpp's logits, not on the event loop from a copy.
    from skulk_core import Sampler, compute_thread
    from skulk_llamacpp import LlamaCppSettings

    compute_thread().call(lambda: None)  # an earlier request's last step decoded ahead is done
    drawn_on: list[str] = []
    draw = Sampler.draw

    def spy(self: Sampler, logits: Any) -> Any:
        drawn_on.append(threading.current_thread().name)
        return draw(self, logits)

    monkeypatch.setattr(Sampler, "draw", spy)
    reply = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=5)
    compute_thread().call(lambda: None)  # and this one's
    assert drawn_on and set(drawn_on) == {"skulk compute"}
    # One draw a generated token, and, where the engine decodes ahead (llamacpp.decode_ahead: auto,
    # the node's one thread leaving a CPU free), one for the step it decoded past the last.
    ahead = LlamaCppSettings().decodes_ahead(1)
    assert len(drawn_on) == reply.usage.completion_tokens + ahead


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6, logprobs=2)
    choice = reply.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert "".join(choice.logprobs.tokens) == choice.text and choice.logprobs.text_offset[0] == 0
    stream = list(client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in stream) == choice.text
    tokens = client.completions.create(model=MODEL, prompt=[504, 3575, 282, 4649, 314], temperature=0, max_tokens=6)
    assert tokens.usage.prompt_tokens == 5 and tokens.choices[0].text


def test_completions_with_several_prompts(client: openai.OpenAI) -> None:
    # the prompts are decoded together, and each choice is what its prompt alone gives
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    alone = [client.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=6) for p in prompts]
    reply = client.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=6)
    assert [(c.index, c.text, c.finish_reason) for c in reply.choices] == [(i, a.choices[0].text, a.choices[0].finish_reason) for i, a in enumerate(alone)]
    assert reply.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert reply.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    texts = ["", "", ""]
    for chunk in client.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=6, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [a.choices[0].text for a in alone]


def test_scoring_a_text_gives_the_log_probabilities_it_was_generated_with(llama_node: Node, client: openai.OpenAI) -> None:
    # Generate greedily with logprobs, then score prompt + completion (echo, logprobs, max_tokens 0, as
    # evaluation harnesses do): each completion token scores as it was drawn, and as the most likely.
    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    generated = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6, logprobs=1, extra_body={"ignore_eos": True})
    drawn = generated.choices[0].logprobs
    completion = [llama_node.models.encode(MODEL, piece, add_special=False) for piece in drawn.tokens]
    assert all(len(ids) == 1 for ids in completion)  # each listed piece is one token of this model
    ids = prompt + [token for [token] in completion]
    scored = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=0)
    choice = scored.choices[0]
    assert choice.text == "The capital of France is" + generated.choices[0].text and choice.finish_reason == "length"
    assert (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (len(ids), 0)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # (a prompt's rows go through llama.cpp's batched kernels, a generated token's through its
    # one-row ones: they differ by up to ~0.2)
    assert lp.token_logprobs[len(prompt) :] == pytest.approx(drawn.token_logprobs, abs=0.3)
    greedy = zip(lp.token_logprobs[len(prompt) :], lp.top_logprobs[len(prompt) :])
    assert all(max(top.values()) == pytest.approx(value, abs=1e-6) for value, top in greedy)
    assert all(value < 0 for value in lp.token_logprobs[1:])


def test_scoring_the_answers_to_one_question_computes_the_question_once(llama_node: Node, client: openai.OpenAI) -> None:
    # As an evaluation harness scores a multiple-choice question: the context with each answer.
    question = "Question: which of these is a large city in Japan? Answer:"
    context = llama_node.models.encode(MODEL, question, add_special=False)
    answers = [llama_node.models.encode(MODEL, f" {city}", add_special=False) for city in ("Osaka", "Lyon", "Turin")]
    first = client.completions.create(model=MODEL, prompt=context + answers[0], echo=True, logprobs=1, max_tokens=0)
    assert first.usage is not None and first.usage.prompt_tokens_details is None  # nothing kept yet
    second = client.completions.create(model=MODEL, prompt=context + answers[1], echo=True, logprobs=1, max_tokens=0)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    # the context's scores came with its kept cache: only the new answer was computed
    assert len(context) - 1 <= second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    # the same scores as the context and answer computed whole (more alternatives than were kept)
    whole = client.completions.create(model=MODEL, prompt=context + answers[1], echo=True, logprobs=2, max_tokens=0)
    assert whole.usage is not None and whole.usage.prompt_tokens_details is None
    got, expected = second.choices[0].logprobs, whole.choices[0].logprobs
    assert got.tokens == expected.tokens and got.text_offset == expected.text_offset
    assert got.token_logprobs[0] is None
    assert got.token_logprobs[1:] == pytest.approx(expected.token_logprobs[1:], abs=0.05)
    assert [list(top) for top in got.top_logprobs[1:]] == [list(top)[:1] for top in expected.top_logprobs[1:]]
    # the first answer's own scores, again, from the cache as well
    third = client.completions.create(model=MODEL, prompt=context + answers[0], echo=True, logprobs=1, max_tokens=0)
    assert third.usage is not None and third.usage.prompt_tokens_details is not None
    again, before = third.choices[0].logprobs.token_logprobs, first.choices[0].logprobs.token_logprobs
    assert again[1:] == pytest.approx(before[1:], abs=0.05)


def test_a_chats_next_turn_starts_from_the_kept_conversation(client: openai.OpenAI) -> None:
    first = [{"role": "user", "content": "Name a large city in Japan."}]
    reply = client.chat.completions.create(model=MODEL, messages=first, temperature=0, max_tokens=8)
    assert reply.usage is not None
    answer = reply.choices[0].message.content or ""
    follow_up = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And one in Italy?"}]
    second = client.chat.completions.create(model=MODEL, messages=follow_up, temperature=0, max_tokens=4)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    # the first turn's prompt at least came from the kept cache (OpenAI reports it the same way)
    assert reply.usage.prompt_tokens <= second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    # the same request again: all of the prompt but its last token, and the same answer
    again = client.chat.completions.create(model=MODEL, messages=follow_up, temperature=0, max_tokens=4)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == second.choices[0].message.content


def test_models(client: openai.OpenAI, http: httpx.Client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "skulk")
    assert http.get("/v1/models").json()["data"][0]["status"] == "ready"


def test_embeddings(client: openai.OpenAI, http: httpx.Client) -> None:
    reply = client.embeddings.create(model=MODEL, input=["The cat sat on the mat.", "A dog barked."], encoding_format="float")
    assert [d.index for d in reply.data] == [0, 1]
    assert len(reply.data[0].embedding) == 576  # SmolLM2-135M's hidden size
    assert sum(v * v for v in reply.data[0].embedding) == pytest.approx(1.0, abs=1e-3)
    assert reply.usage.prompt_tokens > 4
    raw = http.post("/v1/embeddings", json={"model": MODEL, "input": "The cat sat on the mat.", "encoding_format": "base64"}).json()
    decoded = memoryview(base64.b64decode(raw["data"][0]["embedding"])).cast("f").tolist()
    assert decoded == pytest.approx(reply.data[0].embedding, abs=1e-5)


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], temperature=0.8, seed=seed, max_tokens=12
        )
        return reply.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_stop_sequences(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "List three fruits."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16).choices[0].message.content or ""
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16, stop=[stop, "\u2603"])
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


JSON_ASK = [{"role": "user", "content": "Describe a person called Alice, aged 30, as a JSON object with the keys name and age."}]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 42}], ids=["greedy", "seeded"])
def test_json_mode_answers_one_json_object(client: openai.OpenAI, sampling: dict[str, Any]) -> None:
    def ask() -> tuple[str, str | None]:
        reply = client.chat.completions.create(model=MODEL, messages=JSON_ASK, response_format={"type": "json_object"}, max_tokens=200, **sampling)
        return reply.choices[0].message.content or "", reply.choices[0].finish_reason

    content, finish = ask()
    assert isinstance(json.loads(content), dict), content
    assert finish == "stop" and content.lstrip().startswith("{") and content.rstrip().endswith("}")
    assert ask() == (content, finish)  # greedy, or the same seed: the same object


def test_json_mode_streams_the_same_object(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=JSON_ASK, response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    stream = client.chat.completions.create(model=MODEL, messages=JSON_ASK, response_format={"type": "json_object"}, temperature=0, max_tokens=200, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and isinstance(json.loads(text), dict)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    completion = client.completions.create(
        model=MODEL, prompt="Here is a person as JSON:\n", temperature=0, max_tokens=200, extra_body={"response_format": {"type": "json_object"}}
    )
    assert isinstance(json.loads(completion.choices[0].text), dict) and completion.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streams_complete_with_correct_usage(llama_node: Node) -> None:
    prompts = [f"Count from {i} to {i + 5}." for i in range(16)]
    expected_prompt_tokens = [len(llama_node.models.encode(MODEL, llama_node.models.render_chat(MODEL, [{"role": "user", "content": p}]), add_special=False)) for p in prompts]

    async def main() -> list[tuple[str, str | None, Any]]:
        aclient = openai.AsyncOpenAI(base_url=llama_node.api_url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(prompt: str) -> tuple[str, str | None, Any]:
            stream = await aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True}
            )
            text, finish, usage = "", None, None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    usage = chunk.usage
            return text, finish, usage

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    for (text, finish, usage), prompt_tokens in zip(results, expected_prompt_tokens):
        assert finish in ("stop", "length") and usage is not None
        assert usage.prompt_tokens == prompt_tokens
        assert 1 <= usage.completion_tokens <= 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        if finish == "length":
            assert usage.completion_tokens == 8 and text
    wait_for_idle(llama_node, MODEL)


def test_a_disconnect_frees_the_slot(llama_node: Node) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long essay about the sea."}], "max_tokens": 1000, "ignore_eos": True, "stream": True}
    runner = llama_node.models.get(MODEL).runner
    with httpx.Client(base_url=llama_node.api_url, timeout=30) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen == 4:
                break
        assert runner.load == (1, 0)
    assert wait_for_idle(llama_node, MODEL, timeout=1.0) < 1.0


BAD: list[tuple[str, Any, int, str | None, str | None]] = [
    ("/v1/chat/completions", b'{"model": ', 400, None, "invalid_json"),
    ("/v1/chat/completions", ["not", "an", "object"], 400, None, "invalid_type"),
    ("/v1/chat/completions", {"messages": HI}, 400, "model", "missing_required_parameter"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": HI}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 2100}]}, 400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 2100}], "stream": True}, 400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "temperature": 5}, 400, "temperature", "decimal_above_max_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": "8"}, 400, "max_tokens", "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "n": 2}, 400, "n", "unsupported_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "stream": "true"}, 400, "stream", "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, 400, "response_format.type", "unsupported_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "messages[0].content[0].type", "unsupported_value"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": ["hello", ""]}, 400, "prompt[1]", None),  # SmolLM2 adds no BOS
    ("/v1/completions", {"model": MODEL, "prompt": [49152]}, 400, "prompt[0]", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "hello " * 2100}, 400, "prompt", "context_length_exceeded"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 64}, 400, "dimensions", "unsupported_parameter"),
    ("/v1/embeddings", {"model": MODEL, "input": "hello " * 2100}, 400, "input", "context_length_exceeded"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), BAD, ids=[f"{i}-{b[3]}-{b[4]}" for i, b in enumerate(BAD)])
def test_bad_inputs(http: httpx.Client, path: str, body: Any, status: int, param: str | None, code: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]


@pytest.mark.slow
def test_skulk_run_serves_the_openai_api(tmp_path: Path) -> None:
    port = find_free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKULK_")}
    env["SKULK_HOME"] = str(tmp_path / "home")
    env["SKULK_SERVE_THREADS"] = "1"  # llama.cpp's spinning threads crawl when the cores are shared
    command = [
        sys.executable, "-m", "skulk_core", "run", "--data-dir", str(tmp_path / "data"), "--api-host", "127.0.0.1", "--api-port", str(port),
        "--transport-host", "127.0.0.1", "--transport-port", str(find_free_port()), "--no-discovery",
        "--no-autoload", "--plugin", "llamacpp", "--plugin", "openai",
    ]  # fmt: skip
    log_path = tmp_path / "skulk.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"skulk exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after 120 s:\n{log_path.read_text()[-3000:]}"
            try:
                health = httpx.get(url + "/health", timeout=2)
                models = httpx.get(url + "/v1/models", timeout=2).json()["data"]
                if health.status_code == 200 and models and models[0]["status"] == "ready":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert [m["id"] for m in models] == [MODEL]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, temperature=0)
        assert reply.choices[0].message.content and reply.usage.prompt_tokens == len(SMOLLM2_TOKENS)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, temperature=0, stream=True) if c.choices)
        assert streamed == reply.choices[0].message.content
        assert httpx.get(url + "/openapi.json").json()["openapi"].startswith("3.1")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
