"""L-BFGS steps for any engine: the direction from :mod:`scalemem._core.lbfgs`, the step along it
by a backtracking line search whose trial losses are statistics passes driven from the host, so
the same code serves resident and streamed rows, one device, a mesh and several processes (the
losses it compares are the engine's replicated, reduced values, equal on every process). An
accepted trial's statistics and solve are those of the next step's keys: they are kept and not
recomputed, so an iteration whose first trial is accepted costs two passes over the rows, as an
Adam step does (docs/design.md, "L-BFGS")."""

from __future__ import annotations

import math

import jax
import numpy as np

from .._core import ILL_CONDITIONED, StepOut
from . import programs as prog

__all__ = ["LbfgsEngine", "ARMIJO", "MAX_TRIALS"]

ARMIJO = 1e-4  # sufficient decrease: f(K + ηd) ≤ f(K) + ARMIJO·η·gᵀd (Nocedal & Wright's c₁)
MAX_TRIALS = 20  # trials of one line search (a step of 0.1²⁰ is below any float's resolution)


def _stall_cause(K, out: StepOut) -> str:
    """Why a line search along the gradient found no decrease, for the stop reason."""
    cond, low = float(out.info.condition), np.dtype(K.dtype).itemsize < 8  # float32 keys
    if low and (bool(out.info.fallback) or cond > ILL_CONDITIONED):
        # float32 statistics round at ~1e-7 and the solve amplifies it by up to cond: the loss
        # and gradient are then too inexact to descend (docs/design.md, "L-BFGS")
        return (f"the Gram matrix is numerically singular (condition ~{cond:.1e}), past what "
                "float32 products resolve: the loss and the gradient of the keys are not "
                "accurate enough to descend further; --dtype float64 computes them exactly "
                "(or a larger --ridge)")
    what = "of float32 products (--dtype float64 may go further)" if low else "of the loss"
    return (f"the keys are a minimum to the precision {what}, or --learning-rate, the first "
            "step's size, is far off scale")


class LbfgsEngine:
    """``engine`` (a resident or streamed engine) stepping its keys by L-BFGS: ``step(K, state)``
    returns ``(K_next, state, StepOut at K)`` like the engines do, ``state`` being the
    :class:`~scalemem._core.lbfgs.LbfgsState` (the whole of what a checkpoint needs: the trial
    statistics kept between steps are recomputed bit for bit after a resume). When a line search
    from an empty memory finds no decrease the keys are a minimum to the precision of the loss:
    ``converged`` turns true and the loop ends there."""

    def __init__(self, engine):
        self.inner = engine
        self.converged = False
        self.why = ""  # why it converged
        self.trials: list[int] = []  # trials of each line search
        self._next: tuple | None = None  # (keys, their StepOut): the accepted trial

    def __getattr__(self, name):  # rows, value_dim, spec, residency, passes, …: the engine's
        return getattr(self.inner, name)

    def solved_at(self, K, out: StepOut | None) -> None:
        """``out`` is the engine's statistics and solve at ``K`` (the initial keys' search made
        them): the first step uses it instead of a pass."""
        if out is not None:
            self._next = (K, out)

    def final(self, K) -> StepOut:
        if self._next is not None and self._next[0] is K:
            return self._next[1]
        return self.inner.final(K)

    def _value(self, out: StepOut) -> float:
        """The objective at a solve, or inf where it is not to be trusted: statistics not
        finite, or a solve that needed the eigendecomposition fallback (a numerically singular
        Gram matrix, where the loss formula cancels catastrophically and can read 0)."""
        if not bool(out.finite) or bool(out.info.fallback):
            return math.inf
        value = float(prog.objective(out, self.inner.ridge))
        return value if math.isfinite(value) else math.inf

    def step(self, K, state):
        spec = self.inner.spec
        out = self.final(K)
        if not bool(out.finite):  # not finite data (the loop locates it)
            return K, state, out
        f0 = self._value(out)  # inf after the eigen fallback: any trusted trial is better
        g = self.inner.grad(K, out.V)
        d, slope, new = prog.lbfgs_step_direction(state, K, g, spec=spec)
        if not float(slope) < 0:  # not a descent direction: restart from an empty memory
            d, slope, new = prog.lbfgs_step_direction(prog.lbfgs_restart(state, spec=spec), K, g,
                                                      spec=spec)
        slope = float(slope)
        if not math.isfinite(slope):
            return K, state, out._replace(finite=np.bool_(False))
        if slope == 0.0:  # a zero gradient: a stationary point
            self.converged = True
            self.why = "the gradient is zero: the keys are a stationary point"
            self.trials.append(0)
            return K, new, out
        eta, grow = 1.0, True
        for trial in range(1, MAX_TRIALS + 1):
            K_try = prog.lbfgs_trial(K, d, eta, spec=spec)
            out_try = self.inner.final(K_try)
            f = self._value(out_try)
            if f < f0 and f <= f0 + ARMIJO * eta * slope:  # a decrease, and sufficient
                self.trials.append(trial)
                self._next = (K_try, out_try)
                return K_try, new, out
            if grow and f == f0:  # the step is below the keys' or the loss's resolution
                eta *= 10.0
                continue
            grow = False
            # the minimiser of the quadratic through f0, the slope and f, kept in [η/10, η/2];
            # η/10 where the loss is flat that far out (saturated attention: the quadratic
            # model would halve a step that is orders of magnitude too long)
            curve = (f - f0 - slope * eta) / (eta * eta) if math.isfinite(f) else math.inf
            flat = math.isfinite(f) and f - f0 < -0.01 * slope * eta
            eta = 0.1 * eta if flat or not curve > 0 else \
                min(max(-slope / (2.0 * curve), 0.1 * eta), 0.5 * eta)
        self.trials.append(MAX_TRIALS)
        if int(jax.device_get(new.newest)) < 0:  # it was a steepest-descent direction
            self.converged = True
            self.why = (f"{MAX_TRIALS} trial steps along the gradient, the last {eta:.2g} × "
                        "the first step's size, lowered nothing: " + _stall_cause(K, out))
        return K, prog.lbfgs_restart(new, spec=spec), out
