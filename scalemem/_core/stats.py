"""Sufficient statistics of row chunks. Notation (one chunk of ``c`` rows): keys ``Q`` (c×m),
values ``X`` (c×n), row weights ``w`` (c,), 1 for real rows and 0 for padding, prototypes ``K``
(P×m) and ``V`` (P×n); ``A = softmax(Q Kᵀ)`` row-wise (c×P). The statistics are
``G = Aᵀ diag(w) A``, ``B = Aᵀ diag(w) X``, ``xx = Σ w‖x‖²`` and ``count = Σ w``.

Chunk products run in the data's dtype and are *accumulated* in float64, so the summation error
does not grow with the number of rows: a float32 chunk product of ``c`` terms errs by at most
``γ_c = c·u/(1-c·u)`` (``u = 2⁻²⁴``) relative to ``|A|ᵀ|X|`` entrywise (Higham, Accuracy and
Stability, §3.1; for ``G``, whose terms are non-negative, relative to ``G`` itself), and each
float64 merge adds only ``u₆₄``-sized errors.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["F64", "HIGHEST", "Stats", "check_x64", "softmax_weights", "zero_stats", "merge",
           "scaled", "tdot", "value_moments", "centre_values", "chunk_stats", "scan_moments",
           "scan_stats", "loss_from_stats"]

HIGHEST = jax.lax.Precision.HIGHEST
F64 = jnp.float64


class Stats(NamedTuple):
    """Sufficient statistics of a set of rows, all float64. Add two with :func:`merge`."""

    G: jax.Array  # (P, P)  Aᵀ diag(w) A
    B: jax.Array  # (P, n)  Aᵀ diag(w) X
    xx: jax.Array  # ()     Σ w ‖x‖²
    count: jax.Array  # ()  Σ w  (number of real rows)


def check_x64() -> None:
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "scalemem's statistics are accumulated in float64, which needs JAX's x64 mode: "
            "call this inside `with jax.enable_x64(True):` (scalemem.fit does this for you).")


def softmax_weights(K: jax.Array, Q: jax.Array, precision=None) -> jax.Array:
    """``A = softmax(Q Kᵀ)`` row-wise, numerically stable for any logit scale."""
    return jax.nn.softmax(jnp.matmul(Q, K.T, precision=precision), axis=-1)


def zero_stats(P: int, n: int) -> Stats:
    check_x64()
    return Stats(*(jnp.zeros(shape, F64) for shape in ((P, P), (P, n), (), ())))


def merge(a: Stats, b: Stats) -> Stats:
    """Statistics of the union of two disjoint row sets (associative and commutative)."""
    return Stats(*(x + y for x, y in zip(a, b)))


def scaled(X: jax.Array, dtype, scale) -> jax.Array:
    X = X.astype(dtype)
    return X if scale is None else X * jnp.asarray(scale, dtype)


def tdot(a, b, precision):
    """``aᵀ b`` as one dot_general contracting the row axis (no transpose materialised)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision)


def value_moments(X, w=None, *, value_scale=None, dtype=jnp.float32):
    """``(Σ w x, Σ w ‖x‖²)`` of one chunk in float64: the part of the statistics independent of
    ``K`` (see :func:`centre_values`)."""
    X = scaled(X, dtype, value_scale)
    Xw = X if w is None else X * w.astype(dtype)[:, None]
    return jnp.sum(Xw, axis=0, dtype=F64), jnp.sum(Xw.astype(F64) * X.astype(F64))


def _chunk_mean(xsum, W, dtype):
    """Column means ``Σ w x / Σ w`` in ``dtype`` (0 for an empty chunk): the centring shift."""
    return jnp.where(W > 0, xsum / jnp.where(W > 0, W, 1.0), 0.0).astype(dtype)


def centre_values(X, w=None, *, value_scale=None, dtype=jnp.float32):
    """``(Y, moments, μ)`` of one chunk: ``Y = X − 1μᵀ`` in ``dtype``, ``μ`` its ``w``-weighted
    column means, ``moments`` = :func:`value_moments`. Independent of ``K``: an engine that
    revisits its chunks prepares them once for ``chunk_stats(..., moments=, centred=True)`` and
    ``chunk_grad(..., centre=μ)``, which then touch the values only inside the two big products.
    ``Y`` equals what those functions compute from ``X`` themselves."""
    moments = value_moments(X, w, value_scale=value_scale, dtype=dtype)
    W = jnp.asarray(X.shape[0], F64) if w is None else jnp.sum(w.astype(dtype), dtype=F64)
    mu = _chunk_mean(moments[0], W, dtype)
    return scaled(X, dtype, value_scale) - mu, moments, mu


def chunk_stats(K, Q, X, w=None, *, key_scale=None, value_scale=None, precision=HIGHEST,
                moments=None, centred: bool = False) -> Stats:
    """Statistics of one chunk. ``Q`` and ``X`` may be integer arrays, converted (and scaled by
    ``key_scale``/``value_scale``) in ``K``'s dtype; products run in ``K.dtype`` at ``precision``
    (HIGHEST by default, so GPUs do not silently drop to TF32), sums are float64.

    Shifted products: with ``c = 1/P`` and ``D = A − c``, exactly
    ``AᵀWA = W c² 11ᵀ + c(1sᵀ + s1ᵀ) + DᵀWD`` and ``AᵀWX = c 1(Σ w x)ᵀ + DᵀWX``, where ``W = Σ w``
    and ``s = colsum(WA) − W c`` are float64 reductions. Only the ``D`` products run in the
    data's dtype, so they round relative to ``|D|``, not ``|A|``: early in a fit (``K`` small)
    the weights are nearly uniform and the informative ``DᵀD`` is orders of magnitude below
    ``W c² 11ᵀ``, which a plain float32 ``AᵀA`` would drown in rounding (the seed prototype's
    instability); once the weights are peaked ``|D| ≈ |A|``, as in a plain product.

    Offset values: with ``μ`` the chunk's column means (in the compute dtype) and
    ``Y = X − 1μᵀ``, ``DᵀWX = DᵀWY + s μᵀ`` exactly, so the product rounds relative to
    ``|X − μ|``. The identities of exact softmax weights (each row of ``D`` sums to
    ``e = 1 − P c``, 0 but for the rounding of ``1/P``) are imposed on the float64 result:
    ``Σ_p s_p = W e``, ``(DᵀWD) 1 = e s`` and ``1ᵀ(DᵀWY) = e Σ w (x − μ)``. They remove
    rounding only, and only along ``1``, the direction a common offset of the values
    (``V ≈ 1μᵀ``) multiplies in the loss and the solve: float32 values of mean 1e3 and spread 1
    keep the loss to ~1e-9 relative, against 17% off without them (``tests/test_numerics.py``).

    ``centred=True``: ``X`` is already ``Y`` from :func:`centre_values` (same ``w``), and its
    ``moments`` must be given.
    """
    check_x64()
    if centred and moments is None:
        raise ValueError("chunk_stats(centred=True) takes the values from centre_values: pass "
                         "their moments too")
    dt, P = K.dtype, K.shape[0]
    Q = scaled(Q, dt, key_scale)
    X = X if centred else scaled(X, dt, value_scale)
    A = softmax_weights(K, Q, precision)
    c = jnp.asarray(1.0 / P, dt)
    c64 = c.astype(F64)
    D = A - c
    if w is None:
        W = jnp.asarray(Q.shape[0], F64)
        Dw, Aw = D, A
    else:
        w = w.astype(dt)
        W = jnp.sum(w, dtype=F64)
        Dw, Aw = D * w[:, None], A * w[:, None]
    # exact weights have rows summing to 1, so each row of D sums to e = 1 − P c (not quite 0:
    # c is 1/P rounded to the compute dtype), Σ_p s_p = W e and (DᵀWD) 1 = e s
    e = 1.0 - P * c64
    s = jnp.sum(Aw, axis=0, dtype=F64) - W * c64
    s = s - jnp.mean(s) + W * e / P
    xsum, xx = value_moments(X, w, dtype=dt) if moments is None else moments
    mu = _chunk_mean(xsum, W, dt)
    ones = jnp.ones((P,), F64)
    G = (W * c64 * c64) * jnp.outer(ones, ones) + c64 * (jnp.outer(ones, s) + jnp.outer(s, ones))
    G = G + _with_row_sums(tdot(Dw, D, precision).astype(F64), e * s)
    mu64 = mu.astype(F64)
    DY = tdot(Dw, X if centred else X - mu, precision).astype(F64)
    DY = DY - jnp.mean(DY, axis=0) + (e / P) * (xsum - W * mu64)  # 1ᵀDᵀWY = e Σ w (x − μ)
    B = c64 * jnp.outer(ones, xsum) + jnp.outer(s, mu64) + DY
    return Stats(G, B, xx, W)


def _with_row_sums(M, r):
    """The symmetric ``M`` with its row (and column) sums replaced by ``r``: ``J M J`` plus the
    symmetric rank-2 term with row sums ``r`` (``J = I − 11ᵀ/P``); the part of ``M`` orthogonal
    to ``1`` is unchanged."""
    P = M.shape[0]
    ones = jnp.ones((P,), M.dtype)
    JMJ = (M - jnp.mean(M, axis=0, keepdims=True) - jnp.mean(M, axis=1, keepdims=True)
           + jnp.mean(M))
    return JMJ + (jnp.outer(r, ones) + jnp.outer(ones, r)) / P - (jnp.sum(r) / P**2) * jnp.outer(
        ones, ones)


def scan_moments(Xb, wb, *, value_scale=None, dtype=jnp.float32):
    """:func:`value_moments` of each chunk of a block: ``((b, n), (b,))`` float64."""
    return jax.lax.map(lambda xw: value_moments(xw[0], xw[1], value_scale=value_scale,
                                                dtype=dtype), (Xb, wb))


def scan_stats(K, Qb, Xb, wb, *, key_scale=None, value_scale=None, precision=HIGHEST,
               moments=None, init: Stats | None = None, centred: bool = False) -> Stats:
    """Statistics over a block of chunks ``Qb`` (b×c×m), ``Xb`` (b×c×n), ``wb`` (b×c) with
    ``lax.scan`` (one chunk's intermediates at a time, float64 carry). ``moments``:
    :func:`scan_moments` of the block, if known; ``init`` continues earlier blocks' sums (so
    streamed blocks add up in the order of one scan). ``centred=True`` as in :func:`chunk_stats`
    (``wb`` may then be None: no padding rows)."""
    init = zero_stats(K.shape[0], Xb.shape[-1]) if init is None else init

    def body(acc, chunk):
        q, x, w, mom = chunk
        return merge(acc, chunk_stats(K, q, x, w, key_scale=key_scale, value_scale=value_scale,
                                      precision=precision, moments=mom, centred=centred)), None

    if moments is None:
        moments = scan_moments(Xb, wb, value_scale=value_scale, dtype=K.dtype)
    return jax.lax.scan(body, init, (Qb, Xb, wb, moments))[0]


def loss_from_stats(stats: Stats, V) -> jax.Array:
    """½‖X − AV‖² summed over the rows, from the statistics alone:
    ``½(Σ‖x‖² − 2⟨V, B⟩ + ⟨V, G V⟩)``, in float64 (clamped at 0 against rounding)."""
    V = V.astype(F64)
    val = 0.5 * (stats.xx - 2.0 * jnp.vdot(V, stats.B) + jnp.vdot(V, stats.G @ V))
    return jnp.maximum(val, 0.0)
