"""One step at ``K_t``: statistics → exact ridge solve ``V_t`` → gradient at ``(K_t, V_t)`` →
optimiser update. A step whose statistics or gradient are not finite leaves ``K`` and the
optimiser state unchanged and reports it, so a NaN never reaches the parameters."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .solve import SolveInfo, solve_ridge_and_loss
from .stats import Stats

__all__ = ["StepOut", "solve_and_loss", "apply_gradient"]


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
    return (*solve_ridge_and_loss(stats, ridge), _all_finite(stats.G, stats.B, stats.xx))


def apply_gradient(optimizer: optax.GradientTransformation, K, opt_state, grad, ok):
    """Optimiser update of ``K`` guarded by ``ok`` (and the gradient being finite)."""
    grad = grad.astype(K.dtype)
    ok = ok & _all_finite(grad)
    updates, new_state = optimizer.update(grad, opt_state, K)
    new_K = optax.apply_updates(K, updates)
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    return jax.tree.map(keep, new_K, K), jax.tree.map(keep, new_state, opt_state), ok
