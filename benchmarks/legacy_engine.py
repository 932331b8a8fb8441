"""The in-memory engine of scalemem 0.1 (b1ff527), kept verbatim for A/B step-time benchmarks
against the one engine (``benchmarks/step_time.py``): all rows on one device, up to 8 chunks
unrolled, one fused jitted step built per engine. Not part of the package."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
import optax

from scalemem import _core
from scalemem._core import StepOut, apply_gradient, solve_and_loss

def make_fused_step(optimizer: optax.GradientTransformation, ridge: float,
                    stats_fn: Callable, grad_fn: Callable):
    """A jitted ``step(K, opt_state, *data) -> (K, opt_state, StepOut)`` that runs both passes
    in one XLA program. ``stats_fn(K, *data) -> Stats``; ``grad_fn(K, V, *data) -> ∂K``."""

    def step(K, opt_state, *data):
        stats = stats_fn(K, *data)
        V, loss, info, ok = solve_and_loss(stats, ridge)
        grad = grad_fn(K, V, *data)
        K, opt_state, ok = apply_gradient(optimizer, K, opt_state, grad, ok)
        return K, opt_state, StepOut(V, loss, stats.count, info, ok)

    def final(K, *data):
        stats = stats_fn(K, *data)
        V, loss, info, ok = solve_and_loss(stats, ridge)
        return StepOut(V, loss, stats.count, info, ok)

    return jax.jit(step), jax.jit(final)


UNROLL_CHUNKS = 8  # in-memory passes unroll over at most this many chunks, else lax.scan


class InMemoryEngine:
    """All rows resident on one device, split into equal chunks (plus one shorter chunk for the
    remaining rows); both passes run inside a single jitted step.

    Up to :data:`UNROLL_CHUNKS` chunks are stored as separate arrays and each pass is unrolled
    over them; more chunks are stored as one block and each pass is a ``lax.scan``. A scan slices
    every chunk out of its block (a copy of the chunk, per pass): with few chunks the copies cost
    more than the extra compile time of the unrolled program (CPU, 60k rows in four chunks: a
    step took 639 ms scanned and 573 ms unrolled at P = 256, 244 and 144 ms at P = 64).

    Everything about the values that does not depend on ``K`` is prepared once: each chunk is
    stored centred on its column means (:func:`scalemem._core.centre_values`) with its moments,
    so a step touches the values only inside the two big products. No row is padded, so no row
    weights are multiplied in either."""

    def __init__(self, Q, X, *, optimizer, ridge: float, chunk_rows: int, dtype, key_scale=None, value_scale=None):
        self.rows = int(Q.shape[0])
        self.value_dim = int(X.shape[1])
        self._Q, self._X = Q, X
        c = min(_core.balanced_chunk(self.rows, chunk_rows), self.rows)
        self.chunk_rows = c
        nb, r = divmod(self.rows, c)
        Qh, Xh = np.asarray(Q), np.asarray(X)
        prepare = jax.jit(lambda x: _core.centre_values(x, value_scale=value_scale, dtype=dtype))
        kw = dict(key_scale=key_scale)
        if nb + (r > 0) <= UNROLL_CHUNKS:
            self._data = (tuple((jax.device_put(Qh[s:s + c]), *prepare(Xh[s:s + c]))
                                for s in range(0, self.rows, c)),)

            def stats_fn(K, chunks):
                parts = [_core.chunk_stats(K, q, y, moments=m, centred=True, **kw)
                         for q, y, m, _ in chunks]
                stats = parts[0]
                for p in parts[1:]:
                    stats = _core.merge(stats, p)
                return stats

            def grad_fn(K, V, chunks):
                Vd, VVt, nu = _core.grad_operands(V, K.dtype)
                g = [_core.chunk_grad(K, Vd, VVt, q, y, shift=nu, centre=mu, **kw)
                     for q, y, _, mu in chunks]
                return sum(g[1:], g[0])
        else:
            full = (jax.device_put(Qh[:nb * c].reshape(nb, c, -1)),
                    *jax.jit(jax.vmap(prepare))(Xh[:nb * c].reshape(nb, c, -1)))
            rest = (jax.device_put(Qh[nb * c:]), *prepare(Xh[nb * c:])) if r else None
            self._data = (full, rest)

            def stats_fn(K, full, rest):
                Qb, Yb, mom, _ = full
                stats = _core.scan_stats(K, Qb, Yb, None, moments=mom, centred=True, **kw)
                if rest is not None:
                    q, y, m, _ = rest
                    stats = _core.merge(stats, _core.chunk_stats(K, q, y, moments=m,
                                                                 centred=True, **kw))
                return stats

            def grad_fn(K, V, full, rest):
                Qb, Yb, _, mu = full
                g = _core.scan_grad(K, V, Qb, Yb, None, centres=mu, **kw)
                if rest is not None:
                    q, y, _, m = rest
                    g = _core.scan_grad(K, V, q[None], y[None], None, centres=m[None], init=g,
                                        **kw)
                return g

        self.passes = (stats_fn, grad_fn)  # (K, *data) -> Stats, (K, V, *data) -> ∂K
        self._step, self._final = make_fused_step(optimizer, ridge, stats_fn, grad_fn)

    def step(self, K, opt_state):
        return self._step(K, opt_state, *self._data)

    def final(self, K):
        return self._final(K, *self._data)
