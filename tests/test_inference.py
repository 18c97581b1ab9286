"""The core scheduler, sampler and text assembly, driven by a fake engine (named so: it stands in
for a real backend, whose own tests run the real model)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import numpy as np
import pytest

from skulk_core.backend import SequenceChunk, StageOutput
from skulk_core.errors import ModelError, RequestError
from skulk_core.inference import GenerationChunk, GenerationRequest, InstanceLostError, InstanceRunner, TextAssembler, _Chunks
from skulk_core.pipeline import LocalChain
from skulk_core.placement import ShardRange
from skulk_core.sampling import Sampler, SamplingParams, log_softmax, score_token

VOCAB = 64
EOS = 0


class FakeTokenizer:
    """Token i is the byte (ord('a') + i - 1) for 1 <= i < 27, EOS is 0, a few multi-byte pieces."""

    bos_token_id = None
    eos_token_ids = frozenset({EOS})
    vocab_size = VOCAB

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return [ord(c) - ord("a") + 1 for c in text]

    def token_bytes(self, token_id: int) -> bytes:
        if 1 <= token_id < 27:
            return bytes([ord("a") + token_id - 1])
        if token_id == 40:
            return "é".encode()[:1]  # half a character
        if token_id == 41:
            return "é".encode()[1:]
        return b" "

    def is_control(self, token_id: int) -> bool:
        return token_id == EOS


class FakeEngine:
    """Deterministic logits: the next token after t is (t * 7 + position) % 26 + 1, EOS after
    position ``eos_at``. Records every batch it is given. Scores prompts unless ``scores`` is off."""

    def __init__(self, eos_at: int = 1000, delay: float = 0.0, scores: bool = True) -> None:
        self.shard = ShardRange.whole(4)
        self.context_length = 64
        self.max_sequences = 4
        self.tokenizer = FakeTokenizer()
        self.eos_at = eos_at
        self.delay = delay
        self.batches: list[list[SequenceChunk]] = []
        self.cache: dict[str, int] = {}
        self.released: list[str] = []
        self.scores = scores

    def logits(self, token: int, end: int) -> np.ndarray:
        """The logits after ``token`` at position ``end - 1``."""
        logits = np.zeros(VOCAB, dtype=np.float32)
        logits[EOS if end >= self.eos_at else (token * 7 + end) % 26 + 1] = 10.0
        return logits

    async def step(self, batch: Sequence[SequenceChunk]) -> list[StageOutput]:
        self.batches.append(list(batch))
        if self.delay:
            await anyio.sleep(self.delay)
        out = []
        for chunk in batch:
            assert self.cache.get(chunk.request_id, 0) == chunk.position, "positions must continue the cache"
            self.cache[chunk.request_id] = chunk.position + chunk.length
            end = chunk.position + chunk.length
            logits = self.logits(chunk.tokens[-1], end)
            scores = [
                score_token(self.logits(token, chunk.position + i + 1), target, chunk.score_top)
                for i, (token, target) in enumerate(zip(chunk.tokens, chunk.score_targets))
            ]
            out.append(StageOutput(chunk.request_id, logits=logits if chunk.want_logits else None, scores=scores if self.scores else ()))
        return out

    async def release(self, request_id: str) -> None:
        self.cache.pop(request_id, None)
        self.released.append(request_id)

    async def close(self) -> None:
        pass


def make_runner(engine: FakeEngine, **kwargs: object) -> InstanceRunner:
    return InstanceRunner("fake", LocalChain([engine]), engine.tokenizer, context_length=engine.context_length, max_sequences=engine.max_sequences, **kwargs)  # type: ignore[arg-type]


async def collect(runner: InstanceRunner, request: GenerationRequest) -> tuple[str, list[int], str | None]:
    text, tokens, finish = "", [], None
    async for chunk in runner.generate(request):
        text += chunk.text
        tokens += [t.token_id for t in chunk.tokens]
        finish = chunk.finish_reason
    return text, tokens, finish


def greedy(prompt: str, **kwargs: object) -> GenerationRequest:
    return GenerationRequest("fake", FakeTokenizer().encode(prompt), SamplingParams(temperature=0.0), **kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_concurrent_requests_share_steps_and_match_solo_runs() -> None:
    solo_engine = FakeEngine()
    solo = make_runner(solo_engine)
    async with anyio.create_task_group() as tg:
        await tg.start(solo.run)
        expected = [await collect(solo, greedy(p, max_tokens=12)) for p in ("abc", "hello", "zz", "q")]
        tg.cancel_scope.cancel()

    engine = FakeEngine()
    runner = make_runner(engine)
    results: dict[str, tuple] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)

        async def one(prompt: str) -> None:
            results[prompt] = await collect(runner, greedy(prompt, max_tokens=12))

        async with anyio.create_task_group() as clients:
            for p in ("abc", "hello", "zz", "q"):
                clients.start_soon(one, p)
        tg.cancel_scope.cancel()
    assert [results[p] for p in ("abc", "hello", "zz", "q")] == expected
    assert all(r[2] == "length" and len(r[1]) == 12 for r in expected)
    # continuous batching: some step advanced all four requests at once
    assert max(len({c.request_id for c in b}) for b in engine.batches) == 4
    assert len(engine.batches) < len(solo_engine.batches)
    assert engine.cache == {}  # every finished request released its KV cache


@pytest.mark.anyio
async def test_eos_stop_sequence_and_context_limit() -> None:
    engine = FakeEngine(eos_at=8)
    runner = make_runner(engine)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        text, tokens, finish = await collect(runner, greedy("abc"))
        assert finish == "stop" and tokens[-1] == EOS and len(tokens) == 6
        full, _, _ = await collect(runner, greedy("abc", max_tokens=4))
        stopped, _, finish = await collect(runner, greedy("abc", stop=(full[2:4],)))
        assert finish == "stop" and stopped == full[:2]
        with pytest.raises(RequestError, match="maximum context length"):
            await collect(runner, greedy("a" * 64))
        engine.eos_at = 1000
        text, tokens, finish = await collect(runner, greedy("a" * 60))
        assert finish == "length" and len(tokens) == 4  # the context (64) is full
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_closing_the_stream_releases_the_sequence_at_once() -> None:
    engine = FakeEngine(delay=0.01)
    runner = make_runner(engine)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        stream = runner.generate(greedy("abc"))
        await stream.__anext__()
        assert runner.load == (1, 0)
        await stream.aclose()
        with anyio.fail_after(2):
            while runner.load != (0, 0) or not engine.released:
                await anyio.sleep(0.01)
        steps = len(engine.batches)
        await anyio.sleep(0.05)
        assert len(engine.batches) == steps  # nothing is decoded for a gone client
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_more_requests_than_slots_wait_then_complete() -> None:
    engine = FakeEngine()
    runner = make_runner(engine)
    done = []
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)

        async def one(i: int) -> None:
            done.append(await collect(runner, greedy("abcdefgh"[: i % 8 + 1], max_tokens=5)))

        async with anyio.create_task_group() as clients:
            for i in range(10):
                clients.start_soon(one, i)
        tg.cancel_scope.cancel()
    assert len(done) == 10 and all(len(d[1]) == 5 for d in done)
    assert max(len(b) for b in engine.batches) <= engine.max_sequences


@pytest.mark.anyio
async def test_long_prompts_are_prefilled_in_chunks_within_the_budget() -> None:
    engine = FakeEngine()
    runner = make_runner(engine, prefill_budget=8)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await collect(runner, greedy("abcdefghijklmnopqrstuvwxyz", max_tokens=2))
        tg.cancel_scope.cancel()
    first = [b[0] for b in engine.batches[:4]]
    assert [c.length for c in first] == [8, 8, 8, 2]
    assert [c.want_logits for c in first] == [False, False, False, True]


def test_text_assembler_holds_partial_utf8_and_possible_stops() -> None:
    text = TextAssembler(stop=["END"])
    assert text.feed(b"ab") == ("ab", False)
    assert text.feed("é".encode()[:1]) == ("", False)
    assert text.feed("é".encode()[1:]) == ("é", False)
    assert text.feed(b"xE") == ("x", False)  # "E" may start "END"
    assert text.feed(b"N") == ("", False)
    assert text.feed(b"D tail") == ("", True)
    other = TextAssembler(stop=["END"])
    assert other.feed(b"EN") == ("", False)
    assert other.feed(b"X") == ("ENX", False)
    assert other.flush() == ""


def test_sampler_is_seeded_and_greedy_is_argmax() -> None:
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32) * 3
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=42)
    first = [Sampler(params).sample(logits).token_id for _ in range(3)]
    a, b = Sampler(params), Sampler(params)
    assert [a.sample(logits).token_id for _ in range(20)] == [b.sample(logits).token_id for _ in range(20)]
    assert len(set(first)) == 1
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits).token_id == int(np.argmax(logits))
    # top_k=1 and a tiny top_p collapse to the argmax too
    assert Sampler(SamplingParams(top_k=1, seed=1)).sample(logits).token_id == int(np.argmax(logits))
    assert Sampler(SamplingParams(top_p=1e-6, seed=1)).sample(logits).token_id == int(np.argmax(logits))
    # samples stay inside the top-k set
    top = set(np.argsort(-logits)[:5].tolist())
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=5, seed=7))
    assert {sampler.sample(logits).token_id for _ in range(200)} <= top


def test_sampler_logprobs_penalties_and_bias() -> None:
    logits = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)
    got = Sampler(SamplingParams(temperature=0.0, top_logprobs=2)).sample(logits, want_logprobs=True)
    expected = logits - np.log(np.exp(logits).sum())
    assert got.token_id == 3 and got.logprob == pytest.approx(expected[3])
    assert [t.token_id for t in got.top] == [3, 2]
    assert Sampler(SamplingParams(temperature=0.0, logit_bias={0: 100.0})).sample(logits).token_id == 0
    penalised = Sampler(SamplingParams(temperature=0.0, frequency_penalty=2.0))
    assert [penalised.sample(logits).token_id for _ in range(3)] == [3, 2, 1]
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=3.0)


@pytest.mark.parametrize(
    ("params", "logprobs"),
    [
        (SamplingParams(temperature=0.0, logit_bias={3: -5.0}), False),
        (SamplingParams(temperature=0.9, top_p=0.95, frequency_penalty=0.5, presence_penalty=0.3, seed=5), False),
        (SamplingParams(temperature=0.7, top_logprobs=3, seed=9), True),
    ],
)
def test_a_draw_and_observe_give_what_sample_gives(params: SamplingParams, logprobs: bool) -> None:
    # An engine draws on its own thread (Sampler.draw) and the scheduler takes the token after
    # (observe): the same tokens, log-probabilities and penalties as sampling on the event loop.
    rng = np.random.default_rng(3)
    rows = [(rng.normal(size=300) * 2).astype(np.float32) for _ in range(40)]
    sampling, drawing = Sampler(params, logprobs=logprobs), Sampler(params, logprobs=logprobs)
    for row in rows:
        expected = sampling.sample(row, want_logprobs=logprobs)
        view = row.copy()
        drawn = drawing.draw(view)
        view[:] = np.nan  # the engine's buffer is overwritten by the next step: nothing kept it
        assert drawn == expected
        drawing.observe(drawn.token_id)
    assert drawing._counts == sampling._counts


def test_a_constrained_sampler_leaves_drawing_to_the_event_loop() -> None:
    from skulk_core.constraints import JsonObjectConstraint, TokenTexts

    sampler = Sampler(SamplingParams(temperature=0.0), JsonObjectConstraint(TokenTexts(FakeTokenizer())))
    assert sampler.draw(np.zeros(VOCAB, dtype=np.float32)) is None


class SlowReleaseEngine(FakeEngine):
    """A FakeEngine whose release takes a while, so the runner can be stopped in the middle of it."""

    async def release(self, request_id: str) -> None:
        await anyio.sleep(0.05)
        await super().release(request_id)


@pytest.mark.anyio
async def test_stopping_the_runner_while_it_releases_finished_requests_is_clean() -> None:
    engine = SlowReleaseEngine()
    runner = make_runner(engine)
    results = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)

            async def one() -> None:
                results.append(await collect(runner, greedy("abc", max_tokens=3)))

            async with anyio.create_task_group() as clients:
                for _ in range(2):  # both finish in the same step
                    clients.start_soon(one)
            # The runner is releasing the first of them; the second, finished, is still in its lane.
            tg.cancel_scope.cancel()
    assert [r[2] for r in results] == ["length", "length"]


def test_greedy_with_logit_bias_is_the_argmax_of_the_biased_logits() -> None:
    rng = np.random.default_rng(3)
    for trial in range(300):
        logits = rng.normal(size=300).astype(np.float32) * 4
        if trial % 3 == 0:
            logits = np.round(logits)  # ties
        bias = {int(t): float(b) for t, b in zip(rng.integers(0, 310, size=4), rng.choice([-100.0, -0.5, 0.5, 2.0, 100.0], size=4))}
        bias[int(np.argmax(logits))] = float(rng.choice([-100.0, -1.0, 0.0, 1.0]))  # the favourite itself biased
        dense = logits.copy()
        for token, value in bias.items():
            if token < dense.shape[0]:
                dense[token] += value
        assert Sampler(SamplingParams(temperature=0.0, logit_bias=bias)).sample(logits).token_id == int(np.argmax(dense))


def test_draws_follow_the_distribution_and_never_pick_an_impossible_token() -> None:
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.full(5000, 0.1)).astype(np.float32)
    probs[rng.integers(0, 5000, size=1000)] = 0.0
    sampler = Sampler(SamplingParams(temperature=1.0, seed=5))
    logits = np.log(np.where(probs > 0, probs, 1e-38)).astype(np.float32)
    logits[probs == 0] = -np.inf
    drawn = np.array([sampler.sample(logits).token_id for _ in range(20000)])
    assert (probs[drawn] > 0).all()
    favourites = np.argsort(-probs)[:3]
    expected = probs[favourites] / probs.sum()
    observed = np.array([(drawn == t).mean() for t in favourites])
    assert np.allclose(observed, expected, atol=0.01)


@pytest.mark.anyio
async def test_a_request_takes_its_queued_chunks_without_a_trip_round_the_loop() -> None:
    chunks = _Chunks()
    first, second = (GenerationChunk(t, (), 1, i + 1) for i, t in enumerate("ab"))
    chunks.put(first)
    chunks.put(second)
    with anyio.CancelScope() as scope:
        scope.cancel()  # any checkpoint now raises: get must not go round the event loop
        assert await chunks.get() is first
        assert await chunks.get() is second
    chunks.close()
    chunks.put(first)  # after close: dropped
    assert await chunks.get() is None


@pytest.mark.anyio
async def test_a_waiting_request_wakes_for_a_chunk_and_for_the_end_and_can_be_cancelled() -> None:
    chunks = _Chunks()
    got: list[object] = []

    async def consume() -> None:
        while (item := await chunks.get()) is not None:
            got.append(item)
        got.append("end")

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            error = RequestError("boom")
            chunks.put(error)
            await anyio.wait_all_tasks_blocked()
            assert got == [error]
            chunks.close()
        assert got == [error, "end"]
        with anyio.move_on_after(0.05) as scope:
            await _Chunks().get()
        assert scope.cancelled_caught


@pytest.mark.anyio
async def test_stopping_the_runner_ends_live_and_waiting_streams_with_instance_lost() -> None:
    engine = FakeEngine(delay=0.01)
    engine.max_sequences = 1  # the second request waits for the first one's slot
    runner = make_runner(engine)
    errors: list[BaseException] = []

    async def one(prompt: str) -> None:
        try:
            await collect(runner, greedy(prompt))
        except InstanceLostError as exc:
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as clients:
            async with anyio.create_task_group() as tg:
                await tg.start(runner.run)
                clients.start_soon(one, "abc")
                clients.start_soon(one, "def")
                while not engine.batches or runner.load != (1, 1):
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
    assert len(errors) == 2 and all("stopped serving" in str(e) for e in errors)


async def scored(runner: InstanceRunner, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in runner.generate(request)]


@pytest.mark.anyio
async def test_a_scored_prompt_has_every_token_after_the_first_scored_across_prefill_chunks() -> None:
    engine = FakeEngine()
    runner = make_runner(engine, prefill_budget=8)
    prompt = "abcdefghijklmnopqrstuvwxyz"
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        chunks = await scored(runner, greedy(prompt, max_tokens=2, prompt_logprobs=2))
        tg.cancel_scope.cancel()
    ids = FakeTokenizer().encode(prompt)
    # each prefill chunk asks for the token after each of its positions, the last one's within the prompt
    first = [b[0] for b in engine.batches[:4]]
    assert [c.score_targets for c in first] == [tuple(ids[1:9]), tuple(ids[9:17]), tuple(ids[17:25]), tuple(ids[25:26])]
    assert all(c.score_top == 2 for c in first)
    scores = chunks[0].prompt_logprobs
    assert [s.token_id for s in scores] == ids[1:]
    for position, score in enumerate(scores):  # the model's own log-probability of the next prompt token
        expected = log_softmax(engine.logits(ids[position], position + 1))
        assert score.logprob == pytest.approx(float(expected[ids[position + 1]]), abs=1e-5)
        assert len(score.top) == 2 and score.top[0].logprob == pytest.approx(float(expected.max()), abs=1e-5)
    assert all(not chunk.prompt_logprobs for chunk in chunks[1:])
    assert (chunks[-1].completion_tokens, chunks[-1].finish_reason) == (2, "length")


@pytest.mark.anyio
async def test_max_tokens_zero_scores_the_prompt_alone_or_answers_at_once() -> None:
    engine = FakeEngine()
    runner = make_runner(engine)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        [chunk] = await scored(runner, greedy("hello", max_tokens=0, prompt_logprobs=0))
        assert (chunk.text, chunk.tokens, chunk.completion_tokens, chunk.finish_reason) == ("", (), 0, "length")
        assert [s.token_id for s in chunk.prompt_logprobs] == FakeTokenizer().encode("ello") and all(not s.top for s in chunk.prompt_logprobs)
        assert [c.want_logits for b in engine.batches for c in b] == [False]  # nothing is sampled
        with anyio.fail_after(2):
            while not engine.released:
                await anyio.sleep(0.01)
        steps = len(engine.batches)
        [chunk] = await scored(runner, greedy("hello", max_tokens=0))  # nothing to compute: no step
        assert (chunk.completion_tokens, chunk.finish_reason, chunk.prompt_logprobs) == (0, "length", ())
        assert len(engine.batches) == steps
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_engine_that_does_not_score_fails_the_scored_request_clearly() -> None:
    engine = FakeEngine(scores=False)
    runner = make_runner(engine)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        with pytest.raises(ModelError, match="returned 0 prompt scores for 2 positions"):
            await scored(runner, greedy("abc", max_tokens=3, prompt_logprobs=1))
        _, tokens, finish = await collect(runner, greedy("abc", max_tokens=3))  # unscored requests go on as before
        assert (len(tokens), finish) == (3, "length")
        with anyio.fail_after(2):
            while runner.load != (0, 0) or engine.cache:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


class FakeCachingEngine(FakeEngine):
    """A FakeEngine that keeps a released request's tokens and lends them to a new request whose
    prompt begins the same way (skulk_core.PrefixCachingEngine)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[str, list[int]] = {}
        self.kept: list[list[int]] = []

    async def step(self, batch: Sequence[SequenceChunk]) -> list[StageOutput]:
        for chunk in batch:
            known = self.tokens.setdefault(chunk.request_id, [])
            known[chunk.position :] = chunk.tokens or ()
        return await super().step(batch)

    async def release(self, request_id: str) -> None:
        if request_id in self.tokens:
            self.kept.append(self.tokens.pop(request_id))
        await super().release(request_id)

    async def reuse(self, request_id: str, prompt: Sequence[int]) -> int:
        def common(kept: list[int]) -> int:
            n = 0
            while n < min(len(kept), len(prompt) - 1) and kept[n] == prompt[n]:
                n += 1
            return n

        best = max(range(len(self.kept)), key=lambda i: common(self.kept[i]), default=None)
        if best is None or common(self.kept[best]) == 0:
            return 0
        length = common(self.kept[best])
        self.tokens[request_id] = self.kept.pop(best)[:length]
        self.cache[request_id] = length
        return length


@asynccontextmanager
async def caching_and_reference() -> AsyncIterator[tuple[FakeCachingEngine, InstanceRunner, InstanceRunner]]:
    """A runner over a FakeCachingEngine, and one over a plain FakeEngine to compare it with."""
    engine = FakeCachingEngine()
    runner, reference = make_runner(engine), make_runner(FakeEngine())
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await tg.start(reference.run)
        yield engine, runner, reference
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_prompt_that_begins_like_a_finished_one_starts_after_the_kept_part() -> None:
    async with caching_and_reference() as (engine, runner, reference):
        await collect(runner, greedy("abcdefgh", max_tokens=3))
        chunks = await scored(runner, greedy("abcdefghxyz", max_tokens=4))
        # its prefill began at position 8: the first request's prompt was kept (and its answer, which differs)
        first = next(c for b in engine.batches for c in b if c.position > 0 and len(c.tokens or ()) == 3)
        assert (first.position, first.tokens) == (8, tuple(FakeTokenizer().encode("xyz")))
        assert chunks[-1].cached_tokens == 8 and chunks[-1].prompt_tokens == 11
        # and it answered as a request prefilled from the start does
        assert "".join(c.text for c in chunks) == (await collect(reference, greedy("abcdefghxyz", max_tokens=4)))[0]
        # a scored prompt is computed whole, for its scores
        steps = len(engine.batches)
        scored_chunks = await scored(runner, greedy("abcdefghxyz", max_tokens=1, prompt_logprobs=0))
        assert engine.batches[steps][0].position == 0 and scored_chunks[-1].cached_tokens == 0


@pytest.mark.anyio
async def test_a_scored_prompt_that_begins_like_a_scored_one_starts_where_their_scores_part() -> None:
    # An evaluation's multiple choice: one context scored with each answer.
    async with caching_and_reference() as (engine, runner, reference):
        await scored(runner, greedy("abcdefghxy", max_tokens=0, prompt_logprobs=2))
        steps = len(engine.batches)
        chunks = await scored(runner, greedy("abcdefghzw", max_tokens=0, prompt_logprobs=2))
        # The kept cache holds "abcdefgh": the scores of positions 0-6 are known ("h" is scored after
        # "g"); position 7 scores "z" now, so the prefill starts there.
        assert [(c.position, len(c.tokens or ())) for c in engine.batches[steps]] == [(7, 3)]
        assert chunks[-1].cached_tokens == 7 and chunks[-1].prompt_tokens == 10
        whole = await scored(reference, greedy("abcdefghzw", max_tokens=0, prompt_logprobs=2))
        assert chunks[0].prompt_logprobs == whole[0].prompt_logprobs and len(whole[0].prompt_logprobs) == 9
        # Fewer alternatives than were kept: the same, cut; more: computed whole.
        steps = len(engine.batches)
        fewer = await scored(runner, greedy("abcdefghzv", max_tokens=0, prompt_logprobs=1))
        assert engine.batches[steps][0].position == 8 and fewer[-1].cached_tokens == 8
        cut = [(s.token_id, s.logprob, s.top[:1]) for s in whole[0].prompt_logprobs[:8]]
        assert [(s.token_id, s.logprob, s.top) for s in fewer[0].prompt_logprobs[:8]] == cut
        steps = len(engine.batches)
        more = await scored(runner, greedy("abcdefghzu", max_tokens=0, prompt_logprobs=3))
        assert engine.batches[steps][0].position == 0 and more[-1].cached_tokens == 0
