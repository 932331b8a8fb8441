"""scalemem: fit differentiable memory (attention as a lossy key-value store) to data of any size.

Public API (everything else lives in private modules and may change):

- :func:`fit` (arrays) and :func:`fit_source` (an HDF5 file or a Zarr store), on one device or
  many, in one process or many; every setting is a field of :class:`FitConfig`, the same as
  the flags of ``scalemem fit``.
- :func:`profiled_loss`: the loss as a differentiable function of the keys (``V`` solved
  exactly inside), for optax (L-BFGS included) or any JAX optimiser.
- :class:`Memory` (fitted ``K``, ``V``, logit bias and input scales, a jit-able ``predict``),
  :func:`evaluate`, :func:`save` / :func:`load` (pickle-free model files, bit for bit).
- :func:`open_source`, :class:`ArraySource`, :func:`write_fashion_mnist`, :func:`write_synthetic`.
- :func:`initialize_distributed`: join a multi-process run through ``jax.distributed``.
- The numerics core (:class:`Stats`, :func:`chunk_stats`, :func:`solve_ridge`, ...) and the
  errors (:class:`ScalememError` and its subclasses).
"""

import os as _os
import signal as _signal
import sys as _sys

_argv = list(getattr(_sys, "orig_argv", []))
if (_argv[_argv.index("-m") + 1:][:1] == ["scalemem"] if "-m" in _argv else
        _os.path.basename(_sys.argv[0] if _sys.argv else "") in ("scalemem", "scalemem.exe")):
    # The command line is starting: SIGINT/SIGTERM during the slow imports (JAX) end it at once
    # with status 128 + signal and no traceback; the command installs its own handlers.
    for _s in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(_s, lambda signum, frame: _os._exit(128 + signum))

from ._config import FitConfig
from ._core import (SolveInfo, Stats, chunk_grad, chunk_stats, loss_from_stats, merge, scan_grad,
                    scan_stats, solve_ridge, zero_stats)
from ._data import ArraySource, HDF5Source, ZarrSource, open_source, write_fashion_mnist, \
    write_synthetic
from ._engine import (FitResult, Memory, ProfiledLoss, StepReport, evaluate, fit, fit_source,
                      initialize as initialize_distributed, load, predict_in_chunks,
                      profiled_loss, read_metadata, save)
from ._errors import (CheckpointError, ConfigError, DataError, DownloadError, NonFiniteDataError,
                      NumericsError, NumericsWarning, ScalememError)

__version__ = "0.2.0"

__all__ = ["fit", "fit_source", "profiled_loss", "ProfiledLoss", "FitConfig", "FitResult",
           "StepReport", "Memory", "evaluate",
           "save", "load", "read_metadata", "predict_in_chunks", "open_source", "ArraySource",
           "HDF5Source", "ZarrSource", "write_fashion_mnist", "write_synthetic",
           "initialize_distributed", "Stats", "SolveInfo", "chunk_stats", "scan_stats", "merge",
           "zero_stats", "solve_ridge", "chunk_grad", "scan_grad", "loss_from_stats",
           "ScalememError", "ConfigError", "DataError", "NonFiniteDataError", "DownloadError",
           "CheckpointError", "NumericsError", "NumericsWarning"]
