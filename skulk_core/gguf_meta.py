"""A fast reader for a GGUF file's key/value metadata (the header only).

``gguf.GGUFReader`` maps every field and tensor into numpy objects, which costs seconds for a
tokenizer with 50k tokens. Cards need a dozen scalars and the chat template, so this reads the
key/value section directly and reports large arrays by their length only.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from skulk_core.errors import ModelError

MAGIC = b"GGUF"
# GGUF value types -> struct format (scalars)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class ArrayInfo:
    """An array too long to keep: its element type and length."""

    def __init__(self, element_type: int, length: int) -> None:
        self.element_type = element_type
        self.length = length

    def __len__(self) -> int:
        return self.length


def read_gguf_metadata(path: str | Path, *, keep_arrays_up_to: int = 64) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, keep_arrays_up_to)
    except (ValueError, OSError, struct.error, IndexError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not a readable GGUF file: {exc}") from None


def _parse(buf: mmap.mmap, keep: int) -> dict[str, Any]:
    if buf[:4] != MAGIC:
        raise ValueError("bad magic (not a GGUF file)")
    version = struct.unpack_from("<I", buf, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    _tensors, kv_count = struct.unpack_from("<QQ", buf, 8)
    offset = 24
    out: dict[str, Any] = {}

    def string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", buf, at)
        at += 8
        if length > len(buf) - at:
            raise ValueError("string runs past the end of the file")
        return buf[at : at + length].decode("utf-8"), at + length

    def value(kind: int, at: int) -> tuple[Any, int]:
        if kind in _SCALARS:
            fmt = "<" + _SCALARS[kind]
            return struct.unpack_from(fmt, buf, at)[0], at + struct.calcsize(fmt)
        if kind == _STRING:
            return string(at)
        if kind == _ARRAY:
            element, length = struct.unpack_from("<IQ", buf, at)
            at += 12
            if length <= keep:
                items = []
                for _ in range(length):
                    item, at = value(element, at)
                    items.append(item)
                return items, at
            if element in _SCALARS:
                return ArrayInfo(element, length), at + length * struct.calcsize("<" + _SCALARS[element])
            for _ in range(length):  # strings or nested arrays: walk past them
                _, at = value(element, at)
            return ArrayInfo(element, length), at
        raise ValueError(f"unknown GGUF value type {kind}")

    for _ in range(kv_count):
        key, offset = string(offset)
        (kind,) = struct.unpack_from("<I", buf, offset)
        out[key], offset = value(kind, offset + 4)
    return out
