"""The compiled programs of a fit: every statistics and gradient fold is written once here, as
module-level ``jax.jit`` functions of a hashable :class:`Spec` under ``shard_map`` over its mesh
(docs/design.md, "Engines, programs and the mesh")."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import _core
from .._core import F64, StepOut, apply_gradient, solve_and_loss
from .._core.lbfgs import LbfgsState, lbfgs_direction, lbfgs_init, lbfgs_reset
from .mesh import smap

__all__ = ["UNROLL_CHUNKS", "OptimSpec", "Spec", "Part", "fold_stats", "fold_grad",
           "resident_step", "resident_final", "resident_grad", "stream_zeros", "stream_block",
           "stream_reduce",
           "solve", "apply_update", "init_state", "LrFactor", "lbfgs_step_direction",
           "lbfgs_trial", "lbfgs_restart", "objective"]

# Resident passes unroll at most this many chunks per device (else one scanned stack plus the
# rest): a scan copies every chunk out of its stack, per pass (CPU, 60k rows in four chunks at
# P = 256: 639 ms a step scanned, 573 ms unrolled; 244 and 144 ms at P = 64).
UNROLL_CHUNKS = 8


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """A named optimiser with its schedule (hashable, so a compiled step is reused)."""

    name: str
    learning_rate: float
    schedule: str
    warmup_steps: int
    steps: int
    lbfgs_memory: int = 10

    def build(self) -> optax.GradientTransformation:
        if self.name == "lbfgs":  # its steps are the engine's line search (.lbfgs)
            def update(*_):
                raise TypeError("L-BFGS keys move by the engine's line search, not by update()")
            return optax.GradientTransformation(
                lambda K: lbfgs_init(K, self.lbfgs_memory, self.learning_rate), update)
        lr, w, s = self.learning_rate, self.warmup_steps, max(self.steps, 1)
        if self.schedule == "cosine":
            rate = optax.warmup_cosine_decay_schedule(0.0, lr, w, max(s, w + 1), 0.0) if w \
                else optax.cosine_decay_schedule(lr, s)
        else:
            rate = optax.warmup_constant_schedule(0.0, lr, w) if w else lr
        return optax.chain(optax.adam(rate), optax.GradientTransformation(
            lambda _: LrFactor(jnp.ones((), jnp.float32)),
            lambda u, state, params=None: (jax.tree.map(lambda x: x * state.factor, u), state)))


class LrFactor(NamedTuple):
    """The last link of a named optimiser: a factor of its steps, held in the optimiser state
    (so a compiled step serves any factor and checkpoints keep it): 1/σ with ``relative_lr``."""

    factor: Any


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything static about a fit's programs."""

    mesh: Mesh
    optimizer: Any  # OptimSpec, or a user's optax.GradientTransformation (hashed by identity)
    key_scale: float | None
    value_scale: float | None
    stats_precision: Any
    grad_precision: Any

    @property
    def axis(self) -> str:
        return self.mesh.axis_names[0]

    def transformation(self) -> optax.GradientTransformation:
        o = self.optimizer
        return o.build() if isinstance(o, OptimSpec) else o


class Part(NamedTuple):
    """One device's rows: ``Q``/``X`` of shape (c, ·) (a chunk) or (b, c, ·) (a stack). With
    ``moments`` (``(Σx, Σ‖x‖²)`` per chunk) ``X`` holds the centred values and ``mu`` their
    means; ``w`` weighs the rows (None: no padding)."""

    Q: Any
    X: Any
    w: Any = None
    moments: Any = None
    mu: Any = None


def _local(part: Part) -> Part:
    """Inside shard_map a chunk's per-chunk leaves (moments, mean) keep a leading axis of 1."""
    if part.moments is None or part.Q.ndim == 3:
        return part
    return part._replace(moments=jax.tree.map(lambda a: a[0], part.moments), mu=part.mu[0])


def fold_stats(K, parts, acc: _core.Stats, spec: Spec) -> _core.Stats:
    """``acc`` plus the statistics of every part (float64 sums, chunk after chunk)."""
    kw = dict(key_scale=spec.key_scale, value_scale=spec.value_scale,
              precision=spec.stats_precision)
    for p in map(_local, parts):
        centred = p.moments is not None
        if p.Q.ndim == 3:
            acc = _core.scan_stats(K, p.Q, p.X, p.w, moments=p.moments, init=acc,
                                   centred=centred, **kw)
        else:
            acc = _core.merge(acc, _core.chunk_stats(K, p.Q, p.X, p.w, moments=p.moments,
                                                     centred=centred, **kw))
    return acc


def fold_grad(K, V, parts, acc, spec: Spec):
    """``acc`` plus ``∂K`` of every part at ``(K, V)`` (float64 sums)."""
    kw = dict(key_scale=spec.key_scale, value_scale=spec.value_scale,
              precision=spec.grad_precision)
    Vd, VVt, nu = _core.grad_operands(V, K.dtype, spec.grad_precision)
    for p in map(_local, parts):
        if p.Q.ndim == 3:
            acc = _core.scan_grad(K, V, p.Q, p.X, p.w, init=acc, centres=p.mu, **kw)
        else:
            acc = acc + _core.chunk_grad(K, Vd, VVt, p.Q, p.X, p.w, shift=nu, centre=p.mu, **kw)
    return acc


def _replicated(spec: Spec, tree):
    return jax.lax.with_sharding_constraint(tree, NamedSharding(spec.mesh, P()))


def _solved(stats: _core.Stats, ridge) -> StepOut:
    """The solve at ``K`` from its statistics (``finite``: the statistics are)."""
    V, loss, info, ok = solve_and_loss(stats, ridge)
    return StepOut(V, loss, stats.count, info, ok)


solve = jax.jit(_solved)


def _resident_solved(K, ridge, parts, spec) -> StepOut:
    n = parts[0].X.shape[-1]
    stats = jax.lax.psum(fold_stats(K, parts, _core.zero_stats(K.shape[0], n), spec), spec.axis)
    return _solved(stats, ridge)


@functools.partial(jax.jit, static_argnames=("spec",))
def resident_step(K, opt_state, ridge, parts, *, spec: Spec):
    """``(K_next, opt_state_next, StepOut at K)`` for resident ``parts``: one program."""
    opt = spec.transformation()

    def local(K, opt_state, ridge, parts):
        out = _resident_solved(K, ridge, parts, spec)
        grad = jax.lax.psum(fold_grad(K, out.V, parts, jnp.zeros(K.shape, F64), spec), spec.axis)
        K, opt_state, ok = apply_gradient(opt, K, opt_state, grad, out.finite)
        return K, opt_state, out._replace(finite=ok)

    return smap(spec.mesh, local, (P(), P(), P(), P(spec.axis)), P())(K, opt_state, ridge,
                                                                        parts)


@functools.partial(jax.jit, static_argnames=("spec",))
def resident_final(K, ridge, parts, *, spec: Spec) -> StepOut:
    """Statistics and solve at ``K`` (no update)."""
    local = functools.partial(_resident_solved, spec=spec)
    return smap(spec.mesh, local, (P(), P(), P(spec.axis)), P())(K, ridge, parts)


@functools.partial(jax.jit, static_argnames=("spec",))
def resident_grad(K, V, parts, *, spec: Spec):
    """The variable-projection gradient ``∂K`` at ``(K, V)`` (float64; the gradient pass)."""
    def local(K, V, parts):
        return jax.lax.psum(fold_grad(K, V, parts, jnp.zeros(K.shape, F64), spec), spec.axis)

    return smap(spec.mesh, local, (P(), P(), P(spec.axis)), P())(K, V, parts)


@functools.partial(jax.jit, static_argnames=("spec", "n", "what"))
def stream_zeros(K, *, spec: Spec, n: int, what: str):
    """Per-device zero accumulators of a streamed pass, ``(D, …)`` sharded over the mesh."""
    D = spec.mesh.devices.size
    stats, grad = _core.zero_stats(K.shape[0], n), jnp.zeros(K.shape, F64)
    acc = {"stats": stats, "grad": grad, "both": (stats, grad)}[what]
    acc = jax.tree.map(lambda z: jnp.zeros((D,) + z.shape, z.dtype), acc)
    return jax.lax.with_sharding_constraint(acc, NamedSharding(spec.mesh, P(spec.axis)))


@functools.partial(jax.jit, static_argnames=("spec", "what"))
def stream_block(acc, K, V, block, *, spec: Spec, what: str):
    """``acc`` plus one streamed block ``(Q, X, w)`` (each device its own rows): statistics,
    gradient at ``V``, or both (one-pass mode)."""

    def local(acc, K, V, block):
        a = jax.tree.map(lambda x: x[0], acc)
        part = [Part(*block)]
        if what == "stats":
            a = fold_stats(K, part, a, spec)
        elif what == "grad":
            a = fold_grad(K, V, part, a, spec)
        else:
            a = (fold_stats(K, part, a[0], spec), fold_grad(K, V, part, a[1], spec))
        return jax.tree.map(lambda x: x[None], a)

    ax = spec.axis
    return smap(spec.mesh, local, (P(ax), P(), P(), P(ax)), P(ax))(acc, K, V, block)


@functools.partial(jax.jit, static_argnames=("spec",))
def stream_reduce(acc, *, spec: Spec):
    """The sum over devices of per-device accumulators, replicated."""
    return smap(spec.mesh, lambda a: jax.lax.psum(jax.tree.map(lambda x: x[0], a), spec.axis),
                P(spec.axis), P())(acc)


@functools.partial(jax.jit, static_argnames=("spec",))
def apply_update(K, opt_state, grad, ok, *, spec: Spec):
    return _replicated(spec, apply_gradient(spec.transformation(), K, opt_state, grad, ok))


@functools.partial(jax.jit, static_argnames=("spec",))
def init_state(K, lr_factor=1.0, *, spec: Spec):
    """The optimiser state of ``K``, replicated over the mesh; a named optimiser's steps are
    multiplied by ``lr_factor``."""
    state = spec.transformation().init(K)
    if isinstance(state, LbfgsState):
        state = state._replace(scale0=state.scale0 * lr_factor)
    elif isinstance(spec.optimizer, OptimSpec):
        state = (state[0], LrFactor(jnp.asarray(lr_factor, jnp.float32)))
    return _replicated(spec, state)


@functools.partial(jax.jit, static_argnames=("spec",))
def lbfgs_step_direction(state: LbfgsState, K, grad, *, spec: Spec):
    """``(d, slope, state)`` of :func:`~scalemem._core.lbfgs.lbfgs_direction`, replicated."""
    return _replicated(spec, lbfgs_direction(state, K, grad))


@functools.partial(jax.jit, static_argnames=("spec",))
def lbfgs_trial(K, d, eta, *, spec: Spec):
    """The trial keys ``K + η d`` in ``K``'s dtype, replicated."""
    return _replicated(spec, (K.astype(F64) + eta * d).astype(K.dtype))


@functools.partial(jax.jit, static_argnames=("spec",))
def lbfgs_restart(state: LbfgsState, *, spec: Spec) -> LbfgsState:
    return _replicated(spec, lbfgs_reset(state))


@jax.jit
def objective(out: StepOut, ridge):
    """The profiled objective ½‖X − AV‖² + ½λ‖V‖² of a solve (float64)."""
    return out.loss + 0.5 * ridge * jnp.sum(jnp.square(out.V.astype(F64)))
