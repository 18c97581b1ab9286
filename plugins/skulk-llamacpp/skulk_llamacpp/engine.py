"""The llama.cpp engine: one llama context that advances every live sequence in one ``llama_decode``.

Built on llama.cpp's low-level C API (``llama_batch`` / ``llama_decode`` / ``llama_get_logits_ith``
through llama-cpp-python's ctypes bindings), not its ``Llama`` class, which serves one sequence at a
time. Each request holds a sequence id (a *slot*) of the context for as long as it lives; the
context keeps a separate KV stream per slot (``kv_unified`` off), each ``context_length`` positions
long, so one sequence's attention never sees another's cache and a greedy decode gives the same
tokens alone or batched.

A released request's sequence keeps its cache (``prompt_cache``): the engine knows the tokens in
every sequence, so a new request whose prompt begins with a kept sequence's tokens takes that
sequence, cut back to where they part (:class:`skulk_core.PrefixCachingEngine`). A kept sequence is
evicted, the least recently kept first, when a new request finds no free one.

Embeddings come from a second, small context created on first use (``embeddings`` on, one
sequence), so generation is never disturbed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from heapq import heapify, heappop, heappush

import llama_cpp
import numpy as np
from attrs import frozen

from skulk_core import (
    BackendError,
    EngineOptions,
    ModelCard,
    ModelFiles,
    RequestError,
    SampledToken,
    Sampler,
    SequenceChunk,
    ShardRange,
    StageOutput,
    best_kept,
    compute_thread,
    score_token,
)

from skulk_llamacpp.native import LoadedModel, take_problems, with_problems
from skulk_llamacpp.settings import LlamaCppSettings
from skulk_llamacpp.tokenizer import LlamaCppTokenizer

log = logging.getLogger("skulk.llamacpp")

_GGML_TYPES = {
    "f32": llama_cpp.GGML_TYPE_F32,
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}


_Row = np.ndarray | SampledToken | None  # a chunk's logits, the token drawn from them, or nothing
# A chunk checked by _plan: (position, tokens, want_logits, score_targets, score_top).
_Plan = tuple[int, Sequence[int] | np.ndarray, bool, Sequence[int], int]
_Scores = list[tuple[SampledToken, ...]]  # per chunk: its scored prompt positions, in order

# Positions scored (their logits kept) in one llama_decode: llama.cpp keeps a row of logits for every
# position asked for, so a 512-token scored chunk would hold 512 x vocabulary floats (96 MiB for a
# 49k vocabulary); a scored prompt is decoded in slices of this many positions instead.
_MAX_SCORED = 64

# Chunks this short (decode steps) are checked and copied with plain Python, not numpy. Right after a
# decode has streamed the weights through the caches, each numpy call costs 10-15x what it costs in a
# loop; measured on the default model: 32 us to check a one-token chunk with numpy, against 2.2 us hot.
_SHORT = 8


@frozen
class _Ahead:
    """A request's next decode step, run before the scheduler asked for it (see ``decode_ahead``):
    ``token`` fed at ``position``, and what was drawn after it."""

    position: int
    token: int
    drawn: SampledToken
    sampler: Sampler
    checkpoint: object  # the sampler's state before the draw, restored if the step is not taken


class _Batch:
    """A ``llama_batch`` of ``capacity`` tokens, one sequence id each, with numpy views of its arrays."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.tokens = np.ctypeslib.as_array(self.raw.token, shape=(capacity,))
        self.positions = np.ctypeslib.as_array(self.raw.pos, shape=(capacity,))
        self.outputs = np.ctypeslib.as_array(self.raw.logits, shape=(capacity,))
        np.ctypeslib.as_array(self.raw.n_seq_id, shape=(capacity,))[:] = 1
        self._seq_ids = self.raw.seq_id
        self.size = 0

    def add(self, tokens: Sequence[int] | np.ndarray, first_position: int, seq_id: int) -> None:
        """Append ``tokens`` (no outputs requested); the caller checks capacity."""
        start, end = self.size, self.size + len(tokens)
        seq_ids = self._seq_ids
        if end - start <= _SHORT:  # a decode step's one token: plain stores beat numpy's calls
            raw = self.raw
            for i, token in enumerate(tokens, start):
                raw.token[i] = token
                raw.pos[i] = first_position + i - start
                raw.logits[i] = 0
                seq_ids[i][0] = seq_id
        else:
            self.tokens[start:end] = tokens
            self.positions[start:end] = np.arange(first_position, first_position + len(tokens), dtype=np.int32)
            self.outputs[start:end] = 0
            for i in range(start, end):
                seq_ids[i][0] = seq_id
        self.size = end

    def free(self) -> None:
        if self.raw is not None:
            llama_cpp.llama_batch_free(self.raw)
            self.raw = None


def _context_params(
    settings: LlamaCppSettings, threads: int, *, n_ctx: int, n_seq_max: int, embeddings: bool
) -> llama_cpp.llama_context_params:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_seq_max = n_seq_max
    params.n_batch = settings.n_batch
    params.n_ubatch = min(settings.n_batch, 512)
    params.n_threads = threads
    params.n_threads_batch = threads
    params.kv_unified = False  # one KV stream per sequence: sequences never share cells
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    params.type_k = params.type_v = _GGML_TYPES[settings.kv_cache_type]
    params.embeddings = embeddings
    if embeddings:
        # Per-token embeddings, averaged here: llama.cpp's own mean pooling averages only the last
        # micro-batch of a long input, so an input longer than n_ubatch would get a wrong mean.
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        params.n_outputs_max_per_seq = 0  # every position is an output
    params.no_perf = True
    return params


class LlamaCppEngine:
    """A whole model loaded by llama.cpp; satisfies :class:`skulk_core.Engine` and
    :class:`skulk_core.EmbeddingEngine`. Build it with :func:`load_engine`."""

    def __init__(
        self, card: ModelCard, shard: ShardRange, options: EngineOptions, settings: LlamaCppSettings, model: LoadedModel
    ) -> None:
        self.card = card
        self.shard = shard
        self.context_length = options.context_length
        self.max_sequences = options.max_sequences
        self.settings = settings
        self.threads = options.threads or os.cpu_count() or 1
        self._model = model
        self.tokenizer = LlamaCppTokenizer(model)
        self.vocab_size = model.n_vocab
        self.embedding_size = model.n_embd

        params = _context_params(
            settings, self.threads, n_ctx=self.context_length * self.max_sequences, n_seq_max=self.max_sequences, embeddings=False
        )
        take_problems()
        self._ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self._ctx:
            raise BackendError(
                with_problems(
                    f"llama.cpp could not create a context for {self.max_sequences} sequences of "
                    f"{self.context_length} positions; lower serve.max_sequences or serve.context_length"
                )
            )
        per_sequence = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        if per_sequence < self.context_length:
            llama_cpp.llama_free(self._ctx)
            raise BackendError(
                f"llama.cpp gave each sequence {per_sequence} positions, fewer than the {self.context_length} asked for"
            )
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._row_type = ctypes.c_float * self.vocab_size  # one row of llama.cpp's logits, for views
        self._batch = _Batch(settings.n_batch)
        self._lock = threading.Lock()  # one native call on the generation context at a time
        # Steps, releases and embeddings, in order, on the thread every CPU engine of this process
        # shares: one OpenMP team (skulk_core.threads).
        self._thread = compute_thread()
        self._slots: dict[str, int] = {}  # request id -> sequence id
        self._free_slots = list(range(self.max_sequences))
        heapify(self._free_slots)  # the lowest free id first, so a run is repeatable
        self._lengths = [0] * self.max_sequences  # positions cached per sequence id
        # Per sequence id, tokens its cache holds: always a prefix of them (after a failed step,
        # perhaps shorter than the cache), so that a kept sequence is reused only where it is known.
        self._tokens: list[list[int]] = [[] for _ in range(self.max_sequences)]
        self._kept: dict[int, None] = {}  # released sequences whose caches are kept, oldest first
        self._decodes_ahead = settings.decodes_ahead(self.threads)
        self._ahead: dict[str, _Ahead] = {}  # request id -> its next step, decoded already
        self._eos = frozenset(self.tokenizer.eos_token_ids)

        self._embed_lock = threading.Lock()
        self._embed_ctx: int | None = None
        self._embed_batch: _Batch | None = None

    # -- generation --------------------------------------------------------------------------

    async def step(self, batch: Sequence[SequenceChunk]) -> list[StageOutput]:
        """Run every chunk in one ``llama_decode`` (several if the step exceeds ``n_batch`` tokens)."""
        return await self.step_and_draw(batch, {})

    async def step_and_draw(self, batch: Sequence[SequenceChunk], samplers: Mapping[str, Sampler]) -> list[StageOutput]:
        """:meth:`step`, drawing the next token of requests in ``samplers`` from llama.cpp's own
        logits buffer on the compute thread (:class:`skulk_core.DrawingEngine`): no copy of the
        vocabulary's logits, and no reading them on another CPU."""
        if not batch:
            return []
        self._check_open()
        draws = [samplers.get(chunk.request_id) for chunk in batch] if samplers else None
        rows, scores = await self._thread.run(self._step, list(batch), draws)
        return [
            StageOutput(chunk.request_id, sampled=row, scores=scored)
            if isinstance(row, SampledToken)
            else StageOutput(chunk.request_id, logits=row, scores=scored)
            for chunk, row, scored in zip(batch, rows, scores)
        ]

    def _step(self, batch: list[SequenceChunk], draws: list[Sampler | None] | None = None) -> tuple[list[_Row], _Scores]:
        with self._lock:
            self._check_open()
            plan = self._plan(batch)
            rows: list[_Row] = [None] * len(batch)
            scores: _Scores = [()] * len(batch)
            todo = list(range(len(batch)))  # chunks not decoded ahead: decoded now
            if self._ahead:
                todo = [i for i in todo if not self._take_ahead(batch[i], draws[i] if draws else None, rows, i)]
            if todo:
                decoded, scored = self._run(
                    [batch[i].request_id for i in todo], [plan[i] for i in todo], [draws[i] for i in todo] if draws else None
                )
                for i, row, chunk_scores in zip(todo, decoded, scored):
                    rows[i] = row
                    scores[i] = chunk_scores
            if draws and self._decodes_ahead:
                ahead = self._next_steps(batch, plan, draws, rows)
                if ahead:
                    # Queued behind this call, before the scheduler can ask for the step: the thread
                    # decodes it while the event loop streams this token and plans the next step.
                    self._thread.submit(self._decode_ahead, ahead)
            return rows, scores

    def _run(self, request_ids: list[str], plan: list[_Plan], draws: list[Sampler | None] | None) -> tuple[list[_Row], _Scores]:
        """Decode ``plan`` (checked by :meth:`_plan`) for ``request_ids``, giving new ones a slot."""
        fresh = [request_id for request_id in request_ids if request_id not in self._slots]
        for request_id in fresh:
            self._slots[request_id] = self._free_slot()
        seq_ids = [self._slots[request_id] for request_id in request_ids]
        try:
            for seq_id, (position, *_) in zip(seq_ids, plan):
                if position < self._lengths[seq_id]:  # the core rewound this sequence
                    self._rewind(seq_id, position)
            decoded = self._decode(seq_ids, plan, draws)
        except BaseException:
            for seq_id, (position, *_) in zip(seq_ids, plan):
                self._lengths[seq_id] = int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq_id)) + 1
                del self._tokens[seq_id][position:]  # what the failed step wrote is not known
            for request_id in fresh:
                self._release(request_id, keep=False)
            raise
        for seq_id, (position, tokens, *_) in zip(seq_ids, plan):
            self._lengths[seq_id] = position + len(tokens)
            known = self._tokens[seq_id]
            if position <= len(known):
                del known[position:]
                known.extend(tokens.tolist() if isinstance(tokens, np.ndarray) else tokens)
        return decoded

    def _rewind(self, seq_id: int, position: int) -> None:
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq_id, position, -1):
            raise BackendError(f"llama.cpp could not rewind sequence {seq_id} to position {position}")
        self._lengths[seq_id] = position
        del self._tokens[seq_id][position:]

    # -- kept caches -------------------------------------------------------------------------

    def _free_slot(self) -> int:
        """A sequence id for a new request: a free one (the lowest, so a run is repeatable), else
        the least recently kept one, emptied."""
        if self._free_slots:
            return heappop(self._free_slots)
        seq_id = next(iter(self._kept))
        del self._kept[seq_id]
        self._clear(seq_id)
        return seq_id

    def _clear(self, seq_id: int) -> None:
        if self._ctx:
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        self._lengths[seq_id] = 0
        self._tokens[seq_id].clear()

    async def reuse(self, request_id: str, prompt: Sequence[int]) -> int:
        """:class:`skulk_core.PrefixCachingEngine`: give ``request_id`` the kept sequence that
        :func:`skulk_core.best_kept` picks for ``prompt``, cut back to the part they share."""
        if not self._kept or request_id in self._slots:
            return 0
        return await self._thread.run(self._reuse_locked, request_id, list(prompt))

    def _reuse_locked(self, request_id: str, prompt: list[int]) -> int:
        with self._lock:
            if not self._ctx or request_id in self._slots:
                return 0
            taken = best_kept(((seq_id, self._tokens[seq_id], self._lengths[seq_id]) for seq_id in self._kept), prompt)
            if taken is None:
                return 0
            best, best_length = taken
            del self._kept[best]
            self._slots[request_id] = best
            if self._lengths[best] > best_length:
                self._rewind(best, best_length)
            return best_length

    @property
    def kept_sequences(self) -> int:
        """Released sequences whose caches are kept for a later request."""
        return len(self._kept)

    # -- decoding ahead ----------------------------------------------------------------------
    #
    # After a step whose tokens were drawn here, the next step of each such sequence is already
    # known: the token just drawn, at the next position. With ``decode_ahead`` on, the compute
    # thread decodes it (and draws from it) right away, instead of waiting for the event loop to
    # stream the token, plan the next step and hand it over: that round trip leaves the critical
    # path of a stream, given a CPU for the event loop (``auto`` checks that llama.cpp's threads
    # leave one). When the scheduler asks for that step, the token is there. A step it never asks
    # for (the request stopped, or was cancelled) costs one decode of compute; one it asks for
    # differently is undone: the KV cache is cut back and the sampler's generator restored, so
    # seeds stay reproducible.

    def _next_steps(
        self, batch: list[SequenceChunk], plan: list[_Plan], draws: list[Sampler | None], rows: list[_Row]
    ) -> list[tuple[str, int, int, Sampler]]:
        """(request id, position, token, sampler) of every next step worth decoding ahead: a token
        drawn here by a sampler that may draw ahead, not an end of generation, within the context."""
        steps = []
        for chunk, (position, tokens, *_), sampler, row in zip(batch, plan, draws, rows):
            if sampler is None or not isinstance(row, SampledToken) or not sampler.draws_ahead:
                continue
            next_position = position + len(tokens)
            if row.token_id in self._eos or next_position + 1 >= self.context_length:
                continue  # most likely the last token: the scheduler stops here
            steps.append((chunk.request_id, next_position, row.token_id, sampler))
        return steps

    def _decode_ahead(self, steps: list[tuple[str, int, int, Sampler]]) -> None:
        with self._lock:
            if not self._ctx:
                return
            # Still as planned: not released meanwhile, nothing decoded for it since.
            steps = [
                step
                for step in steps
                if step[0] in self._slots and step[0] not in self._ahead and self._lengths[self._slots[step[0]]] == step[1]
            ]
            if not steps:
                return
            checkpoints = [sampler.checkpoint() for _, _, _, sampler in steps]
            try:
                rows, _ = self._run(
                    [request_id for request_id, _, _, _ in steps],
                    [(position, (token,), True, (), 0) for _, position, token, _ in steps],
                    [sampler for _, _, _, sampler in steps],
                )
            except Exception:
                for (_, _, _, sampler), checkpoint in zip(steps, checkpoints):
                    sampler.restore(checkpoint)
                log.warning("decoding ahead failed; the scheduler's own step will decode it", exc_info=True)
                return
            for (request_id, position, token, sampler), checkpoint, row in zip(steps, checkpoints, rows):
                if isinstance(row, SampledToken):
                    self._ahead[request_id] = _Ahead(position, token, row, sampler, checkpoint)
                else:  # not drawn after all: the step is undone, and decoded when asked for
                    self._undo(request_id, sampler, checkpoint, position)

    def _take_ahead(self, chunk: SequenceChunk, sampler: Sampler | None, rows: list[_Row], index: int) -> bool:
        """Put the token decoded ahead for ``chunk`` in ``rows[index]`` if it is the step asked for;
        otherwise undo that step. True when taken."""
        ahead = self._ahead.pop(chunk.request_id, None)
        if ahead is None:
            return False
        if sampler is ahead.sampler and chunk.position == ahead.position and chunk.tokens == (ahead.token,):
            rows[index] = ahead.drawn
            return True
        self._undo(chunk.request_id, ahead.sampler, ahead.checkpoint, ahead.position)
        return False

    def _undo(self, request_id: str, sampler: Sampler, checkpoint: object, position: int) -> None:
        """Take back a step decoded ahead from ``position``: the sampler's draw and the KV cache."""
        sampler.restore(checkpoint)
        seq_id = self._slots.get(request_id)
        if seq_id is not None and self._lengths[seq_id] > position:
            self._rewind(seq_id, position)

    def _plan(self, batch: list[SequenceChunk]) -> list[_Plan]:
        """Check the whole step before anything changes: one :data:`_Plan` per chunk."""
        plan = []
        seen: set[str] = set()
        for chunk in batch:
            request_id = chunk.request_id
            if request_id in seen:
                raise BackendError(f"a step holds request {request_id} twice; send one chunk per request per step")
            seen.add(request_id)
            if chunk.tokens is None:
                raise BackendError(
                    f"the llamacpp backend runs whole models from token ids, but the chunk of request {request_id} "
                    "carries hidden states"
                )
            if not chunk.tokens:
                raise RequestError(f"the chunk of request {request_id} holds no tokens", param="prompt")
            end = chunk.position + chunk.length
            if end > self.context_length:
                raise RequestError(
                    f"This model's maximum context length is {self.context_length} tokens; request "
                    f"{request_id} would reach {end}. Shorten the prompt or the completion, or raise "
                    "serve.context_length.",
                    param="messages",
                    code="context_length_exceeded",
                )
            cached = self._lengths[self._slots[request_id]] if request_id in self._slots else 0
            if not 0 <= chunk.position <= cached:
                raise BackendError(
                    f"the chunk of request {request_id} starts at position {chunk.position}, but its KV cache "
                    f"holds {cached} positions; a chunk must continue (or rewind) its sequence"
                )
            tokens: Sequence[int] | np.ndarray
            if len(chunk.tokens) <= _SHORT:
                tokens = chunk.tokens
                outside = [t for t in tokens if not 0 <= t < self.vocab_size]
            else:
                ids = np.asarray(chunk.tokens, dtype=np.int64)
                outside = ids[(ids < 0) | (ids >= self.vocab_size)].tolist()
                tokens = ids.astype(np.int32)
            targets = chunk.score_targets
            if len(targets) > chunk.length:
                raise BackendError(
                    f"the chunk of request {request_id} has {len(targets)} score targets for {chunk.length} positions"
                )
            outside += [t for t in targets if not 0 <= t < self.vocab_size]
            if outside:
                raise RequestError(
                    f"token id {outside[0]} of request {request_id} is outside the vocabulary (0 to {self.vocab_size - 1})",
                    param="prompt",
                )
            plan.append((chunk.position, tokens, chunk.want_logits, targets, chunk.score_top))
        fresh = len(seen - self._slots.keys())
        if fresh > len(self._free_slots) + len(self._kept):
            raise BackendError(
                f"the llamacpp engine holds at most {self.max_sequences} sequences and {len(self._slots)} are in "
                f"use; this step needs {fresh} more. Release finished requests first, or load the model with a "
                "larger max_sequences (serve.max_sequences)"
            )
        return plan

    def _decode(self, seq_ids: list[int], plan: list[_Plan], draws: list[Sampler | None] | None) -> tuple[list[_Row], _Scores]:
        """Fill the llama_batch chunk after chunk, decoding whenever it is full (or holds
        ``_MAX_SCORED`` scored positions) and once at the end."""
        batch = self._batch
        logits: list[_Row] = [None] * len(plan)
        scores: list[list[SampledToken]] = [[] for _ in plan]
        pending: list[tuple[int, int]] = []  # (chunk index, batch row whose logits it wants)
        scoring: list[tuple[int, int, int, int]] = []  # (chunk index, batch row, target token, top)
        batch.size = 0
        # In sequence-id order: llama.cpp computes a micro-batch over a contiguous run of KV
        # streams, so sequences out of order split a step into several graphs. Measured with 8
        # sequences whose ids came back as 4-7, 0-3: 228 tokens/s decoding together, 273 in order.
        order = range(len(plan)) if len(plan) == 1 else sorted(range(len(plan)), key=seq_ids.__getitem__)
        for index in order:
            seq_id, (position, tokens, want_logits, targets, top) = seq_ids[index], plan[index]
            done = 0
            while done < len(tokens):
                take = min(len(tokens) - done, batch.capacity - batch.size)
                if done < len(targets):
                    if len(scoring) == _MAX_SCORED:
                        self._run_batch(pending, scoring, logits, scores, draws)
                        continue
                    take = min(take, _MAX_SCORED - len(scoring))
                first = batch.size
                batch.add(tokens[done : done + take], position + done, seq_id)
                for offset in range(min(take, len(targets) - done)):
                    batch.outputs[first + offset] = 1
                    scoring.append((index, first + offset, int(targets[done + offset]), top))
                done += take
                if done == len(tokens) and want_logits:
                    batch.outputs[batch.size - 1] = 1
                    pending.append((index, batch.size - 1))
                if batch.size == batch.capacity:
                    self._run_batch(pending, scoring, logits, scores, draws)
        if batch.size:
            self._run_batch(pending, scoring, logits, scores, draws)
        return logits, [tuple(chunk_scores) for chunk_scores in scores]

    def _row_view(self, row: int) -> np.ndarray:
        """Batch row ``row``'s logits: a view of llama.cpp's buffer, valid until the next decode."""
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, row)
        if not pointer:
            raise BackendError(with_problems(f"llama.cpp returned no logits for batch row {row}"))
        return np.frombuffer(self._row_type.from_address(ctypes.addressof(pointer.contents)), dtype=np.float32)

    def _run_batch(
        self,
        pending: list[tuple[int, int]],
        scoring: list[tuple[int, int, int, int]],
        logits: list[_Row],
        scores: list[list[SampledToken]],
        draws: list[Sampler | None] | None,
    ) -> None:
        batch = self._batch
        batch.raw.n_tokens = batch.size
        take_problems()
        status = llama_cpp.llama_decode(self._ctx, batch.raw)
        if status != 0:
            raise BackendError(with_problems(f"llama_decode failed with status {status} on a batch of {batch.size} tokens"))
        for index, row, target, top in scoring:
            scores[index].append(score_token(self._row_view(row), target, top))
        scoring.clear()
        for index, row in pending:
            view = self._row_view(row)
            sampler = draws[index] if draws else None
            if sampler is not None:
                # The sampler keeps nothing of the view. Measured right after a decode of the
                # default model, the view and an argmax take 45 us; through
                # np.ctypeslib.as_array, or a copy, 61-68 us.
                sampled = sampler.draw(view)
                if sampled is not None:
                    logits[index] = sampled
                    continue
            logits[index] = view.copy()
        pending.clear()
        batch.size = 0

    async def release(self, request_id: str) -> None:
        """Drop ``request_id``'s KV cache and free its slot; unknown ids are ignored."""
        if request_id in self._slots:
            await self._thread.run(self._release_locked, request_id)

    def _release_locked(self, request_id: str) -> None:
        with self._lock:
            self._release(request_id)

    def _release(self, request_id: str, *, keep: bool = True) -> None:
        """Free ``request_id``'s sequence; with ``prompt_cache`` its cache is kept for a later request."""
        self._ahead.pop(request_id, None)
        seq_id = self._slots.pop(request_id, None)
        if seq_id is None:
            return
        if keep and self.settings.prompt_cache and self._ctx and self._tokens[seq_id]:
            self._kept[seq_id] = None  # the most recently kept, last
            return
        self._clear(seq_id)
        heappush(self._free_slots, seq_id)

    @property
    def live_sequences(self) -> int:
        return len(self._slots)

    # -- embeddings --------------------------------------------------------------------------

    async def embed(self, tokens: Sequence[int]) -> list[float]:
        """The mean of the final hidden states over ``tokens``, L2-normalised."""
        return await self._thread.run(self._embed, list(tokens))

    def _embed(self, tokens: list[int]) -> list[float]:
        if not tokens:
            raise RequestError("an input to embed is empty", param="input")
        if len(tokens) > self.context_length:
            raise RequestError(
                f"an input has {len(tokens)} tokens; the most this model embeds is {self.context_length}",
                param="input",
                code="context_length_exceeded",
            )
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise RequestError(f"an input holds a token id outside the vocabulary (0 to {self.vocab_size - 1})", param="input")
        ids = ids.astype(np.int32)
        with self._embed_lock:
            self._check_open()
            ctx, batch = self._embedding_context()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            total = np.zeros(self.embedding_size, dtype=np.float64)
            for start in range(0, len(ids), batch.capacity):
                piece = ids[start : start + batch.capacity]
                batch.size = 0
                batch.add(piece, start, 0)
                batch.outputs[: batch.size] = 1
                batch.raw.n_tokens = batch.size
                take_problems()
                status = llama_cpp.llama_decode(ctx, batch.raw)
                if status != 0:
                    raise BackendError(with_problems(f"llama_decode failed with status {status} while embedding"))
                pointer = llama_cpp.llama_get_embeddings(ctx)
                if not pointer:
                    raise BackendError(with_problems("llama.cpp returned no embeddings"))
                rows = np.ctypeslib.as_array(pointer, shape=(len(piece), self.embedding_size))
                total += rows.sum(axis=0, dtype=np.float64)
            mean = total / len(ids)
            norm = float(np.linalg.norm(mean))
            return (mean / norm if norm > 0 else mean).tolist()

    def _embedding_context(self) -> tuple[int, _Batch]:
        if self._embed_ctx is None:
            params = _context_params(self.settings, self.threads, n_ctx=self.context_length, n_seq_max=1, embeddings=True)
            take_problems()
            ctx = llama_cpp.llama_init_from_model(self._model.ptr, params)
            if not ctx:
                raise BackendError(with_problems("llama.cpp could not create the embedding context"))
            self._embed_ctx = ctx
            self._embed_batch = _Batch(min(self.settings.n_batch, 512))
        assert self._embed_batch is not None
        return self._embed_ctx, self._embed_batch

    # -- lifetime ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._ctx:
            raise BackendError(f"the llamacpp engine for {self.card.id} is closed")

    async def close(self) -> None:
        """Free both contexts, the batches and the model. Safe to call twice."""
        await self._thread.run_last(self._close)  # the shared thread stays for the other engines

    def _close(self) -> None:
        with self._lock, self._embed_lock:
            if self._embed_ctx is not None:
                llama_cpp.llama_free(self._embed_ctx)
                self._embed_ctx = None
            if self._embed_batch is not None:
                self._embed_batch.free()
                self._embed_batch = None
            if self._ctx:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None
            self._batch.free()
            self._slots.clear()
            self._kept.clear()
            self._ahead.clear()
            self._model.free()


def load_engine(card: ModelCard, files: ModelFiles, shard: ShardRange, options: EngineOptions) -> LlamaCppEngine:
    """Load ``files`` into a ready engine (blocking: the backend calls it in a worker thread)."""
    settings = options.settings_as(LlamaCppSettings, "llamacpp")
    model = LoadedModel(files.primary, settings)
    try:
        if options.context_length > model.n_ctx_train:
            log.warning(
                "%s: context_length %d exceeds the %d positions the model was trained on; output past them may degrade",
                card.id,
                options.context_length,
                model.n_ctx_train,
            )
        return LlamaCppEngine(card, shard, options, settings, model)
    except BaseException:
        model.free()
        raise
