"""The control-plane messages nodes exchange (see :mod:`skulk_core.wire` for the envelope)."""

from __future__ import annotations

from collections.abc import Mapping

from attrs import field, frozen

from skulk_core.cluster.state import ClusterState, LogEntry
from skulk_core.placement import NodeResources
from skulk_core.wire import message


@message("hello")
@frozen
class Hello:
    """First message on every connection, both ways."""

    node_id: str
    name: str
    version: str
    addresses: tuple[str, ...] = field(converter=tuple)  # where this node's transport listens
    api_url: str | None = None


@message("heartbeat")
@frozen
class Heartbeat:
    node_id: str
    uptime: float
    round: int
    master_id: str | None
    master_force: bool
    force_master: bool  # the sender itself asked to be master
    resources: NodeResources
    index: int  # last event the sender applied
    peers: Mapping[str, str] = field(factory=dict)  # node id -> transport address, for mesh forming


@message("elect")
@frozen
class Elect:
    round: int
    candidate_id: str
    candidate_force: bool
    proposer_id: str


@message("log_append")
@frozen
class LogAppend:
    round: int
    entries: tuple[LogEntry, ...] = field(converter=tuple)


@message("sync_request")
@frozen
class SyncRequest:
    index: int


@message("snapshot")
@frozen
class Snapshot:
    state: ClusterState
