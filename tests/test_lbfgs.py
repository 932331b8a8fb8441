"""L-BFGS: its direction against optax's, its line search (monotone objective, two passes an
iteration when the first trial is accepted), convergence, resume and validation stopping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scalemem
from scalemem import ConfigError, FitConfig
from scalemem._core.lbfgs import lbfgs_direction, lbfgs_init
from scalemem._data import ArraySource
from scalemem._engine import fit_data


def _data(n=600, m=5, k=4, seed=0):
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((n, m))
    X = np.tanh(Q @ rng.standard_normal((m, k))) + 0.1 * rng.standard_normal((n, k))
    return Q, X


def test_direction_matches_optax_scale_by_lbfgs():
    """On a sequence of keys and gradients with positive curvature (a convex quadratic), the
    direction after the first equals −(optax's preconditioned gradient): the same two-loop
    recursion and initial scaling γ = sᵀy/yᵀy. Float64 throughout, so 1e-12 relative is a
    few ulps of the recursions' sums."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((12, 12))
    H = A @ A.T + 12 * np.eye(12)  # positive definite: every pair has sᵀy > 0
    grad = lambda K: jnp.asarray((H @ np.asarray(K).ravel()).reshape(3, 4))  # noqa: E731
    with jax.enable_x64(True):
        K = jnp.asarray(rng.standard_normal((3, 4)))
        ours, theirs = lbfgs_init(K, 4, 0.1), optax.scale_by_lbfgs(4).init(K)
        for it in range(9):  # more iterations than the memory holds: the ring buffer wraps
            g = grad(K)
            d, slope, ours = lbfgs_direction(ours, K, g)
            u, theirs = optax.scale_by_lbfgs(4).update(g, theirs, K)
            assert float(slope) < 0
            if it > 0:
                np.testing.assert_allclose(np.asarray(d), -np.asarray(u), rtol=1e-12,
                                           atol=1e-12 * float(jnp.abs(u).max()))
            K = K + 0.5 * d


def test_a_pair_of_negative_curvature_is_skipped():
    """sᵀy ≤ 0 (which a line search on values alone allows) leaves the memory as it was."""
    with jax.enable_x64(True):
        K0 = jnp.ones((2, 3))
        st = lbfgs_init(K0, 3, 0.1)
        _, _, st = lbfgs_direction(st, K0, jnp.ones((2, 3)))
        _, _, st2 = lbfgs_direction(st, K0 + 0.1, jnp.ones((2, 3)) - 1.0)  # sᵀy < 0
        assert int(st2.newest) == -1 and float(jnp.abs(st2.rho).max()) == 0.0
        _, _, st3 = lbfgs_direction(st2, K0 + 0.2, jnp.ones((2, 3)) + 1.0)  # sᵀy > 0
        assert int(st3.newest) == 0 and float(st3.rho[0]) > 0


def test_lbfgs_fit_decreases_the_objective_at_every_step_in_two_passes():
    """The Armijo line search accepts only decreases of the profiled objective
    (loss + ½λ‖V‖²); an iteration costs one gradient pass plus one statistics pass per trial;
    the statistics of an accepted trial are reused by the next step and by the final solve."""
    Q, X = _data()
    reports = []
    res = scalemem.fit(Q, X, 6, optimizer="lbfgs", init="normal", steps=25, dtype="float64",
                       learning_rate=0.1, relative_lr=False, callback=reports.append,
                       progress=False)
    obj = res.loss  # λ = 1e-6 and ‖V‖ ~ 1: the ridge term is 1e-6 of the loss
    assert np.all(np.diff(obj) <= 1e-6 * obj[:-1]), np.diff(obj)
    assert obj[-1] < 0.9 * obj[0]  # it moved (the loss falls by a third here)
    passes = [r.passes for r in reports]
    steps_cost = np.diff(passes[:-1])
    assert passes[0] >= 3 and np.all(steps_cost >= 2), passes  # grad + ≥ 1 trial
    assert np.mean(steps_cost == 2) >= 0.8, passes  # the first trial is usually accepted
    assert res.passes == passes[-1] == passes[-2], passes  # the final solve was the last trial
    assert res.config.optimizer == "lbfgs" and not res.converged


def test_lbfgs_beats_adam_in_passes():
    """At equal passes over the rows (Adam: 2 a step), L-BFGS's loss is lower: on this problem
    by far more than rounding (the check is strict inequality with a 1% margin)."""
    Q, X = _data(seed=1)
    common = dict(init="kmeans", steps=20, dtype="float64", progress=False)
    lb = scalemem.fit(Q, X, 8, optimizer="lbfgs", **common)
    ad = scalemem.fit(Q, X, 8, recipe="adam", **{**common, "steps": lb.passes // 2})
    assert ad.passes >= lb.passes - 2
    assert lb.loss[-1] < 0.99 * ad.loss[-1], (lb.loss[-1], ad.loss[-1])


def test_lbfgs_converges_and_stops_before_its_steps():
    """Where no step lowers the loss any more (a tiny problem run for many iterations), the fit
    ends with ``converged`` and fewer steps than asked."""
    Q, X = _data(n=40, m=1, k=1, seed=2)
    res = scalemem.fit(Q, X, 2, optimizer="lbfgs", init="normal", steps=500, dtype="float64",
                       progress=False)
    assert res.converged and len(res.loss) - 1 < 500, len(res.loss)
    assert np.isfinite(res.loss).all()


def test_lbfgs_resume_from_a_state_is_bit_identical():
    """A fit of 12 steps equals 5 steps continued from their state for the rest, bit for bit:
    the L-BFGS memory is in the state; the reused trial statistics are recomputed exactly."""
    Q, X = _data(seed=4)
    cfg = FitConfig(prototypes=5, optimizer="lbfgs", init="kmeans", steps=12)
    src = ArraySource(Q, X)
    full = fit_data(src, cfg)
    part = fit_data(src, FitConfig(**{**cfg.to_dict(), "steps": 5}))
    rest = fit_data(src, cfg, start=part.state)
    np.testing.assert_array_equal(np.asarray(rest.memory.K), np.asarray(full.memory.K))
    np.testing.assert_array_equal(np.asarray(rest.memory.V), np.asarray(full.memory.V))
    np.testing.assert_array_equal(rest.loss, full.loss)


def test_lbfgs_stops_on_validation_and_keeps_the_best_keys():
    """Few rows, many prototypes: L-BFGS overfits; with validation rows the fit stops once the
    validation RMSE has not improved for ``patience`` evaluations and keeps the best keys."""
    Q, X = _data(n=260, seed=5)
    res = scalemem.fit(Q, X, 40, optimizer="lbfgs", steps=300, val_rows=0.3, patience=3,
                       progress=False)
    assert res.stopped_early and res.best_step is not None
    vals = {v["step"]: v["rmse"] for v in res.validation}
    assert vals[res.best_step] == min(vals.values())
    assert max(vals) == res.best_step + 3  # stopped after `patience` worse evaluations


def test_lbfgs_settings_are_checked():
    with pytest.raises(ConfigError, match="one_pass"):
        FitConfig(optimizer="lbfgs", one_pass=True)
    with pytest.raises(ConfigError, match="lbfgs_memory"):
        FitConfig(optimizer="lbfgs", lbfgs_memory=0)


def test_lbfgs_streamed_equals_resident():
    """The line search runs on the host for both engines: streamed and resident rows take the
    same path, with the same passes. In float64 their statistics differ by summation order
    (~1e-15 relative; the resident engine centres the values per chunk); through 8 iterations of
    L-BFGS that became 7e-11 relative in the losses and 1.4e-9 in K (measured), so 1e-9 and
    1e-7 bound it while a wrong row or a different line-search decision would show at ~1e-3.
    (In float32 the two paths' roundings differ at 1e-7 and 8 iterations amplify them to
    ~1e-4 in K, for Adam to ~1e-5: float32 keys are compared with float32 reasoning elsewhere.)"""
    Q, X = _data(n=1000, seed=6)
    kw = dict(optimizer="lbfgs", init="kmeans", steps=8, dtype="float64", progress=False)
    src = ArraySource(Q, X)
    a = scalemem.fit_source(src, 6, residency="resident", **kw)
    b = scalemem.fit_source(src, 6, residency="streamed", chunk_rows=128, **kw)
    assert b.residency == "streamed"
    np.testing.assert_allclose(np.asarray(b.memory.K), np.asarray(a.memory.K), rtol=0,
                               atol=1e-7)
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-9)
    assert b.passes == a.passes


def test_the_initial_keys_search_hands_its_solve_to_lbfgs():
    """The logit-scale search solved at the keys it picks: an L-BFGS fit starts from that solve
    (no pass of its own for K₀), where Adam's fused step program makes its own; the search
    itself takes a handful of passes (3 candidates, a walk, 2 refinements)."""
    Q, X = _data(seed=7)
    kw = dict(init="kmeans", steps=0, dtype="float64", progress=False)
    lb = scalemem.fit(Q, X, 6, optimizer="lbfgs", **kw)
    ad = scalemem.fit(Q, X, 6, recipe="adam", **kw)
    assert lb.passes == ad.passes - 1
    assert 5 <= lb.passes <= 12, lb.passes
    np.testing.assert_array_equal(lb.loss, ad.loss)  # the same keys, the same solve


@pytest.mark.parametrize("lr", [1e-12, 1e9])
def test_a_first_step_far_off_scale_is_found_not_called_convergence(lr):
    """The first L-BFGS step is ``learning_rate`` (RMS of the key change): far too small, the
    line search grows it until the loss notices; far too large (saturated attention, a flat
    loss), it shrinks it tenfold a trial. Either way the fit goes on instead of stopping as
    "converged", and in 16 steps it lowers the loss at least half as much as the default rate
    does (measured: 96% and 136% of it; a fit stuck at its start would reach 0%)."""
    Q, X = _data(seed=8)
    kw = dict(optimizer="lbfgs", init="kmeans", steps=16, relative_lr=False, progress=False)
    ref = scalemem.fit(Q, X, 6, learning_rate=1e-2, **kw)
    res = scalemem.fit(Q, X, 6, learning_rate=lr, **kw)
    assert not res.converged, res.stop_reason
    assert res.loss[0] - res.loss[-1] >= 0.5 * (ref.loss[0] - ref.loss[-1]), (res.loss, ref.loss)


def test_lbfgs_refuses_a_schedule_and_adam_takes_the_adam_recipe():
    for field, value in (("schedule", "cosine"), ("warmup_steps", 3)):
        with pytest.raises(ConfigError, match=field):
            FitConfig(optimizer="lbfgs", **{field: value})
    cfg = FitConfig(optimizer="adam")  # the fast recipe with Adam: the adam recipe's settings
    adam = FitConfig(recipe="adam")
    assert (cfg.steps, cfg.learning_rate, cfg.schedule) == (adam.steps, adam.learning_rate,
                                                            adam.schedule)
    assert FitConfig().optimizer == "lbfgs" and FitConfig(recipe="seed").optimizer == "adam"


def test_a_float32_stall_says_float64_goes_further():
    """Duplicate prototypes and no ridge: float32 products stall L-BFGS far above the float64
    fit's loss; the stop reason says so (and a float64 fit's does not point to float64)."""
    rng = np.random.default_rng(4)
    Q = rng.standard_normal((600, 3)).astype(np.float32)
    X = np.tanh(Q @ rng.standard_normal((3, 2))).astype(np.float32)
    K0 = 0.5 * rng.standard_normal((4, 3))
    K0 = np.vstack([K0, K0[:2]]).astype(np.float32)  # prototypes 4, 5 duplicate 0, 1
    res = {}
    with pytest.warns(scalemem.NumericsWarning):
        for dt in ("float32", "float64"):
            res[dt] = scalemem.fit(Q, X, 6, steps=400, ridge=0.0, init=K0, optimizer="lbfgs",
                                   learning_rate=1e-2, dtype=dt, progress=False)
    assert res["float32"].converged and "--dtype float64" in res["float32"].stop_reason
    assert "--dtype float64" not in res["float64"].stop_reason
    # measured: 0.38 against 6.5e-4 (float32's products round at ~1e-7 of the values, which
    # the near-singular Gram matrix amplifies); 10× is far inside that gap
    assert res["float64"].loss[-1] < 0.1 * res["float32"].loss[-1]
