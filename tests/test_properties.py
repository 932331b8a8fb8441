"""Property-based tests (hypothesis): how the rows are cut into chunks, the order in which chunk
statistics are merged and how chunks are spread over devices do not matter beyond rounding, and
the chunked gradient equals the one-shot gradient for any chunk size.

Shapes are small and drawn from a few values so that JAX compiles a handful of programs, not one
per example. Data come from a NumPy generator seeded by hypothesis (fast to draw, reproducible
from the failure report).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scalemem import _core

CHUNK = 16  # every chunk is padded to this many rows (weight 0), so one compiled program
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def _problem(seed, rows, m, n, P, dtype):
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((rows, m)).astype(dtype)
    X = (3.0 + rng.standard_normal((rows, n))).astype(dtype)  # an offset, as real values have
    K = (rng.uniform(0.1, 2.0) * rng.standard_normal((P, m))).astype(dtype)
    V = rng.standard_normal((P, n))
    return Q, X, K, V


def _softmax64(Q, K):
    L = Q.astype(np.float64) @ K.astype(np.float64).T
    A = np.exp(L - L.max(axis=1, keepdims=True))
    return A / A.sum(axis=1, keepdims=True)


@jax.jit
def _chunk(K, q, x, w):
    return _core.chunk_stats(K, q, x, w)


def _stats_of_piece(K, Q, X, a, b):
    q = np.zeros((CHUNK, Q.shape[1]), Q.dtype)
    x = np.zeros((CHUNK, X.shape[1]), X.dtype)
    w = np.zeros((CHUNK,), Q.dtype)
    q[: b - a], x[: b - a], w[: b - a] = Q[a:b], X[a:b], 1
    return _chunk(jnp.asarray(K), q, x, w)


def _close(a, b, tol):
    """Entrywise, relative to the largest entry (small entries of G are sums of tiny products,
    so their own relative error is not the measure of a merge)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(np.abs(b).max(), 1e-300))


@st.composite
def chunked_problems(draw):
    P = draw(st.sampled_from([1, 2, 3, 5]))
    m = draw(st.sampled_from([1, 3]))
    n = draw(st.sampled_from([1, 2]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    pieces = draw(st.lists(st.integers(1, CHUNK), min_size=1, max_size=7))  # rows per chunk
    seed = draw(st.integers(0, 2**32 - 1))
    order = draw(st.permutations(range(len(pieces))))
    devices = draw(st.integers(1, 4))
    owner = draw(st.lists(st.integers(0, devices - 1), min_size=len(pieces),
                          max_size=len(pieces)))
    return P, m, n, dtype, pieces, seed, order, devices, owner


@SETTINGS
@given(chunked_problems())
def test_merge_is_independent_of_chunk_order_and_devices(problem):
    P, m, n, dtype, pieces, seed, order, devices, owner = problem
    rows = sum(pieces)
    Q, X, K, _ = _problem(seed, rows, m, n, P, dtype)
    cuts = np.cumsum([0, *pieces])
    with jax.enable_x64(True):
        parts = [_stats_of_piece(K, Q, X, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
        in_order = parts[0]
        for p in parts[1:]:
            in_order = _core.merge(in_order, p)
        # "devices": each merges the chunks it owns in a shuffled order, then the device
        # totals are merged, last device first
        totals = [_core.zero_stats(P, n) for _ in range(devices)]
        for i in order:
            totals[owner[i]] = _core.merge(totals[owner[i]], parts[i])
        shuffled = totals[-1]
        for t in reversed(totals[:-1]):
            shuffled = _core.merge(shuffled, t)
    # 1e-13: the chunk statistics are the same numbers, only their float64 sum is re-associated
    # (≤ 7 terms: a few ulps)
    for a, b in zip(shuffled, in_order):
        _close(a, b, 1e-13)
    assert float(in_order.count) == rows
    # and the merge equals the statistics of all rows at once, in float64: for float64 data
    # only rounding differs (1e-11: sums of ≤ 112 terms of size ≤ ~20); for float32 data the
    # chunk products round in float32 (u = 6e-8, ≤ 16 terms: 1e-5 leaves room)
    A = _softmax64(Q, K)
    X64 = X.astype(np.float64)
    tol = 1e-11 if dtype == np.float64 else 1e-5
    _close(in_order.G, A.T @ A, tol)
    _close(in_order.B, A.T @ X64, tol)
    _close(in_order.xx, np.sum(X64 * X64), 1e-12)  # float64 sums of exact products


@st.composite
def gradient_problems(draw):
    rows = draw(st.integers(1, 40))
    chunk = draw(st.integers(1, rows + 3))  # larger than the rows is allowed (one padded chunk)
    P = draw(st.sampled_from([2, 4]))
    seed = draw(st.integers(0, 2**32 - 1))
    return rows, chunk, P, seed


@SETTINGS
@given(gradient_problems())
def test_chunked_gradient_equals_one_shot(problem):
    rows, chunk, P, seed = problem
    Q, X, K, V = _problem(seed, rows, 3, 2, P, np.float64)
    # one shot, in NumPy: ∂/∂K ½‖X − AV‖² = dSᵀQ with dS = A ⊙ (R − rowsum(A ⊙ R)),
    # R = (AV − X)Vᵀ
    A = _softmax64(Q, K)
    R = (A @ V - X) @ V.T
    ref = (A * (R - np.sum(A * R, axis=1, keepdims=True))).T @ Q
    with jax.enable_x64(True):
        Qb, Xb, wb = _core.to_blocks(Q, X, chunk)
        g = _core.scan_grad(jnp.asarray(K), jnp.asarray(V), Qb, Xb, wb)
    # 1e-10: float64 throughout; chunking re-associates sums of ≤ 40 terms and centring V
    # changes the rounding of R by a few ulps of |V|²
    _close(g, ref, 1e-10)
