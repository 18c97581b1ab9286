"""Serving models: the scheduler that keeps every loaded model busy, and the node's model server.

One :class:`InstanceRunner` per served instance runs a loop that advances every live request in one
engine step (continuous batching): decoding sequences contribute one token each, new requests are
prefilled in chunks within a token budget, so a long prompt never stalls the others. Logits come
back to the core's sampler (constrained to the request's response format, see
:mod:`skulk_core.constraints`), text is assembled here (UTF-8 safe, stop sequences held back until
they can be ruled out), and each request's chunks go to its own stream. A consumer that stops
reading (its client went away) frees its sequence at the next step.
"""

from __future__ import annotations

import codecs
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio
from attrs import define, field, frozen

from skulk_core.backend import MemorySiteReporter, SequenceChunk, StageOutput, Tokenizer, shared_prefix
from skulk_core.chat import render_chat
from skulk_core.constraints import JsonObjectConstraint, TokenConstraint, TokenTexts
from skulk_core.errors import ModelError, PlacementError, RequestError, SkulkError, TransportError
from skulk_core.model import DEFAULT_MODEL_ID, ModelCard
from skulk_core.pipeline import StageChain
from skulk_core.placement import NodeResources
from skulk_core.sampling import Sampler, SamplingParams, TokenLogprob
from skulk_core.telemetry import MetricSample, TraceSpan

if TYPE_CHECKING:
    from skulk_core.node import Node

log = logging.getLogger("skulk.inference")

DEFAULT_CONTEXT = 4096  # per sequence, when the config does not say (capped by the model's own)
PREFILL_BUDGET = 512  # tokens per step across all prefilling sequences
RESPONSE_FORMATS = ("text", "json_object")  # json_object: the output is one JSON object


class ModelNotFoundError(RequestError):
    def __init__(self, model: str, known: Sequence[str]) -> None:
        super().__init__(
            f"The model {model!r} does not exist on this node; available: {', '.join(known) or 'none'}",
            param="model",
            code="model_not_found",
        )


class ModelNotReadyError(SkulkError):
    """The model is still loading (or failed to load); the frontend answers 503."""


class InstanceLostError(ModelNotReadyError):
    """The instance serving a request stopped (a stage's node left, or it was removed). A request
    that has produced no token yet is retried on the next placement."""


def _check_format(_: object, attribute: object, value: str) -> None:
    if value not in RESPONSE_FORMATS:
        raise RequestError(
            f"{value!r} is not a response format of this server; use one of {', '.join(RESPONSE_FORMATS)}",
            param="response_format",
        )


@frozen
class GenerationRequest:
    model: str
    prompt: tuple[int, ...] = field(converter=tuple)
    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None  # None: until the context is full
    stop: tuple[str, ...] = field(default=(), converter=tuple)
    stop_token_ids: tuple[int, ...] = field(default=(), converter=tuple)
    ignore_eos: bool = False
    logprobs: bool = False
    request_id: str = field(factory=lambda: uuid.uuid4().hex)
    # "json_object": sampling keeps the text one JSON object and stops when it closes
    response_format: str = field(default="text", validator=_check_format)
    # Score the prompt: each token's log-probability after the ones before it, with this many of the
    # most likely tokens at its place (0-20); None: not scored. With max_tokens 0 nothing is generated.
    prompt_logprobs: int | None = None


@frozen
class GeneratedToken:
    token_id: int
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


@frozen
class GenerationChunk:
    """What a request produced since its previous chunk."""

    text: str
    tokens: tuple[GeneratedToken, ...]
    prompt_tokens: int
    completion_tokens: int  # so far, including these
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    # A scored prompt's tokens after its first, each with its log-probability: on the first chunk.
    prompt_logprobs: tuple[GeneratedToken, ...] = ()
    cached_tokens: int = 0  # of prompt_tokens, those an earlier request's kept cache already held


class TextAssembler:
    """Bytes of tokens -> text, holding back an incomplete UTF-8 character or a possible stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""

    def feed(self, data: bytes) -> tuple[str, bool]:
        """Returns (text safe to emit now, stopped)."""
        self._held += self._decoder.decode(data)
        if not self._stop:
            text, self._held = self._held, ""
            return text, False
        hits = [(self._held.find(s), s) for s in self._stop if s in self._held]
        if hits:
            index = min(h[0] for h in hits)
            text, self._held = self._held[:index], ""
            return text, True
        keep = 0
        for s in self._stop:
            for length in range(min(len(s) - 1, len(self._held)), 0, -1):
                if self._held.endswith(s[:length]):
                    keep = max(keep, length)
                    break
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        return text, False

    def flush(self) -> str:
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text


class _Chunks:
    """One request's chunks, from the scheduler to the request's consumer.

    An anyio memory object stream would do, but its ``receive`` goes round the event loop once
    before it looks for an item (a checkpoint) and builds a waiter each time: once per generated
    token, on the event loop, whose time the next step waits for. Here a chunk already queued is
    returned at once, and the consumer sleeps only when there is none (cancellable there, as any
    anyio wait).
    """

    __slots__ = ("_items", "_ready", "closed")

    def __init__(self) -> None:
        self._items: deque[GenerationChunk | BaseException] = deque()
        self._ready: anyio.Event | None = None
        self.closed = False

    def put(self, item: GenerationChunk | BaseException) -> None:
        """Queue ``item`` (never blocks); nothing once closed."""
        if self.closed:
            return
        self._items.append(item)
        self._wake()

    def close(self) -> None:
        """No more items: the consumer ends after those queued."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._ready is not None:
            self._ready.set()
            self._ready = None

    async def get(self) -> GenerationChunk | BaseException | None:
        """The next item, waiting for it; None once closed and drained."""
        while not self._items:
            if self.closed:
                return None
            self._ready = ready = anyio.Event()
            await ready.wait()
        return self._items.popleft()


class _ScoreMemory:
    """The log-probabilities of recently scored prompts, so that a scored prompt that begins like
    one of them starts its prefill in a kept cache (:class:`skulk_core.PrefixCachingEngine`)
    instead of at 0: an evaluation's multiple-choice questions score one context with each answer.

    A kept cache holds a prompt's positions but not its scores; the scores come from here, for the
    positions a kept prompt shares with the new one but the last (which scored another next token).
    They are the model's own distribution at each position, so for the same tokens they are the
    same whichever request asked. Bounded: the last ``size`` scored prompts."""

    def __init__(self, size: int) -> None:
        self._entries: deque[tuple[tuple[int, ...], tuple[GeneratedToken, ...], int]] = deque(maxlen=max(1, size))

    def keep(self, prompt: Sequence[int], scores: tuple[GeneratedToken, ...], top: int) -> None:
        """``scores``: each of ``prompt``'s positions but the last, scoring the token after it, with
        its ``top`` most likely tokens."""
        if scores:
            self._entries.append((tuple(prompt), scores, top))

    def known(self, prompt: Sequence[int], top: int) -> tuple[GeneratedToken, ...]:
        """The scores of ``prompt``'s first positions, as many as a kept prompt holds (with at least
        ``top`` alternatives, cut to ``top``); empty when none begins like it."""
        best: tuple[GeneratedToken, ...] = ()
        for tokens, scores, kept_top in reversed(self._entries):
            if kept_top < top:
                continue
            shared = shared_prefix(tokens, prompt)
            # A position scores the token after it: the last shared position scored a token of its own.
            usable = min(shared - 1, len(scores))
            if usable > len(best):
                best = scores[:usable]
                if kept_top > top:
                    best = tuple(GeneratedToken(s.token_id, s.logprob, s.top[:top]) for s in best)
        return best


@define(eq=False)
class _Live:
    request: GenerationRequest
    sampler: Sampler
    text: TextAssembler
    send: _Chunks
    queued_at: float
    position: int = 0  # positions already in the KV cache
    last_token: int | None = None
    completion: int = 0
    cancelled: bool = False
    finished: bool = False
    first_token_at: float | None = None
    started_at: float | None = None
    scores: list[GeneratedToken] = field(factory=list)  # the prompt's, until the first chunk takes them
    cached: int = 0  # prompt positions taken from a kept cache (PrefixCachingEngine)

    @property
    def prefilling(self) -> bool:
        return self.position < len(self.request.prompt)


class InstanceRunner:
    """The scheduler for one served instance."""

    def __init__(
        self,
        model_id: str,
        chain: StageChain,
        tokenizer: Tokenizer,
        *,
        context_length: int,
        max_sequences: int,
        node: Node | None = None,
        prefill_budget: int = PREFILL_BUDGET,
        lanes: int = 1,
    ) -> None:
        self.model_id = model_id
        self.chain = chain
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_sequences = max_sequences
        self.prefill_budget = prefill_budget
        self.node = node
        self._waiting: deque[_Live] = deque()
        # A lane is a group of requests stepped together. With a pipeline of N stages, N lanes keep
        # N micro-batches in flight, so every stage has work while the others compute.
        self._lanes: list[dict[str, _Live]] = [{} for _ in range(max(1, lanes))]
        self._wake = anyio.Event()
        self._eos = frozenset(tokenizer.eos_token_ids)
        self._token_texts: TokenTexts | None = None  # made for the first constrained request
        self._scored = _ScoreMemory(max_sequences)
        self.steps = 0

    @property
    def load(self) -> tuple[int, int]:
        """(requests decoding, requests waiting for a slot)."""
        return sum(len(lane) for lane in self._lanes), len(self._waiting)

    def check(self, request: GenerationRequest) -> None:
        self.check_request(request, self.context_length)

    @staticmethod
    def check_request(request: GenerationRequest, context_length: int) -> None:
        if not request.prompt:
            raise RequestError("the prompt is empty", param="prompt")
        if len(request.prompt) >= context_length:
            raise RequestError(
                f"This model's maximum context length is {context_length} tokens. However, your "
                f"prompt has {len(request.prompt)} tokens; shorten it or raise serve.context_length.",
                param="messages",
                code="context_length_exceeded",
            )
        if request.max_tokens is not None and request.max_tokens < 0:
            raise RequestError("max_tokens must not be negative", param="max_tokens")
        if request.prompt_logprobs is not None and not 0 <= request.prompt_logprobs <= 20:
            raise RequestError("prompt log-probabilities take 0 to 20 most likely tokens", param="logprobs")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream ``request``'s chunks; closing the iterator early frees the sequence."""
        self.check(request)
        if request.max_tokens == 0 and request.prompt_logprobs is None:  # nothing to compute
            yield GenerationChunk("", (), len(request.prompt), 0, "length")
            return
        chunks = _Chunks()
        live = _Live(request, Sampler(request.sampling, self._constraint(request), logprobs=request.logprobs), TextAssembler(request.stop), chunks, time.monotonic())
        self._waiting.append(live)
        self._wake.set()
        try:
            while (item := await chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            live.cancelled = True
            chunks.close()
            self._wake.set()

    def _constraint(self, request: GenerationRequest) -> TokenConstraint | None:
        if request.response_format != "json_object":
            return None
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.tokenizer)
        return JsonObjectConstraint(self._token_texts)

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                for lane in self._lanes:
                    tg.start_soon(self._run_lane, lane)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                lost = InstanceLostError(f"{self.model_id} stopped serving on this placement")
                for live in [*(live for lane in self._lanes for live in lane.values()), *self._waiting]:
                    live.send.put(lost)  # nothing if the request finished or its client went away
                    live.send.close()
                for lane in self._lanes:
                    lane.clear()
                self._waiting.clear()

    def _admit(self, lane: dict[str, _Live]) -> list[_Live]:
        admitted = []
        per_lane = math.ceil(self.max_sequences / len(self._lanes))
        while self._waiting and len(lane) < per_lane and sum(len(other) for other in self._lanes) < self.max_sequences:
            if len(lane) > min(len(other) for other in self._lanes):
                break  # a less busy lane takes the next request
            live = self._waiting.popleft()
            if live.cancelled:
                continue
            live.started_at = time.monotonic()
            lane[live.request.request_id] = live
            admitted.append(live)
        return admitted

    async def _reuse(self, live: _Live) -> None:
        """Start ``live``'s prefill after the part of its prompt a kept cache holds. A scored prompt
        only as far as the scores of an earlier scored prompt reach (:class:`_ScoreMemory`): every
        position before the prefill's start must have its score."""
        request = live.request
        if len(request.prompt) < 2:
            return
        prompt = request.prompt
        known: tuple[GeneratedToken, ...] = ()
        if request.prompt_logprobs is not None:
            known = self._scored.known(prompt, request.prompt_logprobs)
            if not known:
                return
            prompt = prompt[: len(known) + 1]  # so the engine cuts its cache where the scores end
        try:
            cached = await self.chain.reuse(request.request_id, prompt)
            # (an engine that claims the whole prompt still computes its last position, for its logits)
            live.cached = live.position = max(0, min(cached, len(prompt) - 1))
            live.scores.extend(known[: live.position])
        except Exception:  # the prefill then starts at 0, which rewinds whatever was taken
            log.exception("reusing a kept cache for %s failed; prefilling the whole prompt", request.request_id)

    async def _run_lane(self, lane: dict[str, _Live]) -> None:
        while True:
            # Both checked before any call: this loop turns once a generated token.
            if any(live.cancelled for live in lane.values()):
                await self._reap_cancelled(lane)
            if self._waiting:
                for live in self._admit(lane):
                    await self._reuse(live)
            if not lane:
                wake = self._wake
                if wake.is_set():
                    self._wake = wake = anyio.Event()
                    if self._waiting:
                        continue
                await wake.wait()
                continue
            await self._step(lane)

    async def _reap_cancelled(self, lane: dict[str, _Live]) -> None:
        for request_id, live in list(lane.items()):
            if live.cancelled:
                del lane[request_id]
                live.send.close()
                await self.chain.release(request_id)

    async def _step(self, lane: dict[str, _Live]) -> None:
        batch: list[SequenceChunk] = []
        members: list[_Live] = []
        budget = self.prefill_budget
        for live in lane.values():  # decoding sequences first: they keep their pace
            if not live.prefilling and live.last_token is not None:
                batch.append(SequenceChunk(live.request.request_id, live.position, (live.last_token,)))
                members.append(live)
                budget -= 1
        for live in lane.values():
            if live.prefilling and budget > 0:
                request = live.request
                prompt = request.prompt
                take = min(len(prompt) - live.position, max(budget, 1))
                end = live.position + take
                scored = request.prompt_logprobs is not None
                batch.append(
                    SequenceChunk(
                        request.request_id,
                        live.position,
                        prompt[live.position : end],
                        want_logits=end == len(prompt) and request.max_tokens != 0,
                        score_targets=prompt[live.position + 1 : end + 1] if scored else (),
                        score_top=request.prompt_logprobs or 0,
                    )
                )
                members.append(live)
                budget -= take
        if not batch:
            return
        try:
            outputs = await self.chain.step(batch, {live.request.request_id: live.sampler for live in members})
        except Exception as exc:
            log.exception("step of %s failed for %d requests", self.model_id, len(batch))
            if isinstance(exc, (TransportError, InstanceLostError)):
                error: SkulkError = InstanceLostError(f"a stage of {self.model_id} was lost: {exc}")
            else:
                error = exc if isinstance(exc, SkulkError) else SkulkError(f"the model failed: {exc}")
            for live in members:
                live.send.put(error)
                lane.pop(live.request.request_id, None)
                live.send.close()
                with anyio.CancelScope(shield=True):
                    await self.chain.release(live.request.request_id)
            return
        self.steps += 1
        for live, chunk, output in zip(members, batch, outputs):
            live.position += chunk.length
            if chunk.score_targets and not self._take_scores(live, chunk, output):
                continue
            if live.prefilling or live.cancelled:
                continue
            if output.logits is not None or output.sampled is not None:
                self._advance(live, output)
            elif live.request.max_tokens == 0:  # a prompt scored, nothing to generate
                self._finish(live, GenerationChunk("", (), len(live.request.prompt), 0, "length", self._prompt_scores(live), live.cached))
        for live in members:
            if live.finished and live.request.request_id in lane:
                del lane[live.request.request_id]
                live.send.close()
                await self.chain.release(live.request.request_id)

    def _take_scores(self, live: _Live, chunk: SequenceChunk, output: StageOutput) -> bool:
        """Keep a scored prompt chunk's scores; False (the request failed) if the engine gave none."""
        if len(output.scores) != len(chunk.score_targets):
            self._fail(
                live,
                ModelError(
                    f"the engine serving {self.model_id} returned {len(output.scores)} prompt scores for "
                    f"{len(chunk.score_targets)} positions; its backend may not score prompts"
                ),
            )
            return False
        live.scores.extend(GeneratedToken(s.token_id, s.logprob, s.top) for s in output.scores)
        return True

    def _prompt_scores(self, live: _Live) -> tuple[GeneratedToken, ...]:
        """The prompt's scores, for the request's first chunk (none after it), kept for a later
        prompt that begins the same way."""
        scores, live.scores = tuple(live.scores), []
        if live.request.prompt_logprobs is not None:
            self._scored.keep(live.request.prompt, scores, live.request.prompt_logprobs)
        return scores

    def _fail(self, live: _Live, exc: SkulkError) -> None:
        log.error("%s: %s", live.request.request_id, exc)
        live.send.put(exc)
        live.finished = True
        live.send.close()

    def _finish(self, live: _Live, chunk: GenerationChunk) -> None:
        live.send.put(chunk)
        live.finished = True
        live.send.close()
        self._report(live, time.monotonic())

    def _advance(self, live: _Live, output: StageOutput) -> None:
        request = live.request
        try:
            # Drawn already: by the engine on its thread (Sampler.draw), or by the pipeline's last
            # stage with a copy of this sampler (same parameters and seed). Taken here.
            if output.sampled is not None:
                sampled = output.sampled
                live.sampler.observe(sampled.token_id)
            else:
                sampled = live.sampler.sample(output.logits, want_logprobs=request.logprobs)
        except SkulkError as exc:  # this request cannot go on (its constraint allows no token)
            self._fail(live, exc)
            return
        token = sampled.token_id
        live.completion += 1
        live.last_token = token
        now = time.monotonic()
        if live.first_token_at is None:
            live.first_token_at = now
        finish = None
        emitted = (GeneratedToken(token, sampled.logprob, sampled.top),)
        if (token in self._eos and not request.ignore_eos) or token in request.stop_token_ids:
            finish = "stop"
            text = live.text.flush()
        else:
            text, stopped = live.text.feed(b"" if self.tokenizer.is_control(token) else self.tokenizer.token_bytes(token))
            constraint = live.sampler.constraint
            if stopped:
                finish = "stop"
            elif constraint is not None and constraint.complete:
                finish = "stop"  # the JSON object closed: nothing may follow it
                text += live.text.flush()
            elif request.max_tokens is not None and live.completion >= request.max_tokens:
                finish = "length"
            elif len(request.prompt) + live.completion >= self.context_length:
                finish = "length"
            if finish == "length":
                text += live.text.flush()
        chunk = GenerationChunk(
            text, emitted, len(request.prompt), live.completion, finish, self._prompt_scores(live) if live.scores else (), live.cached
        )
        if finish is not None:
            self._finish(live, chunk)
        else:
            live.send.put(chunk)

    def _report(self, live: _Live, now: float) -> None:
        if self.node is None:
            return
        request = live.request
        wall = time.time()
        started = wall - (now - live.queued_at)
        attributes = {
            "model": self.model_id,
            "prompt_tokens": len(request.prompt),
            "cached_tokens": live.cached,
            "completion_tokens": live.completion,
            "queue_s": round((live.started_at or now) - live.queued_at, 6),
            "ttft_s": round((live.first_token_at or now) - live.queued_at, 6),
        }
        self.node.plugins.trace(
            TraceSpan(request.request_id, uuid.uuid4().hex[:16], "request", self.node.node_id, started, wall, attributes=attributes)
        )
        self.node.plugins.metric(
            MetricSample("skulk_tokens_generated_total", live.completion, "counter", {"model": self.model_id})
        )


@define(eq=False)
class ServedModel:
    """A model the cluster serves (or is placing, or failed to), as this node sees it."""

    card: ModelCard
    backend: str
    status: str = "loading"  # "loading", "ready", "failed"
    error: str | None = None
    created: int = field(factory=lambda: int(time.time()))
    instance_id: str | None = None
    head_id: str | None = None  # the node running stage 0 (and the scheduler)
    stages: int = 1
    runner: InstanceRunner | None = None  # set when this node is the head
    chain: Any = None
    context_length: int = 0
    remote_tokenizer: Tokenizer | None = None

    @property
    def id(self) -> str:
        return self.card.id

    @property
    def tokenizer(self) -> Tokenizer:
        if self.runner is not None:
            return self.runner.tokenizer
        if self.remote_tokenizer is not None:
            return self.remote_tokenizer
        raise ModelNotReadyError(self._not_ready())

    def _not_ready(self) -> str:
        if self.status == "failed":
            return f"{self.id} failed to load: {self.error}"
        if self.status == "ready":
            return f"{self.id} is served by node {self.head_id}, and this node has no tokenizer for it yet; retry in a moment"
        return f"{self.id} is still loading; retry in a moment"


def local_resources(node: Node) -> NodeResources:
    import os

    import psutil

    memory = psutil.virtual_memory()
    registry = node.plugins.backends()
    sites = {}
    for name in registry.names():
        backend = registry.backend(name)
        if isinstance(backend, MemorySiteReporter):
            try:
                site = backend.memory_site(node.config.extra.get(name))
            except Exception:  # a backend that cannot tell keeps its stages sized by system memory
                log.exception("backend %s could not report where its stages live", name)
                site = None
            if site is not None:
                sites[name] = site
    return NodeResources(
        memory_total=memory.total,
        memory_available=memory.available,
        cpu_count=os.cpu_count() or 1,
        memory_limit=node.config.node.memory_limit_bytes,
        backends=tuple(registry.names()),
        sites=sites,
    )


class ModelServer:
    """The models the cluster serves, as this node's frontend sees them: ``node.models``.

    Requests for an instance this node heads run here; others go to their head node and stream
    back (see :mod:`skulk_core.instances`). A request that loses its instance before its first
    token waits for the model to be placed again and is retried there.
    """

    REPLACE_WAIT = 60.0  # seconds a request waits for a lost instance to be placed again

    def __init__(self, node: Node) -> None:
        self.node = node
        self._models: dict[str, ServedModel] = {}
        self._failures: dict[str, ServedModel] = {}  # models whose placement failed here
        self._changed_event: anyio.Event | None = None  # made in the event loop, on first use

    @property
    def _changed(self) -> anyio.Event:
        if self._changed_event is None:
            self._changed_event = anyio.Event()
        return self._changed_event

    # -- the view ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the view from the cluster state (called when it changes)."""
        instances = self.node.instances
        me = self.node.node_id
        best: dict[str, ServedModel] = {}
        rank = {"ready": 0, "loading": 1, "failed": 2}
        for record in self.node.cluster.state.instances.values():
            head = instances.heads.get(record.instance_id)
            status = record.status
            if status == "ready" and record.placement.stages[0].node_id == me and head is None:
                status = "loading"  # the head's scheduler is starting
            if status == "ready" and head is None and instances.fetching_tokenizer(record.model_id):
                status = "loading"  # this node is loading the tokenizer it needs to forward requests
            errors = [s for s in record.stage_status.values() if s.startswith("failed")]
            served = ServedModel(
                card=record.card,
                backend=record.placement.stages[0].backend,
                status=status,
                error=errors[0].removeprefix("failed: ") if errors else None,
                created=int(record.created_at) or int(time.time()),
                instance_id=record.instance_id,
                head_id=record.placement.stages[0].node_id,
                stages=len(record.placement.stages),
                runner=head.runner if head else None,
                chain=head.chain if head else None,
                context_length=record.request.context_length or DEFAULT_CONTEXT,
                remote_tokenizer=instances.cached_tokenizer(record.model_id),
            )
            current = best.get(record.model_id)
            key = (rank.get(served.status, 3), 0 if served.runner is not None else 1)
            if current is None or key < (rank.get(current.status, 3), 0 if current.runner is not None else 1):
                best[record.model_id] = served
        for model_id, failed in self._failures.items():
            best.setdefault(model_id, failed)
        self._models = best
        self._changed.set()
        self._changed_event = anyio.Event()

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def get(self, model_id: str) -> ServedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise ModelNotFoundError(model_id, list(self._models)) from None

    def ready(self, model_id: str) -> ServedModel:
        served = self.get(model_id)
        if served.status != "ready" or (served.runner is None and served.head_id == self.node.node_id):
            raise ModelNotReadyError(served._not_ready())
        return served

    # -- tokens --------------------------------------------------------------------------------
    def special_tokens(self, model_id: str) -> tuple[str | None, str | None]:
        """The text of the model's BOS and end-of-sequence tokens (None where it has none), as its
        chat template and clients see them."""
        served = self.ready(model_id)
        tok = served.tokenizer
        bos = tok.token_bytes(tok.bos_token_id).decode("utf-8", "replace") if tok.bos_token_id is not None else None
        eos_id = next(iter(sorted(served.card.eos_token_ids or tok.eos_token_ids)), None)
        eos = tok.token_bytes(eos_id).decode("utf-8", "replace") if eos_id is not None else None
        return bos, eos

    def render_chat(self, model_id: str, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        bos, eos = self.special_tokens(model_id)
        return render_chat(self.ready(model_id).card.chat_template, messages, bos_token=bos or "", eos_token=eos or "", **kwargs)

    def encode(self, model_id: str, text: str, *, add_special: bool = True) -> list[int]:
        return self.ready(model_id).tokenizer.encode(text, add_special=add_special, parse_special=True)

    def check(self, request: GenerationRequest) -> None:
        """Raise the RequestError ``generate`` would raise, before any response is started."""
        served = self.ready(request.model)
        if served.runner is not None:
            served.runner.check(request)
            return
        InstanceRunner.check_request(request, served.context_length)

    # -- generation ----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream ``request``'s chunks from whichever node heads the model's instance."""
        lost: set[str] = set()
        deadline: float | None = None
        while True:
            served = self.ready(request.model)
            if served.instance_id in lost:
                served = await self._wait_for_new_instance(request.model, lost, deadline or time.monotonic())
            produced = False
            try:
                if served.runner is not None:
                    chunks = served.runner.generate(request)
                else:
                    chunks = self.node.instances.remote_generate(served.head_id or "", request)
                # aclosing: when our consumer closes us (its client went away), the inner generator
                # is closed now, freeing the sequence at once, not whenever the GC gets to it.
                async with aclosing(chunks) as stream:
                    async for chunk in stream:
                        produced = True
                        yield chunk
                return
            except InstanceLostError as exc:
                if produced:
                    raise
                log.warning("%s lost its instance before the first token (%s); retrying on the next placement", request.request_id, exc)
                lost.add(served.instance_id or "")
                deadline = deadline or time.monotonic() + self.REPLACE_WAIT

    async def generate_here(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Generate on an instance this node heads (for requests forwarded by other nodes)."""
        served = self.ready(request.model)
        if served.runner is None:
            raise InstanceLostError(f"this node no longer heads {request.model}")
        async with aclosing(served.runner.generate(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _wait_for_new_instance(self, model_id: str, lost: set[str], deadline: float) -> ServedModel:
        while True:
            served = self._models.get(model_id)
            if served is not None and served.status == "ready" and served.instance_id not in lost:
                if served.runner is not None or served.head_id != self.node.node_id:
                    return served
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InstanceLostError(f"{model_id} lost a node and was not placed again within {self.REPLACE_WAIT:.0f} s")
            with anyio.move_on_after(min(remaining, 1.0)):
                await self._changed.wait()

    async def embed(self, model_id: str, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        served = self.ready(model_id)
        if served.chain is None:
            raise RequestError(
                f"embeddings for {model_id} are computed on its head node {served.head_id}; send the request there",
                param="model",
            )
        engine = served.chain.head
        if not hasattr(engine, "embed") or served.stages > 1:
            raise RequestError(f"the {served.backend} backend cannot compute embeddings for {model_id}", param="model")
        out = []
        for tokens in inputs:
            if not tokens:
                raise RequestError("an input to embed is empty", param="input")
            if len(tokens) > served.context_length:
                raise RequestError(
                    f"an input has {len(tokens)} tokens; the most this model embeds is {served.context_length}",
                    param="input",
                    code="context_length_exceeded",
                )
            async with served.chain.lock:
                out.append(await engine.embed(tokens))
        return out

    # -- placing -------------------------------------------------------------------------------
    async def load(
        self, ref: str, *, backend: str | None = None, min_nodes: int | None = None, wait: bool = True
    ) -> ServedModel:
        """Ask the cluster to place ``ref`` and (with ``wait``) wait until it is ready or failed."""
        config = self.node.config.serve
        instance_id = await self.node.instances.place(
            ref,
            backend=backend or config.backend,
            min_nodes=min_nodes or config.min_nodes,
            context_length=config.context_length,
            max_sequences=config.max_sequences,
        )
        while True:
            for served in self._models.values():
                if served.instance_id == instance_id and (not wait or served.status in ("ready", "failed")):
                    if served.status == "failed":
                        raise ModelError(served._not_ready())
                    return served
            await self._changed.wait()

    async def serve_configured(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """The node service that places ``serve.model`` at start-up (in the background)."""
        config = self.node.config.serve
        ref = config.model or DEFAULT_MODEL_ID
        if not config.enabled:
            task_status.started()
            return
        # Finding the card is quick and catches a wrong --model before the node reports ready.
        card = self.node.plugins.find_model(ref, self.node)
        if card is None:
            raise ModelError(f"no plugin knows the model {ref!r}; give a GGUF path, or the id {DEFAULT_MODEL_ID}")
        task_status.started()
        last_error = None
        while True:
            try:
                if self.node.cluster.master_id is None:
                    raise TransportError("waiting for the cluster to elect a master")
                served = await self.load(ref)
                log.info("%s is ready (instance %s, %d stage(s), head %s)", served.id, served.instance_id, served.stages, served.head_id)
                self._failures.pop(card.id, None)
                return
            except (PlacementError, TransportError) as exc:
                # Not enough nodes yet (min_nodes), or no master yet: try again as the cluster grows.
                if str(exc) != last_error:
                    level = logging.INFO if isinstance(exc, TransportError) else logging.WARNING
                    log.log(level, "cannot place %s yet: %s", ref, exc)
                    last_error = str(exc)
                    self._failures[card.id] = ServedModel(card, config.backend or "-", "failed", str(exc))
                    self.refresh()
                await anyio.sleep(1.0)
            except SkulkError as exc:
                log.error("cannot serve %s: %s", ref, exc)
                self._failures[card.id] = ServedModel(card, config.backend or "-", "failed", str(exc))
                self.refresh()
                return
