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

__all__ = ["StepReport", "LoopState", "LoopResult", "FitInterrupted", "Validation", "fit_engine"]


@dataclasses.dataclass
class StepReport:
    """What the loop knows after a step; handed to ``callback``."""

    step: int  # 0-based index of the step just finished
    steps: int  # total steps of this fit
    loss: float  # ½ Σ‖x − v̂‖² over the fit rows at (K_step, V_step)
    rmse: float  # sqrt(mean squared error per value entry) at (K_step, V_step)
    rows: int
    seconds: float  # wall time since the loop started
    val: dict | None = None  # validation at K_step (rmse; accuracy, log_loss for labels)
    best_step: int | None = None  # the step of the best validation RMSE so far
    passes: int | None = None  # passes over the fit rows when this step ended (init included)


@dataclasses.dataclass
class LoopState:
    """Everything needed to continue a fit exactly: handed to ``checkpoint``."""

    step: int  # steps completed
    K: jax.Array
    opt_state: Any
    loss: list  # loss at K_0 … K_{step-1}
    rmse: list
    validation: dict | None = None  # Validation.state(): history, best step and keys, patience


class Validation:
    """Validation while fitting: ``evaluate(K, V) -> {"rmse", …}`` at every ``every``-th step
    (and the last); with ``patience`` > 0 the fit stops once that many evaluations in a row did
    not improve on the best validation RMSE, and the best keys are the result. ``state`` /
    ``restore`` carry it through a checkpoint (resume is bit-identical)."""

    def __init__(self, evaluate: Callable[[Any, Any], dict], every: int = 1, patience: int = 0):
        self.evaluate, self.every, self.patience = evaluate, max(int(every), 1), int(patience)
        self.history: list[dict] = []  # {"step": t, "rmse": …, …} per evaluation
        self.best_step: int | None = None
        self.best_K = None
        self.bad = 0  # evaluations since the best

    def due(self, t: int, steps: int) -> bool:
        return t % self.every == 0 or t == steps

    def __call__(self, t: int, K, V) -> dict:
        val = {k: float(v) for k, v in self.evaluate(K, V).items()}
        self.history.append({"step": t, **val})
        if self.best_step is None or val["rmse"] < self.best()["rmse"]:
            self.best_step, self.best_K, self.bad = t, K, 0
        else:
            self.bad += 1
        return val

    def best(self) -> dict:
        return next(h for h in self.history if h["step"] == self.best_step)

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state(self) -> dict:
        return {"history": [dict(h) for h in self.history], "best_step": self.best_step,
                "bad": self.bad, "best_K": self.best_K}

    def restore(self, state: dict) -> None:
        self.history = [dict(h) for h in state["history"]]
        self.best_step, self.bad, self.best_K = state["best_step"], state["bad"], state["best_K"]


@dataclasses.dataclass
class LoopResult:
    K: jax.Array  # after the last update
    V: jax.Array  # solved exactly at that K
    loss: np.ndarray  # loss at K_0 … K_steps (length steps + 1)
    rmse: np.ndarray  # training RMSE per value entry at K_0 … K_steps
    opt_state: Any
    seconds: float
    solve_events: int  # steps whose solve needed jitter or the eigen fallback
    best_step: int | None = None  # with validation: the step whose keys are K (else None)
    validation: list | None = None  # with validation: {"step", "rmse", …} per evaluation
    stopped_early: bool = False
    state: LoopState | None = None  # the loop's final state (a checkpoint of it extends the fit)
    converged: bool = False  # L-BFGS found no decrease: ended before ``steps``


class FitInterrupted(Exception):
    """Raised by :func:`fit_engine` when ``should_stop()`` said so; ``state`` was checkpointed.
    ``state`` is None when it said so before the first step (the data check, the initial keys:
    :func:`~scalemem._engine.fit_data` asks it between their passes), with nothing to keep."""

    def __init__(self, state: LoopState | None):
        self.state = state
        super().__init__("fit stopped before its first step" if state is None
                         else f"fit stopped after step {state.step}")


def _warn_solve(step: int, info, dtype) -> None:
    what = ("needed the eigendecomposition fallback" if bool(info.fallback)
            else f"needed diagonal jitter {float(info.jitter):.3g} beyond the ridge"
            if float(info.jitter) > 0 else "is close to singular")
    # the statistics' products round at the compute dtype's unit (≈6e-8 in float32) and the
    # solve amplifies that by up to the condition number: far above 1/u₃₂ the float32 V, loss
    # and key gradient can be wrong altogether (measured: gradient 280× off at 1.2e10)
    low = np.dtype(dtype).itemsize < 8
    warnings.warn(
        f"step {step}: the solve for V {what} (condition number ~{float(info.condition):.1e}, "
        f"backward error {float(info.backward_error):.1e}): the Gram matrix G + λI is "
        "numerically singular (duplicate or unused prototypes, or a ridge too small for the "
        "data). V is finite; a larger ridge removes this warning."
        + (" With float32 products the statistics round at ~1e-7, so V, the loss and the "
           "gradient of the keys may be wrong by far more than that here: float64 products "
           "(dtype=\"float64\", --dtype float64) compute them exactly." if low else ""),
        NumericsWarning, stacklevel=4)


def fit_engine(engine, K0, optimizer, *, steps: int, opt_state=None, start_step: int = 0,
               history: tuple[list, list] | None = None,
               callback: Callable[[StepReport], Any] | None = None,
               checkpoint: Callable[[LoopState], Any] | None = None, checkpoint_every: int = 0,
               checkpoint_seconds: float | None = None,
               should_stop: Callable[[], bool] | None = None,
               validation: Validation | None = None,
               note: Callable[[str], Any] | None = None) -> LoopResult:
    """The fit loop, shared by every engine (:mod:`.engines`: ``rows``, ``value_dim``,
    ``step(K, opt_state) -> (K, opt_state, StepOut)``, ``final(K) -> StepOut`` and
    ``locate_nonfinite() -> NonFiniteDataError``).

    Outputs of step t are read while step t+1 runs (async dispatch). ``callback`` gets the
    report of every ``K_t``, ``t`` = ``start_step`` … ``steps`` (the last: the final keys).
    ``checkpoint(state)`` is called every ``checkpoint_every`` steps and/or
    ``checkpoint_seconds`` seconds, and when ``should_stop()`` turns true (then
    :class:`FitInterrupted` is raised after it). ``validation`` evaluates held-out rows and may
    stop the fit early (the result is then its best keys); ``note(text)`` hears of compiling.
    Resuming from a saved ``K0``, ``opt_state``, ``start_step``, ``history`` (and validation
    state) is bit-identical to an uninterrupted fit."""
    K = K0
    opt_state = optimizer.init(K) if opt_state is None else opt_state
    losses, rmses = (list(history[0]), list(history[1])) if history else ([], [])
    events = 0
    n_entries = engine.rows * engine.value_dim
    t0 = last_ckpt = time.perf_counter()

    def read(t, out: StepOut, K_t, passes=None):
        nonlocal events
        out = jax.device_get(out)
        if not bool(out.finite):
            raise engine.locate_nonfinite()
        if out.info.needs_attention:
            if events == 0:
                _warn_solve(t, out.info, K_t.dtype)
            events += 1
        loss = float(out.loss)
        losses.append(loss)
        rmses.append(float(np.sqrt(2.0 * loss / n_entries)))
        val = validation(t, K_t, out.V) if validation and validation.due(t, steps) else None
        if callback is not None:
            callback(StepReport(t, steps, loss, rmses[-1], engine.rows, time.perf_counter() - t0,
                                val, validation.best_step if validation else None,
                                getattr(engine, "passes", None) if passes is None else passes))
        return out

    pending = None
    converged = False
    for t in range(start_step, steps):
        if validation is not None and validation.stop:  # decided by the read of step t - 1
            break
        if getattr(engine, "converged", False):
            converged = True
            break
        first = t == start_step and note is not None
        if first:
            note("compiling the step program (the first step waits for it)")
            tc = time.perf_counter()
        K_t = K
        K, opt_state, out = engine.step(K, opt_state)
        if first:
            note(f"step program ready in {time.perf_counter() - tc:.1f} s")
        if pending is not None:
            read(*pending)
        pending = (t, out, K_t, getattr(engine, "passes", None))
        done = t + 1
        stop = should_stop is not None and should_stop()
        due = checkpoint is not None and (stop or done < steps and (
            (checkpoint_every and done % checkpoint_every == 0)
            or (checkpoint_seconds is not None
                and time.perf_counter() - last_ckpt >= checkpoint_seconds)))
        if due or stop or validation is not None:  # validation decides before the next step
            read(*pending)
            pending = None
            state = LoopState(done, K, opt_state, list(losses), list(rmses),
                              validation.state() if validation else None)
            if due:
                checkpoint(state)
                last_ckpt = time.perf_counter()
            if stop:
                raise FitInterrupted(state)
    if pending is not None:
        read(*pending)
    stopped_early = validation is not None and validation.stop
    end = len(losses)  # steps done: the final keys are K_end
    if converged and note is not None:
        note(f"stopped at step {end} of {steps}: {getattr(engine, 'why', '') or 'converged'}")
    if not stopped_early and note is not None:
        note(f"final pass: V solved at the keys of step {end}")
    last = None if stopped_early else read(end, engine.final(K), K)
    n = len(losses) - (last is not None)  # the K_0 … K_{n-1} the state's history covers
    state = LoopState(n, K, opt_state, losses[:n], rmses[:n],
                      validation.state() if validation else None)
    best = validation.best_step if validation is not None and validation.patience else None
    converged = converged or getattr(engine, "converged", False) and len(losses) - 1 < steps
    if stopped_early and note is not None:
        note(f"early stop at step {len(losses) - 1} of {steps}: the validation RMSE did not "
             f"improve for {validation.patience} evaluations")
    if best is not None and (last is None or best != end):  # keep the best validated keys
        if note is not None:
            note(f"keeping the keys of step {best} (validation RMSE "
                 f"{validation.best()['rmse']:.6g})")
        K = validation.best_K
        last = jax.device_get(engine.final(K))
    return LoopResult(K, last.V, np.asarray(losses), np.asarray(rmses), opt_state,
                      time.perf_counter() - t0, events, best,
                      validation.history if validation else None, stopped_early, state,
                      converged)
