"""Categorical values: a source whose values are the one-hot encoding of an integer label array.

With ``--values-are-labels`` the memory is fitted to one-hot rows ``e_y`` (``classes`` columns),
so ``predict`` returns, for each query, a weighted average of the prototypes' class vectors: an
estimate of the class probabilities (ridge-solved ``V`` is not constrained to the simplex, so
an entry can fall slightly outside [0, 1]; :func:`classification_metrics` clips and
renormalises before the log-loss).
"""

from __future__ import annotations

import os

import numpy as np

from ._errors import ConfigError, DataError
from ._sources import open_source, parse_view, store_format

__all__ = ["LabelSource", "open_array", "one_hot", "PROB_FLOOR"]

PROB_FLOOR = 1e-7  # log-loss: probabilities are clipped to [PROB_FLOOR, 1] and renormalised


class _Array:
    """One array of a store, opened directly (h5py or zarr), with its closer."""

    def __init__(self, store, name: str):
        fmt = store_format(store)
        self.where = f"{store}: array {name!r}"
        self._file = None
        if fmt == "hdf5":
            import h5py

            self._file = h5py.File(store, "r")
            obj = self._file.get(name)
            ok = isinstance(obj, h5py.Dataset)
        else:
            import zarr

            try:
                obj = zarr.open_group(store=str(store), mode="r")[name]
            except KeyError:
                obj = None
            ok = isinstance(obj, zarr.Array)
        if not ok:
            self.close()
            raise DataError(f"{self.where} does not exist (or is a group); name the integer "
                            "label array with --values, e.g. --values labels")
        self.array = obj
        self.shape = tuple(obj.shape)
        self.dtype = np.dtype(obj.dtype)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def open_array(store, name: str) -> _Array:
    return _Array(store, name)


def one_hot(labels: np.ndarray, classes: int, dtype=np.float32) -> np.ndarray:
    out = np.zeros((labels.shape[0], classes), dtype)
    out[np.arange(labels.shape[0]), labels] = 1
    return out


class LabelSource:
    """Keys: a view of ``store`` (``keys``; ``None`` for the store's default). Values: the
    one-hot encoding of the integer array named by ``labels`` (a 1-D array, or one column of a
    2-D array: ``labels`` or ``labels[0]``) with ``classes`` columns (default: the largest
    label of the whole array + 1). ``rows`` selects rows as in
    :func:`scalemem._sources.open_source`. Implements :class:`scalemem._source.Source`."""

    def __init__(self, store: str | os.PathLike, keys: str | None, labels: str, rows=None,
                 classes: int | None = None):
        if not labels:
            raise ConfigError("values", labels, "--values-are-labels needs --values NAME, the "
                              "integer label array (e.g. labels)")
        view = parse_view(labels, "values")
        if view.scale is not None:
            raise ConfigError("values", labels, "a label array takes no scale")
        col = None
        if view.columns is not None:
            if len(view.columns) != 1 or not isinstance(view.columns[0], int):
                raise ConfigError("values", labels, "a label view selects at most one column, "
                                  "e.g. labels[0]")
            col = view.columns[0]
        if keys is None:  # the store's default keys view, read alone
            with open_source(store, None, None, rows) as probe:
                keys = probe.key_view
        self._keys = open_source(store, keys=keys, values=keys, rows=rows)
        try:
            self._labels = open_array(store, view.array)
        except BaseException:
            self._keys.close()
            raise
        try:
            shape, where = self._labels.shape, self._labels.where
            if not (len(shape) == 1 or (len(shape) == 2 and col is not None and col < shape[1])
                    or (len(shape) == 2 and col is None and shape[1] == 1)):
                raise DataError(f"{where} has shape {shape}; labels must be a 1-D integer array "
                                "(or name one column: labels[0])")
            if self._labels.dtype.kind not in "iu":
                raise DataError(f"{where} has dtype {self._labels.dtype}; --values-are-labels "
                                "needs integer class labels 0 … C-1")
            self._col = 0 if len(shape) == 2 and col is None else col
            with open_source(store, keys, keys, None) as whole:
                total = whole.rows
            if shape[0] != total:
                raise DataError(f"{where} has {shape[0]} rows but the keys array has {total}; "
                                "each key row needs one label")
            lo, hi = self._scan_range()
            if lo < 0:
                raise DataError(f"{where} holds the negative label {lo}; labels must be "
                                "0 … C-1")
            if classes is None:
                classes = hi + 1
            elif int(classes) <= hi:
                raise ConfigError("classes", classes, f"{where} holds the label {hi}; need at "
                                  f"least {hi + 1} classes")
            if int(classes) < 2:
                raise ConfigError("classes", classes, "need at least 2 classes")
        except BaseException:
            self.close()
            raise
        k = self._keys
        self.classes = int(classes)
        self.name = k.name
        self.rows, self.row_offset, self.split = k.rows, k.row_offset, k.split
        self.key_dim, self.value_dim = k.key_dim, self.classes
        self.key_dtype, self.value_dtype = k.key_dtype, np.dtype(np.float32)
        self.key_scale, self.value_scale = k.key_scale, None
        self.key_view, self.key_array = k.key_view, k.key_array
        self.value_view = f"onehot({labels}, {self.classes})"
        self.value_array = view.array
        self.label_view = labels

    def _raw(self, a: int, b: int) -> np.ndarray:
        y = np.asarray(self._labels.array[a:b])
        return y if y.ndim == 1 else y[:, self._col]

    def _scan_range(self, block: int = 1 << 20) -> tuple[int, int]:
        lo, hi = None, None
        for s in range(0, self._labels.shape[0], block):
            y = self._raw(s, s + block)
            lo = int(y.min()) if lo is None else min(lo, int(y.min()))
            hi = int(y.max()) if hi is None else max(hi, int(y.max()))
        return lo, hi

    def labels(self, start: int, stop: int) -> np.ndarray:
        """The integer labels of rows ``start … stop-1`` of this source."""
        return self._raw(start + self.row_offset, stop + self.row_offset).astype(np.int64)

    def keys(self, start: int, stop: int) -> np.ndarray:
        """The keys of rows ``start … stop-1`` (as stored; ``key_scale`` applies)."""
        return self._keys.read(start, stop)[0]

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        Q, _ = self._keys.read(start, stop)
        return Q, one_hot(self.labels(start, stop), self.classes)

    def close(self) -> None:
        self._labels.close()
        self._keys.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"LabelSource({self.name!r}, keys={self.key_view!r}, labels={self.label_view!r},"
                f" classes={self.classes}, rows={self.split!r}: {self.rows} rows)")
