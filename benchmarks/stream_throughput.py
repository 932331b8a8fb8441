#!/usr/bin/env python
"""Out-of-core acceptance benchmark: does the block stream keep up with the store?

    python benchmarks/stream_throughput.py --store STORE [--rounds 3] [--json OUT]
    python benchmarks/stream_throughput.py --workdir DIR --rows 1e6 [--json OUT]

On one store (an existing HDF5 file or Zarr directory, or a synthetic Zarr store of ``--rows`` rows
written to / reused from ``--workdir`` as ``synthetic-ROWS.zarr``), in one process:

(a) raw reads: ``source.read(s, e)`` over every row range of the pass, in a loop, no compute;
(b) the stream: ``ChunkStream`` over the same source with the same block size (the engine's: the
    balanced chunk length for ``--chunk-rows`` times ``--chunks-per-block``), consuming blocks as
    fast as possible, each block moved to the device (``device_put``, waited for);
(c) a streamed statistics pass (``StreamedEngine.final`` of the one engine, ``residency=
    "streamed"`` on one device: the statistics of every block at P = ``--prototypes`` keys,
    folded, reduced, and the ridge solve), the compute-bound pass of a fit step; with
    ``--resident-max-mb`` it is compared with the same pass (the same block, reduce and solve
    programs) over blocks already on the device (the cost of streaming on top of the compute).

(a) and (b) alternate for ``--rounds`` rounds after one untimed warm-up pass (so the page cache
is equally warm for both; the rates are then decompression-bound, not disk-bound); the median
round is reported. Acceptance: stream / raw ≥ 0.70 (rows per second).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="an existing store (HDF5 file or Zarr directory)")
    ap.add_argument("--workdir", type=Path, help="folder for a synthetic store (with --rows)")
    ap.add_argument("--rows", default="1e6", help="rows of the synthetic store (default 1e6)")
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--chunks-per-block", type=int, default=4)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--prototypes", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stats", action=argparse.BooleanOptionalAction, default=True,
                    help="run (c), the streamed statistics pass (default on)")
    ap.add_argument("--resident-max-mb", type=float, default=1024,
                    help="also time (c) on device-resident blocks when the data is at most "
                         "this many MB (0: never)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

    from scalemem import _core  # noqa: PLC0415
    from scalemem._data import ChunkStream, open_source  # noqa: PLC0415
    from scalemem._engine import programs  # noqa: PLC0415
    from streamed import streamed_engine  # noqa: PLC0415

    if a.store is None:
        if a.workdir is None:
            ap.error("give --store or --workdir (and --rows)")
        from scalemem._data import write_synthetic  # noqa: PLC0415

        n = int(float(a.rows))
        a.workdir.mkdir(parents=True, exist_ok=True)
        a.store = a.workdir / f"synthetic-{n}.zarr"
        if not a.store.exists():
            print(f"writing {a.store} ...", file=sys.stderr, flush=True)
            write_synthetic(a.store, n)
    src = open_source(a.store)
    N = int(src.rows)
    c = _core.balanced_chunk(N, a.chunk_rows)
    k = min(a.chunks_per_block, -(-N // c))
    B = c * k
    row_bytes = src.key_dim * src.key_dtype.itemsize + src.value_dim * src.value_dtype.itemsize
    total_mb = N * row_bytes / 1e6
    print(f"{src!r}\nblocks of {k} × {c} = {B} rows, {-(-N // B)} blocks, {total_mb:.0f} MB",
          file=sys.stderr, flush=True)

    def raw_pass() -> float:
        t = time.perf_counter()
        for s in range(0, N, B):
            src.read(s, min(s + B, N))
        return time.perf_counter() - t

    def stream_pass() -> float:
        stream = ChunkStream(src, chunk_rows=c, chunks_per_block=k, prefetch=a.prefetch)
        t = time.perf_counter()
        for b in stream:
            jax.block_until_ready((b.Q, b.X, b.w))
        return time.perf_counter() - t

    raw_pass()  # warm-up: page cache, zarr metadata, jax device_put path
    raw_t, stream_t = [], []
    for r in range(a.rounds):
        raw_t.append(raw_pass())
        stream_t.append(stream_pass())
        print(f"round {r}: raw {N / raw_t[-1]:.0f} rows/s, stream {N / stream_t[-1]:.0f} rows/s",
              file=sys.stderr, flush=True)
    raw_s, stream_s = statistics.median(raw_t), statistics.median(stream_t)
    out = {
        "store": str(a.store), "rows": N, "block_rows": B, "chunk_rows": c,
        "chunks_per_block": k, "prefetch": a.prefetch, "mb": total_mb,
        "raw": {"seconds": raw_s, "rows_per_s": N / raw_s, "mb_per_s": total_mb / raw_s,
                "rounds_s": raw_t},
        "stream": {"seconds": stream_s, "rows_per_s": N / stream_s,
                   "mb_per_s": total_mb / stream_s, "rounds_s": stream_t},
        "stream_over_raw": raw_s / stream_s,
        "loadavg": os.getloadavg(), "cpus": os.cpu_count(),
    }

    if a.stats:
        with jax.enable_x64(True):
            _, eng, K = streamed_engine(src, a.prototypes, chunk_rows=a.chunk_rows,
                                        chunks_per_block=a.chunks_per_block, prefetch=a.prefetch)
            spec = eng.spec
            jax.block_until_ready(eng.final(K))  # compile
            t = time.perf_counter()
            jax.block_until_ready(eng.final(K))
            st = time.perf_counter() - t
            out["stats_pass"] = {"seconds": st, "rows_per_s": N / st, "mb_per_s": total_mb / st,
                                 "prototypes": a.prototypes}
            if a.resident_max_mb and total_mb <= a.resident_max_mb:
                # the engine's blocks, laid on its mesh as its streams lay them
                on_mesh = NamedSharding(spec.mesh, PartitionSpec(spec.axis))
                stream = ChunkStream(src, chunk_rows=eng.chunk_rows,
                                     chunks_per_block=eng.chunks_per_block,
                                     weight_dtype=eng.dtype)
                blocks = [jax.device_put((b.Q, b.X, b.w), on_mesh) for b in stream]

                def resident():
                    acc = programs.stream_zeros(K, spec=spec, n=src.value_dim, what="stats")
                    for block in blocks:
                        acc = programs.stream_block(acc, K, None, block, spec=spec,
                                                    what="stats")
                    stats = programs.stream_reduce(acc, spec=spec)
                    return jax.block_until_ready(programs.solve(stats, eng.ridge))

                resident()
                t = time.perf_counter()
                resident()
                rt = time.perf_counter() - t
                del blocks
                out["stats_pass"].update(resident_seconds=rt,
                                         streamed_over_resident=st / rt)

    ok = out["stream_over_raw"] >= 0.70
    out["acceptance"] = {"stream_over_raw": out["stream_over_raw"], "bound": 0.70, "holds": ok}
    print(f"\n{'':<26} {'seconds':>8} {'rows/s':>10} {'MB/s':>8}")
    for name, key in (("(a) raw source.read", "raw"), ("(b) ChunkStream+device_put", "stream"),
                      ("(c) streamed stats pass", "stats_pass")):
        if key in out:
            r = out[key]
            print(f"{name:<26} {r['seconds']:>8.2f} {r['rows_per_s']:>10.0f} {r['mb_per_s']:>8.1f}")
    sp = out.get("stats_pass", {})
    if "resident_seconds" in sp:
        print(f"(c) on device-resident blocks: {sp['resident_seconds']:.2f} s; streamed / "
              f"resident = {sp['streamed_over_resident']:.3f}")
    print(f"stream / raw = {out['stream_over_raw']:.3f} (bound ≥ 0.70: "
          f"{'holds' if ok else 'FAILS'})")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
