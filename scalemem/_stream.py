"""A stream of fixed-shape row blocks over a :class:`~scalemem._source.Source`.

A pass over the source yields blocks of ``chunks_per_block × chunk_rows`` rows shaped
``(chunks_per_block, chunk_rows, ·)`` for the chunked ``lax.scan`` of :mod:`scalemem._core`;
the last block is padded with zero rows whose weight is 0, so every block has the same shape and
the jitted per-block functions compile once.

Overlap. A background thread reads blocks from the source into a bounded queue (``prefetch``
host blocks at most), while the consumer computes; the consumer issues ``jax.device_put`` for
the next block before it hands out the current one whenever that block is already read, so the
host-to-device copy runs while the current block is computed. At most ``prefetch`` host blocks
and two device blocks are held by the stream at a time.

Host memory. Host blocks are 64-byte aligned (:func:`~scalemem._sources.aligned_empty`), so on a
CPU device ``device_put`` aliases them instead of copying. Every ``_TRIM_BYTES`` of data read
and at the end of a pass the reader returns the C heap's free pages to the OS
(:func:`release_free_heap`); without that, glibc's per-thread arenas keep the freed block and
chunk buffers and the resident size creeps up pass after pass.

Errors and early stop. An exception raised by the reader thread (an unreadable chunk, say) is
re-raised in the consumer, where it would have occurred without the thread. If the consumer
stops early (``break``, an exception, or closing the generator), the reader thread is told to
stop and joined before control returns, so no thread outlives its pass.

Resuming. ``stream.cursor`` is the index of the next block to hand out; after fully processing
the block just received it is where to resume: ``ChunkStream(..., start=cursor)`` yields the
remaining blocks of the pass.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import threading
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np

from ._errors import DataError
from ._source import Source
from ._sources import aligned_empty, is_aligned
from ._validate import NUMERIC_KINDS, check_int

__all__ = ["Block", "ChunkStream", "READER_THREAD_NAME"]

READER_THREAD_NAME = "scalemem-reader"
_POLL_S = 0.05  # how often a blocked reader checks whether the consumer has gone away
_TRIM_BYTES = 64 << 20  # block bytes read between two returns of free heap pages to the OS


def _find_malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` (another C library, or ``SCALEMEM_MALLOC_TRIM=0``)."""
    if os.environ.get("SCALEMEM_MALLOC_TRIM", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def release_free_heap() -> None:
    """Return the free pages of every malloc arena to the OS (glibc ``malloc_trim(0)``; a no-op
    elsewhere).

    Why: a pass allocates and frees a few buffers of one block or one stored chunk (~13 MiB)
    per block, in several threads (the reader, zarr's decoding pool, XLA's workers). glibc
    serves them from per-thread arenas once its adaptive mmap threshold has risen past their
    size, and keeps what is freed there. Measured on a 2-core host, the resident size grew by
    30-60 MiB with every statistics pass over 10⁶ rows (six passes: from 640 to 820 MiB after
    the pass, peaks from 680 to 960 MiB) while the memory in use stayed near 100 MiB. Trimming
    every ``_TRIM_BYTES`` of data read and at the end of a pass keeps it flat (the same passes
    peaked at 680 MiB; a 3-step fit peaked at 571 MiB at 10⁵ rows and 609 MiB at 10⁷ rows,
    against 764 and 734 MiB with the code before it); its cost, faulting the freed pages in again
    when they are reused, was below the run-to-run noise of the stream's throughput. Forcing
    large buffers onto mmap instead (``M_MMAP_THRESHOLD``) also flattens it but made a pass
    4-7× slower there.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


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


class _End:
    pass


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = _End()


class ChunkStream:
    """Blocks of ``source`` for one pass, from block ``start`` to the end.

    Iterate it (``for block in stream``) once per pass; each iteration starts at ``cursor``,
    which is ``start`` initially and the block after the last one handed out afterwards; call
    :meth:`rewind` (or make a new stream) for the next full pass.
    """

    def __init__(self, source: Source, *, chunk_rows: int, chunks_per_block: int = 1,
                 weight_dtype=np.float32, prefetch: int = 2, start: int = 0,
                 to_device: bool = True, device=None):
        self.source = source
        self.chunk_rows = check_int("chunk_rows", chunk_rows, 1)
        self.chunks_per_block = check_int("chunks_per_block", chunks_per_block, 1)
        self.prefetch = check_int("prefetch", prefetch, 1)
        self.block_rows = self.chunk_rows * self.chunks_per_block
        self.num_blocks = -(-int(source.rows) // self.block_rows)
        self.cursor = check_int("start", start, 0, self.num_blocks)
        self.weight_dtype = np.dtype(weight_dtype)
        self.to_device, self.device = to_device, device

    def rewind(self, start: int = 0) -> None:
        """Set the cursor (the block the next iteration starts from)."""
        self.cursor = check_int("start", start, 0, self.num_blocks)

    def read_block(self, index: int) -> Block:
        """Block ``index`` as NumPy arrays, read and padded in the calling thread."""
        src, B = self.source, self.block_rows
        s = index * B
        e = min(s + B, int(src.rows))
        Q, X = src.read(s, e)
        n = e - s
        for what, a, dim in (("keys", Q, src.key_dim), ("values", X, src.value_dim)):
            if getattr(a, "shape", None) != (n, dim):
                raise DataError(f"{src.name}: read({s}, {e}) returned {what} of shape "
                                f"{getattr(a, 'shape', None)}, expected {(n, dim)}")
            kind = np.dtype(getattr(a, "dtype", object)).kind
            if kind not in NUMERIC_KINDS:
                raise DataError(f"{src.name}: read({s}, {e}) returned {what} of dtype "
                                f"{getattr(a, 'dtype', type(a).__name__)}; expected real "
                                "integers or floating point")
        w = aligned_empty((B,), self.weight_dtype)
        w[:n] = 1
        w[n:] = 0
        Q, X = _host_block(Q, B), _host_block(X, B)
        c, k = self.chunk_rows, self.chunks_per_block
        return Block(index, s, n, Q.reshape(k, c, -1), X.reshape(k, c, -1), w.reshape(k, c))

    def _put(self, b: Block) -> Block:
        if not self.to_device:
            return b
        Q, X, w = jax.device_put((b.Q, b.X, b.w), self.device)
        return b._replace(Q=Q, X=X, w=w)

    def __iter__(self) -> Iterator[Block]:
        first = self.cursor
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def offer(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=_POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        def reader() -> None:
            since_trim = 0
            try:
                for i in range(first, self.num_blocks):
                    block = self.read_block(i)
                    since_trim += block.Q.nbytes + block.X.nbytes
                    if since_trim >= _TRIM_BYTES:
                        release_free_heap()
                        since_trim = 0
                    if stop.is_set() or not offer(block):
                        return
                    del block
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
                offer(_Failure(e))
                return
            offer(_END)

        def take(block: bool):
            """The next queued item (``None`` when not blocking and nothing is ready yet)."""
            try:
                return q.get(block=block)
            except queue.Empty:
                return None

        def ready(item):
            """A device block from a host block; a reader failure is raised here, when the
            consumer asks for the block that failed (not while it holds the one before)."""
            if isinstance(item, _Failure):
                raise item.exc
            return item if item is _END else self._put(item)

        thread = threading.Thread(target=reader, name=READER_THREAD_NAME, daemon=True)
        thread.start()
        try:
            current = ready(take(True))
            while current is not _END:
                ahead = take(False)  # already read? then start its copy before computing
                nxt = ahead if ahead is None or isinstance(ahead, _Failure) else ready(ahead)
                self.cursor = current.index + 1
                yield current
                current = ready(take(True) if nxt is None else nxt)
        finally:
            stop.set()
            thread.join()
            release_free_heap()  # also after passes shorter than _TRIM_BYTES
