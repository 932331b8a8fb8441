"""The exact ridge solve for ``V``: float64 Cholesky, checked, with escalating jitter and an
eigendecomposition fallback."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from .stats import F64, Stats, check_x64

__all__ = ["SolveInfo", "ILL_CONDITIONED", "solve_ridge", "solve_ridge_and_loss"]


class SolveInfo(NamedTuple):
    """What the ridge solve had to do. ``jitter`` is added to the diagonal *beyond* the ridge."""

    jitter: jax.Array  # () float64, 0 when the plain Cholesky factorisation was accepted
    backward_error: jax.Array  # () float64, ‖(G+λI)V − B‖ / (‖G+λI‖‖V‖ + ‖B‖)
    attempts: jax.Array  # () int32, Cholesky factorisations tried
    fallback: jax.Array  # () bool, True when the eigendecomposition fallback was used
    condition: jax.Array  # () float64, estimate of cond₂(G + λI + jitter·I) (a lower bound)

    @property
    def needs_attention(self) -> bool:
        """True when the solve used jitter or the fallback, or the condition estimate is above
        ``ILL_CONDITIONED`` (V may then carry large rounding errors)."""
        return bool(self.jitter > 0 or self.fallback or self.condition > ILL_CONDITIONED)


# Above this condition number float64 rounding alone can cost V more than 7 of its ~16 digits:
# V is then less precise than float32 data. The estimate is a lower bound within ~2x, so
# condition 1e10 is flagged with a wide margin; typical fits sit at 1e4-1e8 (Fashion-MNIST
# fit10k, P=100, ridge 1e-6: 1e8 at the 0.01-scale initial keys, 4e5 forty steps later).
ILL_CONDITIONED = 1e9


def _backward_error(M, V, B):
    """``(‖MV − B‖ / (‖M‖‖V‖ + ‖B‖), ⟨V, MV − B⟩)``: the second gives the loss for free."""
    r = M @ V - B
    den = jnp.linalg.norm(M) * jnp.linalg.norm(V) + jnp.linalg.norm(B)
    return jnp.linalg.norm(r) / jnp.maximum(den, jnp.finfo(F64).tiny), jnp.vdot(V, r)


def _condition(M, L, iters: int = 10):
    """A lower bound on ``cond₂(M)`` for SPD ``M = L Lᵀ``, usually within a factor of 2:
    ``iters`` steps of power iteration on ``M`` (``λ_max``) and of inverse iteration with
    ``L⁻¹`` (``λ_min``) from a fixed start, O(iters·P²). Never below the classic
    ``(max Lᵢᵢ / min Lᵢᵢ)²``, a lower bound that can be far too low (2e7 for cond 1e10)."""
    P = M.shape[0]
    tiny = jnp.finfo(F64).tiny
    x0 = jnp.cos(jnp.arange(1, P + 1, dtype=F64) * 2.399963229728653)  # golden angle: no symmetry
    x0 = x0 / jnp.linalg.norm(x0)

    # M⁻¹ = L⁻ᵀ L⁻¹ from one triangular solve, then plain matrix-vector products (a LAPACK call
    # per iteration would cost more in call overhead than the arithmetic)
    Linv = jax.scipy.linalg.solve_triangular(L, jnp.eye(P, dtype=L.dtype), lower=True)

    def apply(x):  # column 0: M x, column 1: M⁻¹ x (both iterations in one loop)
        return jnp.stack([M @ x[:, 0], Linv.T @ (Linv @ x[:, 1])], axis=1)

    def body(x, _):
        y = apply(x)
        return y / jnp.maximum(jnp.linalg.norm(y, axis=0), tiny), None

    x, _ = jax.lax.scan(body, jnp.stack([x0, x0], axis=1), None, length=iters)
    lmax, inv_lmin = jnp.linalg.norm(apply(x), axis=0)
    d = jnp.abs(jnp.diagonal(L))
    diag = jnp.square(jnp.max(d) / jnp.maximum(jnp.min(d), tiny))
    est = jnp.maximum(lmax * inv_lmin, diag)
    return jnp.where(jnp.isfinite(est), est, jnp.inf)


def solve_ridge(stats: Stats, ridge, *, max_attempts: int = 12, tol: float = 1e-10):
    """``(V, SolveInfo)``: :func:`solve_ridge_and_loss` without the loss."""
    V, _, info = solve_ridge_and_loss(stats, ridge, max_attempts=max_attempts, tol=tol)
    return V, info


def solve_ridge_and_loss(stats: Stats, ridge, *, max_attempts: int = 12, tol: float = 1e-10):
    """``V = (G + λI)⁻¹ B`` in float64 by Cholesky, checked and never NaN for finite input.

    1. Factorise ``G + λI``; accept a finite result whose normwise backward error
       ``‖(G+λI)V − B‖ / (‖G+λI‖‖V‖ + ‖B‖)`` is at most ``tol`` (a stable Cholesky solve gives
       about ``P·u₆₄ ≈ 1e-13``, so ``tol = 1e-10`` only rejects a broken factorisation).
    2. Else retry with jitter ``j = s·P·u₆₄·10^(k-1)`` on the diagonal, ``s = trace(G)/P``,
       ``k = 1 … max_attempts-1`` (up to about 1e-2·s relative at P ≈ 1000).
    3. Else use the eigendecomposition of ``G + λI`` without the eigenvalues below
       ``P·u₆₄·max|eig|`` (minimum-norm pseudo-inverse solution; finite for any finite ``G``).

    Returns ``(V, loss, SolveInfo)``; callers warn on ``SolveInfo.needs_attention``. The loss is
    :func:`loss_from_stats` without its P×P×n product: with the residual ``r = (G+λI)V − B`` of the
    check, ``⟨V, GV⟩ = ⟨V, B⟩ − λ‖V‖² + ⟨V, r⟩``, so ``loss = ½(Σ‖x‖² − ⟨V, B⟩ − λ‖V‖² + ⟨V, r⟩)``.
    """
    check_x64()
    G, B = stats.G.astype(F64), stats.B.astype(F64)
    G = 0.5 * (G + G.T)  # float32 chunk products are symmetric only to rounding
    P = G.shape[0]
    eye = jnp.eye(P, dtype=F64)
    M = G + jnp.asarray(ridge, F64) * eye
    eps = jnp.finfo(F64).eps
    scale = jnp.maximum(jnp.trace(G) / P, jnp.finfo(F64).tiny)

    def attempt(k):
        j = jnp.where(k == 0, 0.0, scale * P * eps * 10.0 ** (k - 1).astype(F64))
        L = jnp.linalg.cholesky(M + j * eye)
        V = cho_solve((L, True), B)
        be, vr = _backward_error(M, V, B)
        ok = jnp.all(jnp.isfinite(V)) & jnp.isfinite(be) & (be <= tol)
        return V, j, be, vr, ok, L

    def again(state):  # state: (k, V, j, be, vr, ok, L)
        return (~state[5]) & (state[0] < max_attempts)

    def body(state):
        return (state[0] + 1, *attempt(state[0]))

    # the first attempt runs inside the loop too, so its program is compiled once
    start = (jnp.int32(0), jnp.zeros_like(B), jnp.zeros((), F64), jnp.asarray(jnp.inf, F64),
             jnp.zeros((), F64), jnp.asarray(False), jnp.zeros_like(M))
    k, V, j, be, vr, ok, L = jax.lax.while_loop(again, body, start)

    def eig_fallback(_):
        w, U = jnp.linalg.eigh(M)
        cut = P * eps * jnp.max(jnp.abs(w))
        inv = jnp.where(w > cut, 1.0 / jnp.where(w > cut, w, 1.0), 0.0)
        Vf = U @ (inv[:, None] * (U.T @ B))
        return (Vf, *_backward_error(M, Vf, B), jnp.max(jnp.abs(w)) / jnp.maximum(
            jnp.min(jnp.abs(w)), jnp.finfo(F64).tiny))

    V, be, vr, cnd = jax.lax.cond(ok, lambda _: (V, be, vr, _condition(M + j * eye, L)),
                                  eig_fallback, None)
    lam = jnp.asarray(ridge, F64)
    loss = 0.5 * (stats.xx - jnp.vdot(V, B) - lam * jnp.vdot(V, V) + vr)
    return V, jnp.maximum(loss, 0.0), SolveInfo(
        jitter=jnp.where(ok, j, 0.0), backward_error=be, attempts=k, fallback=~ok, condition=cnd)
