"""Messages on the wire: attrs classes encoded as msgpack envelopes, never pickled.

An envelope is a msgpack map ``{"v": PROTOCOL_VERSION, "t": type name, "b": body}``; the body is
the message unstructured by cattrs (bytes stay bytes, so tensors travel raw). Decoding checks the
version first and refuses a peer that speaks another one, then structures the body into the
registered class, so a malformed message is a :class:`ProtocolError`, never an exception from
deep inside a handler.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from cattrs.preconf.msgpack import make_converter

from skulk_core.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

T = TypeVar("T")

_types: dict[str, type] = {}
_names: dict[type, str] = {}
# cattrs' msgpack preset: sets and tuples travel as arrays, bytes as msgpack bin.
_converter = make_converter()


def message(name: str) -> Any:
    """Class decorator: register an attrs class as the wire message ``name``."""

    def register(cls: type[T]) -> type[T]:
        if name in _types and _types[name] is not cls:
            raise ValueError(f"wire message name {name!r} is taken by {_types[name].__qualname__}")
        _types[name] = cls
        _names[cls] = name
        return cls

    return register


def encode(msg: object) -> bytes:
    try:
        name = _names[type(msg)]
    except KeyError:
        raise TypeError(f"{type(msg).__qualname__} is not a registered wire message") from None
    return msgpack.packb({"v": PROTOCOL_VERSION, "t": name, "b": _converter.unstructure(msg)}, use_bin_type=True)


def decode(data: bytes) -> object:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes is over the {MAX_MESSAGE_BYTES} byte limit")
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(f"not a msgpack envelope: {exc}") from None
    if not isinstance(envelope, dict) or "v" not in envelope or "t" not in envelope:
        raise ProtocolError("not a Skulk envelope")
    if envelope["v"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks protocol version {envelope['v']!r}, this node speaks {PROTOCOL_VERSION}; "
            "run the same Skulk version on every node"
        )
    cls = _types.get(envelope["t"]) if isinstance(envelope["t"], str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {envelope['t']!r}")
    try:
        return _converter.structure(envelope.get("b"), cls)
    except Exception as exc:
        raise ProtocolError(f"malformed {envelope['t']} message: {exc}") from None


def tagged_union(union: Any) -> Any:
    """Encode members of ``union`` with a ``"type"`` tag (their class name), so the receiver knows
    which one it got without guessing from the fields."""
    from cattrs.strategies import configure_tagged_union

    configure_tagged_union(union, _converter, tag_generator=lambda cls: cls.__name__, tag_name="type")
    return union
