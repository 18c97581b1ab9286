"""The torch engine on a CUDA GPU: tiny models against the float64 reference, a CPU stage chained to a
GPU stage, and the default model's greedy tokens, batching, cache and memory on the GPU.

Skipped where torch sees no CUDA device (CI has none); run on a machine with one:
``pytest plugins/skulk-torch/tests/test_torch_cuda.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from skulk_core import Engine, ModelCard, ModelError, SequenceChunk, ShardRange, default_model_path
from skulk_core.pipeline import LocalChain

from skulk_torch import TorchBackend, TorchSettings
from test_torch_engine import _load as _load_model
from test_torch_engine import greedy, prompts  # noqa: F401 (prompts: the fixture, on this module's engine)
from test_torch_plugin import TOKENS, _check_against_reference
from test_torch_plugin import _load as _load_file
from torch_tiny_models import make_tiny, write_gguf, write_safetensors

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device here")


def _load_tiny(path: Path, shard: ShardRange | None = None, *, device: str = "cuda", dtype: str = "auto", graphs: bool = True) -> Any:
    return _load_file(path, shard, device=device, settings=TorchSettings(dtype=dtype, cuda_graphs=graphs))


def test_the_backend_offers_cuda_first_and_bfloat16_by_default() -> None:
    assert TorchBackend().capabilities.devices[0] == "cuda"
    from skulk_torch.backend import resolve_dtype_name

    assert resolve_dtype_name("auto", "cuda") == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")


@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_float32_on_the_gpu_matches_reference(tmp_path: Path, fmt: str, arch: str, tied: bool, graphs: bool) -> None:
    model = make_tiny(arch, tied=tied)
    path = write_gguf(model, tmp_path / "tiny.gguf") if fmt == "gguf" else write_safetensors(model, tmp_path / "model")
    engine = _load_tiny(path, dtype="float32", graphs=graphs)
    try:
        assert engine.device.type == "cuda" and engine.dtype == torch.float32 and engine.layout == "plain"
        _check_against_reference(engine, model)  # its decode steps (one position) replay graphs
        assert (engine._slots.graphs > 0) if graphs else engine._slots is None
    finally:
        anyio.run(engine.close)


@pytest.mark.parametrize("dtype", ["auto", "float16", "bfloat16"])
def test_half_precision_on_the_gpu_matches_reference_roughly(tmp_path: Path, dtype: str) -> None:
    model = make_tiny("qwen2")
    engine = _load_tiny(write_gguf(model, tmp_path / "tiny.gguf"), dtype=dtype)
    try:
        assert engine.dtype in (torch.float16, torch.bfloat16)
        _check_against_reference(engine, model, tolerance=0.03)
    finally:
        anyio.run(engine.close)


def test_a_cpu_stage_chains_to_a_gpu_stage(tmp_path: Path) -> None:
    """A node without a GPU and one with: float32 activations cross between them unchanged."""
    model = make_tiny("llama", n_layers=4, tied=True)
    path = write_gguf(model, tmp_path / "tiny.gguf", weight_type="F16")
    stages = [
        _load_tiny(path, ShardRange(0, 2, 4), device="cpu", dtype="float32"),
        _load_tiny(path, ShardRange(2, 4, 4), device="cuda", dtype="float32"),
    ]
    whole = _load_tiny(path, device="cpu", dtype="float32")
    try:
        assert [s.device.type for s in stages] == ["cpu", "cuda"]
        chain = LocalChain(stages)
        for cut in (len(TOKENS) - 3, len(TOKENS)):  # a prefill, then a chunk against the cache
            start = 0 if cut < len(TOKENS) else len(TOKENS) - 3
            (out,) = anyio.run(chain.step, [SequenceChunk("r", start, TOKENS[start:cut])])
            (want,) = anyio.run(whole.step, [SequenceChunk("r", start, TOKENS[start:cut])])
            np.testing.assert_allclose(out.logits, want.logits, atol=1e-4 * np.abs(want.logits).max(), rtol=0)
    finally:
        for engine in (*stages, whole):
            anyio.run(engine.close)


# -- the default model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def card() -> ModelCard:
    try:
        return ModelCard.from_gguf(default_model_path())
    except ModelError as exc:
        pytest.skip(str(exc))


def _load(card: ModelCard, shard: ShardRange, device: str, dtype: str = "auto", graphs: bool = True) -> Engine:
    return _load_model(card, shard, device, dtype=dtype, cuda_graphs=graphs)


@pytest.fixture(scope="module")
def engine(card: ModelCard) -> Iterator[Engine]:
    """The whole model on the GPU in the element type a GPU node uses by default."""
    engine = _load(card, ShardRange.whole(card.n_layers), "cuda")
    yield engine
    anyio.run(engine.close)


@pytest.mark.slow
def test_float32_on_the_gpu_gives_the_cpus_greedy_tokens(card: ModelCard, prompts: list[list[int]]) -> None:
    engines = [_load(card, ShardRange.whole(card.n_layers), device, "float32") for device in ("cpu", "cuda")]
    try:
        cpu, gpu = ([greedy(e, p, 12) for p in prompts] for e in engines)
        assert gpu == cpu
    finally:
        for e in engines:
            anyio.run(e.close)


@pytest.mark.slow
def test_decode_graphs_give_the_eager_steps_tokens(card: ModelCard, prompts: list[list[int]]) -> None:
    """float32 on the GPU: captured decode steps and eager ones agree, alone and in a batch."""
    graphed, eager = (_load(card, ShardRange.whole(card.n_layers), "cuda", "float32", graphs=g) for g in (True, False))
    try:
        for prompt in prompts:
            assert greedy(graphed, prompt, 16) == greedy(eager, prompt, 16)
        batch = [SequenceChunk(f"b{i}", 0, tuple(p)) for i, p in enumerate(prompts)]
        outs = [anyio.run(e.step, batch) for e in (graphed, eager)]
        positions = [len(p) for p in prompts]
        for _ in range(6):
            tokens = [int(np.argmax(o.logits)) for o in outs[1]]
            for g, e in zip(*outs):
                np.testing.assert_allclose(g.logits, e.logits, atol=1e-3 * np.abs(e.logits).max(), rtol=0)
            step = [SequenceChunk(f"b{i}", positions[i], (t,)) for i, t in enumerate(tokens)]
            outs = [anyio.run(e.step, step) for e in (graphed, eager)]
            positions = [p + 1 for p in positions]
        assert graphed._slots.graphs >= 2  # type: ignore[attr-defined]  # 1 row and 2 rows
    finally:
        for e in (graphed, eager):
            anyio.run(e.close)


@pytest.mark.slow
def test_half_precision_on_the_gpu_stays_close_to_float32(card: ModelCard, engine: Engine, prompts: list[list[int]]) -> None:
    """bfloat16 rounds every product, so its logits drift from float32's; the ranking at the top holds."""
    exact = _load(card, ShardRange.whole(card.n_layers), "cpu", "float32")
    try:
        for i, prompt in enumerate(prompts):
            (half,) = anyio.run(engine.step, [SequenceChunk(f"h{i}", 0, prompt)])
            (full,) = anyio.run(exact.step, [SequenceChunk(f"f{i}", 0, prompt)])
            assert int(np.argmax(half.logits)) == int(np.argmax(full.logits))
            assert np.corrcoef(half.logits, full.logits)[0, 1] > 0.99
            anyio.run(engine.release, f"h{i}")
            anyio.run(exact.release, f"f{i}")
    finally:
        anyio.run(exact.close)


@pytest.mark.slow
def test_stages_on_the_gpu_give_the_whole_models_tokens(card: ModelCard, engine: Engine, prompts: list[list[int]]) -> None:
    want = [greedy(engine, prompt, 8) for prompt in prompts]
    stages = [_load(card, ShardRange(a, b, card.n_layers), "cuda") for a, b in ((0, 10), (10, 20), (20, 30))]
    chain = LocalChain(stages)
    try:
        # Activations cross as float32 and are rounded back to bfloat16 at the next stage: exact.
        assert [greedy(chain, prompt, 8) for prompt in prompts] == want
    finally:
        anyio.run(chain.close)


@pytest.mark.slow
def test_a_batch_on_the_gpu_equals_each_sequence_alone(engine: Engine, prompts: list[list[int]]) -> None:
    alone = [greedy(engine, prompt, 6, f"alone{i}") for i, prompt in enumerate(prompts)]
    outs = anyio.run(engine.step, [SequenceChunk("a", 0, prompts[0]), SequenceChunk("b", 0, prompts[1])])
    got = [[int(np.argmax(o.logits))] for o in outs]
    positions = [len(p) for p in prompts]
    for _ in range(5):
        batch = [SequenceChunk(rid, positions[i], (got[i][-1],)) for i, rid in enumerate("ab")]
        for i, out in enumerate(anyio.run(engine.step, batch)):
            positions[i] += 1
            got[i].append(int(np.argmax(out.logits)))
    assert got == alone
    for rid in "ab":
        anyio.run(engine.release, rid)


@pytest.mark.slow
def test_the_gpu_holds_a_stages_share_and_frees_the_cache(card: ModelCard, engine: Engine, prompts: list[list[int]]) -> None:
    element = 2  # bfloat16 or float16
    anyio.run(engine.step, [SequenceChunk("x", 0, prompts[0])])
    assert engine.cache_bytes() == 256 * 30 * 2 * 3 * 64 * element  # type: ignore[attr-defined]
    anyio.run(engine.release, "x")
    assert engine.cache_bytes() == 0  # type: ignore[attr-defined]

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    middle = _load(card, ShardRange(10, 20, card.n_layers), "cuda")
    try:
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
        blocks = middle.parameter_bytes()["blocks"]  # type: ignore[attr-defined]
        assert blocks == 10 * (3_540_096 - 2 * 576) * element
        assert middle.parameter_bytes()["head"] == 0  # type: ignore[attr-defined]
        # the KV pool: 10 layers, K and V, 4 slots and a scratch one, 256 positions each
        pool = 10 * 2 * 5 * 3 * 256 * 64 * element
        assert middle._slots.pool.numel() * element == pool  # type: ignore[attr-defined]
        assert blocks + pool <= grown < (blocks + pool) * 1.1, (grown, blocks, pool)
    finally:
        anyio.run(middle.close)
