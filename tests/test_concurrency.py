"""Several reader processes on one HDF5 file and one Zarr store at once read identical data.

Four processes (``spawn``: no JAX state is forked) open the same two stores while this process
holds them open too, wait at a barrier so that the reads overlap, and read every row twice:
block by block in a random order, and through the read-ahead stream (a reader thread per
process). Each returns SHA-256 digests, compared with the digests of the data that was written.
Two of the readers run with ``HDF5_USE_FILE_LOCKING=FALSE`` (as on file systems without locks);
the others use scalemem's default (``locking="best-effort"``: HDF5's shared read lock where the
file system has locks). Marked slow: each process imports JAX.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os

import numpy as np
import pytest

import scalemem
from scalemem._data import StoreWriter

ROWS, WIDTH, CHUNK, BLOCK = 20_000, 16, 1024, 1500  # blocks straddle chunk boundaries
PROCESSES = 4


def _data():
    rng = np.random.default_rng(11)
    return rng.standard_normal((ROWS, WIDTH)).astype(np.float32)


def _digest(blocks) -> str:
    h = hashlib.sha256()
    for Q, X in blocks:
        h.update(np.ascontiguousarray(Q).tobytes())
        h.update(np.ascontiguousarray(X).tobytes())
    return h.hexdigest()


def _read_everything(path, seed: int) -> dict:
    """Digests of all rows read (a) in blocks, in a random order, reassembled in row order and
    (b) through the read-ahead block stream."""
    from scalemem._data import ChunkStream

    src = scalemem.open_source(path)
    try:
        starts = np.random.default_rng(seed).permutation(np.arange(0, src.rows, BLOCK))
        got = {int(s): src.read(int(s), min(int(s) + BLOCK, src.rows)) for s in starts}
        random_order = _digest(got[s] for s in sorted(got))
        stream = ChunkStream(src, chunk_rows=BLOCK // 3, chunks_per_block=3, to_device=False)
        streamed = _digest((b.Q.reshape(-1, b.Q.shape[-1])[:b.rows],
                            b.X.reshape(-1, b.X.shape[-1])[:b.rows]) for b in stream)
        return {"random_order": random_order, "streamed": streamed}
    finally:
        src.close()


def _reader(paths, index, barrier, results):
    if index % 2:
        os.environ["HDF5_USE_FILE_LOCKING"] = "FALSE"  # read when HDF5 first opens a file
    try:
        barrier.wait(timeout=300)
        results.put((index, {str(p): _read_everything(p, seed=index) for p in paths}))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((index, f"{type(e).__name__}: {e}"))


@pytest.mark.slow
def test_concurrent_readers_see_identical_data(tmp_path):
    data = _data()
    paths = []
    for fmt in ("hdf5", "zarr"):
        path = tmp_path / f"shared.{fmt}"
        with StoreWriter(path, fmt) as w:
            w.create_array("x", data.shape, data.dtype, chunk_rows=CHUNK).append(data)
            w.meta.update(views={"keys": "x[0:4]", "values": "x"})
        paths.append(path)
    # both ways of reading hand out blocks of BLOCK rows (the stream's are 3 × 500)
    expected = _digest((data[s:s + BLOCK, :4], data[s:s + BLOCK]) for s in range(0, ROWS, BLOCK))
    holders = [scalemem.open_source(p) for p in paths]  # this process keeps both open meanwhile
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(paths, i, barrier, results))
             for i in range(PROCESSES)]
    for p in procs:
        p.start()
    try:
        # generous: four processes import JAX on a shared two-core machine
        out = dict(results.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():  # pragma: no cover - only on a hang
                p.kill()
        for h in holders:
            h.close()
    assert sorted(out) == list(range(PROCESSES))
    for index, digests in out.items():
        assert isinstance(digests, dict), f"reader {index} failed: {digests}"
        for path in paths:
            assert digests[str(path)] == {"random_order": expected, "streamed": expected}, (
                index, path)
    assert all(p.exitcode == 0 for p in procs)
