#!/usr/bin/env python
"""A scikit-learn grid search over the number of prototypes: wall time against compute time.

Runs ``GridSearchCV(MemoryRegressor(), {"prototypes": [32, 64, 128]}, cv=3)`` on the first
10,000 rows of the Fashion-MNIST reference split (``reference_split(DIR, "fit10k", ...)``: keys
= the 78 key pixels / 255, values = the 784 pixels / 255), the default recipe. The three folds
fit 6666 or 6667 rows; the engine lays both out as the same bucket of rows, so each value of P
compiles its fit once. Then runs the same grid again, every program already compiled.

Reports the grid's wall time beside the sum of its fits' and scores' wall times, the time JAX
spent tracing and compiling (and in which fits), the compilations of the step program per P,
and the warm grid's wall time::

    python benchmarks/sklearn_grid.py --data-dir DIR [--json PATH] [--grid 32,64,128]

Needs scikit-learn (the ``sklearn`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class Compiles:
    """Tracing and compilation events while installed: (event, function, seconds)."""

    def __init__(self):
        self.events: list[tuple[str, str, float]] = []
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, duration, **kw):
        if name in _COMPILE_EVENTS:
            self.events.append((name.rsplit("/", 1)[1], str(kw.get("fun_name")), duration))

    def since(self, start: int):
        new = self.events[start:]
        return {"seconds": sum(e[2] for e in new),
                "step_compiles": sum(e[0] == "backend_compile_duration"
                                     and "resident_step" in e[1] for e in new),
                "events": len(new)}


def timed_estimator(compiles: Compiles, log: list):
    from scalemem.sklearn import MemoryRegressor

    class Timed(MemoryRegressor):
        def fit(self, X, y):
            start, t0 = len(compiles.events), time.perf_counter()
            super().fit(X, y)
            log.append(dict(what="fit", prototypes=self.prototypes, rows=len(X),
                            wall_s=time.perf_counter() - t0, loop_s=self.fit_seconds_,
                            compile=compiles.since(start)))
            return self

        def score(self, X, y, sample_weight=None):
            start, t0 = len(compiles.events), time.perf_counter()
            out = super().score(X, y, sample_weight)
            log.append(dict(what="score", prototypes=self.prototypes, rows=len(X),
                            wall_s=time.perf_counter() - t0, compile=compiles.since(start)))
            return out

    return Timed


def run_grid(Q, X, grid, cv, compiles, steps):
    from sklearn.model_selection import GridSearchCV

    log: list = []
    est = timed_estimator(compiles, log)(**({} if steps is None else {"steps": steps}))
    start, t0 = len(compiles.events), time.perf_counter()
    search = GridSearchCV(est, {"prototypes": grid}, cv=cv).fit(Q, X)
    wall = time.perf_counter() - t0
    fits = [e for e in log if e["what"] == "fit"]
    scores = [e for e in log if e["what"] == "score"]
    total = compiles.since(start)
    return {
        "grid_wall_s": wall,
        "sum_fit_wall_s": sum(e["wall_s"] for e in fits),
        "sum_fit_loop_s": sum(e["loop_s"] for e in fits),
        "sum_score_wall_s": sum(e["wall_s"] for e in scores),
        "compile_s": total["seconds"],
        "compile_events": total["events"],
        "sum_compute_s": sum(e["wall_s"] - e["compile"]["seconds"] for e in fits + scores),
        "step_compiles_per_P": {str(P): sum(e["compile"]["step_compiles"] for e in fits
                                            if e["prototypes"] == P and e["rows"] < len(Q))
                                for P in grid},
        "refit_step_compiles": sum(e["compile"]["step_compiles"] for e in fits
                                   if e["rows"] == len(Q)),
        "best_prototypes": search.best_params_["prototypes"],
        "mean_test_r2": {str(P): float(s) for P, s in
                         zip(grid, search.cv_results_["mean_test_score"])},
        "fits": [{k: v for k, v in e.items() if k != "what"} for e in fits],
        "scores": [{k: v for k, v in e.items() if k != "what"} for e in scores],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("SCALEMEM_FASHION_MNIST"),
                    help="folder with the Fashion-MNIST IDX files")
    ap.add_argument("--grid", default="32,64,128", help="values of prototypes")
    ap.add_argument("--cv", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="steps (default: the recipe's)")
    ap.add_argument("--no-warm", action="store_true", help="skip the second, warm grid")
    ap.add_argument("--json", metavar="PATH", help="also write the results here")
    args = ap.parse_args(argv)
    if not args.data_dir:
        ap.error("--data-dir (or SCALEMEM_FASHION_MNIST) is required")
    from scalemem.datasets.fashion_mnist import reference_split

    Q, X, _, _ = reference_split(args.data_dir, "fit10k", "test60k")
    grid = [int(p) for p in args.grid.split(",")]
    compiles = Compiles()
    cold = run_grid(Q, X, grid, args.cv, compiles, args.steps)
    warm = None if args.no_warm else run_grid(Q, X, grid, args.cv, compiles, args.steps)
    out = {"benchmark": "sklearn_grid", "rows": len(Q), "key_dim": Q.shape[1],
           "value_dim": X.shape[1], "grid": grid, "cv": args.cv, "steps": args.steps,
           "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
           "python": platform.python_version(), "jax": jax.__version__, "cold": cold,
           "warm": warm}
    for name, r in (("cold", cold), ("warm", warm)):
        if r is None:
            continue
        print(f"{name} grid: {r['grid_wall_s']:.1f} s wall; fits {r['sum_fit_wall_s']:.1f} s "
              f"(fit loops {r['sum_fit_loop_s']:.1f} s), scores {r['sum_score_wall_s']:.1f} s; "
              f"compilation {r['compile_s']:.1f} s in {r['compile_events']} events; compute "
              f"{r['sum_compute_s']:.1f} s; step-program compilations per P (CV folds) "
              f"{r['step_compiles_per_P']}, refit {r['refit_step_compiles']}; best P "
              f"{r['best_prototypes']}, mean held-out R² {r['mean_test_r2']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
