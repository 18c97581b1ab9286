"""Decode steps replayed as CUDA graphs.

A decode step of a small stage on a GPU is bound by the host, not the GPU: eager PyTorch launches
every operation of every layer one by one (about 18 per layer), and the launches take longer than
the kernels. Measured on an H100 with the default model (30 layers, float32), a one-token step took
15.5 ms, of which the GPU computed 1.6 ms.

:class:`DecodeSlots` removes that cost for decode steps (one new position per sequence), the steps
that generate every token after the first:

- the stage's KV caches live in one pool allocated at load, ``(layers, K/V, slots, kv heads,
  context_length, head_dim)``, a slot per sequence plus one scratch slot; a sequence takes a free
  slot on its first chunk and gives it back on release. Prefill steps (and any step with a chunk of
  several positions) run eagerly, writing into the same slots;
- a decode step of ``rows`` sequences whose positions are all below ``span`` runs
  :meth:`StageModel.decode_rows`, whose shapes depend only on ``rows`` and ``span``. It is captured
  once per (rows, span) as a CUDA graph, rows rounded up to a power of two (the spare rows write to
  the scratch slot) and span to a power of two from 256 up to ``context_length``, so at most a few
  dozen graphs exist, captured when first needed, and all share one memory pool;
- replaying a graph copies the step's inputs into the graph's own tensors, launches the whole step
  at once, and returns the output rows.

With ``capture=False`` the same slots and static-shape steps run eagerly, on any device: the tests
check them on a CPU against the ordinary forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from attrs import frozen

from skulk_core import BackendError

if TYPE_CHECKING:
    import torch

    from skulk_torch.model import StageModel

MIN_SPAN = 256  # the shortest attention span a graph is captured for


@frozen
class _Captured:
    graph: torch.cuda.CUDAGraph | None
    x: torch.Tensor  # (rows, hidden): the step's input rows
    positions: torch.Tensor  # (rows,) int64
    slots: torch.Tensor  # (rows,) int64
    out: torch.Tensor  # (rows, hidden) activations, or (rows, vocab) float32 logits on the last stage


class DecodeSlots:
    """The KV pool of one stage, and its decode steps as CUDA graphs."""

    def __init__(self, model: StageModel, max_sequences: int, context_length: int, *, capture: bool) -> None:
        import torch

        config = model.config
        self.model = model
        self.context_length = context_length
        self.capture = capture
        self.scratch = max_sequences  # the extra slot that padding rows write to
        self.pool = torch.zeros(
            len(model.blocks), 2, max_sequences + 1, config.n_kv_heads, context_length, config.head_dim,
            device=model.device, dtype=model.dtype,
        )
        self._free = list(range(max_sequences - 1, -1, -1))
        self._row_buckets = _powers_up_to(1, max_sequences)
        self._span_buckets = _powers_up_to(min(MIN_SPAN, context_length), context_length)
        self._steps: dict[tuple[int, int], _Captured] = {}
        self._memory = torch.cuda.graph_pool_handle() if capture else None

    # -- slots -------------------------------------------------------------------------------

    def acquire(self) -> tuple[int, torch.Tensor]:
        """A free slot and its cache view (layers, K/V, kv heads, context_length, head_dim)."""
        if not self._free:
            raise BackendError("every KV slot of this stage is in use; release finished requests first")
        slot = self._free.pop()
        return slot, self.pool[:, :, slot]

    def release(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def graphs(self) -> int:
        """How many decode steps have been captured."""
        return sum(1 for step in self._steps.values() if step.graph is not None)

    # -- stepping ----------------------------------------------------------------------------

    def step(self, x: torch.Tensor, positions: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """Run one decode position for each row of ``x`` (on the model's device and dtype); the
        output rows: activations, or float32 logits on the last stage (a view, valid until the
        next step)."""
        import torch

        count = x.shape[0]
        rows = next(r for r in self._row_buckets if r >= count)
        span = next(s for s in self._span_buckets if s > max(positions))
        step = self._steps.get((rows, span))
        if step is None:
            step = self._steps[(rows, span)] = self._prepare(rows, span)
        padding = rows - count
        step.x[:count].copy_(x)
        if padding:
            step.x[count:].zero_()
        index = torch.tensor([*positions, *([0] * padding)], dtype=torch.int64)
        where = torch.tensor([*slots, *([self.scratch] * padding)], dtype=torch.int64)
        step.positions.copy_(index, non_blocking=True)
        step.slots.copy_(where, non_blocking=True)
        if step.graph is not None:
            with torch.cuda.device(self.model.device):  # a graph replays on its device's current stream
                step.graph.replay()
            return step.out[:count]
        return self._run(step.x, step.positions, step.slots, span)[:count]

    def _run(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, span: int) -> torch.Tensor:
        model = self.model
        out = model.decode_rows(x, positions, slots, self.pool, span)
        return model.logits(out) if model.shard.is_last else out

    def _prepare(self, rows: int, span: int) -> _Captured:
        """The step's own input tensors, and its graph when capturing: run twice on a side stream
        first (libraries set up their handles and workspaces outside the capture), then captured.
        Both runs write only to the scratch slot."""
        import torch

        model = self.model
        x = torch.zeros(rows, model.config.hidden_size, device=model.device, dtype=model.dtype)
        positions = torch.zeros(rows, dtype=torch.int64, device=model.device)
        slots = torch.full((rows,), self.scratch, dtype=torch.int64, device=model.device)
        if not self.capture:
            return _Captured(None, x, positions, slots, x)
        with torch.cuda.device(model.device):  # the stage's GPU, which need not be the thread's current one
            return self._capture(span, x, positions, slots)

    def _capture(self, span: int, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> _Captured:
        import torch

        model = self.model
        side = torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(x, positions, slots, span)
        torch.cuda.current_stream(model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another engine of this process may load or step on its own thread meanwhile
        with torch.cuda.graph(graph, pool=self._memory, capture_error_mode="thread_local"):
            out = self._run(x, positions, slots, span)
        return _Captured(graph, x, positions, slots, out)

    def close(self) -> None:
        self._steps.clear()
        self.pool = None  # type: ignore[assignment]


def _powers_up_to(first: int, last: int) -> list[int]:
    """first, 2 * first, 4 * first, ... below ``last``, then ``last``."""
    out = []
    value = first
    while value < last:
        out.append(value)
        value *= 2
    out.append(last)
    return out
