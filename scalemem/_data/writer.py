"""Writing stores chunk by chunk: Zarr v3 directories and HDF5 files, published atomically,
chunked by rows, every chunk checksummed and every array's shape and dtype recorded in the
checksummed ``scalemem`` attribute (docs/design.md, "Writing stores"); two data sets."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ConfigError, DataError, ScalememError
from .._validate import check_int
from ..datasets import fashion_mnist as fm
from .stores import META_KEY, is_store, meta_digest

__all__ = ["FORMATS", "StoreWriter", "ArrayWriter", "StoreWriteError", "default_chunk_rows",
           "write_fashion_mnist", "write_synthetic"]

FORMATS = ("zarr", "hdf5")
_MIN_CHUNK, _MAX_CHUNK, _CHUNK_BYTES = 4096, 16384, 16 << 20
# free bytes a write needs beyond its raw size: headers, the chunk index, the attribute, and
# deflate's worst case on incompressible data (5 bytes a 64 KiB block: the nbytes // 256 term)
_SLACK = 64 << 10


class StoreWriteError(DataError, OSError):
    """A store could not be written (full disk, read-only or failing file system): a
    :class:`~scalemem.DataError` naming the path, and an ``OSError`` carrying the ``errno``."""

    def __init__(self, message: str, err: int | None = None):
        super().__init__(message)
        self.errno = err


def default_chunk_rows(row_bytes: int) -> int:
    """Rows per chunk: the largest power of two in [4096, 16384] whose chunk is at most 16 MiB
    (4096 when even that is larger)."""
    rows = _MAX_CHUNK
    while rows > _MIN_CHUNK and rows * row_bytes > _CHUNK_BYTES:
        rows //= 2
    return rows


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise ConfigError("format", format, f"must be one of {', '.join(FORMATS)}")
    return format


class ArrayWriter:
    """Appends row blocks to one 2-D array of a :class:`StoreWriter`. Rows are buffered up to
    one chunk, so every write to the store covers whole chunks (no read-modify-write)."""

    def __init__(self, target, name: str, shape: tuple[int, int], dtype: np.dtype,
                 chunk_rows: int, where: str, writer: "StoreWriter | None" = None):
        self.name, self.shape, self.dtype, self.chunk_rows = name, shape, dtype, chunk_rows
        self._target, self._where, self._writer = target, where, writer
        self._buf, self._nbuf = np.empty((chunk_rows, shape[1]), dtype), 0
        self.written = 0  # rows flushed to the store

    def append(self, block) -> None:
        """Append rows (a 2-D array with this array's column count and a dtype that casts to
        its dtype within the same kind)."""
        block = np.asarray(block)
        if block.ndim == 1 and self.shape[1] == 1:
            block = block[:, None]
        if block.ndim != 2 or block.shape[1] != self.shape[1]:
            raise DataError(f"{self._where}: array {self.name!r} has {self.shape[1]} columns; "
                            f"got a block of shape {block.shape}")
        if not np.can_cast(block.dtype, self.dtype, "same_kind"):
            raise DataError(f"{self._where}: array {self.name!r} is {self.dtype}; cannot store "
                            f"a {block.dtype} block without changing its kind")
        filled = self.written + self._nbuf  # rows appended so far
        if filled + block.shape[0] > self.shape[0]:
            raise DataError(f"{self._where}: array {self.name!r} has {self.shape[0]} rows; "
                            f"appending {block.shape[0]} to {filled} overflows it")
        while block.shape[0]:
            take = min(self.chunk_rows - self._nbuf, block.shape[0])
            self._buf[self._nbuf:self._nbuf + take] = block[:take]
            self._nbuf += take
            block = block[take:]
            if self._nbuf == self.chunk_rows:
                self._flush()

    def _flush(self) -> None:
        if self._nbuf:
            data = self._buf[:self._nbuf]
            with (self._writer._writing(f"rows {self.written}:{self.written + self._nbuf} of "
                                        f"array {self.name!r}", data.nbytes)
                  if self._writer is not None else contextlib.nullcontext()):
                self._target[self.written:self.written + self._nbuf] = data
            self.written += self._nbuf
            self._nbuf = 0

    def _finish(self) -> None:
        self._flush()
        if self.written != self.shape[0]:
            raise DataError(f"{self._where}: array {self.name!r} got {self.written} of its "
                            f"{self.shape[0]} rows; the store was not published")


class StoreWriter(contextlib.AbstractContextManager):
    """Writes a store (``format`` ``"zarr"``: a Zarr v3 directory, ``"hdf5"``: an HDF5 file).

    Use as a context manager: on a clean exit the store is checked (every array complete) and
    renamed into place; on an exception the partial store is deleted::

        with StoreWriter(out, "zarr") as w:
            px = w.create_array("pixels", (rows, 784), np.uint8)
            for block in blocks:
                px.append(block)
            w.write_array("key_columns", cols)
            w.meta.update(splits={"all": [0, rows]}, views={"keys": ..., "values": ...})

    ``meta`` becomes the store's ``scalemem`` attribute (a JSON object; stored as a JSON string
    in HDF5, whose attributes cannot hold nested mappings).

    Every write is checked first against the free space of the file system (``os.statvfs``):
    a full disk, a read-only location or a failing write raises :class:`StoreWriteError`
    naming the path, the partial store is deleted and a store being replaced stays as it was.
    HDF5 writes go straight to the file (no chunk cache): HDF5 left holding data it cannot
    write crashes the process (SIGSEGV) when it closes the file (docs/reliability.md).
    """

    def __init__(self, path: str | os.PathLike, format: str = "zarr", *, overwrite: bool = False):
        self.format = _check_format(format)
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise DataError(f"{self.path}: already exists (replace it with --overwrite, or "
                            "overwrite=True in Python)")
        if not self.path.parent.is_dir():
            raise DataError(f"{self.path.parent}: no such directory")
        if overwrite and (self.path.exists() or self.path.is_symlink()) and not is_store(
                self.path):
            raise DataError(f"{self.path}: exists and is not a store written by scalemem (no "
                            f"{META_KEY!r} record); overwrite replaces only such a store, never "
                            "other files or folders: choose another path, or remove it yourself")
        self.overwrite = overwrite
        self._replacing = overwrite and self.path.exists()  # for messages
        self._tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self.meta: dict[str, Any] = {}
        self._arrays: list[ArrayWriter] = []
        self._written: dict[str, dict] = {}  # name -> shape and dtype, for the integrity record
        self._open = False
        try:
            with self._writing("the new store", 0):
                _remove(self._tmp)
                if self.format == "zarr":
                    import zarr

                    self._root = zarr.open_group(store=str(self._tmp), mode="w", zarr_format=3)
                else:
                    import h5py

                    # format of HDF5 1.10+: checksummed metadata (superblock v3, object headers
                    # v2, chunk indexes with checksums), so a damaged index is an error, not fill
                    # values; rdcc_nbytes=0: every chunk written when it is given (see above)
                    self._root = h5py.File(self._tmp, "w", libver=("v110", "latest"),
                                           rdcc_nbytes=0)
                self._open = True
        except BaseException:
            self.abort()  # e.g. a full disk while creating the store
            raise

    @contextlib.contextmanager
    def _writing(self, what: str, nbytes: int | None):
        """Check there is room for ``nbytes`` (uncompressed) more (``None``: a rename, which
        needs none), then run the write; an ``OSError`` (h5py: also ``RuntimeError``) becomes a
        :class:`StoreWriteError`."""
        kept = f"; the store at {self.path} was left as it was" if self._replacing else ""
        todo = f"{kept}; free some space or write elsewhere"
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            st = None  # cannot tell: the write itself will say
        if st is not None and st.f_flag & os.ST_RDONLY:
            raise StoreWriteError(f"{self.path}: cannot write {what}: {self.path.parent} is on a "
                                  f"read-only file system{kept}; write elsewhere", errno.EROFS)
        need = 0 if nbytes is None else nbytes + nbytes // 256 + _SLACK
        if st is not None and st.f_bavail * st.f_frsize < need:
            raise StoreWriteError(
                f"{self.path}: not enough free space to write {what}: about {need / 2**20:.2f} "
                f"MiB needed, {st.f_bavail * st.f_frsize / 2**20:.2f} MiB free on "
                f"{self.path.parent}{todo}", errno.ENOSPC)
        try:
            yield
        except ScalememError:
            raise
        except (OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and self.format != "hdf5":
                raise
            err = getattr(e, "errno", None)
            why = os.strerror(err) if err else f"{type(e).__name__}: {e}"
            raise StoreWriteError(f"{self.path}: cannot write {what} ({why}){todo}",
                                  err) from e

    def create_array(self, name: str, shape: tuple[int, int], dtype, *,
                     chunk_rows: int | None = None) -> ArrayWriter:
        """A 2-D array of ``shape`` (rows × columns), filled with :meth:`ArrayWriter.append`.
        ``chunk_rows`` defaults to :func:`default_chunk_rows` (capped at the row count)."""
        rows, cols = check_int("rows", shape[0], 1), check_int("columns", shape[1], 1)
        dtype = np.dtype(dtype)
        if chunk_rows is None:
            chunk_rows = default_chunk_rows(cols * dtype.itemsize)
        chunk_rows = min(check_int("chunk_rows", chunk_rows, 1), rows)
        with self._writing(f"array {name!r}", 0):
            if self.format == "zarr":
                target = self._root.create_array(name, shape=(rows, cols), dtype=dtype,
                                                 chunks=(chunk_rows, cols), **_zarr_options())
            else:
                target = self._root.create_dataset(name, shape=(rows, cols), dtype=dtype,
                                                   chunks=(chunk_rows, cols), compression="gzip",
                                                   compression_opts=1, fletcher32=True)
        w = ArrayWriter(target, name, (rows, cols), dtype, chunk_rows, str(self.path), self)
        self._arrays.append(w)
        self._written[name] = {"shape": [rows, cols], "dtype": dtype.str}
        return w

    def write_array(self, name: str, data) -> None:
        """Store a small array (labels, an index array) at once, as one chunk."""
        data = np.asarray(data)
        if data.size == 0:
            raise DataError(f"{self.path}: array {name!r} is empty")
        with self._writing(f"array {name!r}", data.nbytes):
            if self.format == "zarr":
                self._root.create_array(name, shape=data.shape, dtype=data.dtype,
                                        chunks=data.shape, **_zarr_options())[...] = data
            elif data.ndim:
                self._root.create_dataset(name, data=data, chunks=data.shape, fletcher32=True)
            else:
                self._root.create_dataset(name, data=data)  # a scalar: no chunks, no filters
        self._written[name] = {"shape": list(data.shape), "dtype": data.dtype.str}

    def commit(self) -> Path:
        """Check every array is complete, write ``meta`` and rename the store into place."""
        old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
        moved = False  # whether the old store is at ``old``
        try:
            for a in self._arrays:
                a._finish()
            meta = json.loads(json.dumps(self.meta))  # fails early on non-JSON values
            meta["integrity"] = {"arrays": self._written}
            meta["integrity"]["digest"] = meta_digest(meta)
            with self._writing("the store's attribute", len(json.dumps(meta))):
                self._root.attrs[META_KEY] = meta if self.format == "zarr" else json.dumps(meta)
                if self.format == "hdf5":
                    self._root.close()
            self._open = False
            if self.path.exists() or self.path.is_symlink():
                if not self.overwrite:
                    raise DataError(f"{self.path}: appeared while writing; not overwritten")
                # move the old store aside (a rename, no copy) rather than deleting it first:
                # if publishing the new one fails, the old one is put back unchanged
                with self._writing("the new store", None):
                    _remove(old)
                    os.replace(self.path, old)
                moved = True
            with self._writing("the new store", None):
                os.replace(self._tmp, self.path)
        except BaseException:
            if moved:
                os.replace(old, self.path)
            self.abort()
            raise
        if moved:
            _remove(old)
        return self.path

    def abort(self) -> None:
        """Discard everything written."""
        if self.format == "hdf5" and self._open:
            # emptied first: closing flushes HDF5's metadata, which a full disk would refuse
            with contextlib.suppress(OSError):
                os.truncate(self._tmp, 0)
            with contextlib.suppress(Exception):  # best effort while cleaning up
                self._root.close()
        self._open = False
        with contextlib.suppress(OSError):  # e.g. a read-only location: nothing was created
            _remove(self._tmp)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _zarr_options() -> dict:
    """Codecs and config of every Zarr array scalemem writes: zstd (zarr's default compressor)
    followed by a crc32c checksum of the compressed chunk, and every chunk stored."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return dict(compressors=(ZstdCodec(level=0), Crc32cCodec()),
                config={"write_empty_chunks": True})


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_fashion_mnist(data_dir: str | os.PathLike, out: str | os.PathLike, format: str = "zarr",
                        *, overwrite: bool = False, chunk_rows: int | None = None) -> Path:
    """Write Fashion-MNIST (the four IDX files in ``data_dir``) as a store at ``out``.

    Arrays: ``pixels`` (70000×784 uint8, stored once), ``labels`` (70000 uint8),
    ``key_columns`` (the 78 key pixels of the reference protocol) and ``source_row`` (70000
    int32: the row of the original train+test order, so the permutation can be undone). Rows
    are stored in the reference permutation, so every contiguous row range is a random sample;
    the splits ``fit10k``, ``test60k``, ``fit60k``, ``test10k`` and ``all`` are recorded, and the
    default views are keys ``pixels[@key_columns]/255`` and values ``pixels/255``.
    """
    _check_format(format)
    images, labels = fm.load(data_dir)
    perm = fm.permutation()
    rows = images.shape[0]
    with StoreWriter(out, format, overwrite=overwrite) as w:
        px = w.create_array("pixels", (rows, images.shape[1]), np.uint8, chunk_rows=chunk_rows)
        for s in range(0, rows, px.chunk_rows):
            px.append(images[perm[s:s + px.chunk_rows]])
        w.write_array("labels", labels[perm])
        w.write_array("key_columns", fm.key_columns().astype(np.int32))
        w.write_array("source_row", perm.astype(np.int32))
        w.meta.update(
            dataset="fashion-mnist", rows=rows,
            description=("Fashion-MNIST, the 60000 training images then the 10000 test images, "
                         "rows permuted by jax.random.permutation(PRNGKey(0), 70000); key_columns "
                         "= jax.random.choice(PRNGKey(1), 784, (78,), replace=False)"),
            splits=fm.SPLITS,  # JSON: tuples become lists at commit
            views={"keys": "pixels[@key_columns]/255", "values": "pixels/255"})
    return Path(out)


def write_synthetic(out: str | os.PathLike, rows: int, *, key_dim: int = 78,
                    value_dim: int = 784, latent_dim: int = 8, dtype: str = "uint8",
                    format: str = "zarr", seed: int = 0, noise: float = 0.05,
                    chunk_rows: int | None = None, overwrite: bool = False) -> Path:
    """Write a synthetic store of ``rows`` rows, generated and written block by block.

    Each row has a latent ``z ~ N(0, I_latent_dim)``; keys are a fixed random projection of
    ``z`` plus Gaussian noise (``noise`` × unit variance), values a smooth nonlinear function
    ``½ + ½·tanh(W₂ tanh(W₁ z))`` plus noise, clipped to [0, 1]. With ``dtype="uint8"`` keys are
    stored as ``clip(128 + 32·k)`` and values as ``round(255·v)``, and the default views scale
    both by 1/255; with ``"float32"`` they are stored as is. The data depends only on ``seed``
    and the row index (blocks of 4096 generated rows), not on the chunk size. Arrays ``keys``
    and ``values``; splits ``all``, ``fit`` (the first 6/7 of the rows) and ``test`` (the rest).
    """
    rows = check_int("rows", rows, 1)
    key_dim, value_dim = check_int("key_dim", key_dim, 1), check_int("value_dim", value_dim, 1)
    latent_dim = check_int("latent_dim", latent_dim, 1)
    if dtype not in ("uint8", "float32"):
        raise ConfigError("dtype", dtype, "must be uint8 or float32")
    _check_format(format)
    params = np.random.default_rng([seed, 0])
    Wk = params.standard_normal((latent_dim, key_dim)) / np.sqrt(latent_dim)
    hidden = max(16, 2 * latent_dim)
    W1 = params.standard_normal((latent_dim, hidden)) / np.sqrt(latent_dim)
    W2 = params.standard_normal((hidden, value_dim)) * (1.5 / np.sqrt(hidden))
    gen = 4096
    test = rows // 7
    splits = {"all": (0, rows)}
    if test:
        splits.update(fit=(0, rows - test), test=(rows - test, rows))
    with StoreWriter(out, format, overwrite=overwrite) as w:
        kw = w.create_array("keys", (rows, key_dim), dtype, chunk_rows=chunk_rows)
        vw = w.create_array("values", (rows, value_dim), dtype, chunk_rows=chunk_rows)
        for i, s in enumerate(range(0, rows, gen)):
            b = min(gen, rows - s)
            rng = np.random.default_rng([seed, 1, i])
            z = rng.standard_normal((b, latent_dim))
            k = z @ Wk + noise * rng.standard_normal((b, key_dim))
            v = 0.5 + 0.5 * np.tanh(np.tanh(z @ W1) @ W2)
            v = np.clip(v + noise * rng.standard_normal((b, value_dim)), 0.0, 1.0)
            if dtype == "uint8":
                k, v = np.clip(np.rint(128.0 + 32.0 * k), 0, 255), np.rint(255.0 * v)
            kw.append(k.astype(dtype))
            vw.append(v.astype(dtype))
        scale = "/255" if dtype == "uint8" else ""
        w.meta.update(
            dataset="synthetic", rows=rows, seed=seed, latent_dim=latent_dim, noise=noise,
            description="keys = projection of a Gaussian latent + noise; values = smooth nonlinear "
                        "function of the latent + noise (scalemem._store.write_synthetic)",
            splits=splits, views={"keys": f"keys{scale}", "values": f"values{scale}"})
    return Path(out)
