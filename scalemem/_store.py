"""Writing stores chunk by chunk: Zarr v3 directories and HDF5 files.

:class:`StoreWriter` writes named arrays row block by row block (only one row chunk per array
is ever buffered in memory), records the ``scalemem`` attribute (row splits and default views,
see :mod:`scalemem._sources`) and publishes the store atomically: everything is written under a
temporary sibling name that is renamed to the target only when every array is complete, so an
interrupted or failed ingest never leaves a half-written store behind.

Chunk layout. Arrays are chunked by rows, each chunk holding *all* columns: every read is a
contiguous row range, so a row chunk is the unit that is read and decompressed. The default
chunk height (:func:`default_chunk_rows`) is the largest power of two from 4096 to 16384 rows
whose chunk is at most 16 MiB uncompressed: 16384 rows for 784 uint8 pixels (12.3 MiB), 4096
rows for 784 float32 values (12.3 MiB). With the engine's default blocks of 4 × 4096 rows a
block read touches one or two chunks. Compression: Zarr's default (zstd level 0); HDF5 gzip
level 1 (readable by any HDF5 installation, unlike lzf). Small arrays (labels, index arrays) are
stored as one chunk.

Integrity. Every chunk carries a checksum that is verified when it is read: Zarr arrays end
their codec pipeline with ``crc32c`` (a CRC-32C of the compressed chunk), HDF5 datasets use the
``fletcher32`` filter. A bit flipped on disk then fails the read (:class:`~scalemem.DataError`)
instead of changing the data. Zarr chunks are written even when they equal the fill value
(``write_empty_chunks``), so every chunk of a scalemem store exists and a missing one is known
to be lost (see ``missing_chunks`` in :func:`scalemem.open_source`). The ``scalemem`` attribute
gets an ``integrity`` record: the shape and dtype of every array and a SHA-256 of the attribute
(:func:`scalemem._sources.meta_digest`), checked when the store is opened.

Two writers of data are provided: :func:`write_fashion_mnist` (the reference protocol's rows,
pixels stored once) and :func:`write_synthetic` (a generated data set of any size).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import ConfigError, DataError
from ._sources import META_KEY, meta_digest
from ._validate import check_int

__all__ = ["FORMATS", "StoreWriter", "ArrayWriter", "default_chunk_rows", "write_fashion_mnist",
           "write_synthetic"]

FORMATS = ("zarr", "hdf5")
_MIN_CHUNK, _MAX_CHUNK, _CHUNK_BYTES = 4096, 16384, 16 << 20


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
                 chunk_rows: int, where: str):
        self.name, self.shape, self.dtype = name, shape, dtype
        self.chunk_rows = chunk_rows
        self._target, self._where = target, where
        self._buf = np.empty((chunk_rows, shape[1]), dtype)
        self._nbuf = 0
        self.written = 0  # rows flushed to the store

    @property
    def filled(self) -> int:
        """Rows appended so far (written or buffered)."""
        return self.written + self._nbuf

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
        if self.filled + block.shape[0] > self.shape[0]:
            raise DataError(f"{self._where}: array {self.name!r} has {self.shape[0]} rows; "
                            f"appending {block.shape[0]} to {self.filled} overflows it")
        i = 0
        while i < block.shape[0]:
            take = min(self.chunk_rows - self._nbuf, block.shape[0] - i)
            self._buf[self._nbuf:self._nbuf + take] = block[i:i + take]
            self._nbuf += take
            i += take
            if self._nbuf == self.chunk_rows:
                self._flush()

    def _flush(self) -> None:
        if self._nbuf:
            self._target[self.written:self.written + self._nbuf] = self._buf[:self._nbuf]
            self.written += self._nbuf
            self._nbuf = 0

    def _finish(self) -> None:
        self._flush()
        if self.written != self.shape[0]:
            raise DataError(f"{self._where}: array {self.name!r} got {self.written} of its "
                            f"{self.shape[0]} rows; the store was not published")


class StoreWriter:
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
    """

    def __init__(self, path: str | os.PathLike, format: str = "zarr", *, overwrite: bool = False):
        self.format = _check_format(format)
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise DataError(f"{self.path}: already exists (pass overwrite=True to replace it)")
        if not self.path.parent.is_dir():
            raise DataError(f"{self.path.parent}: no such directory")
        self.overwrite = overwrite
        self._tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        _remove(self._tmp)
        self.meta: dict[str, Any] = {}
        self._arrays: list[ArrayWriter] = []
        self._written: dict[str, dict] = {}  # name -> shape and dtype, for the integrity record
        try:
            if self.format == "zarr":
                import zarr

                self._root = zarr.open_group(store=str(self._tmp), mode="w", zarr_format=3)
            else:
                import h5py

                # format of HDF5 1.10+: checksummed metadata (superblock v3, object headers v2,
                # chunk indexes with checksums), so a damaged index is an error, not fill values
                self._root = h5py.File(self._tmp, "w", libver=("v110", "latest"))
        except BaseException:
            _remove(self._tmp)  # e.g. a full disk while creating the store
            raise
        self._open = True

    def create_array(self, name: str, shape: tuple[int, int], dtype, *,
                     chunk_rows: int | None = None) -> ArrayWriter:
        """A 2-D array of ``shape`` (rows × columns), filled with :meth:`ArrayWriter.append`.
        ``chunk_rows`` defaults to :func:`default_chunk_rows` (capped at the row count)."""
        rows = check_int("rows", shape[0], 1)
        cols = check_int("columns", shape[1], 1)
        dtype = np.dtype(dtype)
        if chunk_rows is None:
            chunk_rows = default_chunk_rows(cols * dtype.itemsize)
        chunk_rows = min(check_int("chunk_rows", chunk_rows, 1), rows)
        if self.format == "zarr":
            target = self._root.create_array(name, shape=(rows, cols), dtype=dtype,
                                             chunks=(chunk_rows, cols), **_zarr_options())
        else:
            target = self._root.create_dataset(name, shape=(rows, cols), dtype=dtype,
                                               chunks=(chunk_rows, cols), compression="gzip",
                                               compression_opts=1, fletcher32=True)
        w = ArrayWriter(target, name, (rows, cols), dtype, chunk_rows, str(self.path))
        self._arrays.append(w)
        self._written[name] = {"shape": [rows, cols], "dtype": dtype.str}
        return w

    def write_array(self, name: str, data) -> None:
        """Store a small array (labels, an index array) at once, as one chunk."""
        data = np.asarray(data)
        if data.size == 0:
            raise DataError(f"{self.path}: array {name!r} is empty")
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
        try:
            for a in self._arrays:
                a._finish()
            meta = json.loads(json.dumps(self.meta))  # fails early on non-JSON values
            meta["integrity"] = {"arrays": self._written}
            meta["integrity"]["digest"] = meta_digest(meta)
            if self.format == "zarr":
                self._root.attrs[META_KEY] = meta
            else:
                self._root.attrs[META_KEY] = json.dumps(meta)
                self._root.close()
        except BaseException:
            self.abort()
            raise
        self._open = False
        old = None
        if self.path.exists() or self.path.is_symlink():
            if not self.overwrite:
                self.abort()
                raise DataError(f"{self.path}: appeared while writing; not overwritten")
            # move the old store aside (a rename, no copy) rather than deleting it first: if
            # publishing the new one fails, the old one is put back unchanged
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            _remove(old)
            try:
                os.replace(self.path, old)
            except BaseException:
                self.abort()
                raise
        try:
            os.replace(self._tmp, self.path)
        except BaseException:
            if old is not None:
                os.replace(old, self.path)
            self.abort()
            raise
        if old is not None:
            _remove(old)
        return self.path

    def abort(self) -> None:
        """Discard everything written."""
        if self.format == "hdf5" and self._open:
            try:
                self._root.close()
            except Exception:  # noqa: BLE001 - best effort while cleaning up
                pass
        self._open = False
        _remove(self._tmp)

    def __enter__(self) -> "StoreWriter":
        return self

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


def _splits_meta(splits: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    return {k: [int(a), int(b)] for k, (a, b) in splits.items()}


def write_fashion_mnist(data_dir: str | os.PathLike, out: str | os.PathLike,
                        format: str = "zarr", *, overwrite: bool = False,
                        chunk_rows: int | None = None) -> Path:
    """Write Fashion-MNIST (the four IDX files in ``data_dir``) as a store at ``out``.

    Arrays: ``pixels`` (70000×784 uint8, stored once), ``labels`` (70000 uint8),
    ``key_columns`` (the 78 key pixels of the reference protocol) and ``source_row`` (70000
    int32: the row of the original train+test order, so the permutation can be undone). Rows
    are stored in the reference permutation, so every contiguous row range is a random sample;
    the splits ``fit10k``, ``test60k``, ``fit60k``, ``test10k`` and ``all`` are recorded, and the
    default views are keys ``pixels[@key_columns]/255`` and values ``pixels/255``.
    """
    from .datasets import fashion_mnist as fm

    _check_format(format)
    images, labels = fm.load(data_dir)
    perm = fm.permutation()
    cols = fm.key_columns().astype(np.int32)
    rows = images.shape[0]
    with StoreWriter(out, format, overwrite=overwrite) as w:
        px = w.create_array("pixels", (rows, images.shape[1]), np.uint8, chunk_rows=chunk_rows)
        for s in range(0, rows, px.chunk_rows):
            px.append(images[perm[s:s + px.chunk_rows]])
        w.write_array("labels", labels[perm])
        w.write_array("key_columns", cols)
        w.write_array("source_row", perm.astype(np.int32))
        w.meta.update(
            dataset="fashion-mnist", rows=rows,
            description=("Fashion-MNIST, the 60000 training images then the 10000 test images, "
                         "rows permuted by jax.random.permutation(PRNGKey(0), 70000); "
                         "key_columns = jax.random.choice(PRNGKey(1), 784, (78,), "
                         "replace=False)"),
            splits=_splits_meta(fm.SPLITS),
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
                kw.append(np.clip(np.rint(128.0 + 32.0 * k), 0, 255).astype(np.uint8))
                vw.append(np.rint(255.0 * v).astype(np.uint8))
            else:
                kw.append(k.astype(np.float32))
                vw.append(v.astype(np.float32))
        scale = "/255" if dtype == "uint8" else ""
        w.meta.update(
            dataset="synthetic", rows=rows, seed=seed, latent_dim=latent_dim, noise=noise,
            description="keys = projection of a Gaussian latent + noise; values = smooth "
                        "nonlinear function of the latent + noise "
                        "(scalemem._store.write_synthetic)",
            splits=_splits_meta(splits),
            views={"keys": f"keys{scale}", "values": f"values{scale}"})
    return Path(out)
