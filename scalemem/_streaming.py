"""Out-of-core fitting: an engine that streams a :class:`~scalemem._source.Source` block by
block, so the data set never has to fit in host or device memory.

Exact mode (default): each step makes two passes over the source. The statistics pass merges
``scan_stats`` of every block into a float64 accumulator on the device; the ridge solve gives
``V_t``; the gradient pass sums ``scan_grad`` at ``(K_t, V_t)``; the optimiser moves ``K``. This is
the in-memory step exactly: the chunks (and so every chunk product) are the same, and the
float64 accumulators are carried through each block's scan, so the sums are formed in the same
order as in :func:`scalemem.fit`'s single scan. On one device the two agree bitwise
(``tests/test_streaming.py`` checks it with a tolerance that leaves room for the compiler).

One-pass mode (``one_pass=True``): one read of the data per step. The pass at ``K_t``
accumulates the statistics at ``K_t`` *and* the gradient at ``(K_t, V_{t-1})``, where ``V_{t-1}``
was solved from the previous step's statistics; the first step (and the first after a resume)
makes the two exact passes. Effect on the result: the reported loss is still exact (the loss
at ``(K_t, V_t)``) and the final ``V`` is still solved exactly at the final ``K``, but ``K`` moves
along ``∂/∂K ½‖X − A(K)V_{t-1}‖²`` instead of the variable-projection gradient at ``V_t``: the
fit becomes block-coordinate descent with a one-step lag and follows a different path. The
gradients differ by a term linear in ``V_t − V_{t-1}``. Where ``V`` reacts strongly to ``K`` (nearly
uniform attention, as with the default initialisation ``0.01·N(0, 1)`` in the first steps, or a
tiny ridge) the lag slows the descent markedly; once the attention is peaked (keys of order 1
against the data) the loss curve stays within a few per cent of the exact mode's. It halves the
reading per step, which pays off when a step is I/O-bound; compare the two on a subset first.

Device memory holds the accumulators, at most two blocks of the stream and the blocks of at
most ``_MAX_INFLIGHT`` dispatched but unfinished block computations.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _core
from ._errors import ConfigError, DataError, NonFiniteDataError
from ._fit import (OVERFLOW_HINT, FitResult, StepReport, default_optimizer, fit_engine,
                   init_keys)
from ._model import Memory
from ._source import Source
from ._step import StepOut, apply_gradient, solve_and_loss
from ._stream import ChunkStream
from ._validate import check_dtype, check_init, check_int, check_number, check_scale

__all__ = ["StreamingEngine", "fit_source", "evaluate_source"]

_MAX_INFLIGHT = 2  # block computations dispatched ahead of the oldest unfinished one
HIGHEST = jax.lax.Precision.HIGHEST

# Module-level jitted block functions (the scales are static), so engines with the same shapes
# share their compilations. The float64 accumulators are carried *through* each block's scan
# (``acc + s₀ + s₁ + …`` chunk after chunk, across blocks), which is exactly the summation
# order of the in-memory engine's single scan; so streaming changes no rounding at all.


@functools.partial(jax.jit, static_argnames=("key_scale", "value_scale"))
def _stats_block(acc, K, Qb, Xb, wb, *, key_scale, value_scale):
    return _core.scan_stats(K, Qb, Xb, wb, key_scale=key_scale, value_scale=value_scale,
                            init=acc)


@functools.partial(jax.jit, static_argnames=("key_scale", "value_scale"))
def _grad_block(acc, K, V, Qb, Xb, wb, *, key_scale, value_scale):
    return _core.scan_grad(K, V, Qb, Xb, wb, key_scale=key_scale, value_scale=value_scale,
                           init=acc)


@functools.partial(jax.jit, static_argnames=("key_scale", "value_scale"))
def _both_block(acc, K, V, Qb, Xb, wb, *, key_scale, value_scale):
    stats, grad = acc
    return (_core.scan_stats(K, Qb, Xb, wb, key_scale=key_scale,
                             value_scale=value_scale, init=stats),
            _core.scan_grad(K, V, Qb, Xb, wb, key_scale=key_scale,
                            value_scale=value_scale, init=grad))


_solve = jax.jit(solve_and_loss)


@functools.partial(jax.jit, static_argnames=("key_scale", "value_scale"))
def _sse_block(acc, K, V, Qb, Xb, wb, *, key_scale, value_scale):
    dt = K.dtype
    Vd = V.astype(dt)

    def scale(a, s):
        return a.astype(dt) if s is None else a.astype(dt) * jnp.asarray(s, dt)

    def body(total, chunk):
        q, x, w = chunk
        pred = jnp.matmul(_core.softmax_weights(K, scale(q, key_scale), HIGHEST), Vd,
                          precision=HIGHEST)
        err = jnp.sum(jnp.square((scale(x, value_scale) - pred).astype(_core.F64)), axis=1)
        return total + jnp.sum(err * w.astype(_core.F64)), None

    out, _ = jax.lax.scan(body, jnp.zeros((), _core.F64), (Qb, Xb, wb))
    return acc + out


def _check_source(source) -> Source:
    if not isinstance(source, Source):
        raise DataError(f"expected a scalemem Source (see scalemem._sources.open_source), got "
                        f"{type(source).__name__}")
    for field in ("rows", "key_dim", "value_dim"):
        check_int(f"source.{field}", getattr(source, field), 1)
    where = f"{getattr(source, 'name', 'source')}: "
    check_dtype("source.key_dtype", source.key_dtype, where)
    check_dtype("source.value_dtype", source.value_dtype, where)
    check_scale("source.key_scale", source.key_scale)
    check_scale("source.value_scale", source.value_scale)
    return source


def _compute_dtype(dtype, *dtypes):
    if dtype is not None:
        return jnp.dtype(dtype)
    kinds = [np.dtype(d) for d in dtypes]
    if all(k.kind == "f" for k in kinds) and any(k == np.float64 for k in kinds):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


class PassEngine:
    """``step``/``final`` of an engine made of passes over streamed data (the one-device stream
    and the sharded stream share them). A subclass provides ``_stats_pass(K) -> Stats``,
    ``_grad_pass(K, V) -> ∂K``, ``_both_pass(K, V_lagged) -> (Stats, ∂K)`` (one-pass mode),
    and the attributes ``key_dim``, ``dtype``, ``ridge``, ``one_pass``, ``_apply`` and
    ``_last``."""

    def _check_K(self, K) -> None:
        if K.shape[1:] != (self.key_dim,) or K.dtype != self.dtype:
            raise ConfigError("K", f"{K.shape} {K.dtype}", f"expected (P, {self.key_dim}) "
                              f"{self.dtype} keys for this engine")

    def step(self, K, opt_state):
        """One step at ``K``: ``(K_next, opt_state_next, StepOut at K)``."""
        with jax.enable_x64(True):
            self._check_K(K)
            lagged = self._last[1] if (self.one_pass and self._last is not None
                                       and self._last[0] is K) else None
            if lagged is not None:
                stats, grad = self._both_pass(K, lagged)
                V, loss, info, ok = _solve(stats, self.ridge)
            else:
                stats = self._stats_pass(K)
                V, loss, info, ok = _solve(stats, self.ridge)
                grad = self._grad_pass(K, V)
            K_next, opt_state, ok = self._apply(K, opt_state, grad, ok)
            if self.one_pass:
                self._last = (K_next, V)
            return K_next, opt_state, StepOut(V, loss, stats.count, info, ok)

    def final(self, K) -> StepOut:
        """Statistics pass and solve at ``K`` (no update)."""
        with jax.enable_x64(True):
            self._check_K(K)
            stats = self._stats_pass(K)
            V, loss, info, ok = _solve(stats, self.ridge)
            return StepOut(V, loss, stats.count, info, ok)


class StreamingEngine(PassEngine):
    """The engine (see :class:`scalemem._fit.Engine`) for a streamed source: each pass reads the
    source block by block through a :class:`~scalemem._stream.ChunkStream`.

    A chunk of at most ``chunk_rows`` rows (``_core.balanced_chunk``: the fewest chunks with
    the least padding, as in the in-memory engine) is one ``lax.scan`` step, and a block of
    ``chunks_per_block`` chunks is one device transfer and one jitted call. ``dtype`` is the
    compute dtype (the keys ``K`` must have it). See the module docstring for ``one_pass``.
    """

    def __init__(self, source: Source, *, optimizer: optax.GradientTransformation, ridge: float,
                 chunk_rows: int, chunks_per_block: int, dtype, one_pass: bool = False,
                 prefetch: int = 2):
        self.source = _check_source(source)
        self.rows = int(source.rows)
        self.key_dim, self.value_dim = int(source.key_dim), int(source.value_dim)
        # the in-memory engine's chunk length, so both scan the very same chunks
        c = _core.balanced_chunk(self.rows, check_int("chunk_rows", chunk_rows, 1))
        k = min(check_int("chunks_per_block", chunks_per_block, 1), -(-self.rows // c))
        self.chunk_rows, self.chunks_per_block = c, k
        self.dtype = jnp.dtype(dtype)
        self.ridge = check_number("ridge", ridge, 0.0)
        self.one_pass = bool(one_pass)
        self._stream = ChunkStream(source, chunk_rows=c, chunks_per_block=k,
                                   weight_dtype=self.dtype, prefetch=prefetch)
        self._scales = dict(key_scale=source.key_scale, value_scale=source.value_scale)
        self._apply = jax.jit(functools.partial(apply_gradient, optimizer))
        self._last: tuple[Any, Any] | None = None  # (K handed out, V solved at its predecessor)
        self.passes = 0  # reads of the whole source so far

    # -- passes ------------------------------------------------------------------------------

    def _pass(self, fn: Callable, acc, *args):
        """Fold ``acc = fn(acc, *args, Q, X, w)`` over every block; at most ``_MAX_INFLIGHT``
        block computations are dispatched ahead of the oldest unfinished one."""
        self._stream.rewind()
        inflight: deque = deque()
        for b in self._stream:
            acc = fn(acc, *args, b.Q, b.X, b.w, **self._scales)
            inflight.append(acc)
            if len(inflight) > _MAX_INFLIGHT:
                jax.block_until_ready(inflight.popleft())
        self.passes += 1
        return acc

    def _stats_pass(self, K):
        return self._pass(_stats_block, _core.zero_stats(K.shape[0], self.value_dim), K)

    def _grad_pass(self, K, V):
        return self._pass(_grad_block, jnp.zeros(K.shape, _core.F64), K, V)

    def _both_pass(self, K, V):
        return self._pass(_both_block, (_core.zero_stats(K.shape[0], self.value_dim),
                                        jnp.zeros(K.shape, _core.F64)), K, V)

    def locate_nonfinite(self) -> NonFiniteDataError:
        """Scan the source for the first NaN/Inf and say where it is (source, array, chunk and
        row: the row counts from the start of the source, the chunk is ``row // chunk_rows``)."""
        return locate_nonfinite(self.source, self.chunk_rows * self.chunks_per_block,
                                self.chunk_rows)


def locate_nonfinite(source: Source, read_rows: int = 16384, chunk_rows: int | None = None,
                     ranges=None, finite_hint: str | None = None) -> NonFiniteDataError:
    """The first non-finite entry of ``source`` (of its row ``ranges``, by default all rows;
    chunks count from the start of each range) as a :class:`NonFiniteDataError` (returned, not
    raised); when the data is finite, an error explaining that the logits overflowed (or
    ``finite_hint``)."""
    chunk_rows = chunk_rows or read_rows
    offset = int(getattr(source, "row_offset", 0) or 0)
    spans = [(r0, s, min(s + read_rows, r1))
             for r0, r1 in (ranges or [(0, int(source.rows))]) for s in range(r0, r1, read_rows)]
    for r0, s, e in spans:
        Q, X = source.read(s, e)
        for which, a in (("keys", Q), ("values", X)):
            a = np.asarray(a)
            if a.dtype.kind != "f":
                continue
            bad = ~np.isfinite(a).all(axis=1)
            if bad.any():
                row = s + int(np.argmax(bad))
                col = int(np.argmax(~np.isfinite(a[row - s])))
                array = getattr(source, f"{'key' if which == 'keys' else 'value'}_array", which)
                where = (f" (row {row + offset} of array {array!r} in the store)"
                         if offset or array != which else "")
                chunk = (row - r0) // chunk_rows
                return NonFiniteDataError(
                    f"{source.name}: {which} row {row}{where}, column {col} of the view, in "
                    f"chunk {chunk} holds {a[row - s, col]}; fix or drop the row",
                    source=source.name, array=array, row=row, chunk=chunk)
    return NonFiniteDataError(finite_hint or OVERFLOW_HINT.format(source=source.name),
                              source=source.name)


def fit_source(source: Source, prototypes: int, *, steps: int,
               optimizer: optax.GradientTransformation | None = None,
               learning_rate: float = 5e-4, ridge: float = 1e-6, chunk_rows: int = 4096,
               chunks_per_block: int = 4, seed: int = 0, init=None, dtype=None,
               callback: Callable[[StepReport], Any] | None = None,
               one_pass: bool = False, **loop) -> FitResult:
    """Fit a memory of ``prototypes`` prototypes to a streamed ``source`` (see
    :func:`scalemem._sources.open_source`); the out-of-core counterpart of :func:`scalemem.fit`
    with the same settings, plus ``chunks_per_block`` (chunks per device transfer) and
    ``one_pass`` (see :mod:`scalemem._streaming`). ``loop`` goes to
    :func:`scalemem._fit.fit_engine` (checkpoint, checkpoint_every, checkpoint_seconds,
    should_stop, and opt_state/start_step/history to resume). The source's ``key_scale``/``value_scale`` are
    applied on the device. The compute dtype is float64 when the source's data is floating point
    with a float64 array, else float32 (override with ``dtype``).
    """
    source = _check_source(source)
    N = int(source.rows)
    P = check_int("prototypes", prototypes, 1, N)
    steps = check_int("steps", steps, 0)
    ridge = check_number("ridge", ridge, 0.0)
    chunk_rows = check_int("chunk_rows", chunk_rows, 1)
    chunks_per_block = check_int("chunks_per_block", chunks_per_block, 1)
    seed = check_int("seed", seed)
    m = int(source.key_dim)
    if init is not None:
        check_init("init", init, (P, m))
    if optimizer is None:
        optimizer = default_optimizer(check_number("learning_rate", learning_rate, 0.0))
    with jax.enable_x64(True):
        dt = _compute_dtype(dtype, source.key_dtype, source.value_dtype)
        K0 = init_keys(P, m, seed, dt) if init is None else jnp.asarray(init, dt)
        engine = StreamingEngine(source, optimizer=optimizer, ridge=ridge, chunk_rows=chunk_rows,
                                 chunks_per_block=chunks_per_block, dtype=dt, one_pass=one_pass)
        return fit_engine(engine, K0, optimizer, steps=steps, callback=callback, **loop)


def evaluate_source(memory: Memory, source: Source, chunk_rows: int = 8192,
                    chunks_per_block: int = 1) -> dict:
    """Streaming evaluation of ``memory`` on ``source``: ``{"rmse", "sse", "rows"}`` where
    ``sse = Σ‖x − softmax(q Kᵀ) V‖²`` is accumulated in float64 and ``rmse = sqrt(sse / (rows ·
    value_dim))`` (per value entry, as :class:`~scalemem.FitResult` reports it). Predictions run
    in ``memory.K``'s dtype at HIGHEST matmul precision; the source's scales are applied."""
    source = _check_source(source)
    if (memory.key_dim, memory.value_dim) != (source.key_dim, source.value_dim):
        raise DataError(f"{source.name}: memory maps {memory.key_dim} key columns to "
                        f"{memory.value_dim} value columns, the source has {source.key_dim} and "
                        f"{source.value_dim}")
    c = min(check_int("chunk_rows", chunk_rows, 1), int(source.rows))
    k = min(check_int("chunks_per_block", chunks_per_block, 1), -(-int(source.rows) // c))
    with jax.enable_x64(True):
        K = jnp.asarray(memory.K)
        V = jnp.asarray(memory.V)
        stream = ChunkStream(source, chunk_rows=c, chunks_per_block=k, weight_dtype=K.dtype)
        acc = jnp.zeros((), _core.F64)
        inflight: deque = deque()
        for b in stream:
            acc = _sse_block(acc, K, V, b.Q, b.X, b.w, key_scale=source.key_scale,
                             value_scale=source.value_scale)
            inflight.append(acc)
            if len(inflight) > _MAX_INFLIGHT:
                jax.block_until_ready(inflight.popleft())
        sse = float(acc)
    rows = int(source.rows)
    return {"rmse": float(np.sqrt(sse / (rows * int(source.value_dim)))), "sse": sse,
            "rows": rows}
