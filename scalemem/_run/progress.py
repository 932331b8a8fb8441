"""The progress bar of a fit (tqdm): step/steps, loss, training RMSE, rows/s and ETA, drawn only
when enabled and its stream is a terminal (so logs and pipes stay clean), at most 10 times a
second (tqdm's ``mininterval``); :meth:`ProgressBar.close` draws the last state."""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

from tqdm import tqdm

from .metrics import StepRate

__all__ = ["ProgressBar"]


class ProgressBar:
    """``ProgressBar(enabled=not quiet)``; call it with each ``StepReport``; :meth:`close` at
    the end. ``stream`` defaults to ``sys.stderr``."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(enabled) and bool(getattr(self.stream, "isatty", lambda: False)())
        self._rate = StepRate()
        self._bar: tqdm | None = None

    def __call__(self, report) -> None:
        if not self.enabled:
            return
        per_step, rows_per_s = self._rate(report)
        done = report.step + 1
        rate = "?" if rows_per_s is None else tqdm.format_sizeof(rows_per_s)
        eta = tqdm.format_interval(per_step * (report.steps - done))
        text = f"loss {report.loss:.4g}  rmse {report.rmse:.4g}  {rate} rows/s  ETA {eta}"
        if self._bar is None:
            # sized by shutil, which falls back to 80 × 24 where tqdm's own query of a terminal
            # that reports 0 × 0 (`script`, `docker exec -t`) would hide the bar
            cols, rows = shutil.get_terminal_size()
            self._bar = tqdm(total=report.steps, initial=done, desc="fit", postfix=text,
                             file=self.stream, ncols=cols, nrows=rows,
                             bar_format="{desc} {bar} step {n_fmt}/{total_fmt}{postfix}")
        else:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
