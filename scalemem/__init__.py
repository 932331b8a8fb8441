"""scalemem: fit differentiable memory (attention as a lossy key-value store) to data of any size.

Public API (everything else lives in private modules and may change):

- :class:`Memory` — fitted prototypes ``K``, ``V`` with a jit-able ``predict``.
- :func:`fit` — fit a memory to in-memory keys and values.
- :func:`save` / :func:`load` — model files without pickle (``.npz`` + JSON metadata); ``load``
  also takes a run folder written by ``scalemem fit``.
- :func:`open_source`, :func:`fit_source`, :func:`evaluate_source` — the same, streamed from an
  HDF5 file or a Zarr store (memory independent of the number of rows).
- :func:`write_fashion_mnist`, :func:`write_synthetic` — write such stores chunk by chunk.
- :func:`fit_sharded`, :func:`fit_source_sharded` — rows split over the devices of a mesh;
  :func:`initialize_distributed` — several processes/hosts through ``jax.distributed``.
- The numerics core: :class:`Stats`, :func:`chunk_stats`, :func:`scan_stats`, :func:`merge`,
  :func:`solve_ridge`, :func:`chunk_grad`, :func:`scan_grad`, :func:`loss_from_stats`.
- Errors: :class:`ScalememError` and its subclasses.
"""

from ._core import (SolveInfo, Stats, chunk_grad, chunk_stats, loss_from_stats, merge,
                    scan_grad, scan_stats, solve_ridge, zero_stats)
from ._errors import (CheckpointError, ConfigError, DataError, DownloadError, NonFiniteDataError,
                      NumericsError, NumericsWarning, ScalememError)
from ._fit import FitResult, StepReport, default_optimizer, fit, init_keys
from ._model import Memory, predict_in_chunks
from ._modelio import load, save
from ._sources import ArraySource, HDF5Source, ZarrSource, open_source
from ._store import write_fashion_mnist, write_synthetic
from ._streaming import evaluate_source, fit_source
from ._parallel import fit_sharded, fit_source_sharded
from ._distributed import initialize as initialize_distributed

__version__ = "0.1.0"

__all__ = [
    "Memory", "fit", "save", "load", "fit_source", "evaluate_source", "open_source", "ArraySource", "HDF5Source",
    "ZarrSource", "fit_sharded", "fit_source_sharded", "initialize_distributed",
    "write_fashion_mnist", "write_synthetic", "FitResult", "StepReport", "default_optimizer", "init_keys",
    "predict_in_chunks", "Stats", "SolveInfo", "chunk_stats", "scan_stats", "merge", "zero_stats",
    "solve_ridge", "chunk_grad", "scan_grad", "loss_from_stats", "ScalememError", "ConfigError",
    "DataError", "NonFiniteDataError", "DownloadError", "CheckpointError", "NumericsError",
    "NumericsWarning",
]
