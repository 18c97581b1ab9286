"""Fixtures for skulk-tcp's tests: real transports on loopback, each stopped when its test ends."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from skulk_core import NodeIdentity, TransportContext
from skulk_tcp import TcpConnection, TcpSettings, TcpTransport

SECRET = b"the-cluster-secret-of-these-tests"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the node runs on asyncio; trio is not installed here


class Served:
    """A transport while it serves; inbound connections queue up for :meth:`accept`."""

    def __init__(self, transport: TcpTransport, addresses: list[str], inbound: MemoryObjectReceiveStream[TcpConnection]) -> None:
        self.transport = transport
        self.addresses = addresses
        self.address = addresses[0]
        self._inbound = inbound

    async def accept(self, timeout: float = 5.0) -> TcpConnection:
        with anyio.fail_after(timeout):
            return await self._inbound.receive()


@asynccontextmanager
async def _running(transport: TcpTransport, handler: Callable[[TcpConnection], Any] | None = None) -> AsyncIterator[Served]:
    send, receive = anyio.create_memory_object_stream[TcpConnection](1000)

    async def queue_it(connection: TcpConnection) -> None:
        send.send_nowait(connection)

    async with anyio.create_task_group() as tg:
        addresses = await tg.start(transport.serve, handler or queue_it)
        try:
            yield Served(transport, addresses, receive)
        finally:
            tg.cancel_scope.cancel()
    send.close()
    receive.close()


@pytest.fixture
def running() -> Callable[..., Any]:
    """``async with running(transport) as served:`` serves until the block ends."""
    return _running


@pytest.fixture
def make_transport(tmp_path: Path) -> Callable[..., TcpTransport]:
    """``make_transport(secret=..., discovery_port=..., **settings)``: a transport on 127.0.0.1, port 0."""
    count = 0

    def make(secret: bytes = SECRET, discovery_port: int | None = None, identity: NodeIdentity | None = None, **settings: Any) -> TcpTransport:
        nonlocal count
        count += 1
        identity = identity or NodeIdentity.load_or_create(tmp_path / f"node{count}")
        context = TransportContext(
            identity=identity,
            cluster_secret=secret,
            host="127.0.0.1",
            port=0,
            discovery_port=discovery_port,
            settings=TcpSettings(**settings),
        )
        return TcpTransport(context)

    return make


@pytest.fixture
def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_key_and_cert(directory: Path, name: str, issuer: tuple[Any, Any] | None = None) -> tuple[Path, Path, Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None and name.endswith("CA"), path_length=None), critical=True)
    )
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path, cert, key


@pytest.fixture
def make_certificate(tmp_path: Path) -> Callable[..., tuple[Path, Path, Any, Any]]:
    """``make_certificate(name, issuer=(ca_cert, ca_key))``: PEM files of a fresh EC key and its
    certificate, self-signed when no issuer is given (a name ending in ``CA`` makes a CA)."""
    return lambda name, issuer=None: _write_key_and_cert(tmp_path, name, issuer)
