"""Initial keys from the data: k-means++ centres (or sampled rows) at the logit scale of lowest
exact loss (docs/design.md, "Initial keys")."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from threadpoolctl import threadpool_limits

__all__ = ["normal_keys", "kmeans_pp", "initial_keys", "key_sample", "key_spread", "data_keys"]

SAMPLE_ROWS = 20000  # rows of keys the data-driven initialisations look at
_SPANS = 16  # contiguous spans the sample of a larger source is read in


def normal_keys(prototypes: int, key_dim: int, seed: int = 0, dtype=jnp.float32) -> jax.Array:
    """``K₀ = 0.01·normal(PRNGKey(seed), (P, m))``, the seed's initialisation."""
    return 0.01 * jax.random.normal(jax.random.PRNGKey(seed), (prototypes, key_dim), dtype=dtype)


def _sq_dists(A, C, aa=None):
    aa = (A * A).sum(1) if aa is None else aa
    return np.maximum(aa[:, None] - 2.0 * A @ C.T + (C * C).sum(1)[None, :], 0.0)


def _one_blas_thread(f):
    """``f`` with NumPy's BLAS on one thread: its products here are matrix-vector sized, and a
    pool of BLAS threads spinning against XLA's (and anything else on the cores) made them 30×
    slower (k-means++ of 10k Fashion-MNIST keys at P = 256 on 2 busy cores: 2.5 s against
    0.42 s on one thread)."""
    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        with threadpool_limits(1, user_api="blas"):
            return f(*args, **kwargs)
    return wrapped


@_one_blas_thread
def kmeans_pp(Q, P: int, *, seed: int = 0, iters: int = 10, sample: int = 20000,
              poll=None) -> np.ndarray:
    """``P`` k-means centres of (a random sample of at most ``sample`` rows of) ``Q``: k-means++
    seeding (D² sampling) then ``iters`` Lloyd iterations; empty clusters keep their centre.
    ``poll()`` is called every 64 seeded centres and before each iteration (it may raise)."""
    poll = (lambda: None) if poll is None else poll
    rng = np.random.default_rng(seed)
    Q = np.asarray(Q, np.float64)
    if Q.shape[0] > sample:
        Q = Q[rng.choice(Q.shape[0], sample, replace=False)]
    aa = (Q * Q).sum(1)
    C = np.empty((P, Q.shape[1]))
    C[0] = Q[rng.integers(Q.shape[0])]
    d2 = _sq_dists(Q, C[:1], aa)[:, 0]
    for p in range(1, P):
        if p % 64 == 0:
            poll()
        cum = np.cumsum(d2)
        i = (min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(cum) - 1)
             if cum[-1] > 0 else int(rng.integers(Q.shape[0])))
        C[p] = Q[i]
        np.minimum(d2, _sq_dists(Q, C[p:p + 1], aa)[:, 0], out=d2)
    for _ in range(iters):
        poll()
        # nearest centre: argmin of ‖c‖² − 2 q·c (‖q‖² is the same for every centre); the
        # members' sums by one segmented sum over the rows sorted by centre (np.add.at took 7 ms
        # an iteration here, 10k Fashion-MNIST keys at P = 256)
        lab = np.argmin((C * C).sum(1)[None, :] - 2.0 * (Q @ C.T), axis=1)
        cnt = np.bincount(lab, minlength=P)
        nz = cnt > 0
        starts = np.cumsum(cnt) - cnt
        sums = np.add.reduceat(Q[np.argsort(lab, kind="stable")], starts[nz], axis=0)
        C[nz] = sums / cnt[nz, None]
    return C


def initial_keys(centres: np.ndarray, beta: float, bias: bool) -> np.ndarray:
    """Keys for logit scale ``beta``; with ``bias`` a last column ``−β‖c‖²/2`` (the key rows
    then meet queries with a constant 1 appended)."""
    K = beta * centres
    if bias:
        K = np.hstack([K, -0.5 * beta * (centres * centres).sum(1, keepdims=True)])
    return K


def key_sample(source, rows: int = SAMPLE_ROWS) -> np.ndarray:
    """Scaled float64 keys of the whole ``source`` when it has at most ``rows`` rows, else of
    ``rows`` rows read as evenly spaced contiguous spans (the same rows whatever the engine, the
    devices or the process reading them)."""
    n = int(source.rows)
    if n <= rows:
        spans = [(0, n)]
    else:
        width = rows // _SPANS
        spans = [(s, s + width) for s in np.linspace(0, n - width, _SPANS).astype(int)]
    Q = np.concatenate([np.asarray(source.read(a, b)[0], np.float64) for a, b in spans])
    return Q * (1.0 if source.key_scale is None else source.key_scale)


def key_spread(Qs: np.ndarray) -> float:
    """σ of a key sample: the root mean square of its columns' standard deviations (1 for
    constant keys)."""
    return float(np.sqrt(np.mean(np.var(Qs, axis=0)))) or 1.0


def data_keys(final, Qs: np.ndarray, P: int, init: str, seed: int, bias: bool, dtype, *,
              poll=None):
    """``(keys, passes, StepOut at the keys or None)``: k-means++ centres (``init="kmeans"``) or ``P`` distinct sampled rows
    (``"sample"``) of the key sample ``Qs`` at the logit scale of lowest exact training loss (a
    bracketing search of ``final(K)``, the engine's statistics pass and solve at ``K``), and
    the statistics passes the search spent. ``poll()`` is called before each k-means iteration
    and each pass (it may raise to stop)."""
    poll = (lambda: None) if poll is None else poll
    rng = np.random.default_rng(seed)
    if init == "kmeans":
        C = kmeans_pp(Qs, P, seed=seed, poll=poll)
    else:
        C = Qs[rng.choice(Qs.shape[0], P, replace=False)]
    sub = Qs[rng.choice(Qs.shape[0], min(4096, Qs.shape[0]), replace=False)]
    d2 = _one_blas_thread(_sq_dists)(sub, C[:min(P, 64)]).min(1)
    s2 = float(np.median(d2)) or 1.0
    losses: dict[float, float] = {}
    outs: dict[float, object] = {}

    def loss(g: float) -> float:
        if g not in losses:
            poll()
            outs[g] = final(jnp.asarray(initial_keys(C, g / s2, bias), dtype))
            value = float(outs[g].loss)
            losses[g] = value if np.isfinite(value) else np.inf
        return losses[g]

    # the logit scale g/s2, g dimensionless (s2: the median squared distance of a row to its
    # nearest centre): a bracketing search from g = 1/4 by factors of 4 (walking downhill, within
    # 1e-3 … 64), then the best point refined by factors of 2. Fashion-MNIST (fit10k and fit60k,
    # P = 64 and 256) picks g in 1/16 … 1/2: 5 statistics passes, where the grid of factor 16
    # refined by 4 and 2 it replaces took 9 and picked the same scales within a factor of 2
    # (docs/design.md, "Initial keys").
    best = min((0.0625, 0.25, 1.0), key=loss)
    step = 0.25 if best == 0.0625 else 4.0 if best == 1.0 else None
    while step is not None and 1e-3 <= best * step <= 64.0 and loss(best * step) < loss(best):
        best *= step
    best = min((best / 2.0, best, best * 2.0), key=loss)
    if not np.isfinite(losses[best]):
        best = 1.0
    return jnp.asarray(initial_keys(C, best / s2, bias), dtype), len(losses), outs.get(best)
