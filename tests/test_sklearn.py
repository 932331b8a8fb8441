"""scikit-learn estimators (scalemem.sklearn): scikit-learn's own estimator checks, targets and
labels of every kind, pipelines, and a grid search over prototypes that compiles a fit once per
value even though the cross-validation folds differ in row count."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from sklearn.model_selection import GridSearchCV, KFold, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import scalemem  # noqa: E402
from scalemem._engine.engines import bucket_rows  # noqa: E402
from scalemem.sklearn import PROB_FLOOR, MemoryClassifier, MemoryRegressor  # noqa: E402

_TRACE, _COMPILE = ("/jax/core/compile/jaxpr_trace_duration",
                    "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def compiles():
    """The JAX functions traced or compiled while the block runs, one entry per event (as in
    tests/test_compile.py; a jit cache hit fires neither event)."""
    seen: list[str] = []

    def listener(name, duration, **kw):
        if name in (_TRACE, _COMPILE):
            seen.append(f"{name.rsplit('/', 1)[1]}:{kw.get('fun_name')}")

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# The programs a fit's steps run: Adam's one step program; L-BFGS's statistics pass (also the
# line search's trials) and gradient pass.
STEP_PROGRAMS = ("resident_step", "resident_final", "resident_grad")


def fit_compiles(seen) -> int:
    """XLA compilations of the fit's step program among ``seen``: the most compilations of any
    one of :data:`STEP_PROGRAMS` (each compiles once for a new shape)."""
    return max(sum(s.startswith("backend_compile_duration") and f"jit({name})" in s
                   for s in seen) for name in STEP_PROGRAMS)


# ---- scikit-learn's estimator checks -----------------------------------------------------------
# Small prototypes and steps: every check fits new shapes, and a compilation costs seconds.
@parametrize_with_checks([MemoryRegressor(prototypes=8, steps=3),
                          MemoryClassifier(prototypes=8, steps=3)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_parameters_are_the_fit_settings():
    fields = {f.name: f.default for f in dataclasses.fields(scalemem.FitConfig)}
    for cls in (MemoryRegressor, MemoryClassifier):
        assert cls().get_params() == {**fields, "key_scale": None, "val_rows": None, "verbose": False}
        est = cls(prototypes=0, ridge=-1.0)  # stored unchanged, refused by fit
        assert (est.prototypes, est.ridge) == (0, -1.0)
        with pytest.raises(scalemem.ConfigError, match="prototypes"):
            est.fit(np.zeros((5, 2)), np.arange(5) % 2)
        with pytest.raises(TypeError, match="learnig_rate"):
            cls(learnig_rate=1e-3)
        assert "*, prototypes=64" in str(inspect.signature(cls))


def test_importing_scalemem_does_not_import_sklearn():
    code = "import sys, scalemem; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _regression(rows=300, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, (rows, 3))
    Y = np.stack([np.sin(X[:, 0]) + X[:, 1] ** 2, X[:, 2] * X[:, 0]], axis=1)
    return X, Y


def test_regressor_targets_1d_and_2d():
    X, Y = _regression()
    settings = dict(prototypes=24, steps=10)
    one = MemoryRegressor(**settings).fit(X, Y[:, 0])
    column = MemoryRegressor(**settings).fit(X, Y[:, :1])
    both = MemoryRegressor(**settings).fit(X, Y)
    p1, pc, p2 = one.predict(X), column.predict(X), both.predict(X)
    assert p1.shape == (300,) and pc.shape == (300, 1) and p2.shape == (300, 2)
    assert (one.n_outputs_, column.n_outputs_, both.n_outputs_) == (1, 1, 2)
    assert p1.dtype == np.float64
    # the same fit (same data, settings and program): the same numbers
    np.testing.assert_array_equal(p1, pc[:, 0])
    # the estimator's fit is scalemem.fit's; 1e-5: float32 round-off of the same prediction in
    # a padded chunk and in Memory.predict's own program (a few ulp of 6e-8 on values ~1)
    direct = scalemem.fit(X, Y, 24, steps=10).memory.predict(X)
    np.testing.assert_allclose(p2, np.asarray(direct), rtol=1e-5, atol=1e-5)
    assert one.score(X, Y[:, 0]) > 0.8  # sin + square of 300 rows, 24 prototypes: about 0.95
    assert one.prototypes_ == 24 and one.loss_ == pytest.approx(one.loss_curve_[-1])


def test_float64_fit_predicts_in_float64():
    X, Y = _regression()
    reg = MemoryRegressor(prototypes=24, steps=5, dtype="float64").fit(X, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # JAX warns when it truncates float64 to float32
        pred = reg.predict(X)
    with jax.enable_x64(True):
        direct = np.asarray(reg.memory_.predict(X))
    # 1e-12: the same float64 products in two programs differ by round-off (~1e-16 relative);
    # a float32 truncation would differ by ~1e-7
    np.testing.assert_allclose(pred, direct, rtol=1e-12, atol=1e-12)


def test_more_prototypes_than_rows_uses_one_per_row():
    X, Y = _regression(rows=12)
    reg = MemoryRegressor(prototypes=64, steps=3).fit(X, Y)
    assert reg.prototypes_ == 12 and reg.memory_.prototypes == 12


def _blobs(rows=240, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    return centres[labels] + rng.standard_normal((rows, 2)), labels


def test_classifier_string_and_integer_labels():
    X, y = _blobs()
    names = np.array(["cat", "dog", "eel"])  # sorted as 0, 1, 2: the same one-hot columns
    ints = MemoryClassifier(prototypes=12, steps=10).fit(X, y)
    strs = MemoryClassifier(prototypes=12, steps=10).fit(X, names[y])
    assert list(ints.classes_) == [0, 1, 2] and list(strs.classes_) == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(ints.predict_proba(X), strs.predict_proba(X))
    np.testing.assert_array_equal(names[ints.predict(X)], strs.predict(X))
    # blobs 4 standard deviations apart: a Bayes accuracy of about 0.98
    assert strs.score(X, names[y]) > 0.9
    shifted = MemoryClassifier(prototypes=12, steps=10).fit(X, y + 7)  # labels 7, 8, 9
    np.testing.assert_array_equal(shifted.predict(X), ints.predict(X) + 7)


def test_predict_proba_is_the_clipped_renormalised_recall():
    X, y = _blobs()
    clf = MemoryClassifier(prototypes=12, steps=10).fit(X, y)
    p = clf.predict_proba(X)
    assert p.shape == (240, 3)
    # 1e-12: a float64 division of three numbers by their sum rounds by a few 1e-16
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    # clipped to [1e-7, 1] then divided by a sum of 3 such entries (≤ 3); the raw recall of a
    # least-squares fit has negative entries, which only the clipping lifts
    assert p.min() >= PROB_FLOOR / 3 and np.asarray(clf.memory_.predict(X)).min() < 0
    onehot = np.eye(3, dtype=np.float32)[y]
    ref = scalemem.evaluate(clf.memory_, X, onehot, labels=True)
    # scalemem's eval log-loss clips and renormalises the same recall; 1e-5: float32 round-off
    # of the recall in its program and in the estimator's (a few ulp of 6e-8, relative)
    np.testing.assert_allclose(-np.log(p[np.arange(240), y]).mean(), ref["log_loss"], rtol=1e-5)
    assert np.mean(clf.predict(X) == y) == pytest.approx(ref["accuracy"])


def test_pipeline_and_cross_val_score():
    X, Y = _regression(rows=600)
    pipe = make_pipeline(StandardScaler(), MemoryRegressor(prototypes=32, steps=10))
    scores = cross_val_score(pipe, X * 1000.0, Y[:, 0], cv=3)
    assert scores.shape == (3,)
    assert np.all(scores > 0.8), scores  # held-out R² of about 0.95 on this smooth target
    X, y = _blobs()
    acc = cross_val_score(make_pipeline(StandardScaler(), MemoryClassifier(prototypes=12,
                                                                            steps=10)), X, y)
    assert np.all(acc > 0.9), acc  # see test_classifier_string_and_integer_labels


def test_bucket_rows():
    for n in [1, 7, 8, 9, 511, 512, 513, 6666, 6667, 10**6 + 1]:
        b = bucket_rows(n)
        assert n <= b < max(n * (1 + 1 / 32), n + 8), (n, b)
    assert bucket_rows(6666) == bucket_rows(6667) == 6784  # the folds of 10000 rows, cv=3


class _Logged(MemoryRegressor):
    """Records, for each fit and score, the prototypes, the rows and the JAX compilations."""

    log: list = []

    def fit(self, X, y):
        with compiles() as seen:
            super().fit(X, y)
        self.log.append(("fit", self.prototypes, len(X), seen))
        return self

    def score(self, X, y, sample_weight=None):
        with compiles() as seen:
            out = super().score(X, y, sample_weight)
        self.log.append(("score", self.prototypes, len(X), seen))
        return out


def _check_grid_compiles(X, Y, grid, **settings):
    """GridSearchCV over ``grid`` prototypes, cv=3 on folds of unequal row counts: per value
    of P the first fold's fit compiles the step program once (the counter works: the caches were
    cleared), the other folds' fits and scores compile nothing at all; the refit on all rows (a
    new row count) compiles at most once more."""
    assert len(X) % 3, "folds of unequal row counts"
    jax.clear_caches()
    _Logged.log = []
    search = GridSearchCV(_Logged(**settings), {"prototypes": grid}, cv=KFold(3)).fit(X, Y)
    for P in grid:
        fits = [e for e in _Logged.log if e[0] == "fit" and e[1] == P and e[2] < len(X)]
        scores = [e for e in _Logged.log if e[0] == "score" and e[1] == P]
        assert len(fits) == 3 == len(scores) and len({e[2] for e in fits}) == 2
        assert fit_compiles(fits[0][3]) == 1, (P, fits[0][3])
        for e in fits[1:] + scores[1:]:
            assert e[3] == [], (P, e[:3], e[3][:6])
    refit = [e for e in _Logged.log if e[0] == "fit" and e[2] == len(X)]
    assert len(refit) == 1 and fit_compiles(refit[0][3]) <= 1
    return search


def test_grid_search_compiles_once_per_prototypes():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((1000, 7))  # 7 key and 5 value columns: shapes no other test fits
    Y = np.tanh(X[:, :5] @ rng.standard_normal((5, 5)))
    _check_grid_compiles(X, Y, [4, 8, 16], steps=4)


@pytest.mark.slow
def test_grid_search_fashion_mnist_compiles_once_per_prototypes(fmnist_dir):
    from scalemem.datasets.fashion_mnist import reference_split

    Qf, Xf, _, _ = reference_split(fmnist_dir, "fit10k", "test60k")
    assert Qf.shape == (10000, 78) and Xf.shape == (10000, 784)
    search = _check_grid_compiles(Qf, Xf, [32, 64, 128])
    # the fits are real: held-out R² of the best P measured 0.63 (a constant recall scores ~0)
    assert search.best_score_ > 0.5


def test_early_stopping_on_a_held_out_fraction():
    """val_rows holds out the last rows; with patience the kept keys are the best validated."""
    rng = np.random.default_rng(3)
    X = rng.uniform(-2, 2, (600, 3))
    y = np.sin(X[:, 0]) + X[:, 1] ** 2
    est = MemoryRegressor(prototypes=8, recipe="seed", steps=60, learning_rate=0.05,
                          val_rows=0.2, patience=3).fit(X, y)
    vals = est.validation_
    assert vals and est.best_step_ == min(vals, key=lambda v: v["rmse"])["step"]
    assert est.loss_curve_.shape[0] <= 61  # it may stop before the 60 steps
