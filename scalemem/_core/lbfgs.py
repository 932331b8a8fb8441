"""L-BFGS in small pure pieces (optax style: a state, ``init``, and a ``direction`` that folds
the newest curvature pair into the state and returns the quasi-Newton direction). The line
search that picks the step along the direction is the caller's: it needs loss values, which for
streamed data are passes over the rows driven from the host (docs/design.md, "L-BFGS").

Differences from ``optax.scale_by_lbfgs``: a pair whose curvature ``sᵀy`` is not positive is
skipped (a line search on values alone does not guarantee it; optax's zoom search does, at a
gradient pass per trial), the memory is float64 whatever the keys' dtype, and the first
direction (or the first after a reset) moves the keys by a given root-mean-square step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .stats import F64

__all__ = ["LbfgsState", "lbfgs_init", "lbfgs_direction", "lbfgs_reset", "CURVATURE_TOL"]

# A pair (s, y) enters the memory when sᵀy > CURVATURE_TOL·‖s‖‖y‖: a positive curvature that
# rounding cannot have produced (the float32 keys' differences carry relative errors ~1e-7).
CURVATURE_TOL = 1e-10


class LbfgsState(NamedTuple):
    count: jax.Array  # int32: directions computed so far
    S: jax.Array  # (M, P, m) float64: key differences s_i = K_{i+1} − K_i (ring buffer)
    Y: jax.Array  # (M, P, m) float64: gradient differences y_i
    rho: jax.Array  # (M,) float64: 1/(s_iᵀy_i), 0 for an empty or skipped slot
    K: jax.Array  # (P, m) float64: the keys of the last direction
    g: jax.Array  # (P, m) float64: the gradient there
    newest: jax.Array  # int32: slot of the newest pair, -1 when the memory is empty
    scale0: jax.Array  # float64: RMS key step of a direction without memory


def lbfgs_init(K, memory: int, scale0) -> LbfgsState:
    """An empty state for keys shaped like ``K`` with ``memory`` pairs."""
    z = jnp.zeros((memory,) + K.shape, F64)
    return LbfgsState(jnp.zeros((), jnp.int32), z, z, jnp.zeros((memory,), F64),
                      jnp.zeros(K.shape, F64), jnp.zeros(K.shape, F64),
                      jnp.asarray(-1, jnp.int32), jnp.asarray(scale0, F64))


def lbfgs_reset(state: LbfgsState) -> LbfgsState:
    """The state with its memory emptied (after a failed line search)."""
    return state._replace(rho=jnp.zeros_like(state.rho), newest=jnp.asarray(-1, jnp.int32),
                          count=jnp.zeros((), jnp.int32))


def lbfgs_direction(state: LbfgsState, K, g):
    """``(d, slope, state)``: the pair ``(K − state.K, g − state.g)`` added to the memory (when
    there was a previous direction and its curvature is positive), then the descent direction
    ``d = −H g`` (two-loop recursion, ``H₀ = γI`` with ``γ = sᵀy/yᵀy`` of the newest pair, or
    ``d = −scale0·g/rms(g)`` with an empty memory) and ``slope = gᵀd`` (negative). All float64."""
    M = state.rho.shape[0]
    K, g = K.astype(F64), g.astype(F64)
    s, y = K - state.K, g - state.g
    sy = jnp.vdot(s, y)
    ok = (state.count > 0) & (sy > CURVATURE_TOL * jnp.linalg.norm(s) * jnp.linalg.norm(y))
    slot = (state.newest + 1) % M
    S = jnp.where(ok, state.S.at[slot].set(s), state.S)
    Y = jnp.where(ok, state.Y.at[slot].set(y), state.Y)
    rho = jnp.where(ok, state.rho.at[slot].set(1.0 / jnp.where(ok, sy, 1.0)), state.rho)
    newest = jnp.where(ok, slot, state.newest)

    def back(i, carry):  # newest to oldest
        q, alpha = carry
        j = (newest - i) % M
        a = rho[j] * jnp.vdot(S[j], q)
        return q - a * Y[j], alpha.at[j].set(a)

    q, alpha = jax.lax.fori_loop(0, M, back, (g, jnp.zeros((M,), F64)))
    yn = Y[jnp.maximum(newest, 0)]
    gamma = jnp.where(newest >= 0, 1.0 / (rho[jnp.maximum(newest, 0)] * jnp.vdot(yn, yn)), 1.0)
    r = gamma * q

    def forward(i, r):  # oldest to newest
        j = (newest + 1 + i) % M
        b = rho[j] * jnp.vdot(Y[j], r)
        return r + S[j] * (alpha[j] - b)

    r = jax.lax.fori_loop(0, M, forward, r)
    rms = jnp.sqrt(jnp.mean(g * g))
    first = state.scale0 * g / jnp.where(rms > 0, rms, 1.0)
    d = -jnp.where(newest >= 0, r, first)
    new = state._replace(count=state.count + 1, S=S, Y=Y, rho=rho, K=K, g=g, newest=newest)
    return d, jnp.vdot(g, d), new
