"""The torch engine: one stage of a llama-family model, stepping many sequences at once.

Each request holds its own KV cache for this stage's layers: one tensor (layers, K/V, kv heads,
capacity, head_dim), created on the request's first chunk with room for the chunk and grown by
doubling up to ``context_length``, so a short request never costs a full context of memory.
:meth:`TorchEngine.release` drops it, or keeps it for a later request whose prompt begins the same
way (``torch.prompt_cache``, a whole model's engine: :meth:`TorchEngine.reuse`). On a CUDA GPU
(with ``torch.cuda_graphs``, the default) the caches are instead slots of one pool allocated at
load, and decode steps replay CUDA graphs (:mod:`skulk_torch.graphs`); those are not kept.

A step runs in a worker thread under ``torch.inference_mode()``; a lock keeps steps, releases and
closing one at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from attrs import define, field

from skulk_core import (
    BackendError,
    EngineOptions,
    EngineThread,
    ModelCard,
    RequestError,
    SampledToken,
    Sampler,
    SequenceChunk,
    ShardRange,
    StageOutput,
    Tensor,
    best_kept,
    compute_thread,
    draw_outputs,
    score_token,
)

from skulk_torch.graphs import DecodeSlots
from skulk_torch.model import SequenceSlice, StageModel
from skulk_torch.settings import TorchSettings
from skulk_torch.tokenizer import PieceTokenizer

if TYPE_CHECKING:
    import torch

log = logging.getLogger("skulk.torch")

MIN_CACHE_CAPACITY = 256  # positions a new sequence's cache holds at first
SCORED_ROWS = 64  # a scored prompt's positions whose logits are computed at once
_HIDDEN_DTYPES = {"float32", "float16", "bfloat16"}


@define(eq=False)
class _Sequence:
    cache: torch.Tensor  # (layers, 2, kv heads, capacity, head_dim)
    length: int = 0  # positions cached
    slot: int | None = None  # its slot of the stage's KV pool, where there is one
    tokens: list[int] = field(factory=list)  # what the cache holds, where the engine keeps caches

    @property
    def capacity(self) -> int:
        return self.cache.shape[3]


class TorchEngine:
    """A loaded stage; satisfies :class:`skulk_core.Engine`. Build it with :func:`skulk_torch.backend.load_engine`."""

    def __init__(
        self,
        card: ModelCard,
        shard: ShardRange,
        options: EngineOptions,
        model: StageModel,
        tokenizer: PieceTokenizer | None,
        threads: int,
    ) -> None:
        self.card = card
        self.shard = shard
        self.context_length = options.context_length
        self.max_sequences = options.max_sequences
        self.tokenizer = tokenizer
        self.threads = threads
        self.model: StageModel | None = model
        self.config = model.config
        self.device = model.device
        self.dtype = model.dtype
        self.layout = model.layout  # how its matrices are held and multiplied (skulk_torch.model.LAYOUTS)
        self._sequences: dict[str, _Sequence] = {}
        self._slots = decode_slots(model, options)  # decode steps as CUDA graphs over one KV pool (a GPU only)
        # Released sequences whose caches are kept for a later request (PrefixCachingEngine), oldest
        # first: a whole model's, with caches of their own (not slots of a pool: see _release).
        whole = shard.is_first and shard.is_last
        self._keep = whole and options.settings_as(TorchSettings, "torch").prompt_cache
        self._kept: dict[str, _Sequence] = {}
        self._lock = threading.Lock()
        # Steps and releases, in order. On a CPU, on the thread every CPU engine of this process
        # shares (one OpenMP team: skulk_core.threads); on a GPU, on a thread of its own.
        self._thread = compute_thread() if self.device.type == "cpu" else EngineThread(f"torch {card.id} [{shard.start}, {shard.end})")

    # -- stepping ----------------------------------------------------------------------------

    async def step(self, batch: Sequence[SequenceChunk]) -> list[StageOutput]:
        """Run every chunk through this stage's layers in one forward pass."""
        if not batch:
            return []
        self._open_model()  # a closed engine says so
        return await self._thread.run(self._step, list(batch))

    async def step_and_draw(self, batch: Sequence[SequenceChunk], samplers: Mapping[str, Sampler]) -> list[StageOutput]:
        """:meth:`step`, drawing the next token of requests in ``samplers`` on the same thread right
        after it (:class:`skulk_core.DrawingEngine`), not on the event loop."""
        if not batch:
            return []
        self._open_model()
        return await self._thread.run(lambda: draw_outputs(self._step(list(batch)), samplers))

    @property
    def step_thread(self) -> EngineThread:
        """The thread every step runs on (:class:`skulk_core.BlockingStepEngine`): the core passes a
        pipeline step on from it, right after the step."""
        return self._thread

    def step_blocking(self, batch: Sequence[SequenceChunk]) -> list[StageOutput]:
        """:meth:`step` for a caller on a thread of its own (a direct stage link's): the same step,
        on the same thread, in order with every other call; blocks until it is done."""
        if not batch:
            return []
        self._open_model()
        return self._thread.call(self._step, list(batch))

    def _step(self, batch: list[SequenceChunk]) -> list[StageOutput]:
        import torch

        with self._lock, torch.inference_mode():
            model = self._open_model()
            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)  # process-wide: another engine here may use another count
            self._check(batch)
            x = self._inputs(batch)
            fresh = [chunk.request_id for chunk in batch if chunk.request_id not in self._sequences]
            try:
                slices = []
                row = 0
                for chunk in batch:
                    seq = self._reserve(model, chunk.request_id, chunk.position + chunk.length)
                    slices.append(SequenceSlice(row, chunk.length, chunk.position, seq.cache))
                    row += chunk.length
                if self._slots is not None and all(chunk.length == 1 for chunk in batch):
                    slots = [self._sequences[chunk.request_id].slot for chunk in batch]
                    rows = self._slots.step(x, [chunk.position for chunk in batch], slots)  # type: ignore[arg-type]
                    outputs = self._decoded(batch, rows)
                else:
                    positions = torch.from_numpy(
                        np.concatenate([np.arange(c.position, c.position + c.length) for c in batch])
                    ).to(self.device)
                    x = model.forward(x, positions, slices, self.threads)
                    outputs = self._outputs(model, batch, x)
            except BaseException:
                for request_id in fresh:
                    self._drop(request_id)
                for chunk in batch:  # a failed step may have overwritten cache from its chunk on
                    seq = self._sequences.get(chunk.request_id)
                    if seq is not None:
                        seq.length = min(seq.length, chunk.position)
                        del seq.tokens[seq.length :]
                raise
            for chunk in batch:
                seq = self._sequences[chunk.request_id]
                seq.length = chunk.position + chunk.length
                if self._keep:
                    seq.tokens[chunk.position :] = chunk.tokens or ()
            return outputs

    def _check(self, batch: list[SequenceChunk]) -> None:
        """Refuse a bad step before anything changes."""
        seen: set[str] = set()
        for chunk in batch:
            request_id = chunk.request_id
            if request_id in seen:
                raise BackendError(f"a step holds request {request_id} twice; send one chunk per request per step")
            seen.add(request_id)
            if self.shard.is_first:
                if chunk.tokens is None:
                    raise BackendError(f"the first stage needs token ids, but the chunk of request {request_id} has none")
            elif chunk.hidden is None:
                raise BackendError(
                    f"stage [{self.shard.start}, {self.shard.end}) needs the previous stage's hidden states, "
                    f"but the chunk of request {request_id} has none"
                )
            if chunk.length < 1:
                raise RequestError(f"the chunk of request {request_id} is empty", param="prompt")
            end = chunk.position + chunk.length
            if end > self.context_length:
                raise RequestError(
                    f"This model's maximum context length is {self.context_length} tokens; request {request_id} "
                    f"would reach {end}. Shorten the prompt or the completion, or raise serve.context_length.",
                    param="messages",
                    code="context_length_exceeded",
                )
            cached = self._sequences[request_id].length if request_id in self._sequences else 0
            if not 0 <= chunk.position <= cached:
                raise BackendError(
                    f"the chunk of request {request_id} starts at position {chunk.position}, but its KV cache holds "
                    f"{cached} positions; a chunk must continue (or rewind) its sequence"
                )
        fresh = len(seen - self._sequences.keys())
        if len(self._sequences) + fresh > self.max_sequences:
            raise BackendError(
                f"the torch engine holds at most {self.max_sequences} sequences and {len(self._sequences)} are in use; "
                f"this step needs {fresh} more. Release finished requests first, or load the model with a larger "
                "max_sequences (serve.max_sequences)"
            )

    def _inputs(self, batch: list[SequenceChunk]) -> torch.Tensor:
        """The batch's rows: embedded tokens (first stage) or the previous stage's activations."""
        import torch

        model = self._open_model()
        if self.shard.is_first:
            ids = np.fromiter((t for chunk in batch for t in chunk.tokens or ()), dtype=np.int64)
            vocab = self.config.vocab_size
            if ids.min() < 0 or ids.max() >= vocab:
                bad = int(ids[(ids < 0) | (ids >= vocab)][0])
                raise RequestError(f"token id {bad} is outside the vocabulary (0 to {vocab - 1})", param="prompt")
            return model.embed_tokens(ids)
        parts = []
        for chunk in batch:
            hidden = chunk.hidden
            assert hidden is not None
            if hidden.dtype not in _HIDDEN_DTYPES or hidden.shape != (chunk.length, self.config.hidden_size):
                raise BackendError(
                    f"request {chunk.request_id}: expected hidden states of shape ({chunk.length}, "
                    f"{self.config.hidden_size}) and a float dtype, got {hidden.shape} {hidden.dtype}"
                )
            parts.append(_from_tensor(hidden))
        return torch.cat(parts).to(device=self.device, dtype=self.dtype)

    def _outputs(self, model: StageModel, batch: list[SequenceChunk], x: torch.Tensor) -> list[StageOutput]:
        import torch

        if not self.shard.is_last:
            rows = x.to(device="cpu", dtype=torch.float32).numpy()
            outputs, row = [], 0
            for chunk in batch:
                part = rows[row : row + chunk.length]
                outputs.append(StageOutput(chunk.request_id, hidden=Tensor("float32", part.shape, part.tobytes())))
                row += chunk.length
            return outputs
        ends = np.cumsum([chunk.length for chunk in batch]) - 1
        wanted = [i for i, chunk in enumerate(batch) if chunk.want_logits]
        logits: list[np.ndarray | None] = [None] * len(batch)
        if wanted:
            picked = model.logits(x[torch.from_numpy(ends[wanted]).to(self.device)]).cpu().numpy()
            for i, row in zip(wanted, picked):
                logits[i] = row
        return [
            StageOutput(chunk.request_id, logits=row, scores=self._scores(model, chunk, x, end + 1 - chunk.length))
            for chunk, row, end in zip(batch, logits, ends)
        ]

    def _scores(self, model: StageModel, chunk: SequenceChunk, x: torch.Tensor, first: int) -> tuple[SampledToken, ...]:
        """A scored prompt chunk's scores (see :class:`skulk_core.SequenceChunk`): the logits of its
        first ``len(score_targets)`` rows (from row ``first`` of ``x``), a slice at a time."""
        targets = chunk.score_targets
        scores: list[SampledToken] = []
        for start in range(0, len(targets), SCORED_ROWS):
            part = targets[start : start + SCORED_ROWS]
            rows = model.logits(x[first + start : first + start + len(part)]).float().cpu().numpy()
            scores.extend(score_token(row, target, chunk.score_top) for row, target in zip(rows, part))
        return tuple(scores)

    def _decoded(self, batch: list[SequenceChunk], rows: torch.Tensor) -> list[StageOutput]:
        """The outputs of a decode step's rows (one a chunk): logits or activations."""
        import torch

        values = rows.to(device="cpu", dtype=torch.float32).numpy()
        if not self.shard.is_last:
            return [
                StageOutput(chunk.request_id, hidden=Tensor("float32", (1, values.shape[1]), values[i : i + 1].tobytes()))
                for i, chunk in enumerate(batch)
            ]
        return [
            StageOutput(
                chunk.request_id,
                logits=values[i] if chunk.want_logits else None,
                scores=tuple(score_token(values[i], target, chunk.score_top) for target in chunk.score_targets),
            )
            for i, chunk in enumerate(batch)
        ]

    def _reserve(self, model: StageModel, request_id: str, needed: int) -> _Sequence:
        """The request's cache, created or grown to hold ``needed`` positions (a pool slot holds
        ``context_length`` from the start)."""
        seq = self._sequences.get(request_id)
        if seq is not None and seq.capacity >= needed:
            return seq
        if seq is None:
            while self._kept and len(self._sequences) + len(self._kept) >= self.max_sequences:
                self._free(self._kept.pop(next(iter(self._kept))))  # the least recently kept
        if self._slots is not None:
            slot, cache = self._slots.acquire()
            seq = self._sequences[request_id] = _Sequence(cache, slot=slot)
            return seq
        capacity = MIN_CACHE_CAPACITY
        while capacity < needed:
            capacity *= 2
        capacity = min(max(capacity, 2 * seq.capacity if seq else 0), self.context_length)
        cache = model.new_cache(capacity)
        if seq is None:
            seq = self._sequences[request_id] = _Sequence(cache)
        else:
            cache[:, :, :, : seq.length] = seq.cache[:, :, :, : seq.length]
            seq.cache = cache
        return seq

    # -- lifetime ----------------------------------------------------------------------------

    async def release(self, request_id: str) -> None:
        """Drop ``request_id``'s KV cache, or keep it for a later request that begins the same way
        (``torch.prompt_cache``); unknown ids are ignored."""
        if request_id in self._sequences:
            # On the engine's thread, after the steps queued before it (the event loop never waits
            # on the lock a step holds).
            await self._thread.run(self._release, request_id)

    def _release(self, request_id: str) -> None:
        with self._lock:
            seq = self._sequences.get(request_id)
            if self._keep and self._slots is None and seq is not None and seq.tokens:
                del self._sequences[request_id]
                self._kept[request_id] = seq  # the most recently kept last
            else:
                self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        seq = self._sequences.pop(request_id, None)
        if seq is not None:
            self._free(seq)

    def _free(self, seq: _Sequence) -> None:
        if seq.slot is not None and self._slots is not None:
            self._slots.release(seq.slot)

    async def reuse(self, request_id: str, prompt: Sequence[int]) -> int:
        """:class:`skulk_core.PrefixCachingEngine`: give ``request_id`` the kept sequence that
        :func:`skulk_core.best_kept` picks for ``prompt``, cut back to the part they share."""
        if not self._kept or request_id in self._sequences:
            return 0
        return await self._thread.run(self._reuse_locked, request_id, list(prompt))

    def _reuse_locked(self, request_id: str, prompt: list[int]) -> int:
        with self._lock:
            if self.model is None or request_id in self._sequences:
                return 0
            taken = best_kept(((key, seq.tokens, seq.length) for key, seq in self._kept.items()), prompt)
            if taken is None:
                return 0
            best, best_length = taken
            seq = self._kept.pop(best)
            seq.length = best_length
            del seq.tokens[best_length:]
            self._sequences[request_id] = seq
            return best_length

    @property
    def live_sequences(self) -> int:
        return len(self._sequences)

    @property
    def kept_sequences(self) -> int:
        """Released sequences whose caches are kept for a later request (``torch.prompt_cache``)."""
        return len(self._kept)

    def cache_bytes(self) -> int:
        """Bytes the live sequences' KV caches hold (:meth:`kept_bytes`: the kept ones')."""
        return sum(seq.cache.numel() * seq.cache.element_size() for seq in self._sequences.values())

    def kept_bytes(self) -> int:
        """Bytes the kept sequences' KV caches hold (``torch.prompt_cache``)."""
        return sum(seq.cache.numel() * seq.cache.element_size() for seq in self._kept.values())

    def parameter_bytes(self) -> dict[str, int]:
        """Bytes of weights by part (``blocks``, ``embed``, ``head``); see :meth:`StageModel.parameter_bytes`."""
        return self._open_model().parameter_bytes()

    def _open_model(self) -> StageModel:
        if self.model is None:
            raise BackendError(f"the torch engine for {self.card.id} layers [{self.shard.start}, {self.shard.end}) is closed")
        return self.model

    async def close(self) -> None:
        """Free the weights, caches and tokenizer. Safe to call twice."""
        await self._thread.run_last(self._close)  # a shared thread stays for the other engines

    def _close(self) -> None:
        with self._lock:
            self._sequences.clear()
            self._kept.clear()
            if self._slots is not None:
                self._slots.close()
                self._slots = None
            if self.model is not None:
                self.model.close()
            self.model = None
            close = getattr(self.tokenizer, "close", None)
            if close is not None:
                close()


def decode_slots(model: StageModel, options: EngineOptions) -> DecodeSlots | None:
    """The stage's KV pool and decode graphs (:mod:`skulk_torch.graphs`), on a CUDA device with
    ``torch.cuda_graphs``; None elsewhere. A pool the GPU cannot hold fails the load, saying what to change."""
    import torch

    if model.device.type != "cuda" or not options.settings_as(TorchSettings, "torch").cuda_graphs:
        return None
    try:
        return DecodeSlots(model, options.max_sequences, options.context_length, capture=True)
    except torch.OutOfMemoryError as exc:
        config = model.config
        size = len(model.blocks) * 2 * (options.max_sequences + 1) * config.kv_size * options.context_length * model.dtype.itemsize
        raise BackendError(
            f"the KV cache pool for {options.max_sequences} sequences of {options.context_length} positions "
            f"({size / 2**30:.2f} GiB) does not fit on {model.device}: lower serve.max_sequences or "
            "serve.context_length, or set torch.cuda_graphs: false (caches then grow as requests do)"
        ) from exc


def _from_tensor(tensor: Tensor) -> torch.Tensor:
    import torch

    if tensor.dtype == "bfloat16":
        raw = torch.frombuffer(bytearray(tensor.data), dtype=torch.bfloat16)
    else:
        raw = torch.from_numpy(tensor.to_numpy().copy())
    return raw.reshape(tensor.shape)
