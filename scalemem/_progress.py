"""Progress of a fit, wherever it runs: a tqdm bar in a terminal (a widget in a notebook, through
``tqdm.auto``), and plain lines at a steady interval when the stream is a file or a pipe (a
batch job's log), so every log shows life; events (compiling, the initial keys, early stopping)
are lines of their own. Steps count as ``metrics.jsonl`` does: report ``t`` is the loss at
``K_t`` (0: the initial keys; ``steps``: the final keys)."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

__all__ = ["Progress", "StepRate", "interactive", "LOG_SECONDS"]

LOG_SECONDS = 10.0  # seconds between plain progress lines (off a terminal)


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


def _in_notebook() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"  # Jupyter, VS Code notebooks


def interactive(stream: TextIO | None = None) -> bool:
    """Whether a person is watching ``stream`` (default stderr): a terminal or a notebook."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)()) or _in_notebook()


def _interval(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def _rate(x: float | None) -> str:
    if x is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


class Progress:
    """``Progress(enabled, stream=sys.stderr, interval=LOG_SECONDS, label="fit")``: call it with
    each ``StepReport``, :meth:`note` an event, :meth:`close` at the end. On a terminal or in a
    notebook it draws a tqdm bar (``bar=False`` forces lines); elsewhere it writes one line at
    the first report, then at most one every ``interval`` seconds, and the last one at
    :meth:`close`. ``clock`` is for tests."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None,
                 interval: float = LOG_SECONDS, label: str = "fit", bar: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = bool(enabled)
        self.bar = self.enabled and (interactive(self.stream) if bar is None else bool(bar))
        self.interval, self.label, self.clock = float(interval), label, clock
        self._rate = StepRate()
        self._tqdm = None
        self._last_line: float | None = None
        self._pending: str | None = None  # the newest line not yet written (lines mode)
        self._val: tuple[int, dict] | None = None  # (step, validation) of the newest one

    def _text(self, report) -> tuple[str, float]:
        per_step, rows_per_s = self._rate(report)
        left = max(report.steps - report.step, 0)
        parts = [f"loss/row {report.loss / max(report.rows, 1):.5g}",
                 f"train RMSE {report.rmse:.5g}"]
        if getattr(report, "val", None):
            self._val = (report.step, report.val)
        if self._val is not None:  # the newest validation, and its step when older
            step, val = self._val
            at = "" if step == report.step else f" @{step}"
            parts.append(f"val RMSE {val['rmse']:.5g}{at}")
            if "accuracy" in val:
                parts.append(f"val acc {val['accuracy']:.4f}")
        best = getattr(report, "best_step", None)
        if best is not None:
            parts.append(f"best step {best}")
        if getattr(report, "passes", None) is not None:
            parts.append(f"{report.passes} passes")
        parts.append(f"{_rate(rows_per_s)} rows/s")
        return "  ".join(parts), per_step * left

    def __call__(self, report) -> None:
        if not self.enabled:
            return
        text, eta = self._text(report)
        if self.bar:
            if self._tqdm is None:
                self._start_bar(report)
            self._tqdm.set_postfix_str(f"{text}  ETA {_interval(eta)}", refresh=False)
            self._tqdm.update(report.step - self._tqdm.n)
            return
        line = (f"{self.label} step {report.step}/{report.steps}  {text}  elapsed "
                f"{_interval(report.seconds)}  ETA {_interval(eta)}")
        now = self.clock()
        if self._last_line is None or now - self._last_line >= self.interval:
            self._write(line)
            self._last_line, self._pending = now, None
        else:
            self._pending = line

    def _start_bar(self, report) -> None:
        import shutil

        from tqdm.auto import tqdm

        # sized by shutil, which falls back to 80 × 24 where tqdm's own query of a terminal
        # that reports 0 × 0 (`script`, `docker exec -t`) would hide the bar
        cols, rows = shutil.get_terminal_size()
        self._tqdm = tqdm(total=report.steps, initial=report.step, desc=self.label,
                          file=self.stream, ncols=cols, nrows=rows,
                          bar_format="{desc} {bar} step {n_fmt}/{total_fmt}{postfix}")

    def _write(self, line: str) -> None:
        try:
            print(line, file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed or full log stream never stops a fit
            pass

    def note(self, text: str) -> None:
        """An event line (``label: text``), above the bar when one is drawn."""
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.write(f"{self.label}: {text}", file=self.stream)
        else:
            self._write(f"{self.label}: {text}")

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        if self._pending is not None:
            self._write(self._pending)
            self._pending = None
