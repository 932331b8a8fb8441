"""Sources: a keys view and a values view of one store, restricted to a row range."""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._errors import ConfigError, DataError
from .._validate import data_error
from .source import Closable, Source
from .stores import DictStore, HDF5Store, Store, ZarrStore, check_missing_chunks, store_format
from .views import View, columns_from_end, parse_view, row_range

__all__ = ["ArraySource", "HDF5Source", "ZarrSource", "open_source", "aligned_empty", "ALIGN",
           "is_aligned"]


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A view checked against its store."""

    array: str
    cols: slice | np.ndarray | None  # None: every column
    width: int  # selected columns
    rows: int  # rows of the underlying array
    dtype: np.dtype
    scale: float | None


def resolve(store: Store, view: View, field: str) -> Resolved:
    arr = store.get(view.array)
    shape, where = tuple(arr.shape), f"{store.name}: array {view.array!r}"
    if len(shape) != 2:
        raise data_error(field, shape, f"{field}: {where} has shape {shape}; a view needs a 2-D "
                         "array (rows × columns)")
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "fiu" or dtype.fields is not None:
        raise data_error(field, dtype, f"{field}: {where} has dtype {dtype}; use an integer or "
                         "floating-point array")
    if shape[0] < 1 or shape[1] < 1:
        raise data_error(field, shape, f"{field}: {where} is empty (shape {shape})")
    n = shape[1]
    cols = None if view.columns is None else _columns(store, view, n, field, where)
    width = n if cols is None else np.arange(n)[cols].size
    return Resolved(view.array, cols, width, shape[0], dtype, view.scale)


def _columns(store: Store, view: View, n: int, field: str, where: str) -> slice | np.ndarray:
    """The columns ``view`` selects of its array's ``n``: a slice when it is one slice."""
    parts: list[np.ndarray] = []
    for item in columns_from_end(view, n, field, where):  # -1: the last column
        if isinstance(item, str):
            parts.append(_index_array(store, item, n, field, view))
        elif isinstance(item, slice):
            a, b = item.start or 0, n if item.stop is None else item.stop
            if b > n or a >= b:
                raise ConfigError(field, view.text, f"column slice {a}:{b} is empty or outside "
                                  f"the {n} columns of {where}")
            if len(view.columns) == 1:
                return slice(a, b, item.step or 1)
            parts.append(np.arange(a, b, item.step or 1))
        else:
            if item >= n:
                raise ConfigError(field, view.text,
                                  f"column {item} is outside the {n} columns of {where}")
            parts.append(np.array([item]))
    return np.concatenate(parts).astype(np.intp)


def _index_array(store: Store, name: str, n: int, field: str, view: View) -> np.ndarray:
    where = f"{store.name}: index array {name!r}"
    arr = store.get(name)  # read_rows: a missing chunk is refused, not read as fill values
    idx = store.read_rows(name, 0, arr.shape[0]) if arr.shape else np.asarray(arr[()])
    if idx.ndim == 2 and 1 in idx.shape:
        idx = idx.reshape(-1)
    if idx.ndim != 1 or idx.size == 0:
        raise DataError(f"{where} has shape {idx.shape}; column indices must be a non-empty "
                        "1-D array")
    if idx.dtype.kind not in "iu":
        raise DataError(f"{where} has dtype {idx.dtype}; column indices must be integers")
    bad = (idx < 0) | (idx >= n)
    if bad.any():
        raise ConfigError(field, view.text, f"{where} holds column {int(idx[np.argmax(bad)])}, "
                          f"outside the {n} columns of array {view.array!r}")
    return idx.astype(np.intp)


ALIGN = 64  # bytes; see aligned_empty


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary.
    ``jax.device_put`` to a CPU device aliases such an array instead of copying it (measured:
    0.5 ms instead of 21 ms for a 13 MB block); NumPy's own allocations are only 16-byte
    aligned."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + ALIGN, np.uint8)
    off = (-buf.ctypes.data) % ALIGN
    return buf[off:off + nbytes].view(dtype).reshape(shape)


def is_aligned(a: np.ndarray) -> bool:
    """Whether ``a`` is C-contiguous and starts on a 64-byte boundary (see
    :func:`aligned_empty`)."""
    return a.flags.c_contiguous and a.ctypes.data % ALIGN == 0


def _take(block: np.ndarray, cols) -> np.ndarray:
    return block if cols is None else np.ascontiguousarray(block[:, cols])


class ViewSource(Closable):
    """A :class:`~scalemem._data.Source` made of a keys view and a values view of one store,
    restricted to a row range. Backends differ only in the store they open."""

    def __init__(self, store: Store, keys=None, values=None, rows=None):
        self._store = store
        views = store.meta.get("views") or {}
        specs = {}
        for field, spec in (("keys", keys), ("values", values)):
            spec = views.get(field) if spec is None else spec
            if spec is None:
                raise DataError(f"{store.name}: no default {field} view recorded in the store; "
                                f"pass {field}=SPEC (e.g. 'pixels[0:78]')")
            specs[field] = parse_view(spec, field)
        self._kview = resolve(store, specs["keys"], "keys")
        self._vview = resolve(store, specs["values"], "values")
        if self._kview.rows != self._vview.rows:
            raise data_error("values", self._vview.rows,
                             f"{store.name}: keys array {self._kview.array!r} has "
                             f"{self._kview.rows} rows but values array {self._vview.array!r} "
                             f"has {self._vview.rows}; each key row needs one value row")
        splits = store.meta.get("splits") or {}
        if not isinstance(splits, Mapping):
            raise DataError(f"{store.name}: 'splits' attribute must be a mapping")
        self.row_offset, stop, self.split = row_range(rows, self._kview.rows, splits, store.name)
        self.name = store.name
        self.rows = stop - self.row_offset
        self.key_dim, self.value_dim = self._kview.width, self._vview.width
        # in native byte order: a big-endian array (from other tools) is read as native
        self.key_dtype, self.value_dtype = (np.dtype(v.dtype).newbyteorder("=")
                                            for v in (self._kview, self._vview))
        self.key_scale, self.value_scale = self._kview.scale, self._vview.scale
        self.key_view, self.value_view = str(specs["keys"]), str(specs["values"])
        self.key_array, self.value_array = self._kview.array, self._vview.array
        self.store_meta = store.meta  # the store's own record (what identifies its data)
        # Zarr decodes whole chunks and keeps none: rows per chunk of each array read through
        # the carry-over of :meth:`_read_span` (HDF5 has a chunk cache of its own)
        self._carry_rows: dict[str, int] = {}
        self._tail: dict[str, tuple[int, np.ndarray]] = {}
        if isinstance(store, ZarrStore):
            for r in (self._kview, self._vview):
                chunks = getattr(store.get(r.array), "chunks", None)
                if chunks and int(chunks[0]) > 1:
                    self._carry_rows[r.array] = int(chunks[0])

    def key_columns(self) -> np.ndarray | None:
        """The columns of the value array that the keys are, when keys and values view the
        same array and the values take all its columns (image pixels); else ``None``."""
        k, v = self._kview, self._vview
        if k.array != v.array or v.cols is not None:
            return None
        return np.arange(v.width)[slice(None) if k.cols is None else k.cols]

    def read_array(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows ``a … b-1`` (counted from the source's first row) of another array of the store,
        with the store's checks; its shape and dtype as stored."""
        return self._store.read_rows(name, self.row_offset + a, self.row_offset + b)

    def array_shape(self, name: str) -> tuple[tuple, np.dtype]:
        """``(shape, dtype)`` of an array of the store."""
        arr = self._store.get(name)
        return tuple(arr.shape), np.dtype(arr.dtype)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``start … stop-1`` of the source as ``(Q, X)`` NumPy arrays of the stored
        dtypes. When keys and values view the same array, its rows are read once. Sequential
        reads decode every stored chunk once, whether or not the row ranges line up with the
        chunks (see :meth:`_read_span`)."""
        if not (isinstance(start, numbers.Integral) and isinstance(stop, numbers.Integral)
                and 0 <= start <= stop <= self.rows):
            raise ConfigError("read", (start, stop),
                              f"row range outside the {self.rows} rows of {self.name}")
        a, b = int(start) + self.row_offset, int(stop) + self.row_offset
        k, v = self._kview, self._vview
        kraw = self._read_span(k.array, a, b)
        vraw = kraw if v.array == k.array else self._read_span(v.array, a, b)
        return _take(kraw, k.cols), _take(vraw, v.cols)

    def _read_span(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows ``a … b-1`` of array ``name``, with a one-chunk carry-over on Zarr stores: a
        read ending inside a chunk keeps that chunk's remaining rows for the next read, so
        blocks not aligned with the stored chunks decode each chunk once (docs/design.md).
        Returned arrays never share memory with the kept rows."""
        rpc = self._carry_rows.get(name)
        if not rpc or b <= a:
            return self._store.read_rows(name, a, b)
        parts: list[np.ndarray] = []
        pos = a
        tail = self._tail.get(name)
        if tail is not None and tail[0] <= a < tail[0] + tail[1].shape[0]:
            t0, kept = tail
            parts.append(kept[a - t0:min(b, t0 + kept.shape[0]) - t0])
            pos += parts[0].shape[0]
        total = self._kview.rows
        last = (b // rpc) * rpc  # first row of the chunk holding row b (if b is inside one)
        cut = b if b % rpc == 0 or b >= total else min(b, max(pos, last))
        if pos < cut:
            parts.append(self._store.read_rows(name, pos, cut))
        if cut < b:
            chunk = self._store.read_rows(name, cut, min(total, last + rpc))
            parts.append(chunk[:b - cut])
            self._tail[name] = (b, chunk[b - cut:])
        if pos == a and cut == b:
            return parts[0]  # read here alone: shares no memory with the kept rows
        first = parts[0]
        return np.concatenate(parts, out=aligned_empty((b - a,) + first.shape[1:], first.dtype))

    def close(self) -> None:
        """Release the store (closes an HDF5 file; a no-op for the other backends)."""
        self._store.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, keys={self.key_view!r}, "
                f"values={self.value_view!r}, rows={self.split!r}: {self.rows} rows)")


class ArraySource(ViewSource):
    """Keys and values held in memory as NumPy arrays.

    ``ArraySource(Q, X, key_scale=..., value_scale=...)`` wraps two arrays directly;
    :meth:`from_arrays` builds a source from named arrays with the same view specs, splits and
    defaults as the on-disk stores (the conformance suite uses it that way).
    """

    def __init__(self, keys, values, *, key_scale: float | None = None,
                 value_scale: float | None = None, name: str = "memory"):
        store = DictStore({"keys": keys, "values": values}, None, name)
        super().__init__(store, View("keys", None, key_scale, "keys"),
                         View("values", None, value_scale, "values"))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], *, keys: str | View | None = None,
                    values: str | View | None = None, rows=None, attrs: Mapping | None = None,
                    name: str = "memory") -> "ArraySource":
        """A source over named in-memory ``arrays``; ``attrs`` is the store attribute (``splits``
        and default ``views``, as written by :mod:`scalemem._data.writer`)."""
        self = cls.__new__(cls)
        ViewSource.__init__(self, DictStore(arrays, attrs, name), keys, values, rows)
        return self


class HDF5Source(ViewSource):
    """Views of an HDF5 file (read with h5py). The file stays open until :meth:`close`.
    ``cache_bytes`` sizes h5py's chunk cache per array (default 64 MiB: a few row chunks)."""

    def __init__(self, path: str | os.PathLike, keys: str | View | None = None,
                 values: str | View | None = None, rows=None, *, cache_bytes: int = 64 << 20,
                 missing_chunks: str = "error"):
        store = HDF5Store(path, cache_bytes, missing_chunks)
        try:
            super().__init__(store, keys, values, rows)
        except BaseException:
            store.close()
            raise


class ZarrSource(ViewSource):
    """Views of a Zarr group (a directory in Zarr format 3, as :mod:`scalemem._data.writer` writes;
    zarr-python also reads format 2)."""

    def __init__(self, path: str | os.PathLike, keys: str | View | None = None,
                 values: str | View | None = None, rows=None, *, missing_chunks: str = "error"):
        super().__init__(ZarrStore(path, missing_chunks), keys, values, rows)


def open_source(store: str | os.PathLike, keys: str | View | None = None,
                values: str | View | None = None, rows=None, *,
                missing_chunks: str = "error") -> Source:
    """Open an HDF5 file or a Zarr directory (detected from the path) as a
    :class:`~scalemem._data.Source`.

    ``keys``/``values`` are view specs (module docstring); ``None`` uses the store's default
    views. ``rows`` is ``None`` (all rows), a split name recorded in the store (``"fit10k"``) or
    ``"START:STOP"``. ``missing_chunks="error"`` (default) makes a read of rows whose chunk is
    not stored raise :class:`~scalemem.DataError` instead of returning fill values; ``"fill"``
    accepts them (for sparse stores written that way on purpose).
    """
    check_missing_chunks(missing_chunks)
    cls = ZarrSource if store_format(store) == "zarr" else HDF5Source
    return cls(store, keys, values, rows, missing_chunks=missing_chunks)
