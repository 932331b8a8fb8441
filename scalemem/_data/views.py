"""View specs (a 2-D array of a store, optionally columns and a scale) and row selections; the
rules: docs/design.md, "Stores, views and rows"::

    SPEC    := NAME [ "[" COLUMNS "]" ] [ SCALE ]       e.g. pixels[@key_columns]/255
    NAME    := ["/"] SEGMENT ("/" SEGMENT)*     e.g. pixels, group/pixels, /group/pixels
    COLUMNS := ITEM ("," ITEM)*     ITEM := INT | [INT] ":" [INT] [":" INT] | "@" NAME
    SCALE   := "/" NUMBER | "*" NUMBER

A NAME is an array's path in the store (an array inside groups of an HDF5 file or a Zarr store,
as h5py writes it; a leading "/" is the root and is dropped). A negative column counts from the
end, as in NumPy (``x[-1]``, ``x[-3:]``, ``x[:-2]``); a slice's step is positive.
Rows are ``None`` (all), a split recorded in the store, ``"START:STOP"`` or ``(START, STOP)``.
A malformed spec, a column or row outside the array or an unknown split is a
:class:`~scalemem.ConfigError` whose ``field`` is ``keys``, ``values`` or ``rows``."""
from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Mapping

import numpy as np

from .._errors import ConfigError, DataError

__all__ = ["View", "parse_view", "columns_from_end", "row_range", "INT_RE"]

# Possessive quantifiers (*+, ?+, ++) never give back what they matched, and no two of them can
# match the same text, so a match is one left-to-right pass: linear in the length of the spec
# (the old backtracking regex took cubic time on a spec padded with spaces).
_SEGMENT = r"[A-Za-z_][\w.\-]*+"
_NAME = rf"{_SEGMENT}(?:/{_SEGMENT})*+"
_NUMBER = r"[+-]?+(?:\d++(?:\.\d*+)?+|\.\d++)(?:[eE][+-]?+\d++)?+"
_SPEC_RE = re.compile(rf"/?+(?P<name>{_NAME})\s*+(?:\[(?P<cols>[^\]]*+)\])?+\s*+"
                      rf"(?:(?P<op>[*/])\s*+(?P<num>{_NUMBER}))?+")
INT_RE = re.compile(r"^\s*+[+-]?+\d++\s*+$")
_REF_RE = re.compile(rf"\s*+@\s*+/?+(?P<name>{_NAME})\s*+")


@dataclasses.dataclass(frozen=True)
class View:
    """A parsed view spec. ``columns`` holds the unresolved column items (``None`` for all
    columns): ``int``, ``slice`` or ``str`` (the name of an index array)."""

    array: str
    columns: tuple[int | slice | str, ...] | None = None
    scale: float | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.array


def _small_int(text: str) -> int | None:
    """``int(text)`` for an integer of at most 18 digits (beyond any array's rows or columns,
    below ``int``'s limit on the length of a string it converts), else ``None``."""
    return int(text) if INT_RE.match(text) and len(text.strip().lstrip("+-")) <= 18 else None


def _int(text: str, field: str, spec: str) -> int:
    if (value := _small_int(text)) is None:
        raise ConfigError(field, spec, f"column item {text.strip()[:40]!r} is not a column "
                          "index (an integer)")
    return value


def parse_view(spec: str | View, field: str = "view") -> View:
    """Parse a view spec (grammar in the module docstring). ``field`` names the setting in
    errors (``keys``/``values``). A :class:`View` is returned unchanged."""
    if isinstance(spec, View):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(field, spec, "a view spec must be a string such as 'pixels[0:78]/255'")
    m = _SPEC_RE.fullmatch(spec.strip())
    if m is None:
        raise ConfigError(field, spec, "not a view spec; expected NAME, NAME[COLUMNS] and an "
                          "optional scale, e.g. 'pixels', 'pixels[0:78]', 'pixels[3,17,-1]', "
                          "'/group/pixels[-10:]', 'pixels[@key_columns]/255'")
    cols = None
    if m.group("cols") is not None:
        items: list[int | slice | str] = []
        for raw in m.group("cols").split(","):
            if not raw.strip():
                raise ConfigError(field, spec, "empty column item (stray comma or empty brackets)")
            ref = _REF_RE.fullmatch(raw)
            parts = [] if ref else raw.split(":")  # one part: a column, two or three: a slice
            if len(parts) > 3:
                raise ConfigError(field, spec, f"column slice {raw.strip()!r} has too many ':'")
            nums = [_int(p, field, spec) if p.strip() else None for p in parts]
            if len(nums) == 3 and nums[2] is not None and nums[2] <= 0:
                raise ConfigError(field, spec, "a column slice step must be positive")
            items.append(ref.group("name") if ref else nums[0] if len(nums) == 1 else slice(*nums))
        cols = tuple(items)
    scale = None
    if m.group("op"):
        scale = float(m.group("num"))
        if m.group("op") == "/":
            if scale == 0.0:
                raise ConfigError(field, spec, "division by zero in the scale")
            scale = 1.0 / scale
        if not np.isfinite(scale) or scale == 0.0:
            raise ConfigError(field, spec, "the scale must be finite and non-zero")
    return View(m.group("name"), cols, scale, spec.strip())


def columns_from_end(view: View, n: int, field: str, where: str) -> tuple[int | slice | str, ...]:
    """``view.columns`` for an array of ``n`` columns with negative indices counted from the
    end, as in NumPy (``-1``: the last column). An index before the first column is a
    :class:`~scalemem.ConfigError` naming the spec; index arrays (``str``) are left as they are."""

    def absolute(index: int | None, text: str) -> int | None:
        if index is None or index >= 0:
            return index
        if index < -n:
            raise ConfigError(field, view.text, f"{text} is outside the {n} columns of {where} "
                              f"(a negative column counts from the end: -1 to -{n})")
        return index + n

    out: list[int | slice | str] = []
    for item in view.columns or ():
        if isinstance(item, slice):
            text = "column slice " + ":".join("" if e is None else str(e)
                                              for e in (item.start, item.stop))
            item = slice(absolute(item.start, text), absolute(item.stop, text), item.step)
        elif isinstance(item, int):
            item = absolute(item, f"column {item}")
        out.append(item)
    return tuple(out)


def row_range(rows, total: int, splits: Mapping, where: str) -> tuple[int, int, str]:
    """``(start, stop, label)`` of a row selection (see the module docstring)."""
    if rows is None:
        return 0, total, "all rows"
    if isinstance(rows, tuple) and len(rows) == 2:
        a, b = rows
        if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in rows):
            raise ConfigError("rows", rows, "a row range must be two integers (START, STOP)")
        label = f"{a}:{b}"
    elif isinstance(rows, str):
        text = rows.strip()
        if ":" in text:
            parts = text.split(":")
            ends = [_small_int(p) if p.strip() else d for p, d in zip(parts, (0, total))]
            if len(parts) != 2 or None in ends:
                raise ConfigError("rows", rows, "expected a split name or START:STOP, e.g. 0:10000")
            a, b = ends
        else:
            if text not in splits:
                known = ", ".join(sorted(splits)) or "none recorded"
                raise ConfigError("rows", rows, f"unknown split in {where} (splits: {known}); "
                                  "or give a row range START:STOP")
            try:
                a, b = (int(x) for x in splits[text])
            except (TypeError, ValueError) as e:
                raise DataError(f"{where}: split {text!r} is {splits[text]!r}, expected "
                                "[START, STOP]") from e
        label = text
    else:
        raise ConfigError("rows", rows, "expected None, a split name, 'START:STOP' or "
                          "(START, STOP)")
    a, b = int(a), int(b)
    if not 0 <= a < b <= total:
        raise ConfigError("rows", rows, f"row range {a}:{b} is empty or outside the {total} rows "
                          f"of {where}")
    return a, b, label
