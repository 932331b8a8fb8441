"""Checks on settings and arrays, done before any compute. Each failure is a typed error that
names the field and the bad value."""

from __future__ import annotations

import numpy as np

from ._config import check_value
from ._errors import ConfigError, DataError

__all__ = ["check_int", "check_matrix", "check_pair", "check_dtype",
           "check_scale", "check_init", "data_error", "NUMERIC_KINDS"]

# dtype kinds scalemem computes on: bool, signed and unsigned integers, floating point. Complex
# numbers, strings, bytes, objects, datetimes and structured records are refused.
NUMERIC_KINDS = "biuf"
_NUMBER = dict(choices=None, hi=None, nullable=False)


def data_error(field: str | None, value, message: str) -> DataError:
    """A :class:`DataError` whose ``field`` and ``value`` attributes say what was wrong (the
    message names both too)."""
    err = DataError(message)
    err.field, err.value = field, value
    return err


def check_dtype(field: str, dtype, where: str = "", kinds: str = NUMERIC_KINDS) -> np.dtype:
    """``np.dtype(dtype)`` when its kind is one of ``kinds``, else a :class:`DataError`."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise data_error(field, dtype, f"{where}{field}: {dtype!r} is not a NumPy dtype") from e
    if dt.kind not in kinds or dt.fields is not None:
        raise data_error(field, dt, f"{where}{field}: unsupported dtype {dt}; use a real "
                         "integer or floating-point type")
    return dt


def check_int(field: str, value, lo: int | None = None, hi: int | None = None) -> int:
    return check_value(field, value, dict(_NUMBER, type=int, lo=lo, hi=hi))


def check_matrix(field: str, a) -> None:
    """A 2-D array of real numbers (integer or floating point), at least one row."""
    shape, dtype = getattr(a, "shape", None), getattr(a, "dtype", None)
    if shape is None or dtype is None:
        raise data_error(field, type(a).__name__, f"{field}: expected an array with .shape and "
                         f".dtype, got {type(a).__name__}")
    if len(shape) != 2:
        raise data_error(field, tuple(shape), f"{field}: expected a 2-D array (rows × columns), "
                         f"got shape {tuple(shape)}")
    check_dtype(field, dtype)
    if shape[0] < 1 or shape[1] < 1:
        raise data_error(field, tuple(shape), f"{field}: empty array of shape {tuple(shape)}")


def check_pair(Q, X, keys: str = "keys", values: str = "values") -> int:
    check_matrix(keys, Q)
    check_matrix(values, X)
    if Q.shape[0] != X.shape[0]:
        raise data_error(values, int(X.shape[0]), f"{keys} has {Q.shape[0]} rows but {values} "
                         f"has {X.shape[0]}: each key row needs one value row")
    return int(Q.shape[0])


def check_scale(field: str, value) -> float | None:
    """``None`` or a finite, non-zero real number (a scale applied to keys or values)."""
    value = check_value(field, value, dict(_NUMBER, type=float, lo=None, nullable=True))
    if value == 0.0:
        raise ConfigError(field, value, "must be non-zero (it multiplies the data)")
    return value


def check_init(field: str, init, shape: tuple[int, ...]) -> None:
    """Initial keys: the expected shape and finite (a NaN there would poison every step)."""
    try:
        a = np.asarray(init, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(field, type(init).__name__, "expected a real array of initial "
                          "keys") from e
    if a.shape != tuple(shape):
        raise ConfigError(field, a.shape, f"expected shape {tuple(shape)}")
    if not np.isfinite(a).all():
        raise ConfigError(field, "non-finite", "the initial keys hold NaN or Inf")
