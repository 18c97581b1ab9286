"""JSON mode: the incremental JSON validator, the sampler under a constraint, and the scheduler
finishing a request when its object closes. The tokenizer and engine here are fakes (named so):
a handful of JSON pieces whose logits the tests choose, where the real model's tests cannot."""

from __future__ import annotations

import codecs
import json
import random
from collections.abc import Sequence

import anyio
import numpy as np
import pytest

from skulk_core.backend import SequenceChunk, StageOutput
from skulk_core.constraints import MAX_WHITESPACE, JsonObjectConstraint, JsonPrefix, TokenTexts
from skulk_core.errors import ModelError, RequestError
from skulk_core.inference import GenerationRequest, InstanceRunner
from skulk_core.pipeline import LocalChain
from skulk_core.placement import ShardRange
from skulk_core.sampling import Sampler, SamplingParams

# -- the validator ---------------------------------------------------------------------------

VALID = [
    "{}",
    ' \n\t{"a": 1}',
    '{"a":[1,-2.5e+3,0,0.125,1E9,-0e-0,true,false,null,"x"],"b":{"c":[],"d":{}}}',
    '{"key with spaces": "tab\\tnewline\\nquote\\"slash\\/backslash\\\\", "u": "\\u00e9\\uD83D\\uDE00"}',
    '{"é": "ü 日本語 😀", "raw": "no escapes needed for non-ASCII"}',
    json.dumps({"nested": [[{"deep": [1, [2, [3]]]}]], "n": -0.5}, indent=2),
    "{}\n",
]

INVALID = [
    "[]",  # the top level must be an object
    '"a"',
    "1",
    "x",
    "{a",
    '{"a" 1',
    '{"a":01',
    '{"a":1.}',
    '{"a":.5}',
    '{"a":1e}',
    '{"a":-}',
    '{"a":+1}',
    '{"a":tru}',
    '{"a":True}',
    '{"a":NaN}',
    '{"a":"\\x"}',
    '{"a":"\\u12g4"}',
    '{"a":"line\nbreak"}',  # a raw control character in a string
    "{,",
    '{"a":1,}',
    '{"a":[1,]}',
    '{"a":[}',
    '{"a":1]',
    "{}}",
    "{} x",
    "{}{}",
    "{'a': 1}",
]


def feeds(text: str) -> JsonPrefix | None:
    prefix = JsonPrefix()
    return prefix if prefix.feed(text) else None


@pytest.mark.parametrize("text", VALID)
def test_every_prefix_of_a_valid_object_is_accepted_and_only_the_whole_is_complete(text: str) -> None:
    assert isinstance(json.loads(text), dict)
    for end in range(len(text.rstrip()) + 1):
        prefix = feeds(text[:end])
        assert prefix is not None, f"rejected the prefix {text[:end]!r}"
        assert prefix.complete == (end >= len(text.rstrip())), text[:end]
    # fed one character at a time, the same
    prefix = JsonPrefix()
    assert all(prefix.feed(c) for c in text) and prefix.complete


@pytest.mark.parametrize("text", INVALID)
def test_invalid_text_is_rejected_and_leaves_the_state_unchanged(text: str) -> None:
    prefix = JsonPrefix()
    assert not prefix.feed(text)
    assert prefix.state == JsonPrefix().state
    # the longest accepted prefix is followed by a character that is refused
    accepted = max(end for end in range(len(text) + 1) if feeds(text[:end]) is not None)
    assert accepted < len(text)
    assert not feeds(text[:accepted]).accepts(text[accepted])  # type: ignore[union-attr]


def test_accepts_does_not_feed_and_copies_are_independent() -> None:
    prefix = JsonPrefix()
    assert prefix.feed('{"a": ')
    assert prefix.accepts("[1") and prefix.accepts('"x"}') and not prefix.accepts("}")
    copy = prefix.copy()
    assert copy.feed("[1, 2]}") and copy.complete
    assert not prefix.complete and prefix.feed('"b"}') and prefix.complete


def test_whitespace_between_tokens_is_bounded() -> None:
    assert feeds(" " * MAX_WHITESPACE + "{") is not None
    assert feeds(" " * (MAX_WHITESPACE + 1)) is None
    assert feeds('{"a":' + "\n" * MAX_WHITESPACE + "1," + "\n" * MAX_WHITESPACE + '"b": 2}') is not None
    assert feeds('{"a": "' + " " * 200 + '"}') is not None  # inside strings, anything goes


def test_the_validator_agrees_with_json_loads_on_mutated_documents() -> None:
    """Random edits of real documents: complete exactly when Python's strict parser reads a dict."""

    def strict_loads(text: str) -> object:
        def refuse(name: str) -> object:
            raise ValueError(name)

        return json.loads(text, parse_constant=refuse)

    rng = random.Random(11)
    alphabet = '{}[]:,"\\ \n0123456789.eE+-truefalsnl\u00e9x/bu'
    documents = [json.dumps(v, indent=indent) for v in ({"a": [1, 2.5, None]}, {"k": {"x": "y\n", "z": [True, False]}, "n": -1e-5}, {}) for indent in (None, 1)]
    agreed = 0
    for _ in range(3000):
        text = rng.choice(documents)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(text) + 1)
            kind = rng.random()
            if kind < 0.4:
                text = text[:at] + rng.choice(alphabet) + text[at:]
            elif kind < 0.8:
                text = text[:at] + text[at + 1 :]
            else:
                text = text[:at] + rng.choice(alphabet) + text[at + 1 :]
        prefix = feeds(text)
        try:
            parsed = strict_loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            assert prefix is not None and prefix.complete, text
            agreed += 1
        elif prefix is not None and prefix.complete:
            pytest.fail(f"complete, but json.loads refuses it: {text!r}")
    assert agreed > 300  # the check above ran on many documents that stayed valid


# -- a fake tokenizer of JSON pieces ------------------------------------------------------------

EOS = 0
CONTROL = 1  # a chat marker: never valid in JSON mode
PIECES: list[bytes] = [
    b"<|endoftext|>", b"<|im_start|>", b"Sure", b"{", b"}", b'{"', b'"', b"name", b'":', b" ", b"\n", b"1", b"2",
    b",", b'"}', b"}\n", b"\xc3", b"\xa9", "é".encode(), b"\xff", b"", b"ok", b"[", b"]", b"```json", b":",
]  # fmt: skip
TOKEN = {piece: index for index, piece in enumerate(PIECES)}


class FakeJsonTokenizer:
    """Each token is one of PIECES: JSON punctuation, words, half a UTF-8 character (0xC3, 0xA9),
    a byte that is never UTF-8 (0xFF), an empty token, and two control tokens."""

    bos_token_id = None
    eos_token_ids = frozenset({EOS})
    vocab_size = len(PIECES)

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return [TOKEN[b"ok"]] * max(1, len(text))

    def token_bytes(self, token_id: int) -> bytes:
        return PIECES[token_id]

    def is_control(self, token_id: int) -> bool:
        return token_id in (EOS, CONTROL)


def constraint() -> JsonObjectConstraint:
    return JsonObjectConstraint(TokenTexts(FakeJsonTokenizer()))


def logits_favouring(*pieces: bytes, rest: float = 0.0) -> np.ndarray:
    """Logits where ``pieces`` come first, in this order, and every other token scores ``rest``."""
    logits = np.full(len(PIECES), rest, dtype=np.float32)
    for rank, piece in enumerate(pieces):
        logits[TOKEN[piece]] = 10.0 - rank
    return logits


def test_the_token_constraint_follows_the_text_of_tokens() -> None:
    c = constraint()
    allowed = {PIECES[t] for t in range(len(PIECES)) if c.allows(t)}
    assert allowed == {b"{", b'{"', b" ", b"\n"}  # only the object's start, or whitespace before it
    for piece in (b'{"', b"name", b'":', b" ", b'"'):
        c.advance(TOKEN[piece])
    # inside a string: half a character is fine, a byte that is never UTF-8 is not
    assert c.allows(TOKEN[b"\xc3"]) and not c.allows(TOKEN[b"\xff"]) and not c.allows(TOKEN[b"\xa9"])
    c.advance(TOKEN[b"\xc3"])
    # the rest of the character must follow; a whole new character or a quote may not
    assert c.allows(TOKEN[b"\xa9"]) and not c.allows(TOKEN[b'"']) and not c.allows(TOKEN["é".encode()])
    c.advance(TOKEN[b"\xa9"])
    assert not c.allows(EOS) and not c.allows(CONTROL) and not c.allows(TOKEN[b""])
    c.advance(TOKEN[b'"}'])
    assert c.complete and c.allows(EOS)
    with pytest.raises(ValueError):
        c.advance(TOKEN[b"1"])


def test_half_a_character_outside_a_string_is_refused() -> None:
    c = constraint()
    c.advance(TOKEN[b'{"'])
    c.advance(TOKEN[b"name"])
    c.advance(TOKEN[b'":'])
    assert not c.allows(TOKEN[b"\xc3"])  # non-ASCII text is only valid inside strings
    assert not c.allows(TOKEN["é".encode()])


# -- the sampler under the constraint ---------------------------------------------------------


def run_sampler(sampler: Sampler, ranking: Sequence[Sequence[bytes]], steps: int) -> bytes:
    """Sample ``steps`` tokens, step i from logits favouring ``ranking[i]`` (the last one repeats)."""
    out = b""
    for step in range(steps):
        token = sampler.sample(logits_favouring(*ranking[min(step, len(ranking) - 1)])).token_id
        out += PIECES[token]
        if sampler.constraint is not None and sampler.constraint.complete:
            break
    return out


MODEL_WANTS = [  # what an unruly model prefers, step by step: chatter first, then JSON
    (b"Sure", b"```json", b"{", b'{"'),
    (b"<|im_start|>", b"name", b'"', b'":'),
    (b"name", b"}"),
    (b'":', b"}"),
    (b"<|endoftext|>", b"\xff", b",", b"1"),
    (b"<|endoftext|>", b"ok", b"}\n", b"}"),
]


def test_greedy_json_mode_picks_the_best_valid_token_and_stops_at_the_closing_brace() -> None:
    free = run_sampler(Sampler(SamplingParams(temperature=0.0)), MODEL_WANTS, 6)
    assert free.startswith(b"Sure")  # unconstrained, the argmax is not JSON
    sampler = Sampler(SamplingParams(temperature=0.0), constraint())
    text = run_sampler(sampler, MODEL_WANTS, 20)
    assert text == b'{"name":1}\n' and json.loads(text) == {"name": 1}
    assert sampler.constraint is not None and sampler.constraint.complete


def test_logit_bias_and_logprobs_still_apply_under_the_constraint() -> None:
    logits = logits_favouring(b"{", b'{"')
    biased = Sampler(SamplingParams(temperature=0.0, logit_bias={TOKEN[b'{"']: 5.0}), constraint())
    assert biased.sample(logits).token_id == TOKEN[b'{"']
    # a bias towards a forbidden token cannot force it
    pushed = Sampler(SamplingParams(temperature=0.0, logit_bias={TOKEN[b"Sure"]: 100.0}), constraint())
    assert pushed.sample(logits).token_id == TOKEN[b"{"]
    # log-probabilities are the model's (after bias), not the constrained distribution's
    reported = Sampler(SamplingParams(temperature=0.0, top_logprobs=2), constraint()).sample(logits_favouring(b"Sure", b"{"), want_logprobs=True)
    assert reported.token_id == TOKEN[b"{"]
    assert [t.token_id for t in reported.top] == [TOKEN[b"Sure"], TOKEN[b"{"]]
    assert reported.logprob == pytest.approx(reported.top[1].logprob)


def test_penalties_apply_before_the_constraint() -> None:
    def last_choice(penalty: float) -> int:
        sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=penalty), constraint())
        for piece in (b"{", b'"', b"name"):
            assert sampler.sample(logits_favouring(b"<|im_start|>", piece)).token_id == TOKEN[piece]
        logits = logits_favouring(b"<|im_start|>", b"name", b'":')
        logits[TOKEN[b'":']] = 8.5
        return sampler.sample(logits).token_id

    # "name" was used once: penalised by 2 it falls below the closing quote; the control token stays forbidden
    assert (last_choice(0.0), last_choice(2.0)) == (TOKEN[b"name"], TOKEN[b'":'])


def test_seeded_json_sampling_is_reproducible_and_always_valid() -> None:
    rng = np.random.default_rng(8)
    steps = [rng.normal(size=len(PIECES)).astype(np.float32) * 3 for _ in range(60)]

    def generate(seed: int, temperature: float = 0.9) -> bytes:
        sampler = Sampler(SamplingParams(temperature=temperature, top_p=0.95, seed=seed), constraint())
        out = b""
        for logits in steps:
            out += PIECES[sampler.sample(logits).token_id]
            if sampler.constraint is not None and sampler.constraint.complete:
                break
        return out

    outputs = {seed: generate(seed) for seed in range(12)}
    assert all(generate(seed) == out for seed, out in outputs.items())
    assert len(set(outputs.values())) > 1
    completed = 0
    for out in outputs.values():
        prefix = JsonPrefix()
        assert prefix.feed(codecs.utf_8_decode(out, "strict", False)[0]), out
        if prefix.complete:
            assert isinstance(json.loads(out), dict)
            completed += 1
    assert completed
    # greedy is deterministic too, whatever the seed
    assert generate(1, 0.0) == generate(2, 0.0)


class FakeBracelessTokenizer(FakeJsonTokenizer):
    """A vocabulary in which no token opens an object: JSON mode can only emit whitespace."""

    def token_bytes(self, token_id: int) -> bytes:
        return PIECES[token_id].replace(b"{", b"x")


def test_a_vocabulary_with_no_valid_token_is_a_clear_error() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0), JsonObjectConstraint(TokenTexts(FakeBracelessTokenizer())))
    spaces = [PIECES[sampler.sample(logits_favouring(b"{", b"Sure")).token_id] for _ in range(MAX_WHITESPACE)]
    assert set(spaces) <= {b" ", b"\n"}
    with pytest.raises(ModelError, match="response format"):
        sampler.sample(logits_favouring(b"{"))


# -- the scheduler ---------------------------------------------------------------------------


class FakeJsonEngine:
    """Logits from a script: step i favours ``script[i]`` (the last entry repeats)."""

    def __init__(self, script: Sequence[Sequence[bytes]], tokenizer: FakeJsonTokenizer | None = None) -> None:
        self.shard = ShardRange.whole(1)
        self.context_length = 64
        self.max_sequences = 2
        self.tokenizer = tokenizer or FakeJsonTokenizer()
        self.script = script
        self.steps: dict[str, int] = {}

    async def step(self, batch: Sequence[SequenceChunk]) -> list[StageOutput]:
        out = []
        for chunk in batch:
            if not chunk.want_logits:
                out.append(StageOutput(chunk.request_id))
                continue
            step = self.steps.get(chunk.request_id, 0)
            self.steps[chunk.request_id] = step + 1
            out.append(StageOutput(chunk.request_id, logits=logits_favouring(*self.script[min(step, len(self.script) - 1)])))
        return out

    async def release(self, request_id: str) -> None:
        self.steps.pop(request_id, None)

    async def close(self) -> None:
        pass


async def run_requests(engine: FakeJsonEngine, *requests: GenerationRequest) -> list[tuple[str, str | None, int]]:
    runner = InstanceRunner("fake", LocalChain([engine]), engine.tokenizer, context_length=engine.context_length, max_sequences=engine.max_sequences)  # type: ignore[arg-type]
    results = []
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        for request in requests:
            text, finish, count = "", None, 0
            async for chunk in runner.generate(request):
                text += chunk.text
                finish, count = chunk.finish_reason, chunk.completion_tokens
            results.append((text, finish, count))
        tg.cancel_scope.cancel()
    return results


def json_request(**kwargs: object) -> GenerationRequest:
    return GenerationRequest("fake", [TOKEN[b"ok"]], SamplingParams(temperature=0.0), response_format="json_object", **kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_the_runner_ends_a_json_request_when_the_object_closes() -> None:
    # After the object the model would ramble on; JSON mode stops at the closing brace.
    script = [*MODEL_WANTS, (b"Sure", b"ok")]
    plain, json_mode, cut = await run_requests(
        FakeJsonEngine(script),
        GenerationRequest("fake", [TOKEN[b"ok"]], SamplingParams(temperature=0.0), max_tokens=4),
        json_request(max_tokens=50),
        json_request(max_tokens=3),
    )
    assert plain[0].startswith("Sure")
    assert json_mode == ('{"name":1}\n', "stop", 6) and json.loads(json_mode[0]) == {"name": 1}
    assert cut == ('{"name', "length", 3)  # cut by max_tokens: an incomplete prefix, as OpenAI


@pytest.mark.anyio
async def test_stop_strings_and_ignore_eos_in_json_mode() -> None:
    stopped, ignoring = await run_requests(FakeJsonEngine(MODEL_WANTS), json_request(stop=["name"]), json_request(ignore_eos=True))
    assert stopped == ('{"', "stop", 3)  # a stop string still wins, as the client asked
    assert ignoring[:2] == ('{"name":1}\n', "stop")


@pytest.mark.anyio
async def test_a_request_the_constraint_cannot_serve_fails_alone() -> None:
    engine = FakeJsonEngine(MODEL_WANTS, FakeBracelessTokenizer())
    runner = InstanceRunner("fake", LocalChain([engine]), engine.tokenizer, context_length=engine.context_length, max_sequences=engine.max_sequences)  # type: ignore[arg-type]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            with pytest.raises(ModelError, match="response format"):
                async for _ in runner.generate(json_request()):
                    pass
            # the runner goes on serving
            chunks = [c async for c in runner.generate(GenerationRequest("fake", [TOKEN[b"ok"]], SamplingParams(temperature=0.0), max_tokens=2))]
            assert chunks[-1].finish_reason == "length"
            tg.cancel_scope.cancel()
    assert runner.load == (0, 0) and engine.steps == {}


def test_response_formats_are_checked() -> None:
    assert json_request().response_format == "json_object"
    with pytest.raises(RequestError, match="json_schema") as info:
        GenerationRequest("m", [1], response_format="json_schema")
    assert info.value.param == "response_format"
