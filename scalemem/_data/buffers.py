"""The fixed pool of host blocks a :class:`~scalemem._data.stream.ChunkStream` reads into, so the
resident size of a streamed fit does not depend on how many blocks pass: a block is reused once
nothing refers to it any more (decided by reference count, see :class:`HostBlock`)."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from .sources import ALIGN

__all__ = ["BufferPool", "HostBlock", "POLL_S", "SPARE_BUFFERS"]

POLL_S = 0.05  # how often a blocked reader checks whether the consumer has gone away
# Pooled host blocks beyond ``prefetch`` (ChunkStream's docstring counts them) and how often a
# reader that found none free looks again
SPARE_BUFFERS = 3
_WAIT_S = 0.002


def _find_collect_garbage():
    """jaxlib's ``collect_garbage`` (what JAX's own ``gc`` callback calls), or a no-op."""
    try:
        from jax._src.lib import _jax  # noqa: PLC0415 - private; optional

        return _jax.collect_garbage
    except (ImportError, AttributeError):  # pragma: no cover - another jaxlib
        return lambda: None


_collect_garbage = _find_collect_garbage()


class HostBlock:
    """One pooled host block: the ``(shape, dtype)`` ``parts`` (Q, X, w) in one allocation,
    each part 64-byte aligned (so ``device_put`` to a CPU device aliases it, as
    :func:`~scalemem._data.sources.aligned_empty`).

    Free is decided by reference count: every array handed out, every view of one (NumPy points
    a view's ``base`` at the array owning the memory) and XLA's own hold on a host array it
    aliases or is still copying from keep a reference to :attr:`owner`; when only the pool's
    remains, nothing can read the memory any more and it may be overwritten."""

    def __init__(self, parts):
        self.parts, self._offsets, total = parts, [], 0
        for shape, dtype in parts:
            total = -(-total // ALIGN) * ALIGN
            self._offsets.append(total)
            total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.nbytes = total
        self.owner = np.empty(total + ALIGN, np.uint8)
        self._shift = (-self.owner.ctypes.data) % ALIGN
        self._idle = sys.getrefcount(self.owner)  # the pool's own reference (+ the argument)

    def in_use(self) -> bool:
        return sys.getrefcount(self.owner) > self._idle

    def arrays(self) -> list[np.ndarray]:
        out = []
        for (shape, dtype), off in zip(self.parts, self._offsets):
            a = self._shift + off
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            out.append(self.owner[a:a + n].view(dtype).reshape(shape))
        return out


class BufferPool:
    """At most ``capacity`` :class:`HostBlock` of one layout, allocated as needed and reused
    once free; shared by the passes (iterations) of one stream."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._blocks: list[HostBlock] = []
        self._lock = threading.Lock()
        self.allocated = 0  # pooled blocks allocated
        self.extra = 0  # blocks allocated outside the pool (every pooled one in use)
        self.waits = 0  # reads that waited for a pooled block to be released

    def _claim(self, parts) -> list[np.ndarray] | None:
        with self._lock:
            if self._blocks and self._blocks[0].parts != parts:
                self._blocks = []  # another layout: those in use stay alive through their views
            for b in self._blocks:
                if not b.in_use():
                    return b.arrays()
            if len(self._blocks) < self.capacity:
                self._blocks.append(HostBlock(parts))
                self.allocated += 1
                return self._blocks[-1].arrays()
        return None

    def acquire(self, parts, stop: threading.Event, starving) -> list[np.ndarray] | None:
        """Arrays of ``parts`` in a free pooled block, waiting for one to be released; when
        every pooled block stays in use while the consumer waits for this block
        (``starving()``: it holds on to blocks), a block outside the pool (freed when dropped),
        not a deadlock. ``None`` when ``stop`` is set while waiting."""
        starved_since = None
        waited = False
        while True:
            arrays = self._claim(parts)
            if arrays is None:
                # XLA drops its hold on a host array it no longer needs when Python next calls
                # into it (the consumer's next dispatch does); apply those drops now
                _collect_garbage()
                arrays = self._claim(parts)
            if arrays is not None:
                return arrays
            if stop.is_set():
                return None
            if not waited:
                waited = True
                self.waits += 1
            if starving():
                now = time.monotonic()
                starved_since = now if starved_since is None else starved_since
                if now - starved_since >= POLL_S:
                    with self._lock:
                        self.extra += 1
                    return HostBlock(parts).arrays()
            else:
                starved_since = None
            time.sleep(_WAIT_S)

    def stats(self) -> dict:
        with self._lock:
            return {"capacity": self.capacity, "allocated": self.allocated,
                    "pooled": len(self._blocks),
                    "bytes": sum(b.nbytes for b in self._blocks), "extra": self.extra,
                    "waits": self.waits}
