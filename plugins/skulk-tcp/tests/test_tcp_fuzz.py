"""Garbage, truncated and oversized frames and slow-loris peers never take the listener down or
stall its good peers. A seeded random loop (hypothesis is not installed), bounded to seconds."""

from __future__ import annotations

import logging
import random
import struct

import anyio
import pytest
from anyio.streams.buffered import BufferedByteStream

from skulk_core import NodeIdentity, ProtocolError, TransportError
from skulk_tcp.frames import HEADER, FrameType
from skulk_tcp.handshake import MAGIC, handshake

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def connect(address: str) -> BufferedByteStream:
    host, port = address.rsplit(":", 1)
    return BufferedByteStream(await anyio.connect_tcp(host, int(port)))


async def hung_up(stream: BufferedByteStream, timeout: float = 6.0) -> float:
    """Read until the listener hangs up; how long that took."""
    started = anyio.current_time()
    with anyio.fail_after(timeout):
        try:
            while True:
                await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
    await stream.aclose()
    return anyio.current_time() - started


async def authenticated(address: str, identity: NodeIdentity, secret: bytes) -> BufferedByteStream:
    """A raw socket past the handshake, to write frames by hand."""
    stream = await connect(address)
    await handshake(stream, dialer=True, identity=identity, secret=secret, peer=address)
    return stream


async def test_garbage_truncation_oversize_and_slow_loris_leave_the_listener_serving(
    make_transport, running, tmp_path, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="skulk.tcp")
    rng = random.Random(20240501)
    server = make_transport(handshake_timeout=2.0, max_frame_bytes="1MiB")
    good = make_transport()
    secret = server.context.cluster_secret
    member = NodeIdentity.load_or_create(tmp_path / "member")  # holds the secret, writes frames by hand
    by_peer: dict[str, list] = {}

    async def handler(connection) -> None:  # type: ignore[no-untyped-def]
        by_peer.setdefault(connection.peer_id, []).append(connection)
        if connection.peer_id == member.node_id:
            try:
                while True:
                    await connection.receive()
            except TransportError as exc:
                connection.fault = exc

    async with running(server, handler) as served, running(good):
        address = served.address
        with anyio.fail_after(30):
            # a good peer connected before the storm, and still talking after it
            before = await good.dial(address)

            async def garbage(blob: bytes) -> None:
                stream = await connect(address)
                await stream.send(blob)
                await hung_up(stream)

            async def trickle(blob: bytes, pause: float) -> float:
                started = anyio.current_time()
                stream = await connect(address)
                with anyio.move_on_after(5):
                    try:
                        for byte in blob:
                            await stream.send(bytes([byte]))
                            await anyio.sleep(pause)
                    except (anyio.BrokenResourceError, OSError):
                        pass  # the listener hung up while we were still trickling
                await hung_up(stream)
                return anyio.current_time() - started

            async def silent() -> float:
                started = anyio.current_time()
                await hung_up(await connect(address))
                return anyio.current_time() - started

            async def truncated(blob: bytes) -> None:
                stream = await connect(address)
                await stream.send(blob)
                await stream.send_eof()
                await hung_up(stream)

            slow_times: list[float] = []

            async def timed(coro) -> None:  # type: ignore[no-untyped-def]
                slow_times.append(await coro)

            async with anyio.create_task_group() as tg:
                # slow-loris: silence, and a valid hello one byte at a time
                for _ in range(5):
                    tg.start_soon(timed, silent())
                for _ in range(2):
                    tg.start_soon(timed, trickle(MAGIC + b"\x00\x01" + bytes(32), 0.25))
                # random bytes of every size, some starting like a real hello
                for i in range(60):
                    blob = rng.randbytes(rng.randint(1, 3000))
                    if i % 4 == 0:
                        blob = MAGIC + blob
                    elif i % 4 == 1:
                        blob = MAGIC + struct.pack("!H", rng.choice([0, 1, 2, 65535])) + blob
                    tg.start_soon(garbage, blob)
                # oversized length fields and headers where a hello should be
                tg.start_soon(garbage, HEADER.pack(FrameType.MESSAGE, 0, 0xFFFFFFFF))
                tg.start_soon(garbage, b"\x16\x03\x01\x02\x00" + rng.randbytes(100))  # a TLS ClientHello's start
                # a hello cut short, and a proof cut short
                tg.start_soon(truncated, MAGIC + b"\x00\x01" + bytes(10))
                tg.start_soon(truncated, MAGIC + b"\x00\x01" + bytes(32) + bytes(50))

                # while all that is pending, a good peer gets in at once: long before the
                # listener gives up on the slow ones
                await anyio.sleep(0.2)
                during = await good.dial(address)
                await during.send(b"during")
                assert not slow_times

            assert len(slow_times) == 7 and all(1.8 < t < 5.0 for t in slow_times), slow_times

            # Past the handshake, a member that breaks the frame format loses its connection only.
            bad_frames = [
                HEADER.pack(FrameType.MESSAGE, 0, 0xFFFFFFFF),  # oversized length field
                HEADER.pack(FrameType.MESSAGE, 0, 2 * 1024 * 1024) + bytes(100),  # above max_frame_bytes
                HEADER.pack(99, 0, 0),  # unknown type
                HEADER.pack(FrameType.MESSAGE, 7, 1) + b"x",  # message off channel 0
                HEADER.pack(FrameType.OPEN, 2, 0),  # the dialler may open odd ids only
                HEADER.pack(FrameType.OPEN, 1, 0) + HEADER.pack(FrameType.DATA, 1, 70_000) + bytes(70_000),  # beyond credit
                HEADER.pack(FrameType.CREDIT, 1, 3) + b"abc",
                HEADER.pack(FrameType.OPEN, 1, 5) + b"12345",
                HEADER.pack(FrameType.MESSAGE, 0, 1000) + bytes(10),  # truncated payload, then EOF
                HEADER.pack(FrameType.MESSAGE, 0, 5)[:4],  # truncated header, then EOF
            ]
            for frame_bytes in bad_frames:
                stream = await authenticated(address, member, secret)
                await stream.send(frame_bytes)
                await stream.send_eof()
                assert await hung_up(stream) < 1.5  # at once, not at the handshake timeout
            for _ in range(20):  # random frames: valid or not, nothing may break
                stream = await authenticated(address, member, secret)
                for _ in range(rng.randint(1, 5)):
                    kind = rng.randint(0, 8)
                    payload = rng.randbytes(rng.randint(0, 200))
                    length = len(payload) if rng.random() < 0.7 else rng.randint(0, 2**32 - 1)
                    await stream.send(HEADER.pack(kind, rng.choice([0, 1, 2, 3, rng.randint(0, 2**32 - 1)]), length) + payload)
                await stream.aclose()

            await anyio.sleep(0.3)
            faults = [getattr(c, "fault", None) for c in by_peer.get(member.node_id, [])]
            assert len(faults) == len(bad_frames) + 20
            assert sum(isinstance(f, ProtocolError) for f in faults[: len(bad_frames)]) == len(bad_frames)

            # the listener is up: the old connection still talks, and a new one gets in
            await before.send(b"after")
            after = await good.dial(address)
            await after.send(b"new")
            received = {}
            for connection in by_peer[good.context.identity.node_id]:
                with anyio.fail_after(2):
                    received[await connection.receive()] = connection
            assert sorted(received) == [b"after", b"during", b"new"]
            await received[b"new"].send(b"reply")
            assert await after.receive() == b"reply"

    assert server.rejected_count >= 60
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no crash, no traceback
