"""Categorical values: a source whose values are the one-hot encoding of an integer label array
(``--values-are-labels``; what ``predict`` then returns: docs/design.md, "Labels as values")."""

from __future__ import annotations

import os

import numpy as np

from .._config import MAX_CLASSES
from .._errors import ConfigError, DataError
from .._validate import check_int
from .source import Closable
from .sources import open_source
from .views import parse_view

__all__ = ["LabelSource", "one_hot"]


def one_hot(labels: np.ndarray, classes: int, dtype=np.float32) -> np.ndarray:
    out = np.zeros((labels.shape[0], classes), dtype)
    out[np.arange(labels.shape[0]), labels] = 1
    return out


class LabelSource(Closable):
    """Keys: a view of ``store`` (``keys``; ``None`` for the store's default). Values: the
    one-hot encoding of the integer array named by ``labels`` (a 1-D array, or one column of a
    2-D array: ``labels`` or ``labels[0]``) with ``classes`` columns (default: the largest
    label of the whole array + 1; at most :data:`~scalemem._config.MAX_CLASSES`, a larger label
    is a :class:`DataError` naming its row). ``rows`` selects rows as in :func:`open_source`."""

    def __init__(self, store: str | os.PathLike, keys: str | None, labels: str, rows=None,
                 classes: int | None = None):
        if not labels:
            raise ConfigError("values", labels, "--values-are-labels needs --values NAME, the "
                              "integer label array (e.g. labels)")
        if classes is not None:
            classes = check_int("classes", classes, lo=2, hi=MAX_CLASSES)
        view = parse_view(labels, "values")
        cols = view.columns or ()
        if view.scale is not None or len(cols) > 1 or (cols and not isinstance(cols[0], int)):
            raise ConfigError("values", labels, "a label view is an array name, or one column "
                              "of it (labels[0]), without a scale")
        if keys is None:  # the store's default keys view, read alone
            with open_source(store, None, None, rows) as probe:
                keys = probe.key_view
        self._keys = k = open_source(store, keys=keys, values=keys, rows=rows)
        self._array, self._col = view.array, cols[0] if cols else 0
        try:
            classes = self._check(f"{store}: array {view.array!r}", bool(cols), classes)
        except BaseException:
            self.close()
            raise
        for f in ("name", "rows", "row_offset", "split", "key_dim", "key_dtype", "key_scale",
                  "key_view", "key_array", "store_meta"):
            setattr(self, f, getattr(k, f))
        self.classes = self.value_dim = int(classes)
        self.value_dtype, self.value_scale = np.dtype(np.float32), None
        self.value_view = f"onehot({labels}, {self.classes})"
        self.value_array, self.label_view = view.array, labels

    def _check(self, where: str, given: bool, classes):
        try:
            shape, dtype = self._keys.array_shape(self._array)
        except DataError as e:
            raise DataError(f"{e}; name the integer label array with --values, e.g. --values "
                            "labels") from None
        if len(shape) != 1 and not (len(shape) == 2 and -shape[1] <= self._col < shape[1]
                                    and (given or shape[1] == 1)):
            raise DataError(f"{where} has shape {shape}; labels must be a 1-D integer array "
                            "(or name one column: labels[0])")
        if dtype.kind not in "iu":
            raise DataError(f"{where} has dtype {dtype}; --values-are-labels needs integer class "
                            "labels 0 … C-1")
        if shape[0] < self._keys.row_offset + self._keys.rows:
            raise DataError(f"{where} has {shape[0]} rows but the keys array has more; each key "
                            "row needs one label")
        y = self.labels(-self._keys.row_offset, shape[0] - self._keys.row_offset)
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise DataError(f"{where} holds the negative label {lo} at row {int(y.argmin())}; "
                            "labels must be 0 … C-1")
        if hi >= MAX_CLASSES:
            raise DataError(f"{where} holds the label {hi} at row {int(y.argmax())}; one-hot "
                            f"values allow at most {MAX_CLASSES} classes (labels 0 … "
                            f"{MAX_CLASSES - 1}): name the class-label array with --values")
        if classes is not None and int(classes) <= hi:
            raise ConfigError("classes", classes, f"{where} holds the label {hi} at row "
                              f"{int(y.argmax())}; need at least {hi + 1} classes")
        if classes is None and hi < 1:
            raise ConfigError("classes", hi + 1, "need at least 2 classes")
        return hi + 1 if classes is None else classes

    def labels(self, start: int, stop: int) -> np.ndarray:
        """The integer labels of rows ``start … stop-1`` of this source."""
        y = self._keys.read_array(self._array, start, stop)
        return (y if y.ndim == 1 else y[:, self._col]).astype(np.int64)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        Q, _ = self._keys.read(start, stop)
        return Q, one_hot(self.labels(start, stop), self.classes)

    def close(self) -> None:
        self._keys.close()

    def __repr__(self) -> str:
        return (f"LabelSource({self.name!r}, keys={self.key_view!r}, labels={self.label_view!r},"
                f" classes={self.classes}, rows={self.split!r}: {self.rows} rows)")
