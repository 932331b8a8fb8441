"""The numerics core: pure, jit-able functions of arrays (no I/O, no globals). Everything here
needs ``jax_enable_x64`` while it is traced; the public entry points switch it on for their own
scope with ``jax.enable_x64(True)``."""

from .chunks import balanced_chunk, default_chunk_rows, to_blocks
from .grad import chunk_grad, grad_operands, scan_grad
from .solve import ILL_CONDITIONED, SolveInfo, solve_ridge
from .stats import (F64, HIGHEST, Stats, centre_values, chunk_stats, loss_from_stats, merge,
                    scaled, scan_stats, zero_stats)
from .step import StepOut, apply_gradient, solve_and_loss

__all__ = ["Stats", "SolveInfo", "ILL_CONDITIONED", "StepOut", "F64", "HIGHEST", "zero_stats",
           "merge", "scaled", "centre_values", "chunk_stats", "scan_stats", "loss_from_stats", "chunk_grad",
           "grad_operands", "scan_grad", "solve_ridge", "solve_and_loss", "apply_gradient",
           "balanced_chunk", "default_chunk_rows", "to_blocks"]
