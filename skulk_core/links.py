"""Direct stage links: a pipeline's steps on plain TCP sockets, moved by threads.

Through the transport, one hop of a decode step (stage *i*'s activations to stage *i + 1*) wakes
the event loop of each node several times: the connection's writer, its reader, the message
dispatcher, the stage's worker, the compute thread and back. Each wake runs Python that the stage's
compute has just pushed out of the CPU caches; on the project's 2-core VM a hop took 1.1-1.3 ms,
against 6-10 ms of compute per stage. A link is one socket per pair of consecutive stages, read by
a thread of its own that decodes a step and hands it to the engine directly, and written by
whichever thread produced the step; the event loop is not on the path.

Setting one up: the sending node asks the receiving node for a link over the transport, which has
already proven both nodes hold the cluster secret (``LinkRequest``, :mod:`skulk_core.instances`).
The receiver answers with its listener's address and a one-time token (``LinkOffer``). The sender
connects, sends the token, and gets one byte back once the listener bound the socket to the stage
the token was made for. A connection without a valid token within :data:`HANDSHAKE_TIMEOUT` is
closed. Frames are a 4-byte big-endian length and a wire envelope (:mod:`skulk_core.wire`): decoded
into registered attrs classes, never unpickled. Like the transport without TLS, frames are not
encrypted, so a node whose transport connection is encrypted keeps stage traffic on it.
"""

from __future__ import annotations

import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from attrs import frozen

from skulk_core.errors import ProtocolError, TransportError
from skulk_core.wire import MAX_MESSAGE_BYTES, decode, encode

log = logging.getLogger("skulk.links")

FRAME = struct.Struct(">I")
TOKEN_BYTES = 32
TOKEN_TTL = 30.0  # seconds an offered token stays valid
HANDSHAKE_TIMEOUT = 5.0  # seconds to connect, send the token and hear the answer
MAX_HANDSHAKES = 16  # connections still owing their token; more are closed at once
ACCEPTED = b"\x01"


@frozen
class LinkTarget:
    """What an inbound link feeds: stage ``stage_index`` of ``instance_id``, sent to by ``peer_id``."""

    instance_id: str
    stage_index: int
    peer_id: str


class Link:
    """The sending end of a link. ``send`` may be called from any thread; frames never interleave."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self._lock = threading.Lock()
        self.closed = False

    def __repr__(self) -> str:
        return f"<Link to {self.address}{' (closed)' if self.closed else ''}>"

    def send(self, message: object) -> None:
        """Send one message, blocking until the kernel took it all; TransportError closes the link."""
        self._send_frame(frame(message))

    def send_now(self, message: object) -> Callable[[], None] | None:
        """For the event loop: send what the socket takes without blocking. None when all of it went;
        otherwise a call that sends the rest, blocking, to run on a worker thread (the link stays
        locked until it has, so frames never interleave)."""
        data = frame(message)
        if not self._lock.acquire(blocking=False):
            return partial(self._send_frame, data)  # another thread is mid-frame
        try:
            self._check_open()
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lock.release()
            self._fail(exc)
        except BaseException:
            self._lock.release()
            raise
        if sent == len(data):
            self._lock.release()
            return None
        return partial(self._finish, memoryview(data)[sent:])

    def _send_frame(self, data: bytes) -> None:
        with self._lock:
            self._sendall(data)

    def _finish(self, rest: memoryview) -> None:
        try:
            self._sendall(rest)
        finally:
            self._lock.release()

    def _sendall(self, data: bytes | memoryview) -> None:
        self._check_open()
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self._fail(exc)

    def _check_open(self) -> None:
        if self.closed:
            raise TransportError(f"the stage link to {self.address} is closed")

    def _fail(self, exc: OSError) -> None:
        self.close()
        raise TransportError(f"the stage link to {self.address} broke: {exc}") from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            close_socket(self.sock)


def frame(message: object) -> bytes:
    data = encode(message)
    return FRAME.pack(len(data)) + data


def receive(sock: socket.socket) -> object | None:
    """The next message on ``sock`` (blocking); None once the peer closed it between frames.
    Raises ProtocolError for a frame cut short, too large or malformed, and TransportError when the
    socket fails."""
    header = _receive_exactly(sock, FRAME.size)
    if header is None:
        return None
    (length,) = FRAME.unpack(header)
    if length > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a stage link frame of {length} bytes is over the {MAX_MESSAGE_BYTES} byte limit")
    payload = _receive_exactly(sock, length) if length else b""
    if payload is None:
        raise ProtocolError(f"the peer closed the stage link inside a {length}-byte frame")
    return decode(payload)


def _receive_exactly(sock: socket.socket, size: int) -> bytes | None:
    """``size`` bytes; None if the peer closed before the first; ProtocolError if after it."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        try:
            count = sock.recv_into(view[got:])
        except OSError as exc:
            raise TransportError(f"the stage link failed: {exc}") from None
        if count == 0:
            if got == 0:
                return None
            raise ProtocolError(f"the peer closed the stage link after {got} of {size} bytes")
        got += count
    return bytes(buffer)


def close_socket(sock: socket.socket) -> None:
    """Close ``sock`` and wake a thread blocked reading it (``close`` alone does not)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def connect(address: str, token: bytes, timeout: float = HANDSHAKE_TIMEOUT) -> Link:
    """Dial a link listener and present ``token`` (blocking); TransportError when refused."""
    host, _, port = address.rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot open a stage link to {address}: {exc}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(token)
        answer = sock.recv(1)
        if answer != ACCEPTED:
            raise TransportError(f"the node at {address} refused the stage link (its token expired or was used)")
        sock.settimeout(None)
    except OSError as exc:
        close_socket(sock)
        raise TransportError(f"cannot open a stage link to {address}: {exc}") from None
    except BaseException:
        close_socket(sock)
        raise
    return Link(sock, address)


class LinkServer:
    """This node's link listener: offers one-time tokens, and binds each connection that presents
    one to its stage. ``on_link(target, sock)`` then runs on that connection's own thread and reads
    it until it ends; the server closes the socket afterwards."""

    def __init__(self, host: str, on_link: Callable[[LinkTarget, socket.socket], None], port: int = 0) -> None:
        self.host = host
        self.on_link = on_link
        self.port = port
        self._listener: socket.socket | None = None
        self._tokens: dict[bytes, tuple[LinkTarget, float]] = {}
        self._sockets: dict[socket.socket, LinkTarget | None] = {}  # open connections, None: still owes its token
        self._lock = threading.Lock()
        self._closed = False

    @property
    def address(self) -> str:
        host = self.host.strip("[]")
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> None:
        """Listen on ``host`` and ``port`` (0: a free port); raises OSError when it cannot."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host.strip("[]"), self.port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(listener,), name="skulk links", daemon=True).start()

    def offer(self, target: LinkTarget) -> bytes:
        """A token that opens one link to ``target`` within :data:`TOKEN_TTL` seconds."""
        token = secrets.token_bytes(TOKEN_BYTES)
        now = time.monotonic()
        with self._lock:
            for old, (_, expires) in list(self._tokens.items()):
                if expires < now:
                    del self._tokens[old]
            self._tokens[token] = (target, now + TOKEN_TTL)
        return token

    def close_links(self, instance_id: str) -> None:
        """Close every inbound link of ``instance_id`` (its stage is being unloaded)."""
        with self._lock:
            doomed = [s for s, target in self._sockets.items() if target is not None and target.instance_id == instance_id]
            self._tokens = {t: v for t, v in self._tokens.items() if v[0].instance_id != instance_id}
        for sock in doomed:
            close_socket(sock)

    def close(self) -> None:
        """Stop listening and close every link; their threads end."""
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
            self._tokens.clear()
        if self._listener is not None:
            close_socket(self._listener)
        for sock in sockets:
            close_socket(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, peer = listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed or sum(t is None for t in self._sockets.values()) >= MAX_HANDSHAKES:
                    sock.close()
                    continue
                self._sockets[sock] = None
            threading.Thread(target=self._serve, args=(sock, peer), name="skulk link", daemon=True).start()

    def _serve(self, sock: socket.socket, peer: Any) -> None:
        try:
            target = self._handshake(sock, peer)
            if target is not None:
                self.on_link(target, sock)
        except Exception:
            log.exception("a stage link from %s failed", peer)
        finally:
            with self._lock:
                self._sockets.pop(sock, None)
            close_socket(sock)

    def _handshake(self, sock: socket.socket, peer: Any) -> LinkTarget | None:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            token = _receive_exactly(sock, TOKEN_BYTES)
        except (ProtocolError, TransportError, OSError):
            token = None
        with self._lock:
            offered = self._tokens.pop(token, None) if token is not None else None
            if offered is not None and offered[1] >= time.monotonic() and not self._closed:
                self._sockets[sock] = offered[0]
            else:
                offered = None
        if offered is None:
            log.warning("refused a stage link from %s: no valid token", peer[0] if peer else "?")
            return None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(ACCEPTED)
            sock.settimeout(None)
        except OSError:
            return None
        return offered[0]
