"""The torch plugin without the default model: entry point, estimates, dequantization, tiny models.

Tiny random models (``torch_tiny_models``) are checked against a float64 reference forward pass
and, where llama-cpp-python is installed, against llama.cpp itself.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import numpy as np
import pytest

from skulk_core import (
    BackendError,
    ConfigError,
    ConfigLoader,
    EngineOptions,
    ModelCard,
    ModelError,
    ModelFiles,
    ModelSource,
    RequestError,
    SequenceChunk,
    ShardRange,
    Tokenizer,
    default_model_path,
)
from skulk_core.pipeline import LocalChain
from skulk_core.plugins import PluginSelection, make_plugin_manager

from skulk_torch import TorchBackend, TorchSettings
from skulk_torch.backend import config_from_card
from skulk_torch.checkpoint import interleave_rotary_rows, read_config
from skulk_torch.gguf_file import GGUFFile
from torch_tiny_models import TinyModel, make_tiny, permute_rows, reference_logits, write_gguf, write_safetensors

try:
    import llama_cpp
except ImportError:  # the reference comparisons with llama.cpp are skipped
    llama_cpp = None

needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed")


# -- the plugin ----------------------------------------------------------------------------------


def test_core_is_installed_from_this_repository() -> None:
    import skulk_core

    assert importlib.metadata.version("skulk").startswith("0.1")
    assert skulk_core.__version__.startswith("0.1")


def test_entry_point_is_registered() -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="skulk")}
    assert "torch" in eps, "run: pip install --no-deps -e plugins/skulk-torch"
    assert eps["torch"].value == "skulk_torch.plugin"
    assert eps["torch"].dist is not None and eps["torch"].dist.name == "skulk-torch"


def test_plugin_manager_finds_backend_and_config_section() -> None:
    plugins = make_plugin_manager(PluginSelection(autoload=False, plugins=("torch",)))
    backend = plugins.backends().backend("torch")
    caps = backend.capabilities
    assert backend.name == "torch"
    assert caps.formats == {"gguf", "safetensors"} and caps.layer_ranges and caps.batching
    assert caps.architectures == {"llama", "mistral", "qwen2"}
    assert caps.devices[-1] == "cpu"
    assert plugins.config_sections().get("torch") is TorchSettings


def test_importing_the_plugin_does_not_import_torch() -> None:
    code = (
        "import sys, skulk_torch.plugin; b = skulk_torch.TorchBackend(); b.capabilities;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_config_section_from_file_and_environment() -> None:
    loader = ConfigLoader(document={"torch": {"dtype": "float32"}}, env={"SKULK_TORCH_TOKENIZER": "tokenizers"}, cli={})
    settings = loader.resolve({"torch": TorchSettings}).section("torch")
    assert settings == TorchSettings(dtype="float32", tokenizer="tokenizers")
    with pytest.raises(ConfigError, match="dtype"):
        ConfigLoader(document={"torch": {"dtype": "float8"}}, env={}, cli={}).resolve({"torch": TorchSettings})
    loader = ConfigLoader(document={}, env={"SKULK_TORCH_DEVICE": "cuda:1"}, cli={})
    assert loader.resolve({"torch": TorchSettings}).section("torch").device == "cuda:1"
    for bad in ("tpu", "cuda:x", "cpu:0", "mps:1"):
        with pytest.raises(ConfigError, match="auto, cpu, cuda, cuda:N or mps"):
            ConfigLoader(document={"torch": {"device": bad}}, env={}, cli={}).resolve({"torch": TorchSettings})


def test_the_device_setting_places_the_stage(tmp_path: Path) -> None:
    """``torch.device`` picks the device when the node names none; the estimate follows it."""
    path = write_gguf(make_tiny("llama", n_layers=1), tmp_path / "tiny.gguf")
    engine = _load(path, device=None, settings=TorchSettings(device="cpu"))
    try:
        assert engine.device.type == "cpu" and engine.dtype == __import__("torch").float32
    finally:
        anyio.run(engine.close)
    card, _ = _files(path)
    backend, shard = TorchBackend(), ShardRange.whole(1)
    on_cpu = backend.estimate_memory(card, shard, EngineOptions(context_length=64, settings=TorchSettings(device="cpu")))
    on_gpu = backend.estimate_memory(card, shard, EngineOptions(context_length=64, settings=TorchSettings(device="cuda")))
    assert on_gpu < on_cpu  # 2 bytes an element on a GPU, 4 on a CPU


def _card(arch: str = "llama", **changes: object) -> ModelCard:
    values: dict[str, object] = dict(
        id="m", architecture=arch, n_layers=30, hidden_size=576, n_heads=9, n_kv_heads=3, context_length=8192,
        vocab_size=49152, bytes_on_disk=100_000_000, source=ModelSource(kind="local", path="/nonexistent.gguf"),
        quantization="Q4_1",
    )
    values.update(changes)
    return ModelCard(**values)  # type: ignore[arg-type]


def test_supports_names_the_reason() -> None:
    backend = TorchBackend()
    assert backend.supports(_card()) is None
    assert backend.supports(_card("qwen2")) is None
    reason = backend.supports(_card("gemma3"))
    assert reason is not None and "gemma3" in reason and "llamacpp" in reason


def test_estimate_memory_from_the_file() -> None:
    """With the file readable, the estimate uses its exact shape: weights at 4 bytes a parameter."""
    backend = TorchBackend()
    card = ModelCard.from_gguf(default_model_path())
    config = read_config(default_model_path())
    assert config.ffn_size == 1536 and config.tied_embeddings
    options = EngineOptions(context_length=1024, max_sequences=2, device="cpu", settings=TorchSettings(dtype="float32"))
    whole = backend.estimate_memory(card, ShardRange.whole(30), options)
    middle = backend.estimate_memory(card, ShardRange(10, 20, 30), options)
    kv_whole = 2 * 30 * 3 * 64 * 4 * 1024 * 2
    blocks = config.layer_params() * 30 * 4
    embedding = 49152 * 576 * 4
    assert config.layer_params() * 30 + 49152 * 576 + 576 == 134_515_008  # the GGUF's element count
    fixed = whole - blocks - embedding - 576 * 4 - kv_whole  # activations, tokenizer, runtime
    assert 300 * 2**20 < fixed < 800 * 2**20
    # The middle third: a third of the blocks and of the KV cache, no embedding or tokenizer.
    assert middle < whole - embedding - blocks * 2 // 3 - kv_whole * 2 // 3
    more = backend.estimate_memory(card, ShardRange(10, 20, 30), EngineOptions(context_length=2048, max_sequences=2, device="cpu"))
    assert more - middle >= 2 * 10 * 3 * 64 * 4 * 1024 * 2  # KV cache doubles with the context
    # int8 matrices: a byte a weight and a scale a row, the rest (KV cache, activations) unchanged
    int8 = backend.estimate_memory(card, ShardRange.whole(30), attrs.evolve(options, settings=TorchSettings(quantize="int8")))
    params = blocks // 4 + 49152 * 576 + 576
    assert whole - int8 == params * 4 - params - 2 * (params // 576)
    # int4: half a byte a weight, a 2-byte scale and offset per group of 32
    int4 = backend.estimate_memory(card, ShardRange.whole(30), attrs.evolve(options, settings=TorchSettings(quantize="int4")))
    assert whole - int4 == params * 4 - params // 2 - 4 * (params // 32)


def test_estimate_memory_from_the_card_alone() -> None:
    card = ModelCard.from_gguf(default_model_path())
    unreadable = _card(bytes_on_disk=card.bytes_on_disk)
    estimated = config_from_card(unreadable)
    exact = read_config(default_model_path())
    # Within a factor of 1.5 of the real block size, erring high (Q8_0 embedding counted as Q4_1).
    assert exact.layer_params() <= estimated.layer_params() < 1.5 * exact.layer_params()
    backend = TorchBackend()
    options = EngineOptions(context_length=1024)
    assert backend.estimate_memory(unreadable, ShardRange(0, 10, 30), options) > backend.estimate_memory(
        unreadable, ShardRange(10, 20, 30), options
    )


# -- dequantization ------------------------------------------------------------------------------

# Every type claimed, with a reference for each: llama.cpp's own ggml (its quantizer writes the
# blocks, its dequantizer is the reference) where llama-cpp-python is installed, and for the simple
# block types also a dequantizer written here from the block layouts.
QUANTIZED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
FLOATS = ["F32", "F16", "BF16"]


class _Ggml:
    """llama.cpp's ggml library through ctypes: quantize and dequantize rows of any type."""

    class Traits(ctypes.Structure):
        _fields_ = [
            ("type_name", ctypes.c_char_p),
            ("blck_size", ctypes.c_int64),
            ("blck_size_interleave", ctypes.c_int64),
            ("type_size", ctypes.c_size_t),
            ("is_quantized", ctypes.c_bool),
            ("to_float", ctypes.c_void_p),
            ("from_float_ref", ctypes.c_void_p),
        ]

    def __init__(self) -> None:
        assert llama_cpp is not None
        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        lib.ggml_get_type_traits.restype = ctypes.POINTER(self.Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.lib = lib

    def quantize(self, values: np.ndarray, kind: int, row_bytes: int) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=np.float32)
        out = np.zeros((values.shape[0], row_bytes), dtype=np.uint8)
        self.lib.ggml_quantize_chunk(kind, values.ctypes.data, out.ctypes.data, 0, values.shape[0], values.shape[1], None)
        return out

    def dequantize(self, raw: np.ndarray, kind: int, n: int) -> np.ndarray:
        traits = self.lib.ggml_get_type_traits(kind).contents
        to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)
        raw = np.ascontiguousarray(raw)
        out = np.zeros(n, dtype=np.float32)
        to_float(raw.ctypes.data, out.ctypes.data, n)
        return out


def _spec_dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    """Q8_0, Q4_0 and Q4_1 by hand from ggml's block layouts (ggml-common.h), one block at a time."""
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    out = []
    for block in raw.reshape(-1, size):
        d = float(block[:2].view(np.float16)[0])
        if kind == "Q8_0":
            out.append(d * block[2:].view(np.int8).astype(np.float32))
            continue
        m = float(block[2:4].view(np.float16)[0]) if kind == "Q4_1" else 0.0
        qs = block[4:] if kind == "Q4_1" else block[2:]
        low, high = (qs & 0x0F).astype(np.float32), (qs >> 4).astype(np.float32)
        if kind == "Q4_0":
            low, high = low - 8, high - 8
        out.append(np.concatenate([d * low + m, d * high + m]))
    return np.concatenate(out).astype(np.float32)


@pytest.fixture(scope="module")
def quant_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A GGUF holding one (4, 512) tensor per type, and the float values each was made from."""
    import gguf

    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("quant") / "quant.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    sources: dict[str, np.ndarray] = {}
    ggml = _Ggml() if llama_cpp is not None else None
    for name in FLOATS + QUANTIZED:
        values = rng.standard_normal((4, 512)).astype(np.float32)
        sources[name] = values
        kind = gguf.GGMLQuantizationType[name]
        if name == "F32":
            writer.add_tensor(name, values)
        elif name == "F16":
            writer.add_tensor(name, values.astype(np.float16))
        elif name in ("BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1") and ggml is None:
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)  # gguf's own quantizer
        elif ggml is not None:
            block, type_size = gguf.GGML_QUANT_SIZES[kind]
            writer.add_tensor(name, ggml.quantize(values, int(kind), 512 // block * type_size), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, sources


@pytest.mark.parametrize("name", FLOATS + QUANTIZED)
def test_dequantization_matches_reference(quant_file: tuple[Path, dict[str, np.ndarray]], name: str) -> None:
    path, sources = quant_file
    with GGUFFile(path) as gguf_file:
        if name not in gguf_file.tensors:
            pytest.skip(f"{name} blocks are written by llama.cpp's quantizer; llama-cpp-python is not installed")
        info = gguf_file.tensors[name]
        got = gguf_file.read(name)
        raw = np.array(gguf_file.raw(name))
        some_rows = gguf_file.read_rows(name, np.array([3, 0, 2]))
    assert got.shape == (4, 512) and got.dtype == np.float32 and info.shape == (4, 512)
    assert some_rows.dtype == np.float32
    np.testing.assert_array_equal(some_rows, got[[3, 0, 2]])  # rows read alone are the rows of the whole
    source = sources[name]
    if name == "F32":
        np.testing.assert_array_equal(got, source)
    elif name == "F16":
        np.testing.assert_array_equal(got, source.astype(np.float16).astype(np.float32))
    if name in ("Q8_0", "Q4_0", "Q4_1"):
        np.testing.assert_array_equal(got.reshape(-1), _spec_dequantize(raw, name))
    if llama_cpp is not None and name != "F32":  # ggml has no converter for F32: it is already floats
        import gguf

        np.testing.assert_array_equal(got.reshape(-1), _Ggml().dequantize(raw, int(gguf.GGMLQuantizationType[name]), got.size))
    # and the values are the source's within the type's precision
    tolerance = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.03, "Q6_K": 0.06, "Q5_0": 0.12, "Q5_1": 0.12,
                 "Q5_K": 0.12, "Q4_0": 0.25, "Q4_1": 0.25, "Q4_K": 0.25, "Q3_K": 0.5, "Q2_K": 1.0}[name]
    assert np.abs(got - source).max() <= tolerance * np.abs(source).max() + 1e-7


def test_gguf_index_matches_gguf_reader(quant_file: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    """The fast header reader sees the same keys, tensors, shapes and bytes as gguf.GGUFReader."""
    import gguf

    tiny = write_gguf(make_tiny("qwen2", n_layers=1), tmp_path / "tiny.gguf")
    for path in (quant_file[0], tiny):
        reader = gguf.GGUFReader(path)
        with GGUFFile(path) as gguf_file:
            assert len(gguf_file.tensors) == len(reader.tensors)
            for tensor in reader.tensors:
                info = gguf_file.tensors[tensor.name]
                assert info.ggml_type == int(tensor.tensor_type)
                assert info.dims == tuple(int(d) for d in tensor.shape)
                assert np.array_equal(np.asarray(gguf_file.raw(tensor.name)).reshape(-1), np.asarray(tensor.data).view(np.uint8).reshape(-1))
            for key, field in reader.fields.items():
                if key.startswith("GGUF."):
                    continue
                want = field.contents()
                got = gguf_file.array(key) if isinstance(want, list) else gguf_file.get(key)
                assert got == pytest.approx(want) if isinstance(want, float) else got == want, key
    with GGUFFile(default_model_path()) as gguf_file:
        assert len(gguf_file.tensors) == 272
        assert gguf_file.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
        assert len(gguf_file.array("tokenizer.ggml.tokens")) == 49152


def test_embedding_rows_are_read_from_the_file(tmp_path: Path) -> None:
    """A first stage looks its tokens' rows up in the file: the same values as the whole table,
    for repeated and unordered ids, still readable after the reader that opened them closed."""
    from skulk_torch.checkpoint import open_checkpoint

    model = make_tiny("llama", tied=True)
    tokens = np.array([5, 3, 5, 0, 1, 2, model.vocab - 1, 4])
    for path in (write_gguf(model, tmp_path / "tiny.gguf", weight_type="F16"), write_safetensors(model, tmp_path / "model")):
        with open_checkpoint(path) as reader:
            table = reader.global_tensor("embed")
            assert table is not None
            rows = reader.embedding_rows()
        try:
            got = rows.lookup(tokens)
            assert got.dtype == np.float32 and got.shape == (len(tokens), model.hidden)
            np.testing.assert_array_equal(got, table.numpy()[tokens])
        finally:
            rows.close()
        with pytest.raises(ModelError, match="closed"):
            rows.lookup(tokens)


def test_rotary_layout_is_the_converters() -> None:
    values = np.arange(8 * 3 * 5, dtype=np.float32).reshape(24, 5)
    np.testing.assert_array_equal(interleave_rotary_rows(values, 3), permute_rows(values, 3))
    assert interleave_rotary_rows(np.arange(8.0), 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


# -- tiny models ---------------------------------------------------------------------------------


def _files(path: Path) -> tuple[ModelCard, ModelFiles]:
    config = read_config(path)
    fmt = "safetensors" if path.is_dir() else "gguf"
    card = ModelCard(
        id=path.stem, architecture=config.architecture, n_layers=config.n_layers, hidden_size=config.hidden_size,
        n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, context_length=config.context_length,
        vocab_size=config.vocab_size, bytes_on_disk=1, source=ModelSource(kind="local", path=str(path)), format=fmt,
    )
    return card, ModelFiles(card.id, fmt, path)


def _load(path: Path, shard: ShardRange | None = None, **options: object) -> Any:
    card, files = _files(path)
    # On the CPU also where a GPU is (test_torch_cuda.py covers that): these tests pin CPU layouts.
    values: dict[str, object] = {"context_length": 64, "max_sequences": 3, "threads": 1, "device": "cpu"}
    values.update(options)
    return anyio.run(TorchBackend().load, card, files, shard or ShardRange.whole(card.n_layers), EngineOptions(**values))  # type: ignore[arg-type]


def _logits_by_chunks(engine: object, tokens: Sequence[int], cuts: Sequence[int]) -> list[np.ndarray]:
    """Feed ``tokens`` in chunks ending at ``cuts``; the last-position logits after each chunk."""
    out, start = [], 0
    for end in cuts:
        (result,) = anyio.run(engine.step, [SequenceChunk("r", start, tokens[start:end])])  # type: ignore[attr-defined]
        out.append(result.logits)
        start = end
    anyio.run(engine.release, "r")  # type: ignore[attr-defined]
    return out


TOKENS = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 257, 10, 65]
CUTS = [5, 9, 10, 11, 16]  # a prefill, a chunk after it (masked against the cache), decodes, a tail


def _check_against_reference(engine: object, model: TinyModel, tolerance: float = 2e-4) -> None:
    got = _logits_by_chunks(engine, TOKENS, CUTS)
    for end, logits in zip(CUTS, got):
        want = reference_logits(model, TOKENS[:end])[-1]
        assert logits.dtype == np.float32 and logits.shape == (model.vocab,)
        np.testing.assert_allclose(logits, want, atol=tolerance * np.abs(want).max(), rtol=0)


def _cpu_matmul(name: str) -> TorchSettings:
    """The settings that multiply with ``name`` (skips ``onednn`` where this torch lacks it)."""
    from skulk_torch.model import onednn_matmul_available

    if name == "onednn" and not onednn_matmul_available():
        pytest.skip("this torch cannot pack matrices for oneDNN here")
    return TorchSettings(cpu_matmul=name)


@pytest.mark.parametrize("cpu_matmul", ["onednn", "blas"])
@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_safetensors_model_matches_reference(tmp_path: Path, arch: str, tied: bool, cpu_matmul: str) -> None:
    model = make_tiny(arch, tied=tied)
    engine = _load(write_safetensors(model, tmp_path / "model"), settings=_cpu_matmul(cpu_matmul))
    try:
        assert engine.layout == {"onednn": "onednn", "blas": "transposed"}[cpu_matmul]
        assert isinstance(engine.tokenizer, Tokenizer)
        assert engine.tokenizer.encode("Hi<|im_end|>") == [72, 105, 258]
        assert engine.tokenizer.eos_token_ids == {256, 258} and engine.tokenizer.is_control(258)  # and <|endoftext|>
        assert engine.tokenizer.token_bytes(32) == b" "
        _check_against_reference(engine, model)
    finally:
        anyio.run(engine.close)


@pytest.mark.parametrize("cpu_matmul", ["onednn", "blas"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_model_matches_reference(tmp_path: Path, arch: str, cpu_matmul: str) -> None:
    """The GGUF of the same weights (Q/K permuted for llama) gives the reference's logits."""
    model = make_tiny(arch)
    engine = _load(write_gguf(model, tmp_path / "tiny.gguf"), settings=_cpu_matmul(cpu_matmul))
    try:
        _check_against_reference(engine, model)
    finally:
        anyio.run(engine.close)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_matches_reference_roughly(tmp_path: Path, dtype: str) -> None:
    """The half-precision path (a GPU's default; rotary by hand instead of complex numbers)."""
    model = make_tiny("qwen2")
    engine = _load(write_gguf(model, tmp_path / "tiny.gguf"), settings=TorchSettings(dtype=dtype))
    try:
        assert engine.dtype == getattr(__import__("torch"), dtype)
        _check_against_reference(engine, model, tolerance=0.03)
    finally:
        anyio.run(engine.close)


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_int8_matrices_match_reference_roughly(tmp_path: Path, arch: str, tied: bool) -> None:
    """torch.quantize int8: every matrix as 8-bit integers with a scale per row, a quarter of the
    float32 bytes; the logits stay within 5 % of the largest (half precision: 3 %)."""
    model = make_tiny(arch, tied=tied)
    path = write_gguf(model, tmp_path / "tiny.gguf")
    engine = _load(path, settings=TorchSettings(quantize="int8"))
    exact = _load(path, settings=_cpu_matmul("blas"))
    try:
        assert engine.layout == "int8" and engine.dtype == __import__("torch").float32  # activations, cache
        _check_against_reference(engine, model, tolerance=0.05)
        held, full = engine.parameter_bytes(), exact.parameter_bytes()
        # Rows of qkv (2 kv heads of hidden / 4), out, gate_up (ffn 96) and down, in 3 blocks: a
        # 2-byte scale each. qwen2's Q/K/V biases stay float32.
        kv = 2 * model.hidden // 4
        rows = 3 * ((model.hidden + 2 * kv) + model.hidden + 2 * 96 + model.hidden)
        bias = 3 * (model.hidden + 2 * kv) * 4 if arch == "qwen2" else 0
        assert held["blocks"] == (full["blocks"] - bias) // 4 + bias + 2 * rows
        assert held["head"] == (full["head"] - model.hidden * 4) // 4 + model.hidden * 4 + 2 * model.vocab  # the norm stays float32
    finally:
        anyio.run(engine.close)
        anyio.run(exact.close)


def test_int4_matrices_multiply_as_their_dequantized_values() -> None:
    """torch.quantize int4: groups of 32 input features, each with a scale and an offset; a matrix
    whose rows are not a multiple of 16 is padded and its product cut back."""
    import torch

    from skulk_torch.model import Int4Matrix

    torch.manual_seed(0)
    weight, x = torch.randn(262, 64) * 0.2, torch.randn(5, 64)
    matrix = Int4Matrix.quantize(weight)
    groups = weight.view(262, 2, 32)
    low, high = groups.amin(-1), groups.amax(-1)
    step = (high - low) / 15
    dequantized = (torch.round((groups - low[..., None]) / step[..., None]) * step[..., None] + low[..., None]).view(262, 64)
    got = matrix.multiply(x.to(torch.bfloat16)).float()
    want = x @ dequantized.T
    assert got.shape == (5, 262) and matrix.rows == 262 and matrix.scales_zeros.shape == (2, 272, 2)
    assert (got - want).abs().max() < 0.01 * want.abs().max()  # bfloat16 inputs and scales
    assert (got - x @ weight.T).abs().max() < 0.15 * want.abs().max()  # 4 bits: about 9 % here


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_stages_chain_to_the_whole(tmp_path: Path, quantize: str) -> None:
    """Stages pass float32 activations: a split quantized model computes what the whole one does."""
    model = make_tiny("llama", n_layers=4, tied=True)
    path = write_gguf(model, tmp_path / "tiny.gguf")
    int8 = TorchSettings(quantize=quantize)
    stages = [_load(path, ShardRange(a, b, 4), settings=int8) for a, b in ((0, 1), (1, 3), (3, 4))]
    whole = _load(path, settings=int8)
    try:
        (out,) = anyio.run(LocalChain(stages).step, [SequenceChunk("r", 0, TOKENS)])
        (want,) = anyio.run(whole.step, [SequenceChunk("r", 0, TOKENS)])
        np.testing.assert_allclose(out.logits, want.logits, atol=1e-5, rtol=0)
    finally:
        for engine in (*stages, whole):
            anyio.run(engine.close)


def test_cpu_stages_step_on_the_process_compute_thread(tmp_path: Path) -> None:
    """Every CPU stage of a process steps on skulk_core.compute_thread() (one OpenMP team for all:
    a second thread that once ran a torch product took a 2-thread step from 8 to 14 ms here), and
    the load's own thread is gone once it has loaded."""
    import threading

    from skulk_core import compute_thread

    path = write_gguf(make_tiny("llama", n_layers=2), tmp_path / "tiny.gguf")
    stages = [_load(path, ShardRange(0, 1, 2)), _load(path, ShardRange(1, 2, 2))]
    try:
        assert all(stage._thread is compute_thread() for stage in stages)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("torch load")]
        (out,) = anyio.run(LocalChain(stages).step, [SequenceChunk("r", 0, TOKENS[:4])])
        assert out.logits is not None
    finally:
        for stage in stages:
            anyio.run(stage.close)
    assert not compute_thread().closed  # closing an engine leaves the shared thread running
    assert anyio.run(compute_thread().run, threading.current_thread).name == "skulk compute"


def test_step_blocking_is_the_same_step_from_a_plain_thread(tmp_path: Path) -> None:
    """A direct stage link steps a stage from its own thread: step_blocking gives what step gives,
    computed on the compute thread, and a closed engine refuses it clearly."""
    import threading

    from skulk_core import BlockingStepEngine, BackendError

    path = write_gguf(make_tiny("llama", n_layers=2), tmp_path / "tiny.gguf")
    stages = [_load(path, ShardRange(0, 1, 2)), _load(path, ShardRange(1, 2, 2))]
    try:
        assert all(isinstance(stage, BlockingStepEngine) for stage in stages)
        (hidden,) = anyio.run(stages[0].step, [SequenceChunk("a", 0, TOKENS[:4])])
        (expected,) = anyio.run(stages[1].step, [SequenceChunk("a", 0, hidden=hidden.hidden)])
        outputs: list[object] = []
        names: list[str] = []
        original = stages[1]._step

        def spy(batch):
            names.append(threading.current_thread().name)
            return original(batch)

        stages[1]._step = spy
        caller = threading.Thread(target=lambda: outputs.extend(stages[1].step_blocking([SequenceChunk("b", 0, hidden=hidden.hidden)])))
        caller.start()
        caller.join(30)
        assert names == ["skulk compute"]
        np.testing.assert_allclose(outputs[0].logits, expected.logits, rtol=1e-5, atol=1e-5)  # type: ignore[attr-defined]
        assert stages[1].step_blocking([]) == []
    finally:
        for stage in stages:
            anyio.run(stage.close)
    with pytest.raises(BackendError, match="closed"):
        stages[1].step_blocking([SequenceChunk("c", 0, hidden=hidden.hidden)])


def test_step_and_draw_draws_on_the_compute_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-model torch engine is a DrawingEngine: a request with a sampler gets the token drawn
    from its logits on the compute thread; one without gets its logits."""
    import threading

    from skulk_core import DrawingEngine, Sampler, SamplingParams

    path = write_gguf(make_tiny("llama", n_layers=2), tmp_path / "tiny.gguf")
    whole = _load(path)
    drawn_on: list[str] = []
    draw = Sampler.draw

    def spy(self: Sampler, logits: np.ndarray) -> object:
        drawn_on.append(threading.current_thread().name)
        return draw(self, logits)

    monkeypatch.setattr(Sampler, "draw", spy)
    try:
        assert isinstance(whole, DrawingEngine)
        batch = [SequenceChunk("drawn", 0, TOKENS[:4]), SequenceChunk("plain", 0, TOKENS[:4])]
        drawn, plain = anyio.run(whole.step_and_draw, batch, {"drawn": Sampler(SamplingParams(temperature=0.0))})
        assert drawn.sampled is not None and drawn.logits is None and plain.logits is not None
        assert drawn.sampled.token_id == int(np.argmax(plain.logits))
        assert drawn_on == ["skulk compute"]
        assert anyio.run(whole.step_and_draw, [], {}) == []
    finally:
        anyio.run(whole.close)


def test_int8_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    import torch

    from skulk_torch import model as model_module

    with pytest.raises(ValueError, match="torch.quantize must be one of none, int8, int4"):
        TorchSettings(quantize="int2")
    with pytest.raises(BackendError, match="int8 runs on a CPU, and this stage is on cuda"):
        model_module.choose_layout(torch.device("cuda"), torch.bfloat16, "auto", "int8")
    # torch's kernel reads input features in groups of 16 (40 would give garbage, 100 a crash)
    path = write_gguf(make_tiny("llama", n_layers=1, hidden=40, n_heads=4, n_kv_heads=2), tmp_path / "odd.gguf")
    with pytest.raises(BackendError, match="multiples of 16; this model has one of 40"):
        _load(path, settings=TorchSettings(quantize="int8"))
    with pytest.raises(BackendError, match="int4 needs matrices whose input features come in multiples of 32; this model has one of 40"):
        _load(path, settings=TorchSettings(quantize="int4"))
    with pytest.raises(BackendError, match="int4 runs on a CPU"):
        model_module.choose_layout(torch.device("cuda"), torch.bfloat16, "auto", "int4")


def test_placement_sizes_int8_stages_as_they_load() -> None:
    """The master's torch section reaches the builtin placement: with quantize int8 the default
    model fits on one node that float32 needs two of."""
    from skulk_core import NodeResources, NodeView, PlacementRequest
    from skulk_core.builtin.placement import SAFETY_MARGIN

    plugins = make_plugin_manager(PluginSelection(autoload=False, plugins=("torch",)))
    card = ModelCard.from_gguf(default_model_path())
    request = PlacementRequest(card.id, backend="torch", context_length=1024, max_sequences=2)
    backend = plugins.backends().backend("torch")

    def need(settings: TorchSettings) -> int:
        options = EngineOptions(context_length=1024, max_sequences=2, settings=settings)
        return backend.estimate_memory(card, ShardRange.whole(card.n_layers), options)

    int8, float32 = TorchSettings(quantize="int8"), TorchSettings(dtype="float32")
    assert need(int8) < need(float32) - 350 * 2**20  # the weights: 538 MB -> 135 MB
    limit = int((need(int8) + need(float32)) / 2 / (1 - SAFETY_MARGIN))
    nodes = [
        NodeView(name, name, NodeResources(memory_total=8 * 2**30, memory_available=8 * 2**30, cpu_count=2, memory_limit=limit, backends=("torch",)))
        for name in ("a", "b")
    ]
    assert len(plugins.place(card, nodes, request, {"torch": float32}).stages) == 2
    assert len(plugins.place(card, nodes, request, {"torch": int8}).stages) == 1


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reference_is_what_llama_cpp_computes(tmp_path: Path, arch: str) -> None:
    """llama.cpp on the tiny GGUF computes the reference's logits: the reference is the real model."""
    model = make_tiny(arch)
    path = write_gguf(model, tmp_path / "tiny.gguf")
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False, type_k=0, type_v=0
    )  # type 0: an F32 KV cache
    try:
        llm.eval(TOKENS)
        want = reference_logits(model, TOKENS)
        np.testing.assert_allclose(np.asarray(llm.scores[: len(TOKENS)]), want, atol=1e-3 * np.abs(want).max(), rtol=0)
    finally:
        llm.close()


def test_stages_of_a_tiny_model_chain_to_the_whole(tmp_path: Path) -> None:
    model = make_tiny("llama", n_layers=4, tied=True)
    path = write_gguf(model, tmp_path / "tiny.gguf", weight_type="F16")
    stages = [_load(path, ShardRange(a, b, 4)) for a, b in ((0, 1), (1, 3), (3, 4))]
    try:
        assert stages[0].tokenizer is not None and stages[1].tokenizer is None
        assert stages[1].parameter_bytes()["embed"] == 0 and stages[1].parameter_bytes()["head"] == 0
        assert stages[2].parameter_bytes()["head"] > 0  # the tied embedding, as the head
        chain = LocalChain(stages)
        (out,) = anyio.run(chain.step, [SequenceChunk("r", 0, TOKENS)])
        whole = _load(path)
        try:
            (want,) = anyio.run(whole.step, [SequenceChunk("r", 0, TOKENS)])
        finally:
            anyio.run(whole.close)
        np.testing.assert_allclose(out.logits, want.logits, atol=1e-5, rtol=0)
        (middle,) = anyio.run(stages[0].step, [SequenceChunk("s", 0, TOKENS[:3])])
        assert middle.logits is None and middle.hidden is not None
        assert middle.hidden.dtype == "float32" and middle.hidden.shape == (3, model.hidden)
    finally:
        for stage in stages:
            anyio.run(stage.close)


def test_cpu_matmul_chooses_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from skulk_torch import model as model_module

    with pytest.raises(ValueError, match="torch.cpu_matmul must be one of auto, onednn, blas"):
        TorchSettings(cpu_matmul="mkl")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert model_module.choose_layout(cpu, torch.float32, "blas") == "transposed"
    assert model_module.choose_layout(cpu, torch.bfloat16, "onednn") == "plain"  # half precision: never packed
    assert model_module.choose_layout(cuda, torch.float32, "auto") == "plain"
    monkeypatch.setattr(model_module, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(model_module, "_onednn_works", False)  # a torch without oneDNN's matmul
    assert model_module.choose_layout(cpu, torch.float32, "auto") == "transposed"
    with pytest.raises(BackendError, match="cannot pack float32 matrices for oneDNN"):
        model_module.choose_layout(cpu, torch.float32, "onednn")
    monkeypatch.setattr(model_module, "_onednn_works", True)
    assert model_module.choose_layout(cpu, torch.float32, "auto") == "onednn"
    monkeypatch.setattr(model_module, "cpu_vendor", lambda: "GenuineIntel")  # MKL's own kernels
    assert model_module.choose_layout(cpu, torch.float32, "auto") == "transposed"
    assert model_module.choose_layout(cpu, torch.float32, "onednn") == "onednn"


def test_limits_and_errors(tmp_path: Path) -> None:
    model = make_tiny("llama", n_layers=1)
    engine = _load(write_gguf(model, tmp_path / "tiny.gguf"), context_length=16, max_sequences=2)
    try:
        with pytest.raises(RequestError, match="maximum context length is 16"):
            anyio.run(engine.step, [SequenceChunk("a", 0, list(range(17)))])
        with pytest.raises(RequestError, match="outside the vocabulary"):
            anyio.run(engine.step, [SequenceChunk("a", 0, [5, 100000])])
        assert engine.live_sequences == 0  # a refused step leaves nothing behind
        anyio.run(engine.step, [SequenceChunk("a", 0, [1, 2]), SequenceChunk("b", 0, [3])])
        with pytest.raises(BackendError, match="at most 2 sequences"):
            anyio.run(engine.step, [SequenceChunk("c", 0, [1])])
        with pytest.raises(BackendError, match="starts at position 5"):
            anyio.run(engine.step, [SequenceChunk("a", 5, [1])])
        with pytest.raises(BackendError, match="twice"):
            anyio.run(engine.step, [SequenceChunk("a", 2, [1]), SequenceChunk("a", 3, [1])])
        # Rewinding a sequence (position before its end) overwrites the rest of its cache.
        (again,) = anyio.run(engine.step, [SequenceChunk("a", 1, [7])])
        anyio.run(engine.release, "b")
        (fresh,) = anyio.run(engine.step, [SequenceChunk("b", 0, [1, 7])])
        np.testing.assert_allclose(again.logits, fresh.logits, atol=1e-5)  # one decode, one prefill kernel
        with pytest.raises(BackendError, match="hidden states"):
            stage = _load(write_gguf(make_tiny("llama", n_layers=2), tmp_path / "two.gguf"), ShardRange(1, 2, 2))
            try:
                anyio.run(stage.step, [SequenceChunk("a", 0, [1])])
            finally:
                anyio.run(stage.close)
    finally:
        anyio.run(engine.close)
    with pytest.raises(BackendError, match="closed"):
        anyio.run(engine.step, [SequenceChunk("a", 0, [1])])


def test_load_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    path = write_gguf(make_tiny("llama", n_layers=2), tmp_path / "tiny.gguf")
    card, files = _files(path)
    backend = TorchBackend()
    with pytest.raises(BackendError, match="3-layer model, but tiny has 2"):
        anyio.run(backend.load, card, files, ShardRange(0, 1, 3), EngineOptions(context_length=8))
    with pytest.raises(BackendError, match="CUDA device"):  # none here, or not that many
        anyio.run(backend.load, card, files, ShardRange.whole(2), EngineOptions(context_length=8, device="cuda:99"))
    with pytest.raises(BackendError, match="CUDA device"):  # the same, named in the config section
        anyio.run(backend.load, card, files, ShardRange.whole(2), EngineOptions(context_length=8, settings=TorchSettings(device="cuda:99")))
    with pytest.raises(BackendError, match="gemma"):
        anyio.run(backend.load, _card("gemma"), files, ShardRange.whole(30), EngineOptions(context_length=8))


@needs_llama_cpp
def test_tokenizers_route_matches_llama_cpp_on_the_default_pre_tokenizer(tmp_path: Path) -> None:
    """skulk_core.testing's synthetic GGUF uses llama.cpp's "default" BPE pre-tokenizer."""
    from skulk_core.testing import write_synthetic_gguf

    from skulk_torch.tokenizer import load_tokenizer

    path = write_synthetic_gguf(tmp_path / "synthetic.gguf", n_layers=1, hidden=32, ffn=64)
    exact, built = load_tokenizer(path, "llamacpp"), load_tokenizer(path, "tokenizers")
    assert built.eos_token_ids == exact.eos_token_ids and built.bos_token_id == exact.bos_token_id
    for text in ["Hello, world!!", "a+b<=c^d|e ~f", "1234567 apples; the 42nd", "<|im_start|>user\nhi<|im_end|>", "  x\n\n"]:
        for parse_special in (True, False):
            assert built.encode(text, parse_special=parse_special) == exact.encode(text, parse_special=parse_special), text
    assert all(built.token_bytes(t) == exact.token_bytes(t) for t in range(exact.vocab_size))


# -- KV slots and static-shape decode steps (the CUDA-graph path, run eagerly here) --------------


def _slotted(engine: Any) -> Any:
    """``engine`` with its caches in a pool and its decode steps through :class:`DecodeSlots`,
    as on a GPU, but run eagerly (no graph capture)."""
    from skulk_torch.graphs import DecodeSlots

    engine._slots = DecodeSlots(engine.model, engine.max_sequences, engine.context_length, capture=False)
    return engine


def test_decode_slots_give_the_forward_passes_logits(tmp_path: Path) -> None:
    """Prefills, mixed steps and decode steps of 1 to 3 sequences (padded to 4 rows), a release
    and a reuse of its slot, and a sequence crossing from one attention span to the next."""
    model = make_tiny("qwen2", n_layers=2)
    path = write_gguf(model, tmp_path / "tiny.gguf")
    eager = _load(path, context_length=320, max_sequences=4)
    slotted = _slotted(_load(path, context_length=320, max_sequences=4))
    rng = np.random.default_rng(3)
    prompts = {rid: [int(t) for t in rng.integers(0, 256, n)] for rid, n in (("a", 5), ("b", 250), ("c", 3), ("d", 7))}
    positions: dict[str, int] = {}
    last: dict[str, int] = {}

    def step(chunks: list[tuple[str, Sequence[int]]]) -> None:
        batch = [SequenceChunk(rid, positions.get(rid, 0), tuple(tokens)) for rid, tokens in chunks]
        want = anyio.run(eager.step, batch)
        got = anyio.run(slotted.step, batch)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g.logits, w.logits, atol=1e-4 * np.abs(w.logits).max(), rtol=0)
        for (rid, tokens), w in zip(chunks, want):
            positions[rid] = positions.get(rid, 0) + len(tokens)
            last[rid] = int(np.argmax(w.logits))

    try:
        step([("a", prompts["a"]), ("b", prompts["b"])])  # prefills: the ordinary forward pass
        for _ in range(8):  # b crosses from the 256-position span to the 320 one
            step([("a", [last["a"]]), ("b", [last["b"]])])
        step([("a", [last["a"]]), ("c", prompts["c"])])  # a mixed step
        for _ in range(3):
            step([("a", [last["a"]]), ("b", [last["b"]]), ("c", [last["c"]])])  # 3 rows, padded to 4
        anyio.run(eager.release, "b")
        anyio.run(slotted.release, "b")
        step([("d", prompts["d"])])  # takes b's slot
        for _ in range(3):
            step([("c", [last["c"]]), ("d", [last["d"]]), ("a", [last["a"]])])
        assert slotted.live_sequences == 3
        # A slot always holds the whole context: three slots of 320 positions, 2 layers, K and V.
        assert slotted.cache_bytes() == 3 * 2 * 2 * model.n_kv_heads * 320 * model.head_dim * 4
        for rid in "acd":
            anyio.run(slotted.release, rid)
        assert sorted(slotted._slots._free) == [0, 1, 2, 3]
        # (rows, span) of the static-shape steps that ran: 2 rows, then 3 padded to 4, each span
        assert set(slotted._slots._steps) == {(2, 256), (2, 320), (4, 320), (4, 256)}
    finally:
        for engine in (eager, slotted):
            anyio.run(engine.close)


def test_decode_slots_chain_stages(tmp_path: Path) -> None:
    """A first stage's decode rows go to the next stage as activations, as from the forward pass."""
    model = make_tiny("llama", n_layers=3, tied=True)
    path = write_gguf(model, tmp_path / "tiny.gguf")
    whole = _load(path)
    chain = LocalChain([_slotted(_load(path, ShardRange(0, 1, 3))), _slotted(_load(path, ShardRange(1, 3, 3)))])
    try:
        tokens = list(TOKENS[:6])
        (want,) = anyio.run(whole.step, [SequenceChunk("r", 0, tuple(tokens))])
        (got,) = anyio.run(chain.step, [SequenceChunk("r", 0, tuple(tokens))])
        for position in range(6, 12):
            token = int(np.argmax(want.logits))
            np.testing.assert_allclose(got.logits, want.logits, atol=1e-4 * np.abs(want.logits).max(), rtol=0)
            (want,) = anyio.run(whole.step, [SequenceChunk("r", position, (token,))])
            (got,) = anyio.run(chain.step, [SequenceChunk("r", position, (token,))])
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-4 * np.abs(want.logits).max(), rtol=0)
    finally:
        anyio.run(whole.close)
        anyio.run(chain.close)


def test_a_kv_pool_the_gpu_cannot_hold_fails_the_load_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where decode graphs would pool the caches on a GPU that is too small, the load says what to
    change (the GPU itself is faked: the stage is on the CPU, told it is on cuda)."""
    import torch

    from skulk_torch import engine as engine_module

    model = make_tiny("llama", n_layers=2)
    engine = _load(write_gguf(model, tmp_path / "tiny.gguf"))
    try:
        stage = engine.model
        monkeypatch.setattr(stage, "device", torch.device("cuda"))

        def too_big(*_: object, **__: object) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

        monkeypatch.setattr(engine_module, "DecodeSlots", too_big)
        options = EngineOptions(context_length=4096, max_sequences=15)
        # 2 layers x K and V x 16 slots (one scratch) x 2 kv heads x 16 x 4096 positions x 4 bytes = 1/32 GiB
        with pytest.raises(BackendError, match=r"15 sequences of 4096 positions \(0\.03 GiB\) does not fit on cuda.*torch.cuda_graphs: false"):
            engine_module.decode_slots(stage, options)
        assert engine_module.decode_slots(stage, EngineOptions(context_length=64, settings=TorchSettings(cuda_graphs=False))) is None
        monkeypatch.setattr(stage, "device", torch.device("cpu"))
        assert engine_module.decode_slots(stage, options) is None
    finally:
        anyio.run(engine.close)


# -- where a stage lives, for placement ----------------------------------------------------------


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake ``nvidia-smi`` (no GPU here) reporting two GPUs with 1000 and 2000 MiB free."""
    from skulk_torch import backend as backend_module

    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\nprintf '0, GPU-aaaa-1111, 1000\\n1, GPU-bbbb-2222, 2000\\n'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(backend_module, "_gpu_memory", None)


def test_a_gpu_stage_reports_the_gpus_free_memory(fake_nvidia_smi: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from skulk_core import BackendSite

    from skulk_torch import backend as backend_module

    mib = 2**20
    backend = TorchBackend()
    monkeypatch.setattr(backend, "capabilities", attrs.evolve(backend.capabilities, devices=("cuda", "cpu")))
    assert backend.memory_site(TorchSettings(device="cuda:1")) == BackendSite("cuda:1", 2000 * mib)
    assert backend.memory_site({"device": "cuda:1"}) == BackendSite("cuda:1", 2000 * mib)  # the section as a mapping
    assert backend.memory_site(None) == BackendSite("cuda", 1000 * mib)  # auto: the first GPU
    assert backend.memory_site(TorchSettings(device="cpu")) is None
    assert backend.memory_site(TorchSettings(device="cuda:2")) is None  # not there: sized by system memory
    for visible, free in (("1", 2000), ("GPU-aaaa", 1000), ("1,0", 2000)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        monkeypatch.setattr(backend_module, "_gpu_memory", None)
        assert backend.memory_site(TorchSettings(device="cuda")) == BackendSite("cuda", free * mib), visible
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(backend_module, "_gpu_memory", None)
    assert backend.memory_site(TorchSettings(device="cuda")) is None
    # no GPU seen, or no nvidia-smi: the stages are sized by system memory
    monkeypatch.setattr(backend, "capabilities", attrs.evolve(backend.capabilities, devices=("cpu",)))
    assert backend.memory_site(None) is None
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(backend_module, "_gpu_memory", None)
    assert backend.memory_site(TorchSettings(device="cuda")) is None


def test_a_stale_gpu_reading_is_refreshed_off_the_callers_thread(fake_nvidia_smi: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from skulk_torch import backend as backend_module

    monkeypatch.setattr(backend_module, "_gpu_memory", (time.monotonic() - 60, {0: 1}))  # a minute old
    assert backend_module.gpu_free_memory() == {0: 1}  # answered at once, from the old reading
    deadline = time.monotonic() + 10
    while backend_module._gpu_memory[1] == {0: 1} and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.01)
    assert backend_module.gpu_free_memory() == {0: 1000 * 2**20, 1: 2000 * 2**20}


HUGE_PAGES_CHILD = r"""
import os, sys
import anyio
import skulk_torch  # before torch, as a node imports it
from skulk_core import EngineOptions, ModelCard, ModelFiles, ShardRange, default_model_path
from skulk_torch import TorchBackend
path = default_model_path()
card = ModelCard.from_gguf(path)
engine = anyio.run(TorchBackend().load, card, ModelFiles(card.id, "gguf", path), ShardRange(24, 30, 30), EngineOptions(context_length=256, max_sequences=1, threads=1))
huge = next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:"))
print(os.environ["THP_MEM_ALLOC_ENABLE"], huge)
"""


@pytest.mark.parametrize("asked", [None, "0"])
def test_the_weights_sit_in_huge_pages_unless_the_environment_says_no(asked: str | None) -> None:
    """Importing skulk_torch turns on torch's huge-page allocation before torch is imported (a
    decode step then walks fewer page tables); THP_MEM_ALLOC_ENABLE set by the user wins."""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("this kernel has no transparent huge pages")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if asked is not None:
        env["THP_MEM_ALLOC_ENABLE"] = asked
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    setting, huge_kib = out.stdout.split()
    if asked is None:
        assert setting == "1" and int(huge_kib) >= 16 * 1024  # the stage's ~40 MB of MLP matrices and its head, at least
    elif "[madvise]" in mode.read_text():
        assert setting == "0" and int(huge_kib) == 0
