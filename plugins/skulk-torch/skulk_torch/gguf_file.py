"""An index of a GGUF file's tensors, read from the header, with the data memory-mapped.

``gguf.GGUFReader`` builds numpy objects for every key and tensor, which takes seconds for a model
with a 50k-token vocabulary (3.4 s for the default model here, most of the load budget). This reads
the key/value section (skipping large arrays, which are decoded only when asked for) and the tensor
infos directly, maps the file, and hands out one tensor at a time: only the pages of the tensors a
stage asks for are ever touched, so a stage holding a third of the layers reads a third of the file.
Dequantization itself is the ``gguf`` package's (:func:`gguf.quants.dequantize`).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
from attrs import frozen

from skulk_core import ModelError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types -> struct format of the scalars
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
KEEP_ARRAYS_UP_TO = 64  # longer arrays (the vocabulary) are read on demand


@frozen
class LazyArray:
    """A metadata array too long to decode up front: where it is and what it holds."""

    element_type: int
    length: int
    offset: int  # of its first element

    def __len__(self) -> int:
        return self.length


@frozen
class TensorInfo:
    name: str
    ggml_type: int
    dims: tuple[int, ...]  # GGUF order: dims[0] varies fastest
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy/torch shape (GGUF dims reversed): a weight matrix is (out_features, in_features)."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)


class GGUFFile:
    """Metadata and tensors of one GGUF file. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot open the GGUF file {self.path}: {exc}") from None
        try:
            self.metadata, self.tensors, self._data_start = _parse(self._data)
        except (ValueError, struct.error, IndexError, UnicodeDecodeError, KeyError) as exc:
            self.close()
            raise ModelError(f"{self.path} is not a readable GGUF file: {exc}") from None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop this reader's mapping (unmapped once no view of it is left); tensors already read
        are copies and stay valid."""
        self._data = None

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value; long arrays come back as :class:`LazyArray` (see :meth:`array`)."""
        return self.metadata.get(key, default)

    def array(self, key: str) -> list[Any]:
        """A metadata array decoded in full (the vocabulary's tokens and merges)."""
        value = self.metadata.get(key)
        if value is None:
            raise KeyError(key)
        if not isinstance(value, LazyArray):
            return list(value)
        with memoryview(self._buffer()) as view:
            items, _ = _array_items(view, value.element_type, value.length, value.offset)
        return items

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (a view of the mapping), shape (rows, bytes per row)."""
        info = self.tensors[name]
        rows = math.prod(info.dims[1:])
        start = self._data_start + info.offset
        return self._buffer()[start : start + info.nbytes].reshape(rows, info.nbytes // max(rows, 1))

    def read(self, name: str) -> np.ndarray:
        """The tensor dequantized to a new float32 array of :attr:`TensorInfo.shape`."""
        return self._dequantize(name, self.raw(name)).reshape(self.tensors[name].shape)

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` of a 2-D tensor (rows of its (out, in) shape) dequantized to a new
        float32 array of shape (len(rows), in): only those rows' blocks are read."""
        info = self.tensors[name]
        if len(info.dims) != 2:
            raise ModelError(f"{self.path.name}: tensor {name} has {len(info.dims)} dimensions, not the 2 of a matrix")
        picked = self.raw(name)[rows]  # a copy of just those rows' bytes
        return self._dequantize(name, picked).reshape(len(rows), info.dims[0])

    def _dequantize(self, name: str, raw: np.ndarray) -> np.ndarray:
        """``raw`` bytes of tensor ``name`` (whole rows) as a new float32 array."""
        import gguf

        kind = gguf.GGMLQuantizationType(self.tensors[name].ggml_type)
        if kind == gguf.GGMLQuantizationType.F32:
            return np.array(raw.view(np.float32))  # a copy, so the mapping can be closed
        try:
            values = gguf.quants.dequantize(raw, kind)
        except NotImplementedError:
            raise ModelError(
                f"{self.path.name}: tensor {name} is {kind.name}, which the gguf package cannot dequantize; "
                "use a GGUF with another quantization"
            ) from None
        return np.asarray(values, dtype=np.float32)

    def _buffer(self) -> np.ndarray:
        if self._data is None:
            raise ModelError(f"the GGUF file {self.path} was closed")
        return self._data


def _parse(buf: np.ndarray) -> tuple[dict[str, Any], dict[str, TensorInfo], int]:
    if bytes(buf[:4]) != MAGIC:
        raise ValueError("bad magic (not a GGUF file)")
    head = bytes(buf[:24])
    version = struct.unpack_from("<I", head, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)
    with memoryview(buf) as view:  # struct reads straight from the mapping
        return _parse_view(view, n_tensors, n_kv, len(buf))


def _parse_view(view: memoryview, n_tensors: int, n_kv: int, size: int) -> tuple[dict[str, Any], dict[str, TensorInfo], int]:
    import gguf

    offset = 24
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key, offset = _string(view, offset)
        (kind,) = struct.unpack_from("<I", view, offset)
        metadata[key], offset = _value(view, kind, offset + 4)
    tensors: dict[str, TensorInfo] = {}
    for _ in range(n_tensors):
        name, offset = _string(view, offset)
        (n_dims,) = struct.unpack_from("<I", view, offset)
        dims = struct.unpack_from(f"<{n_dims}Q", view, offset + 4)
        ggml_type, tensor_offset = struct.unpack_from("<IQ", view, offset + 4 + 8 * n_dims)
        offset += 4 + 8 * n_dims + 12
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        if dims[0] % block:
            raise ValueError(f"tensor {name}: a row of {dims[0]} values is not a whole number of {block}-value blocks")
        nbytes = math.prod(dims[1:]) * dims[0] // block * type_size
        tensors[name] = TensorInfo(name, ggml_type, tuple(int(d) for d in dims), int(tensor_offset), int(nbytes))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-offset // alignment) * alignment
    for info in tensors.values():
        if data_start + info.offset + info.nbytes > size:
            raise ValueError(f"tensor {info.name} runs past the end of the file (is the file truncated?)")
    return metadata, tensors, data_start


def _string(view: memoryview, at: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", view, at)
    at += 8
    if length > len(view) - at:
        raise ValueError("a string runs past the end of the file")
    return bytes(view[at : at + length]).decode("utf-8"), at + length


def _value(view: memoryview, kind: int, at: int) -> tuple[Any, int]:
    if kind in _SCALARS:
        fmt = "<" + _SCALARS[kind]
        return struct.unpack_from(fmt, view, at)[0], at + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(view, at)
    if kind == _ARRAY:
        element, length = struct.unpack_from("<IQ", view, at)
        at += 12
        if length <= KEEP_ARRAYS_UP_TO:
            return _array_items(view, element, length, at)
        lazy = LazyArray(element, length, at)
        if element in _SCALARS:
            return lazy, at + length * struct.calcsize("<" + _SCALARS[element])
        for _ in range(length):  # strings or nested arrays: walk past them
            _, at = _value(view, element, at)
        return lazy, at
    raise ValueError(f"unknown GGUF value type {kind}")


def _array_items(view: memoryview, element: int, length: int, at: int) -> tuple[list[Any], int]:
    if element in _SCALARS:
        fmt = _SCALARS[element]
        size = struct.calcsize("<" + fmt)
        return list(struct.unpack_from(f"<{length}{fmt}", view, at)), at + length * size
    items = []
    for _ in range(length):
        item, at = _value(view, element, at)
        items.append(item)
    return items, at
