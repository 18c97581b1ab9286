"""The llama.cpp engine on the default model (SmolLM2-135M-Instruct, Q4_1), loaded once per module."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import anyio
import numpy as np
import pytest

from skulk_core import (
    BackendError,
    DrawingEngine,
    EmbeddingEngine,
    Engine,
    EngineOptions,
    ModelCard,
    ModelFiles,
    RequestError,
    SampledToken,
    Sampler,
    SamplingParams,
    SequenceChunk,
    ShardRange,
    Tensor,
    Tokenizer,
    default_model_path,
    score_token,
)

from skulk_llamacpp import LlamaCppBackend, LlamaCppSettings, native

pytestmark = pytest.mark.slow  # loads a model

CONTEXT = 256
MAX_SEQUENCES = 4
# One thread: ggml's worker threads spin at a barrier, so with two threads a test run slows down
# badly whenever anything else wants the same two cores.
THREADS = 1


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.from_gguf(default_model_path())


def _load(card: ModelCard, **settings: object) -> Engine:
    files = ModelFiles(card.id, "gguf", default_model_path())
    options = EngineOptions(
        context_length=CONTEXT, max_sequences=MAX_SEQUENCES, threads=THREADS, settings=LlamaCppSettings(**settings)  # type: ignore[arg-type]
    )
    return anyio.run(LlamaCppBackend().load, card, files, ShardRange.whole(card.n_layers), options)


@pytest.fixture(scope="module")
def engine(card: ModelCard) -> Iterator[Engine]:
    engine = _load(card, decode_ahead="always")  # what "auto" gives one thread on two CPUs, everywhere
    yield engine
    anyio.run(engine.close)


def step(engine: Engine, batch: Sequence[SequenceChunk]) -> list[np.ndarray | None]:
    return [out.logits for out in anyio.run(engine.step, batch)]


def release(engine: Engine, *request_ids: str) -> None:
    for request_id in request_ids:
        anyio.run(engine.release, request_id)


def greedy_alone(engine: Engine, request_id: str, prompt: list[int], n: int) -> list[int]:
    """Prefill ``prompt`` and decode ``n`` tokens greedily, this sequence alone in every step."""
    (logits,) = step(engine, [SequenceChunk(request_id, 0, prompt)])
    out = []
    for _ in range(n):
        assert logits is not None
        out.append(int(np.argmax(logits)))
        (logits,) = step(engine, [SequenceChunk(request_id, len(prompt) + len(out) - 1, (out[-1],))])
    release(engine, request_id)
    return out


def text(engine: Engine, tokens: Sequence[int]) -> str:
    assert engine.tokenizer is not None
    return b"".join(engine.tokenizer.token_bytes(t) for t in tokens).decode("utf-8", "replace")


def test_engine_satisfies_the_contract(engine: Engine, card: ModelCard) -> None:
    assert isinstance(engine, Engine) and isinstance(engine, EmbeddingEngine)
    assert isinstance(engine.tokenizer, Tokenizer)
    assert engine.shard == ShardRange.whole(card.n_layers)
    assert (engine.context_length, engine.max_sequences) == (CONTEXT, MAX_SEQUENCES)


def test_tokenizer_round_trip(engine: Engine, card: ModelCard) -> None:
    tok = engine.tokenizer
    assert tok is not None
    assert tok.vocab_size == card.vocab_size == 49152
    assert tok.bos_token_id == card.bos_token_id == 1
    assert set(card.eos_token_ids) <= tok.eos_token_ids  # <|im_end|>, and <|endoftext|> too
    for sample in ["The capital of France is Paris.", "naïve café — 東京 🦊", "  two  spaces\nand a newline"]:
        ids = tok.encode(sample, add_special=False)
        assert ids and b"".join(tok.token_bytes(i) for i in ids) == sample.encode()
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.token_bytes(2) == b"<|im_end|>"
    assert tok.is_control(1) and tok.is_control(2) and not tok.is_control(ids[1])
    assert tok.encode("<|im_end|>", add_special=False, parse_special=False) != [2]  # taken as plain text
    with pytest.raises(RequestError):
        tok.token_bytes(tok.vocab_size)


def test_greedy_decode_is_sensible(engine: Engine) -> None:
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode("The capital of France is")
    out = greedy_alone(engine, "france", prompt, 8)
    assert "Paris" in text(engine, out)


def test_batched_decoding_matches_each_sequence_alone(engine: Engine) -> None:
    assert engine.tokenizer is not None
    prompts = [
        engine.tokenizer.encode(p)
        for p in ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colours are"]
    ]
    n = 12
    alone = [greedy_alone(engine, f"alone-{i}", p, n) for i, p in enumerate(prompts)]

    # All four prefilled in one step, then all four decoded in one step each.
    ids = [f"together-{i}" for i in range(len(prompts))]
    logits = step(engine, [SequenceChunk(r, 0, p) for r, p in zip(ids, prompts)])
    # (the caches "alone" kept were evicted oldest first, so these sequence ids are out of order,
    # which the engine sorts for llama.cpp: the rows must still come back to their chunks)
    slots = [engine._slots[r] for r in ids]  # type: ignore[attr-defined]
    assert slots != sorted(slots)
    together: list[list[int]] = [[] for _ in prompts]
    for _ in range(n):
        for out, row in zip(together, logits):
            assert row is not None and row.dtype == np.float32 and row.shape == (49152,)
            out.append(int(np.argmax(row)))
        logits = step(engine, [SequenceChunk(r, len(p) + len(o) - 1, (o[-1],)) for r, p, o in zip(ids, prompts, together)])
    release(engine, *ids)
    assert together == alone

    # Staggered: a sequence joins (prefill) while the others decode, in the same step.
    first = "staggered-0"
    (row,) = step(engine, [SequenceChunk(first, 0, prompts[0])])
    mine = [int(np.argmax(row))]
    (row, joined) = step(
        engine, [SequenceChunk(first, len(prompts[0]), (mine[0],)), SequenceChunk("staggered-1", 0, prompts[1])]
    )
    mine.append(int(np.argmax(row)))
    release(engine, first, "staggered-1")
    assert mine == alone[0][:2]
    assert int(np.argmax(joined)) == alone[1][0]


def test_release_frees_a_slot(engine: Engine) -> None:
    prompt = [504, 3575, 282]
    ids = [f"slot-{i}" for i in range(MAX_SEQUENCES)]
    step(engine, [SequenceChunk(r, 0, prompt) for r in ids])
    with pytest.raises(BackendError, match="at most 4 sequences"):
        step(engine, [SequenceChunk("one-too-many", 0, prompt)])
    release(engine, ids[0])
    release(engine, ids[0], "never-seen")  # releasing twice, or an unknown id, is harmless
    step(engine, [SequenceChunk("one-too-many", 0, prompt), SequenceChunk(ids[1], len(prompt), (11,))])
    release(engine, "one-too-many", *ids)
    assert engine.live_sequences == 0  # type: ignore[attr-defined]


def test_over_context_chunk_is_a_request_error(engine: Engine) -> None:
    with pytest.raises(RequestError, match="maximum context length") as raised:
        step(engine, [SequenceChunk("long", 0, [504] * (CONTEXT + 1))])
    assert raised.value.code == "context_length_exceeded"
    (row,) = step(engine, [SequenceChunk("long", 0, [504] * CONTEXT)])  # exactly full is fine
    assert row is not None
    with pytest.raises(RequestError):
        step(engine, [SequenceChunk("long", CONTEXT, (504,))])
    release(engine, "long")
    assert engine.live_sequences == 0  # type: ignore[attr-defined]


def test_bad_chunks_are_refused_before_anything_runs(engine: Engine) -> None:
    with pytest.raises(RequestError, match="outside the vocabulary"):
        step(engine, [SequenceChunk("bad", 0, (1, 49152))])
    with pytest.raises(RequestError, match="token id -1 "):  # a prompt-sized chunk is checked by numpy
        step(engine, [SequenceChunk("bad", 0, [504] * 20 + [-1])])
    with pytest.raises(BackendError, match="hidden states"):
        step(engine, [SequenceChunk("bad", 0, hidden=Tensor.from_numpy(np.zeros((1, 576), np.float32)))])
    with pytest.raises(BackendError, match="starts at position 5"):
        step(engine, [SequenceChunk("bad", 5, (1,))])
    with pytest.raises(BackendError, match="twice"):
        step(engine, [SequenceChunk("bad", 0, (1,)), SequenceChunk("bad", 1, (2,))])
    assert engine.live_sequences == 0  # type: ignore[attr-defined]


def test_short_chunks_and_long_ones_fill_the_batch_alike(engine: Engine) -> None:
    # Chunks of a few tokens (decode steps) are written to the batch one by one, longer ones with
    # numpy: a prompt fed either way leaves the same cache and gives the same logits.
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog, twice.")
    assert len(prompt) > 10
    (whole,) = step(engine, [SequenceChunk("long", 0, prompt)])
    starts = range(0, len(prompt), 3)
    for start in starts:
        (pieces,) = step(engine, [SequenceChunk("short", start, prompt[start : start + 3], want_logits=start == starts[-1])])
    assert whole is not None and pieces is not None
    np.testing.assert_allclose(pieces, whole, atol=1e-3)
    (next_long,) = step(engine, [SequenceChunk("long", len(prompt), (int(np.argmax(whole)),))])
    (next_short,) = step(engine, [SequenceChunk("short", len(prompt), (int(np.argmax(pieces)),))])
    release(engine, "long", "short")
    assert next_long is not None and next_short is not None
    np.testing.assert_allclose(next_short, next_long, atol=1e-3)


def test_tokens_drawn_on_the_compute_thread_are_those_of_the_logits(engine: Engine) -> None:
    # step_and_draw (skulk_core.DrawingEngine): requests with a sampler get the token it draws from
    # llama.cpp's own buffer, the others (and a sampler that declines) get their logits as from step.
    assert isinstance(engine, DrawingEngine)
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode("The capital of France is")
    drawn: list[int] = []

    class Declines(Sampler):
        def draw(self, logits: np.ndarray) -> SampledToken | None:
            return None

    greedy, declines = Sampler(SamplingParams(temperature=0.0)), Declines(SamplingParams(temperature=0.0))
    batch = [SequenceChunk("drawn", 0, prompt), SequenceChunk("plain", 0, prompt), SequenceChunk("declined", 0, prompt)]
    for _ in range(6):
        outputs = anyio.run(engine.step_and_draw, batch, {"drawn": greedy, "declined": declines})
        assert [o.request_id for o in outputs] == ["drawn", "plain", "declined"]
        token, plain, declined = outputs[0].sampled, outputs[1].logits, outputs[2].logits
        assert token is not None and outputs[0].logits is None
        assert plain is not None and declined is not None and outputs[1].sampled is None
        assert token.token_id == int(np.argmax(plain)) == int(np.argmax(declined))
        greedy.observe(token.token_id)
        drawn.append(token.token_id)
        batch = [SequenceChunk(c.request_id, c.position + c.length, (token.token_id,)) for c in batch]
    release(engine, "drawn", "plain", "declined")
    assert drawn == greedy_alone(engine, "alone", prompt, 6)


def test_want_logits_false_and_rewinding(engine: Engine) -> None:
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode("Once upon a time")
    (none,) = step(engine, [SequenceChunk("rewind", 0, prompt[:-1], want_logits=False)])
    assert none is None
    (first,) = step(engine, [SequenceChunk("rewind", len(prompt) - 1, prompt[-1:])])
    step(engine, [SequenceChunk("rewind", len(prompt), (int(np.argmax(first)),))])
    (again,) = step(engine, [SequenceChunk("rewind", len(prompt) - 1, prompt[-1:])])  # back one position
    release(engine, "rewind")
    assert again is not None and first is not None
    assert int(np.argmax(again)) == int(np.argmax(first))
    np.testing.assert_allclose(again, first, atol=1e-3)


@pytest.fixture(scope="module")
def small_batches(card: ModelCard) -> Iterator[Engine]:
    """An engine whose llama_decode takes at most 16 tokens, so most steps are split."""
    engine = _load(card, n_batch=16)
    yield engine
    anyio.run(engine.close)


def test_steps_longer_than_n_batch_are_split(engine: Engine, small_batches: Engine) -> None:
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode("The history of the city goes back many centuries. " * 4)
    assert len(prompt) > 32
    assert greedy_alone(small_batches, "split", prompt, 6) == greedy_alone(engine, "whole", prompt, 6)
    rows = step(small_batches, [SequenceChunk("a", 0, prompt), SequenceChunk("b", 0, prompt[:20])])
    release(small_batches, "a", "b")
    assert all(row is not None for row in rows)


def test_close_twice_then_refuse(card: ModelCard) -> None:
    engine = _load(card)
    step(engine, [SequenceChunk("x", 0, (1, 2, 3))])
    anyio.run(engine.close)
    anyio.run(engine.close)
    anyio.run(engine.release, "x")
    with pytest.raises(BackendError, match="closed"):
        step(engine, [SequenceChunk("late", 0, (1,))])
    with pytest.raises(BackendError, match="closed"):
        engine.tokenizer.encode("hello")  # type: ignore[union-attr]


def test_the_installed_llama_cpp_has_no_amx_kernels() -> None:
    """``make install`` builds llama.cpp without ggml's AMX kernels, which crash in this llama.cpp
    on a CPU with AMX (``native.amx_kernels_built``); elsewhere none are built anyway."""
    assert native.amx_kernels_built() is False


def test_a_llama_cpp_with_amx_kernels_loads_models_out_of_their_reach(
    card: ModelCard, engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    loads = []
    real_load = native.llama_cpp.llama_model_load_from_file

    def load(path: bytes, params: object) -> object:
        loads.append(params.use_extra_bufts)  # type: ignore[attr-defined]
        return real_load(path, params)

    monkeypatch.setattr(native.llama_cpp, "llama_model_load_from_file", load)
    monkeypatch.setattr(native, "amx_kernels_built", lambda: True)
    with caplog.at_level("WARNING", logger="skulk.llamacpp"):
        plain = _load(card)
    try:
        assert loads == [False]
        assert "AMX kernels" in caplog.text and "-mno-amx-int8" in caplog.text
        assert plain.tokenizer is not None
        prompt = plain.tokenizer.encode("The capital of France is")
        assert greedy_alone(plain, "plain", prompt, 8) == greedy_alone(engine, "usual", prompt, 8)
    finally:
        anyio.run(plain.close)


def test_embeddings(engine: Engine) -> None:
    tok = engine.tokenizer
    assert tok is not None

    def embed(sentence: str) -> np.ndarray:
        vector = anyio.run(engine.embed, tok.encode(sentence))  # type: ignore[attr-defined]
        assert isinstance(vector, list) and all(isinstance(v, float) for v in vector)
        return np.asarray(vector)

    cat = embed("The cat sat on the mat.")
    kitten = embed("A kitten was sitting on the rug.")
    tax = embed("Quarterly tax filings are due to the revenue office in April.")
    assert cat.shape == (576,)
    for v in (cat, kitten, tax):
        assert abs(np.linalg.norm(v) - 1.0) < 1e-6
    assert cat @ kitten > cat @ tax
    np.testing.assert_allclose(embed("The cat sat on the mat."), cat, atol=1e-6)  # repeatable
    with pytest.raises(RequestError):
        anyio.run(engine.embed, [])  # type: ignore[attr-defined]
    with pytest.raises(RequestError, match="most this model embeds"):
        anyio.run(engine.embed, [504] * (CONTEXT + 1))  # type: ignore[attr-defined]


def test_long_embeddings_average_every_position(engine: Engine, small_batches: Engine) -> None:
    """An input longer than one micro-batch is pooled over all of it, not just its last part."""
    assert engine.tokenizer is not None
    tokens = engine.tokenizer.encode("Skulk joins several machines into one inference cluster. " * 4)
    assert len(tokens) > 32
    pooled = np.asarray(anyio.run(small_batches.embed, tokens))  # type: ignore[attr-defined]
    whole = np.asarray(anyio.run(engine.embed, tokens))  # type: ignore[attr-defined]
    assert pooled @ whole > 0.999


def test_every_decode_runs_on_the_process_compute_thread(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps and embeddings run on skulk_core.compute_thread(), and the load's thread is gone: a
    second thread that ever ran a llama_decode keeps an OpenMP team that throttles every later
    decode (measured on a node: 146 -> 58-88 tokens/s after one embeddings request)."""
    import threading

    import llama_cpp

    from skulk_core import compute_thread

    assert engine._thread is compute_thread()  # type: ignore[attr-defined]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("llamacpp load")]
    callers: set[str] = set()
    decode = llama_cpp.llama_decode

    def recording_decode(ctx, batch):  # type: ignore[no-untyped-def]
        callers.add(threading.current_thread().name)
        return decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording_decode)
    tok = engine.tokenizer
    assert tok is not None
    anyio.run(engine.embed, tok.encode("The cat sat on the mat."))  # type: ignore[attr-defined]
    step(engine, [SequenceChunk("compute-thread", 0, tok.encode("Hello"))])
    anyio.run(engine.release, "compute-thread")
    assert callers == {"skulk compute"}


def _idle() -> None:
    """Wait until the compute thread has run every call queued so far (a step decoded ahead)."""
    from skulk_core import compute_thread

    compute_thread().call(lambda: None)


def test_decode_ahead_by_default_only_with_a_cpu_to_spare() -> None:
    assert LlamaCppSettings().decodes_ahead(1, cpus=2)
    assert not LlamaCppSettings().decodes_ahead(2, cpus=2)
    assert LlamaCppSettings(decode_ahead="always").decodes_ahead(4, cpus=2)
    assert not LlamaCppSettings(decode_ahead="never").decodes_ahead(1, cpus=16)
    with pytest.raises(ValueError, match="auto, always, never"):
        LlamaCppSettings(decode_ahead="sometimes")


def test_the_next_step_is_decoded_ahead_and_then_taken(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a step drawn here, the thread decodes the next one at once; asked for, it is not
    decoded again: every position is decoded exactly once, and one past the last step asked for."""
    import llama_cpp

    assert engine._decodes_ahead  # type: ignore[attr-defined]
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode("The capital of France is")
    decoded: list[tuple[int, ...]] = []  # the positions of each llama_decode
    decode = llama_cpp.llama_decode

    def recording_decode(ctx, batch):  # type: ignore[no-untyped-def]
        decoded.append(tuple(batch.pos[i] for i in range(batch.n_tokens)))
        return decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording_decode)
    sampler = Sampler(SamplingParams(temperature=0.0))
    tokens = []
    chunk = SequenceChunk("ahead", 0, prompt)
    for _ in range(6):
        (output,) = anyio.run(engine.step_and_draw, [chunk], {"ahead": sampler})
        assert output.sampled is not None
        sampler.observe(output.sampled.token_id)
        tokens.append(output.sampled.token_id)
        chunk = SequenceChunk("ahead", chunk.position + chunk.length, (output.sampled.token_id,))
    _idle()
    release(engine, "ahead")
    n = len(prompt)
    assert decoded == [tuple(range(n)), *((p,) for p in range(n, n + 6))]  # n + 5 asked for, n + 6 ahead
    assert tokens == greedy_alone(engine, "behind", prompt, 6)


def _sampled_run(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """Two seeded requests driven the way the scheduler drives them: the second joins while the
    first decodes, the first's step decoded ahead is once asked for with another token than the
    one drawn (so it is undone), and the second sits out a step while the first goes on."""
    first, second = (Sampler(SamplingParams(temperature=1.2, seed=seed)) for seed in (7, 8))
    samplers = {"first": first, "second": second}
    chunks = {"first": SequenceChunk("first", 0, prompts[0])}
    out: dict[str, list[int]] = {"first": [], "second": []}
    for number in range(10):
        if number == 3:
            chunks["second"] = SequenceChunk("second", 0, prompts[1])
        outputs = anyio.run(engine.step_and_draw, list(chunks.values()), samplers)
        _idle()  # the step ahead is decoded before the next one is asked for, every time
        for output in outputs:
            chunk = chunks[output.request_id]
            assert output.sampled is not None
            token = output.sampled.token_id
            if output.request_id == "first" and number == 5:
                token = 504  # not the token drawn: the step decoded ahead with it is undone
            samplers[output.request_id].observe(token)
            out[output.request_id].append(token)
            chunks[output.request_id] = SequenceChunk(output.request_id, chunk.position + chunk.length, (token,))
        if number == 6:
            parked = chunks.pop("second")  # sits out a step: its step ahead waits for it
        elif number == 7:
            chunks["second"] = parked
    release(engine, "first", "second")
    return [out["first"], out["second"]]


def test_decoding_ahead_changes_no_seeded_token(engine: Engine, card: ModelCard) -> None:
    assert engine.tokenizer is not None
    prompts = [engine.tokenizer.encode("Write a poem about the sea."), engine.tokenizer.encode("Name three rivers.")]
    behind = _load(card, decode_ahead="never")
    try:
        expected = _sampled_run(behind, prompts)
    finally:
        anyio.run(behind.close)
    assert _sampled_run(engine, prompts) == expected
    assert not engine._ahead  # type: ignore[attr-defined]


def test_a_scored_prompt_gets_each_positions_log_probabilities(engine: Engine, small_batches: Engine) -> None:
    # Over 64 positions, so the engine decodes the scored prompt in slices, and (n_batch 16) in
    # batches that split it: every way gives what stepping the prompt one token at a time gives.
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode("The history of the city goes back many centuries, to a village by the river. " * 4)
    assert len(prompt) > 64
    reference = []
    for position, token in enumerate(prompt[:-1]):
        (logits,) = step(engine, [SequenceChunk("one by one", position, (token,))])
        assert logits is not None
        reference.append(score_token(logits, prompt[position + 1], 3))
    release(engine, "one by one")
    (plain,) = step(engine, [SequenceChunk("plain", 0, prompt)])
    for scorer in (engine, small_batches):
        other = SequenceChunk("other", 0, prompt[:5])  # a sequence beside it in the same step
        outputs = anyio.run(scorer.step, [other, SequenceChunk("scored", 0, prompt, score_targets=prompt[1:], score_top=3)])
        release(scorer, "scored", "other")
        assert outputs[0].scores == () and outputs[0].logits is not None
        scores = outputs[1].scores
        assert [s.token_id for s in scores] == prompt[1:]
        # llama.cpp's matrix kernels depend on how a step is split into micro-batches: the same
        # position scores up to 0.21 apart (mean 0.03) between a 64-row slice and rows one at a
        # time. A score read from the wrong position would be off by several nats.
        np.testing.assert_allclose([s.logprob for s in scores], [r.logprob for r in reference], atol=0.3)
        differ = sum(s.top[0].token_id != r.top[0].token_id for s, r in zip(scores, reference))
        assert differ <= len(scores) // 20  # the favourite differs only where two are nearly tied
        assert all(len(s.top) == 3 and s.top[0].logprob >= s.logprob - 1e-6 for s in scores)
        assert plain is not None and int(np.argmax(outputs[1].logits)) == int(np.argmax(plain))  # the last position's logits too
    release(engine, "plain")
    # scoring a prefix without logits, then the rest: the scheduler's chunks of one long prompt
    first = anyio.run(engine.step, [SequenceChunk("halves", 0, prompt[:40], want_logits=False, score_targets=prompt[1:41])])
    second = anyio.run(engine.step, [SequenceChunk("halves", 40, prompt[40:], score_targets=prompt[41:])])
    release(engine, "halves")
    assert first[0].logits is None and len(first[0].scores) == 40 and len(second[0].scores) == len(prompt) - 41
    np.testing.assert_allclose([s.logprob for s in first[0].scores + second[0].scores], [r.logprob for r in reference], atol=0.3)


def test_score_targets_are_checked_before_anything_runs(engine: Engine) -> None:
    with pytest.raises(RequestError, match="outside the vocabulary"):
        anyio.run(engine.step, [SequenceChunk("bad target", 0, (1, 2), score_targets=(2, 10**7))])
    with pytest.raises(BackendError, match="3 score targets for 2 positions"):
        anyio.run(engine.step, [SequenceChunk("bad target", 0, (1, 2), score_targets=(2, 3, 4))])
    assert engine.live_sequences == 0  # type: ignore[attr-defined]


def test_a_released_cache_is_kept_and_a_prompt_that_begins_the_same_reuses_it(card: ModelCard) -> None:
    engine = _load(card)  # its own engine: the count of kept caches starts at none
    other = _load(card, prompt_cache=False)
    try:
        assert engine.tokenizer is not None
        turn = engine.tokenizer.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
        answer = greedy_alone(engine, "first", turn, 6)  # released at the end: kept
        assert engine.kept_sequences == 1 and engine.live_sequences == 0  # type: ignore[attr-defined]
        follow_up = turn + answer + engine.tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
        # an unrelated prompt takes nothing, nor one that shares only the start of the turn: that
        # would cut the conversation kept there
        assert anyio.run(engine.reuse, "stranger", engine.tokenizer.encode("Once upon a time")) == 0  # type: ignore[attr-defined]
        other_chat = engine.tokenizer.encode("<|im_start|>user\nWhat is the capital of Spain?<|im_end|>\n<|im_start|>assistant\n")
        assert other_chat[:8] == turn[:8]  # 8 of the 22 tokens kept
        assert anyio.run(engine.reuse, "stranger", other_chat) == 0  # type: ignore[attr-defined]
        assert engine.kept_sequences == 1  # type: ignore[attr-defined]
        # the next turn starts after the conversation so far: the first turn and the answer's tokens
        # (greedy_alone decodes each token it draws; in a node the last one drawn never is)
        cached = anyio.run(engine.reuse, "second", follow_up)  # type: ignore[attr-defined]
        assert cached == len(turn) + len(answer) and engine.kept_sequences == 0  # type: ignore[attr-defined]
        (logits,) = step(engine, [SequenceChunk("second", cached, follow_up[cached:])])
        (fresh,) = step(other, [SequenceChunk("second", 0, follow_up)])
        assert logits is not None and fresh is not None and int(np.argmax(logits)) == int(np.argmax(fresh))
        np.testing.assert_allclose(logits, fresh, atol=0.5)  # (llama.cpp's kernels differ by micro-batch shape)
        release(engine, "second")
        release(other, "second")
        assert other.kept_sequences == 0  # type: ignore[attr-defined]  # prompt_cache off: nothing kept
        # the same prompt again: all but its last position, which is computed for its logits
        assert anyio.run(engine.reuse, "again", follow_up) == len(follow_up) - 1  # type: ignore[attr-defined]
        release(engine, "again")
        # kept caches give way to new requests: all four slots at once still work
        prompts = [engine.tokenizer.encode(f"Number {i} is") for i in range(MAX_SEQUENCES)]
        rows = step(engine, [SequenceChunk(f"new{i}", 0, p) for i, p in enumerate(prompts)])
        assert all(row is not None for row in rows) and engine.kept_sequences == 0  # type: ignore[attr-defined]
        release(engine, *(f"new{i}" for i in range(MAX_SEQUENCES)))
        assert engine.kept_sequences == MAX_SEQUENCES  # type: ignore[attr-defined]
    finally:
        anyio.run(engine.close)
        anyio.run(other.close)
