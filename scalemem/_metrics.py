"""Training metrics as JSON lines: ``RUN/metrics.jsonl``, one object per step.

Each line is ``{"step": t, "loss": …, "rmse": …, "seconds": …, "rows_per_s": …}``: ``loss`` and
``rmse`` (training RMSE per value entry) are measured at ``K_t``, the keys before step ``t``'s
update, as in :class:`scalemem.StepReport`; ``seconds`` is the wall time of the fit so far,
summed over resumed sessions; ``rows_per_s`` is the throughput of that session (rows per step ×
steps per second, after its first step). Lines are flushed as they are written, so the file can
be followed while the fit runs; on resume, :func:`truncate_metrics` drops the lines past the
checkpoint so every step appears exactly once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._modelio import atomic_write

__all__ = ["MetricsWriter", "read_metrics", "truncate_metrics", "METRICS_FILE"]

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
    path = Path(path)
    kept = [r for r in read_metrics(path) if int(r["step"]) < step]
    seen: dict[int, dict] = {}
    for r in kept:  # a step logged twice (before a kill and after a resume) keeps the last
        seen[int(r["step"])] = r
    kept = [seen[k] for k in sorted(seen)]
    text = "".join(json.dumps(r) + "\n" for r in kept).encode()
    atomic_write(path, lambda f: f.write(text))
    return kept


class MetricsWriter:
    """Appends one JSON line per :class:`scalemem.StepReport` (use as the fit ``callback``).

    ``seconds_offset`` is the wall time of earlier sessions of the same run."""

    def __init__(self, path: str | os.PathLike, seconds_offset: float = 0.0):
        self.path = Path(path)
        self.seconds_offset = float(seconds_offset)
        self._f = open(self.path, "a", buffering=1)
        self._first: tuple[int, float] | None = None
        self.last: dict | None = None

    def __call__(self, report) -> None:
        done = report.step + 1
        if self._first is None:
            self._first = (done, report.seconds)
        d0, t0 = self._first
        per_step = (report.seconds - t0) / (done - d0) if done > d0 else report.seconds
        rec = {"step": int(report.step), "loss": float(report.loss), "rmse": float(report.rmse),
               "seconds": round(self.seconds_offset + float(report.seconds), 6),
               "rows_per_s": float(report.rows / per_step) if per_step > 0 else None}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        self.last = rec

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
