"""TLS for the link, with certificates made by the test; the secret handshake still runs inside it
and is bound to the listener's certificate."""

from __future__ import annotations

import hashlib
import os

import anyio
import pytest
from anyio.streams.tls import TLSStream

from skulk_core import AuthenticationError, ConfigError, TransportError
from skulk_tcp import TcpSettings
from skulk_tcp.transport import _tls_contexts

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def talk(dialler, served) -> None:  # type: ignore[no-untyped-def]
    with anyio.fail_after(10):
        connection = await dialler.dial(served.address)
        inbound = await served.accept()
        assert connection.tls and inbound.tls
        await connection.send(b"over tls")
        assert await inbound.receive() == b"over tls"
        data = os.urandom(3 * 1024 * 1024)
        stream = await connection.open_stream()
        async with anyio.create_task_group() as tg:

            async def push() -> None:
                await stream.send(data)
                await stream.aclose()

            tg.start_soon(push)
            incoming = await inbound.accept_stream()
            digest = hashlib.sha256()
            while chunk := await incoming.receive():
                digest.update(chunk)
        assert digest.digest() == hashlib.sha256(data).digest()
        await connection.aclose()


async def test_self_signed_tls_carries_messages_and_streams(make_transport, running, make_certificate) -> None:
    cert_a, key_a, *_ = make_certificate("node-a")
    cert_b, key_b, *_ = make_certificate("node-b")
    a = make_transport(tls_cert=str(cert_a), tls_key=str(key_a))
    b = make_transport(tls_cert=str(cert_b), tls_key=str(key_b))
    async with running(a) as served_a, running(b):
        await talk(b, served_a)


async def test_tls_with_a_cluster_ca_verifies_both_ends(make_transport, running, make_certificate) -> None:
    ca_cert_path, _, ca_cert, ca_key = make_certificate("Skulk test CA")
    cert_a, key_a, *_ = make_certificate("node-a", issuer=(ca_cert, ca_key))
    cert_b, key_b, *_ = make_certificate("node-b", issuer=(ca_cert, ca_key))
    rogue_cert, rogue_key, *_ = make_certificate("rogue")  # self-signed: not from the CA
    a = make_transport(tls_cert=str(cert_a), tls_key=str(key_a), tls_ca=str(ca_cert_path))
    b = make_transport(tls_cert=str(cert_b), tls_key=str(key_b), tls_ca=str(ca_cert_path))
    rogue = make_transport(tls_cert=str(rogue_cert), tls_key=str(rogue_key), tls_ca=str(ca_cert_path))
    async with running(a) as served_a, running(b), running(rogue):
        await talk(b, served_a)
        with anyio.fail_after(10), pytest.raises(TransportError):
            await rogue.dial(served_a.address)  # it holds the secret, but its certificate is not the CA's
        await talk(b, served_a)


async def test_tls_on_one_side_only_fails_cleanly(make_transport, running, make_certificate) -> None:
    cert, key, *_ = make_certificate("node-a")
    with_tls = make_transport(tls_cert=str(cert), tls_key=str(key))
    plain = make_transport()
    async with running(with_tls) as served_tls, running(plain) as served_plain:
        with anyio.fail_after(10):
            with pytest.raises(TransportError):
                await plain.dial(served_tls.address)
            with pytest.raises(TransportError):
                await with_tls.dial(served_plain.address)
        await anyio.sleep(0.1)
    assert with_tls.rejected_count == 1 and plain.rejected_count == 1


async def test_a_tls_terminating_relay_cannot_pass_the_handshake_on(make_transport, running, make_certificate) -> None:
    """A man in the middle with its own certificate relays every byte between an honest dialler
    and an honest listener. Both hold the secret, but the dialler's proof names the relay's
    certificate, so the listener refuses it."""
    cert_a, key_a, *_ = make_certificate("node-a")
    cert_b, key_b, *_ = make_certificate("node-b")
    relay_cert, relay_key, *_ = make_certificate("relay")
    a = make_transport(tls_cert=str(cert_a), tls_key=str(key_a))
    b = make_transport(tls_cert=str(cert_b), tls_key=str(key_b))
    relay_server, relay_client, _ = _tls_contexts(TcpSettings(tls_cert=str(relay_cert), tls_key=str(relay_key)))

    async with running(a) as served_a, running(b), anyio.create_task_group() as tg:
        target_host, target_port = served_a.address.rsplit(":", 1)

        async def pipe(source, sink) -> None:  # type: ignore[no-untyped-def]
            try:
                while True:
                    await sink.send(await source.receive())
            except Exception:
                await sink.aclose()

        async def relay(client) -> None:  # type: ignore[no-untyped-def]
            try:
                inside = await TLSStream.wrap(client, server_side=True, ssl_context=relay_server, standard_compatible=False)
                upstream = await anyio.connect_tcp(target_host, int(target_port))
                outside = await TLSStream.wrap(upstream, server_side=False, ssl_context=relay_client, standard_compatible=False)
            except Exception:
                await client.aclose()
                return
            async with anyio.create_task_group() as pipes:
                pipes.start_soon(pipe, inside, outside)
                pipes.start_soon(pipe, outside, inside)

        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        relay_port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(listener.serve, relay)
        with anyio.fail_after(10), pytest.raises(AuthenticationError):
            await b.dial(f"127.0.0.1:{relay_port}")
        await anyio.sleep(0.1)
        assert a.rejected_count == 1
        tg.cancel_scope.cancel()


def test_tls_settings_are_checked_at_start_up(make_transport, tmp_path, make_certificate) -> None:
    with pytest.raises(ValueError, match="together"):
        TcpSettings(tls_cert="node.pem")
    with pytest.raises(ValueError, match="tls_ca needs"):
        TcpSettings(tls_ca="ca.pem")
    with pytest.raises(ConfigError, match="TLS files"):
        make_transport(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(tmp_path / "missing.key"))
    cert, _, *_ = make_certificate("node-a")
    with pytest.raises(ConfigError, match="TLS files"):
        make_transport(tls_cert=str(cert), tls_key=str(cert))  # a certificate is not a key
