"""Initial keys from the data: k-means++ centres (or sampled rows) at a fitted scale.

The seed initialises ``K₀ = 0.01·normal``: all attention weights start nearly uniform and Adam
spends hundreds of steps separating the prototypes. Placing the prototypes on the data instead
(k-means++ centres of the keys, a few Lloyd iterations) and choosing the logit scale ``β`` by the
exact profiled loss (one statistics pass and one solve per candidate, no gradient) starts the fit
near a good kernel smoother. With ``bias=True`` the logits become ``β qᵀc − β‖c‖²/2``, so the
softmax is a normalised Gaussian (RBF) kernel around each centre.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kmeans_pp", "initial_keys"]


def _sq_dists(A, C):
    return np.maximum((A * A).sum(1)[:, None] - 2.0 * A @ C.T + (C * C).sum(1)[None, :], 0.0)


def kmeans_pp(Q, P: int, *, seed: int = 0, iters: int = 10, sample: int = 20000) -> np.ndarray:
    """``P`` k-means centres of (a random sample of at most ``sample`` rows of) ``Q``: k-means++
    seeding (D² sampling) then ``iters`` Lloyd iterations; empty clusters keep their centre."""
    rng = np.random.default_rng(seed)
    Q = np.asarray(Q, np.float64)
    if Q.shape[0] > sample:
        Q = Q[rng.choice(Q.shape[0], sample, replace=False)]
    C = np.empty((P, Q.shape[1]))
    C[0] = Q[rng.integers(Q.shape[0])]
    d2 = _sq_dists(Q, C[:1])[:, 0]
    for p in range(1, P):
        tot = d2.sum()
        i = rng.choice(Q.shape[0], p=d2 / tot) if tot > 0 else rng.integers(Q.shape[0])
        C[p] = Q[i]
        d2 = np.minimum(d2, _sq_dists(Q, C[p:p + 1])[:, 0])
    for _ in range(iters):
        lab = np.argmin(_sq_dists(Q, C), axis=1)
        cnt = np.bincount(lab, minlength=P)
        sums = np.zeros_like(C)
        np.add.at(sums, lab, Q)
        nz = cnt > 0
        C[nz] = sums[nz] / cnt[nz, None]
    return C


def initial_keys(centres: np.ndarray, beta: float, bias: bool) -> np.ndarray:
    """Keys for logit scale ``beta``; with ``bias`` a last column ``−β‖c‖²/2`` (the key rows
    then meet queries with a constant 1 appended)."""
    K = beta * centres
    if bias:
        K = np.hstack([K, -0.5 * beta * (centres * centres).sum(1, keepdims=True)])
    return K
