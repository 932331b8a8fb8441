"""The numerics core against one-shot references (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scalemem
from scalemem import _core
from scalemem._engine import normal_keys


def _data(N=1000, m=7, n=5, P=6, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    Q = rng.normal(size=(N, m)).astype(dtype)
    X = rng.normal(size=(N, n)).astype(dtype)
    K = (0.5 * rng.normal(size=(P, m))).astype(dtype)
    V = rng.normal(size=(P, n)).astype(dtype)
    return Q, X, K, V


def _prototype_loss(K, V, Q, X):
    """The seed article's loss, verbatim."""
    A = jax.nn.softmax(Q @ K.T, axis=1)
    return 0.5 * jnp.sum((X - A @ V) ** 2)


@pytest.mark.parametrize("chunk", [1, 7, 128, 333, 1000, 4096])
def test_chunked_stats_equal_one_shot(chunk):
    Q, X, K, _ = _data()
    with jax.enable_x64(True):
        A = np.asarray(jax.nn.softmax(jnp.asarray(Q) @ jnp.asarray(K).T, axis=1))
        Qb, Xb, wb = _core.to_blocks(Q, X, chunk)
        S = jax.jit(_core.scan_stats)(jnp.asarray(K), Qb, Xb, wb)
    # rtol 1e-12: both sides are float64 sums of ≤1000 terms of size O(1), rounding ≤ ~1e-13
    np.testing.assert_allclose(S.G, A.T @ A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(S.B, A.T @ X, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(S.xx, np.sum(X * X), rtol=1e-12)
    assert float(S.count) == len(Q)


# (P, n): P > n takes the (AV − X)Vᵀ form of ∂/∂A, P < n the A(VVᵀ) − XVᵀ form
SHAPES = [(6, 5), (4, 9)]


@pytest.mark.parametrize("P,n", SHAPES)
@pytest.mark.parametrize("chunk", [1, 64, 300, 999, 1000, 5000])
def test_chunked_gradient_equals_jax_grad(chunk, P, n):
    Q, X, K, V = _data(N=999, P=P, n=n)  # 999 rows: most chunk sizes leave a ragged last chunk
    with jax.enable_x64(True):
        ref = jax.grad(_prototype_loss)(*map(jnp.asarray, (K, V, Q, X)))
        Qb, Xb, wb = _core.to_blocks(Q, X, chunk)
        g = jax.jit(_core.scan_grad)(jnp.asarray(K), jnp.asarray(V), Qb, Xb, wb)
    # rtol 1e-8 (the acceptance bound): both are float64; they differ only in summation order
    np.testing.assert_allclose(g, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())


@pytest.mark.parametrize("P,n", SHAPES)
def test_centred_values_give_the_same_statistics_and_gradient(P, n):
    """The resident engine's layout: values stored centred per chunk (centre_values), no row
    weights, the last chunk shorter; statistics and gradient equal the one-shot references."""
    Q, X, K, V = _data(N=999, P=P, n=n)
    X = X + 3.0  # an offset, so the centring is not a no-op
    with jax.enable_x64(True):
        Qj, Xj, Kj, Vj = map(jnp.asarray, (Q, X, K, V))
        ref = jax.grad(_prototype_loss)(Kj, Vj, Qj, Xj)
        A = np.asarray(jax.nn.softmax(Qj @ Kj.T, axis=1))
        c, nb = 300, 3  # three chunks of 300 rows and one of 99
        Yb, mom, mu = jax.vmap(lambda x: _core.centre_values(x, dtype=jnp.float64))(
            Xj[:c * nb].reshape(nb, c, n))
        Qb = Qj[:c * nb].reshape(nb, c, -1)
        S = _core.scan_stats(Kj, Qb, Yb, None, moments=mom, centred=True)
        y, m1, mu1 = _core.centre_values(Xj[c * nb:], dtype=jnp.float64)
        S = _core.merge(S, _core.chunk_stats(Kj, Qj[c * nb:], y, moments=m1, centred=True))
        g = _core.scan_grad(Kj, Vj, Qb, Yb, None, centres=mu)
        g = _core.scan_grad(Kj, Vj, Qj[c * nb:][None], y[None], None, centres=mu1[None], init=g)
    # rtol 1e-12 / 1e-8 as in the tests above: float64 throughout, only the order of sums differs
    np.testing.assert_allclose(S.G, A.T @ A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(S.B, A.T @ X, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())


def test_loss_from_stats_equals_direct_loss():
    Q, X, K, V = _data()
    with jax.enable_x64(True):
        S = _core.chunk_stats(jnp.asarray(K), jnp.asarray(Q), jnp.asarray(X))
        direct = _prototype_loss(*map(jnp.asarray, (K, V, Q, X)))
        # rtol 1e-10: the expanded form cancels terms of size ~1e4 to a result of size ~1e4
        np.testing.assert_allclose(_core.loss_from_stats(S, V), direct, rtol=1e-10)


def test_merge_is_order_independent():
    Q, X, K, _ = _data()
    with jax.enable_x64(True):
        parts = [_core.chunk_stats(jnp.asarray(K), jnp.asarray(Q[a:a + 250]),
                                   jnp.asarray(X[a:a + 250])) for a in range(0, 1000, 250)]
        fwd = parts[0]
        for p in parts[1:]:
            fwd = _core.merge(fwd, p)
        rev = _core.merge(_core.merge(parts[3], parts[1]), _core.merge(parts[2], parts[0]))
    for a, b in zip(fwd, rev):
        np.testing.assert_allclose(a, b, rtol=1e-13)  # float64 re-association only


def test_solve_matches_lstsq_when_well_conditioned():
    rng = np.random.default_rng(1)
    A = rng.random((500, 8))
    A /= A.sum(1, keepdims=True)
    X = rng.normal(size=(500, 3))
    lam = 1e-3
    with jax.enable_x64(True):
        S = _core.Stats(jnp.asarray(A.T @ A), jnp.asarray(A.T @ X), jnp.asarray(0.0),
                        jnp.asarray(500.0))
        V, info = _core.solve_ridge(S, lam)
    # ridge = least squares on [A; √λ I] against [X; 0]
    Aa = np.vstack([A, np.sqrt(lam) * np.eye(8)])
    Xa = np.vstack([X, np.zeros((8, 3))])
    ref = np.linalg.lstsq(Aa, Xa, rcond=None)[0]
    # rtol 1e-9: cond(AᵀA+λI) is ~1e3 here, so two stable float64 solvers agree to ~1e-13·cond
    np.testing.assert_allclose(V, ref, rtol=1e-9, atol=1e-12)
    assert float(info.jitter) == 0 and not bool(info.fallback)


def test_solve_with_duplicate_prototypes_and_zero_ridge_is_finite():
    Q, X, K, _ = _data()
    K = np.vstack([K, K[:2]])  # two prototypes duplicated: G is exactly singular
    with jax.enable_x64(True):
        S = _core.chunk_stats(jnp.asarray(K), jnp.asarray(Q), jnp.asarray(X))
        V, info = _core.solve_ridge(S, 0.0)
        V = np.asarray(V)
        assert np.isfinite(V).all()
        assert info.needs_attention  # jitter, fallback, or a condition estimate above 1e12
        # the solution still fits: its loss is within 1e-9 relative of the lstsq optimum
        A = np.asarray(jax.nn.softmax(jnp.asarray(Q) @ jnp.asarray(K).T, axis=1))
        best = np.linalg.lstsq(A, X, rcond=None)[0]
        l_ref = 0.5 * np.sum((X - A @ best) ** 2)
        np.testing.assert_allclose(float(_core.loss_from_stats(S, V)), l_ref, rtol=1e-9)


@pytest.mark.parametrize("cond", [1e10, 1e16, np.inf])
def test_solve_never_nan_on_ill_conditioned_gram(cond):
    rng = np.random.default_rng(2)
    U, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    ev = np.geomspace(1.0, 1.0 / cond, 20) if np.isfinite(cond) else np.r_[np.ones(10), np.zeros(10)]
    G = (U * ev) @ U.T
    B = G @ rng.normal(size=(20, 4))
    with jax.enable_x64(True):
        V, info = _core.solve_ridge(_core.Stats(jnp.asarray(G), jnp.asarray(B), jnp.asarray(0.0),
                                                jnp.asarray(1.0)), 0.0)
    assert np.isfinite(np.asarray(V)).all()
    # the residual stays small relative to the data (≤1e-6: a solution, not garbage)
    assert np.linalg.norm(G @ np.asarray(V) - B) <= 1e-6 * np.linalg.norm(B)


def test_fit_warns_on_singular_gram_and_stays_finite():
    Q, X, _, _ = _data(N=200, P=4)
    K0 = np.zeros((4, Q.shape[1]))  # identical prototypes: G has rank 1
    with pytest.warns(scalemem.NumericsWarning, match="singular"):
        res = scalemem.fit(Q, X, 4, steps=3, ridge=0.0, init=K0, recipe="seed", dtype="float64")
    assert np.isfinite(np.asarray(res.memory.V)).all() and res.solve_events > 0


def _structured(N=1000, m=7, n=5, seed=0, dtype=np.float32):
    """Values that are a smooth function of the keys, so the fit has a signal to follow."""
    rng = np.random.default_rng(seed)
    Q = rng.normal(size=(N, m))
    X = np.tanh(Q @ rng.normal(size=(m, n)))
    return Q.astype(dtype), X.astype(dtype)


@pytest.mark.parametrize("chunks", [(64, 1000), (100, 333)])
def test_fit_is_independent_of_chunk_size(chunks):
    Q, X = _structured()
    r1, r2 = (scalemem.fit(Q, X, 6, steps=30, chunk_rows=c, learning_rate=1e-2, recipe="seed")
              for c in chunks)
    # float32 products: chunking only reorders sums (~1e-7 relative); 30 Adam steps amplify that
    # to ~1e-5 (measured 8e-6), so 1e-4 of the largest entry is float32 rounding, not a new fit
    for a, b in ((r1.memory.K, r2.memory.K), (r1.memory.V, r2.memory.V)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(np.asarray(a)).max())
    np.testing.assert_allclose(r1.loss, r2.loss, rtol=1e-4)


def test_float32_fit_tracks_float64_fit():
    """Shifted float32 chunk products + float64 sums follow the all-float64 fit."""
    Q, X = _structured()
    K0 = np.asarray(normal_keys(6, Q.shape[1]))
    r32 = scalemem.fit(Q, X, 6, steps=30, chunk_rows=64, learning_rate=1e-2, recipe="seed")
    r64 = scalemem.fit(Q.astype(np.float64), X.astype(np.float64), 6, steps=30, chunk_rows=64,
                       learning_rate=1e-2, init=K0.astype(np.float64), recipe="seed",
                       dtype="float64")
    # same bound and reason as the chunk-size test: float32 rounding amplified by Adam
    np.testing.assert_allclose(r32.memory.K, r64.memory.K, rtol=0,
                               atol=1e-4 * np.abs(np.asarray(r64.memory.K)).max())
    np.testing.assert_allclose(r32.loss, r64.loss, rtol=1e-4)


def test_fit_matches_prototype_in_float64():
    """scalemem's step equals the seed's step (solve V, Adam on ∂K at V) in float64."""
    Q, X, _, _ = _data(N=300, P=5)
    P, steps, lr = 5, 25, 1e-2
    res = scalemem.fit(Q, X, P, steps=steps, learning_rate=lr, chunk_rows=64, ridge=1e-6,
                       recipe="seed", dtype="float64")
    with jax.enable_x64(True):
        Qj, Xj = jnp.asarray(Q), jnp.asarray(X)
        K = normal_keys(P, Q.shape[1], 0, jnp.float64)
        opt = optax.adam(lr)
        st = opt.init(K)
        for _ in range(steps):
            A = jax.nn.softmax(Qj @ K.T, axis=1)
            V = jnp.linalg.solve(A.T @ A + 1e-6 * jnp.eye(P), A.T @ Xj)
            up, st = opt.update(jax.grad(_prototype_loss)(K, V, Qj, Xj), st, K)
            K = optax.apply_updates(K, up)
    # rtol 1e-7: identical maths in float64; the solvers differ (Cholesky vs LU), which Adam's
    # normalisation can amplify in early steps where gradients are ~0
    np.testing.assert_allclose(res.memory.K, K, rtol=1e-7, atol=1e-10)


def test_memory_is_a_jittable_differentiable_pytree():
    Q, X, K, V = _data(N=10, dtype=np.float32)
    mem = scalemem.Memory(jnp.asarray(K), jnp.asarray(V))
    out = jax.jit(lambda m, q: m.predict(q))(mem, Q)
    ref = jax.nn.softmax(Q @ K.T, axis=1) @ V
    np.testing.assert_allclose(out, ref, rtol=1e-5)  # float32 evaluation of the same expression
    g = jax.grad(lambda m: jnp.sum(m(Q) ** 2))(mem)
    assert g.K.shape == K.shape and np.isfinite(np.asarray(g.K)).all()


def test_predict_in_chunks_matches_predict():
    Q, X, K, V = _data(N=1001, dtype=np.float32)
    mem = scalemem.Memory(jnp.asarray(K), jnp.asarray(V))
    np.testing.assert_allclose(scalemem.predict_in_chunks(mem, Q, chunk_rows=100), mem(Q),
                               rtol=1e-6, atol=1e-6)  # same float32 ops, different batching


def test_large_logits_stay_finite():
    Q, X, K, V = _data()
    with jax.enable_x64(True):
        S = _core.chunk_stats(jnp.asarray(K * 1e4), jnp.asarray(Q), jnp.asarray(X))
        Qb, Xb, wb = _core.to_blocks(Q, X, 128)
        g = _core.scan_grad(jnp.asarray(K * 1e4), jnp.asarray(V), Qb, Xb, wb)
        Vs, _ = _core.solve_ridge(S, 1e-6)
    assert all(np.isfinite(np.asarray(a)).all() for a in (*S, g, Vs))


def test_core_needs_x64_and_says_so():
    with jax.enable_x64(False):
        with pytest.raises(RuntimeError, match="enable_x64"):
            _core.zero_stats(2, 2)


def test_resume_from_loop_state_is_bit_identical():
    from scalemem._engine import FitInterrupted, fit_engine
    from scalemem._engine.fitting import build_engine

    Q, X = _structured(N=500)
    opt = optax.adam(1e-2)
    full = scalemem.fit(Q, X, 5, steps=12, optimizer=opt, chunk_rows=128, recipe="seed")
    saved = []
    calls = iter(range(100))
    with jax.enable_x64(True):
        cfg = scalemem.FitConfig(prototypes=5, steps=12, optimizer="custom", chunk_rows=128,
                                 recipe="seed", residency="resident")
        eng = build_engine(scalemem.ArraySource(Q, X), cfg, optimizer=opt)
        K0 = normal_keys(5, Q.shape[1])
        with pytest.raises(FitInterrupted):
            fit_engine(eng, K0, opt, steps=12, checkpoint=saved.append, checkpoint_every=4,
                       should_stop=lambda: next(calls) >= 6)
        assert [s.step for s in saved] == [4, 7]  # every 4 steps, then at the stop after step 7
        st = saved[-1]
        res = fit_engine(eng, st.K, opt, steps=12, opt_state=st.opt_state, start_step=st.step,
                         history=(st.loss, st.rmse))
    np.testing.assert_array_equal(res.K, full.memory.K)  # bit-identical, not close
    # V is solved in float64; the fit hands it out in the compute dtype of K
    np.testing.assert_array_equal(np.asarray(res.V).astype(np.asarray(res.K).dtype),
                                  full.memory.V)
    np.testing.assert_array_equal(res.loss, full.loss)


@pytest.mark.parametrize("platform,budget,lo,hi", [("cpu", 16 << 20, 1024, 16384),
                                                   ("gpu", 512 << 20, 4096, 1 << 20)])
def test_default_chunk_rows_bounds_the_chunk_intermediate(platform, budget, lo, hi):
    # one c×P float32 intermediate stays within the platform's budget (16 MiB on a CPU, near
    # the caches; 512 MiB on an accelerator, where fewer, bigger chunks ran faster), the chunk
    # is a power of two between the platform's bounds, and it is the largest such power
    for P in (1, 2, 3, 64, 100, 256, 1000, 1024, 4096, 65536, 10 ** 6):
        c = _core.default_chunk_rows(P, platform)
        assert lo <= c <= hi and c & (c - 1) == 0
        assert c == lo or c * P * 4 <= budget
        assert c == hi or 2 * c * P * 4 > budget
    assert _core.default_chunk_rows(256) == _core.default_chunk_rows(256, "cpu") == 16384
