"""Tensors as they travel between pipeline stages: raw bytes with dtype and shape beside them.

Nothing here pickles; a tensor on the wire is three fields any language can read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from attrs import field, frozen

if TYPE_CHECKING:
    import numpy as np

# Dtypes a stage may send. bfloat16 travels as its raw 2 bytes; numpy has no bfloat16, so the
# receiving backend converts it (torch reads it directly with torch.frombuffer).
ITEM_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8}


def _check_dtype(instance: Tensor, attribute: object, value: str) -> None:
    if value not in ITEM_SIZES:
        raise ValueError(f"unsupported tensor dtype {value!r}; expected one of {sorted(ITEM_SIZES)}")


@frozen
class Tensor:
    """A dense, C-contiguous tensor: ``dtype`` names the element type, ``data`` holds the bytes."""

    dtype: str = field(validator=_check_dtype)
    shape: tuple[int, ...] = field(converter=lambda s: tuple(int(d) for d in s))
    data: bytes = field(repr=lambda d: f"<{len(d)} bytes>")

    def __attrs_post_init__(self) -> None:
        expected = math.prod(self.shape) * ITEM_SIZES[self.dtype]
        if len(self.data) != expected:
            raise ValueError(
                f"tensor of shape {self.shape} and dtype {self.dtype} needs {expected} bytes, "
                f"got {len(self.data)}"
            )

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Tensor:
        import numpy as np

        array = np.ascontiguousarray(array)
        return cls(dtype=str(array.dtype), shape=array.shape, data=array.tobytes())

    def to_numpy(self) -> np.ndarray:
        import numpy as np

        if self.dtype == "bfloat16":
            # Widen to float32 by placing the 16 bits in the high half of each 32-bit word.
            raw = np.frombuffer(self.data, dtype=np.uint16).astype(np.uint32) << 16
            return raw.view(np.float32).reshape(self.shape)
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)
