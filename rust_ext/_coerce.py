"""Turn user inputs (lists, NumPy of any numeric dtype, pyarrow) into the kernel's dtypes.

The kernel reads bool/uint8 flags and float32 values in place; everything here is the slow
path, taken only when an input is not already such a contiguous 1-D array.
"""

from __future__ import annotations

import numpy as np


def _from_arrow(x, field: str):
    """pyarrow Array/ChunkedArray → NumPy (zero-copy for primitive columns without nulls)."""
    if not type(x).__module__.startswith("pyarrow"):
        return x
    if hasattr(x, "combine_chunks"):
        x = x.combine_chunks()
    if x.null_count:
        raise ValueError(f"{field}: {x.null_count} null value(s); every served item needs a value")
    return x.to_numpy(zero_copy_only=False)


def as_flags(x, field: str) -> np.ndarray:
    """A contiguous 1-D bool array; numeric inputs must hold only 0 and 1."""
    a = np.asarray(_from_arrow(x, field))
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{field}: expected bools (or 0/1 numbers), got dtype {a.dtype}")
    if a.size and not np.isin(a, (0, 1)).all():
        bad = int(np.flatnonzero(~np.isin(a.ravel(), (0, 1)))[0])
        raise ValueError(f"{field}[{bad}] = {a.ravel()[bad]}: flags must be 0 or 1")
    return np.ascontiguousarray(a, dtype=np.bool_)


def as_f32(x, field: str) -> np.ndarray:
    """A contiguous 1-D float32 array (values out of float32 range become ±inf and are rejected)."""
    a = np.asarray(_from_arrow(x, field))
    if a.dtype.kind not in "iufb":
        raise TypeError(f"{field}: expected numbers, got dtype {a.dtype}")
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(a, dtype=np.float32)


def as_offsets(x) -> np.ndarray:
    """CSR offsets as contiguous int64 (validated by the kernel)."""
    a = np.asarray(_from_arrow(x, "offsets"))
    if a.dtype.kind not in "iu":
        raise TypeError(f"offsets: expected integers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)
