"""Run folders: the fit workflow behind ``scalemem fit`` (layout, checkpoints and the clean stop
on SIGINT/SIGTERM: docs/design.md, "Run folders")."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import jax

from .._config import DataConfig, FitConfig, RunConfig, build, val_fraction
from .._data import LabelSource, open_source
from .._engine import FitInterrupted, LoopState, fit_data, is_writer, load_with_metadata, save
from .._engine.distributed import barrier
from .._engine.modelio import MODEL_FILE
from .._errors import CheckpointError, ConfigError
from .._progress import Progress
from .checkpoint import CheckpointManager, check_compatible, data_fingerprint, restore_opt_state
from .folders import (CHECKPOINT_DIR, CONFIG_FILE, EVAL_FILE, RUN_FORMAT, absolute, check_folder,
                      check_out, default_out, is_run_folder, make_folder, remove_run, run_lock,
                      saved_config, to_json, write_json)
from .metrics import METRICS_FILE, MetricsWriter, truncate_metrics

__all__ = ["RunInterrupted", "InterruptedEarly", "fit_run", "default_out", "open_data",
           "saved_config", "write_json", "absolute", "is_run_folder", "to_json", "CONFIG_FILE", "EVAL_FILE", "RUN_FORMAT",
           "enable_compile_cache"]


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


class InterruptedEarly(KeyboardInterrupt):
    """SIGINT/SIGTERM before the fit's first step (the data check, the initial keys): there is
    nothing to checkpoint, so the fit stops after the pass in progress; ``signum`` is the
    signal."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.run: Path | None = None  # the run folder, once it holds its config.json
        self.resume: str | None = None  # the command that starts the run again, then
        super().__init__(f"{signal.Signals(signum).name} received before the first step")

    @property
    def result(self) -> dict:
        """What ``scalemem fit --json`` prints for it (the fields of RunInterrupted's)."""
        return {"interrupted": True, "signal": signal.Signals(self.signum).name, "step": None,
                "run": None if self.run is None else str(self.run), "checkpoint": None,
                "resume": self.resume}


@contextlib.contextmanager
def _signals_caught():
    """SIGINT/SIGTERM handlers for a fit that only append the signal to the yielded list: the
    fit polls it, between the passes of the data check and of the initial keys, and between
    steps (then it checkpoints and stops). They never raise: a signal can arrive while Python
    runs a callback (JAX's garbage-collection hook), where an exception is printed and lost.
    The old handlers are back on exit."""
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
    """Turn on JAX's persistent compilation cache (every program: reading a small one back
    takes milliseconds, compiling it tens of them, and a fit runs a dozen) in
    ``$SCALEMEM_CACHE_DIR``, else ``scalemem/jax`` in the user cache folder (``$XDG_CACHE_HOME``,
    else ``~/.cache``), so a repeated or resumed run skips compiling them."""
    if os.environ.get("SCALEMEM_CACHE_DIR"):
        path = Path(os.environ["SCALEMEM_CACHE_DIR"]).expanduser()
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scalemem" / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache only costs compile time
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def fit_run(cfg: dict, *, resume: bool = False, say: Callable[[str], None] = print,
            progress: bool = True) -> dict:
    """Fit as configured by ``cfg`` (the fields of DataConfig, FitConfig and RunConfig) into the run
    folder ``cfg["out"]``; with ``resume`` continue from its newest checkpoint. Returns the result
    object printed by ``scalemem fit --json``; raises :class:`RunInterrupted` after a signal
    (:class:`InterruptedEarly` before the first step). Everything is checked before anything
    is written or removed (docs/design.md, "Run folders")."""
    with _signals_caught() as caught:
        return _fit_run(cfg, resume, say, progress, caught)


def _fit_run(cfg, resume, say, progress, caught) -> dict:
    def poll() -> None:  # before the fit starts: nothing to checkpoint, stop at once
        if caught:
            raise InterruptedEarly(caught[-1])

    data, fitc, runc = (build(c, cfg) for c in (DataConfig, FitConfig, RunConfig))
    run = Path(runc.out or default_out("fit")).expanduser().resolve()
    saved = saved_config(run) if resume else None
    writer = is_writer()  # in a multi-process run only process 0 writes the run folder
    bar = Progress(enabled=progress and writer, interval=runc.log_seconds)
    bar.note(f"{'resuming' if resume else 'fitting'} {run}: P={fitc.prototypes}, "
             f"{fitc.steps} steps ({fitc.recipe} recipe), data {data.store}")
    with open_data(absolute(data.store), data.keys, data.values, data.rows,
                   labels=data.values_are_labels, classes=data.classes) as source, \
            _validation_rows(data, source) as validation:
        if fitc.prototypes > source.rows:
            raise ConfigError("prototypes", fitc.prototypes, f"more prototypes than the "
                              f"{source.rows} rows of {source.name}")
        check_out(run, absolute(data.store))
        labels = data.values_are_labels
        record = {**data.to_dict(), **fitc.to_dict(), **runc.to_dict(),
                  "store": absolute(data.store), "out": str(run), "keys": source.key_view,
                  "values": source.label_view if labels else source.value_view,
                  "classes": source.classes if labels else None}
        bar.note(f"{source.rows} rows; checking the data (one pass for its fingerprint)")
        fingerprint = data_fingerprint(source, poll=poll)
        check_folder(run, resume, cfg.get("overwrite"))  # before the lock file is made
        if writer:
            make_folder(run)
        with (run_lock(run) if writer else contextlib.nullcontext()):
            used = check_folder(run, resume, cfg.get("overwrite"))  # again, under the lock
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
                remove_run(run)
            if writer:  # from here on the folder is a run folder
                write_json(run / CONFIG_FILE, {"format": RUN_FORMAT, **record,
                                               "fingerprint": fingerprint})
            if runc.compile_cache:
                enable_compile_cache()
            return _fit(record, fitc, runc, run, source, fingerprint, manager, ckpt, say, bar,
                        validation, caught)


@contextlib.contextmanager
def _validation_rows(data: DataConfig, source):
    """What ``fit_data`` takes as ``validation`` for ``data.val_rows``: ``None``, a fraction of
    the fit rows, or the source of those rows (which must not overlap the fit rows)."""
    spec = data.val_rows
    if spec is None or val_fraction(spec) is not None:
        yield None if spec is None else val_fraction(spec)
        return
    with open_data(absolute(data.store), data.keys, data.values, spec,
                   labels=data.values_are_labels, classes=getattr(source, "classes", None)
                   if data.values_are_labels else None) as val:
        a0 = int(getattr(source, "row_offset", 0) or 0)
        b0 = int(getattr(val, "row_offset", 0) or 0)
        if a0 < b0 + int(val.rows) and b0 < a0 + int(source.rows):
            raise ConfigError("val_rows", spec, f"rows {b0}:{b0 + int(val.rows)} of the store "
                              f"overlap the fit rows {a0}:{a0 + int(source.rows)}; validation "
                              "rows must be held out (or give a fraction, e.g. 5%, taken from "
                              "the fit rows)")
        yield val


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


def _fit(record, fitc, runc, run, source, fingerprint, manager, ckpt, say, bar,
         validation, caught) -> dict:
    writer = is_writer()
    offset = float(ckpt.meta.get("seconds", 0.0)) if ckpt is not None else 0.0
    passes = [int(ckpt.meta.get("passes", 0)) if ckpt is not None else 0, 0]  # earlier, now
    if writer:
        truncate_metrics(run / METRICS_FILE, ckpt.step if ckpt is not None else 0,
                         None if ckpt is None else (ckpt.loss, ckpt.rmse))
    t_start = time.perf_counter()

    def checkpoint(state) -> None:
        if writer:
            manager.save(state, {"config": record, "fingerprint": fingerprint,
                                 "seconds": offset + time.perf_counter() - t_start,
                                 "passes": sum(passes)})

    start = None if ckpt is None else LoopState(
        ckpt.step, ckpt.K, lambda template: restore_opt_state(ckpt, template), ckpt.loss,
        ckpt.rmse, ckpt.validation)
    metrics_cm = (MetricsWriter(run / METRICS_FILE, seconds_offset=offset) if writer
                  else contextlib.nullcontext(lambda report: None))
    failed: list[CheckpointError] = []  # metrics.jsonl could not be appended (a full disk)
    with metrics_cm as metrics:
        def callback(report):
            passes[1] = report.passes or 0
            if report.passes is not None:  # counted over the run's sessions
                report = dataclasses.replace(report, passes=passes[0] + report.passes)
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
                           should_stop=lambda: bool(caught or failed), validation=validation,
                           note=bar.note if bar.enabled else None)
        except FitInterrupted as e:
            if e.state is None:  # before the first step: config.json is written, no checkpoint
                early = InterruptedEarly(caught[-1] if caught else signal.SIGINT)
                early.run, early.resume = run, f"scalemem fit --resume {run}"
                raise early from None
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
        at = -1 if res.best_step is None else res.best_step
        result = {"run": str(run), "model": str(run / MODEL_FILE), "prototypes": fitc.prototypes,
                  "steps": fitc.steps, "rows": int(res.rows), "loss": float(res.loss[at]),
                  "train_rmse": res.train_rmse, "seconds": seconds,
                  "solve_events": int(res.solve_events), "residency": res.residency,
                  "optimizer": fitc.optimizer, "passes": passes[0] + int(res.passes),
                  "converged": bool(res.converged), "stop_reason": res.stop_reason or None,
                  "steps_run": len(res.loss) - 1,
                  "resumed_from": None if ckpt is None else ckpt.step}
        if res.validation is not None:
            best = res.best_step if res.best_step is not None else res.validation[-1]["step"]
            kept = next(v for v in res.validation if v["step"] == best)
            result.update(val_rows=record["val_rows"], val_rmse=kept["rmse"], best_step=best,
                          stopped_early=res.stopped_early, steps_run=len(res.loss) - 1,
                          **{f"val_{k}": v for k, v in kept.items() if k in ("accuracy",
                                                                            "log_loss")})
        meta = {"config": record, "fingerprint": fingerprint, "result": result,
                "store": record["store"], "key_view": record["keys"],
                "value_view": record["values"],
                "metrics": {"loss": res.loss.tolist(), "rmse": res.rmse.tolist(),
                            "seconds": seconds, "validation": res.validation}}
        if writer:  # the final state too, so `--resume RUN --steps MORE` extends the run
            checkpoint(res.state)
            save(res.memory, run / MODEL_FILE, meta)
    if failed:
        raise failed[0]
    if caught:
        say(f"{signal.Signals(caught[-1]).name} received after the last step: the fit is "
            "complete and the model was saved")
    val = (f", validation RMSE {result['val_rmse']:.6g} (kept step {result['best_step']}"
           f"{', stopped early at ' + str(result['steps_run']) if res.stopped_early else ''})"
           if res.validation is not None else "")
    conv = (f" (stopped at step {len(res.loss) - 1}: {res.stop_reason})" if res.converged
            else "")
    say(f"fit {fitc.steps} steps{conv}: loss {result['loss']:.6g}, train RMSE {result['train_rmse']:.6g}"
        f"{val}, {seconds:.1f} s, {result['passes']} passes over the {res.residency} rows; "
        f"model {run / MODEL_FILE}")
    return result
