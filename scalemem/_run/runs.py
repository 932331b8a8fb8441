"""Run folders: the fit workflow behind ``scalemem fit`` (layout, checkpoints and the clean stop
on SIGINT/SIGTERM: docs/design.md, "Run folders")."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from .._config import DataConfig, FitConfig, RunConfig, build
from .._data import LabelSource, open_source
from .._engine import (FitInterrupted, LoopState, fit_data, is_writer, load_with_metadata,
                       read_metadata, save)
from .._engine.distributed import barrier
from .._engine.modelio import MODEL_FILE, atomic_write
from .._errors import CheckpointError, ConfigError, ScalememError
from .checkpoint import CheckpointManager, check_compatible, data_fingerprint, restore_opt_state
from .metrics import METRICS_FILE, MetricsWriter, truncate_metrics
from .progress import ProgressBar

__all__ = ["RunInterrupted", "fit_run", "open_data", "saved_config", "write_json", "absolute",
           "is_run_folder", "to_json", "CONFIG_FILE", "EVAL_FILE", "RUN_FORMAT",
           "enable_compile_cache"]

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
EVAL_FILE = "eval.json"
LOCK_FILE = ".lock"
RUN_FORMAT = "scalemem-run"  # config.json's "format": what makes a folder a run folder
RUN_NAMES = (CONFIG_FILE, MODEL_FILE, CHECKPOINT_DIR, METRICS_FILE, EVAL_FILE)  # what fit writes


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


def to_json(obj, **kw) -> str:
    """``json.dumps`` that writes valid JSON only: a NaN or infinite number becomes ``null``."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        return [clean(v) for v in o] if isinstance(o, (list, tuple)) else o

    return json.dumps(clean(obj), allow_nan=False, **kw)


def write_json(path: Path, obj) -> Path:
    return atomic_write(path, lambda f: f.write((to_json(obj, indent=2) + "\n").encode()))


def saved_config(run: str | os.PathLike) -> dict:
    """The resolved config of a run folder (its ``config.json``)."""
    p = Path(run)
    path = p / CONFIG_FILE
    if not path.is_file():
        if p.is_dir() and {q.name for q in p.iterdir()} <= {LOCK_FILE}:
            raise CheckpointError(f"{p}: not a run folder yet (the fit that made it stopped "
                                  f"before writing {CONFIG_FILE}); start it again: `scalemem fit "
                                  f"STORE … --out {p}`")
        what = f"not a run folder (no {CONFIG_FILE})" if p.is_dir() else "no such run folder"
        raise CheckpointError(f"{p}: {what}; --resume takes the --out folder of an earlier "
                              "`scalemem fit`")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    if obj.get("format") != RUN_FORMAT and not is_run_folder(p):
        raise CheckpointError(f"{p}: not a run folder (its {CONFIG_FILE} was not written by "
                              "scalemem); --resume takes the --out folder of an earlier "
                              "`scalemem fit`")
    fp = obj.get("fingerprint")
    if (fp is not None or obj.get("format") == RUN_FORMAT) and not (
            isinstance(fp, dict) and isinstance(fp.get("content_hash"), str)):
        raise CheckpointError(f"{path}: its field 'fingerprint' is {fp!r}, not the data "
                              "fingerprint scalemem writes; the file was edited or damaged. "
                              "Put the original back, or start a new run")
    return obj


@contextlib.contextmanager
def _run_lock(run: Path):
    """Hold an exclusive lock on the run folder (released by the OS if the process dies)."""
    import fcntl

    try:
        f = open(run / LOCK_FILE, "a")
    except OSError as e:
        raise ConfigError("out", str(run), f"cannot be written ({e.strerror or e}); choose a "
                          "writable --out") from None
    with f:
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
    object printed by ``scalemem fit --json``; raises :class:`RunInterrupted` after a signal.
    Everything is checked before anything is written or removed (docs/design.md, "Run
    folders")."""
    data, fitc, runc = (build(c, cfg) for c in (DataConfig, FitConfig, RunConfig))
    run = Path(runc.out or f"runs/fit-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
    saved = saved_config(run) if resume else None
    writer = is_writer()  # in a multi-process run only process 0 writes the run folder
    with open_data(absolute(data.store), data.keys, data.values, data.rows,
                   labels=data.values_are_labels, classes=data.classes) as source:
        if fitc.prototypes > source.rows:
            raise ConfigError("prototypes", fitc.prototypes, f"more prototypes than the "
                              f"{source.rows} rows of {source.name}")
        _check_out(run, absolute(data.store))
        labels = data.values_are_labels
        record = {**data.to_dict(), **fitc.to_dict(), **runc.to_dict(),
                  "store": absolute(data.store), "out": str(run), "keys": source.key_view,
                  "values": source.label_view if labels else source.value_view,
                  "classes": source.classes if labels else None}
        fingerprint = data_fingerprint(source)
        _check_folder(run, resume, cfg.get("overwrite"))  # before the lock file is made
        if writer:
            _make_folder(run)
        with (_run_lock(run) if writer else contextlib.nullcontext()):
            used = _check_folder(run, resume, cfg.get("overwrite"))  # again, under the lock
            barrier("scalemem-fit-checked")  # every process looked before process 0 writes
            manager = CheckpointManager(run / CHECKPOINT_DIR, keep=runc.keep_checkpoints)
            ckpt = manager.latest(warn=False) if resume else None
            if resume and ckpt is None and manager.skipped:
                raise CheckpointError(
                    f"{run}: none of its {len(manager.skipped)} checkpoints can be read (newest: "
                    f"{manager.skipped[0][1]}); start over with --overwrite, or put a good "
                    "checkpoint back")
            if resume:  # a checkpoint of scalemem ≤ 0.2 hashed a few rows: compare like it
                legacy = (ckpt.meta.get("fingerprint") or {}).get("hashed_rows") if ckpt else None
                check_fp = (data_fingerprint(source, hashed_rows=legacy)
                            if isinstance(legacy, list) else fingerprint)
                done = _check_resume(run, saved, record, check_fp, ckpt, fitc.steps)
                if done is not None:
                    say(f"{run}: already complete ({fitc.steps} steps); nothing to do")
                    return done
                say(f"{run}: no checkpoint yet; starting from step 0" if ckpt is None else
                    f"resuming {run} from step {ckpt.step} ({ckpt.path.name})")
            for skipped, why in manager.skipped if writer else ():  # set aside, kept: newer
                skipped.rename(skipped.with_name(skipped.name + ".damaged"))  # ones would
                say(f"set aside damaged checkpoint {skipped.name} as {skipped.name}.damaged: "
                    f"{why}")  # otherwise prune the checkpoints this run writes next
            if used and not resume and writer:  # --overwrite, everything checked: remove last
                _remove_run(run)
            if writer:  # from here on the folder is a run folder
                write_json(run / CONFIG_FILE, {"format": RUN_FORMAT, **record,
                                               "fingerprint": fingerprint})
            if runc.compile_cache:
                enable_compile_cache()
            return _fit(record, fitc, runc, run, source, fingerprint, manager, ckpt, say,
                        progress and writer)


def _check_out(run: Path, store: str | None) -> None:
    """``--out`` must be a folder (or not exist yet), under folders, and apart from the store."""
    if run.exists() and not run.is_dir():
        raise ConfigError("out", str(run), "is a file, not a folder; choose a folder for the run")
    up = next((p for p in run.parents if p.exists()), None)
    if up is not None and not up.is_dir():
        raise ConfigError("out", str(run), f"{up} is a file, so no folder can be made under it; "
                          "choose another --out")
    s = Path(store) if store else None
    if s is not None and (s == run or s in run.parents or run in s.parents):
        raise ConfigError("out", str(run), f"overlaps the store {s}; the run folder must be "
                          "apart from the data: choose another --out")


def _make_folder(run: Path) -> None:
    try:
        run.mkdir(parents=True, exist_ok=True)  # writable: checked by opening the lock file
    except OSError as e:
        raise ConfigError("out", str(run), f"cannot be written ({e.strerror or e}); choose a "
                          "writable --out") from None


def is_run_folder(run: str | os.PathLike) -> bool:
    """Whether ``run`` holds a run written by ``scalemem fit``: a config.json carrying scalemem's
    marker (or, from before the marker, one beside scalemem checkpoints or model file)."""
    run = Path(run)
    try:
        obj = json.loads((run / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(obj, dict):
        return False
    if obj.get("format") == RUN_FORMAT:
        return True
    try:  # a run of scalemem ≤ 0.2: a scalemem model or a loadable scalemem checkpoint
        return bool((run / MODEL_FILE).is_file() and read_metadata(run / MODEL_FILE)) or (
            CheckpointManager(run / CHECKPOINT_DIR).latest(warn=False) is not None)
    except (ScalememError, OSError):
        return False


def _check_folder(run: Path, resume: bool, overwrite) -> list[str]:
    """Refuse a folder that is not a run (with ``resume``), or that holds files a run writes
    (a run, unless ``overwrite``; foreign files always); the names of those files."""
    is_run, used = is_run_folder(run), [n for n in RUN_NAMES if (run / n).exists()]
    for name in used:
        p, folder = run / name, name == CHECKPOINT_DIR
        if (p.is_dir() if folder else p.is_file()) is False or p.is_symlink():
            raise ConfigError("out", str(run), f"{p} is not a {'folder' if folder else 'file'}"
                              f" (scalemem writes a {'folder' if folder else 'regular file'} "
                              "there); move it away, or choose another --out")
    if resume and not is_run:
        raise CheckpointError(f"{run}: its {CONFIG_FILE} was not written by scalemem; --resume "
                              "takes the --out folder of a `scalemem fit`")
    if resume or not used:
        return used
    if not is_run:
        raise ConfigError("out", str(run), f"is not a scalemem run folder but holds "
                          f"{', '.join(used)}, which scalemem did not write and never replaces or "
                          "deletes; choose another --out")
    if not overwrite:
        raise ConfigError("out", str(run), f"already holds a run ({', '.join(used)}); continue "
                          f"it with `scalemem fit --resume {run}`, start over with --overwrite, "
                          "or choose another --out")
    return used


def _remove_run(run: Path) -> None:
    """Delete what ``scalemem fit`` wrote in the run folder ``run`` (config.json last)."""
    for name in (MODEL_FILE, METRICS_FILE, EVAL_FILE):
        (run / name).unlink(missing_ok=True)
    folder = run / CHECKPOINT_DIR
    for p in [p for _, p in CheckpointManager(folder).paths()] + list(
            folder.glob(".step-*.npz.tmp-*")):
        p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # absent, or it holds files scalemem did not write
        folder.rmdir()
    (run / CONFIG_FILE).unlink(missing_ok=True)


def _check_resume(run, saved, record, fingerprint, ckpt, steps) -> dict | None:
    """Refuse a resume with other settings or other data (against config.json, the model and
    the checkpoint, naming the field); the result when the run is already complete."""
    saved_fp = saved.get("fingerprint") or {}  # none in a config.json from before 0.2.1
    check_compatible({"config": saved, "fingerprint": saved_fp}, record,
                     fingerprint if saved_fp else {}, run / CONFIG_FILE)
    try:
        meta = load_with_metadata(run)[1] if (run / MODEL_FILE).is_file() else None
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Delete {run / MODEL_FILE} and resume again: the model is "
                              "rebuilt from the newest checkpoint") from None
    if meta is not None:
        check_compatible(meta, record, fingerprint, run / MODEL_FILE)
    if ckpt is not None:
        check_compatible(ckpt.meta, record, fingerprint, ckpt.path)
    model_steps = (meta or {}).get("config", {}).get("steps")
    at = max(ckpt.step if ckpt is not None else 0, model_steps or 0)
    if at > steps:
        raise ConfigError("steps", steps, f"the run is at step {at}; resume with --steps ≥ {at}")
    return (meta.get("result") or {}) if model_steps == steps else None


def _fit(record, fitc, runc, run, source, fingerprint, manager, ckpt, say, progress) -> dict:
    writer = is_writer()
    offset = float(ckpt.meta.get("seconds", 0.0)) if ckpt is not None else 0.0
    if writer:
        truncate_metrics(run / METRICS_FILE, ckpt.step if ckpt is not None else 0,
                         None if ckpt is None else (ckpt.loss, ckpt.rmse))
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
    failed: list[CheckpointError] = []  # metrics.jsonl could not be appended (a full disk)
    with metrics_cm as metrics, _signals_caught() as caught:
        def callback(report):
            if not failed:
                try:
                    metrics(report)
                except CheckpointError as e:  # stop after this step, as after a signal
                    failed.append(e)
            bar(report)

        try:
            res = fit_data(source, fitc, callback=callback, start=start,
                           check={k: v for k, v in record.items() if k != "out"} | fingerprint,
                           checkpoint=checkpoint, checkpoint_every=runc.checkpoint_every,
                           checkpoint_seconds=runc.checkpoint_seconds or None,
                           should_stop=lambda: bool(caught or failed))
        except FitInterrupted as e:
            state = e.state
            if writer and manager.last_saved != state.step:
                checkpoint(state)  # the loop skips it when the stop comes after the last step
            if failed:
                raise failed[0] from None
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
        if writer:  # the final state too, so `--resume RUN --steps MORE` extends the run
            m = res.memory
            K = np.asarray(m.K) if m.bias is None else np.concatenate(
                [np.asarray(m.K), np.asarray(m.bias)[:, None]], axis=1)
            checkpoint(LoopState(fitc.steps, K, res.opt_state, res.loss[:-1].tolist(),
                                 res.rmse[:-1].tolist()))
            save(res.memory, run / MODEL_FILE, meta)
    if failed:
        raise failed[0]
    if caught:
        say(f"{signal.Signals(caught[-1]).name} received after the last step: the fit is "
            "complete and the model was saved")
    say(f"fit {fitc.steps} steps: loss {result['loss']:.6g}, train RMSE {result['train_rmse']:.6g}"
        f", {seconds:.1f} s ({res.residency} rows); model {run / MODEL_FILE}")
    return result
