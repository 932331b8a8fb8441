"""The engines: rows *resident* on the devices or *streamed* from a source, split over the devices
of ``spec.mesh``, running the programs of :mod:`.programs`; both offer what the fit loop needs
(docs/design.md, "Engines, programs and the mesh")."""

from __future__ import annotations

import functools
import os
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .. import _core
from .._core import StepOut
from .._data import ChunkStream, RowRange, locate_nonfinite
from . import programs as prog
from .mesh import assemble, local_row_ranges, mesh_devices, row_ranges

__all__ = ["ResidentEngine", "StreamedEngine", "memory_budget", "bucket_rows"]

_MAX_INFLIGHT = 2  # streamed block computations dispatched ahead of the oldest unfinished one
_READ_ROWS = 1 << 16  # rows per read while loading resident rows


def bucket_rows(rows: int) -> int:
    """``rows`` rounded up to a multiple of ``2^max(3, b-6)``, ``b`` its bit length: fewer than
    1/32 more rows (at most 7 below 512 rows), 32 sizes an octave. Arrays laid out for the
    bucket instead of the exact count give nearby row counts one compiled program (the folds of
    a cross-validation differ by a row: 6666 and 6667 both become 6784); the extra rows are
    padding of weight 0. Two neighbouring counts still differ when a multiple of the step lies
    between them (e.g. 6784 and 6785), as they must under any rounding."""
    rows = int(rows)
    step = 1 << max(3, rows.bit_length() - 6)
    return -(-rows // step) * step


def memory_budget(device) -> int:
    """What resident rows may take on ``device``: half of an accelerator's memory, a quarter of
    the host's physical memory (shared by its CPU devices) on a CPU."""
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]) // 2
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 << 30
    return total // 4 // max(1, len(jax.local_devices(backend="cpu")))


class _Engine:
    """What both engines share: the row split over the mesh and the error locator.
    ``per_device`` is the longest device range, rounded by :func:`bucket_rows` with ``bucket``."""

    def __init__(self, source, spec: prog.Spec, ridge: float, chunk_rows: int,
                 bucket: bool = False):
        self.source, self.spec = source, spec
        self.rows = int(source.rows)
        self.key_dim, self.value_dim = int(source.key_dim), int(source.value_dim)
        self.ridge = jnp.asarray(ridge, jnp.float64)
        self.ranges = row_ranges(self.rows, len(mesh_devices(spec.mesh)))
        self.per_device = max(e - s for s, e in self.ranges)
        if bucket:
            self.per_device = bucket_rows(self.per_device)
        self.chunk_rows = min(_core.balanced_chunk(self.per_device, chunk_rows), self.per_device)
        self._local = local_row_ranges(self.rows, spec.mesh)
        self.passes = 0  # passes over the rows so far (a statistics pass, a gradient pass: 1)

    def solved_at(self, K, out) -> None:
        """A solve at ``K`` made elsewhere (the initial keys' search): an Adam step recomputes
        it inside its one program, so it is not kept."""

    def locate_nonfinite(self):
        """The first NaN/Inf of this process's rows, or why the logits overflowed if none."""
        return locate_nonfinite(self.source, 1 << 14, self.chunk_rows,
                                ranges=[r for _, r in self._local])


@functools.partial(jax.jit, static_argnames=("value_scale", "dtype", "stack"))
def _prepare(X, w, *, value_scale, dtype, stack):
    """:func:`~scalemem._core.centre_values` of a chunk, or of each chunk of a ``stack``; a
    chunk's moments and mean get a leading axis of 1 (the device axis of a chunk part)."""
    centre = functools.partial(_core.centre_values, value_scale=value_scale, dtype=dtype)
    if stack:
        return jax.vmap(centre)(X, w)
    Y, moments, mu = centre(X, w)
    return Y, jax.tree.map(lambda a: a[None], moments), mu[None]


class ResidentEngine(_Engine):
    """Every row on the devices: chunks of ``chunk_rows`` (balanced, the last one shorter),
    unrolled up to :data:`~.programs.UNROLL_CHUNKS` chunks a device, else one scanned stack
    plus the rest. Every device holds :func:`bucket_rows` of the longest range's rows, those past
    its own range padding of weight 0, so fits of nearby row counts (cross-validation folds)
    share their compiled programs, at the cost of under 1/32 more rows."""

    def __init__(self, source, spec: prog.Spec, *, ridge: float, chunk_rows: int, dtype):
        super().__init__(source, spec, ridge, chunk_rows, bucket=True)
        c, per = self.chunk_rows, self.per_device
        nb, r = divmod(per, c)  # layout: (start, stop, chunks of a stack or 0 for one chunk)
        if nb + (r > 0) <= prog.UNROLL_CHUNKS:
            self.layout = [(s, min(s + c, per), 0) for s in range(0, per, c)]
        else:
            self.layout = [(0, nb * c, nb)] + ([(nb * c, per, 0)] if r else [])
        padded = any(e - s < per for s, e in self.ranges)
        prep = dict(value_scale=spec.value_scale, dtype=jnp.dtype(dtype))
        per_dev = {}
        for d, (s, e) in self._local:
            Q, X = self._read(s, e)
            w = (np.arange(per) < e - s).astype(dtype) if padded else None
            parts = []
            for a, b, stack in self.layout:
                q, x, v = Q[a:b], X[a:b], None if w is None else w[a:b]
                if stack:
                    q, x, v = (None if t is None else t.reshape((stack, c) + t.shape[1:])
                               for t in (q, x, v))
                q, x, v = jax.device_put((q, x, v), d)
                Y, mom, mu = _prepare(x, v, stack=bool(stack), **prep)
                parts.append(prog.Part(q, Y, v, mom, mu))
            per_dev[d] = parts
        self.parts = assemble(per_dev, spec.mesh)

    def _read(self, start: int, stop: int):
        """Rows ``start … stop-1`` as host arrays of ``per_device`` rows (zero padding)."""
        src, per = self.source, self.per_device
        Q = np.zeros((per, self.key_dim), np.dtype(src.key_dtype))
        X = np.zeros((per, self.value_dim), np.dtype(src.value_dtype))
        for a in range(start, stop, _READ_ROWS):
            b = min(a + _READ_ROWS, stop)
            Q[a - start:b - start], X[a - start:b - start] = src.read(a, b)
        return Q, X

    def step(self, K, opt_state):
        self.passes += 2
        return prog.resident_step(K, opt_state, self.ridge, self.parts, spec=self.spec)

    def final(self, K) -> StepOut:
        self.passes += 1
        return prog.resident_final(K, self.ridge, self.parts, spec=self.spec)

    def grad(self, K, V):
        """The variable-projection gradient at ``(K, V)`` (float64, one pass)."""
        self.passes += 1
        return prog.resident_grad(K, V, self.parts, spec=self.spec)


class StreamedEngine(_Engine):
    """Rows read from the source every pass: device ``i`` streams its range in blocks of
    ``chunks_per_block`` chunks of ``chunk_rows`` rows (the last block padded with rows of
    weight 0; a device with fewer blocks gets zero blocks)."""

    def __init__(self, source, spec: prog.Spec, *, ridge: float, chunk_rows: int,
                 chunks_per_block: int, dtype, one_pass: bool = False, prefetch: int = 2):
        super().__init__(source, spec, ridge, chunk_rows)
        c, per = self.chunk_rows, self.per_device
        self.chunks_per_block = k = min(chunks_per_block, -(-per // c))
        self.num_blocks = -(-per // (c * k))
        self.dtype = jnp.dtype(dtype)
        self.one_pass = bool(one_pass)
        self._streams = [(d, ChunkStream(RowRange(source, s, e), chunk_rows=c, chunks_per_block=k,
                                         weight_dtype=self.dtype, prefetch=prefetch, device=d)
                              if e > s else None) for d, (s, e) in self._local]
        self._zero_blocks: dict = {}
        self._last = None  # (K handed out, V solved at its predecessor), for one_pass

    def _zero_block(self, d):
        if d not in self._zero_blocks:
            c, k, src = self.chunk_rows, self.chunks_per_block, self.source
            self._zero_blocks[d] = jax.device_put(
                (np.zeros((k, c, self.key_dim), src.key_dtype),
                 np.zeros((k, c, self.value_dim), src.value_dtype),
                 np.zeros((k, c), self.dtype)), d)
        return self._zero_blocks[d]

    def _blocks(self):
        """Global ``(Q, X, w)`` blocks of one pass: block ``j`` of every device's range."""
        iters = []
        for _, s in self._streams:
            if s is not None:
                s.rewind()
            iters.append(iter(s) if s is not None else iter(()))
        D = len(mesh_devices(self.spec.mesh))
        c, k = self.chunk_rows, self.chunks_per_block
        sh = NamedSharding(self.spec.mesh, P(self.spec.axis))
        shapes = ((D * k, c, self.key_dim), (D * k, c, self.value_dim), (D * k, c))
        try:
            for _ in range(self.num_blocks):
                per_dev = []
                for (d, _), it in zip(self._streams, iters):
                    b = next(it, None)
                    per_dev.append(self._zero_block(d) if b is None else (b.Q, b.X, b.w))
                yield tuple(jax.make_array_from_single_device_arrays(
                    shapes[i], sh, [p[i] for p in per_dev]) for i in range(3))
            for it in iters:  # run each stream to its end: the check of its last blocks' CRCs
                for _ in it:
                    pass
        finally:
            for it in iters:
                if hasattr(it, "close"):  # a stream's generator, not the empty iterator
                    it.close()

    def _pass(self, what: str, K, V=None):
        """Fold every block (statistics, gradient or both) and reduce over the devices; at
        most ``_MAX_INFLIGHT`` block computations run ahead of the oldest unfinished one."""
        spec = self.spec
        acc = prog.stream_zeros(K, spec=spec, n=self.value_dim, what=what)
        inflight: deque = deque()
        for block in self._blocks():
            acc = prog.stream_block(acc, K, V, block, spec=spec, what=what)
            inflight.append(acc)
            if len(inflight) > _MAX_INFLIGHT:
                jax.block_until_ready(inflight.popleft())
        self.passes += 1
        return prog.stream_reduce(acc, spec=spec)

    def step(self, K, opt_state):
        lagged = self._last[1] if self._last is not None and self._last[0] is K else None
        if lagged is not None:
            stats, grad = self._pass("both", K, lagged)
            out = prog.solve(stats, self.ridge)
        else:
            out = self.final(K)
            grad = self._pass("grad", K, out.V)
        K_next, opt_state, ok = prog.apply_update(K, opt_state, grad, out.finite, spec=self.spec)
        if self.one_pass:
            self._last = (K_next, out.V)
        return K_next, opt_state, out._replace(finite=ok)

    def final(self, K) -> StepOut:
        return prog.solve(self._pass("stats", K), self.ridge)

    def grad(self, K, V):
        """The variable-projection gradient at ``(K, V)`` (float64, one pass)."""
        return self._pass("grad", K, V)
