"""Training metrics as JSON lines, ``RUN/metrics.jsonl``: one object per step, ``{"step": t,
"loss": …, "rmse": …, "seconds": …, "rows_per_s": …, "passes": …}`` for t = 0 … steps (the loss at
K_t; ``passes``: the passes over the fit rows when step t ended, initial keys included), with
``val_rmse`` (``val_accuracy``, ``val_log_loss``) where validation ran (fields and resume:
docs/design.md, "Metrics and progress")."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .._engine.modelio import atomic_write
from .._errors import CheckpointError
from .._progress import StepRate

__all__ = ["MetricsWriter", "read_metrics", "truncate_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


def _lines(path: Path):
    """``(line number, record or None, whether the line is complete)`` for each non-blank line of
    a metrics file; a record is a JSON object whose ``step`` is an integer ≥ 0."""
    try:
        if not path.is_file() and (path.exists() or path.is_symlink()):
            raise OSError("not a regular file")  # a FIFO, a device (/dev/zero) or a folder
        data = path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e
    for number, raw in enumerate(data.splitlines(keepends=True), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8 (a ValueError too), not JSON, too deep
            rec = None
        step = rec.get("step") if isinstance(rec, dict) else None
        ok = isinstance(step, int) and not isinstance(step, bool) and step >= 0
        yield number, rec if ok else None, raw.endswith((b"\n", b"\r"))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics file (``path`` or ``path/metrics.jsonl``). A line that is not a
    record (a torn last line left by a killed process, damaged text) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [rec for _, rec, _ in _lines(path) if rec is not None]


def truncate_metrics(path: str | os.PathLike, step: int, history=None) -> list[dict]:
    """Keep the records of steps ``< step`` (atomically rewriting the file); return them. A step
    with no record (its append failed) gets one from ``history`` (the checkpoint's ``(losses,
    rmses)``), its times unknown (``null``).

    Only a torn last line (no newline: the process was killed while writing it) is dropped.
    Any other line that is not a record is a :class:`CheckpointError` naming the file and the
    line, and the file is left as it is: rewriting it would silently delete that line."""
    path = Path(path)
    seen = {}
    for number, rec, complete in _lines(path):
        if rec is None and complete:
            raise CheckpointError(
                f"{path}, line {number}: not a metrics record (a JSON object {{\"step\": N, …}} "
                "with N ≥ 0); the file was left as it is. Fix or delete that line (or the whole "
                "file: it is a log, the fit's state is in its checkpoints) and resume again")
        if rec is not None and rec["step"] < step:
            seen[rec["step"]] = rec  # a step logged twice (before a kill and after a resume)
    for k, (loss, rmse) in enumerate(zip(*(history or ((), ()))) if step else ()):
        if k < step:
            seen.setdefault(k, {"step": k, "loss": float(loss), "rmse": float(rmse),
                                "seconds": None, "rows_per_s": None})
    kept = [seen[k] for k in sorted(seen)]  # keeps its last record
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    return kept


class MetricsWriter(contextlib.AbstractContextManager):
    """Appends one JSON line per :class:`scalemem.StepReport` (use as the fit ``callback``);
    ``seconds_offset`` is the wall time of earlier sessions of the same run. A failed write (a
    full disk) is a :class:`CheckpointError` naming the file and the step (``error.step``)."""

    def __init__(self, path: str | os.PathLike, seconds_offset: float = 0.0):
        self.path, self.seconds_offset = Path(path), float(seconds_offset)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot be opened for writing ({e}); check the "
                                  "permissions and free space of its folder") from e
        self._rate = StepRate()

    def __call__(self, report) -> None:
        rows_per_s = self._rate(report)[1]
        rec = {"step": int(report.step), "loss": float(report.loss), "rmse": float(report.rmse),
               "seconds": round(self.seconds_offset + float(report.seconds), 6),
               "rows_per_s": None if rows_per_s is None else float(rows_per_s)}
        if getattr(report, "passes", None) is not None:
            rec["passes"] = int(report.passes)
        for k, v in (getattr(report, "val", None) or {}).items():  # validation at this step
            rec[f"val_{k}"] = float(v)
        data = (json.dumps(rec) + "\n").encode()
        try:  # unbuffered: each record reaches the file (or fails) here, never at close
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as e:
            err = CheckpointError(f"{self.path}: cannot append the record of step {rec['step']} "
                                  f"({e}); free space on that disk, then continue the run with "
                                  "`scalemem fit --resume RUN`")
            err.step = rec["step"]
            raise err from e

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):  # nothing is buffered: no record is lost here
                os.close(fd)

    def __exit__(self, *exc):
        self.close()
