"""The replicated cluster state and the one pure function every node applies events with.

The master is the single writer: it turns what it observes (a node joined, left, changed; an
instance placed or ready) into events, numbers them, and sends them to every node. Every node
applies them in order with :func:`apply`, so any node holds the same state and can take over as
master from exactly where the last one stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

from attrs import evolve, field, frozen

from skulk_core.model import ModelCard
from skulk_core.placement import NodeResources, Placement, PlacementRequest
from skulk_core.wire import message, tagged_union


@frozen
class NodeRecord:
    node_id: str
    name: str
    addresses: tuple[str, ...] = field(converter=tuple)  # transport addresses
    api_url: str | None
    resources: NodeResources
    version: str
    joined_at: float  # master's clock


@frozen
class InstanceRecord:
    instance_id: str
    model_id: str
    placement: Placement
    request: PlacementRequest
    card: ModelCard
    status: str = "loading"  # "loading", "ready", "failed"
    stage_status: Mapping[str, str] = field(factory=dict)  # node_id -> "loading" | "ready" | "failed: why"
    created_at: float = 0.0


@frozen
class ClusterState:
    master_id: str | None = None
    round: int = 0
    index: int = 0  # index of the last applied event
    nodes: Mapping[str, NodeRecord] = field(factory=dict)
    instances: Mapping[str, InstanceRecord] = field(factory=dict)


# -- events ------------------------------------------------------------------------------------


@frozen
class MasterChanged:
    master_id: str
    round: int


@frozen
class NodeJoined:
    record: NodeRecord


@frozen
class NodeUpdated:
    node_id: str
    resources: NodeResources
    addresses: tuple[str, ...] = field(converter=tuple)
    api_url: str | None = None


@frozen
class NodeLeft:
    node_id: str
    reason: str


@frozen
class InstancePlaced:
    instance: InstanceRecord


@frozen
class StageStatusChanged:
    instance_id: str
    node_id: str
    status: str


@frozen
class InstanceRemoved:
    instance_id: str
    reason: str


Event = tagged_union(
    Union[MasterChanged, NodeJoined, NodeUpdated, NodeLeft, InstancePlaced, StageStatusChanged, InstanceRemoved]
)


@message("log_entry")
@frozen
class LogEntry:
    """One event of the log. ``round`` is the election round of the master that wrote it."""

    index: int
    round: int
    event: Event


def _instance_status(instance: InstanceRecord) -> str:
    statuses = [instance.stage_status.get(s.node_id, "loading") for s in instance.placement.stages]
    if any(s.startswith("failed") for s in statuses):
        return "failed"
    if all(s == "ready" for s in statuses):
        return "ready"
    return "loading"


def apply(state: ClusterState, entry: LogEntry) -> ClusterState:
    """The next state. Pure: the same entries applied in the same order give the same state."""
    event = entry.event
    state = evolve(state, index=entry.index)
    if isinstance(event, MasterChanged):
        return evolve(state, master_id=event.master_id, round=event.round)
    if isinstance(event, NodeJoined):
        return evolve(state, nodes={**state.nodes, event.record.node_id: event.record})
    if isinstance(event, NodeUpdated):
        old = state.nodes.get(event.node_id)
        if old is None:
            return state
        new = evolve(old, resources=event.resources, addresses=event.addresses, api_url=event.api_url)
        return evolve(state, nodes={**state.nodes, event.node_id: new})
    if isinstance(event, NodeLeft):
        nodes = {k: v for k, v in state.nodes.items() if k != event.node_id}
        return evolve(state, nodes=nodes, master_id=None if state.master_id == event.node_id else state.master_id)
    if isinstance(event, InstancePlaced):
        return evolve(state, instances={**state.instances, event.instance.instance_id: event.instance})
    if isinstance(event, StageStatusChanged):
        old_instance = state.instances.get(event.instance_id)
        if old_instance is None:
            return state
        stage_status = {**old_instance.stage_status, event.node_id: event.status}
        instance = evolve(old_instance, stage_status=stage_status)
        instance = evolve(instance, status=_instance_status(instance))
        return evolve(state, instances={**state.instances, event.instance_id: instance})
    if isinstance(event, InstanceRemoved):
        return evolve(state, instances={k: v for k, v in state.instances.items() if k != event.instance_id})
    raise TypeError(f"unknown event {type(event).__name__}")
