"""Throughput: time per step of the seed's prototype and of scalemem, FLOPs, and the fraction of
the device's measured float32 matmul rate, side by side in one run.

    python benchmarks/throughput.py --data-dir DIR [--prototypes 64,256,1024]
        [--splits fit10k,fit60k] [--full-fit 1024:all:1000[:RECIPE]] [--json OUT]

For every (split, P) the two step functions run in alternating rounds (so load on the machine
hits both alike) and the median round is reported. scalemem's step is the one engine's resident
step (``scalemem._engine.fitting.build_engine`` with ``residency="resident"``, one device, the
seed's settings: K₀ = 0.01·normal, Adam 5e-4). FLOPs count a multiply-add as 2:

- scalemem, per row: stats pass 2Pm (logits) + 2P² (G) + 2Pn (B); gradient pass 2Pm (logits,
  counted only when the rows span more than ``UNROLL_CHUNKS`` chunks: the engine then scans
  them; up to that many chunks are unrolled and XLA computes each chunk's softmax once for both
  passes, a resident step being one program) + 2P² (A·VVᵀ) + 2Pn (X·Vᵀ) + 2Pm (dSᵀQ), with
  VVᵀ (2P²n) once a step, when P ≤ n; when P > n the gradient takes (A·V − X)·Vᵀ, 4Pn; per step
  the solve (~P³/3 + 4P²n: two triangular solves and the residual check).
- prototype, per row: 2Pm + 2P² (AᵀA) + 2Pn (AᵀX) + 2Pn (A·V) + 2Pn ((AV−X)·Vᵀ) + 2Pm; per step
  the LU solve (~2P³/3 + 2P²n).

The matmul rate is the best of float32 products of the step's own shapes (chunk×P)ᵀ(chunk×n),
(chunk×n)(n×P) and a 4096² square, at HIGHEST precision (true float32, no TF32), on this device.
``--full-fit P:SPLIT:STEPS[:RECIPE]`` also runs a complete ``scalemem.fit`` and reports its time
per step and RMSE (test RMSE on the complementary split, train RMSE for ``all``); RECIPE is a
``scalemem.FitConfig`` recipe, ``seed`` (K₀ = 0.01·normal, constant Adam 5e-4, the settings the
step times use) when left out, ``fast`` for the package's default recipe (its STEPS still apply).
"""

from __future__ import annotations

import os

# The LAPACK calls of a step (P×P factorisations) are small: one BLAS thread beats a pool whose
# threads spin against XLA's own. Set before NumPy/JAX load; applies to both contenders alike.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prototype  # noqa: E402

import scalemem  # noqa: E402
from scalemem._core import default_chunk_rows  # noqa: E402
from scalemem._engine.fitting import build_engine  # noqa: E402
from scalemem._engine.init import normal_keys  # noqa: E402
from scalemem._engine.mesh import replicate  # noqa: E402
from scalemem._engine.programs import UNROLL_CHUNKS, init_state  # noqa: E402
from scalemem.datasets import fashion_mnist  # noqa: E402

TEST_OF = {"fit10k": "test60k", "fit60k": "test10k", "all": "all"}


def scalemem_phase_flops(N, P, m, n):
    """FLOPs of scalemem's statistics pass, gradient pass (each with its own logits) and solve."""
    if P <= n:  # gradient products A·(VVᵀ) and X·Vᵀ, plus VVᵀ once a step
        grad, once = 2 * P * P + 2 * P * n, 2 * P * P * n
    else:  # (A·V − X)·Vᵀ
        grad, once = 4 * P * n, 0
    return {"stats": N * (2 * P * m + 2 * P * P + 2 * P * n),
            "grad": N * (2 * P * m + grad + 2 * P * m) + once,
            "solve": P ** 3 / 3 + 4 * P * P * n}


def scalemem_flops(N, P, m, n, chunks=UNROLL_CHUNKS + 1):
    """FLOPs of one step: both passes and the solve, the logits counted once when the engine
    unrolls its chunks (at most ``UNROLL_CHUNKS``), twice when it scans them."""
    f = scalemem_phase_flops(N, P, m, n)
    return sum(f.values()) - (N * 2 * P * m if chunks <= UNROLL_CHUNKS else 0)


def prototype_flops(N, P, m, n):
    return N * (4 * P * m + 2 * P * P + 6 * P * n) + 2 * P ** 3 / 3 + 2 * P * P * n


def _timed(fn, reps):
    t = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def matmul_rate(chunk, P, n, reps=5):
    """Best measured float32 GFLOP/s (HIGHEST precision) over the step's own product shapes."""
    rng = np.random.default_rng(0)
    best = 0.0
    hi = jax.lax.Precision.HIGHEST
    shapes = [("AtX", (chunk, P), (chunk, n)), ("XVt", (chunk, n), (n, P)),
              ("square", (4096, 4096), (4096, 4096))]
    out = {}
    for name, sa, sb in shapes:
        a = jnp.asarray(rng.random(sa, np.float32))
        b = jnp.asarray(rng.random(sb, np.float32))
        if name == "AtX":
            f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                                         precision=hi))
            flops = 2 * sa[0] * sa[1] * sb[1]
        else:
            f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=hi))
            flops = 2 * sa[0] * sa[1] * sb[1]
        jax.block_until_ready(f(a, b))
        t = min(_timed(lambda: f(a, b), reps) for _ in range(3))
        out[name] = flops / t / 1e9
        best = max(best, out[name])
    return best, out


def step_times(Qf, Xf, P, chunk_rows, steps, rounds):
    Q, X = jnp.asarray(Qf), jnp.asarray(Xf)
    popt = optax.adam(5e-4)
    K = 0.01 * jax.random.normal(jax.random.PRNGKey(0), (P, Q.shape[1]), jnp.float32)
    st = {"p": (K, jnp.zeros((P, X.shape[1]), jnp.float32), popt.init(K))}

    def proto():
        st["p"] = prototype.step(*st["p"][:3], popt, Q, X)
        return st["p"][0]

    with jax.enable_x64(True):
        # the one engine, rows resident on one device, the seed's settings (Adam 5e-4)
        chunk = chunk_rows or default_chunk_rows(P, jax.default_backend())
        cfg = scalemem.FitConfig(prototypes=P, recipe="seed", residency="resident", devices=1,
                                 chunk_rows=chunk)
        eng = build_engine(scalemem.ArraySource(Qf, Xf), cfg)
        K0 = replicate(normal_keys(P, Qf.shape[1]), eng.spec.mesh)  # as the step's outputs
        st["s"] = (K0, init_state(K0, spec=eng.spec))

        def ours():
            K, s, out = eng.step(*st["s"])
            st["s"] = (K, s)
            return out.loss

        for f in (proto, ours):
            _timed(f, 2)
        tp, ts = [], []
        for _ in range(rounds):
            tp.append(_timed(proto, steps))
            ts.append(_timed(ours, steps))
    return statistics.median(tp), statistics.median(ts), -(-len(Qf) // eng.chunk_rows)


def full_fit(data_dir, P, split, steps, chunk_rows, recipe="seed"):
    test = TEST_OF[split]
    Qf, Xf, Qt, Xt = fashion_mnist.reference_split(data_dir, split, test)
    t0 = time.perf_counter()
    times = []
    res = scalemem.fit(Qf, Xf, P, recipe=recipe, steps=steps, chunk_rows=chunk_rows,
                       callback=lambda r: r.step < r.steps and times.append(r.seconds))
    wall = time.perf_counter() - t0

    per_step = (times[-1] - times[1]) / max(len(times) - 2, 1) if len(times) > 2 else float("nan")
    return {"prototypes": P, "split": split, "steps": steps, "recipe": recipe,
            "residency": res.residency, "wall_seconds": wall,
            "seconds_per_step": per_step, "train_rmse": float(res.rmse[-1]),
            "test_split": test, "test_rmse": scalemem.evaluate(res.memory, Qt, Xt)["rmse"],
            "solve_events": res.solve_events}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--prototypes", default="64,256,1024")
    ap.add_argument("--splits", default="fit10k,fit60k")
    ap.add_argument("--chunk-rows", type=int, default=None,
                    help="rows per chunk (default: scalemem's default for each P)")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--full-fit", action="append", default=[],
                    help="P:SPLIT:STEPS[:RECIPE] (recipe default: seed)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    dev = jax.devices()[0]
    res = {"device": f"{dev.platform}:{dev.device_kind}", "rows": [], "full_fits": []}
    Ps = [int(p) for p in a.prototypes.split(",") if p]
    rate, rates = matmul_rate(a.chunk_rows or 4096, max(Ps), 784)
    res["matmul_gflops"] = rate
    res["matmul_gflops_by_shape"] = rates
    print(f"device {res['device']}: measured float32 matmul rate {rate:.1f} GFLOP/s "
          f"({', '.join(f'{k} {v:.0f}' for k, v in rates.items())})")
    print(f"{'split':>7} {'P':>5} {'proto ms':>9} {'ours ms':>9} {'ratio':>6} "
          f"{'ours GFLOP':>10} {'% of rate':>9} {'proto %':>8}")
    for split in [s for s in a.splits.split(",") if s]:
        Qf, Xf, _, _ = fashion_mnist.reference_split(a.data_dir, split, TEST_OF[split])
        N, m = Qf.shape
        n = Xf.shape[1]
        for P in Ps:
            tp, ts, chunks = step_times(Qf, Xf, P, a.chunk_rows, a.steps, a.rounds)
            fs, fp = scalemem_flops(N, P, m, n, chunks), prototype_flops(N, P, m, n)
            row = {"split": split, "rows": N, "prototypes": P, "chunks": chunks,
                   "prototype_s_per_step": tp,
                   "scalemem_s_per_step": ts, "ratio": ts / tp, "scalemem_flops": fs,
                   "prototype_flops": fp, "scalemem_fraction_of_rate": fs / ts / 1e9 / rate,
                   "prototype_fraction_of_rate": fp / tp / 1e9 / rate}
            res["rows"].append(row)
            print(f"{split:>7} {P:>5} {tp * 1e3:>9.1f} {ts * 1e3:>9.1f} {ts / tp:>6.3f} "
                  f"{fs / 1e9:>10.2f} {100 * row['scalemem_fraction_of_rate']:>8.1f}% "
                  f"{100 * row['prototype_fraction_of_rate']:>7.1f}%", flush=True)
    for spec in a.full_fit:
        P, split, steps, *recipe = spec.split(":")
        recipe = recipe[0] if recipe else "seed"
        r = full_fit(a.data_dir, int(P), split, int(steps), a.chunk_rows, recipe)
        res["full_fits"].append(r)
        print(f"full fit P={P} {split} {steps} steps ({recipe}): "
              f"{r['seconds_per_step'] * 1e3:.2f} ms/step, "
              f"wall {r['wall_seconds']:.1f} s, train RMSE {r['train_rmse']:.6f}, "
              f"{r['test_split']} RMSE {r['test_rmse']:.6f}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
