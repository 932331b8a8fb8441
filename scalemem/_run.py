"""Run folders: the fit, eval and predict workflows behind the command line.

A run folder (``scalemem fit … --out RUN``) holds::

    RUN/config.json          the resolved config of the fit (every setting, defaults included)
    RUN/metrics.jsonl        one JSON line per step (scalemem._metrics)
    RUN/checkpoints/         step-NNNNNN.npz, the last few (scalemem._checkpoint)
    RUN/model.npz            the fitted memory with its metadata (scalemem._modelio)
    RUN/eval.json            the last evaluation (scalemem eval)
    RUN/*.png                pictures (scalemem eval --plots)

The fit streams the store through :class:`scalemem._streaming.StreamingEngine` (exact mode: the
same numbers as the in-memory fit) and runs :func:`scalemem._fit.fit_engine`, whose hooks give
the progress bar and metrics (``callback``), the checkpoints (``checkpoint``) and the clean stop
on SIGINT/SIGTERM (``should_stop``: the signal handler only sets a flag; the loop then writes a
checkpoint and stops).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ._checkpoint import CheckpointManager, check_compatible, data_fingerprint, restore_opt_state
from ._errors import CheckpointError, ConfigError, DataError
from ._labels import PROB_FLOOR, LabelSource
from ._metrics import METRICS_FILE, MetricsWriter, truncate_metrics
from ._modelio import MODEL_FILE, _load, atomic_write, save

__all__ = ["FIT_DEFAULTS", "RunInterrupted", "fit_run", "eval_run", "predict_run",
           "open_data", "classification_metrics", "predict_rows", "saved_config", "CONFIG_FILE"]

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
EVAL_FILE = "eval.json"
LOCK_FILE = ".lock"

FIT_DEFAULTS: dict[str, Any] = {
    "store": None, "keys": None, "values": None, "rows": None, "values_are_labels": False,
    "classes": None, "prototypes": 64, "steps": 1000, "lr": 5e-4, "ridge": 1e-6,
    "chunk_rows": 4096, "chunks_per_block": 4, "seed": 0, "out": None,
    "checkpoint_every": 0, "checkpoint_seconds": 300.0, "keep_checkpoints": 3, "devices": 0,
}
# settings that only say where/how to report, not what is computed
_SESSION_FIELDS = ("quiet", "overwrite", "json", "resume", "config", "distributed")


class RunInterrupted(Exception):
    """A fit stopped by SIGINT/SIGTERM after writing a checkpoint (not an error)."""

    def __init__(self, signum: int, step: int, steps: int, run: Path, checkpoint: Path | None):
        self.signum, self.step, self.steps, self.run, self.checkpoint = (
            signum, step, steps, run, checkpoint)
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped after step {step} of {steps}; checkpoint "
            f"{checkpoint}. Continue with: scalemem fit --resume {run}")

    def result(self) -> dict:
        return {"interrupted": True, "signal": signal.Signals(self.signum).name,
                "step": self.step, "steps": self.steps, "run": str(self.run),
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "resume": f"scalemem fit --resume {self.run}"}


# ----------------------------------------------------------------------------------------------
# helpers


def _abs(p) -> str | None:
    return None if p is None else str(Path(p).expanduser().resolve())


def write_json(path: Path, obj) -> Path:
    text = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    return atomic_write(path, lambda f: f.write(text))


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return obj


def saved_config(run: str | os.PathLike) -> dict:
    """The resolved config of a run folder (its ``config.json``)."""
    p = Path(run)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such run folder; --resume takes the --out folder of an "
                              "earlier `scalemem fit`")
    if not (p / CONFIG_FILE).is_file():
        raise CheckpointError(f"{p}: not a run folder (no {CONFIG_FILE}); --resume takes the "
                              "--out folder of an earlier `scalemem fit`")
    return read_json(p / CONFIG_FILE)


@contextlib.contextmanager
def _run_lock(run: Path):
    """Hold an exclusive lock on the run folder (released by the OS if the process dies)."""
    import fcntl

    f = open(run / LOCK_FILE, "a")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise CheckpointError(f"{run}: another scalemem process is fitting this run; wait "
                                  "for it to finish or stop it first") from e
        yield
    finally:
        f.close()


class _StopFlag:
    """SIGINT/SIGTERM handlers that only record the signal (the fit loop polls ``stop``)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handler(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self.signum = signum

    def stop(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def open_data(store, keys=None, values=None, rows=None, *, labels: bool = False,
              classes: int | None = None):
    """The source a run reads: ``open_source(store, keys, values, rows)``, or with ``labels``
    a :class:`~scalemem._labels.LabelSource` (values = one-hot of the integer array ``values``)."""
    from ._sources import open_source

    if store is None:
        raise ConfigError("store", None, "give the store to read (a Zarr directory or an HDF5 "
                          "file), e.g. `scalemem fit data.zarr …`")
    if labels:
        return LabelSource(store, keys, values, rows, classes)
    return open_source(store, keys=keys, values=values, rows=rows)


def _compute_dtype(source) -> str:
    kinds = [np.dtype(source.key_dtype), np.dtype(source.value_dtype)]
    if all(k.kind == "f" for k in kinds) and any(k == np.float64 for k in kinds):
        return "float64"
    return "float32"


# ----------------------------------------------------------------------------------------------
# fit


def _check_fit_config(cfg: Mapping) -> None:
    def integer(name, lo):
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(name, v, f"must be an integer ≥ {lo}")

    def number(name, lo, strict=False):
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or (
                v <= lo if strict else v < lo):
            raise ConfigError(name, v, f"must be a number {'>' if strict else '≥'} {lo}")

    integer("prototypes", 1)
    integer("steps", 0)
    integer("chunk_rows", 1)
    integer("chunks_per_block", 1)
    integer("devices", 0)
    integer("seed", 0)
    integer("checkpoint_every", 0)
    integer("keep_checkpoints", 1)
    number("lr", 0.0, strict=True)
    number("ridge", 0.0)
    if cfg["checkpoint_seconds"] is not None:
        number("checkpoint_seconds", 0.0, strict=True)
    if cfg["classes"] is not None:
        integer("classes", 2)


def _clear_run(run: Path) -> None:
    for name in (MODEL_FILE, METRICS_FILE, EVAL_FILE, CONFIG_FILE):
        with contextlib.suppress(FileNotFoundError):
            (run / name).unlink()
    if (run / CHECKPOINT_DIR).is_dir():
        shutil.rmtree(run / CHECKPOINT_DIR)


def fit_run(cfg: dict, *, resume: bool = False, say: Callable[[str], None] = print,
            progress: bool = True) -> dict:
    """Fit as configured by ``cfg`` (keys of :data:`FIT_DEFAULTS`) into the run folder
    ``cfg["out"]``; with ``resume`` continue from its newest checkpoint. Returns the result
    object printed by ``scalemem fit --json``; raises :class:`RunInterrupted` after a signal."""
    overwrite = bool(cfg.get("overwrite"))
    cfg = {**FIT_DEFAULTS, **{k: v for k, v in cfg.items() if k not in _SESSION_FIELDS}}
    _check_fit_config(cfg)
    if cfg["out"] is None:
        cfg["out"] = f"runs/fit-{time.strftime('%Y%m%d-%H%M%S')}"
    run = Path(cfg["out"]).expanduser().resolve()
    cfg["out"], cfg["store"] = str(run), _abs(cfg["store"])
    if resume and not run.is_dir():
        raise CheckpointError(f"{run}: no such run folder to resume")
    from ._distributed import barrier, is_writer

    writer = is_writer()  # in a multi-process run only process 0 writes the run folder
    if writer:
        run.mkdir(parents=True, exist_ok=True)
    with (_run_lock(run) if writer else contextlib.nullcontext()):
        used = [n for n in (MODEL_FILE, CHECKPOINT_DIR, METRICS_FILE) if (run / n).exists()]
        if used and not resume:
            if not overwrite:
                raise ConfigError("out", str(run), f"already holds a run ({', '.join(used)}); "
                                  f"continue it with `scalemem fit --resume {run}`, start over "
                                  "with --overwrite, or choose another --out")
        barrier("scalemem-fit-checked")  # every process looked before process 0 writes
        if used and not resume and writer:
            _clear_run(run)
        source = open_data(cfg["store"], cfg["keys"], cfg["values"], cfg["rows"],
                           labels=cfg["values_are_labels"], classes=cfg["classes"])
        with contextlib.closing(source):
            if cfg["prototypes"] > source.rows:
                raise ConfigError("prototypes", cfg["prototypes"], f"more prototypes than the "
                                  f"{source.rows} rows to fit")
            cfg["keys"] = source.key_view
            cfg["values"] = source.label_view if cfg["values_are_labels"] else source.value_view
            cfg["classes"] = source.classes if cfg["values_are_labels"] else None
            cfg["optimizer"] = "adam"
            cfg["dtype"] = _compute_dtype(source)
            fingerprint = data_fingerprint(source)
            manager = CheckpointManager(run / CHECKPOINT_DIR, keep=cfg["keep_checkpoints"])
            ckpt = None
            if resume:
                ckpt = manager.latest()
                if ckpt is not None:
                    check_compatible(ckpt.meta, cfg, fingerprint, ckpt.path)
                    if ckpt.step > cfg["steps"]:
                        raise ConfigError("steps", cfg["steps"], f"the checkpoint is at step "
                                          f"{ckpt.step}; resume with --steps ≥ {ckpt.step}")
                done = _completed(run, cfg, fingerprint)
                if done is not None:
                    say(f"{run}: already complete ({cfg['steps']} steps); nothing to do")
                    return done
                if ckpt is None:
                    say(f"{run}: no checkpoint yet; starting from step 0")
                else:
                    say(f"resuming {run} from step {ckpt.step} ({ckpt.path.name})")
            if writer:
                write_json(run / CONFIG_FILE, cfg)
            return _fit(cfg, run, source, fingerprint, manager, ckpt, say, progress)


def _completed(run: Path, cfg: dict, fingerprint: dict) -> dict | None:
    if not (run / MODEL_FILE).is_file():
        return None
    memory, meta = _load(run)
    if (meta.get("config") or {}).get("steps") != cfg["steps"]:
        return None
    check_compatible(meta, cfg, fingerprint, run / MODEL_FILE)
    return meta.get("result") or {}


def _fit(cfg, run, source, fingerprint, manager, ckpt, say, progress) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from ._distributed import check_consistent, is_writer, process_count
    from ._fit import FitInterrupted, fit_engine, init_keys
    from ._progress import ProgressBar
    from ._streaming import StreamingEngine

    writer = is_writer()
    check_consistent({**{k: v for k, v in cfg.items() if k != "out"}, **fingerprint})
    steps = cfg["steps"]
    optimizer = optax.adam(cfg["lr"])
    offset = float(ckpt.meta.get("seconds", 0.0)) if ckpt is not None else 0.0
    metrics_path = run / METRICS_FILE
    if writer:
        truncate_metrics(metrics_path, ckpt.step if ckpt is not None else 0)
    bar = ProgressBar(enabled=progress and writer)
    t_start = time.perf_counter()

    def meta_now() -> dict:
        return {"config": cfg, "fingerprint": fingerprint,
                "seconds": offset + time.perf_counter() - t_start}

    def checkpoint(state) -> None:
        if writer:
            manager.save(state, meta_now())

    metrics_cm = (MetricsWriter(metrics_path, seconds_offset=offset) if writer
                  else contextlib.nullcontext(lambda report: None))
    with metrics_cm as metrics, \
            jax.enable_x64(True), _StopFlag() as flag:
        dt = jnp.dtype(cfg["dtype"])
        m = int(source.key_dim)

        def callback(report):
            metrics(report)
            bar(report)

        ndev = int(cfg.get("devices") or 0) or jax.device_count()
        if ndev > 1 or process_count() > 1:
            from ._parallel import ShardedStreamingEngine, make_mesh

            engine = ShardedStreamingEngine(
                source, mesh=make_mesh(devices=ndev), optimizer=optimizer,
                ridge=float(cfg["ridge"]), chunk_rows=cfg["chunk_rows"],
                chunks_per_block=cfg["chunks_per_block"], dtype=dt)
        else:
            engine = StreamingEngine(source, optimizer=optimizer, ridge=float(cfg["ridge"]),
                                     chunk_rows=cfg["chunk_rows"],
                                     chunks_per_block=cfg["chunks_per_block"], dtype=dt)
        kw: dict[str, Any] = {}
        if ckpt is not None:
            if ckpt.K.shape != (cfg["prototypes"], m) or ckpt.K.dtype != dt:
                raise CheckpointError(f"{ckpt.path}: K is {ckpt.K.dtype}{ckpt.K.shape}, this fit "
                                      f"needs {dt}{(cfg['prototypes'], m)}")
            K0 = jnp.asarray(ckpt.K, dt)
            kw = dict(opt_state=restore_opt_state(ckpt, optimizer.init(K0)),
                      start_step=ckpt.step, history=(ckpt.loss, ckpt.rmse))
        else:
            K0 = init_keys(cfg["prototypes"], m, cfg["seed"], dt)
        every = cfg["checkpoint_every"]
        secs = cfg["checkpoint_seconds"]
        try:
            res = fit_engine(engine, K0, optimizer, steps=steps, callback=callback,
                             checkpoint=checkpoint, checkpoint_every=every,
                             checkpoint_seconds=None if secs is None else float(secs),
                             should_stop=flag.stop, **kw)
        except FitInterrupted as e:
            bar.close()
            state = e.state
            if writer and manager.last_saved != state.step:
                checkpoint(state)  # the loop skips it when the stop comes after the last step
            newest = manager.paths()[-1][1] if manager.paths() else None
            raise RunInterrupted(flag.signum or signal.SIGINT, state.step, steps, run,
                                 newest) from None
        finally:
            bar.close()
        seconds = offset + time.perf_counter() - t_start
        memory = res.memory
        result = {
            "run": str(run), "model": str(run / MODEL_FILE), "prototypes": cfg["prototypes"],
            "steps": steps, "rows": int(source.rows), "loss": float(res.loss[-1]),
            "train_rmse": float(res.rmse[-1]), "seconds": seconds,
            "solve_events": int(res.solve_events),
            "resumed_from": None if ckpt is None else ckpt.step,
        }
        meta = {"config": cfg, "fingerprint": fingerprint, "result": result,
                "metrics": {"loss": res.loss.tolist(), "rmse": res.rmse.tolist(),
                            "seconds": seconds}}
        if writer:
            save(memory, run / MODEL_FILE, meta)
    if flag.signum is not None:
        say(f"{signal.Signals(flag.signum).name} received after the last step: the fit is "
            "complete and the model was saved")
    say(f"fit {steps} steps: loss {result['loss']:.6g}, train RMSE {result['train_rmse']:.6g}, "
        f"{seconds:.1f} s; model {run / MODEL_FILE}")
    return result


# ----------------------------------------------------------------------------------------------
# evaluation and prediction

_JIT_CACHE: dict = {}


def _jitted(name: str):
    """Jitted block functions (built lazily, shared by every call)."""
    if name in _JIT_CACHE:
        return _JIT_CACHE[name]
    import functools

    import jax
    import jax.numpy as jnp

    HIGHEST = jax.lax.Precision.HIGHEST

    def predict(K, V, Q, key_scale):
        q = Q.astype(K.dtype)
        if key_scale is not None:
            q = q * jnp.asarray(key_scale, K.dtype)
        A = jax.nn.softmax(jnp.matmul(q, K.T, precision=HIGHEST), axis=-1)
        return jnp.matmul(A, V.astype(K.dtype), precision=HIGHEST)

    @functools.partial(jax.jit, static_argnames=("key_scale",))
    def predict_block(K, V, Q, *, key_scale):
        return predict(K, V, Q, key_scale)

    @functools.partial(jax.jit, static_argnames=("key_scale",))
    def classify_block(K, V, Q, y, *, key_scale):
        pred = predict(K, V, Q, key_scale)
        C = pred.shape[1]
        onehot = jax.nn.one_hot(y, C, dtype=jnp.float64)
        sse = jnp.sum(jnp.square(onehot - pred.astype(jnp.float64)))
        correct = jnp.sum(jnp.argmax(pred, axis=1) == y)
        p = jnp.clip(pred.astype(jnp.float64), PROB_FLOOR, 1.0)
        p = p / jnp.sum(p, axis=1, keepdims=True)
        nll = -jnp.sum(jnp.log(jnp.take_along_axis(p, y[:, None], axis=1)))
        return sse, correct, nll

    _JIT_CACHE.update(predict=predict_block, classify=classify_block)
    return _JIT_CACHE[name]


def predict_rows(memory, source, start: int, stop: int) -> np.ndarray:
    """Predictions for rows ``start … stop-1`` of ``source`` (keys scaled as the source says)."""
    import jax
    import jax.numpy as jnp

    Q, _ = source.read(start, stop)
    with jax.enable_x64(True):
        out = _jitted("predict")(jnp.asarray(memory.K), jnp.asarray(memory.V), jnp.asarray(Q),
                                 key_scale=source.key_scale)
        return np.asarray(out)


def classification_metrics(memory, source, chunk_rows: int = 8192) -> dict:
    """Accuracy, log-loss and RMSE of class-probability predictions on a
    :class:`~scalemem._labels.LabelSource`. The log-loss is the mean of ``-log p_y`` after the
    predictions are clipped to ``[1e-7, 1]`` and renormalised to sum to 1 per row."""
    import jax
    import jax.numpy as jnp

    n = int(source.rows)
    sse, correct, nll = 0.0, 0, 0.0
    fn = _jitted("classify")
    with jax.enable_x64(True):
        K, V = jnp.asarray(memory.K), jnp.asarray(memory.V)
        for s in range(0, n, chunk_rows):
            e = min(s + chunk_rows, n)
            Q = source.keys(s, e)
            y = source.labels(s, e)
            a, b, c = fn(K, V, jnp.asarray(Q), jnp.asarray(y, jnp.int32),
                         key_scale=source.key_scale)
            sse += float(a)
            correct += int(b)
            nll += float(c)
    return {"rmse": float(np.sqrt(sse / (n * source.value_dim))), "rows": n,
            "accuracy": correct / n, "log_loss": nll / n,
            "log_loss_note": f"probabilities clipped to [{PROB_FLOOR:g}, 1] and renormalised",
            "classes": int(source.value_dim)}


def _model_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def eval_run(cfg: dict, *, say: Callable[[str], None] = print) -> dict:
    """Evaluate a model (file or run folder ``cfg["run"]``) on a store; see ``scalemem eval``."""
    from ._streaming import evaluate_source

    if cfg.get("run") is None:
        raise ConfigError("run", None, "give the run folder or model file to evaluate")
    path = Path(cfg["run"]).expanduser().resolve()
    memory, meta = _load(path)
    mcfg = meta.get("config") or {}
    labels = bool(cfg.get("values_are_labels") or mcfg.get("values_are_labels"))
    store = _abs(cfg.get("store") or mcfg.get("store"))
    keys = cfg.get("keys") or mcfg.get("keys")
    values = cfg.get("values") or mcfg.get("values")
    classes = mcfg.get("classes") if labels else None
    if labels and classes is None:
        classes = memory.value_dim
    source = open_data(store, keys, values, cfg.get("rows"), labels=labels, classes=classes)
    with contextlib.closing(source):
        if (memory.key_dim, memory.value_dim) != (source.key_dim, source.value_dim):
            raise DataError(f"{source.name}: the model maps {memory.key_dim} key columns to "
                            f"{memory.value_dim} value columns; these views give "
                            f"{source.key_dim} and {source.value_dim}: pass the --keys/--values "
                            "the model was fitted with")
        t0 = time.perf_counter()
        if labels:
            res = classification_metrics(memory, source, cfg.get("chunk_rows") or 8192)
        else:
            r = evaluate_source(memory, source, chunk_rows=cfg.get("chunk_rows") or 8192)
            res = {"rmse": r["rmse"], "rows": r["rows"]}
        res.update(seconds=time.perf_counter() - t0, model=str(path), store=store,
                   keys=source.key_view, values=values if labels else source.value_view,
                   split=source.split, prototypes=memory.prototypes)
        folder = _model_dir(path)
        if cfg.get("plots"):
            res["plots"] = _eval_plots(folder, memory, meta, source, res, labels, store)
        if path.is_dir():
            write_json(path / EVAL_FILE, res)
    what = (f"accuracy {res['accuracy']:.4f}, log-loss {res['log_loss']:.4f} "
            f"({res['log_loss_note']}), " if labels else "")
    say(f"{res['split']} of {store}: {what}RMSE {res['rmse']:.6f} over {res['rows']} rows")
    return res


def _key_positions(store: str, key_view: str, value_view: str) -> np.ndarray | None:
    """Positions of the key columns among the value columns, when keys are a column selection of
    the (whole) value array, as for image pixels; else ``None``."""
    from ._labels import open_array
    from ._sources import parse_view

    kv, vv = parse_view(key_view, "keys"), parse_view(value_view, "values")
    if kv.array != vv.array or vv.columns is not None:
        return None
    arr = open_array(store, kv.array)
    try:
        n = arr.shape[1]
    finally:
        arr.close()
    if kv.columns is None:
        return np.arange(n)
    parts = []
    for item in kv.columns:
        if isinstance(item, str):
            a = open_array(store, item)
            try:
                parts.append(np.asarray(a.array[...]).reshape(-1).astype(np.intp))
            finally:
                a.close()
        elif isinstance(item, slice):
            parts.append(np.arange(*item.indices(n)))
        else:
            parts.append(np.array([item]))
    return np.concatenate(parts)


def _eval_plots(folder: Path, memory, meta, source, res, labels, store) -> list[str]:
    from ._plots import plot_image_grid, plot_loss_curve, plot_rmse_vs_prototypes

    out = []
    hist = (meta.get("metrics") or {}).get("rmse")
    if hist:
        out.append(str(plot_loss_curve(hist, folder / "loss_curve.png")))
    # RMSE against P: this run and the sibling runs evaluated on the same rows of the same store
    points = {}
    for f in sorted(folder.parent.glob(f"*/{EVAL_FILE}")):
        if f.parent == folder:
            continue
        try:
            other = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if all(other.get(k) == res.get(k) for k in ("store", "split", "keys", "values")):
            points[int(other["prototypes"])] = float(other["rmse"])
    points[int(res["prototypes"])] = float(res["rmse"])
    rows = [{"prototypes": p, "rmse": points[p]} for p in sorted(points)]
    out.append(str(plot_rmse_vs_prototypes(
        rows, folder / "rmse_vs_prototypes.png",
        title=f"RMSE on {res['split']} against the number of prototypes")))
    if not labels and source.value_dim == 784:
        n = min(8, int(source.rows))
        Q, X = source.read(0, n)
        X = X.astype(np.float64) * (source.value_scale or 1.0)
        pred = predict_rows(memory, source, 0, n)
        pos = _key_positions(store, source.key_view, source.value_view)
        keys_img = None
        if pos is not None:
            keys_img = np.full_like(X, np.nan)
            keys_img[:, pos] = X[:, pos]
        out.append(str(plot_image_grid(X, keys_img, pred, folder / "predictions.png")))
    return out


def predict_run(cfg: dict, *, say: Callable[[str], None] = print) -> dict:
    """Write the predictions of a model for every row of a store into a new Zarr/HDF5 store,
    chunk by chunk; see ``scalemem predict``."""
    import jax
    import jax.numpy as jnp

    from ._sources import open_source
    from ._store import StoreWriter

    if cfg.get("model") is None:
        raise ConfigError("model", None, "give the model file or run folder to predict with")
    if cfg.get("out") is None:
        raise ConfigError("out", None, "give --out, the store to write (.zarr directory or "
                          ".h5 file)")
    path = Path(cfg["model"]).expanduser().resolve()
    memory, meta = _load(path)
    mcfg = meta.get("config") or {}
    store = _abs(cfg.get("store") or mcfg.get("store"))
    if store is None:
        raise ConfigError("store", None, "give the store whose keys to predict for")
    keys = cfg.get("keys") or mcfg.get("keys")
    out = Path(cfg["out"]).expanduser()
    fmt = cfg.get("format") or ("hdf5" if out.suffix.lower() in (".h5", ".hdf5", ".hdf")
                                else "zarr")
    chunk = int(cfg.get("chunk_rows") or 8192)
    if chunk < 1:
        raise ConfigError("chunk_rows", chunk, "must be ≥ 1")
    labels = bool(mcfg.get("values_are_labels"))
    with open_source(store, keys=keys, values=keys, rows=cfg.get("rows")) as source:
        if memory.key_dim != source.key_dim:
            raise DataError(f"{source.name}: the model takes {memory.key_dim} key columns, "
                            f"view {source.key_view!r} has {source.key_dim}; pass the --keys "
                            "the model was fitted with")
        n, t0 = int(source.rows), time.perf_counter()
        fn = _jitted("predict")
        dtype = np.dtype(str(memory.K.dtype))
        with StoreWriter(out, fmt, overwrite=bool(cfg.get("overwrite"))) as w, \
                jax.enable_x64(True):
            K, V = jnp.asarray(memory.K), jnp.asarray(memory.V)
            pw = w.create_array("predictions", (n, memory.value_dim), dtype,
                                chunk_rows=min(chunk, n))
            lw = (w.create_array("predicted_labels", (n, 1), np.int32, chunk_rows=min(chunk, n))
                  if labels else None)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                Q, _ = source.read(s, e)
                p = np.asarray(fn(K, V, jnp.asarray(Q), key_scale=source.key_scale))
                pw.append(p.astype(dtype, copy=False))
                if lw is not None:
                    lw.append(np.argmax(p, axis=1).astype(np.int32)[:, None])
            views = {"values": "predictions"}
            w.meta.update(rows=n, splits={"all": [0, n]}, model=str(path), source=store,
                          keys=source.key_view, source_rows=source.split,
                          description="predictions of a scalemem memory (scalemem predict)",
                          views=views)
    res = {"out": str(out), "format": fmt, "array": "predictions", "rows": n,
           "columns": memory.value_dim, "seconds": time.perf_counter() - t0, "model": str(path)}
    if labels:
        res["labels_array"] = "predicted_labels"
    say(f"wrote {n} × {memory.value_dim} predictions to {out} ({fmt}, array 'predictions')")
    return res


