"""The forward pass of a layer range of a llama-family model, over a ragged batch of sequences.

Every row of the batch is one position of one sequence. The matrix work (projections, MLP) runs on
all rows at once; attention runs per sequence, against that sequence's own KV cache, with a causal
mask inside its chunk. So one step can hold a long prefill and many single-token decodes.

Per block the Q, K and V projections are one fused matrix, and so are the gate and up projections
of the MLP, so a decode step costs four matrix products a block. Rotary embeddings are applied to
Q and K together (they are adjacent in the fused output), rotating adjacent pairs of each head as
complex numbers (llama.cpp's "normal" rope; :mod:`skulk_torch.checkpoint` puts every checkpoint's
Q/K rows in that layout).

A decode step is bound by memory bandwidth: every weight is read once per step. So with float32
on a CPU the weights are stored transposed, (in_features, out_features) contiguous, which MKL's
one-row product streams about 1.5x faster than the (out, in) layout ``torch.nn.Linear`` keeps
(measured here: 20 against 13 GB/s); half precision on a CPU (whose transposed products take a slow
path) and every GPU keep the (out, in) layout. The RMSNorm gains are folded into the matrices that
follow the norms, and the forward pass keeps the operations between matrix products few and skips
the generic attention kernel for single positions, whose set-up costs more than the work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from attrs import define, frozen

from skulk_core import ShardRange

from skulk_torch.checkpoint import CheckpointReader, ModelConfig

if TYPE_CHECKING:
    import torch


@define(eq=False)
class Block:
    """One transformer block's weights, fused: ``qkv`` projects to Q, K and V at once, ``gate_up``
    to the MLP's gate and up. The attention and MLP norms' gains are folded into ``qkv`` and
    ``gate_up`` (input feature ``i`` of each is scaled by gain ``i``).

    ``qkv`` and ``gate_up`` are (in, out) in the transposed layout, (out, in) otherwise; ``out`` and
    ``down`` are always used as (in, out) for ``addmm``, a transposed view in the (out, in) layout.
    """

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None  # (q_size + 2 * kv_size,)
    out: torch.Tensor  # (q_size, hidden)
    gate_up: torch.Tensor
    down: torch.Tensor  # (ffn, hidden)

    def tensors(self) -> list[torch.Tensor]:
        parts = [self.qkv, self.out, self.gate_up, self.down]
        return parts + ([self.qkv_bias] if self.qkv_bias is not None else [])


@frozen
class SequenceSlice:
    """Where one sequence's chunk sits in a step: rows ``[row, row + length)`` of the batch, at
    positions ``[position, position + length)``, with its KV cache (layers, 2, kv heads, capacity, head_dim)."""

    row: int
    length: int
    position: int
    cache: torch.Tensor


class StageModel:
    """The weights of one stage and its forward pass. Call inside ``torch.inference_mode()``."""

    def __init__(
        self,
        config: ModelConfig,
        shard: ShardRange,
        blocks: list[Block],
        *,
        embed: torch.Tensor | None,  # (vocab, hidden)
        norm: torch.Tensor | None,  # (hidden,)
        head: torch.Tensor | None,  # (hidden, vocab) transposed, else (vocab, hidden); embeds when tied
        device: torch.device,
        dtype: torch.dtype,
        context_length: int,
        transposed: bool,
    ) -> None:
        import torch
        import torch.nn.functional as F

        self.transposed = transposed
        eps = config.norm_eps
        if dtype == torch.float32:
            self._normalize = lambda x: x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))
        else:  # squares of half-precision activations overflow: normalize in float32
            self._normalize = lambda x: F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
        if transposed:
            self._project = lambda h, weight, bias=None: torch.mm(h, weight) if bias is None else torch.addmm(bias, h, weight)
        else:
            self._project = F.linear
        self.config = config
        self.shard = shard
        self.blocks = blocks
        self.embed = embed
        self.norm = norm
        self.head = head
        self.device = device
        self.dtype = dtype
        self.context_length = context_length
        angles = np.outer(np.arange(context_length, dtype=np.float64), config.inverse_frequencies())
        # Complex rotations (positions, head_dim/2) where complex arithmetic has the precision of
        # the activations; for half-precision activations, cos and sin to rotate pairs by hand.
        self.complex_rope = dtype in (torch.float32, torch.float64)
        if self.complex_rope:
            rotations = torch.polar(torch.ones_like(torch.from_numpy(angles)), torch.from_numpy(angles))
            self.rotations = rotations.to(device=device, dtype=torch.complex64 if dtype == torch.float32 else torch.complex128)
        else:
            self.cos = torch.from_numpy(np.cos(angles)).to(device=device, dtype=dtype)
            self.sin = torch.from_numpy(np.sin(angles)).to(device=device, dtype=dtype)

    # -- the pass ---------------------------------------------------------------------------

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(rows, hidden) embeddings; from the transposed head's columns when it is the tied embedding."""
        import torch
        import torch.nn.functional as F

        if self.embed is not None:
            return F.embedding(tokens, self.embed)
        assert self.head is not None
        if not self.transposed:
            return F.embedding(tokens, self.head)
        return torch.index_select(self.head, 1, tokens).t().contiguous()

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, sequences: Sequence[SequenceSlice], threads: int = 1
    ) -> torch.Tensor:
        """Run ``x`` (rows, hidden) through the stage's blocks, extending each sequence's cache.

        ``threads`` is the step's thread count (already set); a single position's attention runs
        on one, because its products are too small to share and torch would still fork and join
        a thread team for each (on a busy machine a team waits for a core every time).
        """
        import torch
        import torch.nn.functional as F

        config = self.config
        head_dim, n_heads, n_kv = config.head_dim, config.n_heads, config.n_kv_heads
        group = n_heads // n_kv
        q_size, kv_size, ffn = config.q_size, config.kv_size, config.ffn_size
        rows = x.shape[0]
        rotate = self._rotary(positions)
        scale = head_dim**-0.5
        # A chunk of several positions sees its own earlier positions only; the mask is built once
        # per step and shared by every block. Query rows are (group, position) folded together.
        masks = []
        for seq in sequences:
            if seq.length == 1:
                masks.append(None)
                continue
            keys = torch.arange(seq.position + seq.length, device=self.device)
            queries = torch.arange(seq.position, seq.position + seq.length, device=self.device)
            masks.append((keys[None, :] <= queries[:, None]).repeat(group, 1))
        single = len(sequences) == 1
        project, normalize = self._project, self._normalize
        for index, block in enumerate(self.blocks):
            h = normalize(x)  # RMSNorm; its gain is folded into qkv
            qkv = project(h, block.qkv, block.qkv_bias)
            qk = rotate(qkv[:, : q_size + kv_size].view(rows, n_heads + n_kv, head_dim))
            q = qk[:, :n_heads]
            k = qk[:, n_heads:]
            v = qkv[:, q_size + kv_size :].view(rows, n_kv, head_dim)
            attn = None if single else torch.empty(rows, q_size, device=self.device, dtype=x.dtype)
            for seq, mask in zip(sequences, masks):
                start, end, length = seq.row, seq.row + seq.length, seq.position + seq.length
                k_cache = seq.cache[index, 0]  # (kv heads, capacity, head_dim)
                v_cache = seq.cache[index, 1]
                k_cache[:, seq.position : length] = k[start:end].transpose(0, 1)
                v_cache[:, seq.position : length] = v[start:end].transpose(0, 1)
                # Heads h = kv * group + g share kv head ``kv``: fold the group into the query rows.
                queries = q[start:end].transpose(0, 1).reshape(n_kv, group * seq.length, head_dim)
                if mask is None:  # one position: plain products beat the generic kernel's set-up
                    if threads > 1 and self.device.type == "cpu":
                        torch.set_num_threads(1)
                    scores = torch.bmm(queries, k_cache[:, :length].transpose(1, 2)).mul_(scale)
                    out = torch.bmm(torch.softmax(scores, dim=-1), v_cache[:, :length])
                    if threads > 1 and self.device.type == "cpu":
                        torch.set_num_threads(threads)
                else:
                    out = F.scaled_dot_product_attention(queries, k_cache[:, :length], v_cache[:, :length], attn_mask=mask)
                out = out.view(n_heads, seq.length, head_dim).transpose(0, 1).reshape(seq.length, q_size)
                if single:
                    attn = out
                else:
                    attn[start:end] = out
            x = torch.addmm(x, attn, block.out)
            h = normalize(x)  # its gain is folded into gate_up
            gate_up = project(h, block.gate_up)
            x = torch.addmm(x, F.silu(gate_up[:, :ffn]).mul_(gate_up[:, ffn:]), block.down)
        return x

    def _rotary(self, positions: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function rotating (rows, heads, head_dim) at ``positions``, pairs (2i, 2i+1) by frequency i."""
        import torch

        if self.complex_rope:
            turn = self.rotations[positions].unsqueeze(1)  # (rows, 1, head_dim/2)

            def rotate(t: torch.Tensor) -> torch.Tensor:
                pairs = torch.view_as_complex(t.unflatten(-1, (-1, 2)))
                return torch.view_as_real(pairs * turn).flatten(-2)

            return rotate
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)

        def rotate_real(t: torch.Tensor) -> torch.Tensor:
            even, odd = t[..., 0::2], t[..., 1::2]
            return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)

        return rotate_real

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output head for the rows of ``x``: (rows, vocab) float32."""
        import torch

        assert self.norm is not None and self.head is not None
        h = self._normalize(x) * self.norm
        return self._project(h, self.head).to(torch.float32)

    def new_cache(self, capacity: int) -> torch.Tensor:
        import torch

        config = self.config
        return torch.zeros(
            len(self.blocks), 2, config.n_kv_heads, capacity, config.head_dim, device=self.device, dtype=self.dtype
        )

    # -- accounting -------------------------------------------------------------------------

    def parameter_bytes(self) -> dict[str, int]:
        """Bytes of weights held, by part (``blocks``, ``embed``, ``head``); a tied head counts once."""
        seen: set[int] = set()

        def count(tensors: list[torch.Tensor]) -> int:
            total = 0
            for tensor in tensors:
                key = tensor.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += tensor.untyped_storage().nbytes()
            return total

        blocks = count([t for block in self.blocks for t in block.tensors()])
        embed = count([self.embed] if self.embed is not None else [])
        head = count([t for t in (self.norm, self.head) if t is not None])
        return {"blocks": blocks, "embed": embed, "head": head}


def load_stage(
    reader: CheckpointReader,
    shard: ShardRange,
    *,
    device: torch.device,
    dtype: torch.dtype,
    context_length: int,
    threads: int,
) -> StageModel:
    """Read, fuse, lay out and place the stage's weights; only its own tensors are read."""
    import torch

    config = reader.config
    transposed = device.type == "cpu" and dtype == torch.float32

    def place(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype).contiguous()

    def matrix(tensor: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        """(out, in) float32 -> the layout ``project`` takes, input features scaled by ``gain``."""
        if gain is not None:
            tensor = tensor * gain  # float32: the gains are folded in at full precision
        return place(tensor.t()) if transposed else place(tensor)

    def addmm_operand(tensor: torch.Tensor) -> torch.Tensor:
        """(out, in) -> an (in, out) operand: contiguous when transposed, else a view."""
        return place(tensor.t()) if transposed else place(tensor).t()

    def required(tensor: torch.Tensor | None) -> torch.Tensor:
        assert tensor is not None  # readers raise for missing required tensors
        return tensor

    def layer(index: int, role: str) -> torch.Tensor:
        return required(reader.layer(index, role))

    def load_block(index: int) -> Block:
        qkv = matrix(torch.cat([layer(index, "q"), layer(index, "k"), layer(index, "v")]), layer(index, "attn_norm"))
        biases = [reader.layer(index, role) for role in ("q_bias", "k_bias", "v_bias")]
        bias = None
        if any(b is not None for b in biases):
            sizes = (config.q_size, config.kv_size, config.kv_size)
            bias = place(torch.cat([b if b is not None else torch.zeros(n) for b, n in zip(biases, sizes)]))
        gate_up = matrix(torch.cat([layer(index, "gate"), layer(index, "up")]), layer(index, "ffn_norm"))
        return Block(
            qkv=qkv, qkv_bias=bias, out=addmm_operand(layer(index, "o")), gate_up=gate_up, down=addmm_operand(layer(index, "down"))
        )

    def load_ends() -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        embed = norm = head = None
        if shard.is_last:
            norm = place(required(reader.global_tensor("norm")))
            head = matrix(required(reader.global_tensor("embed" if config.tied_embeddings else "head")))
        if shard.is_first and not (shard.is_last and config.tied_embeddings):
            embed = place(required(reader.global_tensor("embed")))  # a tied whole model embeds from its head
        return embed, norm, head

    # Dequantizing is numpy work that releases the GIL for most of its time: a few threads overlap.
    with ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="skulk-torch-load") as pool:
        ends = pool.submit(load_ends)  # the embedding is the largest tensor: start it first
        blocks = list(pool.map(load_block, range(shard.start, shard.end)))
        embed, norm, head = ends.result()
    return StageModel(
        config, shard, blocks, embed=embed, norm=norm, head=head, device=device, dtype=dtype,
        context_length=context_length, transposed=transposed,
    )
