"""Serving models: the scheduler that keeps every loaded model busy, and the node's model server.

One :class:`InstanceRunner` per served instance runs a loop that advances every live request in one
engine step (continuous batching): decoding sequences contribute one token each, new requests are
prefilled in chunks within a token budget, so a long prompt never stalls the others. Logits come
back to the core's sampler, text is assembled here (UTF-8 safe, stop sequences held back until
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
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from attrs import define, field, frozen

from skulk_core.backend import EngineOptions, SequenceChunk, Tokenizer
from skulk_core.chat import render_chat
from skulk_core.errors import ModelError, PlacementError, RequestError, SkulkError
from skulk_core.model import DEFAULT_MODEL_ID, ModelCard
from skulk_core.pipeline import LocalChain, StageChain
from skulk_core.placement import NodeResources, NodeView, PlacementRequest
from skulk_core.sampling import Sampler, SamplingParams, TokenLogprob
from skulk_core.telemetry import MetricSample, TraceSpan

if TYPE_CHECKING:
    from skulk_core.node import Node

log = logging.getLogger("skulk.inference")

DEFAULT_CONTEXT = 4096  # per sequence, when the config does not say (capped by the model's own)
PREFILL_BUDGET = 512  # tokens per step across all prefilling sequences


class ModelNotFoundError(RequestError):
    def __init__(self, model: str, known: Sequence[str]) -> None:
        super().__init__(
            f"The model {model!r} does not exist on this node; available: {', '.join(known) or 'none'}",
            param="model",
            code="model_not_found",
        )


class ModelNotReadyError(SkulkError):
    """The model is still loading (or failed to load); the frontend answers 503."""


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


@define(eq=False)
class _Live:
    request: GenerationRequest
    sampler: Sampler
    text: TextAssembler
    send: MemoryObjectSendStream[GenerationChunk | BaseException]
    queued_at: float
    position: int = 0  # positions already in the KV cache
    last_token: int | None = None
    completion: int = 0
    cancelled: bool = False
    finished: bool = False
    first_token_at: float | None = None
    started_at: float | None = None

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
    ) -> None:
        self.model_id = model_id
        self.chain = chain
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_sequences = max_sequences
        self.prefill_budget = prefill_budget
        self.node = node
        self._waiting: deque[_Live] = deque()
        self._active: dict[str, _Live] = {}
        self._wake = anyio.Event()
        self._eos = frozenset(tokenizer.eos_token_ids)
        self.steps = 0

    @property
    def load(self) -> tuple[int, int]:
        """(requests decoding, requests waiting for a slot)."""
        return len(self._active), len(self._waiting)

    def check(self, request: GenerationRequest) -> None:
        if not request.prompt:
            raise RequestError("the prompt is empty", param="prompt")
        if len(request.prompt) >= self.context_length:
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens. However, your "
                f"prompt has {len(request.prompt)} tokens; shorten it or raise serve.context_length.",
                param="messages",
                code="context_length_exceeded",
            )
        if request.max_tokens is not None and request.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1", param="max_tokens")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream ``request``'s chunks; closing the iterator early frees the sequence."""
        self.check(request)
        send, receive = anyio.create_memory_object_stream[GenerationChunk | BaseException](math.inf)
        live = _Live(request, Sampler(request.sampling), TextAssembler(request.stop), send, time.monotonic())
        self._waiting.append(live)
        self._wake.set()
        try:
            async with receive:
                async for item in receive:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if item.finish_reason is not None:
                        return
        finally:
            live.cancelled = True
            self._wake.set()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self._reap_cancelled()
                while self._waiting and len(self._active) < self.max_sequences:
                    live = self._waiting.popleft()
                    if live.cancelled:
                        continue
                    live.started_at = time.monotonic()
                    self._active[live.request.request_id] = live
                if not self._active:
                    self._wake = anyio.Event()
                    if not self._waiting:
                        await self._wake.wait()
                    continue
                await self._step()
        finally:
            with anyio.CancelScope(shield=True):
                for live in [*self._active.values(), *self._waiting]:
                    live.send.send_nowait(ModelNotReadyError(f"{self.model_id} is shutting down"))
                    live.send.close()
                self._active.clear()
                self._waiting.clear()

    async def _reap_cancelled(self) -> None:
        for request_id, live in list(self._active.items()):
            if live.cancelled:
                del self._active[request_id]
                live.send.close()
                await self.chain.release(request_id)

    async def _step(self) -> None:
        batch: list[SequenceChunk] = []
        members: list[_Live] = []
        budget = self.prefill_budget
        for live in self._active.values():  # decoding sequences first: they keep their pace
            if not live.prefilling and live.last_token is not None:
                batch.append(SequenceChunk(live.request.request_id, live.position, (live.last_token,)))
                members.append(live)
                budget -= 1
        for live in self._active.values():
            if live.prefilling and budget > 0:
                prompt = live.request.prompt
                take = min(len(prompt) - live.position, max(budget, 1))
                end = live.position + take
                batch.append(
                    SequenceChunk(live.request.request_id, live.position, prompt[live.position : end], want_logits=end == len(prompt))
                )
                members.append(live)
                budget -= take
        if not batch:
            return
        try:
            outputs = await self.chain.step(batch)
        except Exception as exc:
            log.exception("step of %s failed for %d requests", self.model_id, len(batch))
            error = exc if isinstance(exc, SkulkError) else SkulkError(f"the model failed: {exc}")
            for live in members:
                live.send.send_nowait(error)
                self._active.pop(live.request.request_id, None)
                live.send.close()
                with anyio.CancelScope(shield=True):
                    await self.chain.release(live.request.request_id)
            return
        self.steps += 1
        for live, chunk, output in zip(members, batch, outputs):
            live.position += chunk.length
            if live.prefilling or output.logits is None or live.cancelled:
                continue
            self._advance(live, output.logits)
        for live in members:
            if live.finished and live.request.request_id in self._active:
                del self._active[live.request.request_id]
                live.send.close()
                await self.chain.release(live.request.request_id)

    def _advance(self, live: _Live, logits: Any) -> None:
        request = live.request
        sampled = live.sampler.sample(logits, want_logprobs=request.logprobs)
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
            if stopped:
                finish = "stop"
            elif request.max_tokens is not None and live.completion >= request.max_tokens:
                finish = "length"
            elif len(request.prompt) + live.completion >= self.context_length:
                finish = "length"
            if finish == "length":
                text += live.text.flush()
        chunk = GenerationChunk(text, emitted, len(request.prompt), live.completion, finish)
        try:
            live.send.send_nowait(chunk)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            live.cancelled = True
        if finish is not None:
            live.finished = True
            live.send.close()
            self._report(live, now)

    def _report(self, live: _Live, now: float) -> None:
        if self.node is None:
            return
        request = live.request
        wall = time.time()
        started = wall - (now - live.queued_at)
        attributes = {
            "model": self.model_id,
            "prompt_tokens": len(request.prompt),
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
    """A model this node serves (or is loading)."""

    card: ModelCard
    backend: str
    status: str = "loading"  # "loading", "ready", "failed"
    error: str | None = None
    created: int = field(factory=lambda: int(time.time()))
    runner: InstanceRunner | None = None
    chain: LocalChain | None = None
    context_length: int = 0

    @property
    def id(self) -> str:
        return self.card.id

    @property
    def tokenizer(self) -> Tokenizer:
        if self.runner is None:
            raise ModelNotReadyError(self._not_ready())
        return self.runner.tokenizer

    def _not_ready(self) -> str:
        if self.status == "failed":
            return f"{self.id} failed to load: {self.error}"
        return f"{self.id} is still loading; retry in a moment"


def local_resources(node: Node) -> NodeResources:
    import os

    import psutil

    memory = psutil.virtual_memory()
    return NodeResources(
        memory_total=memory.total,
        memory_available=memory.available,
        cpu_count=os.cpu_count() or 1,
        memory_limit=node.config.node.memory_limit_bytes,
        backends=tuple(node.plugins.backends().names()),
    )


class ModelServer:
    """The models this node serves. ``node.models``; the OpenAI frontend calls it."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._models: dict[str, ServedModel] = {}

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def get(self, model_id: str) -> ServedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise ModelNotFoundError(model_id, list(self._models)) from None

    def ready(self, model_id: str) -> ServedModel:
        served = self.get(model_id)
        if served.status != "ready":
            raise ModelNotReadyError(served._not_ready())
        return served

    def render_chat(self, model_id: str, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        served = self.ready(model_id)
        tok = served.tokenizer
        bos = tok.token_bytes(tok.bos_token_id).decode("utf-8", "replace") if tok.bos_token_id is not None else ""
        eos_id = next(iter(sorted(served.card.eos_token_ids or tok.eos_token_ids)), None)
        eos = tok.token_bytes(eos_id).decode("utf-8", "replace") if eos_id is not None else ""
        return render_chat(served.card.chat_template, messages, bos_token=bos, eos_token=eos, **kwargs)

    def encode(self, model_id: str, text: str, *, add_special: bool = True) -> list[int]:
        return self.ready(model_id).tokenizer.encode(text, add_special=add_special, parse_special=True)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        served = self.ready(request.model)
        assert served.runner is not None
        async for chunk in served.runner.generate(request):
            yield chunk

    def check(self, request: GenerationRequest) -> None:
        """Raise the RequestError ``generate`` would raise, before any response is started."""
        served = self.ready(request.model)
        assert served.runner is not None
        served.runner.check(request)

    async def embed(self, model_id: str, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        served = self.ready(model_id)
        assert served.chain is not None
        engine = served.chain.head
        if not hasattr(engine, "embed"):
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
                out.append(await engine.embed(tokens))  # type: ignore[attr-defined]
        return out

    async def load(self, ref: str, *, backend: str | None = None) -> ServedModel:
        """Find, place (on this node), fetch and load ``ref``; start its scheduler."""
        node = self.node
        config = node.config.serve
        card = node.plugins.find_model(ref, node)
        if card is None:
            raise ModelError(f"no plugin knows the model {ref!r}; give a GGUF path, or the id {DEFAULT_MODEL_ID}")
        if card.id in self._models and self._models[card.id].status != "failed":
            return self._models[card.id]
        me = NodeView(node.node_id, node.name, local_resources(node))
        context = min(card.context_length, config.context_length or DEFAULT_CONTEXT)
        request = PlacementRequest(card.id, backend=backend or config.backend, min_nodes=config.min_nodes, context_length=context, max_sequences=config.max_sequences)
        placement = node.plugins.place(card, [me], request)
        if placement is None:
            raise PlacementError(f"no placement plugin placed {card.id}")
        if len(placement.stages) != 1:
            raise PlacementError(f"{card.id} was placed over {len(placement.stages)} nodes; this node serves single-node placements only")
        stage = placement.stages[0]
        served = ServedModel(card, stage.backend, context_length=context)
        self._models[card.id] = served
        node.emit("instance.placed", model=card.id, instance=placement.instance_id, backend=stage.backend)
        try:
            resolver = node.plugins.model_resolver(card, node)
            if resolver is None:
                raise ModelError(f"no storage plugin can provide the files of {card.id} ({card.source})")
            files = await resolver.fetch()
            impl = node.plugins.backends().backend(stage.backend)
            settings = node.config.extra.get(stage.backend)
            options = EngineOptions(context_length=context, max_sequences=config.max_sequences, threads=config.threads, settings=settings)
            started = time.monotonic()
            engine = await impl.load(card, files, stage.shard, options)
            if engine.tokenizer is None:
                raise ModelError(f"the {stage.backend} engine for {card.id} has no tokenizer")
            chain = LocalChain([engine])
            runner = InstanceRunner(card.id, chain, engine.tokenizer, context_length=context, max_sequences=min(config.max_sequences, engine.max_sequences), node=node)
            await node.task_group.start(self._run_instance, served, runner, chain)
            log.info("%s ready on %s in %.1f s", card.id, stage.backend, time.monotonic() - started)
            node.emit("instance.ready", model=card.id, instance=placement.instance_id, load_s=round(time.monotonic() - started, 3))
        except Exception as exc:
            served.status, served.error = "failed", str(exc)
            node.emit("instance.failed", model=card.id, error=str(exc))
            raise
        return served

    async def _run_instance(self, served: ServedModel, runner: InstanceRunner, chain: LocalChain, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(runner.run)
                served.runner, served.chain, served.status = runner, chain, "ready"
                task_status.started()
        finally:
            served.status = "failed" if served.status != "ready" else "stopped"
            await chain.close()

    async def serve_configured(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """The node service that loads ``serve.model`` at start-up (in the background)."""
        config = self.node.config.serve
        ref = config.model or DEFAULT_MODEL_ID
        if not config.enabled:
            task_status.started()
            return
        # Finding the card is quick and catches a wrong --model before the node reports ready.
        if self.node.plugins.find_model(ref, self.node) is None:
            raise ModelError(f"no plugin knows the model {ref!r}; give a GGUF path, or the id {DEFAULT_MODEL_ID}")
        task_status.started()
        try:
            await self.load(ref)
        except SkulkError as exc:
            log.error("cannot serve %s: %s", ref, exc)
