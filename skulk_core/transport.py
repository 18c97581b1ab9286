"""The transport contract: how nodes reach each other.

A transport listens and dials, authenticates every peer with the cluster secret before anything
else is exchanged, and then carries two kinds of traffic on one connection per peer pair: framed
messages (msgpack envelopes, see :mod:`skulk_core.wire`) and bulk byte streams (tensors, files).
It may also announce this node and discover others.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, runtime_checkable

from attrs import field, frozen

from skulk_core.identity import NodeIdentity


@frozen
class TransportContext:
    """What a transport factory gets: who this node is and the secret it must prove."""

    identity: NodeIdentity
    cluster_secret: bytes = field(repr=False)
    host: str
    port: int
    discovery_port: int | None = None  # UDP port for LAN discovery; None: discovery off
    settings: object | None = None  # the transport's own config section, if any


@frozen
class PeerAnnouncement:
    """A node heard of on the network (or named with ``--peer``)."""

    node_id: str | None
    address: str  # transport-specific, e.g. "127.0.0.1:52416"


@runtime_checkable
class ByteStream(Protocol):
    """A bulk byte stream multiplexed on a connection, with back-pressure."""

    async def send(self, data: bytes) -> None: ...

    async def send_eof(self) -> None:
        """Half-close: the peer's ``receive`` returns ``b""`` once it has read everything."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Next bytes; ``b""`` once the sender sent EOF. A stream cut off without EOF (the peer
        vanished) raises :class:`~skulk_core.errors.TransportError`, so a truncated transfer is
        never mistaken for a complete one."""

    async def aclose(self) -> None:
        """Close both directions; a peer still sending gets TransportError."""


@runtime_checkable
class Connection(Protocol):
    """An authenticated link to one peer."""

    peer_id: str  # the peer's node id, proven during the handshake
    remote_address: str | None  # "host:port" the peer connected from or was dialled at

    async def send(self, message: bytes) -> None:
        """Send one framed message (an encoded envelope)."""

    async def receive(self) -> bytes:
        """The next framed message; raises :class:`~skulk_core.errors.TransportError` when closed."""

    async def open_stream(self) -> ByteStream: ...

    async def accept_stream(self) -> ByteStream: ...

    async def aclose(self) -> None: ...


ConnectionHandler = Callable[[Connection], Awaitable[None]]


@runtime_checkable
class Transport(Protocol):
    """What a transport factory returns."""

    name: str
    addresses: list[str]  # where it listens, once serve() started
    # Set by the node: called with (address, reason) for every peer that fails authentication.
    on_rejected: Callable[[str, str], None] | None

    async def serve(self, handler: ConnectionHandler, *, task_status: object) -> None:
        """Listen until cancelled; call ``task_status.started(addresses)`` once listening, and
        ``handler`` in a new task for every inbound connection that passed authentication."""

    async def dial(self, address: str) -> Connection:
        """Connect and authenticate; raises AuthenticationError or TransportError. May require
        :meth:`serve` to be running (connections live in its task group)."""

    def discover(self) -> AsyncIterator[PeerAnnouncement] | None:
        """Peers found on the LAN, or None when the transport does no discovery."""
