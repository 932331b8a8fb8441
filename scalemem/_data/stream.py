"""A stream of fixed-shape row blocks over a :class:`~scalemem._data.Source` (the last one padded
with rows of weight 0: one shape, one compilation), read ahead by a thread while the consumer
computes; a reader error is raised in the consumer and an early stop joins the thread; each
block's CRC-32 is kept from the first pass and compared on every later one, so data changed under
a running fit is an error (docs/design.md, "The read-ahead stream", "Data identity"). The host
blocks come from a fixed pool, reused once nothing refers to them (see :class:`ChunkStream`)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import queue
import threading
import time
import zlib
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np

from .._errors import DataError
from .buffers import POLL_S, SPARE_BUFFERS, BufferPool
from .source import RowRange, Source
from .sources import aligned_empty, is_aligned
from .._validate import check_dtype, check_int

__all__ = ["Block", "ChunkStream", "READER_THREAD_NAME", "block_crc"]

READER_THREAD_NAME = "scalemem-reader"
_TRIM_BYTES = 64 << 20  # block bytes read between two returns of free heap pages to the OS


def _find_malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` (another C library, or ``SCALEMEM_MALLOC_TRIM=0``)."""
    if os.environ.get("SCALEMEM_MALLOC_TRIM", "1") == "0":
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def release_free_heap() -> None:
    """Return the free pages of every malloc arena to the OS (glibc ``malloc_trim(0)``; a no-op
    elsewhere): without it the resident size crept up 30-60 MiB a pass over 10⁶ rows (measured;
    docs/design.md, "Why the stream returns free heap pages to the OS")."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def block_crc(*arrays, crc: int = 0) -> int:
    """CRC-32 of the raw bytes of ``arrays`` (zlib: ~3 GB/s, and it lets other threads run)."""
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a), crc)
    return crc


def _host_block(a, rows: int) -> np.ndarray:
    """``a`` padded with zero rows to ``rows`` rows, as a 64-byte aligned C-contiguous array so
    that ``device_put`` to a CPU device aliases it instead of copying it in the consumer's
    thread (copied here, in the reader thread, only when ``a`` is not one already)."""
    a = np.asarray(a)
    if a.shape[0] == rows and is_aligned(a):
        return a
    out = aligned_empty((rows,) + a.shape[1:], a.dtype)
    out[:a.shape[0]] = a
    out[a.shape[0]:] = 0
    return out


class Block(NamedTuple):
    """One block of a pass. ``Q``/``X`` keep the source's stored dtypes (scales are applied by
    the engine); ``w`` is 1 on real rows and 0 on padding. Arrays are on the device when the
    stream was made with ``to_device=True`` (the default), else NumPy arrays."""

    index: int  # block number in the pass
    start: int  # source row of the block's first row
    rows: int  # real (unpadded) rows in the block
    Q: Any  # (chunks_per_block, chunk_rows, key_dim)
    X: Any  # (chunks_per_block, chunk_rows, value_dim)
    w: Any  # (chunks_per_block, chunk_rows)


_END = object()  # queued after the last block; a reader's exception is queued as it is


class ChunkStream:
    """Blocks of ``source`` for one pass, from block ``start`` to the end.

    Iterate it (``for block in stream``) once per pass; each iteration starts at ``cursor``,
    which is ``start`` initially and the block after the last one handed out afterwards; call
    :meth:`rewind` (or make a new stream) for the next full pass. With ``verify`` (the default)
    a block that reads differently from the first time it was read raises
    :class:`~scalemem.DataError`: the source changed while it was being streamed.

    Host buffers: each block is read into one of a fixed pool of ``buffers`` 64-byte aligned
    host blocks (Q, X and w in one allocation, allocated on first need and kept for later
    passes). A new ~56 MB block each time (float32, 16384 rows × 862 columns) made the resident
    size swing by ~300 MB within a fit and its peak grow with the number of blocks
    (``benchmarks/memory_scaling.py``). ``None`` (default): ``prefetch + 3``, for the queued
    blocks, the one being read, the next one already on the device and the one being computed.
    A pooled block is refilled only when nothing refers to it: no array handed out (nor a view
    of one), no queue or CRC check, no device array or computation. On a CPU device
    ``device_put`` aliases the host block, and XLA holds a reference to it until the last
    computation using it has finished (on an accelerator, until its copy to the device has), so
    the reference count tells, at no cost, and nothing is copied. A computation still in flight
    (the streamed engine keeps up to 2) therefore keeps its buffer and the reader waits for one;
    measured, the engine waited for blocks no longer with 5 buffers than with 7, and peaked
    ~80 MB lower. If every pooled block stays in use while the consumer waits for the next one
    (it keeps blocks), the reader allocates one outside the pool instead of waiting forever
    (counted by :meth:`buffer_stats`). The source's ``read`` still returns new arrays, copied
    into the pooled block and freed at once.
    ``buffers=0``: a new host block for each block (no pool).
    """

    def __init__(self, source: Source, *, chunk_rows: int, chunks_per_block: int = 1,
                 weight_dtype=np.float32, prefetch: int = 2, start: int = 0,
                 to_device: bool = True, device=None, verify: bool = True,
                 buffers: int | None = None):
        self.source = source
        self.chunk_rows = check_int("chunk_rows", chunk_rows, 1)
        self.chunks_per_block = check_int("chunks_per_block", chunks_per_block, 1)
        self.prefetch = check_int("prefetch", prefetch, 1)
        self.block_rows = self.chunk_rows * self.chunks_per_block
        self.num_blocks = -(-int(source.rows) // self.block_rows)
        self.cursor = check_int("start", start, 0, self.num_blocks)
        self.weight_dtype = np.dtype(weight_dtype)
        self.to_device, self.device = to_device, device
        self._crcs: dict[int, int] | None = {} if verify else None  # block -> CRC-32 as first read
        buffers = self.prefetch + SPARE_BUFFERS if buffers is None else check_int(
            "buffers", buffers, 0)
        self._pool = BufferPool(buffers) if buffers else None
        self.consumer_wait_s = 0.0  # seconds the consumer waited for a block, all passes

    def buffer_stats(self) -> dict | None:
        """The host-buffer pool: ``capacity``, ``allocated`` (pooled blocks allocated so far),
        ``pooled`` and their ``bytes``, ``extra`` (blocks allocated outside the pool because
        every pooled one was in use while the consumer waited) and ``waits`` (reads that waited
        for a pooled block to be released); ``None`` without a pool."""
        return None if self._pool is None else self._pool.stats()

    def rewind(self, start: int = 0) -> None:
        """Set the cursor (the block the next iteration starts from)."""
        self.cursor = check_int("start", start, 0, self.num_blocks)

    def read_block(self, index: int, buffers=None) -> Block | None:
        """Block ``index`` as NumPy arrays, read and padded in the calling thread: into new
        arrays, or into the arrays ``buffers(parts)`` returns for the ``(shape, dtype)`` parts
        Q, X, w (a pooled block; ``None`` from it: none, and ``None`` is returned)."""
        src, B = self.source, self.block_rows
        s = index * B
        e = min(s + B, int(src.rows))
        out = None
        if buffers is not None:
            dtypes = (getattr(src, "key_dtype", None), getattr(src, "value_dtype", None))
            if all(d is not None for d in dtypes):
                out = buffers(((B, src.key_dim), np.dtype(dtypes[0])),
                              ((B, src.value_dim), np.dtype(dtypes[1])),
                              ((B,), self.weight_dtype))
                if out is None:
                    return None
        Q, X = src.read(s, e)
        n = e - s
        for what, a, dim in (("keys", Q, src.key_dim), ("values", X, src.value_dim)):
            if getattr(a, "shape", None) != (n, dim):
                raise DataError(f"{src.name}: read({s}, {e}) returned {what} of shape "
                                f"{getattr(a, 'shape', None)}, expected {(n, dim)}")
            check_dtype(what, getattr(a, "dtype", object), f"{src.name}: read({s}, {e}) ")
        w = np.ones(n, self.weight_dtype)
        if out is not None and all(np.asarray(a).dtype == o.dtype for a, o in zip((Q, X), out)):
            for o, a in zip(out, (Q, X, w)):
                o[:n] = a
                o[n:] = 0
            Q, X, w = out
        else:  # no pool, or the source read other dtypes than it declares: new arrays
            Q, X, w = (_host_block(a, B) for a in (Q, X, w))
        c, k = self.chunk_rows, self.chunks_per_block
        return Block(index, s, n, Q.reshape(k, c, -1), X.reshape(k, c, -1), w.reshape(k, c))

    def _verify(self, block: Block) -> None:
        """Compare the block's CRC-32 with the one of its first read (recorded then)."""
        crc = block_crc(block.Q, block.X)
        index, s, e = block.index, block.start, block.start + block.rows
        first = self._crcs.setdefault(index, crc)
        if first != crc:
            off = self.source.start if isinstance(self.source, RowRange) else 0
            raise DataError(
                f"{self.source.name}: rows {s + off}:{e + off} changed while they were being read "
                f"(CRC-32 {first:08x} when first read, {crc:08x} now): the store was modified or "
                "replaced during the fit. It was stopped before the step that read them ended; "
                "earlier checkpoints are kept. Put the original data back and resume, or start "
                "a new run on the new data")

    def __iter__(self) -> Iterator[Block]:
        first = self.cursor
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        # block CRCs are computed by a thread of their own (zlib lets threads run), so the
        # reader goes on reading meanwhile; a mismatch is raised at the next block handed out,
        # at the latest when the pass ends: before the step that read the rows can finish
        checks = None if self._crcs is None else queue.Queue(maxsize=self.prefetch + 1)
        failed: list[BaseException] = []
        waiting = threading.Event()  # set while the consumer waits for the next block
        pool = self._pool
        buffers = None if pool is None else (
            lambda *parts: pool.acquire(parts, stop, lambda: waiting.is_set() and q.empty()))

        def take():
            t = time.perf_counter()
            waiting.set()
            try:
                return q.get()
            finally:
                waiting.clear()
                self.consumer_wait_s += time.perf_counter() - t

        def offer(item, into=q) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    into.put(item, timeout=POLL_S)
                    return True
            return False

        def checker() -> None:
            while not stop.is_set():
                try:
                    item = checks.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                try:
                    self._verify(item)
                except BaseException as e:  # noqa: BLE001 - raised in the consumer
                    failed.append(e)
                    offer(e)  # wakes a consumer waiting for the next block
                    return

        def reader() -> None:
            since_trim = 0
            try:
                for i in range(first, self.num_blocks):
                    block = self.read_block(i, buffers)
                    if block is None:  # stopped while waiting for a pooled block
                        return
                    if checks is not None and not offer(block, checks):
                        return
                    since_trim += block.Q.nbytes + block.X.nbytes
                    if since_trim >= _TRIM_BYTES:
                        release_free_heap()
                        since_trim = 0
                    if not offer(block):  # the consumer has gone away
                        return
                    del block
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
                offer(e)
                return
            if checks is None or offer(_END, checks):
                offer(_END)

        def ready(item):
            """A device block from a host block; a reader failure is raised here, when the
            consumer asks for the block that failed (not while it holds the one before)."""
            if isinstance(item, BaseException):
                raise item
            if item is _END or not self.to_device:
                return item
            Q, X, w = jax.device_put((item.Q, item.X, item.w), self.device)
            return item._replace(Q=Q, X=X, w=w)

        threads = [threading.Thread(target=f, name=READER_THREAD_NAME, daemon=True)
                   for f in ((reader, checker) if checks is not None else (reader,))]
        for t in threads:
            t.start()
        try:
            current = ready(take())
            while current is not _END:
                if failed:
                    raise failed[0]
                try:  # already read? then start its copy before computing
                    nxt = q.get_nowait()
                except queue.Empty:
                    nxt = None
                if nxt is not None and not isinstance(nxt, BaseException):
                    nxt = ready(nxt)
                self.cursor = current.index + 1
                yield current
                current = ready(take() if nxt is None else nxt)
            for t in threads[1:]:  # the checker: every block of the pass checked
                t.join()
            if failed:
                raise failed[0]
        finally:
            stop.set()
            for t in threads:
                t.join()
            release_free_heap()  # also after passes shorter than _TRIM_BYTES
