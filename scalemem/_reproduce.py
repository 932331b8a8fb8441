"""The seed article's Fashion-MNIST experiment: test RMSE against the number of prototypes."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from ._fit import fit
from ._model import predict_in_chunks

__all__ = ["SEED_TABLE", "DEFAULT_PROTOTYPES", "reproduce", "test_rmse"]

# Test RMSE the article published for its prototype (fit 10,000 rows, test 60,000).
SEED_TABLE = {2: 0.248782, 4: 0.204451, 8: 0.173010, 16: 0.153833, 32: 0.139799, 64: 0.128507,
              128: 0.121859, 256: 0.119588}
DEFAULT_PROTOTYPES = tuple(SEED_TABLE)


def test_rmse(memory, Q, X, chunk_rows: int = 8192) -> float:
    """Root mean squared error per value entry, accumulated in float64 chunk by chunk."""
    sq = 0.0
    for s in range(0, Q.shape[0], chunk_rows):
        d = predict_in_chunks(memory, Q[s:s + chunk_rows], chunk_rows).astype(np.float64)
        sq += float(np.sum(np.square(d - X[s:s + chunk_rows])))
    return float(np.sqrt(sq / X.size))


def reproduce(Q_fit, X_fit, Q_test, X_test, prototypes: Sequence[int] = DEFAULT_PROTOTYPES, *,
              steps: int = 1000, learning_rate: float = 5e-4, ridge: float = 1e-6,
              chunk_rows: int | None = None, seed: int = 0,
              on_row: Callable[[dict], None] | None = None, **fit_kwargs) -> list[dict]:
    """Fit one memory per P with the seed's settings; one row per P with the test RMSE, the
    training RMSE, the wall time and the loss history."""
    rows = []
    for P in prototypes:
        t0 = time.perf_counter()
        res = fit(Q_fit, X_fit, int(P), steps=steps, learning_rate=learning_rate, ridge=ridge,
                  chunk_rows=chunk_rows, seed=seed, **fit_kwargs)
        seconds = time.perf_counter() - t0
        row = {"prototypes": int(P), "rmse": test_rmse(res.memory, Q_test, X_test),
               "train_rmse": float(res.rmse[-1]), "seconds": seconds,
               "seconds_per_step": res.seconds / max(steps, 1),
               "solve_events": res.solve_events, "seed_rmse": SEED_TABLE.get(int(P)),
               "loss": res.loss.tolist()}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
