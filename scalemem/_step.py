"""One optimisation step, assembled from a statistics pass and a gradient pass.

A step at ``K_t``: statistics pass → exact ridge solve ``V_t`` → gradient pass at ``(K_t, V_t)`` →
optimiser update. Data layouts (in memory, sharded over devices, streamed from a store) differ
only in how they run the two passes; they share this assembly and its safety rule: a step whose
statistics or gradient are not finite leaves ``K`` and the optimiser state unchanged and reports
it, so a NaN never reaches the parameters.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._core import SolveInfo, Stats, solve_ridge_and_loss

__all__ = ["StepOut", "solve_and_loss", "apply_gradient", "make_fused_step"]


class StepOut(NamedTuple):
    V: jax.Array  # float64 solution at K_t
    loss: jax.Array  # float64 ½‖X − A V‖² at (K_t, V_t)
    count: jax.Array  # rows seen
    info: SolveInfo
    finite: jax.Array  # bool: statistics and gradient finite (False → K was not updated)


def _all_finite(*xs) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


def solve_and_loss(stats: Stats, ridge):
    """``(V, loss, info, stats_finite)`` from statistics; pure, jit-able."""
    V, loss, info = solve_ridge_and_loss(stats, ridge)
    return V, loss, info, _all_finite(stats.G, stats.B, stats.xx)


def apply_gradient(optimizer: optax.GradientTransformation, K, opt_state, grad, ok):
    """Optimiser update of ``K`` guarded by ``ok`` (and the gradient being finite)."""
    grad = grad.astype(K.dtype)
    ok = ok & _all_finite(grad)
    updates, new_state = optimizer.update(grad, opt_state, K)
    new_K = optax.apply_updates(K, updates)
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    return jax.tree.map(keep, new_K, K), jax.tree.map(keep, new_state, opt_state), ok


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
