"""The handshake that opens every connection: both sides prove they hold the cluster secret, and
each proves its node id by signing with the Ed25519 key the id is derived from.

Nothing else is read from a peer before this succeeds, and every handshake message has a fixed
size, so this node parses at most 38 + 128 + 1 bytes from a stranger. The steps (see
docs/transport-tcp.md):

1. both sides send HELLO = magic ``SKLK``, protocol version u16, a fresh 32-byte nonce;
2. the dialer sends its PROOF = public key (32) + HMAC-SHA256 (32) + Ed25519 signature (64);
3. the listener checks it, then answers ``0x00`` + its own PROOF (or ``0x01`` and hangs up);
4. the dialer checks that and answers ``0x00`` (or ``0x01``).

The listener reveals no MAC before the dialer has proved itself, so probing a node's port teaches
a stranger nothing. The role byte in each proof stops a peer reflecting one side's proof back.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import anyio
from anyio.streams.buffered import BufferedByteStream
from attrs import frozen

from skulk_core import AuthenticationError, NodeIdentity, ProtocolError, TransportError

# node_id_for is not re-exported by skulk_core yet; it is the derivation NodeIdentity.node_id uses.
from skulk_core import node_id_for

MAGIC = b"SKLK"
PROTOCOL_VERSION = 1
NONCE_BYTES = 32
HELLO_HEAD = struct.Struct("!4sH")  # magic, version; the nonce follows
HELLO_BYTES = HELLO_HEAD.size + NONCE_BYTES  # 38
PUBLIC_KEY_BYTES = 32
MAC_BYTES = 32
SIGNATURE_BYTES = 64
PROOF_BYTES = PUBLIC_KEY_BYTES + MAC_BYTES + SIGNATURE_BYTES  # 128
DIALER = b"D"
LISTENER = b"L"
ACCEPTED = b"\x00"
REFUSED = b"\x01"
NO_BINDING = bytes(32)  # the channel binding when the link has no TLS
_CONTEXT = b"skulk-tcp handshake v1\x00"


@frozen
class PeerProof:
    """Who the peer proved to be."""

    node_id: str
    public_key: bytes


class VersionMismatch(ProtocolError):
    """The peer speaks another version of the protocol."""

    def __init__(self, peer: str, theirs: int, ours: int) -> None:
        self.theirs = theirs
        self.ours = ours
        super().__init__(
            f"{peer} speaks skulk-tcp protocol version {theirs}, this node speaks version {ours}; "
            f"run the same Skulk release on every node"
        )


def hello(nonce: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    return HELLO_HEAD.pack(MAGIC, version) + nonce


def _signed_part(transcript: bytes, role: bytes, node_id: str, public_key: bytes) -> bytes:
    encoded = node_id.encode()
    return transcript + role + bytes([len(encoded)]) + encoded + public_key


def make_proof(transcript: bytes, role: bytes, identity: NodeIdentity, secret: bytes) -> bytes:
    signed = _signed_part(transcript, role, identity.node_id, identity.public_key)
    mac = hmac.new(secret, signed, hashlib.sha256).digest()
    return identity.public_key + mac + identity.sign(signed)


def check_proof(proof: bytes, transcript: bytes, role: bytes, secret: bytes, peer: str, *, tls: bool = False) -> PeerProof:
    public_key = proof[:PUBLIC_KEY_BYTES]
    mac = proof[PUBLIC_KEY_BYTES : PUBLIC_KEY_BYTES + MAC_BYTES]
    signature = proof[PUBLIC_KEY_BYTES + MAC_BYTES :]
    node_id = node_id_for(public_key)
    signed = _signed_part(transcript, role, node_id, public_key)
    expected = hmac.new(secret, signed, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        relayed = " or a TLS proxy sits between the two nodes" if tls else ""
        raise AuthenticationError(f"{peer} does not hold this cluster's secret{relayed} (its proof does not match)")
    if not NodeIdentity.verify(public_key, signature, signed):
        raise AuthenticationError(f"{peer} claims node id {node_id} but did not sign with that node's key")
    return PeerProof(node_id, public_key)


class PeerHungUp(TransportError):
    """The peer closed the connection before sending a single byte (a port probe, a health check)."""


async def exchange_hellos(stream: BufferedByteStream, nonce: bytes, peer: str, version: int) -> bytes:
    """Send our hello; return the peer's nonce once its magic and version are checked (the magic
    before anything else)."""
    try:
        await stream.send(hello(nonce, version))
        head = await stream.receive_exactly(HELLO_HEAD.size)
    except (anyio.IncompleteRead, anyio.BrokenResourceError, anyio.EndOfStream, OSError):
        if not stream.buffer:  # closed or reset before sending one byte
            raise PeerHungUp(f"{peer} closed the connection before the handshake began") from None
        raise
    magic, theirs = HELLO_HEAD.unpack(head)
    if magic != MAGIC:
        hint = " (it sent a TLS record: is TLS on there and off here?)" if head[:1] == b"\x16" else ""
        raise ProtocolError(f"{peer} is not a Skulk TCP peer: it opened with {head!r}{hint}")
    if theirs != version:
        raise VersionMismatch(peer, theirs, version)
    return await stream.receive_exactly(NONCE_BYTES)


async def handshake(
    stream: BufferedByteStream,
    *,
    dialer: bool,
    identity: NodeIdentity,
    secret: bytes,
    peer: str,
    version: int = PROTOCOL_VERSION,
    binding: bytes = NO_BINDING,
) -> PeerProof:
    """Run one side of the handshake on ``stream``; the caller bounds it with a timeout.

    ``binding`` ties the proofs to the TLS session (the SHA-256 of the listener's certificate as
    each side sees it), so a man in the middle who terminates TLS cannot relay them. Raises
    :class:`AuthenticationError` or :class:`ProtocolError`; anyio's stream errors pass through.
    """
    nonce = os.urandom(NONCE_BYTES)
    theirs = await exchange_hellos(stream, nonce, peer, version)
    dialer_nonce, listener_nonce = (nonce, theirs) if dialer else (theirs, nonce)
    transcript = _CONTEXT + dialer_nonce + listener_nonce + binding
    if dialer:
        await stream.send(make_proof(transcript, DIALER, identity, secret))
        status = await stream.receive_exactly(1)
        if status == REFUSED:
            raise AuthenticationError(
                f"{peer} refused this node's proof: the two nodes do not hold the same cluster secret"
                + (" (or a TLS proxy sits between them)" if binding != NO_BINDING else "")
            )
        if status != ACCEPTED:
            raise ProtocolError(f"{peer} answered the handshake with {status!r}")
        proof = await stream.receive_exactly(PROOF_BYTES)
        try:
            result = check_proof(proof, transcript, LISTENER, secret, peer, tls=binding != NO_BINDING)
        except AuthenticationError:
            await stream.send(REFUSED)
            raise
        await stream.send(ACCEPTED)
        return result
    proof = await stream.receive_exactly(PROOF_BYTES)
    try:
        result = check_proof(proof, transcript, DIALER, secret, peer, tls=binding != NO_BINDING)
    except AuthenticationError:
        await stream.send(REFUSED)
        raise
    await stream.send(ACCEPTED + make_proof(transcript, LISTENER, identity, secret))
    status = await stream.receive_exactly(1)
    if status != ACCEPTED:
        raise AuthenticationError(f"{peer} refused this node's proof: the two nodes do not hold the same cluster secret")
    return result
