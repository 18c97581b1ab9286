"""Instances across the cluster: placing them, loading this node's stages, running pipelines.

The lifecycle: a node asks the master to place a model (``Command("place")``); the master runs the
placement hook over the live nodes and writes ``InstancePlaced``. Every node applies the event; a
node that holds a stage resolves the model's files, loads its layer range with its backend and
reports (``StageReport``); the master writes ``StageStatusChanged``. When every stage is ready the
head node (stage 0) starts the scheduler with a :class:`DistributedChain`: its own engine, then
the other stages, each step going stage to stage on direct links (:mod:`skulk_core.links`) where
they are open and on the transport otherwise, the last stage sending tokens (or logits) back to the
head. Any node's
frontend can serve the instance: requests go to the head, tokens come back (``generate`` /
``stream_chunk``). When a stage's node leaves, the master removes the instance and places the
model again on the nodes left.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio
from attrs import define, evolve, field

from skulk_core.backend import BlockingStepEngine, DrawingEngine, Engine, EngineOptions, PrefixCachingEngine, SequenceChunk, StageOutput, Tokenizer, step_thread
from skulk_core.cluster.messages import (
    Command,
    CommandReply,
    GenerateForward,
    LinkOffer,
    LinkRequest,
    RemoteSampling,
    StageForward,
    StageRelease,
    StageReport,
    StageResult,
    StreamCancel,
    StreamChunk,
    StreamEnd,
    WireOutput,
)
from skulk_core.cluster.service import _fix_host
from skulk_core.cluster.state import InstancePlaced, InstanceRecord, InstanceRemoved, StageStatusChanged
from skulk_core.errors import (
    BackendError,
    ModelError,
    PlacementError,
    ProtocolError,
    RequestError,
    SkulkError,
    TransportError,
)
from skulk_core.links import HANDSHAKE_TIMEOUT, Link, LinkServer, LinkTarget, connect, receive
from skulk_core.inference import (
    DEFAULT_CONTEXT,
    GenerationChunk,
    GenerationRequest,
    InstanceLostError,
    InstanceRunner,
    ModelNotReadyError,
)
from skulk_core.model import ModelCard
from skulk_core.placement import PlacementRequest
from skulk_core.sampling import SampledToken, Sampler
from skulk_core.threads import EngineThread
from skulk_core.tensor import Tensor

if TYPE_CHECKING:
    from skulk_core.node import Node

log = logging.getLogger("skulk.instances")

STEP_TIMEOUT = 300.0  # a remote step (a long prefill on a slow stage) may take this long
LINK_RETRY = 10.0  # seconds before trying again to open a direct link that could not be opened


@define(eq=False)
class LocalStage:
    """A stage of an instance that this node runs."""

    instance: InstanceRecord
    index: int
    status: str = "loading"
    engine: Engine | None = None
    scope: anyio.CancelScope = field(factory=anyio.CancelScope)
    lock: anyio.Lock = field(factory=lambda: anyio.Lock(fast_acquire=True))  # one step at a time through the engine
    inbox: Any = None  # memory stream of remote work, in arrival order
    samplers: dict[str, Sampler] = field(factory=dict)  # last stage: the samplers the head started here, by request id
    outbound: Link | None = None  # the direct link to the next stage (the head, after the last one)
    link_retry_at: float = 0.0  # monotonic time before which no new link is tried
    link_opening: bool = False  # a link to the next stage is being opened
    thread: EngineThread | None = None  # the loaded engine's step_thread (skulk_core.backend.step_thread)
    blocking: bool = False  # the loaded engine is a BlockingStepEngine (checked once: a Protocol check is slow)

    @property
    def instance_id(self) -> str:
        return self.instance.instance_id

    @property
    def next_index(self) -> int:
        """The stage its steps go to: the next one, or the head after the last."""
        return (self.index + 1) % len(self.instance.placement.stages)

    @property
    def next_node_id(self) -> str:
        return self.instance.placement.stages[self.next_index].node_id


@define(eq=False)
class _PendingStep:
    nodes: frozenset[str]
    done: anyio.Event = field(factory=anyio.Event)
    result: StageResult | None = None
    error: str | None = None


class DistributedChain:
    """The head's view of a pipeline: its own engine, then the other stages over the transport."""

    def __init__(self, instances: Instances, stage: LocalStage) -> None:
        self.instances = instances
        self.stage = stage
        self.record = stage.instance
        self.stages = self.record.placement.stages
        self._sampled_remotely: set[str] = set()  # requests whose last stage holds their sampler
        # One stage, whose engine draws each token on its own thread (skulk_core.DrawingEngine).
        self._draws_here = len(self.stages) == 1 and isinstance(stage.engine, DrawingEngine)

    @property
    def head(self) -> Engine:
        assert self.stage.engine is not None
        return self.stage.engine

    @property
    def lock(self) -> anyio.Lock:
        return self.stage.lock

    async def step(self, batch: Sequence[SequenceChunk], samplers: Mapping[str, Sampler] | None = None) -> list[StageOutput]:
        head = self.head
        if len(self.stages) == 1:
            async with self.stage.lock:
                if self._draws_here and samplers:
                    return await head.step_and_draw(batch, samplers)  # type: ignore[attr-defined]
                return await head.step(batch)
        step_id = uuid.uuid4().hex
        pending = _PendingStep(frozenset(s.node_id for s in self.stages[1:]))
        if any(not self.instances.node.cluster.is_alive(n) for n in pending.nodes):
            raise TransportError("a stage's node is gone")
        started = self._remote_samplers(batch, samplers or {})
        forward = StageForward(self.record.instance_id, step_id, self.instances.node.node_id, 0, batch, started)
        self.instances.pending[step_id] = pending  # before the step: its result may come back first
        try:
            try:
                async with self.stage.lock:
                    # With a link open to stage 1, the step goes on from the engine's thread at once.
                    thread = self.stage.thread if self.instances._link_to_next(self.stage) is not None else None
                    if thread is not None:
                        sent = await thread.run(self._step_and_pass_on, forward)
                    else:
                        outputs = await head.step(batch)
                if thread is None:
                    sent = await self.instances.send_step(self.stage, self.stages[1].node_id, _forward(forward, 1, batch, outputs))
                if not sent:
                    raise TransportError(f"cannot reach stage 1 on {self.stages[1].node_id}")
            except BaseException:
                self._sampled_remotely.difference_update(spec.request_id for spec in started)  # never got there
                raise
            with anyio.fail_after(STEP_TIMEOUT):
                await pending.done.wait()
        except TimeoutError:
            raise TransportError(f"no answer from the pipeline of {self.record.model_id} within {STEP_TIMEOUT:.0f} s") from None
        finally:
            self.instances.pending.pop(step_id, None)
        if pending.error is not None:
            raise TransportError(pending.error)
        assert pending.result is not None
        if pending.result.error is not None:
            raise BackendError(f"a stage of {self.record.model_id} failed: {pending.result.error}")
        return [_stage_output(o) for o in pending.result.outputs]

    def _step_and_pass_on(self, step: StageForward) -> bool:
        """On the head engine's thread: the step, and its activations on to stage 1 at once."""
        outputs = self.head.step_blocking(step.chunks)  # type: ignore[attr-defined]
        return self.instances._pass_on(self.stage, self.stages[1].node_id, _forward(step, 1, step.chunks, outputs))

    def _remote_samplers(self, batch: Sequence[SequenceChunk], samplers: Mapping[str, Sampler]) -> tuple[RemoteSampling, ...]:
        """Samplers to start at the last stage: those of requests new to this pipeline. A request
        under a constraint (JSON mode) is sampled here, where its tokenizer is."""
        started = []
        for chunk in batch:
            sampler = samplers.get(chunk.request_id)
            if sampler is None or sampler.constraint is not None or chunk.request_id in self._sampled_remotely:
                continue
            self._sampled_remotely.add(chunk.request_id)
            started.append(RemoteSampling(chunk.request_id, sampler.resolved_params, sampler.logprobs))
        return tuple(started)

    async def reuse(self, request_id: str, prompt: Sequence[int]) -> int:
        """A kept cache for ``request_id`` where the instance is this node's one engine, which keeps
        them (a pipeline's stages would all have to keep the same one: they do not)."""
        head = self.head
        if len(self.stages) > 1 or not isinstance(head, PrefixCachingEngine):
            return 0
        async with self.stage.lock:
            return await head.reuse(request_id, prompt)

    async def release(self, request_id: str) -> None:
        self._sampled_remotely.discard(request_id)
        await self.head.release(request_id)
        for stage in self.stages[1:]:
            await self.instances.node.cluster.send_to(stage.node_id, StageRelease(self.record.instance_id, request_id))

    async def close(self) -> None:
        pass  # the engine belongs to the LocalStage, closed when the stage is unloaded


def _forward(step: StageForward, stage_index: int, batch: Sequence[SequenceChunk], outputs: Sequence[StageOutput]) -> StageForward:
    """``step`` for stage ``stage_index``: ``batch``'s chunks with the activations in ``outputs``."""
    chunks = tuple(evolve(chunk, tokens=None, hidden=out.hidden) for chunk, out in zip(batch, outputs))
    return StageForward(step.instance_id, step.step_id, step.origin, stage_index, chunks, step.samplers)


def _stage_output(output: WireOutput) -> StageOutput:
    if output.token is not None:
        return StageOutput(output.request_id, sampled=SampledToken(output.token, output.logprob, output.top), scores=output.scores)
    return StageOutput(output.request_id, logits=None if output.logits is None else output.logits.to_numpy(), scores=output.scores)


@define(eq=False)
class HeadInstance:
    record: InstanceRecord
    runner: InstanceRunner
    chain: DistributedChain
    scope: anyio.CancelScope


class Instances:
    """``node.instances``: placement commands, this node's stages, and pipelines it heads."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.stages: dict[str, LocalStage] = {}
        self.heads: dict[str, HeadInstance] = {}
        self.pending: dict[str, _PendingStep] = {}
        self._streams: dict[str, tuple[str, Any]] = {}  # stream id -> (head node, send stream)
        self._serving: dict[str, anyio.CancelScope] = {}  # stream id -> scope of a forwarded generation
        self._tokenizers: dict[str, Tokenizer] = {}
        self._changed_event: anyio.Event | None = None  # made in the event loop, on first use
        self.links: LinkServer | None = None  # direct stage links (skulk_core.links); None: off
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: Any = None  # the event loop's, for calls into it from link threads
        self._offers: dict[str, tuple[anyio.Event, list[LinkOffer], str]] = {}  # link request id -> (done, reply, asked node)
        cluster = node.cluster
        cluster.on(Command, self._on_command)
        cluster.on(StageReport, self._on_stage_report)
        cluster.on(StageForward, self._on_stage_forward)
        cluster.on(StageResult, self._on_stage_result)
        cluster.on(StageRelease, self._on_stage_release)
        cluster.on(LinkRequest, self._on_link_request)
        cluster.on(LinkOffer, self._on_link_offer)
        cluster.on(GenerateForward, self._on_generate)
        cluster.on(StreamChunk, self._on_stream_chunk)
        cluster.on(StreamEnd, self._on_stream_end)
        cluster.on(StreamCancel, self._on_stream_cancel)
        cluster.watch(self.changed)
        cluster.watch_leaves(self._peer_left)

    # -- running -----------------------------------------------------------------------------
    @property
    def _changed(self) -> anyio.Event:
        if self._changed_event is None:
            self._changed_event = anyio.Event()
        return self._changed_event

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        self._start_links()
        task_status.started()
        try:
            while True:
                await self._changed.wait()
                self._changed_event = anyio.Event()
                try:
                    await self._reconcile()
                except Exception:
                    # One bad instance must not take the node down; the next change retries.
                    log.exception("reconciling instances failed")
        finally:
            with anyio.CancelScope(shield=True):
                for head in list(self.heads.values()):
                    head.scope.cancel()
                for stage in list(self.stages.values()):
                    await self._unload(stage)
                if self.links is not None:
                    self.links.close()

    def changed(self) -> None:
        self._changed.set()

    async def _reconcile(self) -> None:
        cluster = self.node.cluster
        state = cluster.state
        me = self.node.node_id
        if cluster.is_master:
            await self._replace_lost(state)
            state = cluster.state
        for record in state.instances.values():
            for index, stage in enumerate(record.placement.stages):
                if stage.node_id == me and record.instance_id not in self.stages:
                    local = LocalStage(record, index)
                    self.stages[record.instance_id] = local
                    self.node.task_group.start_soon(self._load, local, name=f"load {record.model_id} stage {index}")
        for instance_id, local in list(self.stages.items()):
            if instance_id not in state.instances:
                await self._unload(local)
        for record in state.instances.values():
            head = record.placement.stages[0]
            local = self.stages.get(record.instance_id)
            if record.status == "ready" and head.node_id == me and record.instance_id not in self.heads and local and local.engine:
                await self._start_head(record, local)
        for instance_id, head in list(self.heads.items()):
            if instance_id not in state.instances:
                head.scope.cancel()
                self.heads.pop(instance_id, None)
        for record in state.instances.values():
            if record.status == "ready" and record.model_id not in self._tokenizers and record.instance_id not in self.heads:
                self._tokenizers[record.model_id] = None  # type: ignore[assignment]  # being fetched
                self.node.task_group.start_soon(self._fetch_tokenizer, record)
        self.node.models.refresh()

    async def _fetch_tokenizer(self, record: InstanceRecord) -> None:
        try:
            await self.tokenizer_for(record)
        except SkulkError as exc:
            log.info("no tokenizer for %s on this node: %s", record.model_id, exc)
        self.node.models.refresh()

    # -- placement (any node asks; the master decides) ---------------------------------------
    async def place(
        self,
        ref: str,
        *,
        backend: str | None = None,
        min_nodes: int = 1,
        context_length: int | None = None,
        max_sequences: int = 8,
    ) -> str:
        """Ask the master to place ``ref``; the instance id (an existing one if the model is
        already placed and not failed)."""
        command = Command(uuid.uuid4().hex, "place", ref, backend, min_nodes, context_length, max_sequences)
        cluster = self.node.cluster
        if cluster.is_master:
            reply = await self._execute(command)
        else:
            reply = await cluster.ask_master(command)
        if not reply.ok:
            kind = {"placement": PlacementError, "model": ModelError, "request": RequestError}.get(reply.error_kind or "", SkulkError)
            raise kind(reply.error or "placement failed")
        return reply.instance_id or ""

    async def delete(self, instance_id: str) -> None:
        command = Command(uuid.uuid4().hex, "delete", instance_id=instance_id)
        cluster = self.node.cluster
        reply = await self._execute(command) if cluster.is_master else await cluster.ask_master(command)
        if not reply.ok:
            raise RequestError(reply.error or "delete failed", code="instance_not_found")

    async def _on_command(self, peer_id: str, command: Command) -> None:
        if not self.node.cluster.is_master:
            await self.node.cluster.send_to(peer_id, CommandReply(command.command_id, False, error="this node is not the master; retry", error_kind="request"))
            return
        reply = await self._execute(command)
        await self.node.cluster.send_to(peer_id, reply)

    async def _execute(self, command: Command) -> CommandReply:
        cluster = self.node.cluster
        try:
            if command.action == "place":
                instance_id = self._place_as_master(command)
            elif command.action == "delete":
                if command.instance_id not in cluster.state.instances:
                    return CommandReply(command.command_id, False, error=f"no instance {command.instance_id!r}", error_kind="request")
                cluster.write(InstanceRemoved(command.instance_id or "", "deleted by a user"))
                instance_id = command.instance_id
            else:
                return CommandReply(command.command_id, False, error=f"unknown command {command.action!r}", error_kind="request")
        except PlacementError as exc:
            return CommandReply(command.command_id, False, error=str(exc), error_kind="placement")
        except ModelError as exc:
            return CommandReply(command.command_id, False, error=str(exc), error_kind="model")
        except SkulkError as exc:
            return CommandReply(command.command_id, False, error=str(exc), error_kind="request")
        await cluster.flush()
        return CommandReply(command.command_id, True, instance_id=instance_id)

    def _place_as_master(self, command: Command) -> str:
        card = self.node.plugins.find_model(command.model or "", self.node)
        if card is None:
            raise ModelError(f"no plugin knows the model {command.model!r}")
        for record in self.node.cluster.state.instances.values():
            if record.model_id == card.id and record.status != "failed" and len(record.placement.stages) >= command.min_nodes:
                return record.instance_id
        context = min(card.context_length, command.context_length or DEFAULT_CONTEXT)
        request = PlacementRequest(
            card.id,
            backend=command.backend,
            min_nodes=command.min_nodes,
            context_length=context,
            max_sequences=command.max_sequences,
        )
        return self._place_card(card, request)

    def _place_card(self, card: ModelCard, request: PlacementRequest) -> str:
        node, cluster = self.node, self.node.cluster
        placement = node.plugins.place(card, cluster.node_views(), request, node.config.extra)
        if placement is None:
            raise PlacementError(f"no placement plugin placed {card.id}")
        record = InstanceRecord(placement.instance_id, card.id, placement, request, card, created_at=time.time())
        cluster.write(InstancePlaced(record))
        layers = ", ".join(f"{s.node_id}[{s.shard.start}:{s.shard.end}]" for s in placement.stages)
        log.info("placed %s as %s on %s", card.id, placement.instance_id, layers)
        node.emit("instance.placed", model=card.id, instance=placement.instance_id, stages=layers)
        return placement.instance_id

    async def _replace_lost(self, state: Any) -> None:
        """Master: an instance with a stage on a node that left is removed and placed again."""
        cluster = self.node.cluster
        for record in list(state.instances.values()):
            gone = [s.node_id for s in record.placement.stages if s.node_id not in state.nodes]
            if not gone:
                continue
            cluster.write(InstanceRemoved(record.instance_id, f"node {gone[0]} left"))
            self.node.emit("instance.lost", model=record.model_id, instance=record.instance_id, node_id=gone[0])
            try:
                # The same card (so the same model id), on as few of the nodes left as hold it.
                new_id = self._place_card(record.card, evolve(record.request, min_nodes=1))
                log.info("re-placed %s after node %s left: %s", record.model_id, gone[0], new_id)
            except SkulkError as exc:
                log.error("cannot re-place %s after node %s left: %s", record.model_id, gone[0], exc)
                self.node.emit("instance.unplaceable", model=record.model_id, error=str(exc))
        await cluster.flush()

    async def _on_stage_report(self, peer_id: str, report: StageReport) -> None:
        cluster = self.node.cluster
        if cluster.is_master and report.instance_id in cluster.state.instances:
            cluster.write(StageStatusChanged(report.instance_id, peer_id, report.status))
            await cluster.flush()

    async def _report(self, instance_id: str, status: str) -> None:
        cluster = self.node.cluster
        if cluster.is_master:
            if instance_id in cluster.state.instances:
                cluster.write(StageStatusChanged(instance_id, self.node.node_id, status))
                await cluster.flush()
        elif cluster.master_id is not None:
            await cluster.send_to(cluster.master_id, StageReport(instance_id, status))

    # -- this node's stages ------------------------------------------------------------------
    async def _load(self, local: LocalStage) -> None:
        node, record = self.node, local.instance
        stage = record.placement.stages[local.index]
        with local.scope:
            try:
                resolver = node.plugins.model_resolver(record.card, node)
                if resolver is None:
                    raise ModelError(f"no storage plugin can provide the files of {record.model_id} ({record.card.source})")
                files = await resolver.fetch()
                backend = node.plugins.backends().backend(stage.backend)
                options = EngineOptions(
                    context_length=record.request.context_length or DEFAULT_CONTEXT,
                    max_sequences=record.request.max_sequences,
                    threads=node.config.serve.threads,
                    settings=node.config.extra.get(stage.backend),
                )
                started = time.monotonic()
                local.engine = await backend.load(record.card, files, stage.shard, options)
                local.thread, local.blocking = step_thread(local.engine), isinstance(local.engine, BlockingStepEngine)
                if local.index == 0 and local.engine.tokenizer is None:
                    raise ModelError(f"the {stage.backend} engine for the first stage of {record.model_id} has no tokenizer")
                local.status = "ready"
                log.info("stage %d of %s (layers %d-%d, %s) loaded in %.1f s", local.index, record.model_id, stage.shard.start, stage.shard.end - 1, stage.backend, time.monotonic() - started)
                node.emit("stage.ready", model=record.model_id, instance=record.instance_id, layers=[stage.shard.start, stage.shard.end], load_s=round(time.monotonic() - started, 3))
            except Exception as exc:
                local.status = f"failed: {exc}"
                log.error("stage %d of %s failed to load: %s", local.index, record.model_id, exc)
                node.emit("stage.failed", model=record.model_id, instance=record.instance_id, error=str(exc))
        if local.scope.cancel_called:
            return
        send, receive = anyio.create_memory_object_stream[StageForward](1024)
        local.inbox = send
        if local.status == "ready" and local.index > 0:
            node.task_group.start_soon(self._stage_worker, local, receive)
        await self._report(record.instance_id, local.status)

    async def _unload(self, local: LocalStage) -> None:
        self.stages.pop(local.instance_id, None)
        local.scope.cancel()
        if local.inbox is not None:
            local.inbox.close()
        if local.outbound is not None:
            local.outbound.close()
        if self.links is not None:
            self.links.close_links(local.instance_id)
        if local.engine is not None:
            with anyio.CancelScope(shield=True):
                async with local.lock:
                    await local.engine.close()
            local.engine = None
        log.info("unloaded stage %d of %s", local.index, local.instance.model_id)

    async def _stage_worker(self, local: LocalStage, inbox: Any) -> None:
        """Run the steps that reach a non-head stage on the transport, in the order they arrive,
        and pass each on as :meth:`send_step` does (a step that came on a direct link runs on the
        link's thread: :meth:`_run_forward`)."""
        cluster = self.node.cluster
        async with inbox:
            async for forward in inbox:
                if local.engine is None:
                    return
                try:
                    outputs = await self._step_locked(local, local.engine, forward.chunks)
                except Exception as exc:
                    log.exception("stage %d of %s failed a step", local.index, local.instance.model_id)
                    await cluster.send_to(forward.origin, StageResult(local.instance_id, forward.step_id, error=str(exc)))
                    continue
                node_id, msg = self._after_step(local, forward, outputs)
                if not await self.send_step(local, node_id, msg) and isinstance(msg, StageForward):
                    await cluster.send_to(forward.origin, self._unreachable(local, forward))

    def _run_forward(self, local: LocalStage, forward: StageForward) -> None:
        """:meth:`_stage_worker`'s step, for a step that came on a direct link: on the engine's
        :func:`~skulk_core.backend.step_thread` where it has one, else on the link's thread,
        blocking; passed on by the next link where there is one."""
        try:
            outputs = self._step_blocking(local, forward.chunks)
        except Exception as exc:
            log.exception("stage %d of %s failed a step", local.index, local.instance.model_id)
            self._pass_on(local, forward.origin, StageResult(local.instance_id, forward.step_id, error=str(exc)))
            return
        node_id, msg = self._after_step(local, forward, outputs)
        if not self._pass_on(local, node_id, msg) and isinstance(msg, StageForward):
            self._report_lost(local, msg)

    def _after_step(self, local: LocalStage, forward: StageForward, outputs: Sequence[StageOutput]) -> tuple[str, StageForward | StageResult]:
        """Where a non-head stage's step goes next, and as what: the activations to the next stage,
        or (the last stage) the logits or sampled tokens to the head, or why sampling failed."""
        record = local.instance
        stages = record.placement.stages
        if local.index + 1 < len(stages):
            return stages[local.index + 1].node_id, _forward(forward, local.index + 1, forward.chunks, outputs)
        try:
            wire = tuple(self._last_stage_output(local, forward, o) for o in outputs)
        except Exception as exc:  # a sampler refused (its parameters were checked at the head)
            log.exception("stage %d of %s failed to sample", local.index, record.model_id)
            return forward.origin, StageResult(record.instance_id, forward.step_id, error=str(exc))
        return forward.origin, StageResult(record.instance_id, forward.step_id, wire)

    @staticmethod
    def _unreachable(local: LocalStage, forward: StageForward) -> StageResult:
        return StageResult(local.instance_id, forward.step_id, error=f"stage {local.index + 1} is unreachable")

    def _step_blocking(self, local: LocalStage, chunks: Sequence[SequenceChunk]) -> list[StageOutput]:
        engine = local.engine
        if engine is None:
            raise BackendError(f"stage {local.index} of {local.instance.model_id} is unloaded")
        if local.blocking:
            return engine.step_blocking(chunks)  # type: ignore[attr-defined]
        outputs = self._in_loop(self._step_locked, local, engine, chunks)
        if outputs is None:
            raise BackendError("the node is stopping")
        return outputs

    @staticmethod
    async def _step_locked(local: LocalStage, engine: Engine, chunks: Sequence[SequenceChunk]) -> list[StageOutput]:
        async with local.lock:
            return await engine.step(chunks)

    def _pass_on(self, local: LocalStage, node_id: str, msg: StageForward | StageResult) -> bool:
        """From a thread that is not the event loop's (the one that computed the step, or a link's):
        :meth:`send_step`, with the open direct link written from this thread; anything else (no
        link or a broken one, another node) goes through the event loop, where ``send_step`` opens
        a link for the next steps and sends this one on the transport.

        Writing to the link never blocks this thread, which may be the compute thread every engine
        of the process shares: what the socket's buffer cannot take at once (a long prefill, or a
        next node that stopped reading) is sent by a thread of its own."""
        link = local.outbound if node_id == local.next_node_id else None
        if link is not None and not link.closed:
            try:
                rest = link.send_now(msg)
            except TransportError as exc:
                self._log_fallback(local, exc)
            else:
                if rest is not None:
                    threading.Thread(target=self._send_rest, args=(local, node_id, msg, rest), name="skulk link send", daemon=True).start()
                return True
        return bool(self._in_loop(self.send_step, local, node_id, msg))

    def _send_rest(self, local: LocalStage, node_id: str, msg: StageForward | StageResult, rest: Callable[[], None]) -> None:
        """:meth:`_pass_on`'s thread for the rest of a frame: on the transport if the link breaks
        meanwhile; if that fails too, the head learns that the step cannot go on."""
        try:
            rest()
            return
        except TransportError as exc:
            self._log_fallback(local, exc)
        if not self._in_loop(self.send_step, local, node_id, msg) and isinstance(msg, StageForward):
            self._report_lost(local, msg)

    def _report_lost(self, local: LocalStage, step: StageForward) -> None:
        """From a thread that is not the event loop's: ``step`` went neither on a link nor on the
        transport, so its head learns that it cannot go on (there, where this node is the head)."""
        if step.origin != self.node.node_id:
            self._pass_on(local, step.origin, self._unreachable(local, step))
        elif self._loop is not None:  # this node heads the pipeline: its step waits here
            try:
                self._loop.call_soon_threadsafe(self._lose_step, step.step_id, f"cannot reach stage {step.stage_index} on {local.next_node_id}")
            except RuntimeError:  # the event loop is gone: the node is stopping
                pass

    @staticmethod
    def _log_fallback(local: LocalStage, exc: TransportError) -> None:
        log.info("%s; stage %d of %s sends on the transport", exc, local.index, local.instance.model_id)

    def _in_loop(self, func: Any, *args: Any) -> Any:
        """From a thread that is not the event loop's: run ``await func(*args)`` in the node's event
        loop and return its result; None once the event loop is gone."""
        try:
            return anyio.from_thread.run(func, *args, token=self._token)
        except RuntimeError:  # the event loop is gone: the node is stopping
            return None

    @staticmethod
    def _last_stage_output(local: LocalStage, forward: StageForward, output: StageOutput) -> WireOutput:
        """Sample here for a request whose sampler the head started here; else send the logits."""
        for spec in forward.samplers:  # usually none: only a request's first step starts one
            if spec.request_id not in local.samplers:
                local.samplers[spec.request_id] = Sampler(spec.params, logprobs=spec.logprobs)
        if output.logits is None:
            return WireOutput(output.request_id, scores=output.scores)
        sampler = local.samplers.get(output.request_id)
        if sampler is None:
            return WireOutput(output.request_id, Tensor.from_numpy(output.logits), scores=output.scores)
        sampled = sampler.sample(output.logits, want_logprobs=sampler.logprobs)
        return WireOutput(output.request_id, token=sampled.token_id, logprob=sampled.logprob, top=sampled.top, scores=output.scores)

    async def _on_stage_forward(self, peer_id: str, forward: StageForward) -> None:
        local = self.stages.get(forward.instance_id)
        if local is None or local.inbox is None or local.index != forward.stage_index:
            await self.node.cluster.send_to(forward.origin, StageResult(forward.instance_id, forward.step_id, error="stage not loaded here"))
            return
        try:
            local.inbox.send_nowait(forward)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            await self.node.cluster.send_to(forward.origin, StageResult(forward.instance_id, forward.step_id, error="stage overloaded or closing"))

    async def _on_stage_result(self, peer_id: str, result: StageResult) -> None:
        self._take_result(result)

    def _lose_step(self, step_id: str, error: str) -> None:
        """A step of a pipeline this node heads will not come back (raised as TransportError)."""
        pending = self.pending.get(step_id)
        if pending is not None and not pending.done.is_set():
            pending.error = error
            pending.done.set()

    def _take_result(self, result: StageResult) -> None:
        pending = self.pending.get(result.step_id)
        if pending is not None:
            pending.result = result
            pending.done.set()

    async def _on_stage_release(self, peer_id: str, release: StageRelease) -> None:
        local = self.stages.get(release.instance_id)
        if local is not None:
            local.samplers.pop(release.request_id, None)
        if local is not None and local.engine is not None:
            async with local.lock:
                await local.engine.release(release.request_id)

    # -- direct stage links (skulk_core.links) ------------------------------------------------
    def _start_links(self) -> None:
        config = self.node.config.transport
        if not config.direct_links:
            return
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            log.info("direct stage links need asyncio; stage traffic stays on the transport")
            return
        self._token = anyio.lowlevel.current_token()
        server = LinkServer(config.host, self._on_link, config.links_port)
        try:
            server.start()
        except OSError as exc:
            log.warning("cannot listen for direct stage links on %s (%s); stage traffic stays on the transport", config.host, exc)
            return
        self.links = server

    async def send_step(self, local: LocalStage, node_id: str, msg: StageForward | StageResult) -> bool:
        """From the event loop: send a step's message from ``local`` to ``node_id``, on the direct
        link if it goes to the next stage's node and one is open (else one starts opening, for the
        next steps), else on the transport. False if neither took it."""
        link = self._link_to_next(local) if node_id == local.next_node_id else None
        if link is not None:
            try:
                rest = link.send_now(msg)
                if rest is not None:  # a long prefill: the socket's buffer is full
                    await anyio.to_thread.run_sync(rest)
                return True
            except TransportError as exc:
                self._log_fallback(local, exc)
        return await self.node.cluster.send_to(node_id, msg)

    def _link_to_next(self, local: LocalStage) -> Link | None:
        """The open direct link from ``local`` to the next stage (the head, after the last), or
        None: then the step goes on the transport, and a link is opened in the background (one
        attempt at a time, at most every :data:`LINK_RETRY` s), so no step waits for one."""
        link = local.outbound
        if link is not None and not link.closed:
            return link
        if self.links is not None and not local.link_opening and time.monotonic() >= local.link_retry_at:
            local.link_opening = True
            local.link_retry_at = time.monotonic() + LINK_RETRY
            self.node.task_group.start_soon(self._open_next_link, local, name=f"link from stage {local.index} of {local.instance.model_id}")
        return None

    async def _open_next_link(self, local: LocalStage) -> None:
        index, node_id = local.next_index, local.next_node_id
        try:
            link = await self._open_link(local, index, node_id)
        except (TransportError, TimeoutError) as exc:
            log.info("no direct link to stage %d of %s on %s (%s); steps to it go on the transport", index, local.instance.model_id, node_id, exc)
            return
        finally:
            local.link_opening = False
        if local.scope.cancel_called:  # unloaded while it opened
            link.close()
            return
        local.outbound = link
        log.info("opened a direct link to stage %d of %s on %s at %s", index, local.instance.model_id, node_id, link.address)
        self.node.emit("stage.link", model=local.instance.model_id, instance=local.instance_id, stage=index, node=node_id)

    async def _open_link(self, local: LocalStage, index: int, node_id: str) -> Link:
        peer = self.node.cluster.peers.get(node_id)
        connection = None if peer is None else peer.connection
        if connection is None:
            raise TransportError("not connected")
        if getattr(connection, "tls", False):
            local.link_retry_at = float("inf")
            raise TransportError("the transport to it is encrypted and a direct link would not be")
        request_id = uuid.uuid4().hex
        done = anyio.Event()
        replies: list[LinkOffer] = []
        self._offers[request_id] = (done, replies, node_id)
        try:
            if not await self.node.cluster.send_to(node_id, LinkRequest(request_id, local.instance_id, index)):
                raise TransportError("cannot reach it")
            with anyio.fail_after(HANDSHAKE_TIMEOUT):
                await done.wait()
        finally:
            self._offers.pop(request_id, None)
        offer = replies[0]
        if offer.error is not None or offer.address is None:
            raise TransportError(offer.error or "it sent no address")
        address = _fix_host(offer.address, connection.remote_address)
        return await anyio.to_thread.run_sync(connect, address, offer.token)

    async def _on_link_request(self, peer_id: str, request: LinkRequest) -> None:
        await self.node.cluster.send_to(peer_id, self._offer_link(peer_id, request))

    def _offer_link(self, peer_id: str, request: LinkRequest) -> LinkOffer:
        if self.links is None:
            return LinkOffer(request.request_id, error="direct stage links are off on that node")
        local = self.stages.get(request.instance_id)
        if local is None or local.index != request.stage_index or local.status != "ready":
            return LinkOffer(request.request_id, error=f"stage {request.stage_index} of instance {request.instance_id} is not ready there")
        stages = local.instance.placement.stages
        if len(stages) < 2 or stages[(local.index - 1) % len(stages)].node_id != peer_id:
            return LinkOffer(request.request_id, error=f"only the node of the stage before stage {local.index} may link to it")
        token = self.links.offer(LinkTarget(request.instance_id, local.index, peer_id))
        return LinkOffer(request.request_id, self.links.address, token)

    async def _on_link_offer(self, peer_id: str, offer: LinkOffer) -> None:
        waiter = self._offers.get(offer.request_id)
        if waiter is not None and waiter[2] == peer_id and not waiter[1]:
            waiter[1].append(offer)
            waiter[0].set()

    def _on_link(self, target: LinkTarget, sock: socket.socket) -> None:
        """An inbound link's thread, until the link ends: results for a pipeline this node heads
        (handed to the event loop), or steps for a stage it runs (stepped and passed on by :meth:`_run_forward`)."""
        try:
            while (msg := receive(sock)) is not None:
                if target.stage_index == 0 and isinstance(msg, StageResult) and msg.instance_id == target.instance_id:
                    assert self._loop is not None
                    self._loop.call_soon_threadsafe(self._take_result, msg)
                    continue
                if isinstance(msg, StageForward) and (msg.instance_id, msg.stage_index) == (target.instance_id, target.stage_index):
                    local = self.stages.get(target.instance_id)
                    if local is None or local.index != target.stage_index:
                        return  # unloaded
                    thread = local.thread
                    if thread is None:
                        self._run_forward(local, msg)
                    else:  # stepped and passed on there; this thread reads the next step meanwhile
                        thread.submit(self._run_forward, local, msg)
                    continue
                log.warning("closing the direct link from %s: it sent %s, not a step of stage %d", target.peer_id, type(msg).__name__, target.stage_index)
                return
        except ProtocolError as exc:
            log.warning("closing the direct link from %s: %s", target.peer_id, exc)
        except TransportError as exc:
            log.debug("the direct link from %s ended: %s", target.peer_id, exc)
        except RuntimeError:  # the event loop is closed: the node is stopping
            pass

    def _peer_left(self, node_id: str) -> None:
        for pending in self.pending.values():
            if node_id in pending.nodes and not pending.done.is_set():
                pending.error = f"node {node_id} left"
                pending.done.set()
        for stream_id, (head, send) in list(self._streams.items()):
            if head == node_id:
                send.send_nowait(StreamEnd(stream_id, f"node {node_id}, which was serving this request, left", "lost"))
        self._changed.set()

    # -- pipelines this node heads -----------------------------------------------------------
    async def _start_head(self, record: InstanceRecord, local: LocalStage) -> None:
        assert local.engine is not None and local.engine.tokenizer is not None
        chain = DistributedChain(self, local)
        runner = InstanceRunner(
            record.model_id,
            chain,
            local.engine.tokenizer,
            context_length=record.request.context_length or DEFAULT_CONTEXT,
            max_sequences=min(record.request.max_sequences, local.engine.max_sequences),
            node=self.node,
            lanes=len(record.placement.stages),
        )
        scope = anyio.CancelScope()
        head = HeadInstance(record, runner, chain, scope)
        self.heads[record.instance_id] = head

        async def run_head() -> None:
            with scope:
                await runner.run()
            self.heads.pop(record.instance_id, None)
            self.node.models.refresh()

        self.node.task_group.start_soon(run_head, name=f"head {record.model_id}")
        log.info("serving %s (instance %s, %d stage(s))", record.model_id, record.instance_id, len(record.placement.stages))
        self.node.emit("instance.ready", model=record.model_id, instance=record.instance_id, stages=len(record.placement.stages))

    # -- the data plane ----------------------------------------------------------------------
    async def remote_generate(self, head_id: str, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Run ``request`` on the head node ``head_id``, streaming its chunks back here."""
        stream_id = uuid.uuid4().hex
        send, receive = anyio.create_memory_object_stream[object](1 << 16)
        self._streams[stream_id] = (head_id, send)
        finished = False
        try:
            if not await self.node.cluster.send_to(head_id, GenerateForward(stream_id, request)):
                raise InstanceLostError(f"cannot reach the head node {head_id}")
            async with receive:
                async for item in receive:
                    if isinstance(item, StreamChunk):
                        yield item.chunk
                        if item.chunk.finish_reason is not None:
                            finished = True
                            return
                    elif isinstance(item, StreamEnd):
                        finished = True
                        if item.error is None:
                            return
                        if item.error_kind == "request":
                            raise RequestError(item.error, param=item.param, code=item.code)
                        if item.error_kind == "lost":
                            raise InstanceLostError(item.error)
                        if item.error_kind == "not_ready":
                            raise ModelNotReadyError(item.error)
                        raise SkulkError(item.error)
        finally:
            self._streams.pop(stream_id, None)
            if not finished:
                with anyio.CancelScope(shield=True):
                    await self.node.cluster.send_to(head_id, StreamCancel(stream_id))

    async def _on_generate(self, peer_id: str, forward: GenerateForward) -> None:
        scope = anyio.CancelScope()
        self._serving[forward.stream_id] = scope

        async def serve() -> None:
            cluster = self.node.cluster
            try:
                with scope:
                    try:
                        async with aclosing(self.node.models.generate_here(forward.request)) as chunks:
                            async for chunk in chunks:
                                if not await cluster.send_to(peer_id, StreamChunk(forward.stream_id, chunk)):
                                    return
                        await cluster.send_to(peer_id, StreamEnd(forward.stream_id))
                    except RequestError as exc:
                        await cluster.send_to(peer_id, StreamEnd(forward.stream_id, str(exc), "request", exc.param, exc.code))
                    except InstanceLostError as exc:
                        await cluster.send_to(peer_id, StreamEnd(forward.stream_id, str(exc), "lost"))
                    except ModelNotReadyError as exc:
                        await cluster.send_to(peer_id, StreamEnd(forward.stream_id, str(exc), "not_ready"))
                    except SkulkError as exc:
                        await cluster.send_to(peer_id, StreamEnd(forward.stream_id, str(exc), "error"))
            finally:
                self._serving.pop(forward.stream_id, None)

        self.node.task_group.start_soon(serve, name=f"serve stream {forward.stream_id}")

    async def _on_stream_chunk(self, peer_id: str, msg: StreamChunk) -> None:
        entry = self._streams.get(msg.stream_id)
        if entry is not None and entry[0] == peer_id:
            try:
                entry[1].send_nowait(msg)
            except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass

    async def _on_stream_end(self, peer_id: str, msg: StreamEnd) -> None:
        await self._on_stream_chunk(peer_id, msg)  # type: ignore[arg-type]

    async def _on_stream_cancel(self, peer_id: str, msg: StreamCancel) -> None:
        scope = self._serving.get(msg.stream_id)
        if scope is not None:
            scope.cancel()

    # -- tokenizers for instances headed elsewhere ------------------------------------------
    async def tokenizer_for(self, record: InstanceRecord) -> Tokenizer:
        """A tokenizer for ``record``'s model on a node that is not its head."""
        head = self.heads.get(record.instance_id)
        if head is not None:
            return head.runner.tokenizer
        local = self.stages.get(record.instance_id)
        if local is not None and local.engine is not None and local.engine.tokenizer is not None:
            return local.engine.tokenizer
        if self._tokenizers.get(record.model_id) is not None:
            return self._tokenizers[record.model_id]
        self._tokenizers[record.model_id] = None  # type: ignore[assignment]  # being fetched
        backend = self.node.plugins.backends().backend(record.placement.stages[0].backend) if record.placement.stages[0].backend in self.node.plugins.backends() else None
        loader = getattr(backend, "load_tokenizer", None)
        resolver = self.node.plugins.model_resolver(record.card, self.node)
        if loader is None or resolver is None:
            self._tokenizers.pop(record.model_id, None)
            raise ModelNotReadyError(
                f"this node cannot tokenize for {record.model_id} (its head is {record.placement.stages[0].node_id}); "
                "send the request to a node of the instance"
            )
        try:
            files = await resolver.fetch()
            tokenizer = await loader(record.card, files)
        except BaseException:
            self._tokenizers.pop(record.model_id, None)
            raise
        self._tokenizers[record.model_id] = tokenizer
        return tokenizer

    def cached_tokenizer(self, model_id: str) -> Tokenizer | None:
        return self._tokenizers.get(model_id)

    def fetching_tokenizer(self, model_id: str) -> bool:
        """True while a tokenizer for ``model_id`` is being loaded (or about to be)."""
        return model_id in self._tokenizers and self._tokenizers[model_id] is None
