"""The read-ahead stream's pool of host buffers: a pooled block is overwritten only when nothing
refers to it (the consumer's arrays and views, XLA's hold on an array it aliases and computes
on), blocks stay right however many the consumer keeps, and a fit through the streamed engine
is bit for bit the same with and without the pool."""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scalemem
from scalemem._data import READER_THREAD_NAME, ArraySource, ChunkStream
from scalemem._data import buffers as buffers_mod
from scalemem._engine import engines


def _reader_threads():
    return [t for t in threading.enumerate() if t.name == READER_THREAD_NAME and t.is_alive()]


def _data(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((n, 5)).astype(np.float32)
    X = rng.integers(0, 256, (n, 7), dtype=np.uint8)
    return Q, X


def _check(block, Q, X, stream):
    """``block`` holds rows ``start … start+rows-1`` of (Q, X), zero rows after them."""
    B = stream.block_rows
    q = np.asarray(block.Q).reshape(B, -1)
    x = np.asarray(block.X).reshape(B, -1)
    w = np.asarray(block.w).reshape(B)
    s, n = block.start, block.rows
    np.testing.assert_array_equal(q[:n], Q[s:s + n])
    np.testing.assert_array_equal(x[:n], X[s:s + n])
    np.testing.assert_array_equal(w, np.r_[np.ones(n), np.zeros(B - n)])
    assert not q[n:].any() and not x[n:].any()


# ---- the reference count that decides reuse ------------------------------------------------------


def test_host_block_is_in_use_while_anything_refers_to_it():
    parts = (((64, 5), np.dtype(np.float32)), ((64, 7), np.dtype(np.uint8)),
             ((64,), np.dtype(np.float32)))
    hb = buffers_mod.HostBlock(parts)
    assert not hb.in_use()
    Q, X, w = hb.arrays()
    assert all(a.ctypes.data % 64 == 0 and a.flags.c_contiguous for a in (Q, X, w))
    assert hb.in_use()
    del X, w
    view = Q.reshape(4, 16, 5)[1:]  # a view of a view: still refers to the owner
    del Q
    assert hb.in_use()
    del view
    assert not hb.in_use()
    # a device array on the CPU aliases the host memory: XLA holds the host array until the
    # device array and every computation using it are gone
    Q = hb.arrays()[0]
    d = jax.device_put(Q, jax.devices("cpu")[0])
    del Q
    assert hb.in_use()
    r = jnp.sum(d * 2)
    del d
    r.block_until_ready()
    buffers_mod._collect_garbage()  # what the pool does before it waits
    assert not hb.in_use()


# ---- blocks stay right however many the consumer keeps ---------------------------------------


@pytest.mark.parametrize("to_device", [True, False])
def test_kept_blocks_keep_their_rows(to_device):
    Q, X = _data()
    # 2000 rows in blocks of 3·40 = 120: 17 blocks, the last with 80 rows; 3 pooled buffers
    stream = ChunkStream(ArraySource(Q, X), chunk_rows=40, chunks_per_block=3, buffers=3,
                         to_device=to_device)
    first = list(stream)  # keeps every block of the pass
    stream.rewind()
    second = list(stream)  # and a second pass while the first is kept
    assert [b.index for b in first] == list(range(17)) == [b.index for b in second]
    for b in first + second:
        _check(b, Q, X, stream)
    st = stream.buffer_stats()
    assert st["allocated"] <= 3 and st["extra"] >= 34 - 3  # the kept blocks were never reused
    assert not _reader_threads()


@pytest.mark.parametrize("window", [1, 4, 12])
def test_sliding_window_consumer_sees_right_rows(window):
    """A consumer keeping its last ``window`` blocks (a window wider than the pool included)
    checks each block when it leaves the window: no block is overwritten while kept."""
    Q, X = _data(6000, seed=1)
    # verify=False: no CRC check holding blocks, so a consumer keeping one block needs no more
    # than the pool (with the checker that depends on how far behind it runs)
    stream = ChunkStream(ArraySource(Q, X), chunk_rows=50, chunks_per_block=2, prefetch=2,
                         verify=False)
    for _ in range(3):
        stream.rewind()
        kept = []
        for b in stream:
            kept.append(b)
            if len(kept) > window:
                _check(kept.pop(0), Q, X, stream)
        for b in kept:
            _check(b, Q, X, stream)
        del kept, b
    st = stream.buffer_stats()
    assert st["capacity"] == 2 + buffers_mod.SPARE_BUFFERS
    assert st["allocated"] <= st["capacity"]  # 3 passes of 60 blocks in at most 5 buffers
    if window == 1:
        assert st["extra"] == 0  # a consumer that lets go of its blocks never needs more


def test_computations_in_flight_keep_their_blocks():
    """On a CPU device the blocks alias the pooled host memory: each block is handed to a slow
    computation that reads it throughout, and dropped at once; the results equal those of the
    same computation on copies, so no buffer was refilled while a computation still read it."""
    Q, X = _data(4000, seed=2)

    @jax.jit
    def slow(Xb, Qb):
        x = Xb.reshape(-1, Xb.shape[-1]).astype(jnp.float32)
        q = Qb.reshape(-1, Qb.shape[-1])

        def body(i, a):  # reads rows of the block on every iteration
            return a * 0.999 + jnp.sum(jnp.tanh(x[i % x.shape[0]] / 255.0 + a)) + q[i % 7, 0]

        return jax.lax.fori_loop(0, 3000, body, jnp.float32(0))

    stream = ChunkStream(ArraySource(Q, X), chunk_rows=100, chunks_per_block=2, prefetch=1,
                         buffers=2)
    out = {}
    for b in stream:
        out[b.index] = (b.start, b.rows, slow(b.X, b.Q))  # dispatched, not waited for
    B = stream.block_rows
    for i, (s, n, r) in out.items():
        x, q = np.zeros((B, 7), np.uint8), np.zeros((B, 5), np.float32)
        x[:n], q[:n] = X[s:s + n], Q[s:s + n]
        want = slow(jnp.array(x.reshape(2, 100, 7)), jnp.array(q.reshape(2, 100, 5)))
        assert np.asarray(r) == np.asarray(want), i


def test_early_stop_while_the_reader_waits_for_a_buffer():
    Q, X = _data()
    stream = ChunkStream(ArraySource(Q, X), chunk_rows=10, chunks_per_block=1, buffers=1)
    kept = []
    for b in stream:
        kept.append(b)  # the one pooled buffer stays in use: the reader waits, then allocates
        if len(kept) == 3:
            break
    assert not _reader_threads()
    for b in kept:
        _check(b, Q, X, stream)


def test_source_reading_other_dtypes_than_declared():
    """A source whose reads do not have its declared dtypes gets new arrays (as without the
    pool), with the dtypes read."""
    Q, X = _data(500)
    inner = ArraySource(Q, X)

    class Other:
        name, rows, key_dim, value_dim = "other", inner.rows, inner.key_dim, inner.value_dim
        key_dtype, value_dtype = np.dtype(np.float64), inner.value_dtype
        key_scale = value_scale = None

        def read(self, s, e):
            return inner.read(s, e)

    blocks = list(ChunkStream(Other(), chunk_rows=64, chunks_per_block=2, to_device=False))
    assert all(b.Q.dtype == np.float32 for b in blocks)
    stream = ChunkStream(inner, chunk_rows=64, chunks_per_block=2)
    for b in blocks:
        _check(b, Q, X, stream)


# ---- a fit through the streamed engine -----------------------------------------------------------


class _Recording(ChunkStream):
    made: list = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        _Recording.made.append(self)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_streamed_fit_is_bitwise_the_same_with_and_without_the_pool(monkeypatch, dtype):
    rng = np.random.default_rng(5)
    Z = rng.standard_normal((3000, 3))
    Q = (Z @ rng.standard_normal((3, 6)) + 0.1 * rng.standard_normal((3000, 6))).astype(dtype)
    X = (np.tanh(Z @ rng.standard_normal((3, 10)))).astype(dtype)
    # blocks of 2 chunks of 100 rows: 15 blocks a pass, 7 passes, through 5 pooled buffers
    kw = dict(residency="streamed", steps=3, init="normal", seed=0, chunk_rows=100,
              chunks_per_block=2, dtype=dtype, recipe="seed", learning_rate=1e-2)
    _Recording.made = []
    monkeypatch.setattr(engines, "ChunkStream", _Recording)
    pooled = scalemem.fit_source(ArraySource(Q, X), 8, **kw)
    (stream,) = _Recording.made
    st = stream.buffer_stats()
    assert 2 <= st["allocated"] <= st["capacity"] == 5
    monkeypatch.setattr(engines, "ChunkStream", functools.partial(ChunkStream, buffers=0))
    fresh = scalemem.fit_source(ArraySource(Q, X), 8, **kw)
    # the same rows in the same order and layout: the same bits
    np.testing.assert_array_equal(pooled.memory.K, fresh.memory.K)
    np.testing.assert_array_equal(pooled.memory.V, fresh.memory.V)
    np.testing.assert_array_equal(pooled.loss, fresh.loss)
    if dtype == "float64":  # and the resident fit, within test_streaming.py's tolerance
        ref = scalemem.fit_source(ArraySource(Q, X), 8, **{**kw, "residency": "resident"})
        np.testing.assert_allclose(pooled.memory.K, ref.memory.K, rtol=1e-6)
        np.testing.assert_allclose(pooled.memory.V, ref.memory.V, rtol=1e-6)
        np.testing.assert_allclose(pooled.loss, ref.loss, rtol=1e-6)
