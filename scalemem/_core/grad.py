"""The variable-projection gradient ``∂/∂K ½‖X − softmax(Q Kᵀ) V‖²`` at a fixed ``V``, chunk by
chunk (notation of :mod:`scalemem._core.stats`). At the ridge optimum ``∂loss/∂V = 0``, so this is
the gradient of the profiled objective: ``dA = A(VVᵀ) − XVᵀ``, the softmax backward
``dS = A ⊙ (dA − rowsum(A ⊙ dA))`` and ``∂/∂K = dSᵀ Q``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .stats import F64, HIGHEST, check_x64, scaled, softmax_weights, tdot

__all__ = ["chunk_grad", "grad_operands", "scan_grad"]


def chunk_grad(K, V, VVt, Q, X, w=None, *, key_scale=None, value_scale=None,
               precision=HIGHEST, shift=None, centre=None) -> jax.Array:
    """∂/∂K of ½‖X − softmax(Q Kᵀ) V‖² (rows weighted by ``w``) at fixed ``V``, in float64.
    ``VVt`` is ``V Vᵀ`` (P×P, once per step). ``precision``: HIGHEST by default (full float32
    on GPUs); ``"high"``/``"default"`` opt into TF32/bf16 passes there; CPUs ignore it.

    ``shift`` ``ν`` (n,): ``V`` was passed as ``V₀ − 1νᵀ`` and the values are shifted by ``ν``
    too, which gives the gradient at ``V₀`` (softmax rows sum to 1, so
    ``A V₀ − X = A(V₀ − 1νᵀ) − (X − 1νᵀ)``; the softmax backward drops the row-constant rest):
    the products then round relative to the spread of the values, not their offset.

    ``centre`` ``μ`` (n,): ``X`` is ``Y = X − 1μᵀ`` from :func:`centre_values`, and
    ``(X − 1νᵀ)Vᵀ = YVᵀ + 1(V(μ − ν))ᵀ`` with the rank-one term in float64 (no elementwise
    pass over the values).

    ``VVt=None``: ``∂/∂A = (AV − X)Vᵀ`` instead, 2·P·n multiply-adds a row against P² + P·n,
    cheaper when P > n (:func:`grad_operands` picks by shape)."""
    dt = K.dtype
    Q = scaled(Q, dt, key_scale)
    V = V.astype(dt)
    corr = None  # the rank-one term 1(V(μ − ν))ᵀ of centred values
    if centre is None:
        X = scaled(X, dt, value_scale)
        if shift is not None:
            X = X - jnp.asarray(shift).astype(dt)
    else:
        off = jnp.asarray(centre).astype(F64)
        if shift is not None:
            off = off - jnp.asarray(shift).astype(F64)
        corr = (V.astype(F64) @ off).astype(dt)
    A = softmax_weights(K, Q, precision)
    if VVt is None:  # (AV − X)Vᵀ
        R = jnp.matmul(jnp.matmul(A, V, precision=precision) - X, V.T, precision=precision)
    else:  # A(VVᵀ) − XVᵀ
        R = jnp.matmul(A, VVt.astype(dt), precision=precision) - jnp.matmul(
            X, V.T, precision=precision)
    if corr is not None:
        R = R - corr
    if w is not None:
        R = R * w[:, None].astype(dt)
    dS = A * (R - jnp.sum(A * R, axis=1, keepdims=True))
    return tdot(dS, Q, precision).astype(F64)


def grad_operands(V, dtype, precision=HIGHEST):
    """``(V − 1νᵀ, (V − 1νᵀ)(V − 1νᵀ)ᵀ, ν)`` in ``dtype``, ``ν`` the mean row of ``V`` (the P×P
    product only when P ≤ n, else None): :func:`chunk_grad`'s ``V``, ``VVt`` and ``shift`` for
    the gradient at ``V``, once per step, the same for every engine."""
    V64 = V.astype(F64)
    nu = jnp.mean(V64, axis=0).astype(dtype)  # rounded first, so that Vd + ν is V
    Vd = (V64 - nu.astype(F64)).astype(dtype)
    P, n = V.shape
    # A(VVᵀ) − XVᵀ costs P² + P·n a row, (AV − X)Vᵀ 2·P·n: the first only while P ≤ n
    VVt = jnp.matmul(Vd, Vd.T, precision=precision) if P <= n else None
    return Vd, VVt, nu


def scan_grad(K, V, Qb, Xb, wb, *, key_scale=None, value_scale=None, precision=HIGHEST,
              init=None, centres=None) -> jax.Array:
    """:func:`chunk_grad` summed over a block of chunks with ``lax.scan`` (float64 carry), ``V``
    centred on its mean row; ``init`` continues earlier blocks' sum. ``centres`` (b×n): ``Xb``
    holds :func:`centre_values` of each chunk with these means (``wb`` may be None)."""
    check_x64()
    Vd, VVt, nu = grad_operands(V, K.dtype, precision)

    def body(acc, chunk):
        q, x, w, mu = chunk
        return acc + chunk_grad(K, Vd, VVt, q, x, w, key_scale=key_scale, value_scale=value_scale,
                                precision=precision, shift=nu, centre=mu), None

    init = jnp.zeros(K.shape, F64) if init is None else init
    return jax.lax.scan(body, init, (Qb, Xb, wb, centres))[0]
