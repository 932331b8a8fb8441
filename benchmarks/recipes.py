"""The default recipe against the seed's settings beyond Fashion-MNIST: a synthetic Zarr store
(``scalemem data synthetic``'s generator at its default shape, 78 key and 784 value columns) and
a user-style HDF5 file of float data (no scalemem metadata, raw physical units).

    python benchmarks/recipes.py [--rows 40000] [--prototypes 64] [--key-dim 78]
                                 [--value-dim 784] [--json OUT]

Each store is fitted on its first 6/7 of the rows and tested on the rest, with every setting at
its default (``recipe="fast"``: 20 L-BFGS steps from k-means++ keys), with ``recipe="adam"`` (the
default before L-BFGS: 35 cosine Adam steps from the same keys) and with ``recipe="seed"`` (1000
steps of constant Adam 5e-4 from 0.01·normal keys); test RMSE, passes over the rows and fit
seconds of each are reported. Acceptance: the default no worse than the seed settings.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402

import scalemem  # noqa: E402


def user_hdf5(path: Path, rows: int, seed: int = 0) -> Path:
    """Features in raw units (0…1000) and 40 smooth responses around 50 ± 20, as a simulation
    code would write them: plain h5py datasets, no splits or views."""
    rng = np.random.default_rng(seed)
    F = rng.uniform(0, 1000, (rows, 12))
    W = rng.normal(size=(12, 40)) / 2000.0
    Y = 50 + 20 * np.sin(F @ W) * np.cos(F[:, :1] / 300.0) + rng.normal(0, 1.0, (rows, 40))
    with h5py.File(path, "w") as f:
        f["inputs/features"] = F.astype(np.float32)
        f["outputs/responses"] = Y.astype(np.float32)
    return path


def compare(path, rows: int, P: int, **views) -> dict:
    cut = rows - rows // 7
    out = {}
    for recipe in ("fast", "adam", "seed"):
        with scalemem.open_source(path, rows=f"0:{cut}", **views) as fit_rows, \
                scalemem.open_source(path, rows=f"{cut}:{rows}", **views) as test_rows:
            t = time.perf_counter()
            res = scalemem.fit_source(fit_rows, P, recipe=recipe)
            seconds = time.perf_counter() - t
            out[recipe] = {"test_rmse": scalemem.evaluate(res.memory, test_rows)["rmse"],
                           "train_rmse": float(res.rmse[-1]), "steps": res.config.steps,
                           "optimizer": res.config.optimizer, "passes": res.passes,
                           "seconds": seconds}
        print(path.name, recipe, json.dumps(out[recipe]), flush=True)
    out["default_no_worse"] = out["fast"]["test_rmse"] <= out["seed"]["test_rmse"]
    out["default_vs_adam"] = out["fast"]["test_rmse"] / out["adam"]["test_rmse"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=40000)
    ap.add_argument("--prototypes", type=int, default=64)
    ap.add_argument("--key-dim", type=int, default=78)
    ap.add_argument("--value-dim", type=int, default=784)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="scalemem-recipes-"))
    syn = scalemem.write_synthetic(work / "syn.zarr", a.rows, key_dim=a.key_dim,
                                   value_dim=a.value_dim)
    h5 = user_hdf5(work / "user.h5", a.rows)
    res = {"rows": a.rows, "prototypes": a.prototypes, "key_dim": a.key_dim,
           "value_dim": a.value_dim,
           "synthetic_zarr": compare(syn, a.rows, a.prototypes),
           "user_hdf5_float": compare(h5, a.rows, a.prototypes, keys="inputs/features",
                                      values="outputs/responses")}
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
