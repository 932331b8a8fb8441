"""Broken stores and failed writes: every damage is a DataError naming the path, within seconds.

HDF5 files truncated, bit-flipped or with a garbage header; Zarr stores with a truncated, a
bit-flipped, an emptied or a deleted chunk, or garbage metadata. Stores written by scalemem carry
a checksum per chunk (Zarr ``crc32c``, HDF5 ``fletcher32``) and an integrity record of their
metadata, so a flipped bit is detected rather than read as different numbers. A chunk that is
missing (zarr and HDF5 return the fill value for it by default) is an error unless the store is
opened with ``missing_chunks="fill"``. Also: NaN/Inf in the data stops the fit with the store,
array, chunk and row, and never reaches K, V, a checkpoint or a model file; and a disk that fills
up while a store, a checkpoint or a model is written leaves the previous one loadable, bit for
bit.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import h5py
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import zarr

import scalemem
from scalemem import CheckpointError, DataError, NonFiniteDataError
from scalemem._data import StoreWriter

ROWS, WIDTH, CHUNK = 512, 6, 64  # 8 chunks of 64 rows
DATA = np.random.default_rng(3).standard_normal((ROWS, WIDTH)).astype(np.float32)
VIEWS = {"keys": "x[0:2]", "values": "x"}
SECONDS = 10.0  # "within seconds": every failure here is detected in well under a second


def _write(path: Path, fmt: str, data=DATA) -> Path:
    with StoreWriter(path, fmt, overwrite=True) as w:
        a = w.create_array("x", data.shape, data.dtype, chunk_rows=CHUNK)
        a.append(data)
        w.meta.update(views=VIEWS, splits={"all": [0, len(data)]})
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("pristine")
    return {fmt: _write(d / f"s.{fmt}", fmt) for fmt in ("hdf5", "zarr")}


@pytest.fixture(params=["hdf5", "zarr"])
def store(request, pristine, tmp_path):
    """A fresh copy of a pristine store of one format, to damage."""
    fmt = request.param
    src, dst = pristine[fmt], tmp_path / pristine[fmt].name
    (shutil.copytree if fmt == "zarr" else shutil.copyfile)(src, dst)
    return fmt, dst


def _read_all(path, **kw):
    src = scalemem.open_source(path, **kw)
    try:
        return src.read(0, src.rows)
    finally:
        src.close()


def _refused(path, match=None, **kw) -> DataError:
    """Opening and reading ``path`` raises a DataError that names it, within SECONDS."""
    t = time.perf_counter()
    with pytest.raises(DataError, match=match) as e:
        _read_all(path, **kw)
    assert time.perf_counter() - t < SECONDS
    assert str(path) in str(e.value)
    return e.value


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= mask
    path.write_bytes(bytes(b))


def _h5_chunk(path: Path, index: int) -> tuple[int, int]:
    """``(byte offset, size)`` of row chunk ``index`` of array ``x`` in an HDF5 file."""
    with h5py.File(path, "r") as f:
        info = f["x"].id.get_chunk_info(index)
        return info.byte_offset, info.size


def _zarr_chunk(path: Path, index: int) -> Path:
    return path / "x" / "c" / str(index) / "0"


def test_pristine_stores_read_back_exactly(pristine):
    for path in pristine.values():
        Q, X = _read_all(path)
        np.testing.assert_array_equal(X, DATA)
        np.testing.assert_array_equal(Q, DATA[:, :2])


def test_writer_adds_checksums(pristine):
    meta = zarr.open_group(str(pristine["zarr"]), mode="r")["x"].metadata.to_dict()
    assert [c["name"] for c in meta["codecs"]][-1] == "crc32c"
    with h5py.File(pristine["hdf5"], "r") as f:
        assert f["x"].fletcher32


# ---- HDF5 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.9, -1])
def test_truncated_hdf5(pristine, tmp_path, keep):
    path = tmp_path / "t.h5"
    shutil.copyfile(pristine["hdf5"], path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1 if keep == -1 else int(size * keep))
    _refused(path)


def test_bit_flip_in_an_hdf5_chunk(pristine, tmp_path):
    path = tmp_path / "f.h5"
    shutil.copyfile(pristine["hdf5"], path)
    off, size = _h5_chunk(path, 5)
    _flip(path, off + size // 2)
    err = _refused(path, match="rows 0:512 of array 'x'")
    assert "corrupted" in str(err)


@pytest.mark.parametrize("where", ["signature", "superblock", "after superblock"])
def test_garbage_hdf5_header(pristine, tmp_path, where):
    path = tmp_path / "g.h5"
    shutil.copyfile(pristine["hdf5"], path)
    b = bytearray(path.read_bytes())
    start = {"signature": 0, "superblock": 8, "after superblock": 96}[where]
    b[start:start + 32] = np.random.default_rng(0).integers(0, 256, 32, np.uint8).tobytes()
    path.write_bytes(bytes(b))
    _refused(path)


def test_every_damaged_byte_of_an_hdf5_store_is_refused_or_harmless(pristine, tmp_path):
    """Flip one byte at 150 places spread over the whole file (metadata, B-tree, chunks, free
    space): each read either fails with a DataError or returns the very same data, never other
    numbers and never another exception type."""
    base = pristine["hdf5"].read_bytes()
    path = tmp_path / "z.h5"
    outcomes = set()
    for off in np.linspace(0, len(base) - 1, 150).astype(int):
        b = bytearray(base)
        b[off] ^= 0xFF
        path.write_bytes(bytes(b))
        try:
            Q, X = _read_all(path)
        except DataError:
            outcomes.add("refused")
            continue
        np.testing.assert_array_equal(X, DATA, err_msg=f"byte {off} changed the data silently")
        outcomes.add("same")
    assert "refused" in outcomes


# ---- Zarr --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "bit flip", "emptied", "deleted"])
def test_damaged_zarr_chunk(pristine, tmp_path, damage):
    path = tmp_path / "z.zarr"
    shutil.copytree(pristine["zarr"], path)
    chunk = _zarr_chunk(path, 3)
    raw = chunk.read_bytes()
    if damage == "truncated":
        chunk.write_bytes(raw[: len(raw) // 2])
    elif damage == "bit flip":
        _flip(chunk, len(raw) // 3, 0x04)
    elif damage == "emptied":
        chunk.write_bytes(b"")
    else:
        chunk.unlink()
    err = _refused(path)
    if damage == "deleted":
        assert "no stored chunk 'c/3/0' for rows 192:256" in str(err)
        assert "fill value" in str(err)
    else:
        assert "checksum" in str(err)
    # the damaged rows are refused; rows in intact chunks still read
    src = scalemem.open_source(path)
    np.testing.assert_array_equal(src.read(0, 192)[1], DATA[:192])
    with pytest.raises(DataError):
        src.read(250, 260)


@pytest.mark.parametrize("which", ["root", "array"])
@pytest.mark.parametrize("garbage", [b"{not json", b"", b"\x00\xff" * 10, b'{"zarr_format": 3}'])
def test_garbage_zarr_metadata(pristine, tmp_path, which, garbage):
    path = tmp_path / "m.zarr"
    shutil.copytree(pristine["zarr"], path)
    meta = path / "zarr.json" if which == "root" else path / "x" / "zarr.json"
    meta.write_bytes(garbage)
    _refused(path)


@pytest.mark.parametrize("edit", [
    ("x/zarr.json", '"shape": [\n    512,', '"shape": [\n    520,'),  # rows beyond the data
    ("x/zarr.json", '"float32"', '"int32"'),  # another dtype
    ("zarr.json", '"x[0:2]"', '"x[0:3]"'),  # a default view
    ("zarr.json", '512', '511'),  # a split
])
def test_plausible_but_wrong_zarr_metadata(pristine, tmp_path, edit):
    """Metadata that still parses but no longer describes the data (as a flipped digit does)
    is caught by the store's integrity record."""
    path = tmp_path / "w.zarr"
    shutil.copytree(pristine["zarr"], path)
    name, old, new = edit
    text = (path / name).read_text()
    assert old in text
    (path / name).write_text(text.replace(old, new, 1))
    _refused(path, match="corrupted")


def test_every_damaged_byte_of_a_zarr_store_is_refused_or_harmless(pristine, tmp_path):
    """As for HDF5: one flipped byte anywhere in the metadata files or a chunk is refused or
    harmless (whitespace, say), never a silent change."""
    files = [p for p in sorted(pristine["zarr"].rglob("*")) if p.is_file()]
    path = tmp_path / "y.zarr"
    outcomes = set()
    for f in files:
        rel = f.relative_to(pristine["zarr"])
        raw = f.read_bytes()
        for off in np.linspace(0, len(raw) - 1, 12 if f.name == "zarr.json" else 3).astype(int):
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(pristine["zarr"], path)
            _flip(path / rel, int(off), 0x01)
            try:
                Q, X = _read_all(path)
            except DataError:
                outcomes.add("refused")
                continue
            np.testing.assert_array_equal(X, DATA, err_msg=f"{rel}@{off} changed the data")
            np.testing.assert_array_equal(Q, DATA[:, :2])
            outcomes.add("same")
    assert "refused" in outcomes


# ---- stores not written by scalemem: missing chunks ---------------------------------------------


def test_user_zarr_store_with_a_deleted_chunk(tmp_path):
    """A plain zarr store (no checksums, zarr's defaults): a deleted chunk is refused, not read
    as zeros; missing_chunks='fill' is the explicit opt-in to zarr's fill behaviour."""
    path = tmp_path / "user.zarr"
    arr = zarr.open_group(str(path), mode="w").create_array("x", shape=DATA.shape,
                                                            chunks=(CHUNK, WIDTH), dtype="f4")
    arr[...] = DATA
    _zarr_chunk(path, 2).unlink()
    err = _refused(path, keys="x[0:2]", values="x", match="rows 128:192")
    assert "missing_chunks='fill'" in str(err)
    Q, X = _read_all(path, keys="x[0:2]", values="x", missing_chunks="fill")
    assert (X[128:192] == 0).all()
    np.testing.assert_array_equal(X[192:], DATA[192:])


def test_user_hdf5_file_with_an_unwritten_chunk(tmp_path):
    path = tmp_path / "user.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("x", shape=DATA.shape, chunks=(CHUNK, WIDTH), dtype="f4")
        d[:256] = DATA[:256]
        d[320:] = DATA[320:]  # rows 256:320 (chunk 4) never written, e.g. an aborted writer
        f.create_dataset("y", shape=(10, 2), dtype="f4")  # contiguous, never written
    _refused(path, keys="x[0:2]", values="x", match="rows 256:320")
    _refused(path, keys="y", values="y", match="never written")
    X = _read_all(path, keys="x[0:2]", values="x", missing_chunks="fill")[1]
    assert (X[256:320] == 0).all()


# ---- damage found during a fit -----------------------------------------------------------------


def test_corrupted_chunk_stops_a_streamed_fit(store):
    fmt, path = store
    if fmt == "zarr":
        _flip(_zarr_chunk(path, 6), 20)
    else:
        off, size = _h5_chunk(path, 6)
        _flip(path, off + size // 2)
    src = scalemem.open_source(path)
    t = time.perf_counter()
    with pytest.raises(DataError) as e:
        # recipe "seed": normal initial keys, so the first read of the data is the stream's
        scalemem.fit_source(src, 3, steps=2, chunk_rows=CHUNK, chunks_per_block=2,
                            residency="streamed", recipe="seed")
    assert time.perf_counter() - t < 60  # includes compiling the block functions
    assert str(path) in str(e.value)
    src.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_value_stops_the_fit_and_reaches_nothing(store, tmp_path, bad):
    """The NaN/Inf is located (store, array, chunk, row), K never becomes non-finite, no
    checkpoint is written, and the error comes from the first step."""
    fmt, path = store
    data = DATA.copy()
    data[300, 4] = bad  # row 300: chunk 300 // 64 = 4
    _write(path, fmt, data)
    src = scalemem.open_source(path)
    saved = []
    with pytest.raises(NonFiniteDataError) as e:
        scalemem.fit_source(src, 3, steps=5, chunk_rows=CHUNK, checkpoint=saved.append,
                            checkpoint_every=1, residency="streamed", recipe="seed")
    err = e.value
    assert (err.source, err.array, err.row, err.chunk) == (str(path), "x", 300, 4)
    for text in (str(path), "'x'", "row 300", "chunk 4"):
        assert text in str(err)
    assert saved == []  # the first step already failed: nothing was checkpointed
    src.close()


def test_a_nonfinite_step_leaves_k_unchanged():
    """The step guard itself: statistics of NaN data give finite=False and K back unchanged."""
    import jax

    from scalemem._engine import normal_keys
    from scalemem._engine.fitting import build_engine
    from scalemem._engine.programs import init_state

    Q = DATA[:, :2].copy()
    Q[10, 1] = np.nan
    opt = optax.adam(1e-2)
    with jax.enable_x64(True):
        cfg = scalemem.FitConfig(prototypes=3, chunk_rows=CHUNK, optimizer="custom",
                                 recipe="seed", residency="resident")
        eng = build_engine(scalemem.ArraySource(Q, DATA), cfg, optimizer=opt)
        K = normal_keys(3, 2)
        st = init_state(K, spec=eng.spec)
        K2, st2, out = eng.step(K, st)
    assert not bool(out.finite)
    np.testing.assert_array_equal(K2, K)
    for a, b in zip(jax.tree.leaves(st2), jax.tree.leaves(st)):
        np.testing.assert_array_equal(a, b)
    err = eng.locate_nonfinite()
    assert (err.array, err.row, err.chunk) == ("keys", 10, 0)


@pytest.mark.parametrize("what", ["K", "V"])
def test_saving_a_nonfinite_model_is_refused(tmp_path, what):
    from scalemem._engine import modelio as _modelio

    good = scalemem.Memory(jnp.ones((3, 2)), jnp.ones((3, 4)))
    path = _modelio.save(good, tmp_path / "model.npz")
    before = path.read_bytes()
    K, V = np.ones((3, 2), np.float32), np.ones((3, 4), np.float32)
    (K if what == "K" else V)[1, 1] = np.nan
    with pytest.raises(CheckpointError, match=f"{what}.*NaN or Inf"):
        _modelio.save(scalemem.Memory(jnp.asarray(K), jnp.asarray(V)), path)
    assert path.read_bytes() == before  # the previous model is untouched


def test_checkpointing_a_nonfinite_k_is_refused(tmp_path):
    from scalemem._engine import LoopState
    from scalemem._run.checkpoint import CheckpointManager

    mgr = CheckpointManager(tmp_path / "checkpoints")
    K = jnp.ones((3, 2), jnp.float32)
    opt = optax.adam(1e-2)
    mgr.save(LoopState(1, K, opt.init(K), [1.0], [0.5]), {"config": {}, "fingerprint": {}})
    bad = K.at[0, 0].set(jnp.inf)
    with pytest.raises(CheckpointError, match="K.*NaN or Inf"):
        mgr.save(LoopState(2, bad, opt.init(bad), [1.0, 1.0], [0.5, 0.5]),
                 {"config": {}, "fingerprint": {}})
    assert mgr.latest().step == 1


# ---- disk full while writing -------------------------------------------------------------------


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _stored(path, fmt):
    return _read_all(path)[1]


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_disk_full_while_writing_a_store(tmp_path, monkeypatch, fmt):
    """ENOSPC from the chunk writes reaches the caller; nothing partial is left and the store
    that was there before (overwrite=True) still reads bit for bit."""
    path = _write(tmp_path / f"s.{fmt}", fmt)
    calls = {"n": 0}
    if fmt == "zarr":
        import zarr.storage._local as local

        real = local._put

        def put(p, value, exclusive=False):
            calls["n"] += 1
            if "/c/" in str(p).replace(os.sep, "/") and calls["n"] > 3:
                _enospc()
            return real(p, value, exclusive)

        monkeypatch.setattr(local, "_put", put)
    else:
        monkeypatch.setattr(h5py.Dataset, "__setitem__", _enospc)
    with pytest.raises(OSError) as e:
        _write(path, fmt, DATA * 2)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial store
    np.testing.assert_array_equal(_stored(path, fmt), DATA)


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
@pytest.mark.parametrize("failing", ["old store aside", "new store into place"])
def test_disk_full_while_publishing_a_store(tmp_path, monkeypatch, fmt, failing):
    """Publication renames the old store aside, then the new one into place. A failure of
    either leaves the old store in place and readable, bit for bit."""
    path = _write(tmp_path / f"s.{fmt}", fmt)
    real = os.replace

    def replace(a, b):
        name = Path(a).name
        if (name == path.name) if failing == "old store aside" else ".partial-" in name:
            _enospc()
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError) as e:
        _write(path, fmt, DATA * 2)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    np.testing.assert_array_equal(_stored(path, fmt), DATA)


def _fail_midway(real_savez):
    """``np.savez`` that writes part of the archive and then hits a full disk."""

    def savez(f, **arrays):
        f.write(b"PK\x03\x04 partial archive")
        _enospc()

    return savez


@pytest.mark.parametrize("how", ["write", "fsync", "replace"])
def test_disk_full_while_saving_a_model(tmp_path, monkeypatch, how):
    from scalemem._engine import modelio as _modelio

    first = scalemem.Memory(jnp.arange(6.0).reshape(3, 2), jnp.arange(12.0).reshape(3, 4))
    path = _modelio.save(first, tmp_path / "model.npz")
    before = path.read_bytes()
    if how == "write":
        monkeypatch.setattr(_modelio.np, "savez", _fail_midway(np.savez))
    else:
        monkeypatch.setattr(os, how, _enospc)
    with pytest.raises(CheckpointError, match="could not be written") as e:
        _modelio.save(scalemem.Memory(first.K + 1, first.V + 1), path)
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before
    again = _modelio.load(path)
    np.testing.assert_array_equal(again.K, first.K)
    np.testing.assert_array_equal(again.V, first.V)
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary file left


def test_disk_full_midway_through_a_checkpoint(tmp_path, monkeypatch):
    """(Failures of os.replace and os.fsync are covered in tests/test_checkpoint.py.) A write
    that fails part way leaves the previous checkpoint loadable bit for bit."""
    from scalemem._engine import LoopState
    from scalemem._engine import modelio as _modelio
    from scalemem._run.checkpoint import CheckpointManager

    mgr = CheckpointManager(tmp_path / "checkpoints")
    K = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2)), jnp.float32)
    opt = optax.adam(1e-2)
    state = LoopState(4, K, opt.init(K), [1.0] * 4, [0.5] * 4)
    mgr.save(state, {"config": {}, "fingerprint": {}})
    monkeypatch.setattr(_modelio.np, "savez", _fail_midway(np.savez))
    with pytest.raises(CheckpointError, match="could not be written"):
        mgr.save(LoopState(5, K + 1, opt.init(K), [1.0] * 5, [0.5] * 5),
                 {"config": {}, "fingerprint": {}})
    monkeypatch.undo()
    latest = mgr.latest()
    assert latest.step == 4
    np.testing.assert_array_equal(latest.K, np.asarray(K))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000004.npz"]
