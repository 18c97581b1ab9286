"""The frame layout spoken after the handshake: ``[type u8][channel u32][length u32][payload]``.

Channel 0 carries whole messages; every other channel is one byte stream. Stream ids opened by the
dialing side are odd and those opened by the listening side even, so the two never collide.
See docs/transport-tcp.md for the meaning of each type.
"""

from __future__ import annotations

import struct
from enum import IntEnum

HEADER = struct.Struct("!BII")
HEADER_SIZE = HEADER.size  # 9
CREDIT = struct.Struct("!I")
MESSAGE_CHANNEL = 0
# Every new stream starts with this much credit in each direction, granted implicitly, so an opener
# can start sending before the peer accepts; CREDIT frames grant the rest of the receiver's window.
INITIAL_CREDIT = 64 * 1024


class FrameType(IntEnum):
    MESSAGE = 1  # channel 0; payload: one whole message
    OPEN = 2  # a new stream; empty payload
    DATA = 3  # stream bytes; never more than the receiver's outstanding credit
    CREDIT = 4  # payload u32: the receiver may now be sent that many more bytes
    EOF = 5  # the sender sends no more data on this stream (it still reads)
    CLOSE = 6  # the sender is done with the stream: it neither sends nor reads any more


EMPTY_TYPES = frozenset({FrameType.OPEN, FrameType.EOF, FrameType.CLOSE})


def header(kind: FrameType, channel: int, length: int) -> bytes:
    return HEADER.pack(kind, channel, length)


def frame(kind: FrameType, channel: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, channel, len(payload)) + payload


def credit_frame(channel: int, amount: int) -> bytes:
    return frame(FrameType.CREDIT, channel, CREDIT.pack(amount))
