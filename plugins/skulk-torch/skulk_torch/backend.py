"""The torch backend: what placement reads about it, and how it loads a stage.

Constructing :class:`TorchBackend` is cheap: the devices it reports are found without importing
torch (a CUDA build of torch and an NVIDIA driver, or Apple silicon); torch, numpy's dequantizers
and the tokenizer are imported by :meth:`TorchBackend.load`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import attrs

from skulk_core import (
    BackendCapabilities,
    BackendError,
    BackendSite,
    Engine,
    EngineOptions,
    ModelCard,
    ModelError,
    ModelFiles,
    ShardRange,
    Tokenizer,
    run_on_own_thread,
    section_settings,
)

from skulk_torch.checkpoint import ARCHITECTURES, ModelConfig, read_config
from skulk_torch.settings import TorchSettings

if TYPE_CHECKING:
    import torch

    from skulk_torch.model import StageModel

log = logging.getLogger("skulk.torch")

# Memory a loaded stage holds besides weights, KV cache and activations, measured on a CPU: the
# torch runtime (its libraries and allocator, about 250 MiB resident after the first matrix
# products) plus slack for the allocator's caching.
RUNTIME_OVERHEAD_BYTES = 320 * 1024**2
# A block's cost beyond its matmuls, for placement (see BackendCapabilities.block_overhead):
# SmolLM2-135M on a CPU thread, 2 sequences a step, interleaved medians: a block 1.74-1.83 ms, the
# final norm and head 10.4-10.5 ms, so the head is worth 6 blocks where its MACs are worth 8.
BLOCK_OVERHEAD = 1 / 3
# The first stage's tokenizer: its vocabulary, pieces and (llama.cpp route) native tables; the
# default model's 49k-token vocabulary measured 53 MiB (llama.cpp) and 84 MiB (tokenizers).
TOKENIZER_BYTES = 128 * 1024**2
# Rows one step may hold (the core's prefill budget plus decodes), for the activation estimate.
STEP_ROWS = 512
# Bits per weight of GGUF file types, for sizing a model whose file this node cannot read.
_BITS_PER_WEIGHT = {
    "ALL_F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_1": 6.0, "Q5_0": 5.5,
    "Q5_K_M": 5.5, "Q5_K_S": 5.5, "Q4_1": 5.0, "Q4_0": 4.5, "Q4_K_M": 4.5, "Q4_K_S": 4.5,
    "Q3_K_L": 3.4375, "Q3_K_M": 3.4375, "Q3_K_S": 3.4375, "Q2_K": 2.625,
}


class TorchBackend:
    """Runs a layer range of a llama-family model in PyTorch on the CPU, CUDA or MPS."""

    name = "torch"

    def __init__(self) -> None:
        self.capabilities = BackendCapabilities(
            formats={"gguf", "safetensors"},
            layer_ranges=True,
            devices=detect_devices(),
            batching=True,
            architectures=ARCHITECTURES,
            block_overhead=BLOCK_OVERHEAD,
        )

    def supports(self, card: ModelCard) -> str | None:
        if card.format not in self.capabilities.formats:
            return f"the torch backend reads GGUF and safetensors models, and {card.id} is {card.format}"
        if card.architecture not in ARCHITECTURES:
            return (
                f"{card.id} is a {card.architecture} model; the torch backend runs the llama block shape "
                f"({', '.join(sorted(ARCHITECTURES))}). Use the llamacpp backend for it"
            )
        return None

    def estimate_memory(self, card: ModelCard, shard: ShardRange, options: EngineOptions) -> int:
        """Bytes the loaded stage will hold:

        - weights: the stage's blocks (parameters of a llama block, from the model's shape, times
          its layers), plus the final norm and head on the last (the embedding, when the head is
          tied to it), at the element size the stage computes in (4 bytes on a CPU, 2 on a GPU),
          or one byte and a row's scale with ``quantize: int8``, half a byte and a group's scale
          and offset with ``int4``.
          The first stage holds no embedding: it reads its tokens' rows from the model's mapped
          file, whose pages the OS shares and can drop;
        - KV cache: ``2 * layers * kv_heads * head_dim * element size`` per position, for
          ``context_length * max_sequences`` positions (the most the engine holds; it grows a
          request's cache as the request grows; on a CUDA GPU with ``cuda_graphs`` the pool holds
          them all from the load, plus one scratch slot);
        - activations of a step of ``STEP_ROWS`` rows (MLP and attention intermediates, one head's
          scores against the whole context per query head), rotary tables, the tokenizer on the
          first stage, and ``RUNTIME_OVERHEAD_BYTES`` for the torch runtime.

        The shape is read from the model's own file when this node can read it (the GGUF header or
        config.json, milliseconds); otherwise it is estimated from the card (see
        :func:`config_from_card`).
        """
        config = _shape_for(card)
        settings = options.settings_as(TorchSettings, "torch")
        device = options.device or _setting_device(settings) or self.capabilities.devices[0]
        element = 4 if resolve_dtype_name(settings.dtype, device) == "float32" else 2
        layers = shard.layer_count
        params = config.layer_params() * layers
        embedding = config.vocab_size * config.hidden_size
        if shard.is_last:
            params += config.hidden_size + embedding  # the final norm and the head (the embedding, when tied)
        weights = params * element
        if settings.quantize == "int8":  # a byte a weight, and a 2-byte scale per row of at least hidden_size
            weights = params + 2 * (params // config.hidden_size)
        elif settings.quantize == "int4":  # half a byte a weight, and a 2-byte scale and offset per 32
            weights = params // 2 + 4 * (params // 32)
        # On a GPU with decode graphs the caches are one pool, allocated at load, with a scratch slot.
        slots = options.max_sequences + (1 if device.startswith("cuda") and settings.cuda_graphs else 0)
        kv = 2 * layers * config.kv_size * element * options.context_length * slots
        rows = STEP_ROWS
        activations = rows * (6 * config.hidden_size + config.q_size + 2 * config.kv_size + 3 * config.ffn_size) * element
        activations += config.n_heads * rows * options.context_length * element
        rotary = 2 * options.context_length * config.head_dim * element
        tokenizer = TOKENIZER_BYTES if shard.is_first else 0
        return weights + kv + activations + rotary + tokenizer + RUNTIME_OVERHEAD_BYTES

    def memory_site(self, settings: object | None) -> BackendSite | None:
        """Where this node's stages would live when not in system memory: the CUDA GPU that the
        ``device`` setting names (or the first, for ``auto`` where there is one), with its free
        memory as ``nvidia-smi`` reports it. None on a CPU or Apple's MPS (unified memory), and
        where the GPU's memory cannot be read."""
        chosen = section_settings(settings, TorchSettings, "torch").device
        if chosen == "auto":
            chosen = "cuda" if "cuda" in self.capabilities.devices else "cpu"
        if not chosen.startswith("cuda"):
            return None
        free = gpu_free_memory().get(int(chosen.partition(":")[2] or 0))
        return None if free is None else BackendSite(chosen, free)

    async def load(self, card: ModelCard, files: ModelFiles, shard: ShardRange, options: EngineOptions) -> Engine:
        """Load ``shard`` from ``files.primary`` on a thread of its own and return its engine."""
        reason = self.supports(card)
        if reason is not None:
            raise BackendError(reason)
        if files.format not in self.capabilities.formats:
            raise BackendError(f"the torch backend reads GGUF and safetensors models; {card.id} resolved to {files.format}")
        if shard.n_layers != card.n_layers:
            raise BackendError(f"the shard is of a {shard.n_layers}-layer model, but {card.id} has {card.n_layers} layers")
        if options.context_length < 1 or options.max_sequences < 1:
            raise BackendError("context_length and max_sequences must both be at least 1")
        if options.threads is not None and options.threads < 1:
            raise BackendError(f"threads must be at least 1, got {options.threads}")
        try:
            settings = options.settings_as(TorchSettings, "torch")
        except (TypeError, ValueError) as exc:
            raise BackendError(f"invalid torch settings: {exc}") from exc
        options = attrs.evolve(options, settings=settings)
        # On a thread that ends with the load: no OpenMP team outlives it (skulk_core.threads).
        return await run_on_own_thread(f"torch load {card.id} [{shard.start}, {shard.end})", load_engine, card, files, shard, options)

    async def load_tokenizer(self, card: ModelCard, files: ModelFiles) -> Tokenizer:
        """The model's tokenizer alone (no weights), for a node that forwards requests to the
        head of a pipeline it is not part of, or holds only a later stage."""
        from skulk_torch.tokenizer import load_tokenizer

        return await anyio.to_thread.run_sync(load_tokenizer, Path(files.primary), TorchSettings().tokenizer)


def load_engine(card: ModelCard, files: ModelFiles, shard: ShardRange, options: EngineOptions) -> Engine:
    """Load the stage (blocking: the backend calls it in a worker thread)."""
    started = time.monotonic()
    import torch

    from skulk_torch.engine import TorchEngine
    from skulk_torch.tokenizer import load_tokenizer

    settings = options.settings_as(TorchSettings, "torch")
    device = _torch_device(options.device or _setting_device(settings))
    dtype = getattr(torch, resolve_dtype_name(settings.dtype, device.type))
    threads = options.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    path = Path(files.primary)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="skulk-torch-tokenizer") as pool:
        # The tokenizer loads beside the weights (llama.cpp's calls and numpy both release the GIL).
        tokenizer_future = pool.submit(load_tokenizer, path, settings.tokenizer) if shard.is_first else None
        try:
            model = _load_model(path, card, shard, options, device, dtype, threads)
        except BaseException:
            if tokenizer_future is not None and tokenizer_future.exception() is None:
                close = getattr(tokenizer_future.result(), "close", None)
                if close is not None:
                    close()
            raise
        tokenizer = tokenizer_future.result() if tokenizer_future is not None else None
    _return_freed_memory()
    log.info(
        "%s layers [%d, %d) loaded on %s (%s, %s matrices) in %.2f s%s",
        card.id, shard.start, shard.end, device, dtype, model.layout, time.monotonic() - started,
        f", tokenizer: {tokenizer.route}" if tokenizer is not None else "",
    )
    return TorchEngine(card, shard, options, model, tokenizer, threads)


def _load_model(
    path: Path, card: ModelCard, shard: ShardRange, options: EngineOptions, device: torch.device, dtype: torch.dtype, threads: int
) -> StageModel:
    import torch

    from skulk_torch.checkpoint import open_checkpoint
    from skulk_torch.model import choose_layout, load_stage

    with open_checkpoint(path) as reader:
        config = reader.config
        if config.n_layers != shard.n_layers:
            raise BackendError(f"{path.name} has {config.n_layers} layers, but the shard is of a {shard.n_layers}-layer model")
        if options.context_length > config.context_length:
            log.warning(
                "%s: context_length %d exceeds the %d positions the model was trained on; output past them may degrade",
                card.id, options.context_length, config.context_length,
            )
        with torch.inference_mode():
            settings = options.settings_as(TorchSettings, "torch")
            layout = choose_layout(device, dtype, settings.cpu_matmul, settings.quantize)
            return load_stage(
                reader, shard, device=device, dtype=dtype, context_length=options.context_length, threads=threads, layout=layout
            )


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS after loading (glibc only; elsewhere a no-op).

    Dequantizing, fusing and transposing leave freed buffers in the malloc heap; without this the
    default model's whole-model engine stays about 70 MiB larger than what it holds.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- devices -------------------------------------------------------------------------------------

GPU_MEMORY_TTL_S = 5.0  # how old a reading of the GPUs' free memory may be before it is refreshed
_gpu_memory: tuple[float, dict[int, int]] | None = None
_gpu_refreshing = threading.Lock()


def gpu_free_memory() -> dict[int, int]:
    """Free bytes of each CUDA device torch would number 0, 1, ... in this process (after
    ``CUDA_VISIBLE_DEVICES``), read with ``nvidia-smi`` without importing torch; {} where it cannot
    be read. Nodes ask on their event loop every couple of seconds: after the first reading, a
    reading older than ``GPU_MEMORY_TTL_S`` is returned while a thread takes the next."""
    global _gpu_memory
    cached = _gpu_memory
    if cached is None:
        _gpu_memory = (time.monotonic(), _read_gpu_memory())
        return _gpu_memory[1]
    if time.monotonic() - cached[0] >= GPU_MEMORY_TTL_S and _gpu_refreshing.acquire(blocking=False):
        threading.Thread(target=_refresh_gpu_memory, name="skulk-torch-gpu-memory", daemon=True).start()
    return cached[1]


def _refresh_gpu_memory() -> None:
    global _gpu_memory
    try:
        _gpu_memory = (time.monotonic(), _read_gpu_memory())
    finally:
        _gpu_refreshing.release()


def _read_gpu_memory() -> dict[int, int]:
    found: dict[int, int] = {}
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=5, check=True,
        )
        physical = {}
        for line in done.stdout.splitlines():
            index, uuid, free = (part.strip() for part in line.split(","))
            physical[index] = physical[uuid] = int(free) * 2**20  # MiB
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        order = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else sorted(
            (k for k in physical if k.isdigit()), key=int
        )
        for logical, name in enumerate(order):
            match = physical.get(name)
            if match is None:  # a UUID may be given by a prefix
                match = next((v for k, v in physical.items() if k.startswith("GPU-") and k.startswith(name)), None)
            if match is None:
                break  # CUDA numbers the devices it can see up to the first it cannot
            found[logical] = match
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.debug("no GPU memory reading: %s", exc)
    return found


def detect_devices() -> tuple[str, ...]:
    """Devices usable here, best first, found without importing torch when it is not loaded yet."""
    torch = sys.modules.get("torch")
    if torch is not None:
        found = []
        if torch.cuda.is_available():
            found.append("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            found.append("mps")
        return (*found, "cpu")
    found = []
    if _torch_build_has_cuda() and (Path("/proc/driver/nvidia").exists() or Path("/dev/nvidia0").exists()):
        found.append("cuda")
    if sys.platform == "darwin" and platform.machine() == "arm64":
        found.append("mps")
    return (*found, "cpu")


@lru_cache(maxsize=1)
def _torch_build_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build, read from torch/version.py without importing it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    for location in spec.submodule_search_locations:
        version = Path(location) / "version.py"
        if version.is_file():
            match = re.search(r"^cuda\s*(?::[^=]*)?=\s*(.+)$", version.read_text(encoding="utf-8"), re.MULTILINE)
            return bool(match) and match.group(1).strip() not in ("None", "''", '""')
    return False


def _setting_device(settings: TorchSettings) -> str | None:
    """The device ``torch.device`` names, or None for ``auto``."""
    return None if settings.device == "auto" else settings.device


def _torch_device(name: str | None) -> torch.device:
    import torch

    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise BackendError(f"unknown torch device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {name!r} was asked for, but torch sees no CUDA device here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BackendError(f"device {name!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BackendError(f"device {name!r} was asked for, but torch sees no MPS device here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise BackendError(f"the torch backend runs on cpu, cuda or mps, not {name!r}")
    return device


def resolve_dtype_name(setting: str, device: str) -> str:
    """The element type for ``torch.dtype`` setting ``auto`` or an explicit one, on ``device``."""
    if setting != "auto":
        return setting
    kind = device.split(":", 1)[0]
    if kind == "cpu":
        return "float32"
    if kind == "cuda":
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float16" if torch is not None else "bfloat16"
    return "float16"


# -- sizing a model from its card ----------------------------------------------------------------


def _shape_for(card: ModelCard) -> ModelConfig:
    """The model's shape from its own file if readable here, else from the card."""
    path = card.source.path if card.source.kind == "local" else None
    if path:
        try:
            stat = os.stat(path)
            return _read_shape(path, stat.st_mtime_ns, stat.st_size)
        except (OSError, ModelError, BackendError, KeyError, ValueError) as exc:
            log.debug("sizing %s from its card: %s", card.id, exc)
    return config_from_card(card)


@lru_cache(maxsize=32)
def _read_shape(path: str, _mtime: int, _size: int) -> ModelConfig:
    return read_config(Path(path))


def config_from_card(card: ModelCard) -> ModelConfig:
    """A model's shape estimated from its card alone.

    The card lacks the MLP width, the head size when it differs from ``hidden / heads``, and
    whether the head is tied to the embedding, so: the parameter count is taken from the file size
    and the quantization's bits per weight (4 bits when unknown, which overestimates), the
    embedding's share (counted once: tied) is taken off, and the MLP width is what makes one block
    hold an equal share of the rest.
    """
    bits = _BITS_PER_WEIGHT.get((card.quantization or "").upper(), 16.0 if card.format == "safetensors" else 4.0)
    total = card.bytes_on_disk * 8 / bits
    embedding = card.vocab_size * card.hidden_size
    per_layer = max(total - embedding, 0) / max(card.n_layers, 1)
    head_dim = card.head_dim
    attention = card.hidden_size * head_dim * (2 * card.n_heads + 2 * card.n_kv_heads)
    ffn = max(math.ceil((per_layer - attention - 2 * card.hidden_size) / (3 * card.hidden_size)), 1)
    return ModelConfig(
        architecture=card.architecture,
        n_layers=card.n_layers,
        hidden_size=card.hidden_size,
        n_heads=card.n_heads,
        n_kv_heads=card.n_kv_heads,
        head_dim=head_dim,
        ffn_size=ffn,
        vocab_size=card.vocab_size,
        norm_eps=1e-5,
        rope_theta=10000.0,
        context_length=card.context_length,
        tied_embeddings=True,
        attention_bias=card.architecture == "qwen2",
    )
