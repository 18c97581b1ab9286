"""The ``llamacpp:`` section of ``skulk.yaml``: how the llama.cpp backend builds its contexts.

Every field can also be set as ``SKULK_LLAMACPP_<FIELD>`` (``SKULK_LLAMACPP_FLASH_ATTN=true``). The
engine receives the structured section as ``EngineOptions.settings``; when it is None (no config,
a test), the defaults below apply.
"""

from __future__ import annotations

import os

import attrs
from attrs import field, frozen

# KV-cache element types llama.cpp accepts, and the bytes one value costs in each (a q8_0 block
# holds 32 values in 34 bytes, a q4_0 block 32 values in 18 bytes).
KV_CACHE_BYTES_PER_VALUE = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def _at_least_one(_: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"llamacpp.{attribute.name} must be at least 1, got {value}")


DECODE_AHEAD = ("auto", "always", "never")


def _decode_ahead_mode(value: str | bool) -> str | bool:
    """``always`` for true and ``never`` for false (the config reads YAML's ``on``, ``off``, ``yes``
    and ``no``, and those words from the environment, as booleans); a string as it is, for the
    validator to check."""
    if isinstance(value, bool):
        return "always" if value else "never"
    return value


def _decode_ahead(_: object, attribute: attrs.Attribute, value: str) -> None:
    if value not in DECODE_AHEAD:
        raise ValueError(f"llamacpp.{attribute.name} must be one of {', '.join(DECODE_AHEAD)}; got {value!r}")


def _kv_cache_type(_: object, attribute: attrs.Attribute, value: str) -> None:
    if value not in KV_CACHE_BYTES_PER_VALUE:
        raise ValueError(
            f"llamacpp.{attribute.name} must be one of {', '.join(KV_CACHE_BYTES_PER_VALUE)}; got {value!r}"
        )


@frozen
class LlamaCppSettings:
    """Options of the llama.cpp backend.

    - ``n_batch``: the most tokens one ``llama_decode`` call takes. A step holding more (several
      long prompts at once) is split into several calls; it also bounds the compute buffers.
    - ``flash_attn``: use llama.cpp's flash-attention kernels (on by default, as llama.cpp's own
      ``auto`` does on a CPU). Measured with the default model on 2 cores: one stream decodes about
      8% faster, 8 sequences together about 10%. A quantized KV cache needs it.
    - ``use_mmap``: map the GGUF file instead of reading it into memory, so the weights are shared
      with the page cache and loading is fast.
    - ``kv_cache_type``: element type of the KV cache: ``f16`` (default), ``f32``, ``q8_0`` or
      ``q4_0``. The quantized types halve or quarter its memory and need ``flash_attn: true``.
    - ``decode_ahead``: once a step's tokens are drawn, decode the next step at once, before the
      scheduler asks for it, so that streaming a token and planning the next step overlap the
      compute instead of standing between two decodes. ``auto`` (default) does it when llama.cpp's
      threads leave a CPU of this process free for the event loop, ``always`` and ``never`` say so.
      Measured with the default model on 2 CPUs: one thread decodes a stream 2.9 % faster with it;
      two threads 1.9 % slower, because the event loop's work then takes a CPU from a decode whose
      threads wait for each other. A step that turns out not to be wanted (the request stopped)
      costs one decode; greedy and seeded output is unchanged. ``true`` and ``false`` (also YAML's
      ``on`` and ``off``) mean ``always`` and ``never``.
    - ``prompt_cache``: keep a finished request's KV cache in its sequence slot, and start a new
      request whose prompt begins the same way from it (a chat's next turn repeats the conversation
      so far), as llama.cpp's server does. Kept caches take no memory beyond the context's own and
      are evicted, least recently used first, when a new request needs their slot. On by default.
    """

    n_batch: int = field(default=512, validator=_at_least_one)
    flash_attn: bool = True
    use_mmap: bool = True
    kv_cache_type: str = field(default="f16", validator=_kv_cache_type)
    decode_ahead: str | bool = field(default="auto", converter=_decode_ahead_mode, validator=_decode_ahead)
    prompt_cache: bool = True

    def decodes_ahead(self, threads: int, cpus: int | None = None) -> bool:
        """Whether an engine with ``threads`` llama.cpp threads decodes ahead, on ``cpus`` CPUs
        (default: those this process may run on)."""
        if self.decode_ahead != "auto":
            return self.decode_ahead == "always"
        if cpus is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return threads < cpus

    def __attrs_post_init__(self) -> None:
        if self.kv_cache_type.startswith("q") and not self.flash_attn:
            raise ValueError(
                f"llamacpp.kv_cache_type {self.kv_cache_type} needs llamacpp.flash_attn: true "
                "(llama.cpp quantizes the V cache only with flash attention); set both, or use f16"
            )

    @property
    def kv_bytes_per_value(self) -> float:
        return KV_CACHE_BYTES_PER_VALUE[self.kv_cache_type]
