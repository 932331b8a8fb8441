"""Training metrics as JSON lines, ``RUN/metrics.jsonl``: one object per step, ``{"step": t,
"loss": …, "rmse": …, "seconds": …, "rows_per_s": …}`` (fields and resume: docs/design.md,
"Metrics and progress")."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .._engine.modelio import atomic_write

__all__ = ["MetricsWriter", "StepRate", "read_metrics", "truncate_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics file (a torn last line, left by a killed process, is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def truncate_metrics(path: str | os.PathLike, step: int) -> list[dict]:
    """Keep the records of steps ``< step`` (atomically rewriting the file); return them."""
    # a step logged twice (before a kill and after a resume) keeps its last record
    seen = {int(r["step"]): r for r in read_metrics(path) if int(r["step"]) < step}
    kept = [seen[k] for k in sorted(seen)]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    return kept


class StepRate:
    """Called with each :class:`scalemem.StepReport` of a session: ``(seconds per step, rows per
    second or None)``, measured over the reports after the session's first, so the compile time
    of its first step does not count (for the first report, over its own time)."""

    def __init__(self):
        self._first: tuple[int, float] | None = None  # (steps done, seconds) at the first report

    def __call__(self, report) -> tuple[float, float | None]:
        done = report.step + 1
        if self._first is None:
            self._first = (done, report.seconds)
        d0, t0 = self._first
        per_step = (report.seconds - t0) / (done - d0) if done > d0 else report.seconds
        return per_step, (report.rows / per_step if per_step > 0 else None)


class MetricsWriter(contextlib.AbstractContextManager):
    """Appends one JSON line per :class:`scalemem.StepReport` (use as the fit ``callback``);
    ``seconds_offset`` is the wall time of earlier sessions of the same run."""

    def __init__(self, path: str | os.PathLike, seconds_offset: float = 0.0):
        self.seconds_offset = float(seconds_offset)
        self._f = open(path, "a", buffering=1)
        self._rate = StepRate()

    def __call__(self, report) -> None:
        rows_per_s = self._rate(report)[1]
        rec = {"step": int(report.step), "loss": float(report.loss), "rmse": float(report.rmse),
               "seconds": round(self.seconds_offset + float(report.seconds), 6),
               "rows_per_s": None if rows_per_s is None else float(rows_per_s)}
        self._f.write(json.dumps(rec) + "\n")  # buffering=1: flushed line by line

    def close(self) -> None:
        self._f.close()

    def __exit__(self, *exc):
        self.close()
