"""LAN discovery: authenticated UDP announcements of a node's transport address.

One datagram (at most a few hundred bytes)::

    magic "SKLD" | version u8 | unix time f64 | len u8 + node id | len u8 + address | HMAC-SHA256 (32)

The HMAC (keyed with the cluster secret) covers everything before it, so only a cluster member can
announce. A datagram with a bad MAC, another version, or a time more than ``discovery_max_age``
seconds from this node's clock is dropped with a debug log line and nothing else: a LAN may carry
other clusters' announcements, and answering them would only make noise.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from attrs import frozen

MAGIC = b"SKLD"
VERSION = 1
_HEAD = struct.Struct("!4sBd")
_CONTEXT = b"skulk-tcp discovery v1\x00"
MAC_BYTES = 32
MAX_DATAGRAM = 1024


@frozen
class Announcement:
    node_id: str
    address: str
    timestamp: float


class BadAnnouncement(ValueError):
    """A datagram that is not a valid announcement of this cluster; the message says why."""


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, _CONTEXT + body, hashlib.sha256).digest()


def encode(secret: bytes, node_id: str, address: str, timestamp: float) -> bytes:
    node = node_id.encode()
    addr = address.encode()
    if len(node) > 255 or len(addr) > 255:
        raise ValueError("node id and address must each be at most 255 bytes")
    body = _HEAD.pack(MAGIC, VERSION, timestamp) + bytes([len(node)]) + node + bytes([len(addr)]) + addr
    return body + _mac(secret, body)


def decode(secret: bytes, datagram: bytes, *, now: float, max_age: float) -> Announcement:
    if len(datagram) > MAX_DATAGRAM or len(datagram) < _HEAD.size + 2 + MAC_BYTES:
        raise BadAnnouncement(f"a datagram of {len(datagram)} bytes")
    magic, version, timestamp = _HEAD.unpack_from(datagram)
    if magic != MAGIC:
        raise BadAnnouncement(f"not a Skulk announcement (opens with {datagram[:4]!r})")
    if version != VERSION:
        raise BadAnnouncement(f"announcement version {version}, this node reads version {VERSION}")
    body, mac = datagram[:-MAC_BYTES], datagram[-MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(secret, body)):
        raise BadAnnouncement("its MAC does not match this cluster's secret")
    offset = _HEAD.size
    try:
        node_len = body[offset]
        node_id = body[offset + 1 : offset + 1 + node_len].decode()
        offset += 1 + node_len
        addr_len = body[offset]
        address = body[offset + 1 : offset + 1 + addr_len].decode()
        offset += 1 + addr_len
    except (IndexError, UnicodeDecodeError) as exc:
        raise BadAnnouncement(f"malformed announcement ({exc})") from None
    if offset != len(body) or not node_id or not address:
        raise BadAnnouncement("malformed announcement (lengths do not add up)")
    if not abs(now - timestamp) <= max_age:  # also rejects NaN
        raise BadAnnouncement(f"its time is {timestamp - now:+.1f} s from this node's clock (limit ±{max_age:g} s)")
    return Announcement(node_id, address, timestamp)


def with_host(address: str, host: str) -> str:
    """A node listening on every interface announces ``0.0.0.0:PORT``; use the host it spoke from."""
    announced_host, _, port = address.rpartition(":")
    if announced_host in ("0.0.0.0", "::", "[::]", ""):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return address
