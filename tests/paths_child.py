"""Fits every feature on every residency in one layout of devices and processes, for
``tests/test_paths.py`` (run as a script: the device count and the multi-process runtime are
fixed when JAX starts, so each layout needs a fresh process).

    python tests/paths_child.py OUT [--process I --processes N --port PORT]

Writes ``OUT/{residency}-{feature}.npz`` (K, and bias where there is one) from process 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROWS, KEY_DIM, VALUE_DIM, P = 3001, 6, 5, 8  # 3001: not divisible by 2, 4 or 8 (padded ranges)
COMMON = dict(chunk_rows=256, chunks_per_block=2)
FEATURES = {
    "init_normal": dict(recipe="seed", steps=10, dtype="float64"),
    "init_kmeans": dict(recipe="seed", init="kmeans", learning_rate=1e-2, steps=10,
                        dtype="float64"),
    "key_bias": dict(recipe="seed", init="kmeans", key_bias=True, learning_rate=1e-2, steps=10,
                     dtype="float64"),
    "cosine": dict(recipe="seed", schedule="cosine", warmup_steps=2, learning_rate=1e-2,
                   steps=10, dtype="float64"),
    # float32 products: a ridge of 1e-2 keeps the solve well conditioned, so float32 rounding
    # differences between layouts stay near 1e-6 of K (at 1e-6 they reach 1e-3 at K₀)
    "precision": dict(recipe="seed", init="kmeans", learning_rate=1e-2, steps=10, ridge=1e-2,
                      dtype="float32", stats_precision="tf32", grad_precision="bf16"),
    "one_pass": dict(recipe="seed", one_pass=True, steps=10, dtype="float64"),
    # L-BFGS (the default recipe): its line search decides on the host from reduced losses
    "lbfgs": dict(recipe="fast", steps=10, dtype="float64"),
}
RESIDENCIES = ("resident", "streamed")


def data():
    rng = np.random.default_rng(0)
    Q = rng.standard_normal((ROWS, KEY_DIM))
    X = np.tanh(Q[:, :VALUE_DIM] * 1.5) + 0.1 * rng.standard_normal((ROWS, VALUE_DIM))
    return Q, X


def cells():
    """``(residency, feature)`` pairs that exist (one_pass reads streamed data only)."""
    return [(r, f) for r in RESIDENCIES for f in FEATURES
            if not (f == "one_pass" and r == "resident")]


def fit_cell(residency: str, feature: str):
    import scalemem

    Q, X = data()
    dtype = FEATURES[feature]["dtype"]
    Q, X = Q.astype(dtype), X.astype(dtype)
    return scalemem.fit(Q, X, P, residency=residency, **COMMON, **FEATURES[feature]).memory


def main(argv) -> None:
    out = Path(argv[0])
    opts = dict(zip(argv[1::2], argv[2::2]))
    if "--processes" in argv:
        import scalemem

        scalemem.initialize_distributed(f"127.0.0.1:{opts['--port']}",
                                        int(opts["--processes"]), int(opts["--process"]))
    import jax

    for residency, feature in cells():
        mem = fit_cell(residency, feature)
        if jax.process_index() == 0:
            arrays = {"K": np.asarray(mem.K)}
            if mem.bias is not None:
                arrays["bias"] = np.asarray(mem.bias)
            np.savez(out / f"{residency}-{feature}.npz", **arrays)
    print(f"done: {jax.process_count()} processes, {jax.device_count()} devices", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
