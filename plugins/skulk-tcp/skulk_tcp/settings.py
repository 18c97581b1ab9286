"""The ``tcp`` section of ``skulk.yaml``: TLS files, limits and discovery knobs of the TCP transport.

Every field can also be set as ``SKULK_TCP_<FIELD>`` (``SKULK_TCP_TLS_CERT=/etc/skulk/node.pem``).
Sizes take the core's size syntax (``16MiB``, ``262144``). Use the same values on every node: a
peer whose limits are smaller than a sender's drops the connection when it gets a frame above them.
"""

from __future__ import annotations

from typing import Any

import attrs
from attrs import field, frozen

from skulk_core import parse_size


def _size(minimum: int, maximum: int) -> Any:
    def check(_: object, attribute: attrs.Attribute, value: str) -> None:
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise ValueError(f"{attribute.name}: {exc}") from None
        if not minimum <= size <= maximum:
            raise ValueError(f"{attribute.name} must be between {minimum} and {maximum} bytes, got {value!r} ({size})")

    return check


def _positive(_: object, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be greater than 0, got {value!r}")


def _tls_pair(instance: TcpSettings, attribute: attrs.Attribute, value: str | None) -> None:
    if (instance.tls_cert is None) != (instance.tls_key is None):
        raise ValueError("tls_cert and tls_key must be given together (TLS is on when both are set)")
    if instance.tls_ca is not None and instance.tls_cert is None:
        raise ValueError("tls_ca needs tls_cert and tls_key: a node that verifies its peers must present a certificate too")


_U32 = 2**32 - 1


@frozen
class TcpSettings:
    """Settings of the TCP transport. All are optional; the defaults suit a LAN."""

    tls_cert: str | None = None  # PEM certificate (chain, leaf first); TLS is on when it and tls_key are set
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_ca: str | None = field(default=None, validator=_tls_pair)  # CA bundle: when set, peers' certificates must chain to it
    handshake_timeout: float = field(default=5.0, validator=_positive)  # seconds for connect, TLS and proof
    max_frame_bytes: str = field(default="16MiB", validator=_size(1024, _U32))  # largest message accepted
    stream_chunk_bytes: str = field(default="256KiB", validator=_size(1024, 16 * 1024 * 1024))  # data per stream frame sent
    stream_window_bytes: str = field(default="1MiB", validator=_size(64 * 1024, 2**31 - 1))  # unread bytes a stream may hold
    max_pending_message_bytes: str = field(default="64MiB", validator=_size(1024, 2**40))  # unread messages held per connection
    max_pending_streams: int = field(default=256, validator=_positive)  # opened by the peer, not yet accepted
    max_pending_handshakes: int = field(default=256, validator=_positive)  # inbound connections still proving themselves
    discovery_address: str = "255.255.255.255"  # where announcements are sent (127.255.255.255 keeps them on this host)
    discovery_interval: float = field(default=2.0, validator=_positive)  # seconds between announcements
    discovery_max_age: float = field(default=30.0, validator=_positive)  # clock skew tolerated on announcements

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def max_frame(self) -> int:
        return parse_size(self.max_frame_bytes)

    @property
    def stream_chunk(self) -> int:
        return parse_size(self.stream_chunk_bytes)

    @property
    def stream_window(self) -> int:
        return parse_size(self.stream_window_bytes)

    @property
    def max_pending_messages(self) -> int:
        return parse_size(self.max_pending_message_bytes)
