"""Run folders: what makes a folder a run, what a fit may write or remove there, and the small
JSON helpers of the run side (docs/design.md, "Run folders")."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

from .._engine import read_metadata
from .._engine.modelio import MODEL_FILE, atomic_write
from .._errors import CheckpointError, ConfigError, ScalememError
from .checkpoint import CheckpointManager
from .metrics import METRICS_FILE

__all__ = ["CONFIG_FILE", "CHECKPOINT_DIR", "EVAL_FILE", "LOCK_FILE", "RUN_FORMAT", "RUN_NAMES",
           "EVAL_GLOBS", "absolute", "to_json", "write_json", "saved_config", "run_lock",
           "default_out", "check_out", "make_folder", "is_run_folder", "check_folder",
           "remove_run"]

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
EVAL_FILE = "eval.json"
LOCK_FILE = ".lock"
RUN_FORMAT = "scalemem-run"  # config.json's "format": what makes a folder a run folder
RUN_NAMES = (CONFIG_FILE, MODEL_FILE, CHECKPOINT_DIR, METRICS_FILE, EVAL_FILE)  # what fit writes
# what `scalemem eval` writes into a run folder: eval-SPLIT.json and pictures (--plots)
EVAL_GLOBS = ("eval-*.json", "loss_curve.png", "rmse_vs_prototypes.png", "predictions.png",
              "confusion.png")


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
def run_lock(run: Path):
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



def default_out(command: str) -> str:
    """The one default output folder scheme: ``runs/COMMAND-YYYYmmdd-HHMMSS``."""
    return f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_out(run: Path, store: str | None) -> None:
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


def make_folder(run: Path) -> None:
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


def check_folder(run: Path, resume: bool, overwrite) -> list[str]:
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


def remove_run(run: Path) -> None:
    """Delete what ``scalemem fit`` wrote in the run folder ``run`` (config.json last)."""
    for name in (MODEL_FILE, METRICS_FILE, EVAL_FILE):
        (run / name).unlink(missing_ok=True)
    for p in [p for g in EVAL_GLOBS for p in run.glob(g)]:  # the old run's evaluations
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
    folder = run / CHECKPOINT_DIR
    for p in [p for _, p in CheckpointManager(folder).paths()] + list(
            folder.glob(".step-*.npz.tmp-*")):
        p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # absent, or it holds files scalemem did not write
        folder.rmdir()
    (run / CONFIG_FILE).unlink(missing_ok=True)
