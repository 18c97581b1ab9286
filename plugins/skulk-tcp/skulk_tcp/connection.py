"""One authenticated link to a peer: whole messages and byte streams multiplexed on one socket.

Two tasks own the socket. The reader parses frames and files each one with its message queue or
stream; it never waits on a stream, because a peer may only send a stream as many bytes as the
receiver has granted in CREDIT frames (the window), and a stream's buffer holds at most that. The
writer sends control frames (OPEN, CREDIT) first, then data frames (MESSAGE, DATA, EOF, CLOSE) in
the order they were queued; a stream keeps at most two chunks queued, so a big transfer holds a
message back by at most two chunks (512 KiB by default) per stream sending at that moment. Callers
wait until their frames are on the socket, so what is buffered here is bounded by the callers
waiting, and stream payloads are slices of the caller's own buffer, not copies.

Messages nobody has received yet are held up to ``max_pending_message_bytes``; beyond that the
reader stops reading the socket, which pushes back on the peer through TCP.

Any fault (a malformed frame, a broken socket, :meth:`TcpConnection.aclose`, the transport
stopping) closes the whole connection and wakes every waiter with :class:`TransportError`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable

import anyio
from anyio.abc import TaskStatus
from anyio.streams.buffered import BufferedByteStream

from skulk_core import ProtocolError, TransportError

from skulk_tcp.frames import (
    CREDIT,
    EMPTY_TYPES,
    HEADER,
    HEADER_SIZE,
    INITIAL_CREDIT,
    MESSAGE_CHANNEL,
    FrameType,
    credit_frame,
    frame,
    header,
)

log = logging.getLogger("skulk.tcp")

_JOIN_BELOW = 64 * 1024  # header and payload go out in one send below this size
_MAX_CREDIT = 2**31 - 1
_PIPELINE = 2  # chunks of one stream waiting for the writer at once
_STREAM_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, anyio.IncompleteRead)


class _Signal:
    """Wakes everyone waiting at the moment it fires. Check the condition, then wait, with no
    ``await`` in between: the event loop runs one task at a time, so no wake-up is lost."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class _Outgoing:
    """A data frame waiting for the writer."""

    __slots__ = ("parts", "done", "written")

    def __init__(self, parts: tuple[bytes | memoryview, ...]) -> None:
        self.parts = parts
        self.done = anyio.Event()
        self.written = False


class TcpByteStream:
    """A byte stream on a :class:`TcpConnection`, in both directions, with credit-based flow control.

    ``send`` waits while the peer has not granted room; ``receive`` returns ``b""`` once the peer
    sent EOF (or closed the stream) and every byte before it was read. ``aclose`` ends the stream
    both ways; a peer still sending on it gets :class:`TransportError`.
    """

    def __init__(self, connection: TcpConnection, stream_id: int) -> None:
        self.stream_id = stream_id
        self._connection = connection
        self._closed = False  # aclose() was called here
        # sending
        self._send_credit = INITIAL_CREDIT
        self._send_lock = anyio.Lock()
        self._eof_sent = False
        self._peer_closed = False  # the peer sent CLOSE: it reads nothing more
        self._credit_arrived = _Signal()
        # receiving
        self._chunks: deque[memoryview] = deque()
        self._allowance = INITIAL_CREDIT  # bytes the peer may still send before it needs more credit
        self._unacknowledged = 0  # bytes read here but not yet given back as credit
        self._eof = False
        self._data_arrived = _Signal()

    def __repr__(self) -> str:
        return f"<TcpByteStream {self.stream_id} to {self._connection.peer_id}>"

    @property
    def peer_id(self) -> str:
        return self._connection.peer_id

    def _check_sendable(self) -> None:
        if self._closed:
            raise TransportError(f"stream {self.stream_id} to {self.peer_id} is closed")
        if self._eof_sent:
            raise TransportError(f"stream {self.stream_id} to {self.peer_id}: send() after send_eof()")
        self._connection._raise_if_closed()
        if self._peer_closed:
            raise TransportError(f"peer {self.peer_id} closed stream {self.stream_id} before reading all of it")

    async def send(self, data: bytes) -> None:
        view = memoryview(data).cast("B")
        chunk = self._connection._chunk
        async with self._send_lock:
            # Up to _PIPELINE chunks wait for the writer at once, so it sends back to back while
            # this task is rescheduled, and a message queued meanwhile waits for at most those.
            pending: deque[_Outgoing] = deque()
            offset = 0
            try:
                while offset < len(view) or pending:
                    if offset < len(view):
                        self._check_sendable()
                        if self._send_credit > 0 and len(pending) < _PIPELINE:
                            size = min(len(view) - offset, self._send_credit, chunk)
                            self._send_credit -= size
                            pending.append(self._connection._queue(FrameType.DATA, self.stream_id, view[offset : offset + size]))
                            offset += size
                            continue
                    if pending:
                        item = pending[0]
                        await item.done.wait()
                        pending.popleft()
                        if not item.written:
                            self._connection._raise_if_closed()
                    else:
                        await self._credit_arrived.wait()
            except BaseException:
                self._connection._unqueue(pending)
                raise

    async def send_eof(self) -> None:
        """Tell the peer no more data follows; this side can still receive."""
        async with self._send_lock:
            self._check_sendable()
            self._eof_sent = True
            await self._connection._write(FrameType.EOF, self.stream_id)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        while not self._chunks:
            if self._closed:
                raise TransportError(f"stream {self.stream_id} to {self.peer_id} is closed")
            if self._eof:
                return b""
            self._connection._raise_if_closed()
            await self._data_arrived.wait()
        if self._closed:
            raise TransportError(f"stream {self.stream_id} to {self.peer_id} is closed")
        if self._connection._closed_here:
            self._connection._raise_if_closed()
        pieces = []
        wanted = max_bytes
        while wanted and self._chunks:
            head = self._chunks[0]
            if len(head) <= wanted:
                pieces.append(head)
                self._chunks.popleft()
                wanted -= len(head)
            else:
                pieces.append(head[:wanted])
                self._chunks[0] = head[wanted:]
                wanted = 0
        data = b"".join(pieces)
        self._unacknowledged += len(data)
        # Give credit back in batches of half a window: enough to keep the sender busy, few frames.
        if not self._eof and self._unacknowledged >= self._connection._grant_threshold:
            self._connection._grant(self, self._unacknowledged)
            self._unacknowledged = 0
        return data

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._chunks.clear()
        self._connection._forget(self)
        self._credit_arrived.fire()
        self._data_arrived.fire()
        if not self._peer_closed and self._connection._error is None:
            try:
                await self._connection._write(FrameType.CLOSE, self.stream_id)
            except TransportError:
                pass

    # -- called by the connection's reader ------------------------------------------------------
    def _on_data(self, payload: bytes) -> None:
        self._allowance -= len(payload)
        if self._closed:
            return
        self._chunks.append(memoryview(payload))
        self._data_arrived.fire()

    def _on_credit(self, amount: int) -> None:
        self._send_credit += amount
        self._credit_arrived.fire()

    def _on_eof(self) -> None:
        self._eof = True
        self._data_arrived.fire()

    def _on_close(self) -> None:
        self._eof = True
        self._peer_closed = True
        self._data_arrived.fire()
        self._credit_arrived.fire()

    def _wake(self) -> None:
        self._data_arrived.fire()
        self._credit_arrived.fire()


class TcpConnection:
    """An authenticated link to one peer (implements :class:`skulk_core.Connection`).

    Extra attributes beyond the contract: ``remote_address`` and ``local_address``
    (``"host:port"``), ``peer_public_key``, ``initiator`` (True on the side that dialled) and
    ``tls`` (True when the link is wrapped in TLS).
    """

    def __init__(
        self,
        stream: BufferedByteStream,
        *,
        peer_id: str,
        peer_public_key: bytes,
        remote_address: str,
        local_address: str,
        initiator: bool,
        tls: bool,
        max_frame: int,
        stream_chunk: int,
        stream_window: int,
        max_pending_messages: int,
        max_pending_streams: int,
        on_closed: Callable[[TcpConnection], None] | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.peer_public_key = peer_public_key
        self.remote_address = remote_address
        self.local_address = local_address
        self.initiator = initiator
        self.tls = tls
        self._stream = stream
        self._max_frame = max_frame
        self._chunk = stream_chunk
        self._window = stream_window
        self._grant_threshold = max(1, stream_window // 2)
        self._max_pending_messages = max_pending_messages
        self._max_pending_streams = max_pending_streams
        self._on_closed = on_closed
        self._error: TransportError | None = None
        self._closed_here = False
        self._scope: anyio.CancelScope | None = None
        self._finished = anyio.Event()
        self._running = False
        # outgoing
        self._control: deque[bytes] = deque()
        self._data: deque[_Outgoing] = deque()
        self._outbox = _Signal()
        # incoming
        self._messages: deque[bytes] = deque()
        self._message_bytes = 0
        self._message_arrived = _Signal()
        self._message_taken = _Signal()
        self._streams: dict[int, TcpByteStream] = {}
        self._to_accept: deque[TcpByteStream] = deque()
        self._stream_arrived = _Signal()
        # the dialer opens odd stream ids, the listener even ones
        self._next_stream_id = 1 if initiator else 2
        self._last_peer_stream_id = 0

    def __repr__(self) -> str:
        return f"<TcpConnection to {self.peer_id} at {self.remote_address}{' (closed)' if self._error else ''}>"

    @property
    def closed(self) -> bool:
        return self._error is not None

    # -- the contract ------------------------------------------------------------------------------
    async def send(self, message: bytes) -> None:
        if len(message) > self._max_frame:
            raise TransportError(
                f"a message of {len(message)} bytes is larger than max_frame_bytes ({self._max_frame}); "
                f"send it on a byte stream instead"
            )
        self._raise_if_closed()
        await self._write(FrameType.MESSAGE, MESSAGE_CHANNEL, message)

    async def receive(self) -> bytes:
        while not self._messages or self._closed_here:
            self._raise_if_closed()
            await self._message_arrived.wait()
        message = self._messages.popleft()
        self._message_bytes -= len(message)
        self._message_taken.fire()
        return message

    async def open_stream(self) -> TcpByteStream:
        self._raise_if_closed()
        stream_id = self._next_stream_id
        if stream_id > 2**32 - 1:
            raise TransportError(f"connection to {self.peer_id} has used up its stream ids; reconnect")
        self._next_stream_id += 2
        stream = TcpByteStream(self, stream_id)
        self._streams[stream_id] = stream
        self._control.append(frame(FrameType.OPEN, stream_id))
        self._outbox.fire()
        self._grant(stream, self._window - INITIAL_CREDIT)
        return stream

    async def accept_stream(self) -> TcpByteStream:
        while not self._to_accept:
            self._raise_if_closed()
            await self._stream_arrived.wait()
        stream = self._to_accept.popleft()
        if not stream._peer_closed:
            self._grant(stream, self._window - INITIAL_CREDIT)
        return stream

    async def aclose(self) -> None:
        if self._error is None:
            self._closed_here = True
            self._fail(TransportError(f"the connection to {self.peer_id} ({self.remote_address}) was closed by this node"))
        if self._running:
            with anyio.CancelScope(shield=True):
                await self._finished.wait()
        else:
            await anyio.aclose_forcefully(self._stream)

    # -- lifetime ----------------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Read and write until the connection closes; started in the transport's task group."""
        self._running = True
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                if self._error is not None:
                    tg.cancel_scope.cancel()
                tg.start_soon(self._read_loop)
                tg.start_soon(self._write_loop)
                task_status.started()
        finally:
            self._fail(TransportError(f"the connection to {self.peer_id} ({self.remote_address}) closed: the transport stopped"))
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(self._stream)
            self._finished.set()
            if self._on_closed is not None:
                self._on_closed(self)

    def _fail(self, error: TransportError) -> None:
        """Close the connection (once) and wake every waiter with ``error``."""
        if self._error is not None:
            return
        self._error = error
        for item in self._data:
            item.done.set()
        self._data.clear()
        self._control.clear()
        for signal in (self._outbox, self._message_arrived, self._message_taken, self._stream_arrived):
            signal.fire()
        for stream in self._streams.values():
            stream._wake()
        if self._scope is not None:
            self._scope.cancel()

    def _raise_if_closed(self) -> None:
        if self._error is not None:
            raise self._error

    def _protocol_error(self, reason: str) -> None:
        log.warning("closing the connection to %s (%s): %s", self.peer_id, self.remote_address, reason)
        self._fail(ProtocolError(f"the connection to {self.peer_id} ({self.remote_address}) broke the protocol: {reason}"))

    # -- writing -----------------------------------------------------------------------------------
    def _queue(self, kind: FrameType, channel: int, payload: bytes | memoryview = b"") -> _Outgoing:
        """Queue a data frame for the writer, which sets ``item.done`` once it is on the socket."""
        self._raise_if_closed()
        length = len(payload)
        if length and length < _JOIN_BELOW:
            parts: tuple[bytes | memoryview, ...] = (header(kind, channel, length) + bytes(payload),)
        elif length:
            parts = (header(kind, channel, length), payload)
        else:
            parts = (header(kind, channel, 0),)
        item = _Outgoing(parts)
        self._data.append(item)
        self._outbox.fire()
        return item

    def _unqueue(self, items: Iterable[_Outgoing]) -> None:
        """Drop frames the writer has not taken (their sender was cancelled). A frame the writer
        has taken goes out whole: a frame is never cut."""
        for item in items:
            try:
                self._data.remove(item)
            except ValueError:
                pass

    async def _write(self, kind: FrameType, channel: int, payload: bytes | memoryview = b"") -> None:
        """Queue a data frame and wait until it is on the socket (a cancelled call sends nothing)."""
        item = self._queue(kind, channel, payload)
        try:
            await item.done.wait()
        except BaseException:
            self._unqueue([item])
            raise
        if not item.written:
            self._raise_if_closed()

    def _grant(self, stream: TcpByteStream, amount: int) -> None:
        if amount <= 0 or self._error is not None or stream._closed:
            return
        stream._allowance += amount
        self._control.append(credit_frame(stream.stream_id, amount))
        self._outbox.fire()

    def _forget(self, stream: TcpByteStream) -> None:
        self._streams.pop(stream.stream_id, None)

    async def _write_loop(self) -> None:
        send = self._stream.send
        try:
            while True:
                if self._control:
                    frames = b"".join(self._control)
                    self._control.clear()
                    await send(frames)
                elif self._data:
                    item = self._data.popleft()
                    try:
                        for part in item.parts:
                            await send(part)
                        item.written = True
                    finally:
                        item.done.set()  # a failed write still wakes its sender (who then sees the error)
                else:
                    await self._outbox.wait()
        except _STREAM_ERRORS as exc:
            self._fail(TransportError(f"the connection to {self.peer_id} ({self.remote_address}) broke while sending: {exc!r}"))
        except Exception as exc:  # a bug here must close this connection, never the node
            log.exception("writer of the connection to %s failed", self.peer_id)
            self._fail(TransportError(f"the connection to {self.peer_id} failed: {exc!r}"))

    # -- reading -----------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        receive_exactly = self._stream.receive_exactly
        try:
            while True:
                try:
                    head = await receive_exactly(HEADER_SIZE)
                except anyio.IncompleteRead:
                    if self._stream.buffer:
                        self._protocol_error("truncated frame header")
                    else:
                        self._fail(
                            TransportError(f"the connection to {self.peer_id} ({self.remote_address}) was closed by the peer")
                        )
                    return
                kind, channel, length = HEADER.unpack(head)
                reason = self._check_header(kind, channel, length)
                if reason is not None:
                    self._protocol_error(reason)
                    return
                try:
                    payload = await receive_exactly(length) if length else b""
                except anyio.IncompleteRead:
                    self._protocol_error(f"truncated frame: the peer closed the connection inside a {length}-byte payload")
                    return
                reason = await self._dispatch(FrameType(kind), channel, payload)
                if reason is not None:
                    self._protocol_error(reason)
                    return
        except _STREAM_ERRORS as exc:
            self._fail(TransportError(f"the connection to {self.peer_id} ({self.remote_address}) broke: {exc!r}"))
        except Exception as exc:
            log.exception("reader of the connection to %s failed", self.peer_id)
            self._fail(TransportError(f"the connection to {self.peer_id} failed: {exc!r}"))

    def _check_header(self, kind: int, channel: int, length: int) -> str | None:
        """Why this header is invalid, or None. Checked before any payload byte is read."""
        try:
            kind = FrameType(kind)
        except ValueError:
            return f"unknown frame type {kind}"
        if kind is FrameType.MESSAGE:
            if channel != MESSAGE_CHANNEL:
                return f"message frame on channel {channel}"
            if length > self._max_frame:
                return f"message of {length} bytes exceeds max_frame_bytes ({self._max_frame})"
            return None
        if channel == MESSAGE_CHANNEL:
            return f"{kind.name} frame on the message channel"
        if kind in EMPTY_TYPES:
            return None if length == 0 else f"{kind.name} frame with a {length}-byte payload"
        if kind is FrameType.CREDIT:
            return None if length == CREDIT.size else f"CREDIT frame with a {length}-byte payload"
        # DATA
        if length == 0 or length > self._max_frame:
            return f"DATA frame of {length} bytes"
        stream = self._streams.get(channel)
        if stream is not None and length > stream._allowance:
            return f"{length} bytes on stream {channel}, beyond the {stream._allowance} bytes of credit it was given"
        return None

    async def _dispatch(self, kind: FrameType, channel: int, payload: bytes) -> str | None:
        if kind is FrameType.MESSAGE:
            # Hold at most max_pending_message_bytes of unread messages (always at least one).
            while self._messages and self._message_bytes + len(payload) > self._max_pending_messages:
                await self._message_taken.wait()
            self._messages.append(payload)
            self._message_bytes += len(payload)
            self._message_arrived.fire()
            return None
        if kind is FrameType.OPEN:
            return self._on_open(channel)
        stream = self._streams.get(channel)
        if stream is None:
            # A stream closed here (or refused): late frames for it are expected and dropped.
            return None
        if kind is FrameType.DATA:
            if stream._eof:
                return f"DATA on stream {channel} after its EOF"
            stream._on_data(payload)
        elif kind is FrameType.CREDIT:
            (amount,) = CREDIT.unpack(payload)
            if amount == 0 or stream._send_credit + amount > _MAX_CREDIT:
                return f"CREDIT of {amount} bytes on stream {channel}"
            stream._on_credit(amount)
        elif kind is FrameType.EOF:
            stream._on_eof()
        elif kind is FrameType.CLOSE:
            stream._on_close()
            self._streams.pop(channel, None)
        return None

    def _on_open(self, stream_id: int) -> str | None:
        peer_parity = 0 if self.initiator else 1  # the peer dialled us: its ids are odd
        if stream_id % 2 != peer_parity or stream_id <= self._last_peer_stream_id:
            return f"OPEN of stream {stream_id}, which the peer may not open now"
        self._last_peer_stream_id = stream_id
        if len(self._to_accept) >= self._max_pending_streams:
            log.debug("refusing stream %d from %s: %d streams wait to be accepted", stream_id, self.peer_id, len(self._to_accept))
            self._control.append(frame(FrameType.CLOSE, stream_id))
            self._outbox.fire()
            return None
        stream = TcpByteStream(self, stream_id)
        self._streams[stream_id] = stream
        self._to_accept.append(stream)
        self._stream_arrived.fire()
        return None
