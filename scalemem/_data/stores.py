"""Stores: named arrays (NumPy, h5py or zarr; all slice as ``a[a:b]``) plus the ``scalemem``
attribute, with the integrity checks described in docs/design.md ("Stores, views and rows")."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ConfigError, DataError, ScalememError

__all__ = ["META_KEY", "MISSING_CHUNKS", "Store", "DictStore", "HDF5Store", "ZarrStore",
           "meta_digest", "check_missing_chunks", "store_format", "is_store"]

META_KEY = "scalemem"  # the root attribute holding splits and default views
# What a read does when a chunk that covers its rows is not stored (deleted, lost in a copy, or
# never written): "error" raises DataError; "fill" reads the array's fill value, as h5py and
# zarr do by default. A store scalemem writes stores every chunk, so "error" never fires on it.
MISSING_CHUNKS = ("error", "fill")


def check_missing_chunks(value) -> str:
    if value not in MISSING_CHUNKS:
        raise ConfigError("missing_chunks", value, f"must be one of {', '.join(MISSING_CHUNKS)}")
    return value


def meta_digest(meta: Mapping) -> str:
    """SHA-256 of the ``scalemem`` attribute as canonical JSON, without ``integrity.digest``
    itself. A store written by scalemem records it, with the shape and dtype of every array,
    under ``integrity``; opening the store checks both, so a damaged attribute or a damaged
    array header (a changed shape, say) is refused instead of silently changing the data."""
    rec = {k: v for k, v in (meta.get("integrity") or {}).items() if k != "digest"}
    text = json.dumps({**meta, "integrity": rec}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _meta_from(attrs, where: str) -> dict:
    """The ``scalemem`` attribute (a mapping, or JSON text of one), its checksum checked."""
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
    rec = meta.get("integrity")  # None: a store not written by scalemem, nothing to check
    if rec is not None and (not isinstance(rec, Mapping) or rec.get("digest") != meta_digest(meta)):
        raise DataError(f"{where}: the {META_KEY!r} attribute does not match its checksum; the "
                        "store's metadata is corrupted (restore or re-create the store)")
    return meta


class Store:
    """A set of named arrays plus the ``scalemem`` attribute (``meta``). ``get(name)`` returns an
    object with ``shape``, ``dtype`` and NumPy-style row slicing (``np.ndarray``,
    ``h5py.Dataset`` and ``zarr.Array`` all qualify), opened once and checked against the
    shape and dtype recorded when the store was written.

    A backend sets ``_root`` (whose ``keys()`` are the top-level names), overrides
    ``_lookup(name)`` (the object named ``name``, or ``None``; ``_root.get(name)`` here) where
    needed and, when it can check that chunks are stored, implements ``_chunk_rows(name, arr)``
    (rows per chunk, or ``None``) and ``_check_chunk_row(name, arr, i, rows)`` (raise when a
    chunk of row chunk ``i`` is not stored)."""

    name: str
    meta: dict
    _listing = "top-level names"  # what the names listed when an array is missing are
    _corrupted = "the file is corrupted"  # the end of a message when an array cannot be opened
    _array_type: type = np.ndarray  # what a name must be to be an array, not a group

    def __init__(self, name: str, missing_chunks: str = "fill"):
        self.name = name
        self.missing_chunks = check_missing_chunks(missing_chunks)
        self._cache: dict = {}  # opening a zarr array reads its metadata file: do it once
        self._opened = self._identity()
        self._stored: dict[str, set] = {}  # row chunks known to be stored, per array

    def get(self, name: str):
        if name in self._cache:
            return self._cache[name]
        try:
            obj = self._lookup(name)
            names = ", ".join(sorted(self._root.keys())) if obj is None else ""
        except ScalememError:
            raise
        except Exception as e:  # noqa: BLE001 - h5py and zarr raise many types on bad metadata
            raise DataError(f"{self.name}: cannot open array {name!r} ({type(e).__name__}: {e});"
                            f" {self._corrupted}") from e
        if obj is None:
            raise DataError(f"{self.name}: no array {name!r} ({self._listing}: {names or 'none'})")
        if not isinstance(obj, self._array_type):
            raise DataError(f"{self.name}: {name!r} is a group, not an array")
        self._check_recorded(name, obj)
        self._cache[name] = obj
        return obj

    def _lookup(self, name: str):
        return self._root.get(name)

    def _check_recorded(self, name: str, arr) -> None:
        """Compare an array's shape and dtype with those recorded when the store was written."""
        rec = ((self.meta.get("integrity") or {}).get("arrays") or {}).get(name)
        if not isinstance(rec, Mapping):
            return
        shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
        try:
            want_shape, want_dtype = tuple(int(x) for x in rec["shape"]), np.dtype(rec["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{self.name}: the integrity record of array {name!r} is malformed "
                            f"({rec!r}); the store's metadata is corrupted") from e
        if shape != want_shape or dtype != want_dtype:
            raise DataError(f"{self.name}: array {name!r} is {dtype}{list(shape)} but was written "
                            f"as {want_dtype}{list(want_shape)}; its metadata is corrupted "
                            "(restore or re-create the store)")

    def read_rows(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows ``a … b-1`` of array ``name``. With ``missing_chunks="error"`` the chunks holding
        them are first checked to be stored (each row chunk once per open store)."""
        if self._identity() != self._opened:  # a cache may still hold the old bytes: stop
            raise DataError(f"{self.name}: the store was replaced or changed while it was open "
                            f"(reading rows {a}:{b} of array {name!r}); stopped so that two "
                            "versions of the data are never mixed: open it again (a fit: "
                            "resume it, and it checks the data against its fingerprint)")
        try:
            arr = self.get(name)
            if self.missing_chunks == "error" and b > a:
                rows = self._chunk_rows(name, arr)
                seen = self._stored.setdefault(name, set())
                for i in range(a // rows, (b - 1) // rows + 1) if rows else ():
                    if i not in seen:
                        self._check_chunk_row(name, arr, i, rows)
                        seen.add(i)
            out = np.asarray(arr[a:b])  # native byte order (JAX takes no other)
            return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))
        except (ScalememError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - h5py, zarr and the codecs raise many types
            why = ("the store was replaced or changed while it was open; open it again" if
                   self._identity() != self._opened else "the store may be corrupted")
            raise DataError(f"{self.name}: cannot read rows {a}:{b} of array {name!r} "
                            f"({type(e).__name__}: {e}); {why}") from e

    def _identity(self):
        """What changes when the store is replaced or rewritten (``None``: nothing to tell)."""
        return None

    def _missing(self, name: str, arr, what: str, i: int, rows: int, fill, extra: str = ""):
        r0, r1 = i * rows, min((i + 1) * rows, arr.shape[0])
        if self._identity() != self._opened:
            return DataError(f"{self.name}: array {name!r} has no stored {what} for rows "
                             f"{r0}:{r1}: the store was replaced or changed while it was open; "
                             "open it again")
        fill = np.asarray(fill).tolist() if fill is not None else None
        return DataError(
            f"{self.name}: array {name!r} has no stored {what} for rows {r0}:{r1}; reading it "
            f"would silently give the fill value {fill!r} instead of data. The chunk was deleted "
            f"or lost, or never written{extra}. Restore the store (or re-create it with scalemem); "
            "only if those rows really are fill values, open it with missing_chunks='fill'")

    def close(self) -> None:
        pass


class DictStore(Store):
    _listing = "arrays"

    def __init__(self, arrays: Mapping[str, Any], meta: Mapping | None, name: str):
        super().__init__(name)
        self.meta = _meta_from({META_KEY: dict(meta)} if meta is not None else None, name)
        self._root = {k: np.asarray(v) for k, v in arrays.items()}


class HDF5Store(Store):
    def __init__(self, path, cache_bytes: int, missing_chunks: str = "error"):
        import h5py

        super().__init__(str(path), missing_chunks)
        self._array_type = h5py.Dataset
        try:
            # a chunk cache larger than one chunk (h5py's default is 1 MiB), so reads inside a
            # chunk do not decompress it again; locking="best-effort": a shared lock where the
            # file system supports locks, none where it does not (NFS, Lustre)
            self._root = h5py.File(path, "r", rdcc_nbytes=cache_bytes, rdcc_nslots=10007,
                                   locking="best-effort")
        except (OSError, ValueError, RuntimeError) as e:
            raise DataError(f"{path}: cannot open as an HDF5 file ({e}); the file may be "
                            "truncated or corrupted") from e
        try:
            self.meta = _meta_from(self._root.attrs, self.name)
        except ScalememError:
            self._root.close()
            raise
        except Exception as e:  # noqa: BLE001 - h5py raises many types on a corrupted header
            self._root.close()
            raise DataError(f"{path}: cannot read the root attributes ({type(e).__name__}: {e}); "
                            "the file is corrupted") from e

    def _identity(self):
        """The file's inode, size and modification time: h5py's caches would hide an edit."""
        try:
            st = os.stat(self.name)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _lookup(self, name):
        obj = self._root.get(name)
        if isinstance(obj, self._array_type):
            obj.shape, obj.dtype  # noqa: B018 - read the dataspace and type messages now
            if obj.is_virtual:
                self._check_virtual(name, obj)
        return obj

    def _check_virtual(self, name, ds) -> None:
        """Every source of a virtual dataset is there: HDF5 reads the fill value (zeros) for a
        source file or dataset that is missing or smaller than mapped, without an error."""
        import h5py

        here = Path(self.name).resolve().parent
        for vs in ds.virtual_sources():
            where = (f"{self.name}: array {name!r} is a virtual dataset mapping dataset "
                     f"{vs.dset_name!r} of {vs.file_name!r}")
            todo = ("; reading it would give the fill value instead of data. Restore the source "
                    "file (next to the virtual one, or in $HDF5_VDS_PREFIX), or re-create the "
                    "store")
            if vs.file_name == ".":
                f, close = self._root, False
            else:
                cands = [Path(vs.file_name)] if Path(vs.file_name).is_absolute() else [
                    Path(p.replace("${ORIGIN}", str(here))) / vs.file_name
                    for p in os.environ.get("HDF5_VDS_PREFIX", "").split(":") if p] + [
                    here / vs.file_name, Path(vs.file_name)]
                path = next((c for c in cands if c.is_file()), None)
                if path is None:
                    raise DataError(f"{where}, and that file is missing (looked for "
                                    f"{', '.join(map(str, cands))}){todo}")
                try:
                    f, close = h5py.File(path, "r", locking="best-effort"), True
                except (OSError, ValueError, RuntimeError) as e:
                    raise DataError(f"{where}: cannot open {path} ({e}){todo}") from e
            try:
                src = f.get(vs.dset_name)
                shape = tuple(src.shape) if isinstance(src, h5py.Dataset) else None
            finally:
                if close:
                    f.close()
            if shape is None:
                raise DataError(f"{where}, and that file holds no dataset {vs.dset_name!r}{todo}")
            sp, need = vs.src_space, vs.vspace.get_select_npoints()
            if sp.get_select_type() == h5py.h5s.SEL_ALL or not sp.shape:  # all of the source
                short = int(np.prod(shape)) < need
            else:
                hi = sp.get_select_bounds()[1]
                short = len(hi) != len(shape) or any(h >= n for h, n in zip(hi, shape))
            if short:
                raise DataError(f"{where}, which has shape {shape}: too small for the "
                                f"{need} values mapped{todo}")

    def _chunk_rows(self, name, ds):
        """Rows per chunk of a chunked dataset. Contiguous data that was never written is an
        error here (HDF5 reads the fill value there); compact data lives in the header and
        virtual datasets map other files: nothing to check."""
        import h5py

        layout = ds.id.get_create_plist().get_layout()
        if layout == h5py.h5d.CONTIGUOUS and not ds.external and ds.id.get_storage_size() == 0:
            raise self._missing(name, ds, "data", 0, ds.shape[0], ds.fillvalue,
                                " (the dataset was created but never written)")
        return ds.chunks[0] if layout == h5py.h5d.CHUNKED else None

    def _check_chunk_row(self, name, ds, i, rows):
        cols = ds.chunks[1] if len(ds.chunks) > 1 else 1
        width = ds.shape[1] if len(ds.shape) > 1 else 1
        for j in range(0, width, cols):
            coord = (i * rows, j) if len(ds.shape) > 1 else (i * rows,)
            if ds.id.get_chunk_info_by_coord(coord).byte_offset is None:
                raise self._missing(name, ds, f"chunk at {coord}", i, rows, ds.fillvalue)

    def close(self):
        self._root.close()


class ZarrStore(Store):
    _corrupted = "its metadata (zarr.json) is corrupted"

    def __init__(self, path, missing_chunks: str = "error"):
        import zarr

        super().__init__(str(path), missing_chunks)
        self._array_type = zarr.Array
        try:
            self._root = zarr.open_group(store=str(path), mode="r")
        except Exception as e:  # zarr raises several types (FileNotFoundError, GroupNotFound...)
            raise DataError(f"{path}: cannot open as a Zarr group ({type(e).__name__}: {e})") from e
        self.meta = _meta_from(self._root.attrs.asdict(), self.name)

    def _identity(self):
        """The root metadata file's inode and modification time."""
        try:
            st = os.stat(Path(self.name) / "zarr.json")
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _chunk_rows(self, name, arr):
        return (arr.shards or arr.chunks)[0]  # a missing shard is a missing chunk too

    def _check_chunk_row(self, name, arr, i, rows):
        from zarr.core.sync import sync

        grid = tuple(arr.shards or arr.chunks)
        store, base = arr.store_path.store, arr.store_path.path
        for j in range(-(-arr.shape[1] // grid[1]) if len(grid) > 1 else 1):
            key = arr.metadata.encode_chunk_key((i, j) if len(grid) > 1 else (i,))
            if not sync(store.exists(f"{base}/{key}" if base else key)):
                raise self._missing(name, arr, f"chunk {key!r}", i, rows, arr.fill_value,
                                    " (zarr also omits chunks equal to the fill value unless "
                                    "they are written with write_empty_chunks=True)")


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a store scalemem wrote: a Zarr directory or an HDF5 file (not a link)
    whose root carries the ``scalemem`` record."""
    p = Path(path)
    try:
        if p.is_symlink():
            return False
        if p.is_dir():
            attrs = json.loads((p / "zarr.json").read_text()).get("attributes") or {}
            return isinstance(attrs, dict) and META_KEY in attrs
        if p.is_file():
            import h5py

            with h5py.File(p, "r", locking=False) as f:
                return META_KEY in f.attrs
    except (OSError, ValueError, AttributeError):
        return False
    return False


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
