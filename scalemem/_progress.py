"""A one-line progress bar on stderr: step, loss, training RMSE, rows/s and ETA.

It is fed :class:`scalemem.StepReport`\\ s by the fit loop's ``callback``. It draws only when
enabled and stderr is a terminal (so logs and pipes stay clean), at most ``max_hz`` times a
second, and ends with a newline on :meth:`close`.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """``1:02:03``, ``2:03`` or ``0:07``; ``--:--`` when unknown."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """``ProgressBar(enabled=not quiet)``; call it with each ``StepReport``; :meth:`close` at
    the end. ``stream`` defaults to ``sys.stderr``; drawing needs ``stream.isatty()`` unless
    ``force`` is true."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, *, width: int = 24,
                 max_hz: float = 10.0, force: bool = False, label: str = "fit"):
        self.stream = stream if stream is not None else sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = bool(enabled) and (tty or force)
        self.width, self.label = width, label
        self._min_dt = 1.0 / max_hz if max_hz > 0 else 0.0
        self._first: tuple[int, float] | None = None  # (steps done, seconds) at the first report
        self._last_draw = -float("inf")
        self._drawn = False
        self.last_line = ""

    def line(self, report) -> str:
        """The text drawn for ``report`` (also used by tests)."""
        done = report.step + 1
        if self._first is None:
            self._first = (done, report.seconds)
        d0, t0 = self._first
        # seconds per step from the reports after the first, so the compile time of the first
        # step does not count; for the first report, its own time
        per_step = (report.seconds - t0) / (done - d0) if done > d0 else report.seconds
        rate = report.rows / per_step if per_step > 0 else float("nan")
        eta = per_step * (report.steps - done)
        frac = done / report.steps if report.steps else 1.0
        fill = int(round(frac * self.width))
        bar = "#" * fill + "." * (self.width - fill)
        return (f"{self.label} [{bar}] step {done}/{report.steps}  loss {report.loss:.4g}  "
                f"rmse {report.rmse:.4g}  {_si(rate)} rows/s  ETA {format_duration(eta)}")

    def __call__(self, report) -> None:
        text = self.line(report)
        self.last_line = text
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw < self._min_dt and report.step + 1 < report.steps:
            return
        self._last_draw = now
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _si(x: float) -> str:
    if x != x:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"
