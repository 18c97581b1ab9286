"""The TCP transport: listen, dial, authenticate every peer, and announce this node on the LAN.

``TcpTransport(context)`` implements :class:`skulk_core.Transport`. Inbound connections, dialled
connections and discovery all live in the task group of :meth:`TcpTransport.serve`, so cancelling
``serve`` closes every connection of this transport (and ``dial`` needs ``serve`` running).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup, TaskStatus, UDPSocket
from anyio.streams.buffered import BufferedByteStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from anyio.streams.tls import TLSAttribute, TLSStream

from skulk_core import AuthenticationError, ConfigError, PeerAnnouncement, ProtocolError, TransportContext, TransportError

from skulk_tcp import discovery
from skulk_tcp.connection import TcpConnection
from skulk_tcp.handshake import NO_BINDING, PROTOCOL_VERSION, PeerHungUp, VersionMismatch, handshake
from skulk_tcp.settings import TcpSettings

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("skulk.tcp")

Handler = Callable[[TcpConnection], Awaitable[None]]
RejectedCallback = Callable[[str, str], None]
_STREAM_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, anyio.IncompleteRead)
_FEED_BUFFER = 64
_BUSY_REPORT_INTERVAL = 10.0  # seconds between reports of connections refused for a flood


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port)."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not host or not 0 < port < 65536:
        raise TransportError(f"{address!r} is not a HOST:PORT address (example: 192.168.1.20:52416)")
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _settings(value: object) -> TcpSettings:
    if value is None:
        return TcpSettings()
    if isinstance(value, TcpSettings):
        return value
    if isinstance(value, Mapping):
        return TcpSettings(**value)
    raise ConfigError(f"the tcp transport expects its settings as a TcpSettings (the `tcp` config section), got {type(value).__name__}")


def _tls_contexts(settings: TcpSettings) -> tuple[ssl.SSLContext, ssl.SSLContext, bytes]:
    """Server and client contexts, and the SHA-256 of this node's own certificate (the channel
    binding a dialer will see)."""
    import ssl

    assert settings.tls_cert is not None and settings.tls_key is not None
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(settings.tls_cert, settings.tls_key)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        # Peers are dialled by IP address and prove who they are in the secret handshake; the
        # certificate is bound into that handshake, so a TLS proxy in between is caught there.
        client.check_hostname = False
        if settings.tls_ca:
            server.verify_mode = ssl.CERT_REQUIRED
            server.load_verify_locations(settings.tls_ca)
            client.verify_mode = ssl.CERT_REQUIRED
            client.load_verify_locations(settings.tls_ca)
            client.load_cert_chain(settings.tls_cert, settings.tls_key)
        else:
            server.verify_mode = ssl.CERT_NONE
            client.verify_mode = ssl.CERT_NONE
        text = Path(settings.tls_cert).read_text()
        start = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        own = hashlib.sha256(ssl.PEM_cert_to_DER_cert(text[start:end])).digest()
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tcp: cannot use the TLS files (tls_cert={settings.tls_cert}, tls_key={settings.tls_key}, "
            f"tls_ca={settings.tls_ca}): {exc}. Check the paths and that they hold PEM data"
        ) from exc
    return server, client, own


class TcpTransport:
    """Skulk's default transport (registered as ``tcp``).

    Beyond the :class:`skulk_core.Transport` contract it offers:

    - ``addresses`` / ``address``: where it listens, once ``serve`` has started (port 0 resolved);
    - ``on_rejected(address, reason)``: called for every inbound peer that fails the handshake
      (the node raises its ``peer.rejected`` event from it); ``rejected_count`` counts them;
    - ``connections``: the open connections;
    - ``protocol_version``: the handshake version it speaks (tests set it to provoke a mismatch).
    """

    name = "tcp"

    def __init__(self, context: TransportContext) -> None:
        if not context.cluster_secret:
            raise ConfigError("the cluster secret is empty; set SKULK_CLUSTER_KEY or cluster.key_file")
        self.context = context
        self.settings = _settings(context.settings)
        self.protocol_version = PROTOCOL_VERSION
        self.on_rejected: RejectedCallback | None = None
        self.rejected_count = 0
        self.addresses: list[str] = []
        self.connections: set[TcpConnection] = set()
        self._task_group: TaskGroup | None = None
        self._pending_handshakes = 0
        self._refused_busy = 0
        self._busy_reported_at = float("-inf")
        self._feeds: list[MemoryObjectSendStream[PeerAnnouncement]] = []
        self._tls: tuple[ssl.SSLContext, ssl.SSLContext, bytes] | None = None
        if self.settings.tls:
            self._tls = _tls_contexts(self.settings)  # bad files fail at start-up, not at the first peer

    def __repr__(self) -> str:
        return f"<TcpTransport {self.context.identity.node_id} on {', '.join(self.addresses) or 'nothing yet'}>"

    @property
    def address(self) -> str | None:
        """The address peers should dial (an IPv4 one when there is one)."""
        for address in self.addresses:
            if not address.startswith("["):
                return address
        return self.addresses[0] if self.addresses else None

    # -- serving -----------------------------------------------------------------------------------
    async def serve(self, handler: Handler, *, task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED) -> None:
        host, port = self.context.host, self.context.port
        try:
            listener = await anyio.create_tcp_listener(local_host=host or None, local_port=port)
        except OSError as exc:
            raise TransportError(
                f"cannot listen for peers on {format_address(host or '*', port)}: {exc.strerror or exc}; "
                f"is another node using the port? choose another with --transport-port"
            ) from exc
        try:
            self.addresses = [
                format_address(*one.extra(SocketAttribute.local_address)[:2]) for one in listener.listeners
            ]
            async with anyio.create_task_group() as tg:
                for one in listener.listeners:
                    tg.start_soon(self._accept_loop, one, handler, tg)
                if self.context.discovery_port is not None:
                    await tg.start(self._run_discovery, self.context.discovery_port)
                self._task_group = tg
                log.debug("tcp transport of %s listening on %s", self.context.identity.node_id, ", ".join(self.addresses))
                task_status.started(list(self.addresses))
        finally:
            self._task_group = None
            for feed in self._feeds:
                feed.close()
            self._feeds.clear()
            with anyio.CancelScope(shield=True):
                await listener.aclose()

    async def _accept_loop(self, listener: Any, handler: Handler, tg: TaskGroup) -> None:
        while True:
            try:
                raw = await listener.accept()
            except anyio.ClosedResourceError:
                return
            except Exception as exc:  # out of file descriptors, a connection reset while queued, ...
                log.warning("accepting a peer connection failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            tg.start_soon(self._serve_inbound, raw, handler)

    async def _serve_inbound(self, raw: SocketStream, handler: Handler) -> None:
        remote = _remote_address(raw)
        connection = await self._authenticate_inbound(raw, remote)
        if connection is None:
            return
        log.debug("peer %s connected from %s", connection.peer_id, remote)
        async with anyio.create_task_group() as tg:
            await tg.start(connection.run)
            self.connections.add(connection)
            try:
                await handler(connection)
            except TransportError as exc:
                log.debug("the handler of the connection from %s ended: %s", connection.peer_id, exc)
            except Exception:
                log.exception("the handler of the connection from %s (%s) failed", connection.peer_id, remote)
                await connection.aclose()

    async def _authenticate_inbound(self, raw: SocketStream, remote: str) -> TcpConnection | None:
        if self._pending_handshakes >= self.settings.max_pending_handshakes:
            # A flood: count every refusal, but report one per interval, not one per connection.
            self.rejected_count += 1
            self._refused_busy += 1
            now = anyio.current_time()
            if now - self._busy_reported_at >= _BUSY_REPORT_INTERVAL:
                self._busy_reported_at = now
                count, self._refused_busy = self._refused_busy, 0
                self._reject(
                    remote,
                    f"{self._pending_handshakes} handshakes already in progress (max_pending_handshakes); "
                    f"{count} connection(s) refused since the last report",
                    counted=False,
                )
            await anyio.aclose_forcefully(raw)
            return None
        self._pending_handshakes += 1
        timeout = self.settings.handshake_timeout
        try:
            with anyio.fail_after(timeout):
                return await self._secure(raw, remote, dialer=False)
        except TimeoutError:
            reason = f"no complete handshake within {timeout:g} s"
        except PeerHungUp as exc:
            log.debug("%s", exc)
            reason = None
        except VersionMismatch as exc:
            reason = str(exc)
            # Read the rest of its hello, so closing does not reset the connection before it has
            # read ours (and learnt the versions differ on its side too).
            with anyio.move_on_after(0.5):
                try:
                    await raw.receive(64)
                except _STREAM_ERRORS:
                    pass
        except (AuthenticationError, ProtocolError) as exc:
            reason = str(exc)
        except _STREAM_ERRORS as exc:
            reason = f"the connection broke during the handshake ({_describe(exc)})"
        except Exception as exc:  # a bug here must cost one connection, never the listener
            log.exception("the handshake with %s failed unexpectedly", remote)
            reason = f"the handshake failed: {exc!r}"
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(raw)
            raise
        finally:
            self._pending_handshakes -= 1
        await anyio.aclose_forcefully(raw)
        if reason is not None:
            self._reject(remote, reason)
        return None

    def _reject(self, address: str, reason: str, *, counted: bool = True) -> None:
        if counted:
            self.rejected_count += 1
        log.warning("rejected peer %s: %s", address, reason)
        if self.on_rejected is not None:
            try:
                self.on_rejected(address, reason)
            except Exception:
                log.exception("the on_rejected callback failed")

    # -- dialling ----------------------------------------------------------------------------------
    async def dial(self, address: str) -> TcpConnection:
        """Connect to ``address`` (``HOST:PORT``) and authenticate; needs :meth:`serve` running."""
        tg = self._task_group
        if tg is None:
            raise TransportError("the tcp transport can dial only while serve() runs (its connections live there)")
        host, port = parse_address(address)
        timeout = self.settings.handshake_timeout
        try:
            with anyio.fail_after(timeout):
                raw = await anyio.connect_tcp(host, port)
        except TimeoutError:
            raise TransportError(f"could not connect to {address}: no answer within {timeout:g} s") from None
        except OSError as exc:
            raise TransportError(f"could not connect to {address}: {exc.strerror or exc}") from exc
        try:
            with anyio.fail_after(timeout):
                connection = await self._secure(raw, address, dialer=True)
            await tg.start(connection.run)
            self.connections.add(connection)
        except TimeoutError:
            await anyio.aclose_forcefully(raw)
            raise TransportError(f"{address} did not complete the handshake within {timeout:g} s") from None
        except TransportError:
            await anyio.aclose_forcefully(raw)
            raise
        except _STREAM_ERRORS as exc:
            await anyio.aclose_forcefully(raw)
            raise TransportError(f"the connection to {address} broke during the handshake ({_describe(exc)})") from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(raw)
            raise
        log.debug("connected to peer %s at %s", connection.peer_id, address)
        return connection

    # -- both directions ---------------------------------------------------------------------------
    async def _secure(self, raw: SocketStream, remote: str, *, dialer: bool) -> TcpConnection:
        """TLS (when configured), then the secret handshake; returns the connection, not yet running."""
        stream: Any = raw
        binding = NO_BINDING
        if self._tls is not None:
            server_context, client_context, own = self._tls
            try:
                stream = await TLSStream.wrap(
                    raw,
                    server_side=not dialer,
                    ssl_context=client_context if dialer else server_context,
                    standard_compatible=False,
                )
            except _STREAM_ERRORS as exc:
                raise ProtocolError(
                    f"TLS with {remote} failed ({_describe(exc)}); TLS must be on at both ends, "
                    f"with certificates the other trusts"
                ) from exc
            if dialer:
                peer_certificate = stream.extra(TLSAttribute.peer_certificate_binary, None)
                if not peer_certificate:
                    raise ProtocolError(f"{remote} presented no TLS certificate")
                binding = hashlib.sha256(peer_certificate).digest()
            else:
                binding = own
        buffered = BufferedByteStream(stream)
        proof = await handshake(
            buffered,
            dialer=dialer,
            identity=self.context.identity,
            secret=self.context.cluster_secret,
            peer=remote,
            version=self.protocol_version,
            binding=binding,
        )
        settings = self.settings
        connection = TcpConnection(
            buffered,
            peer_id=proof.node_id,
            peer_public_key=proof.public_key,
            remote_address=_remote_address(raw) if dialer else remote,
            local_address=_local_address(raw),
            initiator=dialer,
            tls=self._tls is not None,
            max_frame=settings.max_frame,
            stream_chunk=settings.stream_chunk,
            stream_window=settings.stream_window,
            max_pending_messages=settings.max_pending_messages,
            max_pending_streams=settings.max_pending_streams,
            on_closed=self.connections.discard,
        )
        return connection

    # -- discovery ---------------------------------------------------------------------------------
    def discover(self) -> AsyncIterator[PeerAnnouncement] | None:
        """Peers announcing themselves on the discovery port, or None when discovery is off.

        Every valid announcement from another node is yielded (about one per node every
        ``discovery_interval`` seconds), so a consumer can redial a peer it lost. The iterator ends
        when ``serve`` stops; a consumer that falls behind loses announcements, never blocks.
        """
        if self.context.discovery_port is None:
            return None
        send, receive = anyio.create_memory_object_stream[PeerAnnouncement](_FEED_BUFFER)
        self._feeds.append(send)
        return _feed(receive)

    async def _run_discovery(self, port: int, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            udp = await anyio.create_udp_socket(
                family=socket.AF_INET, local_host="0.0.0.0", local_port=port, reuse_port=hasattr(socket, "SO_REUSEPORT")
            )
            udp.extra(SocketAttribute.raw_socket).setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        except OSError as exc:
            log.warning(
                "LAN discovery is off: cannot listen on UDP port %d (%s); name peers with --peer, "
                "or choose another cluster.discovery_port",
                port,
                exc.strerror or exc,
            )
            task_status.started()
            return
        async with udp, anyio.create_task_group() as tg:
            tg.start_soon(self._announce_loop, udp, port)
            task_status.started()
            await self._listen_loop(udp)

    async def _announce_loop(self, udp: UDPSocket, port: int) -> None:
        target = self.settings.discovery_address
        warned = False
        while True:
            address = self.address
            if address is not None:
                datagram = discovery.encode(self.context.cluster_secret, self.context.identity.node_id, address, time.time())
                try:
                    await udp.sendto(datagram, target, port)
                except OSError as exc:
                    log.log(logging.DEBUG if warned else logging.WARNING, "cannot announce this node to %s:%d: %s", target, port, exc)
                    warned = True
            await anyio.sleep(self.settings.discovery_interval)

    async def _listen_loop(self, udp: UDPSocket) -> None:
        secret = self.context.cluster_secret
        own_id = self.context.identity.node_id
        while True:
            try:
                datagram, (host, _) = await udp.receive()
            except OSError as exc:
                log.debug("discovery receive failed: %s", exc)
                continue
            try:
                announcement = discovery.decode(secret, datagram, now=time.time(), max_age=self.settings.discovery_max_age)
            except discovery.BadAnnouncement as exc:
                log.debug("ignoring a discovery datagram from %s: %s", host, exc)
                continue
            except Exception:  # a datagram must never stop discovery
                log.exception("a discovery datagram from %s could not be read", host)
                continue
            if announcement.node_id == own_id:
                continue
            self._publish(PeerAnnouncement(announcement.node_id, discovery.with_host(announcement.address, host)))

    def _publish(self, announcement: PeerAnnouncement) -> None:
        for feed in list(self._feeds):
            try:
                feed.send_nowait(announcement)
            except anyio.WouldBlock:
                pass  # that consumer is behind; the peer announces again in a moment
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._feeds.remove(feed)


async def _feed(receive: MemoryObjectReceiveStream[PeerAnnouncement]) -> AsyncIterator[PeerAnnouncement]:
    async with receive:
        async for announcement in receive:
            yield announcement


def _remote_address(stream: Any) -> str:
    try:
        host, port = stream.extra(SocketAttribute.remote_address)[:2]
    except (anyio.TypedAttributeLookupError, OSError, ValueError, TypeError):
        return "unknown"
    return format_address(host, port)


def _local_address(stream: Any) -> str:
    try:
        host, port = stream.extra(SocketAttribute.local_address)[:2]
    except (anyio.TypedAttributeLookupError, OSError, ValueError, TypeError):
        return "unknown"
    return format_address(host, port)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (anyio.IncompleteRead, anyio.EndOfStream)):
        return "the peer closed it midway"
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, anyio.BrokenResourceError) and cause is not None:
        return str(cause) or type(cause).__name__
    return str(exc) or type(exc).__name__
