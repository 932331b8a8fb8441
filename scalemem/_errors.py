"""Typed errors and warnings: every error scalemem raises on purpose is a
:class:`ScalememError`, so one ``except`` clause catches them all."""

from __future__ import annotations


class ScalememError(Exception):
    """Base class of every error scalemem raises on purpose."""


class ConfigError(ScalememError, ValueError):
    """A setting (number of prototypes, ridge, chunk size, ...) is out of its valid range;
    ``field`` names the setting and ``value`` holds what was given."""

    def __init__(self, field: str, value: object, why: str):
        self.field, self.value = field, value
        super().__init__(f"{field}={value!r}: {why}")


class DataError(ScalememError):
    """Input data is missing, malformed, inconsistent, corrupted or holds NaN/Inf."""


class NonFiniteDataError(DataError):
    """The data holds NaN or Inf; ``source``, ``array`` and ``row`` say where (when known)."""

    def __init__(self, message: str, *, source: str | None = None, array: str | None = None,
                 row: int | None = None, chunk: int | None = None):
        self.source, self.array, self.row, self.chunk = source, array, row, chunk
        super().__init__(message)


class DownloadError(ScalememError):
    """A dataset could not be downloaded or failed its checksum."""


class CheckpointError(ScalememError):
    """A checkpoint or model file is unreadable, unsafe, or belongs to another run."""


class NumericsError(ScalememError, FloatingPointError):
    """The fit produced a non-finite value that no fallback could repair."""


class NumericsWarning(UserWarning):
    """The solve needed extra jitter or a fallback, or its residual is larger than expected."""
