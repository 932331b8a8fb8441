"""Data-parallel fit (one engine over a mesh of devices) on 1, 2, 4 and 8 fake CPU devices
against one device: ``scalemem.fit(..., devices=D)`` (resident rows) and
``scalemem.fit_source(..., devices=D, residency="streamed")``.

The device count of the CPU backend is fixed when JAX initialises, and other tests of this pytest
process have already initialised it with one device; so the checks run in a fresh Python
process started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which prints its
measurements as JSON; the assertions (and their tolerances) are here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Row count 3001: not divisible by 2, 4 or 8, so the device ranges differ in length by one row
# and the shorter devices carry a padding row (weight 0). P = 8 prototypes, 50 steps of Adam with
# the seed recipe (0.01·normal keys, constant Adam 5e-4), float64 compute.
CHILD = textwrap.dedent(r"""
    import functools, json, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as PS
    import scalemem
    from scalemem import _core
    from scalemem._config import FitConfig
    from scalemem._data import ArraySource
    from scalemem._engine import normal_keys
    from scalemem._engine import programs as prog
    from scalemem._engine.fitting import build_engine
    from scalemem._engine.mesh import make_mesh, replicate, smap

    assert jax.device_count() == 8, jax.devices()
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    N, m, n, P, STEPS, CHUNK = 3001, 6, 5, 8, 50, 256
    Q = rng.standard_normal((N, m))
    X = rng.standard_normal((N, n))
    out = {}
    PART = sys.argv[1]  # "a" or "b": the two halves run side by side
    # the old defaults: seed recipe, float64 compute of the float64 data
    OLD = dict(recipe="seed", dtype="float64")

    def rel(a, b):
        # largest elementwise relative difference (exact zeros must match exactly)
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        d = np.abs(a - b)
        return float(np.max(np.where(b == 0, np.where(d == 0, 0.0, np.inf),
                                     d / np.where(b == 0, 1.0, np.abs(b)))))

    def engine(Qa, Xa, D, **settings):
        # the engine scalemem.fit builds on D devices (call inside jax.enable_x64)
        cfg = FitConfig(**{"prototypes": P, "steps": STEPS, **OLD, **settings})
        return build_engine(ArraySource(Qa, Xa), cfg, mesh=make_mesh(D))

    @functools.partial(jax.jit, static_argnames=("spec",))
    def resident_stats(K, parts, *, spec):
        # the statistics pass of a resident step: every device folds its parts, one psum
        def local(K, parts):
            acc = _core.zero_stats(K.shape[0], parts[0].X.shape[-1])
            return jax.lax.psum(prog.fold_stats(K, parts, acc, spec), spec.axis)
        return smap(spec.mesh, local, (PS(), PS(spec.axis)), PS())(K, parts)

    @functools.partial(jax.jit, static_argnames=("spec",))
    def resident_grad(K, V, parts, *, spec):
        # the gradient pass of a resident step at (K, V), psum'ed over the devices
        def local(K, V, parts):
            acc = jnp.zeros(K.shape, jnp.float64)
            return jax.lax.psum(prog.fold_grad(K, V, parts, acc, spec), spec.axis)
        return smap(spec.mesh, local, (PS(), PS(), PS(spec.axis)), PS())(K, V, parts)

    def dots(text):
        # matmuls of a lowered program asking for bf16 operands / for HIGHEST precision
        return dict(bf16_dots=text.count("lhs_precision_type = bf16"),
                    highest_dots=text.count("precision = [HIGHEST, HIGHEST]"))

    def stats(eng, K):
        K = replicate(K, eng.spec.mesh)
        if eng.residency == "streamed":
            return jax.device_get(eng._pass("stats", K))  # the engine's own streamed pass
        return jax.device_get(resident_stats(K, eng.parts, spec=eng.spec))

    with jax.enable_x64(True):
        # K at the seed initialisation (nearly uniform attention) and at unit scale (peaked)
        Ks = [normal_keys(P, m, 0, jnp.float64), jnp.asarray(rng.standard_normal((P, m)))]
        Qb, Xb, wb = _core.to_blocks(Q, X, CHUNK, np.ones(N))
        ref_stats = [jax.device_get(_core.scan_stats(K, Qb, Xb, wb)) for K in Ks]
    ref = scalemem.fit(Q, X, P, steps=STEPS, chunk_rows=CHUNK, devices=1, **OLD)
    for D in ((1, 2) if PART == "a" else (4, 8)):
        with jax.enable_x64(True):
            eng = engine(Q, X, D, chunk_rows=CHUNK, residency="resident")
            st = [stats(eng, K) for K in Ks]
        r = scalemem.fit(Q, X, P, devices=D, steps=STEPS, chunk_rows=CHUNK, **OLD)
        out[f"mem{D}"] = dict(
            stats=max(rel(a, b) for s, rs in zip(st, ref_stats) for a, b in zip(s, rs)),
            count=[float(s.count) for s in st], residency=r.residency,
            K=rel(r.memory.K, ref.memory.K), V=rel(r.memory.V, ref.memory.V),
            loss=rel(r.loss, ref.loss), K_moved=rel(r.memory.K, Ks[0]))

    if PART == "b":
        # streaming over 8 devices (blocks of 2 chunks of <= 100 rows: ragged ranges, padded
        # last blocks)
        src = ArraySource(Q, X)
        with jax.enable_x64(True):
            eng = engine(Q, X, 8, residency="streamed", chunk_rows=100, chunks_per_block=2)
            st = [stats(eng, K) for K in Ks]
        r = scalemem.fit_source(src, P, devices=8, residency="streamed", steps=STEPS,
                                chunk_rows=100, chunks_per_block=2, **OLD)
        out["stream8"] = dict(
            stats=max(rel(a, b) for s, rs in zip(st, ref_stats) for a, b in zip(s, rs)),
            count=[float(s.count) for s in st], residency=r.residency,
            K=rel(r.memory.K, ref.memory.K), V=rel(r.memory.V, ref.memory.V),
            loss=rel(r.loss, ref.loss))

    if PART == "a":
        # L-BFGS (line search on the host) on 8 devices, resident and streamed, against one
        lb = dict(OLD, optimizer="lbfgs", steps=10)
        r1 = scalemem.fit(Q, X, P, devices=1, chunk_rows=CHUNK, **lb)
        r8 = scalemem.fit(Q, X, P, devices=8, chunk_rows=CHUNK, **lb)
        r8s = scalemem.fit_source(ArraySource(Q, X), P, devices=8, residency="streamed",
                                  chunk_rows=100, chunks_per_block=2, **lb)
        out["lbfgs8"] = dict(K=rel(r8.memory.K, r1.memory.K), loss=rel(r8.loss, r1.loss),
                             K_streamed=rel(r8s.memory.K, r1.memory.K),
                             loss_streamed=rel(r8s.loss, r1.loss),
                             passes=[r1.passes, r8.passes, r8s.passes],
                             K_moved=rel(r1.memory.K, Ks[0]))
        # opt-in reduced-precision gradient (float32 compute): the gradient at a peaked K against
        # the float64 one, for each grad_precision
        Q32, X32 = Q.astype(np.float32), X.astype(np.float32)
        with jax.enable_x64(True):
            K = Ks[1]
            e64 = engine(Q, X, 4, chunk_rows=CHUNK, residency="resident")
            K64 = replicate(K, e64.spec.mesh)
            V = e64.final(K64).V
            g64 = np.asarray(resident_grad(K64, V, e64.parts, spec=e64.spec))
            errs, hlo = {}, {}
            for prec in ("highest", "tf32", "bf16"):
                e = engine(Q32, X32, 4, chunk_rows=CHUNK, residency="resident", dtype="float32",
                           grad_precision=prec)
                K32 = replicate(K.astype(jnp.float32), e.spec.mesh)
                g = np.asarray(resident_grad(K32, V, e.parts, spec=e.spec))
                errs[prec] = float(np.linalg.norm(g - g64) / np.linalg.norm(g64))
                # the program a fit step runs (statistics at HIGHEST, gradient at prec)
                state = prog.init_state(K32, spec=e.spec)
                text = prog.resident_step.lower(K32, state, e.ridge, e.parts,
                                                spec=e.spec).as_text()
                hlo[prec] = dots(text)
            # the statistics pass has its own setting, reaching the same program
            e = engine(Q32, X32, 4, chunk_rows=CHUNK, residency="resident", dtype="float32",
                       stats_precision="bf16")
            K32 = replicate(K.astype(jnp.float32), e.spec.mesh)
            state = prog.init_state(K32, spec=e.spec)
            hlo["stats_bf16"] = dots(prog.resident_step.lower(K32, state, e.ridge, e.parts,
                                                              spec=e.spec).as_text())
        out["precision"] = errs
        out["precision_hlo"] = hlo
        # data-driven initial keys with a logit bias: the same path on one device and on two
        kw = dict(steps=5, chunk_rows=CHUNK, init="kmeans", key_bias=True, **OLD)
        r1 = scalemem.fit(Q, X, P, devices=1, **kw)
        r2 = scalemem.fit(Q, X, P, devices=2, **kw)
        out["kmeans_bias"] = dict(K=rel(r2.memory.K, r1.memory.K),
                                  bias=rel(r2.memory.bias, r1.memory.bias))
        try:
            scalemem.fit(Q, X, P, devices=2, steps=1, grad_precision="bf16", dtype="float64")
            out["bf16_f64_error"] = None
        except scalemem.ConfigError as e:
            out["bf16_f64_error"] = e.field
    out["rows"] = N
    out["seconds"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def parallel_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    # the two halves (reference fit repeated in each) run side by side on two cores
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, part], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for part in ("a", "b")]
    out = {}
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stdout[-3000:] + stderr[-5000:]
            line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
            out.update(json.loads(line[len("RESULT "):]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_sharded_matches_one_device(parallel_run, devices):
    r = parallel_run[f"mem{devices}"]
    assert r["residency"] == "resident"  # small data stays on the devices (residency "auto")
    # Statistics: float64 data, float64 sums; only the summation order (per-device partial sums,
    # then a psum over devices) and the chunk boundaries differ from one device, which changes
    # entries by a few float64 ulps times the number of terms (observed <= 5e-14 relative on the
    # smallest entries of B); 1e-12 leaves room for other BLAS orderings yet catches any row
    # dropped or counted twice (that would be a change of ~1/3001 ≈ 3e-4).
    assert r["stats"] <= 1e-12, r
    assert r["count"] == [parallel_run["rows"]] * 2  # every row counted once, padding weight 0
    # K after 50 Adam steps: the rounding differences above are amplified by the ridge solve,
    # whose condition number is huge at the seed initialisation (nearly uniform attention),
    # to ~1e-8 (the same as changing the chunk size on one device); rtol 1e-5 is the required
    # agreement and still 1000× below how far K moves in the fit (K_moved).
    assert r["K"] <= 1e-5, r
    assert r["K_moved"] > 1e-2
    # the losses are sums over all rows, so a dropped or duplicated row would show at ~3e-4
    assert r["loss"] <= 1e-9, r
    # (One device is a mesh of one running the same programs, so devices=1 reproduces the
    # reference fit bitwise; the bounds above apply to it as to any layout.)


def test_sharded_streaming_matches_one_device(parallel_run):
    r = parallel_run["stream8"]
    assert r["residency"] == "streamed"
    # same reasoning (and tolerances) as the resident engine; blocks of 2 chunks of <= 100 rows
    # over device ranges one row apart, the last block of every device padded
    assert r["stats"] <= 1e-12, r
    assert r["count"] == [parallel_run["rows"]] * 2
    assert r["K"] <= 1e-5 and r["loss"] <= 1e-9, r


def test_lbfgs_on_eight_devices_matches_one_device(parallel_run):
    r = parallel_run["lbfgs8"]
    # the same reasoning and tolerances as Adam's above: float64 rows, summation order only;
    # the line search decides on the host from the psum'ed losses, so every layout takes the
    # same trials (equal passes) and the same path
    assert r["K"] <= 1e-5 and r["K_streamed"] <= 1e-5, r
    assert r["loss"] <= 1e-9 and r["loss_streamed"] <= 1e-9, r
    assert len(set(r["passes"])) == 1, r
    assert r["K_moved"] > 1e-2, r


def test_gradient_grad_precision(parallel_run):
    e = parallel_run["precision"]
    # float32 at HIGHEST: ~1e-6 from the float64 gradient (a few float32 ulps through the
    # softmax backward); 1e-4 bounds it with room for other reduction orders
    assert e["highest"] <= 1e-4, e
    # CPUs have no TF32 dot: "tf32" falls back to full float32 there (same program)
    # (grad_precision; the gradients are the psum'ed fold_grad of each engine's resident parts)
    assert e["tf32"] == e["highest"], e
    # "bf16" asks XLA for bf16 operands with float32 accumulation in every gradient matmul;
    # XLA's CPU backend may run such a dot in float32 (it did here), a GPU runs it in bf16
    # (u = 2^-9: ~1e-2 relative). So on CPU: the request is in the program, and the result is
    # within bf16's error. (The program checked is the fit's step, resident_step, whose
    # statistics matmuls stay at HIGHEST.)
    h = parallel_run["precision_hlo"]
    assert h["bf16"]["bf16_dots"] >= 4 and h["highest"]["bf16_dots"] == 0, h
    assert h["highest"]["highest_dots"] >= 4, h
    assert h["bf16"]["highest_dots"] >= 4, h  # the statistics pass keeps its own precision
    assert e["bf16"] <= 5e-2, e
    # stats_precision="bf16" reaches the statistics matmuls of the same program, the gradient's
    # stay at HIGHEST
    assert h["stats_bf16"]["bf16_dots"] >= 4 and h["stats_bf16"]["highest_dots"] >= 4, h
    # reduced precision with float64 compute is refused with a typed error naming the setting
    assert parallel_run["bf16_f64_error"] == "grad_precision"


def test_data_init_and_key_bias(parallel_run):
    # init="kmeans" picks its logit scale by exact losses computed on the sharded engine, then
    # 5 steps; same rounding-level differences as above, so the same tolerance
    r = parallel_run["kmeans_bias"]
    assert r["K"] <= 1e-5 and r["bias"] <= 1e-5, r
