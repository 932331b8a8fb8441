"""The command line as a user runs it, against the seed's prototype, in one run on one machine.

    python benchmarks/cli_fit.py --data-dir DIR [--prototypes 256] [--splits full,seed]
                                 [--warm-runs 3] [--seed-recipe] [--json OUT]

For each split (``full``: fit60k → test10k, target 0.1167; ``seed``: fit10k → test60k, target
0.1195):

1. The prototype's 1000-step time on the split's fit rows (its median step time over
   ``--proto-rounds`` rounds of ``--proto-steps`` steps, before and after the CLI runs, × 1000).
2. ``scalemem fit fm.zarr --rows FIT --prototypes P --out R`` with every other setting at its
   default, from process start to exit: once with an empty compilation cache (cold), then
   ``--warm-runs`` times with the cache it left (warm: the median; each run's time is kept, as
   one run's time varies by ±10% on a shared machine); then ``scalemem eval R --rows TEST``:
   its test RMSE against the target, its wall time against the prototype's 1000 steps (the acceptance
   ratios: full ≤ 0.03; seed ≤ 0.05 warm, ≤ 0.08 cold).
3. On the full split: the CLI's time per step (from its ``metrics.jsonl``, steps after the first)
   against ``scalemem.fit_source`` and ``scalemem.fit`` (float32 arrays) on the same rows and
   settings in this process (same measure, from their step callbacks).
4. With ``--seed-recipe``: ``scalemem fit … --recipe seed`` (1000 steps) on fit60k and its test
   RMSE.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prototype  # noqa: E402

import scalemem  # noqa: E402
from scalemem.datasets import fashion_mnist  # noqa: E402


SPLITS = {"full": ("fit60k", "test10k", 0.1167), "seed": ("fit10k", "test60k", 0.1195)}


def prototype_step_seconds(Qf, Xf, P, steps, rounds) -> list[float]:
    Q, X = jnp.asarray(Qf), jnp.asarray(Xf)
    K, _, st, opt = prototype.init(P, Q)
    V = jnp.zeros((P, X.shape[1]), jnp.float32)
    K, V, st = prototype.step(K, V, st, opt, Q, X)  # compile
    jax.block_until_ready(K)
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            K, V, st = prototype.step(K, V, st, opt, Q, X)
        jax.block_until_ready(K)
        out.append((time.perf_counter() - t) / steps)
    return out


def cli(*args, env) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "scalemem", *args], env=env, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"scalemem {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return wall, p.stdout


def step_seconds(seconds: list[float]) -> float:
    """Median time per step from cumulative per-step clock readings, first step excluded."""
    return statistics.median(b - a for a, b in zip(seconds[1:], seconds[2:]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--prototypes", type=int, default=256)
    ap.add_argument("--proto-steps", type=int, default=5)
    ap.add_argument("--proto-rounds", type=int, default=3)
    ap.add_argument("--splits", default="full,seed")
    ap.add_argument("--warm-runs", type=int, default=3)
    ap.add_argument("--seed-recipe", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    P = a.prototypes
    work = Path(tempfile.mkdtemp(prefix="scalemem-cli-"))
    store = work / "fm.zarr"
    cli("data", "fashion-mnist", "--from", str(a.data_dir), "--out", str(store),
        env=dict(os.environ, SCALEMEM_CACHE_DIR=str(work / "cache-data")))
    res: dict = {"prototypes": P, "device": str(jax.devices()[0].device_kind), "splits": {}}
    for split in a.splits.split(","):
        fit_rows, test_rows, target = SPLITS[split]
        Qf, Xf, _, _ = fashion_mnist.reference_split(a.data_dir, fit_rows, test_rows)
        proto = prototype_step_seconds(Qf, Xf, P, a.proto_steps, a.proto_rounds)
        env = dict(os.environ, SCALEMEM_CACHE_DIR=str(work / f"cache-{split}"))  # empty: cold
        runs = {}
        for name in ("cold", "warm"):
            out = work / f"default-{split}-{name}"
            walls = []
            for _ in range(1 if name == "cold" else a.warm_runs):
                shutil.rmtree(out, ignore_errors=True)
                walls.append(cli("fit", str(store), "--rows", fit_rows, "--prototypes", str(P),
                                 "--out", str(out), "--quiet", env=env)[0])
            wall = statistics.median(walls)
            _, text = cli("eval", str(out), "--rows", test_rows, "--json", "--quiet", env=env)
            lines = (out / "metrics.jsonl").read_text().splitlines()
            metrics = [json.loads(line) for line in lines][:-1]  # the steps (last: final keys)
            rmse = json.loads(text)["rmse"]
            runs[name] = {"wall_seconds": wall, "wall_seconds_runs": walls, "test_rmse": rmse,
                          "target": target,
                          "reached_target": rmse <= target, "steps": len(metrics),
                          "passes": json.loads(lines[-1]).get("passes"),
                          "step_seconds": step_seconds([m["seconds"] for m in metrics])}
        proto += prototype_step_seconds(Qf, Xf, P, a.proto_steps, a.proto_rounds)
        r = res["splits"][split] = {"prototype_1000_step_seconds": 1000 * statistics.median(proto),
                                    "prototype_step_seconds_rounds": proto, "cli_default": runs}
        for name, run in runs.items():
            run["ratio_to_prototype_1000_steps"] = (run["wall_seconds"]
                                                    / r["prototype_1000_step_seconds"])
            print(f"{split} {name}: {run['wall_seconds']:.1f} s, test RMSE "
                  f"{run['test_rmse']:.6f} (target {target}), "
                  f"{run['ratio_to_prototype_1000_steps']:.4f} × the prototype's 1000 steps "
                  f"({r['prototype_1000_step_seconds']:.1f} s)", flush=True)
    if "full" not in res["splits"]:
        return _done(res, a)
    runs = res["splits"]["full"]["cli_default"]
    Qf, Xf, _, _ = fashion_mnist.reference_split(a.data_dir, "fit60k", "test10k")
    env = dict(os.environ, SCALEMEM_CACHE_DIR=str(work / "cache-full"))

    clock: list[float] = []
    t0 = time.perf_counter()
    with scalemem.open_source(store, rows="fit60k") as src:
        scalemem.fit_source(src, P, callback=lambda r: r.step < r.steps and clock.append(
            time.perf_counter() - t0))  # the steps, not the final pass
    res["python_step_seconds"] = step_seconds(clock)
    res["ratio_cli_step_to_python_step"] = runs["warm"]["step_seconds"] / res[
        "python_step_seconds"]
    clock = []
    t0 = time.perf_counter()
    scalemem.fit(Qf, Xf, P, callback=lambda r: r.step < r.steps and clock.append(
        time.perf_counter() - t0))
    res["python_fit_arrays_step_seconds"] = step_seconds(clock)
    res["ratio_cli_step_to_python_fit_arrays_step"] = runs["warm"]["step_seconds"] / res[
        "python_fit_arrays_step_seconds"]

    if a.seed_recipe:
        out = work / "seed"
        wall, _ = cli("fit", str(store), "--rows", "fit60k", "--prototypes", str(P), "--recipe",
                      "seed", "--out", str(out), "--quiet", env=env)
        _, text = cli("eval", str(out), "--rows", "test10k", "--json", "--quiet", env=env)
        res["cli_seed_recipe"] = {"wall_seconds": wall, "test_rmse": json.loads(text)["rmse"]}
    return _done(res, a)


def _done(res: dict, a) -> dict:
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
