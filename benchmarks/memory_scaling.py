#!/usr/bin/env python
"""Out-of-core acceptance benchmark: host memory and step time of a streamed fit against rows.

    python benchmarks/memory_scaling.py --workdir DIR [--sizes 1e5,1e6,1e7] [--json OUT]
        [--dtypes uint8,float32] [--prototypes 256] [--steps 3] [--ulimit-v-kib 4194304]
        [--rss-bound 1.2] [--sample-s 0.5] [--buffers N] [--env NAME=VALUE]

For each store dtype (``--dtypes``) and size N a synthetic Zarr store of N rows (78 key columns,
784 value columns; ``scalemem.write_synthetic``, written chunk by chunk) is made in ``--workdir``
as ``synthetic-N.zarr`` (uint8, 862 B a row) or ``synthetic-float32-N.zarr`` (float32, 3448 B
a row), or reused when it is already there (a store is only published once it is complete, so
an interrupted write leaves nothing to reuse). Then a *fresh* Python process per store runs
``--steps`` fit steps at P = ``--prototypes`` streamed from the store (the fit loop
``scalemem._engine.fit_engine`` with the one engine's ``StreamedEngine`` on one device, the
seed's settings (K₀ = 0.01·normal, Adam 5e-4), exact two-pass mode, then the final statistics
pass, as ``scalemem.fit_source(..., residency="streamed")`` does) and reports its own peak
resident memory (``getrusage(RUSAGE_SELF).ru_maxrss`` and ``VmHWM``), its peak virtual size
(``VmPeak``), ``VmRSS`` sampled every ``--sample-s`` seconds by a thread of the child (min, max
and swing over the fit and after step 0, plus every sample, in the JSON; the table shows the
range after step 0), the read-ahead stream's host-buffer pool (``ChunkStream.buffer_stats``),
the seconds the engine waited for blocks, and the time of every step (each step is timed up to
``block_until_ready`` of its new keys). Step 0 compiles; seconds per step is the mean of steps
1 … steps-1. ``--buffers N`` gives the stream N pooled host blocks (0: a new one for every
block, the stream as it was before the pool).

Acceptance (printed per dtype, and in the JSON under ``acceptance``):

* memory independent of N: peak RSS at the largest size ≤ ``--rss-bound`` (default 1.2) × peak
  RSS at the smallest;
* time linear in N: t(N_max) / (N_max/N · t(N)) ≤ 1.3 against every smaller size N ≥ 10⁵
  (smaller sizes are dominated by per-step overheads and only reported).

Float32 stores (the issue "flat memory for float data too"): 2·10⁵ and 2·10⁶ rows, P = 64,
2 steps, blocks of 4 × 4096 rows (56 MB of float32), ``prefetch`` 2, under ``ulimit -v 4 GiB``,
run in ``benchmarks/`` on a 2-core CPU host (JAX 0.10.2, zarr 3.1.6; another job sharing the
cores, so wall-clock times are noisy; peaks are ``ru_maxrss``, MiB)::

    python memory_scaling.py --workdir /tmp/memscale --dtypes float32 --sizes 2e5,2e6 \
        --prototypes 64 --steps 2 --rss-bound 1.1 --ulimit-v-kib 4194304 --json OUT
    (the same with --dtypes uint8; --buffers 0 for the stream without its pool)

    store    stream                       peak RSS 2e5 / 2e6    ratio   RSS after step 0, 2e6
    float32  new host blocks (before)       686 /  799 MiB      1.165    478-793 MiB
    float32  pool of 5 host blocks          917 /  851 MiB      0.928    647-812 MiB
    float32  the same, run again            840 /  841 MiB      1.000    663-812 MiB
    uint8    new host blocks (--buffers 0)  570 /  598 MiB      1.048    434-578 MiB
    uint8    pool of 5 host blocks          542 /  540 MiB      0.995    438-498 MiB

(results/memory_scaling_float32_cpu_before.json, from the code before the pool;
results/memory_scaling_float32_cpu.json and its _repeat, results/memory_scaling_uint8_cpu.json,
results/memory_scaling_uint8_cpu_nopool.json.) Before, every block was a new 64-byte aligned
array, freed when its computation and the consumer were done with it: how many were alive
varied from block to block (RSS swung by 300 MB within one fit) and the peak rose with the
number of blocks that passed; a second run of the 2·10⁶-row float32 fit without the pool peaked
at 969 MiB. With the pool the stream's own memory is a fixed ``prefetch + 3`` blocks (5 × 56 MB
float32, 5 × 14 MB uint8), all in use within the first pass, and the peak no longer grows with
N; what still moves it (±60 MiB between runs, in either direction) are the transient
allocations of zarr's decoding and of XLA's block computations. The float32 fits peak higher
than the smallest figures before because the pool keeps its five blocks resident while the old
stream often had fewer alive; with 7 pooled blocks the 2·10⁶-row fit peaked at 929-945 MiB,
with 5 at 841-851 MiB, and the engine waited for blocks as long with either (97 and 100 s of
139 and 147 s fits: reading the store bounds it, not the buffers).

``ulimit -v`` (``--ulimit-v-kib``): each child sets ``RLIMIT_AS`` to that many KiB *before*
importing NumPy, JAX or zarr, exactly what ``ulimit -v KIB`` does for a shell. Measured with JAX
0.10.2 (CPU), zarr 3.1 and numcodecs 0.16 on a 2-core host, a 4 GiB limit (4194304 KiB) needs
nothing: every size, 10⁷ rows (8.6 GB of data) included, completes with no environment variable
or setting changed, and the peak virtual size (``VmPeak`` in the table) is 1.9-2.1 GiB whatever
N is. Where that goes: importing JAX maps 0.4 GiB of libraries; starting XLA's CPU client brings
the process to 1.45 GiB (its thread pool: about 26 threads in all with zarr's asyncio loop and
codec pool and the read-ahead thread, 8 MiB of stack reserved each); most of the rest is glibc's
malloc arenas, one per allocating thread up to 8 × cores, each reserving 64 MiB of address space
(only what is touched becomes resident). XLA's CPU client reserves no device-memory pool (the
GPU client's preallocation does not apply). The streaming itself adds nothing that grows with N.

Tighter limits: at 10⁴ rows 2 GiB still works (``VmPeak`` 1.7 GiB; larger N peak near
2.1 GiB, too close to rely on); at 1.5 GiB XLA aborts when it cannot create a thread
(``Check failed: ... Thread tf_foreach creation via pthread_create() failed``, exit -6).
``--env MALLOC_ARENA_MAX=2`` caps the arenas and brings ``VmPeak`` to about 1 GiB: with it the
fit runs even under a 1 GiB limit. Not a remedy: ``ulimit -s 1024`` (fails or hangs) and
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` (still aborts at 1.5 GiB). More cores mean
more XLA threads and arenas, so on a large host use ``MALLOC_ARENA_MAX`` under a tight
``ulimit -v``. (These limits were measured before the stream had its buffer pool, with P = 256
and 3 steps, the defaults of this script.) The stream's own memory is its pool of
``prefetch + 3`` host blocks (default 5 × 16384 rows × 862 B ≈ 70 MB for uint8, 280 MB for
float32). ``--env NAME=VALUE`` passes environment variables to the children.

The children run one after another; other load on the machine shows in the wall-clock step times
(the load average before each child is recorded in the JSON), so CPU seconds per step (user +
system time of the child) are reported too, and the linearity ratio in CPU time next to the
acceptance ratio in wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

KEY_DIM, VALUE_DIM = 78, 784


class RSSSampler:
    """A thread reading this process's ``VmRSS`` every ``interval`` seconds: the resident size
    *during* the fit, not only its peak (``(seconds since start, KiB)`` pairs)."""

    def __init__(self, interval: float):
        import threading  # noqa: PLC0415

        self.interval, self.samples = interval, []
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((round(time.perf_counter() - self._t0, 3),
                                 _status().get("VmRSS", 0)))
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((round(time.perf_counter() - self._t0, 3), _status().get("VmRSS", 0)))

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def summary(self, after: float = 0.0) -> dict:
        """Min, max and swing (KiB) of the samples taken from ``after`` seconds on."""
        v = [r for t, r in self.samples if t >= after]
        if not v:
            return {}
        return {"min_kib": min(v), "max_kib": max(v), "swing_kib": max(v) - min(v),
                "samples": len(v)}


def _status() -> dict:
    """VmPeak, VmHWM, VmRSS (KiB) and Threads of this process, from /proc/self/status."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmPeak", "VmHWM", "VmRSS", "Threads"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


# ----------------------------------------------------------------------------------------------
# child: one fit in a fresh process


def child(a) -> dict:
    if a.ulimit_v_kib:
        lim = a.ulimit_v_kib * 1024
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    t_start = time.perf_counter()
    import jax  # noqa: PLC0415 - imported after setrlimit on purpose

    from scalemem._data import open_source  # noqa: PLC0415
    from scalemem._engine.loop import fit_engine  # noqa: PLC0415
    from scalemem._engine.programs import init_state  # noqa: PLC0415
    from streamed import streamed_engine  # noqa: PLC0415

    after_import = _status()
    if a.buffers is not None:  # the stream's host-buffer pool: another size, or none (0)
        import functools  # noqa: PLC0415

        from scalemem._data import ChunkStream  # noqa: PLC0415
        from scalemem._engine import engines  # noqa: PLC0415

        engines.ChunkStream = functools.partial(ChunkStream, buffers=a.buffers)
    source = open_source(a.store)
    steps_t: list[float] = []
    steps_cpu: list[float] = []
    rss: list[int] = []

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    class Timed:
        """The streaming engine, with each step timed to the end of its computation."""

        def __init__(self, inner):
            self.inner, self.rows, self.value_dim = inner, inner.rows, inner.value_dim
            self.last, self.last_cpu = time.perf_counter(), cpu()

        def step(self, K, opt_state):
            out = self.inner.step(K, opt_state)
            jax.block_until_ready(out[0])
            now = time.perf_counter()
            steps_t.append(now - self.last)
            steps_cpu.append(cpu() - self.last_cpu)
            self.last, self.last_cpu = now, cpu()
            rss.append(_status().get("VmRSS", 0))
            step_ends.append(sampler.now())
            print(f"  [{source.rows} rows] step {len(steps_t) - 1}: {steps_t[-1]:.2f} s "
                  f"(CPU {steps_cpu[-1]:.1f} s), RSS {rss[-1] / 1024:.0f} MiB", file=sys.stderr,
                  flush=True)
            return out

        def final(self, K):
            return self.inner.final(K)

        def locate_nonfinite(self):
            return self.inner.locate_nonfinite()

    sampler = RSSSampler(a.sample_s)
    step_ends: list[float] = []  # sampler clock at the end of each step
    with jax.enable_x64(True), sampler:
        cfg, engine, K0 = streamed_engine(source, a.prototypes, steps=a.steps,
                                          chunk_rows=a.chunk_rows,
                                          chunks_per_block=a.chunks_per_block,
                                          prefetch=a.prefetch)
        state = init_state(K0, spec=engine.spec)
        timed = Timed(engine)
        t_fit = time.perf_counter()
        timed.last, timed.last_cpu = t_fit, cpu()
        res = fit_engine(timed, K0, engine.spec.transformation(), steps=a.steps, opt_state=state)
        fit_s = time.perf_counter() - t_fit
    st = _status()
    streams = [s for _, s in getattr(engine, "_streams", ()) if s is not None]
    pool = [s.buffer_stats() for s in streams if hasattr(s, "buffer_stats")]
    waited = [s.consumer_wait_s for s in streams if hasattr(s, "consumer_wait_s")]
    timed_steps = steps_t[1:] if len(steps_t) > 1 else steps_t
    timed_cpu = steps_cpu[1:] if len(steps_cpu) > 1 else steps_cpu
    return {
        "rows": int(source.rows), "store": str(a.store), "prototypes": a.prototypes,
        "steps": a.steps, "chunk_rows": engine.chunk_rows,
        "chunks_per_block": engine.chunks_per_block, "prefetch": a.prefetch,
        "passes": engine.passes, "step_seconds": steps_t,
        "seconds_per_step": sum(timed_steps) / len(timed_steps),
        "step_cpu_seconds": steps_cpu, "cpu_seconds_per_step": sum(timed_cpu) / len(timed_cpu),
        "fit_seconds": fit_s, "process_seconds": time.perf_counter() - t_start,
        "loss": [float(x) for x in res.loss],
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "vm_hwm_kib": st.get("VmHWM"), "vm_peak_kib": st.get("VmPeak"),
        "threads": st.get("Threads"), "rss_after_import_kib": after_import.get("VmRSS"),
        "rss_after_each_step_kib": rss, "ulimit_v_kib": a.ulimit_v_kib or None,
        "key_dtype": str(source.key_dtype), "value_dtype": str(source.value_dtype),
        "rss_during_fit": sampler.summary(),  # from the engine's construction to the end
        "rss_after_step0": sampler.summary(step_ends[0]) if step_ends else {},
        "rss_samples": {"interval_s": a.sample_s, "seconds_kib": sampler.samples,
                        "step_end_seconds": step_ends},
        "stream_buffers": pool or None,  # the read-ahead's buffer pool (None: no pool)
        "consumer_wait_seconds": waited or None,  # the engine waiting for blocks, whole fit
    }


# ----------------------------------------------------------------------------------------------
# parent: stores, one child per size, table, acceptance


DTYPES = ("uint8", "float32")


def store_path(workdir: Path, rows: int, dtype: str) -> Path:
    """``synthetic-ROWS.zarr`` (uint8, the name earlier runs used) or
    ``synthetic-float32-ROWS.zarr``."""
    return workdir / (f"synthetic-{rows}.zarr" if dtype == "uint8" else
                      f"synthetic-{dtype}-{rows}.zarr")


def ensure_store(workdir: Path, rows: int, dtype: str = "uint8") -> tuple[Path, float | None]:
    """The synthetic store of ``rows`` rows and ``dtype`` in ``workdir``, written (chunk by
    chunk, ``scalemem.write_synthetic``) if missing; (path, seconds spent writing)."""
    from scalemem._data import open_source, write_synthetic  # noqa: PLC0415

    path = store_path(workdir, rows, dtype)
    if path.exists():
        src = open_source(path)
        if (src.rows, src.key_dim, src.value_dim, str(src.key_dtype), str(src.value_dtype)) != (
                rows, KEY_DIM, VALUE_DIM, dtype, dtype):
            raise SystemExit(f"{path} exists but is not a {rows}×({KEY_DIM}+{VALUE_DIM}) {dtype} "
                             "synthetic store; remove it")
        return path, None
    print(f"writing {path} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    write_synthetic(path, rows, key_dim=KEY_DIM, value_dim=VALUE_DIM, dtype=dtype)
    return path, time.perf_counter() - t


def run_child(a, store: Path, env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--store", str(store),
           "--prototypes", str(a.prototypes), "--steps", str(a.steps),
           "--chunk-rows", str(a.chunk_rows), "--chunks-per-block", str(a.chunks_per_block),
           "--prefetch", str(a.prefetch), "--ulimit-v-kib", str(a.ulimit_v_kib or 0),
           "--sample-s", str(a.sample_s)] + (
               [] if a.buffers is None else ["--buffers", str(a.buffers)])
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"rows": None, "store": str(store), "failed": True, "returncode": p.returncode}
    return json.loads(lines[-1])


def _sizes(text: str) -> list[int]:
    return sorted({int(float(x)) for x in text.split(",") if x.strip()})


def acceptance(results: list[dict], rss_bound: float = 1.2) -> dict:
    """The acceptance figures of the runs of one dtype (``results`` sorted by rows)."""
    ok = [r for r in results if not r.get("failed")]
    out: dict = {"all_runs_completed": len(ok) == len(results)}
    if len(ok) < 2:
        return out
    small, big = ok[0], ok[-1]
    ratio = big["ru_maxrss_kib"] / small["ru_maxrss_kib"]
    out["rss"] = {"largest_rows": big["rows"], "smallest_rows": small["rows"],
                  "largest_kib": big["ru_maxrss_kib"], "smallest_kib": small["ru_maxrss_kib"],
                  "ratio": ratio, "bound": rss_bound, "holds": ratio <= rss_bound}
    lin = []
    for r in ok[:-1]:
        if r["rows"] < 100_000:
            continue
        f = big["seconds_per_step"] / (big["rows"] / r["rows"] * r["seconds_per_step"])
        fc = big["cpu_seconds_per_step"] / (big["rows"] / r["rows"] * r["cpu_seconds_per_step"])
        lin.append({"against_rows": r["rows"], "ratio": f, "bound": 1.3, "holds": f <= 1.3,
                    "cpu_time_ratio": fc})
    out["time_linearity"] = lin
    if a_ulimit := big.get("ulimit_v_kib"):
        out["ulimit_v"] = {"kib": a_ulimit, "rows": big["rows"], "completed": True}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="folder for the synthetic stores (reused)")
    ap.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated row counts")
    ap.add_argument("--dtypes", default="uint8",
                    help=f"comma-separated store dtypes, of {', '.join(DTYPES)} (default uint8)")
    ap.add_argument("--prototypes", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="fit steps (step 0 compiles; default 3)")
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--chunks-per-block", type=int, default=4)
    ap.add_argument("--prefetch", type=int, default=2, help="read-ahead blocks of the stream")
    ap.add_argument("--buffers", type=int, default=None,
                    help="pooled host blocks of the stream (default: the stream's own, "
                         "prefetch + 3; 0: a new host block for every block, no pool)")
    ap.add_argument("--ulimit-v-kib", type=int, default=0,
                    help="RLIMIT_AS of each fit process, in KiB (as ulimit -v); 0: unlimited")
    ap.add_argument("--sample-s", type=float, default=0.5,
                    help="seconds between two VmRSS samples during a fit (default 0.5)")
    ap.add_argument("--rss-bound", type=float, default=1.2,
                    help="acceptance: peak RSS at the largest size ≤ this × at the smallest "
                         "(default 1.2; the float32 issue asks 1.1)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment variable for the fit processes (repeatable)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)), flush=True)
        return 0
    if a.workdir is None:
        ap.error("--workdir is required")
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes: each of {', '.join(DTYPES)}")
    a.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for kv in a.env:
        k, _, v = kv.partition("=")
        env[k] = v
    results, write_s = [], {}
    for dtype in dtypes:
        for n in _sizes(a.sizes):
            store, ws = ensure_store(a.workdir, n, dtype)
            if ws is not None:
                write_s[f"{dtype}-{n}"] = ws
            load = os.getloadavg()[0]
            print(f"fit: {dtype}, {n} rows, P={a.prototypes}, {a.steps} steps"
                  + (f", ulimit -v {a.ulimit_v_kib}" if a.ulimit_v_kib else "") + " ...",
                  file=sys.stderr, flush=True)
            r = run_child(a, store, env)
            r["rows"], r["dtype"] = n, dtype
            r["loadavg_before"] = load
            results.append(r)
    acc = {d: acceptance([r for r in results if r["dtype"] == d], a.rss_bound) for d in dtypes}

    print(f"\n{'dtype':>7} {'rows':>10} {'peak RSS MiB':>12} {'VmHWM MiB':>10} "
          f"{'VmPeak MiB':>10} {'RSS min-max MiB':>16} {'s/step':>9} {'CPU s/step':>10} "
          f"{'rows/s':>10} {'MB/s':>7}")
    for r in results:
        if r.get("failed"):
            print(f"{r['dtype']:>7} {r['rows']:>10} FAILED (exit {r['returncode']})")
            continue
        row_bytes = (KEY_DIM + VALUE_DIM) * (4 if r["dtype"] == "float32" else 1)
        mbs = 2 * r["rows"] * row_bytes / r["seconds_per_step"] / 1e6
        during = r.get("rss_after_step0") or r.get("rss_during_fit") or {}
        swing = (f"{during['min_kib'] / 1024:.0f}-{during['max_kib'] / 1024:.0f}"
                 if during else "-")
        print(f"{r['dtype']:>7} {r['rows']:>10} {r['ru_maxrss_kib'] / 1024:>12.0f} "
              f"{r['vm_hwm_kib'] / 1024:>10.0f} {r['vm_peak_kib'] / 1024:>10.0f} {swing:>16} "
              f"{r['seconds_per_step']:>9.2f} {r['cpu_seconds_per_step']:>10.2f} "
              f"{r['rows'] / r['seconds_per_step']:>10.0f} {mbs:>7.1f}")
    print("(RSS min-max: VmRSS sampled every "
          f"{a.sample_s:g} s after step 0 ended)")
    for d in dtypes:
        x = acc[d].get("rss")
        if x:
            print(f"{d}: peak RSS {x['largest_rows']} / {x['smallest_rows']} rows: "
                  f"{x['largest_kib'] / 1024:.0f} / {x['smallest_kib'] / 1024:.0f} MiB = "
                  f"{x['ratio']:.3f} (bound ≤ {x['bound']:g}: "
                  f"{'holds' if x['holds'] else 'FAILS'})")
        for x in acc[d].get("time_linearity", []):
            print(f"{d}: time per step vs linear from {x['against_rows']} rows: "
                  f"{x['ratio']:.3f} (bound ≤ 1.3: {'holds' if x['holds'] else 'FAILS'}; "
                  f"CPU time: {x['cpu_time_ratio']:.3f})")
    completed = all(x["all_runs_completed"] for x in acc.values())
    if a.ulimit_v_kib:
        print(f"ulimit -v {a.ulimit_v_kib} KiB: "
              f"{'every fit completed' if completed else 'a fit FAILED'}")
    if a.json:
        import jax  # noqa: PLC0415
        import zarr  # noqa: PLC0415

        a.json.write_text(json.dumps({
            "results": results, "acceptance": acc, "store_write_seconds": write_s,
            "settings": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in vars(a).items() if k not in ("child", "store")},
            "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                     "jax": jax.__version__, "zarr": zarr.__version__,
                     "machine": platform.machine()}}, indent=2))
    return 0 if completed else 1


if __name__ == "__main__":
    sys.exit(main())
