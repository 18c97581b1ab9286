"""Messages and byte streams between two real transports on loopback."""

from __future__ import annotations

import hashlib
import random

import anyio
import pytest

from skulk_core import ByteStream, Connection, TransportError
from skulk_tcp import TcpTransport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

KiB = 1024
MiB = 1024 * KiB


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def test_messages_both_ways_and_the_contract(make_transport, running) -> None:
    a, b = make_transport(), make_transport()
    async with running(a) as served_a, running(b):
        assert served_a.addresses == a.addresses and a.address.startswith("127.0.0.1:")
        assert int(a.address.rpartition(":")[2]) > 0  # port 0 became a real port
        with anyio.fail_after(10):
            dialled = await b.dial(a.address)
            inbound = await served_a.accept()
            assert isinstance(a, TcpTransport) and isinstance(dialled, Connection) and isinstance(inbound, Connection)
            assert dialled.peer_id == a.context.identity.node_id
            assert inbound.peer_id == b.context.identity.node_id
            assert dialled.initiator and not inbound.initiator
            assert inbound.remote_address.startswith("127.0.0.1:")
            for i in range(50):
                await dialled.send(b"to a %d" % i)
                await inbound.send(b"to b %d" % i)
            assert [await inbound.receive() for _ in range(50)] == [b"to a %d" % i for i in range(50)]
            assert [await dialled.receive() for _ in range(50)] == [b"to b %d" % i for i in range(50)]
            big = blob(8 * MiB, 1)  # a large message goes whole
            await dialled.send(big)
            assert await inbound.receive() == big
            await dialled.send(b"")
            assert await inbound.receive() == b""
            await dialled.aclose()
            with pytest.raises(TransportError):
                await inbound.receive()  # the peer's close wakes a waiting receiver


async def test_a_20_mib_stream_with_a_slow_reader_is_intact_and_held_back(make_transport, running) -> None:
    window = 256 * KiB
    a, b = make_transport(stream_window_bytes=str(window)), make_transport(stream_window_bytes=str(window))
    data = blob(20 * MiB, 2)
    progress = {"sent": 0, "read": 0, "max_ahead": 0}

    async def sender(stream: ByteStream) -> None:
        for offset in range(0, len(data), 512 * KiB):
            piece = data[offset : offset + 512 * KiB]
            await stream.send(piece)
            progress["sent"] += len(piece)
            progress["max_ahead"] = max(progress["max_ahead"], progress["sent"] - progress["read"])
        await stream.aclose()

    async with running(a) as served_a, running(b):
        with anyio.fail_after(30):
            dialled = await b.dial(a.address)
            inbound = await served_a.accept()
            async with anyio.create_task_group() as tg:
                outgoing = await dialled.open_stream()
                tg.start_soon(sender, outgoing)
                incoming = await inbound.accept_stream()
                assert isinstance(incoming, ByteStream)
                digest = hashlib.sha256()
                reads = 0
                while chunk := await incoming.receive(64 * KiB):
                    digest.update(chunk)
                    progress["read"] += len(chunk)
                    reads += 1
                    if reads % 4 == 0:
                        await anyio.sleep(0.005)  # the reader is slower than the sender
                assert await incoming.receive() == b""
                await incoming.aclose()
            assert progress["read"] == len(data)
            assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
            # Back-pressure: the sender never got further ahead of the reader than one window,
            # and it did fill the window (so it really waited on the reader).
            assert window // 2 <= progress["max_ahead"] <= window


async def test_many_streams_and_messages_interleave_on_one_connection(make_transport, running) -> None:
    a, b = make_transport(stream_window_bytes="128KiB", stream_chunk_bytes="32KiB"), make_transport(
        stream_window_bytes="128KiB", stream_chunk_bytes="32KiB"
    )
    streams_each_way = 12
    messages_each_way = 300
    results: dict[str, object] = {}

    async def send_streams(connection: Connection, tag: str) -> None:
        async def one(i: int) -> None:
            stream = await connection.open_stream()
            await stream.send(tag.encode() + b"%03d" % i)
            await stream.send(blob(300 * KiB + i * 1000, hash((tag, i)) & 0xFFFF))
            await stream.aclose()

        async with anyio.create_task_group() as tg:
            for i in range(streams_each_way):
                tg.start_soon(one, i)

    async def receive_streams(connection: Connection, tag: str) -> None:
        async def drain(stream: ByteStream) -> None:
            received = bytearray()
            while chunk := await stream.receive(10_000):
                received += chunk
            await stream.aclose()
            name = received[:4].decode()
            i = int(name[1:])
            assert bytes(received[4:]) == blob(300 * KiB + i * 1000, hash((name[0], i)) & 0xFFFF)
            results[f"{tag}-stream-{name}"] = True

        async with anyio.create_task_group() as tg:
            for _ in range(streams_each_way):
                tg.start_soon(drain, await connection.accept_stream())

    async def send_messages(connection: Connection, tag: str) -> None:
        for i in range(messages_each_way):
            await connection.send(f"{tag} {i}".encode())
            if i % 50 == 0:
                await anyio.sleep(0)

    async def receive_messages(connection: Connection, tag: str) -> None:
        got = [await connection.receive() for _ in range(messages_each_way)]
        results[f"{tag}-messages"] = got == [f"{tag} {i}".encode() for i in range(messages_each_way)]

    async with running(a) as served_a, running(b):
        with anyio.fail_after(30):
            dialled = await b.dial(a.address)
            inbound = await served_a.accept()
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_streams, dialled, "d")
                tg.start_soon(send_streams, inbound, "i")
                tg.start_soon(receive_streams, inbound, "at-a")
                tg.start_soon(receive_streams, dialled, "at-b")
                tg.start_soon(send_messages, dialled, "from-b")
                tg.start_soon(send_messages, inbound, "from-a")
                tg.start_soon(receive_messages, inbound, "from-b")
                tg.start_soon(receive_messages, dialled, "from-a")
    assert results.pop("from-a-messages") is True and results.pop("from-b-messages") is True
    assert sorted(results) == sorted(
        [f"at-a-stream-d{i:03d}" for i in range(streams_each_way)] + [f"at-b-stream-i{i:03d}" for i in range(streams_each_way)]
    )


async def test_a_stalled_stream_does_not_hold_back_messages(make_transport, running) -> None:
    a, b = make_transport(stream_window_bytes="64KiB"), make_transport(stream_window_bytes="64KiB")
    data = blob(1 * MiB, 3)
    async with running(a) as served_a, running(b):
        with anyio.fail_after(20):
            dialled = await b.dial(a.address)
            inbound = await served_a.accept()
            async with anyio.create_task_group() as tg:
                stream = await dialled.open_stream()
                sent = anyio.Event()

                async def push() -> None:
                    await stream.send(data)  # blocks: nobody reads until the messages went through
                    await stream.aclose()
                    sent.set()

                tg.start_soon(push)
                incoming = await inbound.accept_stream()
                await anyio.sleep(0.2)
                assert not sent.is_set()
                with anyio.fail_after(3):
                    for i in range(100):
                        await dialled.send(b"m%d" % i)
                        await inbound.send(b"r%d" % i)
                    assert [await inbound.receive() for _ in range(100)] == [b"m%d" % i for i in range(100)]
                    assert [await dialled.receive() for _ in range(100)] == [b"r%d" % i for i in range(100)]
                assert not sent.is_set()
                received = bytearray()
                while chunk := await incoming.receive():
                    received += chunk
                assert bytes(received) == data
            assert sent.is_set()


async def test_a_message_above_the_frame_limit_is_refused_before_it_is_sent(make_transport, running) -> None:
    a, b = make_transport(max_frame_bytes="64KiB"), make_transport(max_frame_bytes="64KiB")
    async with running(a) as served_a, running(b):
        with anyio.fail_after(10):
            dialled = await b.dial(a.address)
            inbound = await served_a.accept()
            with pytest.raises(TransportError, match="byte stream"):
                await dialled.send(bytes(64 * KiB + 1))
            await dialled.send(bytes(64 * KiB))  # the connection is still fine
            assert len(await inbound.receive()) == 64 * KiB


async def test_a_peer_that_vanishes_mid_stream_wakes_the_reader(make_transport, running) -> None:
    a, b = make_transport(), make_transport()
    async with running(a) as served_a:
        with anyio.fail_after(10):
            async with running(b):
                dialled = await b.dial(a.address)
                inbound = await served_a.accept()
                stream = await dialled.open_stream()
                incoming = await inbound.accept_stream()
                await stream.send(b"x" * 1000)
                assert await incoming.receive(100) == b"x" * 100
                # the reverse direction: a stream b is reading from when it goes away
                reverse = await inbound.open_stream()
                await (await dialled.accept_stream()).send(b"hello")
                assert await reverse.receive() == b"hello"
            # b stopped serving: its connections were torn down without an EOF on the stream
            assert await incoming.receive() == b"x" * 900  # bytes that arrived are still read
            with pytest.raises(TransportError):
                await incoming.receive()
            with pytest.raises(TransportError):
                await reverse.receive()
            with pytest.raises(TransportError):
                await reverse.send(b"more")
            with pytest.raises(TransportError):
                await inbound.receive()
            with pytest.raises(TransportError):
                await inbound.open_stream()


async def test_closing_a_connection_wakes_every_waiter(make_transport, running) -> None:
    a, b = make_transport(stream_window_bytes="64KiB"), make_transport(stream_window_bytes="64KiB")
    errors: list[str] = []
    async with running(a) as served_a, running(b):
        with anyio.fail_after(10):
            dialled = await b.dial(a.address)
            inbound = await served_a.accept()
            stream = await dialled.open_stream()
            incoming = await inbound.accept_stream()

            async def expect_error(name: str, call) -> None:  # type: ignore[no-untyped-def]
                try:
                    await call()
                except TransportError:
                    errors.append(name)

            async with anyio.create_task_group() as tg:
                tg.start_soon(expect_error, "receive", dialled.receive)
                tg.start_soon(expect_error, "accept_stream", dialled.accept_stream)
                tg.start_soon(expect_error, "stream.receive", stream.receive)
                tg.start_soon(expect_error, "stream.send", lambda: stream.send(bytes(1 * MiB)))  # runs out of credit
                tg.start_soon(expect_error, "peer receive", inbound.receive)
                tg.start_soon(expect_error, "peer stream.receive", lambda: _drain_slowly(incoming))
                await anyio.sleep(0.3)
                await dialled.aclose()
            assert sorted(errors) == sorted(
                ["receive", "accept_stream", "stream.receive", "stream.send", "peer receive", "peer stream.receive"]
            )
            with pytest.raises(TransportError):
                await dialled.send(b"after close")
            await dialled.aclose()  # closing twice is fine


async def _drain_slowly(stream: ByteStream) -> None:
    await anyio.sleep(0.5)
    while True:
        if not await stream.receive():
            return


async def test_a_reader_that_closes_early_stops_the_sender(make_transport, running) -> None:
    a, b = make_transport(stream_window_bytes="64KiB"), make_transport(stream_window_bytes="64KiB")
    async with running(a) as served_a, running(b):
        with anyio.fail_after(10):
            dialled = await b.dial(a.address)
            inbound = await served_a.accept()
            stream = await dialled.open_stream()
            incoming = await inbound.accept_stream()
            async with anyio.create_task_group() as tg:

                async def close_after_a_bit() -> None:
                    await incoming.receive(1000)
                    await incoming.aclose()

                tg.start_soon(close_after_a_bit)
                with pytest.raises(TransportError, match="closed stream"):
                    await stream.send(bytes(1 * MiB))
            # the connection itself is unharmed
            await dialled.send(b"still here")
            assert await inbound.receive() == b"still here"


async def test_half_close_lets_a_stream_carry_a_request_and_its_reply(make_transport, running) -> None:
    a, b = make_transport(), make_transport()
    async with running(a) as served_a, running(b):
        with anyio.fail_after(10):
            dialled = await b.dial(a.address)
            inbound = await served_a.accept()
            request = await dialled.open_stream()
            await request.send(b"what is 6 x 7?")
            await request.send_eof()
            served = await inbound.accept_stream()
            question = b""
            while chunk := await served.receive():
                question += chunk
            assert question == b"what is 6 x 7?"
            await served.send(b"42")
            await served.aclose()
            assert await request.receive() == b"42"
            assert await request.receive() == b""
            with pytest.raises(TransportError):
                await request.send(b"again")
            await request.aclose()


async def test_dial_errors_are_transport_errors(make_transport, running) -> None:
    a, b = make_transport(), make_transport()
    with pytest.raises(TransportError, match="serve"):
        await b.dial("127.0.0.1:1")
    async with running(a) as served_a, running(b):
        closed_port = served_a.address.rpartition(":")[2]
    async with running(b):
        with anyio.fail_after(10):
            with pytest.raises(TransportError, match="could not connect"):
                await b.dial(f"127.0.0.1:{closed_port}")
            with pytest.raises(TransportError, match="HOST:PORT"):
                await b.dial("no-port-here")


async def test_stopping_serve_closes_its_dialled_connections_too(make_transport, running) -> None:
    a, b = make_transport(), make_transport()
    async with running(a) as served_a:
        async with running(b):
            dialled = await b.dial(a.address)
            inbound = await served_a.accept()
            assert b.connections == {dialled}
        assert b.connections == set()
        with pytest.raises(TransportError):
            await dialled.receive()
        with anyio.fail_after(5), pytest.raises(TransportError):
            await inbound.receive()
