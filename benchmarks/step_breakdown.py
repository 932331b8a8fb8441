"""Where a step's time goes: the statistics pass, the float64 ridge solve (Cholesky with its
residual check and condition estimate), the gradient pass and the optimiser update, each jitted
alone on the same data and device as the whole fused step.

    python benchmarks/step_breakdown.py --data-dir DIR [--split all] [--prototypes 1024]
        [--chunk-rows C] [--warm-steps 50] [--json OUT]

The engine is the one engine with rows resident on one device
(``scalemem._engine.fitting.build_engine``, ``residency="resident"``, the seed's settings). The
passes are the engine's own folds (``scalemem._engine.programs.fold_stats`` and ``fold_grad``)
over its resident parts (``engine.parts``), each jitted alone under the same ``shard_map`` and
``psum`` as the engine's step program (``programs.resident_step``); the solve is
``programs.solve`` and the update ``programs.apply_update``, the programs a streamed step runs.
Jitted apart, the two passes each compute the softmax (the one-program resident step computes
it once when it unrolls its chunks), so the parts may add up to more than the step. ``K`` is
taken after ``--warm-steps`` Adam steps from the seed's initialisation, so the solve sees the
conditioning of a running fit. Each phase reports its FLOPs (a multiply-add counts 2) and its
share of the device's measured float32 matmul rate (``throughput.matmul_rate``: HIGHEST
precision, the step's own shapes and a 4096² square).
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
from jax.sharding import PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (TEST_OF, matmul_rate, scalemem_flops,  # noqa: E402
                        scalemem_phase_flops)

from scalemem import ArraySource, FitConfig, _core  # noqa: E402
from scalemem._core import default_chunk_rows  # noqa: E402
from scalemem._engine import programs  # noqa: E402
from scalemem._engine.fitting import build_engine  # noqa: E402
from scalemem._engine.init import normal_keys  # noqa: E402
from scalemem._engine.mesh import replicate, smap  # noqa: E402
from scalemem.datasets import fashion_mnist  # noqa: E402


def pass_programs(eng):
    """``(stats_fn(K, parts) -> Stats, grad_fn(K, V, parts) -> ∂K)``: the two passes of the
    engine's resident step as programs of their own, over the same mesh and parts."""
    spec, n = eng.spec, eng.value_dim
    ax, rep, shard = spec.axis, PartitionSpec(), PartitionSpec(spec.axis)

    def stats_local(K, parts):
        acc = _core.zero_stats(K.shape[0], n)
        return jax.lax.psum(programs.fold_stats(K, parts, acc, spec), ax)

    def grad_local(K, V, parts):
        acc = jnp.zeros(K.shape, jnp.float64)
        return jax.lax.psum(programs.fold_grad(K, V, parts, acc, spec), ax)

    stats_fn = jax.jit(smap(spec.mesh, stats_local, (rep, shard), rep))
    grad_fn = jax.jit(smap(spec.mesh, grad_local, (rep, rep, shard), rep))
    return stats_fn, grad_fn


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
        cfg = FitConfig(prototypes=P, recipe="seed", residency="resident", devices=1,
                        chunk_rows=chunk)
        eng = build_engine(ArraySource(Qf, Xf), cfg)
        spec, ridge, parts = eng.spec, eng.ridge, eng.parts
        K = replicate(normal_keys(P, m), spec.mesh)  # as the step's outputs
        s = programs.init_state(K, spec=spec)
        for _ in range(a.warm_steps):
            K, s, out = eng.step(K, s)
        jax.block_until_ready(K)
        stats_fn, grad_fn = pass_programs(eng)
        stats = stats_fn(K, parts)
        solved = programs.solve(stats, ridge)  # a StepOut: V, loss, count, info, finite
        V, info = solved.V, solved.info
        g = grad_fn(K, V, parts)

        times = {
            "stats": _time(lambda: stats_fn(K, parts), a.steps, a.rounds),
            "solve": _time(lambda: programs.solve(stats, ridge).V, a.steps, a.rounds),
            "grad": _time(lambda: grad_fn(K, V, parts), a.steps, a.rounds),
            "update": _time(lambda: programs.apply_update(K, s, g, solved.finite, spec=spec)[0],
                            a.steps, a.rounds),
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
