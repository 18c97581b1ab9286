"""The cluster service: connections, heartbeats, failure detection, election and log replication.

It runs in the node's task group over whichever transport plugin ``transport.name`` names. With no
transport plugin installed (and no peers configured) the node runs alone and is its own master.
See docs/cluster.md for the algorithm and its timings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from attrs import define, field

from skulk_core.cluster.election import Candidate, Election, View
from skulk_core.cluster.messages import CommandReply, Elect, Heartbeat, Hello, LogAppend, Snapshot, SyncRequest
from skulk_core.cluster.state import (
    ClusterState,
    LogEntry,
    MasterChanged,
    NodeJoined,
    NodeLeft,
    NodeRecord,
    NodeUpdated,
    apply,
)
from skulk_core.errors import ConfigError, ProtocolError, SkulkError, TransportError
from skulk_core.placement import NodeResources
from skulk_core.transport import Connection, TransportContext
from skulk_core.wire import decode, encode

if TYPE_CHECKING:
    from skulk_core.node import Node

log = logging.getLogger("skulk.cluster")

KEY_FILE = "cluster.key"
RECONNECT_GRACE = 1.0  # seconds a peer may be without a connection before it counts as gone
STARTUP_WAIT = 1.5  # seconds to listen for an existing master before electing one
PEER_WAIT = 5.0  # with --peer configured, how long to wait to reach one before electing alone
SEND_TIMEOUT = 2.0
DIAL_TIMEOUT = 3.0


@define(eq=False)
class Peer:
    node_id: str
    connections: list[tuple[Connection, str]] = field(factory=list)  # (connection, initiator id)
    hello: Hello | None = None
    heartbeat: Heartbeat | None = None
    heartbeat_at: float = 0.0
    last_seen: float = 0.0
    disconnected_at: float = 0.0
    alive: bool = False  # as of the last tick

    @property
    def connection(self) -> Connection | None:
        return self.connections[-1][0] if self.connections else None


def _fix_host(address: str, remote: str | None) -> str:
    """A node listening on 0.0.0.0 advertises that; peers substitute the host they reached it on."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", "") and remote:
        remote_host = remote.rpartition(":")[0] or remote
        return f"{remote_host}:{port}"
    return address


def load_cluster_secret(node: Node) -> bytes:
    """The cluster secret: ``cluster.key`` (``SKULK_CLUSTER_KEY``), ``cluster.key_file``, or a key
    this node generates once under its data dir and tells the operator how to share."""
    config = node.config.cluster
    if config.key:
        text = config.key
    elif config.key_file:
        path = Path(config.key_file).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cluster.key_file {path}: {exc.strerror or exc}") from None
        if not text:
            raise ConfigError(f"cluster.key_file {path} is empty")
    else:
        path = node.data_dir / KEY_FILE
        if path.exists():
            text = path.read_text().strip()
        else:
            text = secrets.token_urlsafe(32)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text + "\n")
            log.warning(
                "no cluster key was given, so this node made one (%s). Start the other nodes with "
                "SKULK_CLUSTER_KEY=%s, or copy the file and set cluster.key_file",
                path,
                text,
            )
    return hashlib.sha256(b"skulk-cluster-key\0" + text.encode()).digest()


class Cluster:
    """This node's view of the cluster. ``node.cluster``."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config.cluster
        self.election = Election(node.node_id, View(0, None))
        self.state = ClusterState()
        self.peers: dict[str, Peer] = {}
        self.addresses: list[str] = []
        self.transport: Any = None
        self.standalone = False
        self._started = time.monotonic()
        self._dial_at: dict[str, float] = {}  # address -> when it may be dialled next
        self._dial_backoff: dict[str, float] = {}
        self._address_owner: dict[str, str] = {}  # address -> node id learned from a handshake
        self._dialling: set[str] = set()
        self._last_proposal = -1e9
        self._last_sync = -1e9
        self._resources: NodeResources | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._pending: list[LogEntry] = []  # the master's entries not yet sent
        self._handlers: dict[type, Any] = {}  # message class -> async handler(peer_id, msg)
        self._watchers: list[Any] = []  # called with no arguments after the state changes
        self._leave_watchers: list[Any] = []  # called with a node id when a peer is gone
        self._replies: dict[str, tuple[anyio.Event, list[Any]]] = {}
        self._synced_with: tuple[str, int] | None = None  # (master, round) whose log our state follows
        self._view_since = time.monotonic()  # when we adopted the current election view
        self._master_seen_alive = False  # whether the current master has been alive for us since

    # -- views -----------------------------------------------------------------------------
    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def master_id(self) -> str | None:
        return self.election.master_id

    @property
    def is_master(self) -> bool:
        return self.election.master_id == self.node_id

    def alive_peers(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.alive]

    def describe(self) -> dict[str, Any]:
        """The JSON document ``GET /state`` returns."""
        now_wall, now = time.time(), time.monotonic()
        nodes = []
        for record in self.state.nodes.values():
            peer = self.peers.get(record.node_id)
            if record.node_id == self.node_id:
                last_seen, resources = now_wall, self._resources or record.resources
            elif peer is not None and peer.last_seen:
                resources = peer.heartbeat.resources if peer.heartbeat else record.resources
                last_seen = now_wall - (now - peer.last_seen)
            else:
                last_seen, resources = None, record.resources
            nodes.append(
                {
                    "node_id": record.node_id,
                    "name": record.name,
                    "addresses": list(record.addresses),
                    "api_url": record.api_url,
                    "version": record.version,
                    "is_master": record.node_id == self.state.master_id,
                    "last_seen": last_seen,
                    "resources": _resources_json(resources),
                }
            )
        return {
            "node_id": self.node_id,
            "master_id": self.state.master_id,
            "election_round": self.state.round,
            "index": self.state.index,
            "standalone": self.standalone,
            "nodes": sorted(nodes, key=lambda n: n["node_id"]),
            "instances": [
                {
                    "instance_id": i.instance_id,
                    "model": i.model_id,
                    "status": i.status,
                    "stages": [
                        {
                            "node_id": s.node_id,
                            "layers": [s.shard.start, s.shard.end],
                            "backend": s.backend,
                            "status": i.stage_status.get(s.node_id, "loading"),
                        }
                        for s in i.placement.stages
                    ],
                }
                for i in self.state.instances.values()
            ],
        }

    # -- for other parts of the core: messages, commands, state watching --------------------
    def on(self, message_class: type, handler: Any) -> None:
        """Route messages of ``message_class`` to ``async handler(peer_id, msg)``. Handlers run in
        the connection's reader, so anything slow must be started as a task."""
        self._handlers[message_class] = handler

    def watch(self, callback: Any) -> None:
        """``callback()`` runs (synchronously) after every change of the replicated state."""
        self._watchers.append(callback)

    def watch_leaves(self, callback: Any) -> None:
        """``callback(node_id)`` runs when a peer stops being alive."""
        self._leave_watchers.append(callback)

    def _state_changed(self) -> None:
        for callback in self._watchers:
            try:
                callback()
            except Exception:
                log.exception("a cluster state watcher failed")

    async def send_to(self, node_id: str, msg: object) -> bool:
        """Send ``msg`` to ``node_id``; False if it is not connected or the send failed."""
        peer = self.peers.get(node_id)
        return False if peer is None else await self._send(peer, msg)

    def is_alive(self, node_id: str) -> bool:
        if node_id == self.node_id:
            return True
        peer = self.peers.get(node_id)
        return peer is not None and peer.alive

    def write(self, event: object) -> None:
        """Append an event to the log (master only); it is sent on the next :meth:`flush`."""
        if not self.is_master:
            raise SkulkError("only the master writes cluster events")
        self._append(event)

    async def flush(self) -> None:
        await self._flush()

    async def ask_master(self, command: object, timeout: float = 30.0) -> Any:
        """Send a command to the master and wait for its reply (raises TransportError)."""
        from skulk_core.cluster.messages import Command

        assert isinstance(command, Command)
        master = self.master_id
        if master is None:
            raise TransportError("the cluster has no master yet; retry in a moment")
        if master == self.node_id:
            raise SkulkError("ask_master called on the master")
        done = anyio.Event()
        self._replies[command.command_id] = (done, [])
        try:
            if not await self.send_to(master, command):
                raise TransportError(f"cannot reach the master {master}")
            with anyio.fail_after(timeout):
                await done.wait()
            return self._replies[command.command_id][1][0]
        except TimeoutError:
            raise TransportError(f"the master {master} did not answer within {timeout:.0f} s") from None
        finally:
            self._replies.pop(command.command_id, None)

    def node_views(self) -> list[Any]:
        """The live nodes as placement sees them (resources as of their last heartbeat)."""
        from skulk_core.placement import NodeView

        views = []
        for record in self.state.nodes.values():
            if record.node_id == self.node_id:
                resources = self._resources or record.resources
            elif self.is_alive(record.node_id):
                peer = self.peers[record.node_id]
                resources = peer.heartbeat.resources if peer.heartbeat else record.resources
            else:
                continue
            views.append(NodeView(record.node_id, record.name, resources))
        return views

    # -- running ---------------------------------------------------------------------------
    def _record(self) -> NodeRecord:
        from skulk_core import __version__

        return NodeRecord(
            node_id=self.node_id,
            name=self.node.name,
            addresses=tuple(self.addresses),
            api_url=self.node.api_url if self.node.api_address else None,
            resources=self._local_resources(),
            version=__version__,
            joined_at=time.time(),
        )

    def _local_resources(self) -> NodeResources:
        from attrs import evolve

        from skulk_core.inference import local_resources

        resources = local_resources(self.node)
        return evolve(resources, models=tuple(sorted({m.model_id for m in self.node.plugins.local_models(self.node)})))

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        transports = self.node.plugins.transports()
        name = self.node.config.transport.name
        self._resources = self._local_resources()
        if name not in transports:
            if self.config.peers:
                raise ConfigError(
                    f"cluster.peers is set but no transport plugin named {name!r} is loaded "
                    f"(loaded: {', '.join(transports.names()) or 'none'}); install skulk-tcp or load it with --plugin tcp"
                )
            log.info("no transport plugin %r is loaded: this node runs alone", name)
            self.standalone = True
            self._become_master_alone()
            task_status.started()
            return
        secret = load_cluster_secret(self.node)
        transport_config = self.node.config.transport
        context = TransportContext(
            identity=self.node.identity,
            cluster_secret=secret,
            host=transport_config.host,
            port=transport_config.port,
            discovery_port=self.config.discovery_port if self.config.discovery else None,
            settings=self.node.config.extra.get(name),
        )
        entry = transports.entry(name)
        try:
            self.transport = entry.value(context)
        except SkulkError:
            raise
        except Exception as exc:
            raise SkulkError(f"transport {name!r} (plugin {entry.plugin!r}) failed to start: {exc!r}") from exc
        if hasattr(self.transport, "on_rejected"):
            self.transport.on_rejected = lambda address, reason: self.node.emit("peer.rejected", address=address, reason=reason)
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            self.addresses = list(await tg.start(self.transport.serve, self._on_inbound))
            for address in self.config.peers:
                self._dial_at.setdefault(address, 0.0)
            self._resources = self._local_resources()
            tg.start_soon(self._dial_loop)
            tg.start_soon(self._tick_loop)
            discovery = self.transport.discover()
            if discovery is not None:
                tg.start_soon(self._discovery_loop, discovery)
            log.info("cluster transport %s listening on %s", name, ", ".join(self.addresses))
            task_status.started()

    def _become_master_alone(self) -> None:
        self.election.view = View(1, self.node_id, self.config.force_master)
        self._synced_with = (self.node_id, 1)
        self._append(MasterChanged(self.node_id, 1))
        self._append(NodeJoined(self._record()))
        self.node.emit("master.elected", master_id=self.node_id, round=1)

    # -- connections -----------------------------------------------------------------------
    async def _on_inbound(self, connection: Connection) -> None:
        await self._serve_connection(connection, initiator=connection.peer_id, address=None)

    async def _dial_loop(self) -> None:
        while True:
            now = time.monotonic()
            for address, due in list(self._dial_at.items()):
                if now < due or address in self._dialling or address in self.addresses:
                    continue
                owner = self._address_owner.get(address)
                if owner == self.node_id:
                    continue
                if owner is not None and owner in self.peers and self.peers[owner].connections:
                    continue
                self._dialling.add(address)
                self._task_group.start_soon(self._dial, address)  # type: ignore[union-attr]
            await anyio.sleep(0.25)

    async def _dial(self, address: str) -> None:
        try:
            with anyio.fail_after(DIAL_TIMEOUT):
                connection = await self.transport.dial(address)
        except (TransportError, OSError, TimeoutError) as exc:
            backoff = min(self._dial_backoff.get(address, 0.25) * 2, 5.0)
            self._dial_backoff[address] = backoff
            self._dial_at[address] = time.monotonic() + backoff
            log.debug("dialling %s failed (%s); next try in %.1f s", address, exc, backoff)
            self._dialling.discard(address)
            return
        self._dial_backoff.pop(address, None)
        self._address_owner[address] = connection.peer_id
        self._dialling.discard(address)
        await self._serve_connection(connection, initiator=self.node_id, address=address)

    async def _serve_connection(self, connection: Connection, *, initiator: str, address: str | None) -> None:
        peer_id = connection.peer_id
        try:
            if peer_id == self.node_id:  # we dialled ourselves (an address of ours in a peer list)
                return
            peer = self.peers.setdefault(peer_id, Peer(peer_id))
            keep = min(self.node_id, peer_id)  # both ends keep the connection the smaller id opened
            if peer.connections and initiator != keep and any(i == keep for _, i in peer.connections):
                return
            for old, old_initiator in list(peer.connections):
                if old_initiator != keep and initiator == keep:
                    with anyio.CancelScope(shield=True):
                        await old.aclose()
            peer.connections.append((connection, initiator))
            peer.last_seen = time.monotonic()
            await self._send_on(connection, self._hello())
            await self._send_on(connection, self._heartbeat())
            while True:
                data = await connection.receive()
                try:
                    msg = decode(data)
                except ProtocolError as exc:
                    log.warning("dropping connection to %s: %s", peer_id, exc)
                    self.node.emit("peer.rejected", node_id=peer_id, reason=str(exc))
                    return
                peer.last_seen = time.monotonic()
                await self._dispatch(peer, connection, msg)
        except TransportError as exc:
            log.debug("connection to %s closed: %s", peer_id, exc)
        finally:
            with anyio.CancelScope(shield=True):
                peer_entry = self.peers.get(peer_id)
                if peer_entry is not None:
                    peer_entry.connections = [(c, i) for c, i in peer_entry.connections if c is not connection]
                    if not peer_entry.connections:
                        peer_entry.disconnected_at = time.monotonic()
                        if address is not None:
                            self._dial_at[address] = time.monotonic()  # redial at once
                try:
                    await connection.aclose()
                except Exception:
                    pass

    async def _send_on(self, connection: Connection, msg: object) -> bool:
        try:
            with anyio.fail_after(SEND_TIMEOUT):
                await connection.send(encode(msg))
            return True
        except (TransportError, TimeoutError, OSError):
            return False

    async def _send(self, peer: Peer, msg: object) -> bool:
        connection = peer.connection
        return False if connection is None else await self._send_on(connection, msg)

    async def _broadcast(self, msg: object) -> None:
        data = encode(msg)

        async def one(connection: Connection) -> None:
            try:
                with anyio.fail_after(SEND_TIMEOUT):
                    await connection.send(data)
            except (TransportError, TimeoutError, OSError):
                pass

        async with anyio.create_task_group() as tg:
            for peer in list(self.peers.values()):
                if peer.connection is not None:
                    tg.start_soon(one, peer.connection)

    async def _discovery_loop(self, announcements: Any) -> None:
        async for announcement in announcements:
            if announcement.node_id == self.node_id:
                continue
            if announcement.address not in self._dial_at:
                log.info("discovered %s at %s", announcement.node_id, announcement.address)
                self._dial_at[announcement.address] = 0.0

    # -- messages --------------------------------------------------------------------------
    def _hello(self) -> Hello:
        from skulk_core import __version__

        return Hello(self.node_id, self.node.name, __version__, tuple(self.addresses), self.node.api_url if self.node.api_address else None)

    def _heartbeat(self) -> Heartbeat:
        view = self.election.view
        peers = {}
        for peer in self.peers.values():
            if peer.alive and peer.hello and peer.hello.addresses:
                peers[peer.node_id] = peer.hello.addresses[0]
        return Heartbeat(
            node_id=self.node_id,
            uptime=time.monotonic() - self._started,
            round=view.round,
            master_id=view.master_id,
            master_force=view.master_force,
            force_master=self.config.force_master,
            resources=self._resources or self._local_resources(),
            index=self.state.index,
            peers=peers,
        )

    async def _dispatch(self, peer: Peer, connection: Connection, msg: object) -> None:
        if isinstance(msg, Hello):
            remote = getattr(connection, "remote_address", None)
            addresses = tuple(_fix_host(a, remote) for a in msg.addresses)
            peer.hello = Hello(msg.node_id, msg.name, msg.version, addresses, msg.api_url)
            for address in addresses:
                self._address_owner[address] = peer.node_id
                self._dial_at.setdefault(address, 0.0)
        elif isinstance(msg, Heartbeat):
            peer.heartbeat, peer.heartbeat_at = msg, time.monotonic()
            for node_id, address in msg.peers.items():
                if node_id != self.node_id and address not in self._dial_at and address not in self.addresses:
                    self._dial_at[address] = 0.0
            if msg.master_id is not None:
                await self._observe(View(msg.round, msg.master_id, msg.master_force))
            if peer.node_id == self.master_id and (
                self._synced_with != (peer.node_id, self.election.round) or msg.index > self.state.index
            ):
                # Behind, or still holding another master's log (whose indices mean nothing here).
                await self._request_sync(peer)
        elif isinstance(msg, Elect):
            await self._observe(View(msg.round, msg.candidate_id, msg.candidate_force))
        elif isinstance(msg, LogAppend):
            if peer.node_id != self.master_id:
                return
            if self._synced_with != (peer.node_id, self.election.round):
                await self._request_sync(peer, force=True)
                return
            before = self.state.index
            for entry in msg.entries:
                if entry.index == self.state.index + 1:
                    self.state = apply(self.state, entry)
                elif entry.index > self.state.index + 1:
                    await self._request_sync(peer, force=True)
                    break
            if self.state.index != before:
                self._state_changed()
        elif isinstance(msg, SyncRequest):
            if self.is_master:
                await self._send(peer, Snapshot(self.state))
        elif isinstance(msg, Snapshot):
            if peer.node_id == self.master_id:  # the master's state is the truth
                self.state = msg.state
                self._synced_with = (peer.node_id, self.election.round)
                self._state_changed()
        elif isinstance(msg, CommandReply):
            waiter = self._replies.get(msg.command_id)
            if waiter is not None:
                waiter[1].append(msg)
                waiter[0].set()
        else:
            handler = self._handlers.get(type(msg))
            if handler is not None:
                await handler(peer.node_id, msg)

    async def _request_sync(self, peer: Peer, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_sync > 1.0:
            self._last_sync = now
            await self._send(peer, SyncRequest(self.state.index))

    async def _observe(self, view: View) -> None:
        if self.election.observe(view):
            await self._view_changed()

    async def _view_changed(self) -> None:
        view = self.election.view
        self._view_since = time.monotonic()
        self._master_seen_alive = False
        log.info("master is now %s (round %d)", view.master_id, view.round)
        self.node.emit("master.elected", master_id=view.master_id, round=view.round)
        if view.master_id == self.node_id:
            self._synced_with = (self.node_id, view.round)
            self._master_duties()
        else:
            master = self.peers.get(view.master_id or "")
            if master is not None:
                await self._request_sync(master, force=True)

    # -- the periodic tick -----------------------------------------------------------------
    async def _tick_loop(self) -> None:
        interval = self.config.heartbeat_interval
        resources_every = max(1, int(2.0 / interval))
        ticks = 0
        while True:
            if ticks % resources_every == 0:
                self._resources = self._local_resources()
            ticks += 1
            await self._broadcast(self._heartbeat())
            self._detect_failures()
            await self._maybe_elect()
            if self.is_master:
                self._master_duties()
                await self._flush()
            await anyio.sleep(interval)

    def _detect_failures(self) -> None:
        now = time.monotonic()
        for peer in self.peers.values():
            connected = bool(peer.connections) or now - peer.disconnected_at < RECONNECT_GRACE
            alive = peer.hello is not None and connected and now - peer.last_seen < self.config.node_timeout
            if alive and not peer.alive:
                self.node.emit("peer.joined", peer_id=peer.node_id, name=peer.hello.name if peer.hello else None)
            elif peer.alive and not alive:
                self.node.emit("peer.left", peer_id=peer.node_id, reason="connection lost" if not peer.connections else "missed heartbeats")
                peer.alive = False
                for callback in self._leave_watchers:
                    try:
                        callback(peer.node_id)
                    except Exception:
                        log.exception("a peer-left watcher failed")
            peer.alive = alive

    async def _maybe_elect(self) -> None:
        now = time.monotonic()
        master = self.election.master_id
        if master == self.node_id:
            return
        if master is not None and master in self.peers and self.peers[master].alive:
            self._master_seen_alive = True
            return
        since_start = now - self._started
        if master is not None and not self._master_seen_alive and now - self._view_since < self.config.node_timeout + 1.0:
            # We adopted a master we have not reached yet (the mesh is still forming): give the
            # dialler time rather than start a round that would unseat a healthy master.
            return
        if master is None:
            if since_start < STARTUP_WAIT:
                return
            if self.config.peers and not self.alive_peers() and since_start < PEER_WAIT:
                return
        if now - self._last_proposal < self.config.node_timeout:
            return
        candidates = [Candidate(self.node_id, since_start, self.config.force_master)]
        for peer in self.alive_peers():
            if peer.heartbeat is not None:
                uptime = peer.heartbeat.uptime + (now - peer.heartbeat_at)
                candidates.append(Candidate(peer.node_id, uptime, peer.heartbeat.force_master))
        self._last_proposal = now
        view = self.election.propose(candidates)
        log.info("electing %s in round %d (previous master %s)", view.master_id, view.round, master)
        await self._broadcast(Elect(view.round, view.master_id or "", view.master_force, self.node_id))
        await self._view_changed()

    # -- the master's writes ----------------------------------------------------------------
    def _append(self, event: object) -> None:
        entry = LogEntry(self.state.index + 1, self.election.round, event)  # type: ignore[arg-type]
        self.state = apply(self.state, entry)
        self._pending.append(entry)
        self._state_changed()

    async def _flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            await self._broadcast(LogAppend(self.election.round, tuple(pending)))

    def _master_duties(self) -> None:
        """Turn what the master observes into events (sent by the next flush)."""
        view = self.election.view
        if self.state.master_id != self.node_id or self.state.round != view.round:
            self._append(MasterChanged(self.node_id, view.round))
        mine = self._record()
        if self.node_id not in self.state.nodes:
            self._append(NodeJoined(mine))
        elif _changed(self.state.nodes[self.node_id], mine.resources, mine.addresses, mine.api_url):
            self._append(NodeUpdated(self.node_id, mine.resources, mine.addresses, mine.api_url))
        for peer in self.peers.values():
            if not peer.alive or peer.hello is None or peer.heartbeat is None:
                continue
            hello, resources = peer.hello, peer.heartbeat.resources
            record = self.state.nodes.get(peer.node_id)
            if record is None:
                self._append(
                    NodeJoined(NodeRecord(peer.node_id, hello.name, hello.addresses, hello.api_url, resources, hello.version, time.time()))
                )
            elif _changed(record, resources, hello.addresses, hello.api_url):
                self._append(NodeUpdated(peer.node_id, resources, hello.addresses, hello.api_url))
        for node_id in list(self.state.nodes):
            if node_id != self.node_id and not (node_id in self.peers and self.peers[node_id].alive):
                self._append(NodeLeft(node_id, "missed heartbeats"))


def _changed(record: NodeRecord, resources: NodeResources, addresses: tuple[str, ...], api_url: str | None) -> bool:
    old = record.resources
    moved = abs(old.memory_available - resources.memory_available) > 0.05 * max(old.memory_total, 1)
    sites_moved = old.sites.keys() != resources.sites.keys() or any(
        site.device != old.sites[name].device
        or abs(site.memory_available - old.sites[name].memory_available) > 0.05 * max(old.sites[name].memory_available, 1)
        for name, site in resources.sites.items()
    )
    return (
        moved
        or sites_moved
        or old.backends != resources.backends
        or old.models != resources.models
        or old.memory_limit != resources.memory_limit
        or tuple(record.addresses) != tuple(addresses)
        or record.api_url != api_url
    )


def _resources_json(resources: NodeResources) -> dict[str, Any]:
    return {
        "memory_total": resources.memory_total,
        "memory_available": resources.memory_available,
        "memory_limit": resources.memory_limit,
        "cpu_count": resources.cpu_count,
        "accelerators": [{"kind": a.kind, "name": a.name, "memory_total": a.memory_total} for a in resources.accelerators],
        "backends": list(resources.backends),
        "sites": {name: {"device": s.device, "memory_available": s.memory_available} for name, s in resources.sites.items()},
        "models": list(resources.models),
    }
