"""Data sources: in-memory arrays, HDF5 files and Zarr v3 stores, all read through *views*.

A *store* is a set of named arrays plus one attribute, ``scalemem``, that records its row splits
and default views (written by :mod:`scalemem._store`)::

    {"rows": 70000,
     "splits": {"fit10k": [0, 10000], "test60k": [10000, 70000], ...},
     "views": {"keys": "pixels[@key_columns]/255", "values": "pixels/255"}}

A *view spec* names a 2-D array of the store, optionally a column selection and a scale::

    SPEC    := NAME [ "[" COLUMNS "]" ] [ SCALE ]
    NAME    := SEGMENT ("/" SEGMENT)*        each SEGMENT starts with a letter or "_"
    COLUMNS := ITEM ("," ITEM)*
    ITEM    := INT                           one column
             | [INT] ":" [INT] [":" INT]     a slice (positive step; bounds may not pass the width)
             | "@" NAME                      the columns listed in a 1-D integer array of the store
    SCALE   := "/" NUMBER | "*" NUMBER       multiply by 1/NUMBER or NUMBER, on the device

Examples: ``pixels``, ``pixels[12,40,301]``, ``pixels[0:78]``, ``pixels[@key_columns]/255``,
``features[0:10,20:30]*0.5``. A view without a scale has scale ``None`` (the numbers are used as
stored). Integer data stays integer in the source; the engine converts and scales it on the
device, so uint8 pixels cross the host-device link at one byte each.

Keys and values may be two views of the *same* array (Fashion-MNIST keys are 78 of the 784 pixel
columns): :meth:`read` then reads each row range of that array once and slices both views out
of it.

Rows: ``rows=None`` is every row of the arrays, ``rows="NAME"`` a split recorded in the store,
``rows="START:STOP"`` (either end may be left out) or ``rows=(START, STOP)`` an explicit
half-open range. Row ``0`` of the source is the first row of that range.

Errors: a malformed spec, a column or row outside the array, or an unknown split raise
:class:`~scalemem.ConfigError` (its ``field`` is ``keys``, ``values`` or ``rows``); a missing
store or array, an array of the wrong shape or type raise :class:`~scalemem.DataError`. Every
message names the store and the array.

Damaged stores: a file that cannot be opened or read (truncated, garbage metadata, a chunk that
fails its checksum: stores written by :mod:`scalemem._store` checksum every chunk and record the
shape and dtype of every array plus a SHA-256 of the ``scalemem`` attribute, checked at open)
raises :class:`~scalemem.DataError` naming the path. A chunk that is not stored at all, which
h5py and zarr would silently read as the fill value, is an error too unless the source is opened
with ``missing_chunks="fill"``. HDF5 files are opened with ``locking="best-effort"``, so many
reader processes can share one file, also on file systems without locks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import ConfigError, DataError, ScalememError
from ._source import Source
from ._validate import data_error

__all__ = ["View", "parse_view", "ArraySource", "HDF5Source", "ZarrSource", "open_source",
           "store_format", "META_KEY", "MISSING_CHUNKS", "meta_digest"]

META_KEY = "scalemem"  # the root attribute holding splits and default views
# What a read does when a chunk that covers its rows is not stored (deleted, lost in a copy, or
# never written): "error" raises DataError; "fill" reads the array's fill value, as h5py and
# zarr do by default. A store scalemem writes stores every chunk, so "error" never fires on it.
MISSING_CHUNKS = ("error", "fill")

_SEGMENT = r"[A-Za-z_][\w.\-]*"
_NAME = rf"{_SEGMENT}(?:/{_SEGMENT})*"
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_SPEC_RE = re.compile(rf"^\s*(?P<name>{_NAME})\s*(?:\[(?P<cols>[^\]]*)\])?\s*"
                      rf"(?:(?P<op>[*/])\s*(?P<num>{_NUMBER}))?\s*$")
_INT_RE = re.compile(r"^\s*[+-]?\d+\s*$")
_REF_RE = re.compile(rf"^\s*@\s*(?P<name>{_NAME})\s*$")


# ----------------------------------------------------------------------------------------------
# view specs


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


def _int(text: str, field: str, spec: str) -> int:
    if not _INT_RE.match(text):
        raise ConfigError(field, spec, f"column item {text.strip()!r} is not an integer")
    return int(text)


def parse_view(spec: str | View, field: str = "view") -> View:
    """Parse a view spec (grammar in the module docstring). ``field`` names the setting in
    errors (``keys``/``values``). A :class:`View` is returned unchanged."""
    if isinstance(spec, View):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(field, spec, "a view spec must be a string such as 'pixels[0:78]/255'")
    m = _SPEC_RE.match(spec)
    if m is None:
        raise ConfigError(field, spec, "not a view spec; expected NAME, NAME[COLUMNS] and an "
                          "optional scale, e.g. 'pixels', 'pixels[0:78]', 'pixels[3,17,40]', "
                          "'pixels[@key_columns]/255'")
    cols = None
    if m.group("cols") is not None:
        items: list[int | slice | str] = []
        for raw in m.group("cols").split(","):
            if not raw.strip():
                raise ConfigError(field, spec, "empty column item (stray comma or empty brackets)")
            ref = _REF_RE.match(raw)
            if ref:
                items.append(ref.group("name"))
            elif ":" in raw:
                parts = raw.split(":")
                if len(parts) > 3:
                    raise ConfigError(field, spec, f"column slice {raw.strip()!r} has too many ':'")
                a, b, s = (_int(p, field, spec) if p.strip() else None
                           for p in parts + [""] * (3 - len(parts)))
                if (a is not None and a < 0) or (b is not None and b < 0):
                    raise ConfigError(field, spec, "column indices must be non-negative")
                if s is not None and s <= 0:
                    raise ConfigError(field, spec, "a column slice step must be positive")
                items.append(slice(a, b, s))
            else:
                i = _int(raw, field, spec)
                if i < 0:
                    raise ConfigError(field, spec, "column indices must be non-negative")
                items.append(i)
        cols = tuple(items)
    scale = None
    if m.group("op"):
        num = float(m.group("num"))
        if m.group("op") == "/":
            if num == 0.0:
                raise ConfigError(field, spec, "division by zero in the scale")
            num = 1.0 / num
        if not np.isfinite(num) or num == 0.0:
            raise ConfigError(field, spec, "the scale must be finite and non-zero")
        scale = num
    return View(m.group("name"), cols, scale, spec.strip())


# ----------------------------------------------------------------------------------------------
# stores: named arrays (NumPy, h5py or zarr; all slice as a[a:b]) plus the scalemem attribute


class _Store:
    """A set of named arrays. ``get(name)`` returns an object with ``shape``, ``dtype`` and
    NumPy-style row slicing (``np.ndarray``, ``h5py.Dataset`` and ``zarr.Array`` all qualify)."""

    name: str
    meta: dict

    def get(self, name: str):  # pragma: no cover - interface
        raise NotImplementedError

    def read_rows(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows ``a … b-1`` of array ``name`` (backends check first that they are stored)."""
        return np.asarray(self.get(name)[a:b])

    def close(self) -> None:
        pass


def _check_missing_chunks(value) -> str:
    if value not in MISSING_CHUNKS:
        raise ConfigError("missing_chunks", value, f"must be one of {', '.join(MISSING_CHUNKS)}")
    return value


def _chunk_rows_of(a: int, b: int, rows_per_chunk: int) -> range:
    """Indices of the row chunks that rows ``a … b-1`` touch."""
    return range(a // rows_per_chunk, (b - 1) // rows_per_chunk + 1) if b > a else range(0)


def _missing(store_name: str, name: str, what: str, r0: int, r1: int, fill, extra: str = ""):
    fill = np.asarray(fill).tolist() if fill is not None else None
    return DataError(
        f"{store_name}: array {name!r} has no stored {what} for rows {r0}:{r1}; reading it would "
        f"silently give the fill value {fill!r} instead of data. The chunk was deleted or lost, "
        f"or never written{extra}. Restore the store (or re-create it with scalemem); only if "
        "those rows really are fill values, open it with missing_chunks='fill'")


def meta_digest(meta: Mapping) -> str:
    """SHA-256 of the ``scalemem`` attribute as canonical JSON, without ``integrity.digest``
    itself. A store written by scalemem records it, with the shape and dtype of every array,
    under ``integrity``; opening the store checks both, so a damaged attribute or a damaged
    array header (a changed shape, say) is refused instead of silently changing the data."""
    body = dict(meta)
    rec = dict(body.get("integrity") or {})
    rec.pop("digest", None)
    body["integrity"] = rec
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_digest(meta: dict, where: str) -> None:
    rec = meta.get("integrity")
    if rec is None:
        return  # a store not written by scalemem (or by an older version): nothing to check
    if not isinstance(rec, Mapping) or rec.get("digest") != meta_digest(meta):
        raise DataError(f"{where}: the {META_KEY!r} attribute does not match its checksum; the "
                        "store's metadata is corrupted (restore or re-create the store)")


def _check_recorded(store: "_Store", name: str, arr) -> None:
    """Compare an array's shape and dtype with those recorded when the store was written."""
    rec = ((store.meta.get("integrity") or {}).get("arrays") or {}).get(name)
    if not isinstance(rec, Mapping):
        return
    shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
    try:
        want_shape, want_dtype = tuple(int(x) for x in rec["shape"]), np.dtype(rec["dtype"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{store.name}: the integrity record of array {name!r} is malformed "
                        f"({rec!r}); the store's metadata is corrupted") from e
    if shape != want_shape or dtype != want_dtype:
        raise DataError(f"{store.name}: array {name!r} is {dtype}{list(shape)} but was written as "
                        f"{want_dtype}{list(want_shape)}; its metadata is corrupted (restore or "
                        "re-create the store)")


def _meta_from(attrs, where: str) -> dict:
    raw = attrs.get(META_KEY) if attrs is not None else None
    if raw is None:
        return {}
    if isinstance(raw, bytes):
        raw = raw.decode()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise DataError(f"{where}: attribute {META_KEY!r} is not valid JSON ({e})") from e
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: attribute {META_KEY!r} must be a mapping, got "
                        f"{type(raw).__name__}")
    meta = dict(raw)
    _check_digest(meta, where)
    return meta


class _DictStore(_Store):
    def __init__(self, arrays: Mapping[str, Any], meta: Mapping | None, name: str):
        self.name = name
        self.meta = _meta_from({META_KEY: dict(meta)} if meta is not None else None, name)
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}

    def get(self, name):
        if name not in self._arrays:
            raise DataError(f"{self.name}: no array {name!r} (arrays: "
                            f"{', '.join(sorted(self._arrays)) or 'none'})")
        return self._arrays[name]


class _HDF5Store(_Store):
    def __init__(self, path, cache_bytes: int, missing_chunks: str = "error"):
        import h5py

        self.name = str(path)
        self.missing_chunks = _check_missing_chunks(missing_chunks)
        try:
            # a chunk cache larger than one chunk, so a row range inside a chunk does not
            # decompress the chunk again for every read (h5py's default cache is 1 MiB).
            # locking="best-effort": readers take HDF5's shared lock where the file system
            # supports locks and go on without one where it does not (NFS, Lustre), so many
            # reader processes can open one file
            self._file = h5py.File(path, "r", rdcc_nbytes=cache_bytes, rdcc_nslots=10007,
                                   locking="best-effort")
        except (OSError, ValueError, RuntimeError) as e:
            raise DataError(f"{path}: cannot open as an HDF5 file ({e}); the file may be "
                            "truncated or corrupted") from e
        try:
            self.meta = _meta_from(self._file.attrs, self.name)
        except ScalememError:
            self._file.close()
            raise
        except Exception as e:  # noqa: BLE001 - h5py raises many types on a corrupted header
            self._file.close()
            raise DataError(f"{path}: cannot read the root attributes ({type(e).__name__}: {e}); "
                            "the file is corrupted") from e
        self._cache: dict = {}
        self._stored: dict[str, set] = {}  # row chunks known to be stored, per array

    def get(self, name):
        import h5py

        if name in self._cache:
            return self._cache[name]
        try:
            obj = self._file.get(name)
            if isinstance(obj, h5py.Dataset):
                obj.shape, obj.dtype  # noqa: B018 - read the dataspace and type messages now
            names = ", ".join(sorted(self._file.keys())) if obj is None else ""
        except Exception as e:  # noqa: BLE001 - h5py raises many types on corrupted metadata
            raise DataError(f"{self.name}: cannot open array {name!r} ({type(e).__name__}: {e});"
                            " the file is corrupted") from e
        if obj is None:
            raise DataError(f"{self.name}: no array {name!r} (top-level names: "
                            f"{names or 'none'})")
        if not isinstance(obj, h5py.Dataset):
            raise DataError(f"{self.name}: {name!r} is a group, not an array")
        self._cache[name] = obj
        return obj

    def read_rows(self, name, a, b):
        ds = self.get(name)
        if self.missing_chunks == "error":
            self._check_stored(name, ds, a, b)
        return np.asarray(ds[a:b])

    def _check_stored(self, name, ds, a, b) -> None:
        """Raise when a chunk holding rows ``a … b-1`` was never written (HDF5 reads the fill
        value there). Each row chunk is checked once per open file."""
        import h5py

        layout = ds.id.get_create_plist().get_layout()
        fill = ds.fillvalue
        if layout == h5py.h5d.CONTIGUOUS and b > a and not ds.external:
            if ds.id.get_storage_size() == 0:
                raise _missing(self.name, name, "data", 0, ds.shape[0], fill,
                               " (the dataset was created but never written)")
            return
        if layout != h5py.h5d.CHUNKED:
            return  # compact data lives in the header; virtual datasets map other files
        rows, cols = ds.chunks[0], ds.chunks[1] if len(ds.chunks) > 1 else 1
        width = ds.shape[1] if len(ds.shape) > 1 else 1
        seen = self._stored.setdefault(name, set())
        for i in _chunk_rows_of(a, b, rows):
            if i in seen:
                continue
            for j in range(0, width, cols):
                coord = (i * rows, j) if len(ds.shape) > 1 else (i * rows,)
                if ds.id.get_chunk_info_by_coord(coord).byte_offset is None:
                    raise _missing(self.name, name, f"chunk at {coord}", i * rows,
                                   min((i + 1) * rows, ds.shape[0]), fill)
            seen.add(i)

    def close(self):
        self._file.close()


class _ZarrStore(_Store):
    def __init__(self, path, missing_chunks: str = "error"):
        import zarr

        self.name = str(path)
        self.missing_chunks = _check_missing_chunks(missing_chunks)
        try:
            self._group = zarr.open_group(store=str(path), mode="r")
        except Exception as e:  # zarr raises several types (FileNotFoundError, GroupNotFound...)
            raise DataError(f"{path}: cannot open as a Zarr group ({type(e).__name__}: {e})") from e
        self.meta = _meta_from(self._group.attrs.asdict(), self.name)
        self._cache: dict = {}  # opening a zarr array reads its metadata file: do it once
        self._stored: dict[str, set] = {}  # row chunks known to be stored, per array

    def get(self, name):
        import zarr

        if name in self._cache:
            return self._cache[name]
        try:
            obj = self._group[name]
        except KeyError:
            obj = None
        except Exception as e:  # noqa: BLE001 - garbage metadata: JSONDecodeError, ValueError...
            raise DataError(f"{self.name}: cannot open array {name!r} ({type(e).__name__}: {e});"
                            " its metadata (zarr.json) is corrupted") from e
        if obj is None:
            raise DataError(f"{self.name}: no array {name!r} (top-level names: "
                            f"{', '.join(sorted(self._group.keys())) or 'none'})")
        if not isinstance(obj, zarr.Array):
            raise DataError(f"{self.name}: {name!r} is a group, not an array")
        self._cache[name] = obj
        return obj

    def read_rows(self, name, a, b):
        arr = self.get(name)
        if self.missing_chunks == "error":
            self._check_stored(name, arr, a, b)
        return np.asarray(arr[a:b])

    def _check_stored(self, name, arr, a, b) -> None:
        """Raise when a chunk (a shard, for sharded arrays) holding rows ``a … b-1`` is not in
        the store: zarr would return the fill value for it. Each row chunk is checked once."""
        from zarr.core.sync import sync

        grid = tuple(arr.shards or arr.chunks)
        store, base = arr.store_path.store, arr.store_path.path
        ncols = -(-arr.shape[1] // grid[1]) if len(grid) > 1 else 1
        seen = self._stored.setdefault(name, set())
        for i in _chunk_rows_of(a, b, grid[0]):
            if i in seen:
                continue
            for j in range(ncols):
                key = arr.metadata.encode_chunk_key((i, j) if len(grid) > 1 else (i,))
                if not sync(store.exists(f"{base}/{key}" if base else key)):
                    raise _missing(self.name, name, f"chunk {key!r}", i * grid[0],
                                   min((i + 1) * grid[0], arr.shape[0]), arr.fill_value,
                                   " (zarr also omits chunks equal to the fill value unless "
                                   "they are written with write_empty_chunks=True)")
            seen.add(i)


# ----------------------------------------------------------------------------------------------
# resolving views and rows against a store


@dataclasses.dataclass(frozen=True)
class _Resolved:
    array: str
    cols: slice | np.ndarray | None  # None: every column
    width: int  # selected columns
    rows: int  # rows of the underlying array
    dtype: np.dtype
    scale: float | None


def _resolve(store: _Store, view: View, field: str) -> _Resolved:
    arr = store.get(view.array)
    _check_recorded(store, view.array, arr)
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
    if view.columns is None:
        return _Resolved(view.array, None, n, shape[0], dtype, view.scale)
    parts: list[np.ndarray] = []
    for item in view.columns:
        if isinstance(item, str):
            parts.append(_index_array(store, item, n, field, view))
        elif isinstance(item, slice):
            a = 0 if item.start is None else item.start
            b = n if item.stop is None else item.stop
            if b > n or a >= b:
                raise ConfigError(field, view.text, f"column slice {a}:{b} is empty or outside "
                                  f"the {n} columns of {where}")
            parts.append(np.arange(a, b, item.step or 1))
        else:
            if item >= n:
                raise ConfigError(field, view.text,
                                  f"column {item} is outside the {n} columns of {where}")
            parts.append(np.array([item]))
    if len(view.columns) == 1 and isinstance(view.columns[0], slice):
        c = view.columns[0]
        cols: slice | np.ndarray = slice(c.start or 0, n if c.stop is None else c.stop, c.step or 1)
        width = len(range(*cols.indices(n)))
    else:
        cols = np.concatenate(parts).astype(np.intp)
        width = int(cols.size)
    return _Resolved(view.array, cols, width, shape[0], dtype, view.scale)


def _index_array(store: _Store, name: str, n: int, field: str, view: View) -> np.ndarray:
    where = f"{store.name}: index array {name!r}"
    arr = store.get(name)
    _check_recorded(store, name, arr)
    try:
        idx = np.asarray(arr[...])
    except Exception as e:  # noqa: BLE001 - a corrupted chunk: zarr/h5py raise many types
        raise DataError(f"{where} cannot be read ({type(e).__name__}: {e}); the store may be "
                        "corrupted") from e
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


def _row_range(rows, total: int, splits: Mapping, where: str) -> tuple[int, int, str]:
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
            if len(parts) != 2 or not all(_INT_RE.match(p) or not p.strip() for p in parts):
                raise ConfigError("rows", rows, "expected a split name or START:STOP, e.g. 0:10000")
            a = int(parts[0]) if parts[0].strip() else 0
            b = int(parts[1]) if parts[1].strip() else total
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


_ALIGN = 64  # bytes; see aligned_empty


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary.
    ``jax.device_put`` to a CPU device aliases such an array instead of copying it (measured:
    0.5 ms instead of 21 ms for a 13 MB block); NumPy's own allocations are only 16-byte
    aligned."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + _ALIGN, np.uint8)
    off = (-buf.ctypes.data) % _ALIGN
    return buf[off:off + nbytes].view(dtype).reshape(shape)


def is_aligned(a: np.ndarray) -> bool:
    """Whether ``a`` is C-contiguous and starts on a 64-byte boundary (see
    :func:`aligned_empty`)."""
    return a.flags.c_contiguous and a.ctypes.data % _ALIGN == 0


def _take(block: np.ndarray, cols) -> np.ndarray:
    if cols is None:
        return block
    return np.ascontiguousarray(block[:, cols])


class _ViewSource:
    """A :class:`~scalemem._source.Source` made of a keys view and a values view of one store,
    restricted to a row range. Backends differ only in the store they open."""

    def __init__(self, store: _Store, keys=None, values=None, rows=None):
        self._store = store
        views = store.meta.get("views") or {}
        specs = {}
        for field, spec in (("keys", keys), ("values", values)):
            spec = views.get(field) if spec is None else spec
            if spec is None:
                raise DataError(f"{store.name}: no default {field} view recorded in the store; "
                                f"pass {field}=SPEC (e.g. 'pixels[0:78]')")
            specs[field] = parse_view(spec, field)
        self._kview = _resolve(store, specs["keys"], "keys")
        self._vview = _resolve(store, specs["values"], "values")
        if self._kview.rows != self._vview.rows:
            raise data_error("values", self._vview.rows,
                             f"{store.name}: keys array {self._kview.array!r} has "
                             f"{self._kview.rows} rows but values array {self._vview.array!r} "
                             f"has {self._vview.rows}; each key row needs one value row")
        splits = store.meta.get("splits") or {}
        if not isinstance(splits, Mapping):
            raise DataError(f"{store.name}: 'splits' attribute must be a mapping")
        self.row_offset, stop, self.split = _row_range(rows, self._kview.rows, splits, store.name)
        self.name = store.name
        self.rows = stop - self.row_offset
        self.key_dim, self.value_dim = self._kview.width, self._vview.width
        self.key_dtype, self.value_dtype = self._kview.dtype, self._vview.dtype
        self.key_scale, self.value_scale = self._kview.scale, self._vview.scale
        self.key_view, self.value_view = str(specs["keys"]), str(specs["values"])
        self.key_array, self.value_array = self._kview.array, self._vview.array
        # Zarr decodes whole chunks and keeps none: rows per chunk of each array read through
        # the carry-over of :meth:`_read_span` (HDF5 has a chunk cache of its own)
        self._carry_rows: dict[str, int] = {}
        self._tail: dict[str, tuple[int, np.ndarray]] = {}
        if isinstance(store, _ZarrStore):
            for r in (self._kview, self._vview):
                chunks = getattr(store.get(r.array), "chunks", None)
                if chunks and int(chunks[0]) > 1:
                    self._carry_rows[r.array] = int(chunks[0])

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
        """Rows ``a … b-1`` of array ``name``, with a one-chunk carry-over on Zarr stores.

        Zarr decodes a whole chunk to return any of its rows and keeps nothing, so blocks that
        do not line up with the stored chunks (the engine's blocks follow the balanced chunk
        length, e.g. 16352 rows against chunks of 16384) would decode every boundary chunk
        twice: measured on 10⁶ rows, 0.78 M rows/s against 1.43 M for aligned blocks (1.09 M
        with this carry-over). Here a read that ends inside a chunk
        keeps that chunk's remaining rows (one chunk per array, a view of the chunk just
        decoded) and the next read that starts there takes them instead of decoding the chunk
        again. Returned arrays never share memory with the kept rows."""
        rpc = self._carry_rows.get(name)
        if not rpc or b <= a:
            return self._read_rows(name, a, b)
        parts: list[np.ndarray] = []
        pos = a
        tail = self._tail.get(name)
        if tail is not None and tail[0] <= a < tail[0] + tail[1].shape[0]:
            t0, rows = tail
            parts.append(rows[a - t0:min(b, t0 + rows.shape[0]) - t0])
            pos = a + parts[0].shape[0]
        total = self._kview.rows
        fresh = True  # parts holds one array freshly read (not shared with the carry-over)
        if pos < b:
            last = (b // rpc) * rpc  # first row of the chunk holding row b (if b is inside one)
            cut = b if b % rpc == 0 or b >= total else max(pos, last)
            if pos < cut:
                parts.append(self._read_rows(name, pos, cut))
            if cut < b:
                chunk = self._read_rows(name, cut, min(total, last + rpc))
                parts.append(chunk[:b - cut])
                self._tail[name] = (b, chunk[b - cut:])
                fresh = False
        else:
            fresh = False
        if len(parts) == 1 and fresh:
            return parts[0]
        first = parts[0]
        return np.concatenate(parts, out=aligned_empty((b - a,) + first.shape[1:], first.dtype))

    def _read_rows(self, name: str, a: int, b: int) -> np.ndarray:
        try:
            return self._store.read_rows(name, a, b)
        except (ScalememError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - h5py, zarr and the codecs raise many types
            raise DataError(f"{self.name}: cannot read rows {a}:{b} of array {name!r} "
                            f"({type(e).__name__}: {e}); the store may be corrupted") from e

    def close(self) -> None:
        """Release the store (closes an HDF5 file; a no-op for the other backends)."""
        self._store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, keys={self.key_view!r}, "
                f"values={self.value_view!r}, rows={self.split!r}: {self.rows} rows)")


class ArraySource(_ViewSource):
    """Keys and values held in memory as NumPy arrays.

    ``ArraySource(Q, X, key_scale=..., value_scale=...)`` wraps two arrays directly;
    :meth:`from_arrays` builds a source from named arrays with the same view specs, splits and
    defaults as the on-disk stores (the conformance suite uses it that way).
    """

    def __init__(self, keys, values, *, key_scale: float | None = None,
                 value_scale: float | None = None, name: str = "memory"):
        store = _DictStore({"keys": keys, "values": values}, None, name)
        super().__init__(store, View("keys", None, key_scale, "keys"),
                         View("values", None, value_scale, "values"))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], *, keys: str | View | None = None,
                    values: str | View | None = None, rows=None, attrs: Mapping | None = None,
                    name: str = "memory") -> "ArraySource":
        """A source over named in-memory ``arrays``; ``attrs`` is the store attribute (``splits``
        and default ``views``, as written by :mod:`scalemem._store`)."""
        self = cls.__new__(cls)
        _ViewSource.__init__(self, _DictStore(arrays, attrs, name), keys, values, rows)
        return self


class HDF5Source(_ViewSource):
    """Views of an HDF5 file (read with h5py). The file stays open until :meth:`close`.
    ``cache_bytes`` sizes h5py's chunk cache per array (default 64 MiB: a few row chunks)."""

    def __init__(self, path: str | os.PathLike, keys: str | View | None = None,
                 values: str | View | None = None, rows=None, *, cache_bytes: int = 64 << 20,
                 missing_chunks: str = "error"):
        store = _HDF5Store(path, cache_bytes, missing_chunks)
        try:
            super().__init__(store, keys, values, rows)
        except BaseException:
            store.close()
            raise


class ZarrSource(_ViewSource):
    """Views of a Zarr group (a directory in Zarr format 3, as :mod:`scalemem._store` writes;
    zarr-python also reads format 2)."""

    def __init__(self, path: str | os.PathLike, keys: str | View | None = None,
                 values: str | View | None = None, rows=None, *, missing_chunks: str = "error"):
        super().__init__(_ZarrStore(path, missing_chunks), keys, values, rows)


def store_format(path: str | os.PathLike) -> str:
    """``"zarr"`` for a Zarr directory, ``"hdf5"`` for an HDF5 file; else :class:`DataError`."""
    import h5py

    p = Path(path)
    if p.is_dir():
        if (p / "zarr.json").is_file() or (p / ".zgroup").is_file():
            return "zarr"
        raise DataError(f"{p}: a directory but not a Zarr store (no zarr.json)")
    if p.is_file():
        if h5py.is_hdf5(str(p)):
            return "hdf5"
        raise DataError(f"{p}: neither an HDF5 file nor a Zarr directory")
    raise DataError(f"{p}: no such file or directory")


def open_source(store: str | os.PathLike, keys: str | View | None = None,
                values: str | View | None = None, rows=None, *,
                missing_chunks: str = "error") -> Source:
    """Open an HDF5 file or a Zarr directory (detected from the path) as a
    :class:`~scalemem._source.Source`.

    ``keys``/``values`` are view specs (module docstring); ``None`` uses the store's default
    views. ``rows`` is ``None`` (all rows), a split name recorded in the store (``"fit10k"``) or
    ``"START:STOP"``. ``missing_chunks="error"`` (default) makes a read of rows whose chunk is
    not stored raise :class:`~scalemem.DataError` instead of returning fill values; ``"fill"``
    accepts them (for sparse stores written that way on purpose).
    """
    _check_missing_chunks(missing_chunks)
    fmt = store_format(store)
    cls = ZarrSource if fmt == "zarr" else HDF5Source
    return cls(store, keys, values, rows, missing_chunks=missing_chunks)
