"""Time per step: the seed's prototype, scalemem 0.1's in-memory engine and scalemem's one
engine (resident rows, one-device mesh), same data, same process, interleaved.

    python benchmarks/step_time.py --data-dir DIR [--prototypes 256] [--rows fit10k] [--json OUT]

All run P prototypes on the chosen Fashion-MNIST split (float32 data). Rounds alternate between
them so that machine load affects all alike; the median over rounds is reported together with
the ratios scalemem / prototype and scalemem / legacy (below 1 means scalemem is faster). The
legacy engine is the in-memory engine of b1ff527, kept in ``legacy_engine.py``.
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
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prototype  # noqa: E402
from legacy_engine import InMemoryEngine  # noqa: E402

from scalemem import ArraySource, FitConfig  # noqa: E402
from scalemem._core import default_chunk_rows  # noqa: E402
from scalemem._engine.fitting import build_engine  # noqa: E402
from scalemem._engine.init import normal_keys  # noqa: E402
from scalemem._engine.programs import init_state  # noqa: E402
from scalemem.datasets import fashion_mnist  # noqa: E402


def time_steps(run, steps: int) -> float:
    t = time.perf_counter()
    out = None
    for _ in range(steps):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--prototypes", type=int, default=256)
    ap.add_argument("--rows", default="fit10k", help="fit10k or fit60k")
    ap.add_argument("--chunk-rows", type=int, default=None,
                    help="rows per chunk (default: scalemem's default for P)")
    ap.add_argument("--steps", type=int, default=10, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    test = {"fit10k": "test60k", "fit60k": "test10k"}[a.rows]
    Qf, Xf, _, _ = fashion_mnist.reference_split(a.data_dir, a.rows, test)
    P = a.prototypes

    # prototype
    Q, X = jnp.asarray(Qf), jnp.asarray(Xf)
    K, V, st, opt = prototype.init(P, Q)
    V = jnp.zeros((P, X.shape[1]), jnp.float32)
    state = {"p": (K, V, st)}

    def proto_step():
        K, V, st = state["p"]
        state["p"] = prototype.step(K, V, st, opt, Q, X)
        return state["p"][0]

    # scalemem 0.1's in-memory engine and the one engine (resident, one device)
    with jax.enable_x64(True):
        sopt = optax.adam(5e-4)
        chunk = a.chunk_rows or default_chunk_rows(P, jax.default_backend())
        legacy = InMemoryEngine(Qf, Xf, optimizer=sopt, ridge=1e-6, chunk_rows=chunk,
                                dtype=jnp.float32)
        cfg = FitConfig(prototypes=P, recipe="seed", chunk_rows=chunk, residency="resident",
                        devices=1)
        eng = build_engine(ArraySource(Qf, Xf), cfg)
        K0 = normal_keys(P, Qf.shape[1])
        state["l"] = (K0, sopt.init(K0))
        state["s"] = (K0, init_state(K0, spec=eng.spec))

        def stepper(key, engine):
            def run():
                K, s = state[key]
                K, s, out = engine.step(K, s)
                state[key] = (K, s)
                return out.loss
            return run

        runs = {"prototype": proto_step, "legacy": stepper("l", legacy),
                "scalemem": stepper("s", eng)}
        for f in runs.values():  # compile + warm up
            time_steps(f, 2)
        times = {k: [] for k in runs}
        for _ in range(a.rounds):
            for k, f in runs.items():
                times[k].append(time_steps(f, a.steps))
    res = {"prototypes": P, "rows": len(Qf), "chunk_rows": legacy.chunk_rows,
           "device": str(jax.devices()[0].device_kind),
           **{f"{k}_s_per_step": statistics.median(v) for k, v in times.items()},
           "rounds": times}
    res["ratio_scalemem_over_prototype"] = res["scalemem_s_per_step"] / res["prototype_s_per_step"]
    res["ratio_scalemem_over_legacy"] = res["scalemem_s_per_step"] / res["legacy_s_per_step"]
    print(f"P={P} rows={len(Qf)} device={res['device']}")
    print(f"  prototype  {res['prototype_s_per_step'] * 1e3:8.1f} ms/step")
    print(f"  legacy     {res['legacy_s_per_step'] * 1e3:8.1f} ms/step")
    print(f"  scalemem   {res['scalemem_s_per_step'] * 1e3:8.1f} ms/step")
    print(f"  ratio      {res['ratio_scalemem_over_prototype']:8.3f} (scalemem / prototype)")
    print(f"  ratio      {res['ratio_scalemem_over_legacy']:8.3f} (scalemem / legacy engine)")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
