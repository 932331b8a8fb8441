"""Run folders: the fit workflow behind ``scalemem fit`` (layout, checkpoints and the clean stop
on SIGINT/SIGTERM: docs/design.md, "Run folders")."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import jax

from .._config import DataConfig, FitConfig, RunConfig, build
from .._data import LabelSource, open_source
from .._engine import FitInterrupted, LoopState, fit_data, is_writer, load_with_metadata, save
from .._engine.distributed import barrier
from .._engine.modelio import MODEL_FILE, atomic_write
from .._errors import CheckpointError, ConfigError
from .checkpoint import CheckpointManager, check_compatible, data_fingerprint, restore_opt_state
from .metrics import METRICS_FILE, MetricsWriter, truncate_metrics
from .progress import ProgressBar

__all__ = ["RunInterrupted", "fit_run", "open_data", "saved_config", "write_json", "absolute",
           "CONFIG_FILE", "EVAL_FILE", "enable_compile_cache"]

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
EVAL_FILE = "eval.json"
LOCK_FILE = ".lock"


class RunInterrupted(Exception):
    """A fit stopped by SIGINT/SIGTERM after writing a checkpoint (not an error); ``result`` is
    the object that ``--json`` prints, ``exit_code`` 128 + the signal number."""

    def __init__(self, signum: int, step: int, steps: int, run: Path, checkpoint: Path | None):
        self.exit_code = 128 + int(signum)
        name, resume = signal.Signals(signum).name, f"scalemem fit --resume {run}"
        self.result = {"interrupted": True, "signal": name, "step": step, "steps": steps,
                       "run": str(run), "checkpoint": str(checkpoint) if checkpoint else None,
                       "resume": resume}
        super().__init__(f"{name} received: stopped after step {step} of {steps}; checkpoint "
                         f"{checkpoint}. Continue with: {resume}")


def absolute(p) -> str | None:
    return None if p is None else str(Path(p).expanduser().resolve())


def write_json(path: Path, obj) -> Path:
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def saved_config(run: str | os.PathLike) -> dict:
    """The resolved config of a run folder (its ``config.json``)."""
    p = Path(run)
    path = p / CONFIG_FILE
    if not path.is_file():
        what = f"not a run folder (no {CONFIG_FILE})" if p.is_dir() else "no such run folder"
        raise CheckpointError(f"{p}: {what}; --resume takes the --out folder of an earlier "
                              "`scalemem fit`")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return obj


@contextlib.contextmanager
def _run_lock(run: Path):
    """Hold an exclusive lock on the run folder (released by the OS if the process dies)."""
    import fcntl

    with open(run / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise CheckpointError(f"{run}: another scalemem process is fitting this run; wait "
                                  "for it to finish or stop it first") from e
        yield


@contextlib.contextmanager
def _signals_caught():
    """SIGINT/SIGTERM handlers that only append the signal to the yielded list (the fit loop
    polls it); the old handlers are back on exit."""
    caught, old = [], {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def open_data(store, keys=None, values=None, rows=None, *, labels: bool = False,
              classes: int | None = None):
    """The source a run reads: ``open_source(store, keys, values, rows)``, or with ``labels``
    a :class:`~scalemem._data.LabelSource` (values = one-hot of the integer array ``values``)."""
    if store is None:
        raise ConfigError("store", None, "give the store to read (a Zarr directory or an HDF5 "
                          "file), e.g. `scalemem fit data.zarr …`")
    return (LabelSource(store, keys, values, rows, classes) if labels
            else open_source(store, keys=keys, values=values, rows=rows))


def enable_compile_cache() -> None:
    """Turn on JAX's persistent compilation cache (programs that took at least 0.2 s to compile)
    in ``$SCALEMEM_CACHE_DIR``, else ``scalemem/jax`` in the user cache folder
    (``$XDG_CACHE_HOME``, else ``~/.cache``), so a repeated or resumed run skips compiling them."""
    if os.environ.get("SCALEMEM_CACHE_DIR"):
        path = Path(os.environ["SCALEMEM_CACHE_DIR"]).expanduser()
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scalemem" / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache only costs compile time
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def fit_run(cfg: dict, *, resume: bool = False, say: Callable[[str], None] = print,
            progress: bool = True) -> dict:
    """Fit as configured by ``cfg`` (the fields of DataConfig, FitConfig and RunConfig) into the run
    folder ``cfg["out"]``; with ``resume`` continue from its newest checkpoint. Returns the result
    object printed by ``scalemem fit --json``; raises :class:`RunInterrupted` after a signal."""
    data, fitc, runc = (build(c, cfg) for c in (DataConfig, FitConfig, RunConfig))
    run = Path(runc.out or f"runs/fit-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
    if resume and not run.is_dir():
        raise CheckpointError(f"{run}: no such run folder to resume")
    writer = is_writer()  # in a multi-process run only process 0 writes the run folder
    if writer:
        run.mkdir(parents=True, exist_ok=True)
    with (_run_lock(run) if writer else contextlib.nullcontext()):
        used = [n for n in (MODEL_FILE, CHECKPOINT_DIR, METRICS_FILE) if (run / n).exists()]
        if used and not resume and not cfg.get("overwrite"):
            raise ConfigError("out", str(run), f"already holds a run ({', '.join(used)}); "
                              f"continue it with `scalemem fit --resume {run}`, start over "
                              "with --overwrite, or choose another --out")
        barrier("scalemem-fit-checked")  # every process looked before process 0 writes
        if used and not resume and writer:  # --overwrite
            for name in (MODEL_FILE, METRICS_FILE, EVAL_FILE, CONFIG_FILE):
                (run / name).unlink(missing_ok=True)
            if (run / CHECKPOINT_DIR).is_dir():
                shutil.rmtree(run / CHECKPOINT_DIR)
        with open_data(absolute(data.store), data.keys, data.values, data.rows,
                       labels=data.values_are_labels, classes=data.classes) as source:
            labels = data.values_are_labels
            record = {**data.to_dict(), **fitc.to_dict(), **runc.to_dict(),
                      "store": absolute(data.store), "out": str(run), "keys": source.key_view,
                      "values": source.label_view if labels else source.value_view,
                      "classes": source.classes if labels else None}
            fingerprint = data_fingerprint(source)
            manager = CheckpointManager(run / CHECKPOINT_DIR, keep=runc.keep_checkpoints)
            ckpt = manager.latest() if resume else None
            if ckpt is not None:
                check_compatible(ckpt.meta, record, fingerprint, ckpt.path)
                if ckpt.step > fitc.steps:
                    raise ConfigError("steps", fitc.steps, f"the checkpoint is at step "
                                      f"{ckpt.step}; resume with --steps ≥ {ckpt.step}")
            if resume:
                done = _completed(run, record, fingerprint)
                if done is not None:
                    say(f"{run}: already complete ({fitc.steps} steps); nothing to do")
                    return done
                say(f"{run}: no checkpoint yet; starting from step 0" if ckpt is None else
                    f"resuming {run} from step {ckpt.step} ({ckpt.path.name})")
            if writer:
                write_json(run / CONFIG_FILE, record)
            if runc.compile_cache:
                enable_compile_cache()
            return _fit(record, fitc, runc, run, source, fingerprint, manager, ckpt, say,
                        progress and writer)


def _completed(run: Path, record: dict, fingerprint: dict) -> dict | None:
    if not (run / MODEL_FILE).is_file():
        return None
    _, meta = load_with_metadata(run)
    if (meta.get("config") or {}).get("steps") != record["steps"]:
        return None
    check_compatible(meta, record, fingerprint, run / MODEL_FILE)
    return meta.get("result") or {}


def _fit(record, fitc, runc, run, source, fingerprint, manager, ckpt, say, progress) -> dict:
    writer = is_writer()
    offset = float(ckpt.meta.get("seconds", 0.0)) if ckpt is not None else 0.0
    if writer:
        truncate_metrics(run / METRICS_FILE, ckpt.step if ckpt is not None else 0)
    bar = ProgressBar(enabled=progress)
    t_start = time.perf_counter()

    def checkpoint(state) -> None:
        if writer:
            manager.save(state, {"config": record, "fingerprint": fingerprint,
                                 "seconds": offset + time.perf_counter() - t_start})

    start = None if ckpt is None else LoopState(
        ckpt.step, ckpt.K, lambda template: restore_opt_state(ckpt, template), ckpt.loss,
        ckpt.rmse)
    metrics_cm = (MetricsWriter(run / METRICS_FILE, seconds_offset=offset) if writer
                  else contextlib.nullcontext(lambda report: None))
    with metrics_cm as metrics, _signals_caught() as caught:
        def callback(report):
            metrics(report)
            bar(report)

        try:
            res = fit_data(source, fitc, callback=callback, start=start,
                           check={k: v for k, v in record.items() if k != "out"} | fingerprint,
                           checkpoint=checkpoint, checkpoint_every=runc.checkpoint_every,
                           checkpoint_seconds=runc.checkpoint_seconds or None,
                           should_stop=lambda: bool(caught))
        except FitInterrupted as e:
            state = e.state
            if writer and manager.last_saved != state.step:
                checkpoint(state)  # the loop skips it when the stop comes after the last step
            newest = manager.paths()[-1][1] if manager.paths() else None
            raise RunInterrupted(caught[-1] if caught else signal.SIGINT, state.step,
                                 fitc.steps, run, newest) from None
        finally:
            bar.close()
        seconds = offset + time.perf_counter() - t_start
        result = {"run": str(run), "model": str(run / MODEL_FILE), "prototypes": fitc.prototypes,
                  "steps": fitc.steps, "rows": int(source.rows), "loss": float(res.loss[-1]),
                  "train_rmse": float(res.rmse[-1]), "seconds": seconds,
                  "solve_events": int(res.solve_events), "residency": res.residency,
                  "resumed_from": None if ckpt is None else ckpt.step}
        meta = {"config": record, "fingerprint": fingerprint, "result": result,
                "store": record["store"], "key_view": record["keys"],
                "value_view": record["values"],
                "metrics": {"loss": res.loss.tolist(), "rmse": res.rmse.tolist(),
                            "seconds": seconds}}
        if writer:
            save(res.memory, run / MODEL_FILE, meta)
    if caught:
        say(f"{signal.Signals(caught[-1]).name} received after the last step: the fit is "
            "complete and the model was saved")
    say(f"fit {fitc.steps} steps: loss {result['loss']:.6g}, train RMSE {result['train_rmse']:.6g}"
        f", {seconds:.1f} s ({res.residency} rows); model {run / MODEL_FILE}")
    return result
