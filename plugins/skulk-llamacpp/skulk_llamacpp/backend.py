"""The llama.cpp backend: what placement reads about it, and how it loads a model.

Constructing :class:`LlamaCppBackend` is cheap; ``llama_cpp`` (and its shared libraries) is
imported only by :meth:`LlamaCppBackend.load`.
"""

from __future__ import annotations

import math
from pathlib import Path

import anyio
import attrs

from skulk_core import (
    BackendCapabilities,
    BackendError,
    Engine,
    EngineOptions,
    ModelCard,
    ModelFiles,
    ShardRange,
    Tokenizer,
    run_on_own_thread,
)

from skulk_llamacpp.settings import LlamaCppSettings

# Memory a loaded engine holds besides weights and KV cache, measured with the default model on a
# CPU: the compute buffer of a 512-token micro-batch (~100 MiB), the lazily created embedding
# context (its compute buffer and KV cache for one sequence), the logits buffers, and allocator
# slack.
RUNTIME_OVERHEAD_BYTES = 256 * 1024**2


class LlamaCppBackend:
    """Runs whole GGUF models on the CPU with llama.cpp, many sequences per decode step."""

    name = "llamacpp"
    capabilities = BackendCapabilities(
        formats={"gguf"}, layer_ranges=False, devices=("cpu",), batching=True, embeddings=True
    )

    def supports(self, card: ModelCard) -> str | None:
        if card.format != "gguf":
            return f"llama.cpp reads GGUF files only, and {card.id} is {card.format}"
        return None

    def estimate_memory(self, card: ModelCard, shard: ShardRange, options: EngineOptions) -> int:
        """``bytes_on_disk + kv_bytes_per_token * context_length * max_sequences + RUNTIME_OVERHEAD_BYTES``.

        The weights are the whole GGUF file (llama.cpp loads the whole model whatever ``shard``
        says); the KV cache is reserved up front for every sequence, at the configured cache type
        (f16: 2 bytes a value); the overhead is a constant (see ``RUNTIME_OVERHEAD_BYTES``).
        """
        settings = options.settings_as(LlamaCppSettings, "llamacpp")
        per_token = card.kv_bytes_per_token(bytes_per_value=1) * settings.kv_bytes_per_value
        kv_cache = math.ceil(per_token * options.context_length * options.max_sequences)
        return card.bytes_on_disk + kv_cache + RUNTIME_OVERHEAD_BYTES

    async def load_tokenizer(self, card: ModelCard, files: ModelFiles) -> Tokenizer:
        """The model's tokenizer without its weights (llama.cpp's vocabulary-only load), for a
        node that forwards requests to an instance headed elsewhere."""
        if files.format != "gguf":
            raise BackendError(f"the llamacpp backend reads GGUF files only; {card.id} resolved to {files.format}")

        def build() -> Tokenizer:
            from skulk_llamacpp.native import LoadedModel
            from skulk_llamacpp.settings import LlamaCppSettings
            from skulk_llamacpp.tokenizer import LlamaCppTokenizer

            return LlamaCppTokenizer(LoadedModel(Path(files.primary), LlamaCppSettings(), vocab_only=True))

        return await anyio.to_thread.run_sync(build)

    async def load(self, card: ModelCard, files: ModelFiles, shard: ShardRange, options: EngineOptions) -> Engine:
        """Load the whole model from ``files.primary`` on a thread of its own and return its engine."""
        if not shard.is_whole:
            raise BackendError(
                f"the llamacpp backend runs whole models only, not layers {shard.start}-{shard.end - 1} of "
                f"{shard.n_layers}; place {card.id} on one node, or use a backend that runs layer ranges"
            )
        if options.device not in (None, "cpu"):
            raise BackendError(f"the llamacpp backend runs on the CPU only; device {options.device!r} was asked for")
        if files.format != "gguf":
            raise BackendError(f"the llamacpp backend reads GGUF files only; {card.id} resolved to {files.format}")
        if options.context_length < 1 or options.max_sequences < 1:
            raise BackendError("context_length and max_sequences must both be at least 1")
        try:
            settings = options.settings_as(LlamaCppSettings, "llamacpp")
        except (TypeError, ValueError) as exc:
            raise BackendError(f"invalid llamacpp settings: {exc}") from exc

        from skulk_llamacpp.engine import load_engine  # imports llama_cpp

        options = attrs.evolve(options, settings=settings)
        # On a thread that ends with the load: no native per-thread state outlives it (skulk_core.threads).
        return await run_on_own_thread(f"llamacpp load {card.id}", load_engine, card, files, shard, options)
