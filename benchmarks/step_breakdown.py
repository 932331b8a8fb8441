"""Where a step's time goes: the statistics pass, the float64 ridge solve (Cholesky with its
residual check and condition estimate), the gradient pass and the optimiser update, each jitted
alone on the same data and device as the whole fused step.

    python benchmarks/step_breakdown.py --data-dir DIR [--split all] [--prototypes 1024]
        [--chunk-rows C] [--warm-steps 50] [--json OUT]

The passes are the engine's own (``InMemoryEngine.passes``). Jitted apart, the two passes each
compute the softmax (the fused step computes it once when it unrolls its chunks), so the parts
may add up to more than the step. ``K`` is taken after ``--warm-steps`` Adam steps from the
seed's initialisation, so the solve sees the conditioning of a running fit. Each phase reports
its FLOPs (a multiply-add counts 2) and its share of the device's measured float32 matmul rate
(``throughput.matmul_rate``: HIGHEST precision, the step's own shapes and a 4096² square).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (TEST_OF, matmul_rate, scalemem_flops,  # noqa: E402
                        scalemem_phase_flops)

from scalemem._core import default_chunk_rows  # noqa: E402
from scalemem._fit import InMemoryEngine, init_keys  # noqa: E402
from scalemem._step import solve_and_loss  # noqa: E402
from scalemem.datasets import fashion_mnist  # noqa: E402


def _time(fn, steps, rounds):
    jax.block_until_ready(fn())
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        r = None
        for _ in range(steps):
            r = fn()
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t) / steps)
    return statistics.median(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--split", default="all", choices=sorted(TEST_OF))
    ap.add_argument("--prototypes", type=int, default=1024)
    ap.add_argument("--chunk-rows", type=int, default=None)
    ap.add_argument("--warm-steps", type=int, default=50)
    ap.add_argument("--steps", type=int, default=10, help="calls per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    P = a.prototypes
    Qf, Xf, _, _ = fashion_mnist.reference_split(a.data_dir, a.split, TEST_OF[a.split])
    N, m = Qf.shape
    n = Xf.shape[1]
    dev = jax.devices()[0]
    chunk = a.chunk_rows or default_chunk_rows(P, jax.default_backend())
    rate, _ = matmul_rate(min(chunk, N), P, n)
    with jax.enable_x64(True):
        opt = optax.adam(5e-4)
        eng = InMemoryEngine(Qf, Xf, optimizer=opt, ridge=1e-6, chunk_rows=chunk,
                             dtype=jnp.float32)
        K = init_keys(P, m)
        s = opt.init(K)
        for _ in range(a.warm_steps):
            K, s, out = eng.step(K, s)
        jax.block_until_ready(K)
        stats_fn, grad_fn = (jax.jit(f) for f in eng.passes)
        solve = jax.jit(lambda st: solve_and_loss(st, 1e-6))
        data = eng._data
        stats = stats_fn(K, *data)
        V, loss, info, _ = solve(stats)
        g = grad_fn(K, V, *data)

        @jax.jit
        def update(K, s, g):
            u, s = opt.update(g.astype(K.dtype), s, K)
            return optax.apply_updates(K, u), s

        times = {
            "stats": _time(lambda: stats_fn(K, *data), a.steps, a.rounds),
            "solve": _time(lambda: solve(stats)[0], a.steps, a.rounds),
            "grad": _time(lambda: grad_fn(K, V, *data), a.steps, a.rounds),
            "update": _time(lambda: update(K, s, g)[0], a.steps, a.rounds),
            "step": _time(lambda: eng.step(K, s)[0], a.steps, a.rounds),
        }
    chunks = -(-N // eng.chunk_rows)
    flops = {**scalemem_phase_flops(N, P, m, n), "step": scalemem_flops(N, P, m, n, chunks)}
    res = {"device": f"{dev.platform}:{dev.device_kind}", "split": a.split, "rows": N,
           "prototypes": P, "chunk_rows": eng.chunk_rows, "chunks": chunks,
           "matmul_gflops": rate, "solve_attempts": int(info.attempts), "phases": {}}
    print(f"device {res['device']}, {a.split} ({N} rows), P={P}, {chunks} chunk(s) of "
          f"{eng.chunk_rows} rows; measured float32 matmul rate {rate:.0f} GFLOP/s; solve "
          f"attempts {int(info.attempts)}")
    print(f"{'phase':>7} {'ms':>9} {'% of step':>9} {'GFLOP':>8} {'% of rate':>9}")
    for k, t in times.items():
        f = flops.get(k, 0.0)
        frac = f / t / 1e9 / rate if f else None
        res["phases"][k] = {"seconds": t, "flops": f, "fraction_of_rate": frac}
        print(f"{k:>7} {t * 1e3:>9.2f} {100 * t / times['step']:>8.1f}% {f / 1e9:>8.2f} "
              + (f"{100 * frac:>8.1f}%" if frac else f"{'':>9}"))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
