"""The forward pass of a layer range of a llama-family model, over a ragged batch of sequences.

Every row of the batch is one position of one sequence. The matrix work (projections, MLP) runs on
all rows at once; attention runs per sequence, against that sequence's own KV cache, with a causal
mask inside its chunk. So one step can hold a long prefill and many single-token decodes.

Per block the Q, K and V projections are one fused matrix, and so are the gate and up projections
of the MLP, so a decode step costs four matrix products a block. Rotary embeddings are applied to
Q and K together (they are adjacent in the fused output), rotating adjacent pairs of each head as
complex numbers (llama.cpp's "normal" rope; :mod:`skulk_torch.checkpoint` puts every checkpoint's
Q/K rows in that layout).

A decode step is bound by memory bandwidth: every weight is read once per step. How the matrices
are held depends on where the products run (:data:`LAYOUTS`):

- ``onednn`` (float32 on an x86-64 CPU that is not Intel's, the default there): each matrix is
  packed once, at load, into oneDNN's blocked layout and multiplied with oneDNN's matmul, as
  torch's own compiler does for CPU inference. Its products cost about the same for 1, 2 or 4 rows, where MKL's grow with every
  row, and on an AMD CPU, where MKL takes a generic path, even one row is faster. Measured on this
  project's 2-core AMD EPYC, the default model's products, one thread: 20 / 17 / 20 ms for 1 / 2 / 4
  rows against MKL's 25 / 38 / 49 ms.
- ``transposed`` (float32 on an Intel CPU, on a CPU without oneDNN's matmul, or with
  ``torch.cpu_matmul: blas``): (in_features, out_features) contiguous, which MKL's one-row product
  streams about 1.5x faster than the (out, in) layout ``torch.nn.Linear`` keeps. On Intel's CPUs
  MKL's own kernels run, and measured faster than oneDNN's: on a 16-core Xeon, a whole-model decode
  step of the default model took 47 / 29 ms on 1 / 2 threads against oneDNN's 56 / 38 ms.
- ``plain``: the (out, in) layout, for half precision on a CPU (whose transposed products take a
  slow path) and every GPU.
- ``int8`` (``torch.quantize: int8``, a CPU only): each (out, in) matrix rounded to 8-bit integers
  with one scale per output row (:class:`Int8Matrix`), a quarter of float32's bytes, multiplied by
  torch's weight-only int8 kernel (``_weight_int8pack_mm``) with the activations rounded to
  bfloat16 for the product and the result taken back to the stage's dtype; norms, rotary and
  attention stay in that dtype. Measured on this project's AMD EPYC, the default model's whole
  decode step on one thread: 13.0 ms against float32's 23.0 (16.3 against 26.0 for 4 rows).
- ``int4`` (``torch.quantize: int4``, a CPU only): each (out, in) matrix rounded to 4-bit integers
  in groups of 32 input features, each group with its own scale and offset (:class:`Int4Matrix`),
  about a sixth of float32's bytes, multiplied by torch's int4 kernel (``_weight_int4pack_mm_for_cpu``)
  the same way. A GGUF's Q4_0/Q4_1 blocks are groups of 32 too.

The RMSNorm gains are folded into the matrices that follow the norms, and the forward pass keeps the
operations between matrix products few and skips the generic attention kernel for single positions,
whose set-up costs more than the work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from attrs import define, frozen

from skulk_core import BackendError, ShardRange

from skulk_torch.checkpoint import CheckpointReader, EmbeddingRows, ModelConfig

if TYPE_CHECKING:
    import torch

LAYOUTS = ("onednn", "transposed", "plain", "int8", "int4")
_onednn_works: bool | None = None
_quantized_works: dict[str, bool] = {}
INT8_ALIGNMENT = 16  # torch's int8 kernel reads input features in groups of 16 (others: garbage or a crash)
INT4_GROUP = 32  # input features sharing an int4 scale and offset
INT4_ROWS = 16  # torch packs int4 matrices whose output rows come in multiples of 16


def onednn_matmul_available() -> bool:
    """Whether this torch packs float32 matrices for oneDNN's matmul and multiplies them right:
    checked once per process on a small product (x86-64 builds of torch have it)."""
    global _onednn_works
    if _onednn_works is None:
        import platform

        import torch

        _onednn_works = False
        if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available():
            try:
                generator = torch.Generator().manual_seed(0)
                weight = torch.randn(24, 40, generator=generator)
                x = torch.randn(3, 40, generator=generator)
                packed = torch.ops.mkldnn._reorder_linear_weight(weight)
                got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                _onednn_works = bool(torch.allclose(got, x @ weight.t(), rtol=1e-5, atol=1e-5))
            except (AttributeError, RuntimeError):  # an op missing from this build, or refusing
                pass
    return _onednn_works


def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


@frozen(eq=False)  # tensors: compared by identity
class Int8Matrix:
    """An (out, in) matrix as 8-bit integers and one bfloat16 scale per output row: row ``r`` is
    ``weight[r] * scales[r]``."""

    weight: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out,) bfloat16

    @classmethod
    def quantize(cls, matrix: torch.Tensor) -> Int8Matrix:
        """Round a float (out, in) matrix symmetrically, each row to its largest magnitude."""
        import torch

        if matrix.shape[1] % INT8_ALIGNMENT:
            raise BackendError(
                f"torch.quantize int8 needs matrices whose input features come in multiples of {INT8_ALIGNMENT}; "
                f"this model has one of {matrix.shape[1]}. Use torch.quantize: none"
            )
        matrix = matrix.float()
        scales = matrix.abs().amax(dim=1).clamp_(min=1e-12) / 127
        weight = torch.round(matrix / scales[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        return cls(weight, scales.to(torch.bfloat16))

    def multiply(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` (rows, in) bfloat16 times the matrix's transpose: (rows, out) bfloat16."""
        import torch

        return torch._weight_int8pack_mm(h, self.weight, self.scales)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.scales]


@frozen(eq=False)  # tensors: compared by identity
class Int4Matrix:
    """An (out, in) matrix as 4-bit integers in groups of :data:`INT4_GROUP` input features, each
    group with a bfloat16 scale and offset: ``w = (q - 8) * scale + zero``, packed for torch's kernel.
    Output rows are padded with zeros to a multiple of :data:`INT4_ROWS`; ``rows`` are the real ones."""

    packed: torch.Tensor  # torch's int4 packing of (padded rows, in)
    scales_zeros: torch.Tensor  # (in / group, padded rows, 2) bfloat16
    rows: int

    @classmethod
    def quantize(cls, matrix: torch.Tensor) -> Int4Matrix:
        """Round a float (out, in) matrix, each group of 32 input features between its own minimum and maximum."""
        import torch

        rows, columns = matrix.shape
        if columns % INT4_GROUP:
            raise BackendError(
                f"torch.quantize int4 needs matrices whose input features come in multiples of {INT4_GROUP}; "
                f"this model has one of {columns}. Use torch.quantize: int8 or none"
            )
        padded = -rows % INT4_ROWS
        matrix = matrix.float()
        if padded:
            matrix = torch.cat([matrix, matrix.new_zeros(padded, columns)])
        groups = matrix.view(rows + padded, columns // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = (high - low).clamp_(min=1e-12) / 15
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(q.view(rows + padded, columns), 1)
        scales_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return cls(packed, scales_zeros, rows)

    def multiply(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` (rows, in) bfloat16 times the matrix's transpose: (rows, out) bfloat16."""
        import torch

        y = torch._weight_int4pack_mm_for_cpu(h, self.packed, INT4_GROUP, self.scales_zeros)
        return y if y.shape[1] == self.rows else y[:, : self.rows]

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_zeros]


QUANTIZED = {"int8": Int8Matrix, "int4": Int4Matrix}  # torch.quantize -> how a matrix is held


def quantized_matmul_available(quantize: str) -> bool:
    """Whether this torch holds and multiplies ``quantize`` matrices on the CPU (checked once each)."""
    if quantize not in _quantized_works:
        import torch

        _quantized_works[quantize] = False
        try:
            matrix = QUANTIZED[quantize].quantize(torch.ones(INT4_ROWS, INT4_GROUP))
            got = matrix.multiply(torch.ones(2, INT4_GROUP, dtype=torch.bfloat16)).float()
            _quantized_works[quantize] = bool(torch.allclose(got, torch.full((2, INT4_ROWS), float(INT4_GROUP)), rtol=0.01))
        except (RuntimeError, AttributeError, NotImplementedError, BackendError):
            pass
    return _quantized_works[quantize]


def choose_layout(device: torch.device, dtype: torch.dtype, cpu_matmul: str, quantize: str = "none") -> str:
    """The :data:`LAYOUTS` entry the stage's matrices take; ``cpu_matmul`` and ``quantize`` are the
    ``torch.cpu_matmul`` and ``torch.quantize`` settings.

    ``auto`` packs for oneDNN except on Intel's CPUs, where MKL's own kernels are the faster."""
    import torch

    if quantize in QUANTIZED:
        if device.type != "cpu":
            raise BackendError(f"torch.quantize {quantize} runs on a CPU, and this stage is on {device}; set torch.device: cpu or torch.quantize: none")
        if not quantized_matmul_available(quantize):
            raise BackendError(f"torch.quantize is {quantize}, but this torch cannot multiply by {quantize} matrices here; use torch.quantize: none")
        return quantize
    if device.type != "cpu" or dtype != torch.float32:
        return "plain"
    if cpu_matmul == "blas" or (cpu_matmul == "auto" and cpu_vendor() == "GenuineIntel"):
        return "transposed"
    if onednn_matmul_available():
        return "onednn"
    if cpu_matmul == "onednn":
        raise BackendError("torch.cpu_matmul is onednn, but this torch cannot pack float32 matrices for oneDNN here; use auto or blas")
    return "transposed"


@define(eq=False)
class Block:
    """One transformer block's weights, fused: ``qkv`` projects to Q, K and V at once, ``gate_up``
    to the MLP's gate and up. The attention and MLP norms' gains are folded into ``qkv`` and
    ``gate_up`` (input feature ``i`` of each is scaled by gain ``i``).

    In the ``transposed`` layout every matrix is (in, out). In the ``plain`` one ``qkv`` and
    ``gate_up`` are (out, in), and ``out`` and ``down`` are (in, out) views of (out, in) tensors, for
    ``addmm``. In the ``onednn`` one each is an opaque packed tensor made from the (out, in) matrix;
    in the ``int8`` and ``int4`` ones an :class:`Int8Matrix` or :class:`Int4Matrix` of it.
    """

    qkv: torch.Tensor | Int8Matrix | Int4Matrix
    qkv_bias: torch.Tensor | None  # (q_size + 2 * kv_size,)
    out: torch.Tensor | Int8Matrix | Int4Matrix  # (q_size, hidden)
    gate_up: torch.Tensor | Int8Matrix | Int4Matrix
    down: torch.Tensor | Int8Matrix | Int4Matrix  # (ffn, hidden)

    def tensors(self) -> list[torch.Tensor]:
        parts: list[torch.Tensor] = []
        for part in (self.qkv, self.out, self.gate_up, self.down):
            parts.extend(part.tensors() if isinstance(part, (Int8Matrix, Int4Matrix)) else [part])
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
        embed: EmbeddingRows | None,  # the first stage's token embedding, read from the file
        norm: torch.Tensor | None,  # (hidden,)
        head: torch.Tensor | Int8Matrix | Int4Matrix | None,  # in the layout's form of (vocab, hidden)
        device: torch.device,
        dtype: torch.dtype,
        context_length: int,
        layout: str,
    ) -> None:
        import torch
        import torch.nn.functional as F

        self.layout = layout
        eps = config.norm_eps
        if dtype == torch.float32:
            self._normalize = lambda x: x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))
        else:  # squares of half-precision activations overflow: normalize in float32
            self._normalize = lambda x: F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
        # project(h, weight, bias=None): h @ weight (+ bias); add_project(x, h, weight): x + h @ weight
        if layout == "onednn":
            linear = torch.ops.mkldnn._linear_pointwise
            self._project = lambda h, weight, bias=None: linear(h, weight, bias, "none", [], "")
            self._add_project = lambda x, h, weight: linear(h, weight, None, "none", [], "").add_(x)
        elif layout == "transposed":
            self._project = lambda h, weight, bias=None: torch.mm(h, weight) if bias is None else torch.addmm(bias, h, weight)
            self._add_project = torch.addmm
        elif layout in QUANTIZED:  # products on bfloat16-rounded rows, taken back to the stage's dtype

            def project(h: torch.Tensor, weight: Int8Matrix | Int4Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
                y = weight.multiply(h.to(torch.bfloat16).contiguous()).to(dtype)
                return y if bias is None else y.add_(bias)

            self._project = project
            self._add_project = lambda x, h, weight: project(h, weight).add_(x)
        else:
            self._project = F.linear
            self._add_project = torch.addmm
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

    def embed_tokens(self, tokens: np.ndarray) -> torch.Tensor:
        """(rows, hidden) embeddings of token ids the caller checked, read from the model's file."""
        import torch

        assert self.embed is not None, "only the first stage embeds"
        return torch.from_numpy(self.embed.lookup(tokens)).to(device=self.device, dtype=self.dtype)

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
        head_dim, n_heads, n_kv, q_size = config.head_dim, config.n_heads, config.n_kv_heads, config.q_size
        group = n_heads // n_kv
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
        for index, block in enumerate(self.blocks):
            q, k, v = self._attention_inputs(x, block, rotate)
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
            x = self._mlp(self._add_project(x, attn, block.out), block)
        return x

    def decode_rows(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, pool: torch.Tensor, span: int) -> torch.Tensor:
        """One new position for each row of ``x`` (rows, hidden): row ``b`` continues the sequence
        in slot ``slots[b]`` of ``pool`` (layers, K/V, slots, kv heads, context, head_dim) at
        ``positions[b]``, and attends to that slot's first ``span`` positions (those past
        ``positions[b]`` masked). Every shape depends only on the row count and ``span``, and
        nothing reads a value back to the host, so a CUDA graph can capture it (:mod:`skulk_torch.graphs`).
        """
        import torch
        import torch.nn.functional as F

        config = self.config
        rows, n_kv = x.shape[0], config.n_kv_heads
        rotate = self._rotary(positions)
        keys = torch.arange(span, device=self.device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (rows, 1, 1, span)
        for index, block in enumerate(self.blocks):
            q, k, v = self._attention_inputs(x, block, rotate)
            k_pool, v_pool = pool[index, 0], pool[index, 1]  # (slots, kv heads, context, head_dim)
            k_pool[slots, :, positions] = k
            v_pool[slots, :, positions] = v
            # Heads h = kv * group + g share kv head ``kv``: the group is the query length.
            queries = q.reshape(rows, n_kv, config.n_heads // n_kv, config.head_dim)
            out = F.scaled_dot_product_attention(queries, k_pool[slots, :, :span], v_pool[slots, :, :span], attn_mask=mask)
            x = self._mlp(self._add_project(x, out.reshape(rows, config.q_size), block.out), block)
        return x

    def _attention_inputs(
        self, x: torch.Tensor, block: Block, rotate: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's rotated queries (rows, heads, head_dim), rotated keys and values (rows, kv
        heads, head_dim) for the rows of ``x``."""
        config = self.config
        rows, n_heads, head_dim, qk_size = x.shape[0], config.n_heads, config.head_dim, config.q_size + config.kv_size
        qkv = self._project(self._normalize(x), block.qkv, block.qkv_bias)  # the norm's gain is folded into qkv
        qk = rotate(qkv[:, :qk_size].view(rows, n_heads + config.n_kv_heads, head_dim))
        return qk[:, :n_heads], qk[:, n_heads:], qkv[:, qk_size:].view(rows, config.n_kv_heads, head_dim)

    def _mlp(self, x: torch.Tensor, block: Block) -> torch.Tensor:
        """``x`` plus the block's MLP of it (the norm's gain is folded into gate_up)."""
        import torch.nn.functional as F

        ffn = self.config.ffn_size
        gate_up = self._project(self._normalize(x), block.gate_up)
        return self._add_project(x, F.silu(gate_up[:, :ffn]).mul_(gate_up[:, ffn:]), block.down)

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

    def close(self) -> None:
        """Close the embedding's file (the weights go with the last reference to this model)."""
        if self.embed is not None:
            self.embed.close()

    def parameter_bytes(self) -> dict[str, int]:
        """Bytes of weights held, by part (``blocks``, ``embed``, ``head``). ``embed`` is always 0:
        the first stage reads its tokens' rows from the model's (mapped) file."""
        seen: set[int] = set()

        def count(tensors: list[torch.Tensor]) -> int:
            total = 0
            for tensor in tensors:
                if tensor.is_mkldnn:  # a packed matrix owns its opaque buffer
                    key, size = id(tensor), tensor.numel() * tensor.element_size()
                else:
                    key, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
                if key not in seen:
                    seen.add(key)
                    total += size
            return total

        blocks = count([t for block in self.blocks for t in block.tensors()])
        head_tensors = self.head.tensors() if isinstance(self.head, (Int8Matrix, Int4Matrix)) else [self.head]
        head = count([t for t in (self.norm, *head_tensors) if t is not None])
        return {"blocks": blocks, "embed": 0, "head": head}


def load_stage(
    reader: CheckpointReader,
    shard: ShardRange,
    *,
    device: torch.device,
    dtype: torch.dtype,
    context_length: int,
    threads: int,
    layout: str | None = None,
) -> StageModel:
    """Read, fuse, lay out and place the stage's weights; only its own tensors are read.
    ``layout`` is one of :data:`LAYOUTS` (default: :func:`choose_layout`'s for ``auto``)."""
    import torch

    config = reader.config
    layout = layout or choose_layout(device, dtype, "auto")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    transposed = layout == "transposed"
    pack = torch.ops.mkldnn._reorder_linear_weight if layout == "onednn" else None
    quantized = QUANTIZED.get(layout)

    def place(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype).contiguous()

    def matrix(tensor: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor | Int8Matrix | Int4Matrix:
        """(out, in) float32 -> the layout ``project`` takes, input features scaled by ``gain``."""
        if gain is not None:
            tensor = tensor * gain  # float32: the gains are folded in at full precision
        if quantized is not None:
            return quantized.quantize(tensor)
        if pack is not None:
            return pack(place(tensor))
        return place(tensor.t()) if transposed else place(tensor)

    def addmm_operand(tensor: torch.Tensor) -> torch.Tensor | Int8Matrix | Int4Matrix:
        """(out, in) -> the residual product's operand: packed, quantized, or (in, out), contiguous
        when transposed, else a view."""
        if quantized is not None:
            return quantized.quantize(tensor)
        if pack is not None:
            return pack(place(tensor))
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

    def load_end() -> tuple[torch.Tensor | None, torch.Tensor | Int8Matrix | Int4Matrix | None]:
        """The last stage's final norm and output head (the embedding, when tied)."""
        if not shard.is_last:
            return None, None
        norm = place(required(reader.global_tensor("norm")))
        return norm, matrix(required(reader.global_tensor("embed" if config.tied_embeddings else "head")))

    # Dequantizing is numpy work that releases the GIL for most of its time: a few threads overlap.
    with ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="skulk-torch-load") as pool:
        end = pool.submit(load_end)  # the head is the largest tensor: start it first
        blocks = list(pool.map(load_block, range(shard.start, shard.end)))
        norm, head = end.result()
    embed = None
    if shard.is_first:
        embed = reader.embedding_rows()  # rows read from the file as tokens come
        try:
            embed.lookup(np.zeros(1, dtype=np.int64))  # a type it cannot read fails the load, not a request
        except BaseException:
            embed.close()
            raise
    return StageModel(
        config, shard, blocks, embed=embed, norm=norm, head=head, device=device, dtype=dtype,
        context_length=context_length, layout=layout,
    )
