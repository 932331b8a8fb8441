"""Checks on settings and arrays, done before any compute. Each failure is a typed error that
names the field and the bad value."""

from __future__ import annotations

import numbers

import numpy as np

from ._errors import ConfigError, DataError

__all__ = ["check_int", "check_number", "check_matrix", "check_pair"]


def check_int(field: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(field, value, "must be an integer")
    value = int(value)
    if lo is not None and value < lo:
        raise ConfigError(field, value, f"must be at least {lo}")
    if hi is not None and value > hi:
        raise ConfigError(field, value, f"must be at most {hi}")
    return value


def check_number(field: str, value, lo: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(field, value, "must be a real number")
    value = float(value)
    if not np.isfinite(value):
        raise ConfigError(field, value, "must be finite")
    if lo is not None and value < lo:
        raise ConfigError(field, value, f"must be at least {lo}")
    return value


def check_matrix(field: str, a) -> None:
    """A 2-D array of real numbers (integer or floating point), at least one row."""
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    if shape is None or dtype is None:
        raise DataError(f"{field}: expected an array with .shape and .dtype, got {type(a).__name__}")
    if len(shape) != 2:
        raise DataError(f"{field}: expected a 2-D array (rows × columns), got shape {tuple(shape)}")
    kind = np.dtype(dtype).kind
    if kind not in "fiub":
        raise DataError(f"{field}: unsupported dtype {np.dtype(dtype)}; use a real integer or "
                        "floating-point type")
    if shape[0] < 1 or shape[1] < 1:
        raise DataError(f"{field}: empty array of shape {tuple(shape)}")


def check_pair(Q, X, keys: str = "keys", values: str = "values") -> int:
    check_matrix(keys, Q)
    check_matrix(values, X)
    if Q.shape[0] != X.shape[0]:
        raise DataError(f"{keys} has {Q.shape[0]} rows but {values} has {X.shape[0]}: "
                        "each key row needs one value row")
    return int(Q.shape[0])
