"""The handshake: only holders of the cluster secret get in, peers prove their node id, versions
must match, and a listener keeps serving good peers whatever the bad ones do."""

from __future__ import annotations

import logging

import anyio
import pytest
from anyio.streams.buffered import BufferedByteStream

from skulk_core import AuthenticationError, ConfigError, NodeIdentity, ProtocolError, TransportContext
from skulk_core.identity import node_id_for
from skulk_tcp import TcpTransport
from skulk_tcp.handshake import REFUSED, handshake

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def exchange(dialler: TcpTransport, served) -> None:  # type: ignore[no-untyped-def]
    """A good peer still gets in and talks."""
    with anyio.fail_after(5):
        connection = await dialler.dial(served.address)
        inbound = await served.accept()
        await connection.send(b"ping")
        assert await inbound.receive() == b"ping"
        await inbound.send(b"pong")
        assert await connection.receive() == b"pong"
        await connection.aclose()


async def test_a_dialler_with_the_wrong_secret_is_refused_and_reported(make_transport, running, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="skulk.tcp")
    a, good, intruder = make_transport(), make_transport(), make_transport(secret=b"another cluster's secret")
    rejected: list[tuple[str, str]] = []
    a.on_rejected = lambda address, reason: rejected.append((address, reason))
    async with running(a) as served, running(good), running(intruder):
        with anyio.fail_after(5), pytest.raises(AuthenticationError, match="same cluster secret"):
            await intruder.dial(served.address)
        await exchange(good, served)
    assert a.rejected_count == 1 and len(rejected) == 1
    address, reason = rejected[0]
    assert address.startswith("127.0.0.1:") and "secret" in reason
    assert any("rejected peer 127.0.0.1:" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert intruder.connections == set() and len(a.connections) == 0


async def test_a_listener_with_the_wrong_secret_is_refused(make_transport, running) -> None:
    good, intruder = make_transport(), make_transport(secret=b"another cluster's secret")
    async with running(intruder) as served, running(good):
        with anyio.fail_after(5), pytest.raises(AuthenticationError):
            await good.dial(served.address)
    assert intruder.rejected_count == 1  # it saw a proof that does not match its secret


@pytest.mark.parametrize("newer", ["listener", "dialler"])
async def test_another_protocol_version_is_refused_naming_both(make_transport, running, caplog, newer) -> None:
    caplog.set_level(logging.WARNING, logger="skulk.tcp")
    a, b = make_transport(), make_transport()
    (a if newer == "listener" else b).protocol_version = 2
    async with running(a) as served, running(b):
        with anyio.fail_after(5), pytest.raises(ProtocolError) as caught:
            await b.dial(served.address)
        theirs, ours = (2, 1) if newer == "listener" else (1, 2)
        assert f"protocol version {theirs}, this node speaks version {ours}" in str(caught.value)
        await anyio.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if "rejected peer" in r.getMessage()]
    assert len(lines) == 1 and "version 1" in lines[0] and "version 2" in lines[0]


async def test_a_peer_must_sign_with_the_key_its_id_comes_from(make_transport, running, tmp_path) -> None:
    a = make_transport()
    victim = NodeIdentity.load_or_create(tmp_path / "victim")
    impostor = NodeIdentity.load_or_create(tmp_path / "impostor")
    # It holds the secret, claims the victim's public key (so its id), but has only its own key.
    forged = NodeIdentity(node_id=victim.node_id, public_key=victim.public_key, private_key=impostor.private_key)
    rejected: list[str] = []
    a.on_rejected = lambda address, reason: rejected.append(reason)
    async with running(a) as served:
        host, port = served.address.rsplit(":", 1)
        with anyio.fail_after(5):
            raw = BufferedByteStream(await anyio.connect_tcp(host, int(port)))
            with pytest.raises(AuthenticationError, match="refused"):
                await handshake(raw, dialer=True, identity=forged, secret=a.context.cluster_secret, peer=served.address)
            await raw.aclose()
            await anyio.sleep(0.1)
    assert len(rejected) == 1 and victim.node_id in rejected[0] and "did not sign" in rejected[0]


async def test_peer_ids_are_the_ids_of_the_proven_keys(make_transport, running) -> None:
    a, b = make_transport(), make_transport()
    async with running(a) as served, running(b):
        with anyio.fail_after(5):
            connection = await b.dial(served.address)
            inbound = await served.accept()
    assert connection.peer_id == node_id_for(connection.peer_public_key) == a.context.identity.node_id
    assert inbound.peer_id == node_id_for(inbound.peer_public_key) == b.context.identity.node_id


async def test_a_silent_peer_is_cut_off_after_the_handshake_timeout(make_transport, running) -> None:
    a = make_transport(handshake_timeout=0.5)
    rejected: list[str] = []
    a.on_rejected = lambda address, reason: rejected.append(reason)
    async with running(a) as served:
        host, port = served.address.rsplit(":", 1)
        raw = await anyio.connect_tcp(host, int(port))
        started = anyio.current_time()
        with anyio.fail_after(5):
            hello = await raw.receive()  # the listener's hello, then nothing until it hangs up
            assert hello.startswith(b"SKLK")
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
                while True:
                    await raw.receive()
        assert 0.4 < anyio.current_time() - started < 2.0
        await raw.aclose()
    assert rejected == ["no complete handshake within 0.5 s"]


async def test_a_port_probe_that_says_nothing_is_not_a_rejection(make_transport, running, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="skulk.tcp")
    a = make_transport()
    async with running(a) as served:
        host, port = served.address.rsplit(":", 1)
        for _ in range(3):
            raw = await anyio.connect_tcp(host, int(port))
            await raw.aclose()
        await anyio.sleep(0.2)
    assert a.rejected_count == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_the_listener_refuses_without_revealing_a_proof(make_transport, running) -> None:
    a = make_transport()
    async with running(a) as served:
        host, port = served.address.rsplit(":", 1)
        with anyio.fail_after(5):
            raw = BufferedByteStream(await anyio.connect_tcp(host, int(port)))
            await raw.send(b"SKLK\x00\x01" + bytes(32) + bytes(128))
            reply = b""
            try:
                while True:
                    reply += await raw.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass
    assert reply[:4] == b"SKLK" and reply[38:] == REFUSED  # its hello, then a refusal and nothing else


def test_an_empty_secret_is_a_configuration_error(tmp_path) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    with pytest.raises(ConfigError, match="secret"):
        TcpTransport(TransportContext(identity=identity, cluster_secret=b"", host="127.0.0.1", port=0))


async def test_a_flood_of_handshakes_is_cut_short_and_reported_once(make_transport, running) -> None:
    a, good = make_transport(handshake_timeout=1.0, max_pending_handshakes=3), make_transport()
    reasons: list[str] = []
    a.on_rejected = lambda address, reason: reasons.append(reason)
    async with running(a) as served, running(good):
        host, port = served.address.rsplit(":", 1)
        with anyio.fail_after(10):
            held = [await anyio.connect_tcp(host, int(port)) for _ in range(3)]
            await anyio.sleep(0.1)
            for _ in range(4):  # beyond the limit: closed at once, not after the timeout
                extra = await anyio.connect_tcp(host, int(port))
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
                    with anyio.fail_after(0.5):
                        while True:
                            await extra.receive()
                await extra.aclose()
            assert a.rejected_count == 4
            assert len(reasons) == 1 and "max_pending_handshakes" in reasons[0]
            await anyio.sleep(1.2)  # the held ones time out, making room
            await exchange(good, served)
            for stream in held:
                await stream.aclose()
    assert a.rejected_count == 7
