"""The data-source interface: rows of keys and values that can be read by row range.

Every backend (in-memory arrays, HDF5, Zarr, ...) implements :class:`Source` and passes the one
conformance suite in ``tests/test_source_conformance.py``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Source"]


@runtime_checkable
class Source(Protocol):
    """Rows ``0 … rows-1`` of keys (``key_dim`` columns) and values (``value_dim`` columns).

    ``read(start, stop)`` returns ``(Q, X)`` as NumPy arrays of the stored dtypes
    (``key_dtype``, ``value_dtype``), rows ``start … stop-1``. ``key_scale``/``value_scale``
    (``None`` or a float) are applied by the engine on the device, so integer data (uint8 pixels)
    travels as integers. ``name`` identifies the source in error messages (a path, usually).
    """

    name: str
    rows: int
    key_dim: int
    value_dim: int
    key_dtype: np.dtype
    value_dtype: np.dtype
    key_scale: float | None
    value_scale: float | None

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]: ...
