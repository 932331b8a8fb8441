"""Writing stores: chunked appends, atomic publication, the Fashion-MNIST ingest (on fake IDX
files with the official layout) and the synthetic-store script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from scalemem._errors import ConfigError, DataError
from scalemem._data import StoreWriter, default_chunk_rows, open_source, write_fashion_mnist
from scalemem.datasets import fashion_mnist as fm

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic_store.py"


def _chunks(path, fmt, name):
    if fmt == "zarr":
        return zarr.open_group(str(path), mode="r")[name].chunks
    with h5py.File(path, "r") as f:
        return f[name].chunks


def test_default_chunk_rows():
    assert default_chunk_rows(784) == 16384  # uint8 pixels: 12.3 MiB chunks
    assert default_chunk_rows(784 * 4) == 4096  # float32 values: 12.3 MiB chunks
    assert default_chunk_rows(10) == 16384 and default_chunk_rows(10 ** 6) == 4096


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_writer_appends_blocks_and_publishes_atomically(tmp_path, fmt):
    data = np.arange(1000 * 5, dtype=np.float32).reshape(1000, 5)
    out = tmp_path / "s"
    with StoreWriter(out, fmt) as w:
        a = w.create_array("x", data.shape, data.dtype, chunk_rows=128)
        for s in (0, 3, 300, 301, 999):  # uneven blocks, buffered into whole chunks
            a.append(data[s:{0: 3, 3: 300, 300: 301, 301: 999, 999: 1000}[s]])
        assert not out.exists()  # nothing visible before the commit
    assert _chunks(out, fmt, "x") == (128, 5)
    src = open_source(out, keys="x[0:2]", values="x")
    np.testing.assert_array_equal(src.read(0, 1000)[1], data)
    src.close()
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no partial files left

    with pytest.raises(DataError, match="already exists"):
        StoreWriter(out, fmt)
    with StoreWriter(out, fmt, overwrite=True) as w:
        w.write_array("y", np.ones((2, 2), np.int32))
    assert open_source(out, keys="y", values="y").rows == 2


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_writer_failures_leave_nothing_behind(tmp_path, fmt):
    out = tmp_path / "s"
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(out, fmt) as w:
            w.create_array("x", (10, 2), np.float32).append(np.zeros((4, 2)))
            raise RuntimeError("boom")
    with pytest.raises(DataError, match="got 4 of its 10 rows"):
        with StoreWriter(out, fmt) as w:
            w.create_array("x", (10, 2), np.float32).append(np.zeros((4, 2)))
    with pytest.raises(DataError, match="overflows"):
        with StoreWriter(out, fmt) as w:
            w.create_array("x", (10, 2), np.float32).append(np.zeros((11, 2)))
    with pytest.raises(DataError, match="cannot store a float64 block"):
        with StoreWriter(out, fmt) as w:
            w.create_array("x", (10, 2), np.uint8).append(np.zeros((10, 2)))
    with pytest.raises(ConfigError, match="format"):
        StoreWriter(out, "parquet")
    assert list(tmp_path.iterdir()) == []


def _write_idx(path: Path, a: np.ndarray) -> None:
    head = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    path.write_bytes(head + a.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_fashion_mnist(tmp_path_factory):
    """IDX files with Fashion-MNIST's layout whose image i carries i in its first 3 pixels."""
    d = tmp_path_factory.mktemp("fmnist")
    i = np.arange(fm.ROWS)
    images = np.zeros((fm.ROWS, 28, 28), np.uint8)
    images[:, 0, 0], images[:, 0, 1], images[:, 0, 2] = i % 256, (i // 256) % 256, i // 65536
    images[:, 27, 27] = 255
    labels = (i % 10).astype(np.uint8)
    for part, sl in (("train", slice(0, 60000)), ("t10k", slice(60000, None))):
        _write_idx(d / f"{part}-images-idx3-ubyte", images[sl])
        _write_idx(d / f"{part}-labels-idx1-ubyte", labels[sl])
    return d


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_write_fashion_mnist(fake_fashion_mnist, tmp_path, fmt):
    out = write_fashion_mnist(fake_fashion_mnist, tmp_path / "fm", fmt)
    assert _chunks(out, fmt, "pixels") == (16384, 784)
    perm, cols = fm.permutation(), fm.key_columns()
    src = open_source(out, rows="test10k")
    assert (src.rows, src.key_dim, src.value_dim) == (10000, 78, 784)
    assert src.key_scale == src.value_scale == 1 / 255 and src.value_dtype == np.uint8
    Q, X = src.read(0, 10000)
    X3 = X[:, :3].astype(np.int64)
    stored = X3[:, 0] + 256 * X3[:, 1] + 65536 * X3[:, 2]
    np.testing.assert_array_equal(stored, perm[60000:])  # rows in the reference permutation
    assert (X[:, 783] == 255).all()
    np.testing.assert_array_equal(Q, X[:, cols])  # keys are a view of the stored pixels
    src.close()
    for name, (a, b) in fm.SPLITS.items():
        assert open_source(out, rows=name).rows == b - a
    if fmt == "zarr":
        g = zarr.open_group(str(out), mode="r")
        np.testing.assert_array_equal(g["labels"][...], perm % 10)
        np.testing.assert_array_equal(g["source_row"][...], perm)
        np.testing.assert_array_equal(g["key_columns"][...], cols)


def _script():
    spec = importlib.util.spec_from_file_location("make_synthetic_store", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("fmt,dtype", [("zarr", "uint8"), ("hdf5", "float32")])
def test_make_synthetic_store_script(tmp_path, fmt, dtype, capsys):
    main = _script().main
    args = ["--rows", "5000", "--key-dim", "6", "--value-dim", "20", "--format", fmt,
            "--dtype", dtype, "--seed", "3"]
    assert main([str(tmp_path / "a"), *args]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main([str(tmp_path / "b"), *args, "--chunk-rows", "1000"]) == 0
    assert main([str(tmp_path / "a"), *args]) == 2  # exists: a typed error, exit status 2
    a, b = open_source(tmp_path / "a"), open_source(tmp_path / "b", rows="fit")
    assert (a.rows, a.key_dim, a.value_dim, b.rows) == (5000, 6, 20, 5000 - 5000 // 7)
    assert a.key_dtype == np.dtype(dtype)
    assert a.value_scale == (1 / 255 if dtype == "uint8" else None)
    Qa, Xa = a.read(0, 5000)
    Qb, Xb = b.read(0, b.rows)
    np.testing.assert_array_equal(Qa[:b.rows], Qb)  # data depends on the seed, not the chunks
    np.testing.assert_array_equal(Xa[:b.rows], Xb)
    v = Xa * (a.value_scale or 1.0)
    assert v.min() >= 0 and v.max() <= 1 and v.std() > 0.05
    for s in (a, b):
        s.close()


def test_fashion_mnist_store_matches_the_reference_protocol(fmnist_dir, tmp_path):
    """On the real data (skipped without it): the store's views give the reference split."""
    out = write_fashion_mnist(fmnist_dir, tmp_path / "fm.zarr")
    Qf, Xf, _, _ = fm.reference_split(fmnist_dir, "fit10k", "test60k")
    src = open_source(out, rows="fit10k")
    Q, X = src.read(0, src.rows)
    # the reference holds pixels/255 in float32; ×255 and rounding recovers the exact uint8
    np.testing.assert_array_equal(Q, np.rint(Qf * 255))
    np.testing.assert_array_equal(X, np.rint(Xf * 255))
