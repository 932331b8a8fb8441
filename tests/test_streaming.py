"""The block stream and the streaming engine: order, padding, read-ahead errors, early stop,
resume; the same fit from memory, HDF5 and Zarr; one-pass mode; streaming evaluation."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest

import scalemem
from scalemem._errors import ConfigError, DataError, NonFiniteDataError
from scalemem._data import READER_THREAD_NAME, ArraySource, ChunkStream, StoreWriter, open_source


def fit_source(source, prototypes, **settings):
    """The streaming engine: ``scalemem.fit_source`` with the rows streamed from the source."""
    return scalemem.fit_source(source, prototypes, residency="streamed", **settings)


class CountingSource:
    """Wraps a source, counting reads; ``fail_at`` makes reads from that row on fail."""

    def __init__(self, inner, fail_at: int | None = None):
        self.inner, self.fail_at, self.reads = inner, fail_at, 0
        for a in ("name", "rows", "key_dim", "value_dim", "key_dtype", "value_dtype",
                  "key_scale", "value_scale"):
            setattr(self, a, getattr(inner, a))

    def read(self, start, stop):
        self.reads += 1
        if self.fail_at is not None and start >= self.fail_at:
            raise DataError(f"chunk at row {start} is corrupted")
        return self.inner.read(start, stop)


def _reader_threads():
    return [t for t in threading.enumerate() if t.name == READER_THREAD_NAME and t.is_alive()]


def _data(n=1000):
    Q = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    X = np.arange(n * 2, dtype=np.int16).reshape(n, 2)
    return Q, X


# ---- the stream ------------------------------------------------------------------------------


def test_stream_order_and_padding():
    Q, X = _data()
    stream = ChunkStream(ArraySource(Q, X), chunk_rows=64, chunks_per_block=3)
    assert (stream.block_rows, stream.num_blocks) == (192, 6)  # 1000 = 5·192 + 40
    blocks = list(stream)
    assert [b.index for b in blocks] == list(range(6))
    assert [b.start for b in blocks] == [192 * i for i in range(6)]
    assert [b.rows for b in blocks] == [192] * 5 + [40]
    for b in blocks:
        assert b.Q.shape == (3, 64, 3) and b.X.shape == (3, 64, 2) and b.w.shape == (3, 64)
        assert b.Q.dtype == np.float32 and b.X.dtype == np.int16 and b.w.dtype == np.float32
        assert isinstance(b.Q, jax.Array)
    w = np.concatenate([np.asarray(b.w).ravel() for b in blocks])
    np.testing.assert_array_equal(w, np.r_[np.ones(1000), np.zeros(152)])
    q = np.concatenate([np.asarray(b.Q).reshape(-1, 3) for b in blocks])
    x = np.concatenate([np.asarray(b.X).reshape(-1, 2) for b in blocks])
    np.testing.assert_array_equal(q[:1000], Q)
    np.testing.assert_array_equal(x[:1000], X)
    assert not q[1000:].any() and not x[1000:].any()  # padding is zeros
    assert stream.cursor == 6 and not _reader_threads()


def test_reader_error_is_reraised_in_consumer():
    src = CountingSource(ArraySource(*_data()), fail_at=2 * 192)
    got = []
    with pytest.raises(DataError, match="row 384 is corrupted"):
        for b in ChunkStream(src, chunk_rows=64, chunks_per_block=3):
            got.append(b.index)
    assert got == [0, 1]
    assert not _reader_threads()


@pytest.mark.parametrize("how", ["break", "close"])
def test_early_stop_stops_the_reader(how):
    src = CountingSource(ArraySource(*_data(5000)))
    stream = ChunkStream(src, chunk_rows=10, chunks_per_block=1, prefetch=2)  # 500 blocks
    if how == "break":
        for b in stream:
            break
    else:
        it = iter(stream)
        next(it)
        it.close()
    assert not _reader_threads()
    # one block handed out, one device_put ahead, `prefetch` queued, one being read at most
    assert src.reads <= 5
    n = src.reads
    threading.Event().wait(0.2)  # the reader would have gone on within this time
    assert src.reads == n


def test_cursor_resumes_a_pass():
    Q, X = _data()
    src = ArraySource(Q, X)
    stream = ChunkStream(src, chunk_rows=100, chunks_per_block=2)  # 5 blocks
    first = []
    for b in stream:
        first.append(np.asarray(b.Q).reshape(-1, 3))
        if b.index == 1:
            break
    assert stream.cursor == 2
    rest = [np.asarray(b.Q).reshape(-1, 3) for b in stream]  # continues from the cursor
    assert stream.cursor == 5
    np.testing.assert_array_equal(np.concatenate(first + rest), Q)
    again = [b.index for b in ChunkStream(src, chunk_rows=100, chunks_per_block=2, start=3)]
    assert again == [3, 4]
    with pytest.raises(ConfigError):
        ChunkStream(src, chunk_rows=100, chunks_per_block=2, start=6)


# ---- fitting -----------------------------------------------------------------------------------

ROWS, P, STEPS = 3000, 8, 20
# chunk_rows=400 gives balanced chunks of 376 rows: 8 chunks, the last one with 8 padding rows;
# the seed recipe (0.01·normal keys, constant Adam) and float64 compute for the float64 data
FIT = dict(steps=STEPS, learning_rate=1e-2, chunk_rows=400, recipe="seed", dtype="float64")


def _synthetic(rows=ROWS, m=6, n=10, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((rows, 3))
    Q = Z @ rng.standard_normal((3, m)) + 0.1 * rng.standard_normal((rows, m))
    X = np.tanh(Z @ rng.standard_normal((3, n))) + 0.05 * rng.standard_normal((rows, n))
    return Q, X  # float64: the whole fit runs in float64


def _store(path, fmt, arrays, meta):
    with StoreWriter(path, fmt) as w:
        for name, a in arrays.items():
            aw = w.create_array(name, a.shape, a.dtype, chunk_rows=700)  # not a block multiple
            for s in range(0, a.shape[0], 1000):
                aw.append(a[s:s + 1000])
        w.meta.update(meta)
    return path


@pytest.fixture(scope="module")
def synthetic():
    Q, X = _synthetic()
    return Q, X, scalemem.fit(Q, X, P, **FIT)


@pytest.mark.parametrize("backend", ["array", "hdf5", "zarr"])
def test_streamed_fit_equals_in_memory_fit(synthetic, backend, tmp_path):
    Q, X, ref = synthetic
    if backend == "array":
        src = ArraySource(Q, X)
    else:
        meta = {"views": {"keys": "keys", "values": "values"}}
        src = open_source(_store(tmp_path / "s", backend, {"keys": Q, "values": X}, meta))
    res = fit_source(src, P, chunks_per_block=3, **FIT)  # 3 blocks, the last one padded
    assert (ref.residency, res.residency) == ("resident", "streamed")
    # Both engines sum in float64 chunk after chunk, but the resident one centres its values
    # per chunk once (and its last chunk is shorter) while the stream centres each chunk as it
    # arrives and pads the last block, so their sums differ by ~1e-16 rounding, amplified by
    # cond(G + λI) (up to ~1e9 here at ridge 1e-6 and near-uniform attention): measured ~1e-8
    # on K and V; 1e-6 is the stated requirement.
    np.testing.assert_allclose(res.memory.K, ref.memory.K, rtol=1e-6)
    np.testing.assert_allclose(res.memory.V, ref.memory.V, rtol=1e-6)
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-6)
    assert res.loss.shape == (STEPS + 1,) and res.loss[-1] < 0.8 * res.loss[0]


def test_uint8_views_scaled_on_device_equal_in_memory_fit(tmp_path):
    fmt = "zarr"  # the conformance suite shows both formats read the same uint8 views
    rng = np.random.default_rng(3)
    px = rng.integers(0, 256, (1500, 12), dtype=np.uint8)
    cols = np.array([7, 1, 4, 10], np.int32)
    path = tmp_path / "px"
    with StoreWriter(path, fmt) as w:
        w.create_array("pixels", px.shape, px.dtype, chunk_rows=512).append(px)
        w.write_array("key_columns", cols)
        w.meta.update(views={"keys": "pixels[@key_columns]/255", "values": "pixels/255"},
                      splits={"fit": [0, 1000]})
    src = open_source(path, rows="fit")
    kw = dict(steps=10, learning_rate=1e-2, chunk_rows=128, ridge=1e-3, recipe="seed")
    ref = scalemem.fit(px[:1000, cols], px[:1000], 6, key_scale=1 / 255, value_scale=1 / 255, **kw)
    res = fit_source(src, 6, chunks_per_block=3, **kw)
    assert res.memory.K.dtype == np.float32
    # the float64 fit from the same K0 is the yardstick of float32 rounding
    K0 = np.asarray(scalemem._engine.normal_keys(6, 4))
    r64 = scalemem.fit(px[:1000, cols] / 255.0, px[:1000] / 255.0, 6, init=K0.astype(np.float64),
                       dtype="float64", **kw)
    K64, Ks, Km = (np.asarray(r.memory.K, np.float64) for r in (r64, res, ref))
    scale = np.max(np.abs(K64))
    err32 = max(np.max(np.abs(K - K64)) for K in (Ks, Km)) / scale
    # The two float32 engines round differently (the resident one keeps its values centred and
    # has a shorter last chunk; the stream centres each chunk as it arrives and pads the last
    # with weight-0 rows), so they agree to float32 rounding, not bitwise: their difference is
    # at most twice what either is from float64 (measured: 8e-5 apart, each 5e-5 from float64),
    # and that envelope itself is float32-sized (< 1e-3 after 10 steps at lr 1e-2).
    assert err32 < 1e-3, err32
    assert np.max(np.abs(Ks - Km)) / scale <= 2 * err32
    # the losses are sums over all 1000 rows: a dropped or repeated row would move them ~1e-3
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-6)


def test_one_pass_reads_once_per_step_and_converges():
    Q, X = _synthetic(seed=1)
    init = np.random.default_rng(1).standard_normal((P, Q.shape[1]))  # peaked attention
    kw = dict(steps=30, learning_rate=1e-2, ridge=1e-3, chunk_rows=256, chunks_per_block=4,
              init=init, recipe="seed", dtype="float64")
    exact_src, lagged_src = CountingSource(ArraySource(Q, X)), CountingSource(ArraySource(Q, X))
    exact = fit_source(exact_src, P, **kw)
    lagged = fit_source(lagged_src, P, one_pass=True, **kw)
    blocks = 3  # 3000 rows in blocks of 1024
    assert exact_src.reads == blocks * (2 * 30 + 1)  # two passes a step, one final pass
    assert lagged_src.reads == blocks * (30 + 1 + 1)  # one a step, the first two, final one
    assert lagged.loss[0] == exact.loss[0]  # same K₀: same statistics pass
    assert np.all(np.diff(lagged.loss[5:]) < 0) and lagged.loss[-1] < 0.75 * lagged.loss[0]
    # With peaked attention V moves little per step and the lagged gradient tracks the exact
    # one: measured within 1% here; 5% bounds it without being tied to this data.
    np.testing.assert_allclose(lagged.loss, exact.loss, rtol=0.05)


def test_evaluate_source_matches_numpy(synthetic, tmp_path):
    Q, X, ref = synthetic
    m = ref.memory
    out = scalemem.evaluate(m, ArraySource(Q, X, name="q"), chunk_rows=700)  # 5 chunks, padded
    logits = Q @ np.asarray(m.K).T
    A = np.exp(logits - logits.max(1, keepdims=True))
    A /= A.sum(1, keepdims=True)
    sse = np.sum((X - A @ np.asarray(m.V)) ** 2)
    assert out["rows"] == ROWS
    # float64 throughout; the two computations differ only in summation order (~1e-16·ROWS)
    np.testing.assert_allclose(out["sse"], sse, rtol=1e-10)
    np.testing.assert_allclose(out["rmse"], np.sqrt(sse / X.size), rtol=1e-10)
    # the fit's own final RMSE comes from the statistics (xx − 2⟨V,B⟩ + ⟨V,GV⟩), which cancels
    # ~‖X‖²·1e-16 / sse ≈ 1e-14 relative: 1e-8 is far above that and far below any real error
    np.testing.assert_allclose(out["rmse"], ref.rmse[-1], rtol=1e-8)


def test_nonfinite_data_is_located(tmp_path):
    Q, X = _synthetic()
    X[1234, 3] = np.nan
    src = ArraySource.from_arrays({"q": Q, "vals": X}, keys="q", values="vals", rows="1000:3000",
                                  name="mem")
    with pytest.raises(NonFiniteDataError, match="row 1234 of array 'vals'") as e:
        fit_source(src, P, steps=2, chunk_rows=100, recipe="seed", dtype="float64")
    err = e.value
    assert (err.source, err.array, err.row, err.chunk) == ("mem", "vals", 234, 2)


def test_fit_source_validation():
    src = ArraySource(*_synthetic(rows=50))
    with pytest.raises(ConfigError, match="prototypes"):
        fit_source(src, 0, steps=1)
    with pytest.raises(ConfigError, match="prototypes"):
        fit_source(src, 51, steps=1)
    with pytest.raises(ConfigError, match="chunks_per_block"):
        fit_source(src, 4, steps=1, chunks_per_block=0)
    with pytest.raises(ConfigError, match="init"):
        fit_source(src, 4, steps=1, init=np.zeros((4, 2)))
    with pytest.raises(DataError, match="Source"):
        fit_source(np.zeros((5, 5)), 4, steps=1)
