"""The data-source interface, which every backend implements and passes one conformance suite
(``tests/test_source_conformance.py``) with; adapters to a row range and with a bias column; the
first NaN/Inf of a source, for an error message."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .._errors import DataError, NonFiniteDataError
from .._validate import check_dtype, check_int, check_scale

__all__ = ["Source", "Closable", "check_source", "RowRange", "WithBiasColumn", "locate_nonfinite",
           "OVERFLOW_HINT"]


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


class Closable:
    """A source that holds a store open: ``with source:`` closes it at the end."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_source(source) -> Source:
    """``source`` when it implements :class:`Source` with sane attributes, else a
    :class:`~scalemem.DataError` (or :class:`~scalemem.ConfigError`) naming the attribute."""
    if not isinstance(source, Source):
        raise DataError(f"expected a scalemem Source (see scalemem.open_source), got "
                        f"{type(source).__name__}")
    for field in ("rows", "key_dim", "value_dim"):
        check_int(f"source.{field}", getattr(source, field), 1)
    where = f"{getattr(source, 'name', 'source')}: "
    check_dtype("source.key_dtype", source.key_dtype, where)
    check_dtype("source.value_dtype", source.value_dtype, where)
    check_scale("source.key_scale", source.key_scale)
    check_scale("source.value_scale", source.value_scale)
    return source


class RowRange:
    """Rows ``start … stop-1`` of ``source`` as a source of its own (one device's rows)."""

    def __init__(self, source: Source, start: int, stop: int):
        self._source, self.start = source, int(start)
        self.rows = int(stop) - int(start)
        self.row_offset = int(getattr(source, "row_offset", 0) or 0) + self.start  # in the store
        for f in ("name", "key_dim", "value_dim", "key_dtype", "value_dtype", "key_scale",
                  "value_scale"):
            setattr(self, f, getattr(source, f))

    def read(self, start: int, stop: int):
        return self._source.read(self.start + start, self.start + stop)


class WithBiasColumn:
    """``source`` with its keys scaled (in ``dtype``) and a constant-1 column appended: the
    key row of a prototype then ends with its logit bias (``softmax(Q Kᵀ + b)``)."""

    def __init__(self, source: Source, dtype):
        self._source, self._dtype = source, np.dtype(dtype)
        for f in ("name", "rows", "value_dim", "value_dtype", "value_scale"):
            setattr(self, f, getattr(source, f))
        self.key_dim, self.key_dtype, self.key_scale = source.key_dim + 1, self._dtype, None

    def read(self, start: int, stop: int):
        Q, X = self._source.read(start, stop)
        out = np.ones((Q.shape[0], self.key_dim), self._dtype)
        out[:, :-1] = Q
        if self._source.key_scale is not None:
            out[:, :-1] *= self._dtype.type(self._source.key_scale)
        return out, X

    def __getattr__(self, name):  # the wrapped source's views, row offset, ...
        return getattr(self._source, name)


OVERFLOW_HINT = ("{source}: the statistics or the gradient became non-finite although the data is "
                 "finite: the logits or the products overflow in the compute dtype; scale the "
                 "keys (or values) down, or compute in float64 (dtype='float64')")


def locate_nonfinite(source: Source, read_rows: int = 16384, chunk_rows: int | None = None,
                     ranges=None) -> NonFiniteDataError:
    """The first non-finite entry of ``source`` (of its row ``ranges``, by default all rows;
    chunks count from the start of each range) as a :class:`NonFiniteDataError` (returned, not
    raised); when the data is finite, an error explaining that the logits overflowed."""
    chunk_rows = chunk_rows or read_rows
    offset = int(getattr(source, "row_offset", 0) or 0)
    spans = [(r0, s, min(s + read_rows, r1))
             for r0, r1 in (ranges or [(0, int(source.rows))]) for s in range(r0, r1, read_rows)]
    for r0, s, e in spans:
        Q, X = source.read(s, e)
        for which, a in (("keys", Q), ("values", X)):
            a = np.asarray(a)
            if a.dtype.kind != "f":
                continue
            bad = ~np.isfinite(a).all(axis=1)
            if bad.any():
                row = s + int(np.argmax(bad))
                col = int(np.argmax(~np.isfinite(a[row - s])))
                array = getattr(source, f"{'key' if which == 'keys' else 'value'}_array", which)
                where = (f" (row {row + offset} of array {array!r} in the store)"
                         if offset or array != which else "")
                chunk = (row - r0) // chunk_rows
                return NonFiniteDataError(
                    f"{source.name}: {which} row {row}{where}, column {col} of the view, in "
                    f"chunk {chunk} holds {a[row - s, col]}; fix or drop the row",
                    source=source.name, array=array, row=row, chunk=chunk)
    return NonFiniteDataError(OVERFLOW_HINT.format(source=source.name), source=source.name)
