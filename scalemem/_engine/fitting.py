"""Fitting: :func:`fit_data` takes a source and a :class:`~scalemem._config.FitConfig`, picks where
the rows live, builds the mesh, the engine and the initial keys, and runs the one fit loop;
:func:`fit` (arrays), :func:`fit_source` (a store) and ``scalemem fit`` all go through it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _core
from .._config import FitConfig, build, val_fraction
from .._data import ArraySource, RowRange, WithBiasColumn, check_source
from .._progress import Progress, interactive
from .._errors import CheckpointError, ConfigError
from .._validate import check_init, check_pair, check_scale
from . import distributed
from .engines import ResidentEngine, StreamedEngine, memory_budget
from .init import data_keys, key_sample, key_spread, normal_keys
from .loop import FitInterrupted, LoopState, StepReport, Validation, fit_engine
from .mesh import local_row_ranges, make_mesh, platform, replicate, resolve_precision
from .model import Memory, evaluate, memory_at
from .lbfgs import LbfgsEngine
from .programs import OptimSpec, Spec, init_state

__all__ = ["FitResult", "build_engine", "fit_data", "fit", "fit_source", "choose_residency",
           "STREAM_CHUNK_ROWS"]

STREAM_CHUNK_ROWS = 4096  # default rows per chunk of streamed data


@dataclasses.dataclass
class FitResult:
    memory: Memory  # K after the last update and V solved exactly at that K
    loss: np.ndarray  # loss at K_0 … K_steps (length steps + 1)
    rmse: np.ndarray  # training RMSE per value entry at K_0 … K_steps
    opt_state: Any
    seconds: float
    solve_events: int  # steps whose solve needed jitter or the eigen fallback
    config: FitConfig  # the settings, recipe resolved
    residency: str  # where the rows lived: "resident" or "streamed"
    best_step: int | None = None  # with validation and patience: the step whose keys are kept
    validation: list | None = None  # with validation: {"step", "rmse", …} per evaluation
    stopped_early: bool = False
    rows: int = 0  # rows fitted (the fit rows less any validation fraction)
    state: LoopState | None = None  # the loop's final state: a checkpoint of it extends the fit
    passes: int = 0  # passes over the fit rows (initial keys, steps, final solve) in this call
    converged: bool = False  # L-BFGS ended before ``steps``: no step lowered the loss
    stop_reason: str = ""  # why, when ``converged``

    @property
    def train_rmse(self) -> float:
        """Training RMSE of the returned memory (at ``best_step`` when one was kept)."""
        return float(self.rmse[self.best_step if self.best_step is not None else -1])


def choose_residency(config: FitConfig, source, mesh) -> str:
    """``config.residency`` with ``auto`` resolved: resident when one device's share of the rows
    fits :func:`memory_budget` of every local device; ``one_pass`` implies streamed."""
    if config.one_pass or config.residency == "streamed":
        return "streamed"
    if config.residency == "resident":
        return "resident"
    per = -(-int(source.rows) // mesh.devices.size)  # keys as stored, values in the compute dtype
    need = per * (int(source.key_dim) * np.dtype(source.key_dtype).itemsize
                  + int(source.value_dim) * np.dtype(config.dtype).itemsize)
    local = [d for d, _ in local_row_ranges(int(source.rows), mesh)]
    return "resident" if all(need <= memory_budget(d) for d in local) else "streamed"


def _join_processes(n: int) -> None:
    if n > 1:
        distributed.initialize(num_processes=n)  # a no-op when already joined
    if n and distributed.process_count() != n:
        raise ConfigError("processes", n, f"this run has {distributed.process_count()} "
                          "processes")


def build_engine(source, cfg: FitConfig, *, optimizer=None, mesh=None):
    """The engine ``cfg`` asks for on ``source``, with its :class:`Spec` (``engine.spec``) and
    ``residency``; call inside ``jax.enable_x64(True)``."""
    mesh = make_mesh(cfg.devices or None, mesh)
    dt = jnp.dtype(cfg.dtype)
    plat = platform(mesh)
    residency = choose_residency(cfg, source, mesh)
    data = WithBiasColumn(source, dt) if cfg.key_bias else source
    spec = Spec(mesh, optimizer if optimizer is not None else OptimSpec(
        cfg.optimizer, cfg.learning_rate, cfg.schedule, cfg.warmup_steps, cfg.steps,
        cfg.lbfgs_memory),
        data.key_scale, data.value_scale, resolve_precision(cfg.stats_precision, dt, plat),
        resolve_precision(cfg.grad_precision, dt, plat))
    if residency == "resident":
        chunk = cfg.chunk_rows or _core.default_chunk_rows(cfg.prototypes, plat)
        engine = ResidentEngine(data, spec, ridge=cfg.ridge, chunk_rows=chunk, dtype=dt)
    else:
        engine = StreamedEngine(data, spec, ridge=cfg.ridge, dtype=dt, one_pass=cfg.one_pass,
                                chunk_rows=cfg.chunk_rows or STREAM_CHUNK_ROWS,
                                chunks_per_block=cfg.chunks_per_block)
    engine.residency = residency
    return LbfgsEngine(engine) if cfg.optimizer == "lbfgs" else engine


def _split_validation(source, validation, prototypes: int):
    """``(fit source, validation source or None)``: ``validation`` is a source, or a fraction
    of ``source``'s rows taken from its end."""
    if validation is None:
        return source, None
    if not isinstance(validation, float):
        return source, check_source(validation)
    rows = int(source.rows)
    k = max(1, round(rows * validation))
    if not 0 < validation < 1 or rows - k < max(prototypes, 1):
        raise ConfigError("val_rows", validation, f"leaves {rows - k} of {rows} rows to fit "
                          f"{prototypes} prototypes; take a smaller fraction")
    return RowRange(source, 0, rows - k), RowRange(source, rows - k, rows)


def _validation(val, cfg: FitConfig, m: int, n: int, labels: bool) -> Validation:
    """Held-out error of the keys ``K_t`` (host copies) with their exact ``V_t``, at stream
    speed (one pass over ``val``'s rows)."""
    if (int(val.key_dim), int(val.value_dim)) != (m, n):
        raise ConfigError("val_rows", getattr(val, "name", None), f"validation rows have "
                          f"{val.key_dim} key and {val.value_dim} value columns, the fit rows "
                          f"{m} and {n}")

    def at(K, V) -> dict:
        r = evaluate(memory_at(K, V, m, cfg.key_bias), val, labels=labels)
        return {k: r[k] for k in ("rmse", "accuracy", "log_loss") if k in r}

    return Validation(at, cfg.val_every, cfg.patience)


def fit_data(source, config: FitConfig, *, optimizer: optax.GradientTransformation | None = None,
             init=None, mesh=None, callback: Callable[[StepReport], Any] | None = None,
             check: dict | None = None, start: LoopState | None = None, validation=None,
             **loop) -> FitResult:
    """Fit ``config.prototypes`` prototypes to ``source`` as ``config`` says.

    ``optimizer``: an optax transformation (``config.optimizer`` ``"custom"``); ``init``:
    initial keys (``config.init`` ``"given"``); ``mesh``: a one-axis mesh replacing
    ``config.devices``; ``check``: more fields every process must agree on; ``start``: the
    state to resume from (its ``opt_state`` may be a function of a fresh state, returning the
    restored one). ``loop`` goes to :func:`fit_engine` (:data:`LOOP_OPTIONS`)."""
    source = check_source(source)
    cfg = config
    labels = getattr(source, "label_view", None) is not None
    source, val = _split_validation(source, validation, cfg.prototypes)
    rows, m = int(source.rows), int(source.key_dim)
    if cfg.prototypes > rows:
        raise ConfigError("prototypes", cfg.prototypes, f"more prototypes than the {rows} rows "
                          f"of {source.name}")
    for name, obj, label, what in (
            ("optimizer", optimizer, "custom", "an optax transformation passed as optimizer="),
            ("init", init, "given", "initial keys passed as an array")):
        if (obj is not None) != (getattr(cfg, name) == label):
            raise ConfigError(name, getattr(cfg, name), f"{label!r} goes with {what} (Python only)")
    mk = m + int(cfg.key_bias)
    if init is not None:
        check_init("init", init, (cfg.prototypes, mk))
    _join_processes(cfg.processes)
    stop = loop.get("should_stop")

    def poll() -> None:  # before the first step: stop at once (nothing to checkpoint)
        if stop is not None and stop():
            raise FitInterrupted(None)

    with jax.enable_x64(True):
        engine = build_engine(source, cfg, optimizer=optimizer, mesh=mesh)
        poll()
        spec, mesh, dt = engine.spec, engine.spec.mesh, jnp.dtype(cfg.dtype)
        if distributed.process_count() > 1:
            # in-memory rows: a hash of their content too (each process holds all of them)
            content = ({"data.content": distributed.array_digest(*source.read(0, rows))}
                       if isinstance(source, ArraySource) else {})
            distributed.check_consistent({
                **cfg.to_dict(), **(check or {}), "residency.resolved": engine.residency,
                "init.array": None if init is None else distributed.array_digest(init), **content,
                **{f"data.{k}": v for k, v in distributed.source_fingerprint(source).items()}})
        relative = cfg.relative_lr and optimizer is None and start is None
        sample = key_sample(source) if relative or (start is None and init is None
                                                    and cfg.init != "normal") else None
        if start is not None:
            K0 = jnp.asarray(start.K)
            if K0.shape != (cfg.prototypes, mk) or K0.dtype != dt:
                raise CheckpointError(f"resumed keys are {K0.dtype}{K0.shape}, this fit needs "
                                      f"{dt}{(cfg.prototypes, mk)}")
            loop.update(start_step=start.step, history=(start.loss, start.rmse))
        elif init is not None:
            K0 = jnp.asarray(init, dt)
        elif cfg.init == "normal":
            K0 = normal_keys(cfg.prototypes, mk, cfg.seed, dt)
        else:
            poll()
            K0, spent, at_K0 = data_keys(lambda K: engine.final(replicate(K, mesh)), sample,
                                         cfg.prototypes, cfg.init, cfg.seed, cfg.key_bias, dt,
                                         poll=poll)
            if loop.get("note") is not None:
                loop["note"](f"initial keys: {cfg.init} at the logit scale of lowest loss "
                             f"({spent} statistics passes)")
        K0 = replicate(K0, mesh)
        if start is None and init is None and cfg.init != "normal":
            engine.solved_at(K0, at_K0)  # the search solved there: a step may start from it
        if val is not None:
            loop["validation"] = _validation(val, cfg, m, int(source.value_dim), labels)
            if start is not None and start.validation is not None:
                saved = start.validation
                best_K = saved["best_K"]
                loop["validation"].restore({**saved, "best_K": None if best_K is None else
                                            replicate(jnp.asarray(best_K), mesh)})
        fresh = init_state(K0, 1.0 / key_spread(sample) if relative else 1.0, spec=spec)
        state = start.opt_state if start is not None else loop.pop("opt_state", None)
        state = fresh if state is None else replicate(state(fresh) if callable(state) else state,
                                                      mesh)
        poll()
        res = fit_engine(engine, K0, spec.transformation(), steps=cfg.steps, opt_state=state,
                         callback=callback, **loop)
        memory = memory_at(res.K, res.V, m, cfg.key_bias, source.key_scale,
                           source.value_scale)
    return FitResult(memory, res.loss, res.rmse, res.opt_state, res.seconds, res.solve_events,
                     cfg, engine.residency, res.best_step, res.validation, res.stopped_early,
                     rows, res.state, engine.passes, res.converged,
                     getattr(engine, "why", "") if res.converged else "")


LOOP_OPTIONS = ("checkpoint", "checkpoint_every", "checkpoint_seconds", "should_stop",
                "opt_state", "start_step", "history", "note")


def fit(Q, X, prototypes: int = 64, *, key_scale: float | None = None,
        value_scale: float | None = None, optimizer=None, init=None, mesh=None,
        callback: Callable[[StepReport], Any] | None = None, validation=None,
        progress: bool | None = None, **settings) -> FitResult:
    """Fit a memory of ``prototypes`` prototypes to keys ``Q`` (N×m) and values ``X`` (N×n).

    Each step solves ``V`` exactly (float64 ridge regression) and moves ``K`` along the
    variable-projection gradient. ``settings`` are the fields of :class:`scalemem.FitConfig`
    (the settings of ``scalemem fit``) and the loop's :data:`LOOP_OPTIONS`. ``key_scale`` and
    ``value_scale`` multiply ``Q`` and ``X`` on the device (e.g. 1/255 for uint8 pixels) and stay
    with the memory. ``optimizer`` may be an optax transformation, ``init`` an array of initial
    keys (P×m, P×(m+1) with ``key_bias``); ``callback(StepReport)`` runs after every step.

    Validation while fitting: ``validation=(Q_val, X_val)`` (scaled like ``Q``, ``X``), or
    ``val_rows=0.05`` to hold out that fraction of the rows from their end; the validation RMSE
    is in the reports, ``FitResult.validation`` and, with ``patience`` > 0 (the default 10), the
    fit stops when it stops improving and returns the best keys (``FitResult.best_step``).
    ``progress``: a bar in a terminal or notebook, plain lines elsewhere (default: on when
    someone watches, i.e. stderr is a terminal or this runs in a notebook)."""
    check_pair(Q, X)
    key_scale = check_scale("key_scale", key_scale)  # named as the caller passed them
    value_scale = check_scale("value_scale", value_scale)
    Q, X = (np.asarray(a, np.uint8) if np.asarray(a).dtype == bool else np.asarray(a)
            for a in (Q, X))
    source = ArraySource(Q, X, key_scale=key_scale, value_scale=value_scale)
    if isinstance(validation, (tuple, list)):
        check_pair(*validation)
        validation = ArraySource(*(np.asarray(a) for a in validation), key_scale=key_scale,
                                 value_scale=value_scale)
    return fit_source(source, prototypes, optimizer=optimizer, init=init, mesh=mesh,
                      callback=callback, validation=validation, progress=progress, **settings)


def fit_source(source, prototypes: int = 64, *, optimizer=None, init=None, mesh=None,
               callback: Callable[[StepReport], Any] | None = None, validation=None,
               progress: bool | None = None, **settings) -> FitResult:
    """:func:`fit` on a source (:func:`scalemem.open_source`), applying its scales on the device;
    the rows stay resident on the devices when they fit (``residency="auto"``) and are streamed
    otherwise, so memory is independent of the row count. ``validation``: another source (or
    ``(Q_val, X_val)`` arrays, scaled by this source's scales); ``val_rows``: a fraction."""
    loop = {k: settings.pop(k) for k in LOOP_OPTIONS if k in settings}
    fraction = settings.pop("val_rows", None)
    if fraction is not None:
        if validation is not None:
            raise ConfigError("val_rows", fraction, "give validation= or val_rows=, not both")
        if isinstance(fraction, bool) or not isinstance(fraction, (float, str)) or (
                val_fraction(fraction) is None):
            raise ConfigError("val_rows", fraction, "in Python a fraction of the rows (e.g. "
                              "0.05 or '5%'); pass other rows as validation=(Q_val, X_val) or "
                              "validation=source")
        validation = val_fraction(fraction)
    if isinstance(validation, (tuple, list)):
        check_pair(*validation)
        validation = ArraySource(*(np.asarray(a) for a in validation),
                                 key_scale=source.key_scale, value_scale=source.value_scale)
    objects = {}  # an optax transformation, an array of keys: named in the config, passed on
    for name, value, label in (("optimizer", optimizer, "custom"), ("init", init, "given")):
        if isinstance(value, str):
            settings[name] = value
        elif value is not None:
            settings[name], objects[name] = label, value
    config = build(FitConfig, {"prototypes": prototypes, **settings}, strict=True)
    bar = Progress(enabled=interactive() if progress is None else bool(progress))
    loop.setdefault("note", bar.note if bar.enabled else None)

    def report(r: StepReport) -> None:
        if callback is not None:
            callback(r)
        bar(r)

    try:
        return fit_data(source, config, mesh=mesh, callback=report, validation=validation,
                        **objects, **loop)
    finally:
        bar.close()
