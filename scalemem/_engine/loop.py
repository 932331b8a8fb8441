"""The fit loop: one readable loop for every engine."""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np

from .._core import StepOut
from .._errors import NumericsWarning

__all__ = ["StepReport", "LoopState", "LoopResult", "FitInterrupted", "fit_engine"]


@dataclasses.dataclass
class StepReport:
    """What the loop knows after a step; handed to ``callback``."""

    step: int  # 0-based index of the step just finished
    steps: int  # total steps of this fit
    loss: float  # ½ Σ‖x − v̂‖² over the fit rows at (K_step, V_step)
    rmse: float  # sqrt(mean squared error per value entry) at (K_step, V_step)
    rows: int
    seconds: float  # wall time since the loop started


@dataclasses.dataclass
class LoopState:
    """Everything needed to continue a fit exactly: handed to ``checkpoint``."""

    step: int  # steps completed
    K: jax.Array
    opt_state: Any
    loss: list  # loss at K_0 … K_{step-1}
    rmse: list


@dataclasses.dataclass
class LoopResult:
    K: jax.Array  # after the last update
    V: jax.Array  # solved exactly at that K
    loss: np.ndarray  # loss at K_0 … K_steps (length steps + 1)
    rmse: np.ndarray  # training RMSE per value entry at K_0 … K_steps
    opt_state: Any
    seconds: float
    solve_events: int  # steps whose solve needed jitter or the eigen fallback


class FitInterrupted(Exception):
    """Raised by :func:`fit_engine` when ``should_stop()`` said so; ``state`` was checkpointed."""

    def __init__(self, state: LoopState):
        self.state = state
        super().__init__(f"fit stopped after step {state.step}")


def _warn_solve(step: int, info) -> None:
    what = ("needed the eigendecomposition fallback" if bool(info.fallback)
            else f"needed diagonal jitter {float(info.jitter):.3g} beyond the ridge"
            if float(info.jitter) > 0 else "is close to singular")
    warnings.warn(
        f"step {step}: the solve for V {what} (condition number ~{float(info.condition):.1e}, "
        f"backward error {float(info.backward_error):.1e}): the Gram matrix G + λI is "
        "numerically singular (duplicate or unused prototypes, or a ridge too small for the "
        "data). V is finite; a larger ridge removes this warning.", NumericsWarning, stacklevel=4)


def fit_engine(engine, K0, optimizer, *, steps: int, opt_state=None, start_step: int = 0,
               history: tuple[list, list] | None = None,
               callback: Callable[[StepReport], Any] | None = None,
               checkpoint: Callable[[LoopState], Any] | None = None, checkpoint_every: int = 0,
               checkpoint_seconds: float | None = None,
               should_stop: Callable[[], bool] | None = None) -> LoopResult:
    """The fit loop, shared by every engine (:mod:`.engines`: ``rows``, ``value_dim``,
    ``step(K, opt_state) -> (K, opt_state, StepOut)``, ``final(K) -> StepOut`` and
    ``locate_nonfinite() -> NonFiniteDataError``).

    Outputs of step t are read while step t+1 runs (async dispatch). ``checkpoint(state)`` is
    called every ``checkpoint_every`` steps and/or ``checkpoint_seconds`` seconds, and when
    ``should_stop()`` turns true (then :class:`FitInterrupted` is raised after it). Resuming
    from a saved ``K0``, ``opt_state``, ``start_step`` and ``history`` is bit-identical to an
    uninterrupted fit."""
    K = K0
    opt_state = optimizer.init(K) if opt_state is None else opt_state
    losses, rmses = (list(history[0]), list(history[1])) if history else ([], [])
    events = 0
    n_entries = engine.rows * engine.value_dim
    t0 = last_ckpt = time.perf_counter()

    def read(t, out: StepOut):
        nonlocal events
        out = jax.device_get(out)
        if not bool(out.finite):
            raise engine.locate_nonfinite()
        if out.info.needs_attention:
            if events == 0:
                _warn_solve(t, out.info)
            events += 1
        loss = float(out.loss)
        losses.append(loss)
        rmses.append(float(np.sqrt(2.0 * loss / n_entries)))
        if callback is not None and t < steps:
            callback(StepReport(t, steps, loss, rmses[-1], engine.rows, time.perf_counter() - t0))
        return out

    pending = None
    for t in range(start_step, steps):
        K, opt_state, out = engine.step(K, opt_state)
        if pending is not None:
            read(*pending)
        pending = (t, out)
        done = t + 1
        stop = should_stop is not None and should_stop()
        due = checkpoint is not None and (stop or done < steps and (
            (checkpoint_every and done % checkpoint_every == 0)
            or (checkpoint_seconds is not None
                and time.perf_counter() - last_ckpt >= checkpoint_seconds)))
        if due or stop:
            read(*pending)
            pending = None
            state = LoopState(done, K, opt_state, list(losses), list(rmses))
            if due:
                checkpoint(state)
                last_ckpt = time.perf_counter()
            if stop:
                raise FitInterrupted(state)
    if pending is not None:
        read(*pending)
    last = read(steps, engine.final(K))
    return LoopResult(K, last.V, np.asarray(losses), np.asarray(rmses), opt_state,
                      time.perf_counter() - t0, events)
