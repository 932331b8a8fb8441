"""One conformance suite for every Source backend (in-memory arrays, HDF5, Zarr v3).

Each backend holds the same reference store: a uint8 ``pixels`` array (keys and values are two
views of it), a float32 ``feats`` array, index arrays, a 1-D ``labels`` array and a shorter
``short`` array, with splits and default views recorded the way ``scalemem data`` writes them.
Every test runs against every backend and compares with the NumPy reference. The data is
integer or float32 and is read back, not computed on, so all comparisons are exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from scalemem._errors import ConfigError, DataError
from scalemem._data import (ArraySource, Source, StoreWriter, View, open_source, parse_view,
                            store_format)

N, WIDTH = 300, 40
KEY_COLUMNS = np.array([33, 2, 17, 5, 39, 0, 21], np.int32)
META = {
    "rows": N,
    "splits": {"fit": [0, 200], "test": [200, 300], "all": [0, 300]},
    "views": {"keys": "pixels[@key_columns]/255", "values": "pixels/255"},
}


def _reference() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "pixels": rng.integers(0, 256, (N, WIDTH), dtype=np.uint8),
        "feats": rng.standard_normal((N, 5)).astype(np.float32),
        "key_columns": KEY_COLUMNS,
        "bad_columns": np.array([1, WIDTH], np.int32),
        "labels": rng.integers(0, 10, N).astype(np.uint8),
        "short": np.ones((200, 3), np.float32),
    }


REF = _reference()
BIG = ("pixels", "feats")  # written row block by row block; the others at once


def _write(path, fmt):
    with StoreWriter(path, fmt) as w:
        for name, a in REF.items():
            if name in BIG:
                aw = w.create_array(name, a.shape, a.dtype, chunk_rows=64)  # 300 rows: 5 chunks
                for s in range(0, N, 50):  # blocks that do not line up with the chunks
                    aw.append(a[s:s + 50])
            else:
                w.write_array(name, a)
        w.meta.update(META)
    return path


@pytest.fixture(scope="module", params=["array", "hdf5", "zarr"])
def backend(request, tmp_path_factory):
    """``open_(keys=None, values=None, rows=None) -> Source`` for one backend."""
    kind = request.param
    opened = []
    if kind == "array":
        def open_(keys=None, values=None, rows=None):
            return ArraySource.from_arrays(REF, keys=keys, values=values, rows=rows, attrs=META,
                                           name="reference")
    else:
        path = _write(tmp_path_factory.mktemp(kind) / f"ref.{'h5' if kind == 'hdf5' else 'zarr'}",
                      kind)

        def open_(keys=None, values=None, rows=None):
            src = open_source(path, keys, values, rows)
            opened.append(src)
            return src
    open_.kind = kind
    yield open_
    for src in opened:
        src.close()


def test_protocol_shapes_dtypes_and_default_views(backend):
    src = backend()
    assert isinstance(src, Source)
    assert (src.rows, src.key_dim, src.value_dim) == (N, KEY_COLUMNS.size, WIDTH)
    assert src.key_dtype == np.uint8 and src.value_dtype == np.uint8
    assert src.key_scale == 1.0 / 255 and src.value_scale == 1.0 / 255
    assert (src.key_array, src.value_array) == ("pixels", "pixels")
    if backend.kind != "array":
        assert src.name.endswith(("ref.h5", "ref.zarr"))


@pytest.mark.parametrize("start,stop", [(0, N), (0, 1), (63, 65), (10, 250), (N - 1, N),
                                        (128, 128)])
def test_read_matches_reference(backend, start, stop):
    Q, X = backend().read(start, stop)
    px = REF["pixels"][start:stop]
    assert Q.dtype == np.uint8 and X.dtype == np.uint8
    np.testing.assert_array_equal(Q, px[:, KEY_COLUMNS])
    np.testing.assert_array_equal(X, px)


@pytest.mark.parametrize("spec,array,cols", [
    ("pixels[3]", "pixels", [3]),
    ("pixels[12,3,39]", "pixels", [12, 3, 39]),
    ("pixels[0:10]", "pixels", list(range(10))),
    ("pixels[35:]", "pixels", list(range(35, 40))),
    ("pixels[:4]", "pixels", [0, 1, 2, 3]),
    ("pixels[1:20:3]", "pixels", list(range(1, 20, 3))),
    ("pixels[ 0:3 , 30, @key_columns ]", "pixels", [0, 1, 2, 30, *KEY_COLUMNS]),
    ("feats", "feats", list(range(5))),
    ("feats[4,0]", "feats", [4, 0]),
])
def test_column_selections(backend, spec, array, cols):
    src = backend(keys=spec, values="feats")
    assert src.key_dim == len(cols) and src.key_array == array
    assert src.key_dtype == REF[array].dtype
    Q, X = src.read(40, 190)
    np.testing.assert_array_equal(Q, REF[array][40:190][:, cols])
    np.testing.assert_array_equal(X, REF["feats"][40:190])


@pytest.mark.parametrize("spec,scale", [("pixels", None), ("pixels*2", 2.0), ("pixels/4", 0.25),
                                        ("feats[0:2] * 0.5", 0.5), ("pixels[@key_columns]/255",
                                                                    1.0 / 255)])
def test_scales(backend, spec, scale):
    src = backend(keys=spec, values=spec)
    assert src.key_scale == scale and src.value_scale == scale


@pytest.mark.parametrize("rows,start,stop", [
    ("fit", 0, 200), ("test", 200, 300), ("all", 0, N), (None, 0, N), ("10:50", 10, 50),
    (":30", 0, 30), ("290:", 290, N), ((5, 9), 5, 9),
])
def test_row_selection(backend, rows, start, stop):
    src = backend(values="feats", rows=rows)
    assert src.rows == stop - start
    Q, X = src.read(0, src.rows)
    np.testing.assert_array_equal(Q, REF["pixels"][start:stop][:, KEY_COLUMNS])
    np.testing.assert_array_equal(X, REF["feats"][start:stop])
    Q, _ = src.read(1, 3)  # offsets are relative to the selection
    np.testing.assert_array_equal(Q, REF["pixels"][start + 1:start + 3][:, KEY_COLUMNS])


@pytest.mark.parametrize("spec", ["pixels[", "pixels[1:2:3:4]", "pixels[a]", "pixels[-100000]",
                                  "pixels[]", "pixels[1,,2]", "9pixels", "pixels/0",
                                  "pixels[0:5:0]", "pixels extra", "pixels[@]"])
def test_bad_spec_is_a_config_error(backend, spec):
    with pytest.raises(ConfigError) as e:
        backend(keys=spec)
    assert e.value.field == "keys" and e.value.value == spec


@pytest.mark.parametrize("spec", ["pixels[40]", "pixels[0:41]", "pixels[3:1]",
                                  "pixels[@bad_columns]"])
def test_columns_outside_the_array(backend, spec):
    with pytest.raises(ConfigError, match="40 columns") as e:
        backend(values=spec)
    assert e.value.field == "values" and "pixels" in str(e.value)


@pytest.mark.parametrize("spec,match", [("nope", "no array 'nope'"), ("labels", "2-D"),
                                        ("short", "200 rows")])
def test_bad_arrays_are_data_errors(backend, spec, match):
    with pytest.raises(DataError, match=match):
        backend(keys=spec)


@pytest.mark.parametrize("rows,match", [("fit99", "unknown split.*fit, test"),
                                        ("0:301", "outside the 300 rows"),
                                        ("5:5", "empty"), ("a:b", "START:STOP"),
                                        ((1, 2.5), "two integers"), (7, "expected None")])
def test_bad_rows(backend, rows, match):
    with pytest.raises(ConfigError, match=match) as e:
        backend(rows=rows)
    assert e.value.field == "rows"


def test_read_outside_the_rows(backend):
    src = backend(rows="fit")
    with pytest.raises(ConfigError):
        src.read(150, 201)
    with pytest.raises(ConfigError):
        src.read(5, 4)


# ---- backend-specific details ---------------------------------------------------------------


def test_array_source_direct():
    Q = np.arange(12, dtype=np.float64).reshape(6, 2)
    X = np.arange(18, dtype=np.uint8).reshape(6, 3)
    src = ArraySource(Q, X, value_scale=0.5)
    assert isinstance(src, Source)
    assert (src.rows, src.key_dim, src.value_dim, src.key_scale, src.value_scale) == (
        6, 2, 3, None, 0.5)
    q, x = src.read(2, 5)
    np.testing.assert_array_equal(q, Q[2:5])
    np.testing.assert_array_equal(x, X[2:5])
    with pytest.raises(DataError, match="4 rows but values array 'values' has 6"):
        ArraySource(Q[:4], X)


def test_parse_view():
    v = parse_view("data/pixels[0:3,@cols]/2")
    assert v == View("data/pixels", (slice(0, 3, None), "cols"), 0.5, "data/pixels[0:3,@cols]/2")
    assert parse_view(v) is v
    with pytest.raises(ConfigError):
        parse_view(3, "keys")


def test_open_source_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_source(tmp_path / "missing.zarr")
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(DataError, match="neither an HDF5 file nor a Zarr"):
        open_source(tmp_path / "plain.txt")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="not a Zarr store"):
        open_source(tmp_path / "dir")


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_store_without_default_views(tmp_path, fmt):
    path = tmp_path / "bare"
    with StoreWriter(path, fmt) as w:
        w.write_array("a", np.ones((4, 3), np.float32))
    assert store_format(path) == fmt
    with pytest.raises(DataError, match="no default keys view.*pass keys="):
        open_source(path)
    src = open_source(path, keys="a[0]", values="a")
    assert (src.rows, src.key_dim, src.value_dim) == (4, 1, 3)
    with pytest.raises(ConfigError, match="none recorded"):
        open_source(path, keys="a", values="a", rows="fit")
