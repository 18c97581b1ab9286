"""The torch engine on the default model (SmolLM2-135M-Instruct, Q4_1): llama.cpp's greedy tokens,
stages chained like one model, batching, and the memory a partial stage holds.

The whole model is loaded once per module; stages are loaded separately, each reading only its own
layers from the GGUF.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import anyio
import numpy as np
import pytest

from skulk_core import (
    Engine,
    EngineOptions,
    ModelCard,
    ModelFiles,
    SequenceChunk,
    ShardRange,
    Tokenizer,
    default_model_path,
)
from skulk_core.pipeline import LocalChain

from skulk_torch import TorchBackend, TorchSettings
from skulk_torch.engine import SCORED_ROWS

pytestmark = pytest.mark.slow  # loads a model

CONTEXT = 256
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.from_gguf(default_model_path())


def _load(card: ModelCard, shard: ShardRange, device: str = "cpu", **settings: object) -> Engine:
    files = ModelFiles(card.id, "gguf", default_model_path())
    # One thread: on a shared 2-core machine a busy neighbour stalls every 2-thread parallel region.
    options = EngineOptions(context_length=CONTEXT, max_sequences=4, threads=1, device=device, settings=TorchSettings(**settings))  # type: ignore[arg-type]
    return anyio.run(TorchBackend().load, card, files, shard, options)


@pytest.fixture(scope="module")
def engine(card: ModelCard) -> Iterator[Engine]:
    engine = _load(card, ShardRange.whole(card.n_layers))
    yield engine
    anyio.run(engine.close)


@pytest.fixture(scope="module")
def prompts(engine: Engine) -> list[list[int]]:
    assert engine.tokenizer is not None
    return [engine.tokenizer.encode(p) for p in PROMPTS]


def greedy(chain: object, prompt: Sequence[int], n: int, request_id: str = "r") -> list[int]:
    """``n`` greedy tokens through an engine or chain (anything with step and release)."""
    (out,) = anyio.run(chain.step, [SequenceChunk(request_id, 0, prompt)])  # type: ignore[attr-defined]
    tokens, position = [], len(prompt)
    for _ in range(n):
        tokens.append(int(np.argmax(out.logits)))
        (out,) = anyio.run(chain.step, [SequenceChunk(request_id, position, (tokens[-1],))])  # type: ignore[attr-defined]
        position += 1
    anyio.run(chain.release, request_id)  # type: ignore[attr-defined]
    return tokens


def llama_cpp_greedy(llm: object, prompt: Sequence[int], n: int) -> list[int]:
    llm.reset()  # type: ignore[attr-defined]
    llm.eval(list(prompt))  # type: ignore[attr-defined]
    tokens = []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # type: ignore[attr-defined]
        tokens.append(int(np.argmax(logits)))
        llm.eval([tokens[-1]])  # type: ignore[attr-defined]
    return tokens


def test_greedy_tokens_match_llama_cpp(engine: Engine, prompts: list[list[int]]) -> None:
    # llama.cpp multiplies Q4_1 weights with activations it rounds to 8 bits, this engine with the
    # float32 dequantized weights, so their logits differ by up to ~0.5 and a prompt whose top two
    # tokens are nearly tied can diverge; these two prompts have clear margins for 10 tokens.
    # (On the same weights stored as F32, llama.cpp and this engine agree to 0.01.)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(
        model_path=str(default_model_path()), n_ctx=CONTEXT, n_threads=1, n_threads_batch=1, verbose=False
    )
    try:
        for prompt in prompts:
            assert greedy(engine, prompt, 10) == llama_cpp_greedy(llm, prompt, 10)
    finally:
        llm.close()


def test_tokenizer_routes_agree(engine: Engine) -> None:
    """llama.cpp's tokenizer (vocabulary-only load) and the one built with ``tokenizers`` from the
    GGUF's vocabulary agree on pieces, control tokens and encodings."""
    pytest.importorskip("llama_cpp")
    from skulk_torch.tokenizer import load_tokenizer

    assert isinstance(engine, Engine)
    exact = engine.tokenizer
    assert exact is not None and isinstance(exact, Tokenizer) and type(exact).__name__ == "LlamaCppVocabTokenizer"
    built = load_tokenizer(default_model_path(), "tokenizers")
    assert built.vocab_size == exact.vocab_size == 49152
    assert built.bos_token_id == exact.bos_token_id == 1
    assert built.eos_token_ids == exact.eos_token_ids == {0, 2, 4}
    assert all(built.token_bytes(t) == exact.token_bytes(t) for t in range(0, 49152, 7))
    assert all(built.is_control(t) == exact.is_control(t) for t in range(0, 64))
    for text in [*PROMPTS, "The year 2024 had 365 days.", "  spaces\n\n\ttabs", "ünïcödé 🦊 中文", "it's we'll I'd", "x**2  # sq"]:
        for parse_special in (True, False):
            assert built.encode(text, parse_special=parse_special) == exact.encode(text, parse_special=parse_special), text


def test_stages_give_the_whole_models_tokens(card: ModelCard, engine: Engine, prompts: list[list[int]]) -> None:
    want = [greedy(engine, prompt, 8) for prompt in prompts]
    for ranges in ([(0, 15), (15, 30)], [(0, 10), (10, 20), (20, 30)]):
        stages = [_load(card, ShardRange(a, b, card.n_layers)) for a, b in ranges]
        chain = LocalChain(stages)
        try:
            assert [greedy(chain, prompt, 8) for prompt in prompts] == want, ranges
        finally:
            anyio.run(chain.close)


def test_a_batch_equals_each_sequence_alone(engine: Engine, prompts: list[list[int]]) -> None:
    """A prefill and two decodes in one step give the tokens each gives alone."""
    alone = [greedy(engine, prompt, 6, f"alone{i}") for i, prompt in enumerate(prompts)]
    third = prompts[0][:9]
    alone.append(greedy(engine, third, 6, "alone3"))
    # Sequences 0 and 1 are prefilled first; sequence 2's prefill joins their first decode step.
    outs = anyio.run(engine.step, [SequenceChunk("a", 0, prompts[0]), SequenceChunk("b", 0, prompts[1])])
    got: list[list[int]] = [[int(np.argmax(o.logits))] for o in outs]
    got.append([])
    positions = [len(prompts[0]), len(prompts[1]), 0]
    for _ in range(6):
        batch = [SequenceChunk(rid, positions[i], (got[i][-1],)) for i, rid in enumerate("ab")]
        batch.append(SequenceChunk("c", positions[2], third if not got[2] else (got[2][-1],)))
        outs = anyio.run(engine.step, batch)
        for i, (chunk, out) in enumerate(zip(batch, outs)):
            positions[i] += chunk.length
            got[i].append(int(np.argmax(out.logits)))
    assert [g[:6] for g in got] == alone
    for rid in "abc":
        anyio.run(engine.release, rid)


def test_release_frees_the_cache(engine: Engine, prompts: list[list[int]]) -> None:
    assert engine.live_sequences == 0  # type: ignore[attr-defined]
    anyio.run(engine.step, [SequenceChunk("x", 0, prompts[0]), SequenceChunk("y", 0, prompts[1])])
    assert engine.live_sequences == 2  # type: ignore[attr-defined]
    held = engine.cache_bytes()  # type: ignore[attr-defined]
    # 256 positions (the smallest cache) x 30 layers x K and V x 3 heads x 64 x 4 bytes, per sequence
    assert held == 2 * (256 * 30 * 2 * 3 * 64 * 4)
    anyio.run(engine.release, "x")
    assert engine.cache_bytes() == held // 2  # type: ignore[attr-defined]
    anyio.run(engine.release, "y")
    anyio.run(engine.release, "never-seen")
    assert engine.live_sequences == 0 and engine.cache_bytes() == 0  # type: ignore[attr-defined]
    # (kept for a later request that begins the same way: torch.prompt_cache, on by default)
    assert engine.kept_sequences >= 2 and engine.kept_bytes() >= held  # type: ignore[attr-defined]


def test_a_released_cache_is_kept_and_a_prompt_that_begins_the_same_reuses_it(engine: Engine, prompts: list[list[int]]) -> None:
    answer = greedy(engine, prompts[0], 4, request_id="first turn")  # released at the end: kept
    follow_up = [*prompts[0], *answer, *prompts[1]]
    cached = anyio.run(engine.reuse, "next turn", follow_up)  # type: ignore[attr-defined]
    assert cached == len(prompts[0]) + len(answer)  # the first turn's prompt and answer
    (reused,) = anyio.run(engine.step, [SequenceChunk("next turn", cached, follow_up[cached:])])
    (whole,) = anyio.run(engine.step, [SequenceChunk("computed whole", 0, follow_up)])
    np.testing.assert_allclose(reused.logits, whole.logits, atol=1e-3 * np.abs(whole.logits).max(), rtol=0)
    # another conversation shares only the template's first tokens: no kept cache is cut for those
    assert engine.tokenizer is not None
    other = engine.tokenizer.encode("<|im_start|>user\nWhich planet is the largest?<|im_end|>\n")
    assert anyio.run(engine.reuse, "other", other) == 0  # type: ignore[attr-defined]
    # live and kept sequences stay within max_sequences (4): new ones evict the least recently kept
    for rid in ("next turn", "computed whole"):
        anyio.run(engine.release, rid)
    anyio.run(engine.step, [SequenceChunk(f"new {i}", 0, prompts[i % 2]) for i in range(3)])
    assert (engine.live_sequences, engine.kept_sequences) == (3, 1)  # type: ignore[attr-defined]
    for i in range(3):
        anyio.run(engine.release, f"new {i}")
    assert (engine.live_sequences, engine.kept_sequences) == (0, 4)  # type: ignore[attr-defined]


def test_a_stage_of_a_pipeline_keeps_no_cache(card: ModelCard, prompts: list[list[int]]) -> None:
    first = _load(card, ShardRange(0, 10, card.n_layers))
    try:
        anyio.run(first.step, [SequenceChunk("x", 0, prompts[0])])
        anyio.run(first.release, "x")
        assert first.kept_sequences == 0 and anyio.run(first.reuse, "y", prompts[0]) == 0  # type: ignore[attr-defined]
    finally:
        anyio.run(first.close)


def test_a_third_of_the_layers_holds_a_third_of_the_blocks(card: ModelCard, engine: Engine) -> None:
    whole = engine.parameter_bytes()  # type: ignore[attr-defined]
    # float32 block parameters (the norm gains are folded into the matrices after them)
    assert whole["blocks"] == 30 * (3_540_096 - 2 * 576) * 4
    # the head is the tied embedding; the embedding itself is read from the file a token at a time
    assert whole["head"] == (49152 * 576 + 576) * 4
    assert whole["embed"] == 0
    middle = _load(card, ShardRange(10, 20, card.n_layers))
    try:
        held = middle.parameter_bytes()  # type: ignore[attr-defined]
        assert held == {"blocks": whole["blocks"] // 3, "embed": 0, "head": 0}
        assert middle.tokenizer is None
    finally:
        anyio.run(middle.close)


def test_int8_matrices_keep_the_greedy_tokens_in_a_quarter_of_the_bytes(card: ModelCard, engine: Engine, prompts: list[list[int]]) -> None:
    """torch.quantize int8 on the default model: the float32 engine's greedy tokens on prompts with
    clear margins (a near tie can go either way: of four prompts tried, one differed at its second
    token), with the matrices in a quarter of the bytes."""
    int8 = _load(card, ShardRange.whole(card.n_layers), quantize="int8")
    try:
        for prompt in prompts:
            assert greedy(int8, prompt, 10) == greedy(engine, prompt, 10)
        held, full = int8.parameter_bytes(), engine.parameter_bytes()  # type: ignore[attr-defined]
        assert full["blocks"] / 4 < held["blocks"] < full["blocks"] / 4 * 1.01  # and a 2-byte scale a row
        assert full["head"] / 4 < held["head"] < full["head"] / 4 * 1.01
    finally:
        anyio.run(int8.close)


def test_int4_matrices_give_the_same_answers_in_a_sixth_of_the_bytes(card: ModelCard, engine: Engine, prompts: list[list[int]]) -> None:
    """torch.quantize int4 on the default model (a Q4_1 file: its blocks are groups of 32 too): the
    float32 engine's greedy answers to the test prompts, up to their end of turn, with the matrices
    in about a sixth of the bytes. (Past the end of turn, and on prompts with near ties, tokens part.)"""
    int4 = _load(card, ShardRange.whole(card.n_layers), quantize="int4")
    end_of_turn = 2  # <|im_end|>
    try:
        for prompt in prompts:
            want = greedy(engine, prompt, 16)
            assert end_of_turn in want
            answer = want[: want.index(end_of_turn) + 1]
            assert greedy(int4, prompt, len(answer)) == answer
        held, full = int4.parameter_bytes(), engine.parameter_bytes()  # type: ignore[attr-defined]
        assert full["blocks"] / 7 < held["blocks"] < full["blocks"] / 6
        assert full["head"] / 7 < held["head"] < full["head"] / 6
    finally:
        anyio.run(int4.close)


def test_a_scored_prompt_scores_alike_in_one_chunk_token_by_token_and_over_stages(card: ModelCard, engine: Engine, prompts: list[list[int]]) -> None:
    prompt = prompts[0] * 5  # over 64 positions: the logits are computed a slice at a time
    assert len(prompt) > SCORED_ROWS
    one_by_one = []
    for position, token in enumerate(prompt[:-1]):  # a one-token chunk, scored: what a prefill split to the end gives
        (out,) = anyio.run(engine.step, [SequenceChunk("by token", position, (token,), want_logits=False, score_targets=(prompt[position + 1],), score_top=2)])
        assert out.logits is None
        one_by_one += out.scores
    anyio.run(engine.release, "by token")
    (whole,) = anyio.run(engine.step, [SequenceChunk("whole", 0, prompt, score_targets=prompt[1:], score_top=2)])
    anyio.run(engine.release, "whole")
    assert [s.token_id for s in whole.scores] == prompt[1:] and whole.logits is not None
    np.testing.assert_allclose([s.logprob for s in whole.scores], [s.logprob for s in one_by_one], atol=1e-3)
    assert [[t.token_id for t in s.top] for s in whole.scores] == [[t.token_id for t in s.top] for s in one_by_one]
    chain = LocalChain([_load(card, ShardRange(a, b, card.n_layers)) for a, b in ((0, 15), (15, 30))])
    try:
        (staged,) = anyio.run(chain.step, [SequenceChunk("staged", 0, prompt, score_targets=prompt[1:], score_top=2)])
    finally:
        anyio.run(chain.close)
    np.testing.assert_allclose([s.logprob for s in staged.scores], [s.logprob for s in whole.scores], atol=1e-3)
