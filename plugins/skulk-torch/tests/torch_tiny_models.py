"""Tiny random llama-family models written by the tests, and a plain reference forward pass.

One set of random weights (Hugging Face layout) is written three ways: a safetensors directory
(config.json + model.safetensors + tokenizer.json), a GGUF file (Q/K rows permuted the way
llama.cpp's converter permutes them for llama, as they are for qwen2), and kept in memory for
:func:`reference_logits`, a float64 forward pass written from the models' definitions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from attrs import frozen

# GPT-2's printable stand-ins for the 256 byte values, so the tiny GGUF has a byte-level vocabulary.


def _byte_chars() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra, out = list(printable), 0, {}
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    for byte, char in zip(printable, chars):
        out[byte] = chr(char)
    return [out[b] for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
MERGES = [("a", "b"), ("ab", "c")]  # llama.cpp refuses a BPE vocabulary without merges


@frozen
class TinyModel:
    arch: str  # "llama" or "qwen2"
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab: int
    theta: float
    eps: float
    tied: bool
    weights: dict  # HF name -> float32 numpy array

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


def make_tiny(
    arch: str = "llama",
    *,
    n_layers: int = 3,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 96,
    tied: bool = False,
    seed: int = 0,
) -> TinyModel:
    rng = np.random.default_rng(seed)
    vocab = 256 + len(SPECIALS) + len(MERGES)
    head_dim = hidden // n_heads

    def mat(rows: int, cols: int, scale: float = 0.15) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": mat(vocab, hidden, 0.5), "model.norm.weight": norm(hidden)}
    if not tied:
        w["lm_head.weight"] = mat(vocab, hidden, 0.2)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
        w[p + "self_attn.q_proj.weight"] = mat(n_heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = mat(n_kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = mat(n_kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = mat(hidden, n_heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = mat(ffn, hidden)
        w[p + "mlp.up_proj.weight"] = mat(ffn, hidden)
        w[p + "mlp.down_proj.weight"] = mat(hidden, ffn)
        if arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = (rng.standard_normal(n_heads * head_dim) * 0.3).astype(np.float32)
            w[p + "self_attn.k_proj.bias"] = (rng.standard_normal(n_kv_heads * head_dim) * 0.3).astype(np.float32)
            w[p + "self_attn.v_proj.bias"] = (rng.standard_normal(n_kv_heads * head_dim) * 0.3).astype(np.float32)
    theta = 10000.0 if arch == "llama" else 1000000.0
    return TinyModel(arch, n_layers, hidden, n_heads, n_kv_heads, ffn, vocab, theta, 1e-5, tied, w)


# -- the reference -------------------------------------------------------------------------------


def reference_logits(model: TinyModel, tokens: list[int]) -> np.ndarray:
    """Logits (positions, vocab) of a float64 forward pass, Hugging Face definitions."""
    w = {k: v.astype(np.float64) for k, v in model.weights.items()}
    d, nh, nkv = model.head_dim, model.n_heads, model.n_kv_heads
    n = len(tokens)
    x = w["model.embed_tokens.weight"][tokens]
    inv = 1.0 / model.theta ** (np.arange(0, d, 2) / d)
    angles = np.outer(np.arange(n), inv)
    cos = np.cos(np.concatenate([angles, angles], 1))[None]
    sin = np.sin(np.concatenate([angles, angles], 1))[None]

    def rms(v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + model.eps) * g

    def rotate_half(v: np.ndarray) -> np.ndarray:
        return np.concatenate([-v[..., d // 2 :], v[..., : d // 2]], -1)

    def proj(h: np.ndarray, name: str) -> np.ndarray:
        out = h @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(model.n_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = proj(h, p + "self_attn.q_proj").reshape(n, nh, d).transpose(1, 0, 2)
        k = proj(h, p + "self_attn.k_proj").reshape(n, nkv, d).transpose(1, 0, 2)
        v = proj(h, p + "self_attn.v_proj").reshape(n, nkv, d).transpose(1, 0, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = np.repeat(k, nh // nkv, axis=0)
        v = np.repeat(v, nh // nkv, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(d) + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        attn = (scores @ v).transpose(1, 0, 2).reshape(n, nh * d)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    head = w["model.embed_tokens.weight"] if model.tied else w["lm_head.weight"]
    return rms(x, w["model.norm.weight"]) @ head.T


# -- writers -------------------------------------------------------------------------------------


def write_safetensors(model: TinyModel, directory: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(v) for k, v in model.weights.items()}, str(directory / "model.safetensors"))
    config = {
        "model_type": model.arch,
        "architectures": ["LlamaForCausalLM" if model.arch == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": model.hidden,
        "intermediate_size": model.ffn,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads,
        "vocab_size": model.vocab,
        "rms_norm_eps": model.eps,
        "rope_theta": model.theta,
        "max_position_embeddings": 256,
        "tie_word_embeddings": model.tied,
        "bos_token_id": 256 + 1,
        "eos_token_id": 256 + 2,
    }
    (directory / "config.json").write_text(json.dumps(config))
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({t: 256 + i for i, t in enumerate(SPECIALS)})  # as Hugging Face writes them: in the model's vocabulary too
    vocab.update({a + b: 256 + len(SPECIALS) + i for i, (a, b) in enumerate(MERGES)})
    tokenizer = {
        "version": "1.0",
        "added_tokens": [
            {"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i, t in enumerate(SPECIALS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": [list(m) for m in MERGES]},
    }
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    return directory


def permute_rows(values: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``permute`` (HF rotary layout -> llama.cpp's "normal" one)."""
    return values.reshape(n_heads, 2, values.shape[0] // n_heads // 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)


def write_gguf(model: TinyModel, path: Path, *, weight_type: str = "F32") -> Path:
    """The model as a GGUF (block matrices stored as ``weight_type``: F32 or F16)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), model.arch)
    arch = model.arch
    writer.add_block_count(model.n_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(model.hidden)
    writer.add_feed_forward_length(model.ffn)
    writer.add_head_count(model.n_heads)
    writer.add_head_count_kv(model.n_kv_heads)
    writer.add_rope_freq_base(model.theta)
    writer.add_layer_norm_rms_eps(model.eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if weight_type == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(_byte_chars() + SPECIALS + [a + b for a, b in MERGES])
    writer.add_token_types(
        [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * len(MERGES)
    )
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    writer.add_add_bos_token(False)
    w = model.weights
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }

    def add(name: str, values: np.ndarray) -> None:
        if values.ndim == 2 and weight_type == "F16":
            values = values.astype(np.float16)
        writer.add_tensor(name, np.ascontiguousarray(values))

    add("token_embd.weight", w["model.embed_tokens.weight"])
    add("output_norm.weight", w["model.norm.weight"])
    if not model.tied:
        add("output.weight", w["lm_head.weight"])
    for i in range(model.n_layers):
        for hf, gg in names.items():
            key = f"model.layers.{i}.{hf}"
            if key not in w:
                continue
            values = w[key]
            if arch == "llama" and gg.startswith(("attn_q.", "attn_k.")):
                values = permute_rows(values, model.n_heads if gg.startswith("attn_q") else model.n_kv_heads)
            add(f"blk.{i}.{gg}", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
