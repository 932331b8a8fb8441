"""The numerics core: pure, jit-able functions of arrays. No I/O, no globals, no Python state.

Notation (one chunk of ``c`` rows): keys ``Q`` (c×m), values ``X`` (c×n), row weights ``w`` (c,)
that are 1 for real rows and 0 for padding, prototypes ``K`` (P×m) and ``V`` (P×n).
``A = softmax(Q Kᵀ)`` row-wise (c×P).

Sufficient statistics of a chunk are ``G = Aᵀ diag(w) A``, ``B = Aᵀ diag(w) X``,
``xx = Σ w‖x‖²`` and ``count = Σ w``. The chunk products are computed in the data's dtype (float32
or float64) and *accumulated* across chunks in float64, so the summation error does not grow with
the number of rows. For float32 inputs each chunk product is an inner product of ``c`` terms whose
rounding error is at most ``γ_c = c·u/(1-c·u)`` (``u = 2⁻²⁴``) relative to ``|A|ᵀ|X|`` entrywise
(Higham, Accuracy and Stability, §3.1); for ``G`` every term is non-negative, so that bound is
relative to ``G`` itself. Merging chunks in float64 adds only ``u₆₄``-sized errors per merge.

The gradient with respect to ``K`` is taken at a fixed ``V`` (variable projection: at the ridge
optimum ``∂loss/∂V = 0``, so this equals the gradient of the profiled objective):
``∂/∂A ½‖X − AV‖² = A(VVᵀ) − XVᵀ`` (the FLOP-saving form: ``VVᵀ`` is P×P and computed once a step),
then the softmax backward ``dS = A ⊙ (dA − rowsum(A ⊙ dA))`` and ``∂/∂K = dSᵀ Q``.

All functions here need ``jax_enable_x64`` to be on while they are traced; the public entry
points (``scalemem.fit`` ...) switch it on for their own scope with ``jax.enable_x64(True)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

__all__ = [
    "Stats", "SolveInfo", "softmax_weights", "zero_stats", "merge", "chunk_stats", "scan_stats",
    "chunk_grad", "scan_grad", "solve_ridge", "solve_ridge_and_loss", "loss_from_stats", "to_blocks", "value_moments",
    "scan_moments", "balanced_chunk", "grad_operands", "centre_values",
    "default_chunk_rows",
]

HIGHEST = jax.lax.Precision.HIGHEST
F64 = jnp.float64


class Stats(NamedTuple):
    """Sufficient statistics of a set of rows, all float64. Add two with :func:`merge`."""

    G: jax.Array  # (P, P)  Aᵀ diag(w) A
    B: jax.Array  # (P, n)  Aᵀ diag(w) X
    xx: jax.Array  # ()     Σ w ‖x‖²
    count: jax.Array  # ()  Σ w  (number of real rows)


class SolveInfo(NamedTuple):
    """What the ridge solve had to do. ``jitter`` is added to the diagonal *beyond* the ridge."""

    jitter: jax.Array  # () float64, 0 when the plain Cholesky factorisation was accepted
    backward_error: jax.Array  # () float64, ‖(G+λI)V − B‖ / (‖G+λI‖‖V‖ + ‖B‖)
    attempts: jax.Array  # () int32, Cholesky factorisations tried
    fallback: jax.Array  # () bool, True when the eigendecomposition fallback was used
    condition: jax.Array  # () float64, estimate of cond₂(G + λI + jitter·I) (a lower bound)

    @property
    def needs_attention(self) -> bool:
        """True when the solve used jitter or the fallback, or the system is so ill-conditioned
        (estimate above ``ILL_CONDITIONED`` = 1e9) that V may carry large rounding errors."""
        return bool(self.jitter > 0) or bool(self.fallback) or bool(
            self.condition > ILL_CONDITIONED)


# Above this condition number float64 rounding alone can cost V more than 7 of its ~16
# significant digits, so V is less precise than float32 data (and tiny changes of the data move
# it a lot). The estimate is a lower bound within ~2x, so a Gram matrix of condition 1e10 is
# flagged with a wide margin; typical fits sit at 1e4-1e8 (Fashion-MNIST fit10k, P=100, ridge
# 1e-6: 1e8 at the 0.01-scale initial keys, 4e5 forty steps later).
ILL_CONDITIONED = 1e9


def _check_x64() -> None:
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "scalemem's statistics are accumulated in float64, which needs JAX's x64 mode: "
            "call this inside `with jax.enable_x64(True):` (scalemem.fit does this for you)."
        )


def softmax_weights(K: jax.Array, Q: jax.Array, precision=None) -> jax.Array:
    """``A = softmax(Q Kᵀ)`` row-wise, numerically stable for any logit scale."""
    return jax.nn.softmax(jnp.matmul(Q, K.T, precision=precision), axis=-1)


def zero_stats(P: int, n: int) -> Stats:
    _check_x64()
    return Stats(jnp.zeros((P, P), F64), jnp.zeros((P, n), F64), jnp.zeros((), F64),
                 jnp.zeros((), F64))


def merge(a: Stats, b: Stats) -> Stats:
    """Statistics of the union of two disjoint row sets (associative and commutative)."""
    return Stats(*(x + y for x, y in zip(a, b)))


def _values(X: jax.Array, dtype, scale) -> jax.Array:
    X = X.astype(dtype)
    return X if scale is None else X * jnp.asarray(scale, dtype)


def _tdot(a, b, precision):
    """``aᵀ b`` as one dot_general contracting the row axis (no transpose materialised)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision)


def value_moments(X, w=None, *, value_scale=None, dtype=jnp.float32):
    """``(Σ w x, Σ w ‖x‖²)`` of one chunk in float64: the part of the statistics that does not
    depend on ``K``. Engines that revisit the same chunks every step compute it once and pass it
    to :func:`chunk_stats` (``moments=``), which then touches ``X`` only inside one product."""
    X = _values(X, dtype, value_scale)
    Xw = X if w is None else X * w.astype(dtype)[:, None]
    return jnp.sum(Xw, axis=0, dtype=F64), jnp.sum(Xw.astype(F64) * X.astype(F64))


def _chunk_mean(xsum, W, dtype):
    """Column means ``Σ w x / Σ w`` rounded to ``dtype`` (0 for an empty chunk): the shift that
    :func:`chunk_stats` and :func:`chunk_grad` centre a chunk's values by."""
    return jnp.where(W > 0, xsum / jnp.where(W > 0, W, 1.0), 0.0).astype(dtype)


def centre_values(X, w=None, *, value_scale=None, dtype=jnp.float32):
    """``(Y, moments, μ)`` of one chunk: ``Y = X − 1μᵀ`` in ``dtype`` with ``μ`` its (``w``-
    weighted) column means, and ``moments`` = :func:`value_moments`. None of it depends on ``K``: an engine
    that revisits the same chunks every step prepares them once and passes
    ``chunk_stats(..., moments=moments, centred=True)`` and ``chunk_grad(..., centre=μ)``,
    which then touch the values only inside the two big products (no elementwise pass over
    the values per step). ``Y`` equals what those functions compute from ``X`` themselves."""
    moments = value_moments(X, w, value_scale=value_scale, dtype=dtype)
    W = jnp.asarray(X.shape[0], F64) if w is None else jnp.sum(w.astype(dtype), dtype=F64)
    mu = _chunk_mean(moments[0], W, dtype)
    return _values(X, dtype, value_scale) - mu, moments, mu


def chunk_stats(K, Q, X, w=None, *, key_scale=None, value_scale=None, precision=HIGHEST,
                moments=None, centred: bool = False) -> Stats:
    """Statistics of one chunk. ``Q`` and ``X`` may be integer arrays, converted (and multiplied
    by ``key_scale``/``value_scale``) on the fly in ``K``'s dtype. Products run in ``K.dtype`` at
    ``precision`` (HIGHEST by default, so GPUs do not silently drop to TF32); sums are returned in
    float64.

    Shifted products: with ``c = 1/P`` (the uniform attention weight) and ``D = A − c``,
    ``AᵀWA = W c² 11ᵀ + c(1sᵀ + s1ᵀ) + DᵀWD`` and ``AᵀWX = c 1(Σ w x)ᵀ + DᵀWX`` exactly, where
    ``W = Σ w`` and ``s = Σ w d = colsum(WA) − W c`` are float64 reductions. Only the ``D``
    products run in the data's dtype, so their rounding error is relative to ``|D|``, not to
    ``|A|``. Early in every fit (``K`` small) the weights are nearly uniform and the informative
    part of ``G`` is ``DᵀD``, orders of magnitude below ``W c² 11ᵀ``: a plain float32 ``AᵀA``
    would drown it in rounding (the seed prototype's instability). Later, when the weights are
    peaked, ``|D| ≈ |A|`` and the error is that of a plain product.

    Offset values. The value side is shifted too: with ``μ`` the chunk's column means (rounded
    to the compute dtype) and ``Y = X − 1μᵀ``, ``DᵀWX = DᵀWY + s μᵀ`` exactly (``DᵀW1 = s``), so
    the low-precision product's rounding is relative to ``|X − μ|`` instead of ``|X|``. And the
    identities of exact softmax weights (rows sum to 1, so each row of ``D`` sums to
    ``e = 1 − P c``, which is 0 but for the rounding of ``c = 1/P``) are imposed on the float64
    result: ``Σ_p s_p = W e``, ``(DᵀWD) 1 = e s`` and ``1ᵀ(DᵀWY) = e Σ w (x − μ)``. They hold
    exactly for exact weights, so they remove rounding only, and only along ``1``: the direction
    that a common offset of the values (``V ≈ 1μᵀ``) multiplies in the loss and the solve. With
    them, float32 values of mean 1e3 and spread 1 keep the loss to ~1e-9 relative; without them
    it was off by 17% (``tests/test_numerics.py``).

    ``centred=True`` says ``X`` is already ``Y`` from :func:`centre_values` (with the same
    ``w``); its ``moments`` must then be given.
    """
    _check_x64()
    if centred and moments is None:
        raise ValueError("chunk_stats(centred=True) takes the values from centre_values: pass "
                         "their moments too")
    dt = K.dtype
    P = K.shape[0]
    Q = _values(Q, dt, key_scale)
    X = X if centred else _values(X, dt, value_scale)
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
    G = G + _with_row_sums(_tdot(Dw, D, precision).astype(F64), e * s)
    mu64 = mu.astype(F64)
    DY = _tdot(Dw, X if centred else X - mu, precision).astype(F64)
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
    ``lax.scan``: one chunk's intermediates live at a time, sums carried in float64.
    ``moments`` is :func:`scan_moments` of the block, if already known; ``init`` continues the
    sums of earlier blocks (so streamed blocks add up in the same order as one scan).
    ``centred=True``: ``Xb`` holds :func:`centre_values` of each chunk and ``moments`` their
    moments (``wb`` may be None: no padding rows)."""
    if init is None:
        init = zero_stats(K.shape[0], Xb.shape[-1])

    def body(acc, chunk):
        q, x, w, mom = chunk
        return merge(acc, chunk_stats(K, q, x, w, key_scale=key_scale, value_scale=value_scale,
                                      precision=precision, moments=mom,
                                      centred=centred)), None

    if moments is None:
        moments = scan_moments(Xb, wb, value_scale=value_scale, dtype=K.dtype)
    out, _ = jax.lax.scan(body, init, (Qb, Xb, wb, moments))
    return out


def chunk_grad(K, V, VVt, Q, X, w=None, *, key_scale=None, value_scale=None,
               precision=HIGHEST, shift=None, centre=None) -> jax.Array:
    """∂/∂K of ½‖X − softmax(Q Kᵀ) V‖² (rows weighted by ``w``) at fixed ``V``; float64 result.
    ``VVt`` is ``V Vᵀ`` (P×P), computed once per step by the caller. ``precision`` is HIGHEST by
    default (full float32 on GPUs); ``"high"``/``"default"`` opt into TF32/bf16 passes there.
    CPUs ignore it.

    ``shift`` (an n-vector ``ν``, optional) says ``V`` was passed as ``V₀ − 1νᵀ``: the values
    are shifted by ``ν`` too, which gives the gradient at ``V₀`` (softmax rows sum to 1, so
    ``A V₀ − X = A(V₀ − 1νᵀ) − (X − 1νᵀ)``, and the softmax backward drops the remaining
    row-constant term). :func:`scan_grad` centres ``V`` this way, so the products round
    relative to the spread of the values, not to their offset.

    ``centre`` (an n-vector ``μ``, optional) says ``X`` was passed already centred, as
    ``Y = X − 1μᵀ`` from :func:`centre_values`: then ``(X − 1νᵀ)Vᵀ = YVᵀ + 1(V(μ − ν))ᵀ``, a
    rank-one term computed in float64, and no elementwise pass over the values is needed.

    ``VVt=None`` computes ``∂/∂A`` as ``(AV − X)Vᵀ`` instead: 2·P·n multiply-adds a row against
    P² + P·n, the cheaper form when P > n (:func:`grad_operands` picks by shape)."""
    dt = K.dtype
    Q = _values(Q, dt, key_scale)
    V = V.astype(dt)
    corr = None  # the rank-one term 1(V(μ − ν))ᵀ of centred values
    if centre is None:
        X = _values(X, dt, value_scale)
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
    return _tdot(dS, Q, precision).astype(F64)


def grad_operands(V, dtype, precision=HIGHEST):
    """``(V − 1νᵀ, (V − 1νᵀ)(V − 1νᵀ)ᵀ, ν)`` in ``dtype`` with ``ν`` the mean row of ``V`` (the
    P×P product only when P ≤ n; None otherwise, see :func:`chunk_grad`): the
    arguments ``V``, ``VVt`` and ``shift`` of :func:`chunk_grad` for the gradient at ``V``, once
    per step. Every engine should use them, so that all compute the same gradient."""
    V64 = V.astype(F64)
    nu = jnp.mean(V64, axis=0).astype(dtype)  # rounded first, so that Vd + ν is V
    Vd = (V64 - nu.astype(F64)).astype(dtype)
    P, n = V.shape
    # A(VVᵀ) − XVᵀ costs P² + P·n a row, (AV − X)Vᵀ 2·P·n: the first only while P ≤ n
    VVt = jnp.matmul(Vd, Vd.T, precision=precision) if P <= n else None
    return Vd, VVt, nu


def scan_grad(K, V, Qb, Xb, wb, *, key_scale=None, value_scale=None, precision=HIGHEST,
              init=None, centres=None) -> jax.Array:
    """:func:`chunk_grad` summed over a block of chunks with ``lax.scan`` (float64 carry);
    ``init`` continues the sum of earlier blocks. ``V`` is centred on its mean row (``shift``
    of :func:`chunk_grad`), so offset values keep their precision. ``centres`` (b×n): ``Xb``
    holds :func:`centre_values` of each chunk with these means (``wb`` may be None)."""
    _check_x64()
    Vd, VVt, nu = grad_operands(V, K.dtype, precision)

    def body(acc, chunk):
        q, x, w, mu = chunk
        return acc + chunk_grad(K, Vd, VVt, q, x, w, key_scale=key_scale,
                                value_scale=value_scale, precision=precision, shift=nu,
                                centre=mu), None

    init = jnp.zeros(K.shape, F64) if init is None else init
    out, _ = jax.lax.scan(body, init, (Qb, Xb, wb, centres))
    return out


def _backward_error(M, V, B):
    """``(‖MV − B‖ / (‖M‖‖V‖ + ‖B‖), ⟨V, MV − B⟩)``: the second gives the loss for free."""
    r = M @ V - B
    den = jnp.linalg.norm(M) * jnp.linalg.norm(V) + jnp.linalg.norm(B)
    return jnp.linalg.norm(r) / jnp.maximum(den, jnp.finfo(F64).tiny), jnp.vdot(V, r)


def _condition(M, L, iters: int = 10):
    """A lower bound on ``cond₂(M)`` for SPD ``M = L Lᵀ``, usually within a factor of 2: power
    iteration on ``M`` for ``λ_max`` and inverse iteration (with ``L⁻¹`` from one solve) for
    ``λ_min``, ``iters`` of each from a fixed start vector; O(iters·P²), small beside the
    factorisation. Never below the classic ``(max Lᵢᵢ / min Lᵢᵢ)²`` (also a lower bound, but one
    that can be orders of magnitude low: 2e7 for a condition number of 1e10)."""
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
    """``V = (G + λI)⁻¹ B`` in float64 by Cholesky, checked and never NaN for finite input;
    returns ``(V, SolveInfo)``. See :func:`solve_ridge_and_loss` (which also returns the loss)
    for the method."""
    V, _, info = solve_ridge_and_loss(stats, ridge, max_attempts=max_attempts, tol=tol)
    return V, info


def solve_ridge_and_loss(stats: Stats, ridge, *, max_attempts: int = 12, tol: float = 1e-10):
    """``V = (G + λI)⁻¹ B`` in float64 by Cholesky, checked and never NaN for finite input.

    1. Factorise ``G + λI``; accept when the result is finite and its normwise backward error
       ``‖(G+λI)V − B‖ / (‖G+λI‖‖V‖ + ‖B‖)`` is at most ``tol`` (a stable Cholesky solve gives
       about ``P·u₆₄ ≈ 1e-13``, so ``tol = 1e-10`` only rejects a broken factorisation).
    2. Otherwise retry with jitter ``j = s·P·u₆₄·10^(k-1)`` on the diagonal, ``s = trace(G)/P``,
       for ``k = 1 … max_attempts-1`` (that is, up to about 1e-2·s relative at P ≈ 1000).
    3. If every attempt fails, use the eigendecomposition of ``G + λI`` with eigenvalues below
       ``P·u₆₄·max|eig|`` dropped (a minimum-norm pseudo-inverse solution), which is finite for
       any finite ``G``.

    Returns ``(V, loss, SolveInfo)``; the caller decides whether to warn
    (``SolveInfo.needs_attention``). The loss is :func:`loss_from_stats` without its P×P×n
    product: with the residual ``r = (G+λI)V − B`` that the check computes anyway,
    ``⟨V, GV⟩ = ⟨V, B⟩ − λ‖V‖² + ⟨V, r⟩``, so ``loss = ½(Σ‖x‖² − ⟨V, B⟩ − λ‖V‖² + ⟨V, r⟩)``.
    """
    _check_x64()
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

    def again(state):
        k, ok = state[0], state[5]
        return (~ok) & (k < max_attempts)

    def body(state):
        k = state[0]
        return (k + 1, *attempt(k))

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
        jitter=jnp.where(ok, j, 0.0), backward_error=be, attempts=k, fallback=~ok,
        condition=cnd)


def loss_from_stats(stats: Stats, V) -> jax.Array:
    """½‖X − AV‖² summed over the rows, from the statistics alone:
    ``½(Σ‖x‖² − 2⟨V, B⟩ + ⟨V, G V⟩)``, in float64 (clamped at 0 against rounding)."""
    V = V.astype(F64)
    val = 0.5 * (stats.xx - 2.0 * jnp.vdot(V, stats.B) + jnp.vdot(V, stats.G @ V))
    return jnp.maximum(val, 0.0)


def default_chunk_rows(prototypes: int, platform: str = "cpu") -> int:
    """Rows per chunk of an in-memory fit when the caller does not say: a power of two sized so
    that one chunk's c×P float32 intermediate is about 16 MiB on a CPU (``2²² / P`` rows, 1024
    to 16384) and about 512 MiB on an accelerator (``2²⁷ / P`` rows, 4096 to 2²⁰). Bigger chunks
    cost fewer passes of per-chunk bookkeeping (each chunk of a scan is sliced out of the
    resident block, a copy, and with one chunk XLA computes the softmax once for both passes);
    on a CPU the cap keeps a chunk's working set near the caches. On an H200 at P = 1024 and
    70k rows one 70k-row chunk ran a step in 14.2 ms against 17.2 ms with 4096-row chunks
    (``benchmarks/results/h200_chunks.json``)."""
    budget, lo, hi = (22, 1024, 16384) if platform == "cpu" else (27, 4096, 1 << 20)
    c = 1 << max(0, (2**budget // max(int(prototypes), 1)).bit_length() - 1)
    return int(min(hi, max(lo, c)))


def balanced_chunk(rows: int, chunk_rows: int, multiple: int = 8) -> int:
    """The chunk length ≤ ``chunk_rows`` that splits ``rows`` into the fewest chunks with the
    least padding (rounded up to ``multiple`` rows for aligned memory)."""
    nb = max(1, -(-rows // max(1, chunk_rows)))
    c = -(-rows // nb)
    return min(max(chunk_rows, 1), -(-c // multiple) * multiple) if c > multiple else c


def to_blocks(Q, X, chunk_rows: int, w=None):
    """Pad the rows to a multiple of ``chunk_rows`` and reshape to (blocks, chunk, ·) with a
    weight array that is 0 on the padding. Works on NumPy and JAX arrays alike."""
    xp = jnp if isinstance(Q, jax.Array) else __import__("numpy")
    N = Q.shape[0]
    nb = max(1, -(-N // chunk_rows))
    pad = nb * chunk_rows - N
    if w is None:
        w = xp.ones((N,), dtype=Q.dtype if xp.issubdtype(Q.dtype, xp.floating) else "float32")

    def padded(a):
        a = xp.concatenate([a, xp.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a
        return a.reshape((nb, chunk_rows) + a.shape[1:])

    return padded(Q), padded(X), padded(w)
