"""Bad input is refused before any compute, with a typed error naming the field and the value.

Every case goes through a public entry point (``scalemem.fit``, ``scalemem.open_source``,
``scalemem.fit_source``) and checks: the error is a :class:`~scalemem.ScalememError` (a
:class:`~scalemem.ConfigError` for a setting, a :class:`~scalemem.DataError` for the data), its
``field`` names what is wrong, its message names the field and shows the bad value, and no engine
was built (the engines are replaced by a trap that fails the test if anything reaches them).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import scalemem
from scalemem import ConfigError, DataError, ScalememError
from scalemem._data import ArraySource, StoreWriter

# the modules, by name: the package scalemem._engine exports a function ``fit`` that hides its
# module ``fit`` from attribute access
_fit = importlib.import_module("scalemem._engine.fitting")
_engines = importlib.import_module("scalemem._engine.engines")

N, M, NV = 40, 3, 2
RNG = np.random.default_rng(0)
Q = RNG.standard_normal((N, M)).astype(np.float32)
X = RNG.standard_normal((N, NV)).astype(np.float32)


@pytest.fixture(autouse=True)
def no_compute(monkeypatch):
    """Validation must happen before any engine (and so any compute) exists."""

    def trap(*a, **k):
        raise AssertionError("an engine was built: validation did not stop the fit first")

    # build_engine (scalemem._engine.fitting) builds every engine from these two names
    for module in (_fit, _engines):
        monkeypatch.setattr(module, "ResidentEngine", trap)
        monkeypatch.setattr(module, "StreamedEngine", trap)


def _check(err: ScalememError, kind, field: str, shown: str) -> None:
    assert isinstance(err, ScalememError) and isinstance(err, kind), type(err)
    assert err.field == field
    assert field in str(err), str(err)
    assert shown in str(err), str(err)


# ---- in-memory fit ------------------------------------------------------------------------------

DATA_CASES = {
    # name: (keys, values, field, text that must appear in the message)
    "row counts differ": (Q, X[:25], "values", "25"),
    "keys 1-D": (Q[:, 0], X, "keys", "(40,)"),
    "values 3-D": (Q, X[None], "values", "(1, 40, 2)"),
    "object keys": (Q.astype(object), X, "keys", "object"),
    "complex values": (Q, X.astype(np.complex64), "values", "complex64"),
    "string keys": (Q.astype(str), X, "keys", "<U"),
    "bytes values": (Q, X.astype("S8"), "values", "S8"),
    "structured keys": (np.zeros(N, [("a", "f4"), ("b", "f4")])[:, None], X, "keys", "('a'"),
    "no rows": (Q[:0], X[:0], "keys", "(0, 3)"),
    "no value columns": (Q, X[:, :0], "values", "(40, 0)"),
    "a list": (Q.tolist(), X, "keys", "list"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_fit_refuses_bad_arrays(case):
    keys, values, field, shown = DATA_CASES[case]
    with pytest.raises(DataError) as e:
        scalemem.fit(keys, values, 2, steps=1)
    _check(e.value, DataError, field, shown)


CONFIG_CASES = {
    # name: (keyword arguments of fit, field, value shown)
    "no prototypes": (dict(prototypes=0), "prototypes", "0"),
    "negative prototypes": (dict(prototypes=-3), "prototypes", "-3"),
    "more prototypes than rows": (dict(prototypes=N + 1), "prototypes", str(N + 1)),
    "fractional prototypes": (dict(prototypes=2.5), "prototypes", "2.5"),
    "negative ridge": (dict(ridge=-1e-3), "ridge", "-0.001"),
    "NaN ridge": (dict(ridge=float("nan")), "ridge", "nan"),
    "infinite ridge": (dict(ridge=float("inf")), "ridge", "inf"),
    "zero chunk": (dict(chunk_rows=0), "chunk_rows", "0"),
    "negative chunk": (dict(chunk_rows=-8), "chunk_rows", "-8"),
    "negative steps": (dict(steps=-1), "steps", "-1"),
    "zero key scale": (dict(key_scale=0.0), "key_scale", "0.0"),
    "NaN value scale": (dict(value_scale=float("nan")), "value_scale", "nan"),
    "init of the wrong shape": (dict(init=np.zeros((3, 3))), "init", "(3, 3)"),
    "init with NaN": (dict(init=np.full((2, M), np.nan)), "init", "non-finite"),
    "unknown init": (dict(init="zeros"), "init", "zeros"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_fit_refuses_bad_settings(case):
    kw, field, shown = CONFIG_CASES[case]
    kw = {"prototypes": 2, "steps": 1, **kw}
    with pytest.raises(ConfigError) as e:
        scalemem.fit(Q, X, **kw)
    _check(e.value, ConfigError, field, shown)
    assert e.value.value is not None


def test_ridge_zero_and_prototypes_equal_to_rows_are_valid():
    """The edges of the valid ranges pass validation (they reach the engine, here the trap)."""
    with pytest.raises(AssertionError, match="an engine was built"):
        scalemem.fit(Q, X, N, steps=1, ridge=0.0, chunk_rows=1)


# ---- stores: open_source and fit_source -----------------------------------------------------------

ARRAYS = {
    "x": RNG.standard_normal((N, 6)).astype(np.float32),
    "short": np.ones((N - 10, 6), np.float32),
    "flat": np.ones(N, np.float32),
    "cube": np.ones((N, 2, 3), np.float32),
    "cplx": np.ones((N, 2), np.complex64),
    "text": np.array([["ab", "cd"]] * N, dtype="S2"),
    "cols": np.array([0, 9], np.int32),
}


@pytest.fixture(scope="module", params=["array", "hdf5", "zarr"])
def opener(request, tmp_path_factory):
    """``open_(**kw) -> Source`` for one backend over the arrays above (no default views)."""
    kind = request.param
    if kind == "array":
        def open_(keys=None, values=None, rows=None):
            return ArraySource.from_arrays(ARRAYS, keys=keys, values=values, rows=rows,
                                           name="memory-store")
    else:
        path = tmp_path_factory.mktemp(kind) / f"s.{kind}"
        with StoreWriter(path, kind) as w:
            for name, a in ARRAYS.items():
                if name == "text" and kind == "zarr":
                    continue  # zarr v3 fixed-width bytes are experimental; HDF5 covers strings
                w.write_array(name, a)
            w.meta.update(splits={"all": [0, N]})

        def open_(keys=None, values=None, rows=None):
            return scalemem.open_source(path, keys, values, rows)
    open_.kind = kind
    return open_


STORE_DATA_CASES = {
    # (keys, values, rows): (field, shown)
    ("x", "short", None): ("values", "30"),
    ("flat", "x", None): ("keys", "(40,)"),
    ("x", "cube", None): ("values", "(40, 2, 3)"),
    ("cplx", "x", None): ("keys", "complex64"),
    ("text", "x", None): ("keys", "S2"),
    ("missing", "x", None): (None, "'missing'"),
}


@pytest.mark.parametrize("keys,values,rows", STORE_DATA_CASES)
def test_open_source_refuses_bad_arrays(opener, keys, values, rows):
    field, shown = STORE_DATA_CASES[(keys, values, rows)]
    if keys == "text" and opener.kind == "zarr":
        # the Zarr store holds no string array (see the fixture): what must happen then is the
        # missing-array error, naming it
        field, shown = None, "'text'"
    with pytest.raises(DataError) as e:
        opener(keys=keys, values=values, rows=rows)
    assert shown in str(e.value)
    if field is not None:
        _check(e.value, DataError, field, shown)


STORE_CONFIG_CASES = {
    # (keys, values, rows): (field, value)
    ("x[6]", "x", None): ("keys", "x[6]"),
    ("x", "x[2:9]", None): ("values", "x[2:9]"),
    ("x[@cols]", "x", None): ("keys", "x[@cols]"),
    ("x[-7]", "x", None): ("keys", "x[-7]"),  # x has 6 columns: -1 … -6
    ("x", "x", "5:5"): ("rows", "5:5"),
    ("x", "x", "0:41"): ("rows", "0:41"),
    ("x", "x", "nosuchsplit"): ("rows", "nosuchsplit"),
}


@pytest.mark.parametrize("keys,values,rows", STORE_CONFIG_CASES)
def test_open_source_refuses_bad_selections(opener, keys, values, rows):
    field, value = STORE_CONFIG_CASES[(keys, values, rows)]
    with pytest.raises(ConfigError) as e:
        opener(keys=keys, values=values, rows=rows)
    _check(e.value, ConfigError, field, value)
    assert e.value.value == value


FIT_SOURCE_CASES = {
    "no prototypes": (dict(prototypes=0), "prototypes", "0"),
    "more prototypes than rows": (dict(prototypes=N + 1), "prototypes", str(N + 1)),
    "negative ridge": (dict(ridge=-1.0), "ridge", "-1.0"),
    "zero chunk": (dict(chunk_rows=0), "chunk_rows", "0"),
    "zero chunks per block": (dict(chunks_per_block=0), "chunks_per_block", "0"),
    "init of the wrong shape": (dict(init=np.zeros((2, 5))), "init", "(2, 5)"),
}


@pytest.mark.parametrize("case", FIT_SOURCE_CASES)
def test_fit_source_refuses_bad_settings(opener, case):
    kw, field, shown = FIT_SOURCE_CASES[case]
    src = opener(keys="x[0:2]", values="x")
    with pytest.raises(ConfigError) as e:
        scalemem.fit_source(src, **{"prototypes": 2, "steps": 1, **kw})
    _check(e.value, ConfigError, field, shown)


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_empty_store_is_a_data_error(tmp_path, fmt):
    """A store with no arrays (or an array with no rows) names the store and what is missing."""
    path = tmp_path / f"empty.{fmt}"
    with StoreWriter(path, fmt):
        pass
    with pytest.raises(DataError, match="no default keys view") as e:
        scalemem.open_source(path)
    assert str(path) in str(e.value)
    with pytest.raises(DataError, match="no array 'x'.*none") as e:
        scalemem.open_source(path, keys="x", values="x")
    assert str(path) in str(e.value)


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_array_without_rows_is_a_data_error(tmp_path, fmt):
    import h5py
    import zarr

    path = tmp_path / f"zero.{fmt}"
    if fmt == "zarr":
        zarr.open_group(str(path), mode="w").create_array("x", shape=(0, 3), dtype="f4")
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("x", shape=(0, 3), dtype="f4")
    with pytest.raises(DataError) as e:
        scalemem.open_source(path, keys="x", values="x")
    _check(e.value, DataError, "keys", "(0, 3)")
    assert str(path) in str(e.value)


def test_missing_chunks_option_is_checked(tmp_path):
    with pytest.raises(ConfigError) as e:
        scalemem.open_source(tmp_path / "whatever", missing_chunks="zeros")
    _check(e.value, ConfigError, "missing_chunks", "zeros")


class _OddSource:
    """A hand-written source whose declared dtype is not numeric."""

    name, rows, key_dim, value_dim = "odd", N, 2, 2
    key_dtype, value_dtype = np.dtype(np.float32), np.dtype(object)
    key_scale = value_scale = None

    def read(self, start, stop):  # pragma: no cover - never reached
        raise AssertionError("read before validation")


def test_fit_source_refuses_a_source_of_non_numeric_dtype():
    with pytest.raises(DataError) as e:
        scalemem.fit_source(_OddSource(), 2, steps=1)
    _check(e.value, DataError, "source.value_dtype", "object")
    assert "odd" in str(e.value)


def test_not_a_source_is_a_data_error():
    with pytest.raises(DataError, match="expected a scalemem Source.*ndarray"):
        scalemem.fit_source(Q, 2, steps=1)
