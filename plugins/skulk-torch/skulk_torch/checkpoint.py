"""Reading a llama-family checkpoint: its shape (:class:`ModelConfig`) and the tensors of one stage.

Two sources, one vocabulary of tensor roles: a GGUF file (dequantized by the ``gguf`` package) and
a Hugging Face safetensors directory (``config.json`` + ``*.safetensors``). Each reader hands out
one tensor at a time as float32 (a weight matrix as (out_features, in_features)), and only the
tensors asked for are read: a stage asks for its own layers, plus the embedding (first stage, or a
last stage whose head is tied to it) and the final norm and head (last stage).

The rows of the Q and K weights (and biases) come out in one rotary layout whatever the source:
each head's rotated pairs adjacent, ``(0, 1), (2, 3), ...``, rotated by frequency ``0, 1, ...`` -
llama.cpp's "normal" rope. That is how llama.cpp's converter stores ``llama``-style models (it
permutes Hugging Face's rows, whose pairs are ``(i, i + head_dim/2)`` for ``rotate_half``), so those
GGUF tensors are taken as they are; Hugging Face checkpoints, and GGUFs of models llama.cpp rotates
"neox"-style (qwen2, stored unpermuted), get the converter's permutation here. Attention scores are
dot products of Q and K over the head's dimensions, so permuting both the same way changes nothing
but the rotary layout; the model rotates adjacent pairs as complex numbers, one operation a block.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from attrs import field, frozen

from skulk_core import BackendError, ModelError

from skulk_torch.gguf_file import GGUFFile

if TYPE_CHECKING:
    import torch

# Architectures this backend runs, as GGUF's ``general.architecture`` or HF's ``model_type`` say.
ARCHITECTURES = frozenset({"llama", "mistral", "qwen2"})
# Architectures whose GGUF Q/K rows llama.cpp's converter already permuted for its "normal" rope.
_INTERLEAVED_IN_GGUF = frozenset({"llama", "mistral"})
_ROTARY_ROLES = ("q", "k", "q_bias", "k_bias")

# Roles of the tensors of one transformer block, and of the model's ends.
LAYER_ROLES = ("attn_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "o", "ffn_norm", "gate", "up", "down")
_GGUF_LAYER = {
    "attn_norm": "attn_norm.weight",
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "q_bias": "attn_q.bias",
    "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias",
    "o": "attn_output.weight",
    "ffn_norm": "ffn_norm.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
}
_GGUF_GLOBAL = {"embed": "token_embd.weight", "norm": "output_norm.weight", "head": "output.weight"}
_HF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}
_HF_GLOBAL = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}


@frozen
class RopeScaling:
    """Rotary scaling beyond the base frequency. ``kind``: ``linear`` or ``llama3``."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


@frozen
class ModelConfig:
    """The shape of a llama-family model, as its checkpoint describes it."""

    architecture: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    context_length: int  # positions the model was trained for
    tied_embeddings: bool  # the output head is the token embedding
    attention_bias: bool  # q/k/v projections have biases (qwen2)
    rope_scaling: RopeScaling | None = None
    # Per-frequency divisors of the rotary frequencies (a GGUF's rope_freqs tensor: llama3 scaling)
    rope_freq_factors: tuple[float, ...] | None = field(default=None, eq=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one transformer block."""
        attention = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        if self.attention_bias:
            attention += self.q_size + 2 * self.kv_size
        return attention + 3 * self.hidden_size * self.ffn_size + 2 * self.hidden_size

    def inverse_frequencies(self) -> np.ndarray:
        """The rotary inverse frequencies (head_dim/2 of them, float64), scaling applied."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv = 1.0 / (self.rope_theta**exponents)
        if self.rope_freq_factors is not None:
            inv = inv / np.asarray(self.rope_freq_factors, dtype=np.float64)
        scaling = self.rope_scaling
        if scaling is None:
            return inv
        if scaling.kind == "linear":
            return inv / scaling.factor
        # llama3: long wavelengths are divided by ``factor``, short ones kept, the band between
        # interpolated (transformers' _compute_llama3_parameters).
        low_wavelen = scaling.original_context / scaling.low_freq_factor
        high_wavelen = scaling.original_context / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = (scaling.original_context / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)


class CheckpointReader:
    """One tensor at a time, float32, Q/K rows in the interleaved rotary layout. Subclasses know a
    file format."""

    config: ModelConfig
    path: Path

    def layer(self, index: int, role: str) -> torch.Tensor | None:
        """A block's tensor by role (``q``, ``gate``, ...); None for an absent optional one (biases)."""
        raise NotImplementedError

    def global_tensor(self, role: str) -> torch.Tensor | None:
        """``embed``, ``norm`` or ``head``; None for an absent head (tied to the embedding)."""
        raise NotImplementedError

    def embedding_rows(self) -> EmbeddingRows:
        """The token embedding as rows read from the file on demand; it stays open after this
        reader closes, until its own :meth:`EmbeddingRows.close`."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EmbeddingRows:
    """The token embedding of a model, looked up row by row in the model's own file.

    A first stage embeds a step's few tokens; holding the whole (vocab, hidden) table in float32
    for that would cost the weights of several blocks. The file is mapped, so rows read once stay
    in the page cache, shared with every process that maps the same file.
    """

    def __init__(self, lookup: Callable[[np.ndarray], np.ndarray], close: Callable[[], None], vocab_size: int, hidden_size: int) -> None:
        self._lookup: Callable[[np.ndarray], np.ndarray] | None = lookup
        self._close = close
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size

    def lookup(self, tokens: np.ndarray) -> np.ndarray:
        """float32 (len(tokens), hidden) rows for ``tokens`` (ids the caller checked)."""
        if self._lookup is None:
            raise ModelError("the embedding's file was closed")
        unique, inverse = np.unique(tokens, return_inverse=True)  # each distinct row read once, in file order
        return self._lookup(unique)[inverse.reshape(-1)]

    def close(self) -> None:
        if self._lookup is not None:
            self._lookup = None
            self._close()


def open_checkpoint(path: Path) -> CheckpointReader:
    """A reader for a GGUF file or a Hugging Face safetensors directory."""
    if path.is_dir():
        return SafetensorsReader(path)
    if path.is_file():
        return GGUFReader(path)
    raise ModelError(f"no model at {path}: expected a GGUF file or a directory with config.json and *.safetensors")


def read_config(path: Path) -> ModelConfig:
    """Only the model's shape (reads the GGUF header or config.json, never a weight)."""
    if path.is_dir():
        return _config_from_hf(_read_json(path / "config.json"), path)
    with GGUFFile(path) as gguf_file:
        return _config_from_gguf(gguf_file, rope_freqs=None)


# -- GGUF ----------------------------------------------------------------------------------------


class GGUFReader(CheckpointReader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = GGUFFile(path)
        try:
            rope_freqs = None
            if "rope_freqs.weight" in self.file.tensors:
                rope_freqs = tuple(float(v) for v in self.file.read("rope_freqs.weight").reshape(-1))
            self.config = _config_from_gguf(self.file, rope_freqs)
        except BaseException:
            self.file.close()
            raise

    def layer(self, index: int, role: str) -> torch.Tensor | None:
        name = f"blk.{index}.{_GGUF_LAYER[role]}"
        if name not in self.file.tensors:
            if role.endswith("_bias"):
                return None
            raise ModelError(f"{self.path.name} lacks the tensor {name}")
        values = self.file.read(name)
        if role in _ROTARY_ROLES and self.config.architecture not in _INTERLEAVED_IN_GGUF:
            values = interleave_rotary_rows(values, _heads(self.config, role))
        return _torch(values)

    def global_tensor(self, role: str) -> torch.Tensor | None:
        name = _GGUF_GLOBAL[role]
        if name not in self.file.tensors:
            if role == "head":
                return None
            raise ModelError(f"{self.path.name} lacks the tensor {name}")
        return _torch(self.file.read(name))

    def embedding_rows(self) -> EmbeddingRows:
        name = _GGUF_GLOBAL["embed"]
        if name not in self.file.tensors:
            raise ModelError(f"{self.path.name} lacks the tensor {name}")
        file = GGUFFile(self.path)  # a mapping of its own, closed with the rows
        return EmbeddingRows(
            lambda rows: file.read_rows(name, rows), file.close, self.config.vocab_size, self.config.hidden_size
        )

    def close(self) -> None:
        self.file.close()


def interleave_rotary_rows(values: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows (``permute`` in convert_hf_to_gguf.py).

    Per head, the two halves of the rotary dimension are interleaved: row ``2i`` comes from row
    ``i``, row ``2i + 1`` from row ``i + head_dim/2``.
    """
    rows = values.shape[0]
    rest = values.shape[1:]
    return np.ascontiguousarray(values.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(rows, *rest))


def _heads(config: ModelConfig, role: str) -> int:
    return config.n_heads if role.startswith("q") else config.n_kv_heads


_REQUIRED = object()


def _config_from_gguf(gguf_file: GGUFFile, rope_freqs: tuple[float, ...] | None) -> ModelConfig:
    path = gguf_file.path
    arch = str(gguf_file.get("general.architecture", ""))
    if arch not in ARCHITECTURES:
        raise BackendError(
            f"{path.name} is a {arch or 'unknown'} model; the torch backend runs {', '.join(sorted(ARCHITECTURES))}"
        )

    def number(key: str, default: Any = _REQUIRED) -> Any:
        value = gguf_file.get(f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise ModelError(f"{path.name} lacks the {arch}.{key} key")
        if isinstance(value, list):  # per-layer values: this backend needs them uniform
            if len(set(value)) != 1:
                raise BackendError(f"{path.name} has per-layer {key} values {value}; the torch backend needs one value")
            value = value[0]
        return value

    hidden = int(number("embedding_length"))
    n_heads = int(number("attention.head_count"))
    head_dim = int(number("attention.key_length", hidden // n_heads))
    if int(number("attention.value_length", head_dim)) != head_dim:
        raise BackendError(f"{path.name} has keys and values of different sizes; the torch backend needs them equal")
    rotary = int(number("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise BackendError(f"{path.name} rotates {rotary} of {head_dim} head dimensions; the torch backend rotates them all")
    tensors = gguf_file.tensors
    if "token_embd.weight" not in tensors:
        raise ModelError(f"{path.name} has no token_embd.weight tensor")
    vocab = tensors["token_embd.weight"].shape[0]
    ffn = number("feed_forward_length", None)
    if ffn is None:
        ffn = tensors["blk.0.ffn_gate.weight"].shape[0]
    return ModelConfig(
        architecture=arch,
        n_layers=int(number("block_count")),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=int(number("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_size=int(ffn),
        vocab_size=int(vocab),
        norm_eps=float(number("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(number("rope.freq_base", 10000.0)),
        context_length=int(number("context_length", 2048)),
        tied_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        rope_scaling=_gguf_rope_scaling(gguf_file, arch),
        rope_freq_factors=rope_freqs,
    )


def _gguf_rope_scaling(gguf_file: GGUFFile, arch: str) -> RopeScaling | None:
    kind = gguf_file.get(f"{arch}.rope.scaling.type")
    factor = gguf_file.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None  # llama3 scaling is carried by the rope_freqs tensor instead
    if kind == "linear":
        return RopeScaling("linear", float(factor))
    raise BackendError(
        f"{gguf_file.path.name} uses {kind} rope scaling, which the torch backend does not implement "
        "(it does linear and llama3); use the llamacpp backend for this model"
    )


# -- safetensors ---------------------------------------------------------------------------------


class SafetensorsReader(CheckpointReader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = _config_from_hf(_read_json(path / "config.json"), path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{path} holds no *.safetensors files")
        from safetensors import safe_open

        self._handles: list[Any] = []
        self._where: dict[str, Any] = {}  # tensor name -> the open file that holds it
        self._files: dict[int, str] = {}  # id of an open handle -> its file
        try:
            for file in files:
                handle = safe_open(str(file), framework="pt")
                self._handles.append(handle)
                self._files[id(handle)] = str(file)
                for name in handle.keys():  # safe_open handles are not mappings
                    self._where[name] = handle
        except Exception as exc:
            raise ModelError(f"cannot read {path}'s safetensors files: {exc}") from exc

    def _get(self, name: str, optional: bool = False) -> torch.Tensor | None:
        handle = self._where.get(name)
        if handle is None:
            if optional:
                return None
            raise ModelError(f"{self.path} lacks the tensor {name}")
        import torch

        return handle.get_tensor(name).to(torch.float32, copy=True)  # a copy: never backed by the mapping

    def layer(self, index: int, role: str) -> torch.Tensor | None:
        tensor = self._get(f"model.layers.{index}.{_HF_LAYER[role]}", optional=role.endswith("_bias"))
        if tensor is not None and role in _ROTARY_ROLES:
            heads = _heads(self.config, role)
            rows = tensor.shape[0]
            tensor = tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)
        return tensor

    def global_tensor(self, role: str) -> torch.Tensor | None:
        if role == "head" and self.config.tied_embeddings:
            return None
        return self._get(_HF_GLOBAL[role])

    def embedding_rows(self) -> EmbeddingRows:
        name = _HF_GLOBAL["embed"]
        holder = self._where.get(name)
        if holder is None:
            raise ModelError(f"{self.path} lacks the tensor {name}")
        import torch
        from safetensors import safe_open

        handle: Any = safe_open(self._files[id(holder)], framework="pt")  # a handle of its own
        table = handle.get_slice(name)

        def lookup(rows: np.ndarray) -> np.ndarray:
            out = np.empty((len(rows), self.config.hidden_size), dtype=np.float32)
            start = 0
            # runs of consecutive ids are read as one slice
            for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1):
                first, count = int(run[0]), len(run)
                out[start : start + count] = table[first : first + count].to(torch.float32).numpy()
                start += count
            return out

        def close() -> None:
            nonlocal handle, table
            handle = table = None

        return EmbeddingRows(lookup, close, self.config.vocab_size, self.config.hidden_size)

    def close(self) -> None:
        self._where.clear()
        self._handles.clear()


def _config_from_hf(config: dict[str, Any], path: Path) -> ModelConfig:
    arch = str(config.get("model_type", ""))
    if arch not in ARCHITECTURES:
        raise BackendError(
            f"{path} holds a {arch or 'unknown'} model; the torch backend runs {', '.join(sorted(ARCHITECTURES))}"
        )
    if config.get("mlp_bias"):
        raise BackendError(f"{path} has MLP biases, which the torch backend does not implement")
    hidden = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // n_heads)
    rope = config.get("rope_scaling") or None
    rope_theta = float(config.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0)
    scaling = None
    if rope is not None:
        kind = rope.get("rope_type", rope.get("type"))
        if kind == "llama3":
            scaling = RopeScaling(
                "llama3",
                float(rope["factor"]),
                float(rope.get("low_freq_factor", 1.0)),
                float(rope.get("high_freq_factor", 4.0)),
                int(rope.get("original_max_position_embeddings", 8192)),
            )
        elif kind == "linear":
            scaling = RopeScaling("linear", float(rope["factor"]))
        elif kind not in (None, "default"):
            raise BackendError(f"{path} uses {kind} rope scaling; the torch backend does linear and llama3")
    has_head = _hf_has_tensor(path, "lm_head.weight")
    tied = bool(config.get("tie_word_embeddings", False)) or not has_head
    return ModelConfig(
        architecture=arch,
        n_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        ffn_size=int(config["intermediate_size"]),
        vocab_size=int(config["vocab_size"]),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        context_length=int(config.get("max_position_embeddings", 2048)),
        tied_embeddings=tied,
        attention_bias=arch == "qwen2" or bool(config.get("attention_bias", False)),
        rope_scaling=scaling,
    )


def _hf_has_tensor(path: Path, name: str) -> bool:
    """Whether any safetensors file of ``path`` holds ``name`` (reads headers only)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return name in _read_json(index).get("weight_map", {})
    return any(name in _safetensors_names(file) for file in path.glob("*.safetensors"))


def _safetensors_names(file: Path) -> Iterator[str]:
    with file.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    return iter(k for k in header if k != "__metadata__")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"no {path.name} in {path.parent}; a safetensors model directory needs one") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None


def _torch(values: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
