"""The ``torch:`` section of ``skulk.yaml``: how the torch backend holds weights and tokenizes.

Every field can also be set as ``SKULK_TORCH_<FIELD>``. The engine receives the structured section
as ``EngineOptions.settings``; when it is None (no config, a test), the defaults below apply.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from attrs import field, frozen

DTYPES = ("auto", "float32", "float16", "bfloat16")
TOKENIZERS = ("auto", "llamacpp", "tokenizers")
CPU_MATMULS = ("auto", "onednn", "blas")
DEVICES = ("auto", "cpu", "cuda", "mps")
QUANTIZE = ("none", "int8", "int4")


def _one_of(choices: tuple[str, ...]) -> Callable[[object, attrs.Attribute, str], None]:
    def check(_: object, attribute: attrs.Attribute, value: str) -> None:
        if value not in choices:
            raise ValueError(f"torch.{attribute.name} must be one of {', '.join(choices)}; got {value!r}")

    return check


def _device_name(_: object, attribute: attrs.Attribute, value: str) -> None:
    kind, _colon, index = value.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"torch.{attribute.name} must be auto, cpu, cuda, cuda:N or mps; got {value!r}")


@frozen
class TorchSettings:
    """Options of the torch backend.

    - ``device``: where the stage's weights, cache and products live. ``auto``: a CUDA GPU if torch
      sees one, else Apple's MPS, else the CPU; ``cuda:N`` picks the N-th GPU. ``cpu`` keeps the
      backend off a GPU that something else uses.
    - ``dtype``: element type of weights, activations and KV cache. ``auto``: float32 on a CPU
      (the fastest there, and what reproduces llama.cpp's greedy tokens), bfloat16 on CUDA where
      the GPU supports it, float16 otherwise.
    - ``tokenizer``: how the first stage tokenizes a GGUF model. ``auto``: llama.cpp's own
      tokenizer (a vocabulary-only load through llama-cpp-python) when that is installed, else one
      built with the ``tokenizers`` library from the GGUF's vocabulary and merges. A safetensors
      model always uses its ``tokenizer.json`` through ``tokenizers``.
    - ``cpu_matmul``: what multiplies float32 matrices on a CPU. ``onednn``: each matrix packed
      once at load for oneDNN's matmul, whose products cost about the same for one row or several
      (a batch of sequences, a prompt); ``blas``: torch's BLAS (MKL on x86-64) on transposed
      matrices, the faster of the two on Intel's CPUs, where MKL runs its own kernels. ``auto``:
      ``blas`` on an Intel CPU, else ``onednn`` where this torch has it (x86-64), else ``blas``.
    - ``cuda_graphs``: on a CUDA GPU, hold the KV caches in one pool allocated at load and replay
      each decode step as a captured CUDA graph (:mod:`skulk_torch.graphs`); ``false`` runs every
      step operation by operation, with caches that grow as requests do.
    - ``quantize``: ``int8`` holds every matrix as 8-bit integers with a scale per output row (a
      quarter of float32's bytes, half of float16's), multiplied by torch's weight-only int8 kernel
      on bfloat16-rounded activations; norms, attention and the KV cache stay in ``dtype``. ``int4``:
      4-bit integers in groups of 32 input features, each group with a scale and an offset (about
      a sixth of float32's bytes), multiplied the same way. A CPU only. ``none``: the matrices in
      ``dtype``.
    - ``prompt_cache``: keep a finished request's KV cache, and start a new request whose prompt
      begins the same way from it (a chat's next turn repeats the conversation so far), as the
      llama.cpp backend does. Only a whole-model engine whose caches grow with their requests (not
      the pool of ``cuda_graphs``) keeps them; live and kept sequences together stay within
      ``serve.max_sequences``, the least recently kept evicted first. On by default.
    """

    device: str = field(default="auto", validator=_device_name)
    dtype: str = field(default="auto", validator=_one_of(DTYPES))
    tokenizer: str = field(default="auto", validator=_one_of(TOKENIZERS))
    cpu_matmul: str = field(default="auto", validator=_one_of(CPU_MATMULS))
    cuda_graphs: bool = True
    quantize: str = field(default="none", validator=_one_of(QUANTIZE))
    prompt_cache: bool = True
