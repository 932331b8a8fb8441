"""scikit-learn estimators: :class:`MemoryRegressor` and :class:`MemoryClassifier`.

Both fit a :class:`scalemem.Memory` with :func:`scalemem.fit`. Their parameters are the
settings of :class:`scalemem.FitConfig` (same names, same defaults: the signature is made from
its fields, so the two cannot drift apart) plus ``key_scale`` (multiplies ``X`` on the device,
e.g. 1/255 for ``uint8`` pixels, which then stay one byte a pixel there). As scikit-learn asks,
``__init__`` stores the parameters unchanged and ``fit`` validates them (a bad setting raises
:class:`scalemem.ConfigError`, a ``ValueError``).

Fits of nearby row counts (the folds of a cross-validation) share their compiled programs (see
``bucket_rows`` in the engine), so ``GridSearchCV`` over ``prototypes`` compiles a fit once per
value. This module imports scikit-learn (``pip install scalemem[sklearn]``); ``import scalemem``
does not.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, MultiOutputMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d

import scalemem

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # scikit-learn 1.3 - 1.5
    def _validate_data(estimator, *args, **kwargs):
        return estimator._validate_data(*args, **kwargs)

__all__ = ["MemoryRegressor", "MemoryClassifier", "PROB_FLOOR"]

# predict_proba clips to [PROB_FLOOR, 1] and renormalises, as scalemem.evaluate's log-loss does
PROB_FLOOR = 1e-7

# name -> default: every FitConfig setting, then the estimators' own parameters
PARAMETERS = {**{f.name: f.default for f in dataclasses.fields(scalemem.FitConfig)},
              "key_scale": None, "val_rows": None, "verbose": False}


def _init(self, **params):
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument "
                        f"{unknown[0]!r}")
    for name, default in PARAMETERS.items():
        setattr(self, name, params.get(name, default))


# scikit-learn reads the parameters (get_params, clone, repr) from the signature of __init__
_init.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
       for name, default in PARAMETERS.items()])


def _keys(X: np.ndarray) -> np.ndarray:
    """Keys as the engine takes them: floats, and integers of at most 16 bits (exact in float32;
    converted on the device); other integers and booleans become float64."""
    small_int = X.dtype.kind in "iu" and X.dtype.itemsize <= 2
    return X if X.dtype.kind == "f" or small_int else X.astype(np.float64)


class _MemoryEstimator(BaseEstimator):
    """What both estimators share: the parameters, the fit of the memory and its prediction."""

    __init__ = _init

    def _fit_memory(self, X, Y: np.ndarray) -> None:
        settings = self.get_params(deep=False)
        progress = bool(settings.pop("verbose"))
        prototypes = scalemem.FitConfig(prototypes=settings.pop("prototypes")).prototypes
        # More prototypes than rows: fit one per row instead of failing. With P >= N rows the
        # memory can already recall every row, so further prototypes add nothing but a singular
        # Gram matrix; failing instead would make a grid over `prototypes` break on small folds
        # and scikit-learn's checks (which fit a few rows) fail. The value used is recorded in
        # `prototypes_`.
        self.prototypes_ = min(prototypes, X.shape[0])
        if settings["val_rows"] is None:
            del settings["val_rows"]
        result = scalemem.fit(_keys(X), Y, self.prototypes_, progress=progress, **settings)
        at = -1 if result.best_step is None else result.best_step  # the keys kept
        self.memory_ = result.memory
        self.config_ = result.config
        self.loss_ = float(result.loss[at])
        self.loss_curve_ = np.asarray(result.loss)
        self.rmse_ = float(result.rmse[at])
        self.best_step_ = result.best_step
        self.validation_ = result.validation
        self.fit_seconds_ = float(result.seconds)
        self.residency_ = result.residency

    def _recall(self, X) -> np.ndarray:
        """The memory's values for rows ``X`` (validated against the fit's features)."""
        check_is_fitted(self, "memory_")
        X = _validate_data(self, X, reset=False, dtype="numeric")
        return scalemem.predict_in_chunks(self.memory_, _keys(X)).astype(np.float64)


class MemoryRegressor(MultiOutputMixin, RegressorMixin, _MemoryEstimator):
    """Differentiable-memory regression: ``predict(X) = Vᵀ softmax(K x)`` for each row ``x``,
    ``K`` and ``V`` fitted by :func:`scalemem.fit` to minimise the squared error.

    Parameters: the settings of :class:`scalemem.FitConfig` (``prototypes=64``, ``recipe=
    "fast"``, ``steps``, ``seed``, ``ridge``, ``patience``, ...), ``key_scale``, ``val_rows``
    (a fraction of the rows, from their end, held out to stop early: ``patience``) and
    ``verbose`` (progress of each fit). ``y`` may be 1-D (then
    :meth:`predict` returns 1-D) or 2-D (one column per output). Predictions are float64
    (scikit-learn's convention), computed in ``dtype``.

    Fitted attributes: ``memory_`` (:class:`scalemem.Memory`), ``prototypes_`` (prototypes used:
    ``min(prototypes, n_samples)``), ``n_features_in_``, ``n_outputs_``, ``loss_`` (final
    ½Σ‖y − ŷ‖²), ``loss_curve_`` (per step), ``rmse_``, ``fit_seconds_``, ``config_`` (the
    resolved :class:`scalemem.FitConfig`), ``residency_``.
    """

    def fit(self, X, y):
        X, y = _validate_data(self, X, y, dtype="numeric", multi_output=True, y_numeric=True)
        self._y_1d = y.ndim == 1
        Y = y.reshape(-1, 1) if self._y_1d else y
        self.n_outputs_ = Y.shape[1]
        self._fit_memory(X, Y if Y.dtype.kind == "f" else Y.astype(np.float64))
        return self

    def predict(self, X) -> np.ndarray:
        pred = self._recall(X)
        return pred[:, 0] if self._y_1d else pred


class MemoryClassifier(ClassifierMixin, _MemoryEstimator):
    """Differentiable-memory classification: the memory is fitted to the one-hot encoding of
    the labels (any labels: integers, strings, ...; ``classes_`` in sorted order), and
    :meth:`predict_proba` is its recall clipped to ``[1e-7, 1]`` and renormalised (as
    :func:`scalemem.evaluate` computes the log-loss); :meth:`predict` the most probable class.

    Parameters and fitted attributes as :class:`MemoryRegressor`'s, with ``classes_`` instead of
    ``n_outputs_``.
    """

    def fit(self, X, y):
        X, y = _validate_data(self, X, y, dtype="numeric")
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        self.classes_, index = np.unique(y, return_inverse=True)
        onehot = np.zeros((y.shape[0], self.classes_.shape[0]), np.float32)
        onehot[np.arange(y.shape[0]), index] = 1.0
        self._fit_memory(X, onehot)
        return self

    def predict_proba(self, X) -> np.ndarray:
        p = np.clip(self._recall(X).astype(np.float64), PROB_FLOOR, 1.0)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)  # first: it raises NotFittedError before fit
        return self.classes_[np.argmax(proba, axis=1)]
