"""Chunk sizes and padded blocks of rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["default_chunk_rows", "balanced_chunk", "to_blocks"]


def default_chunk_rows(prototypes: int, platform: str = "cpu") -> int:
    """Default rows per chunk of an in-memory fit: the power of two for which one chunk's c×P
    float32 intermediate is about 16 MiB on a CPU (``2²² / P`` rows, 1024 to 16384; near the
    caches) and 512 MiB on an accelerator (``2²⁷ / P``, 4096 to 2²⁰). Bigger chunks cost less
    per-chunk bookkeeping (a scan copies each chunk out of its block; with one chunk XLA computes
    the softmax once for both passes): on an H200 at P = 1024 and 70k rows, one 70k-row chunk ran
    a step in 14.2 ms against 17.2 ms with 4096-row chunks (benchmarks/results/h200_chunks.json)."""
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
    xp = jnp if isinstance(Q, jax.Array) else np
    N = Q.shape[0]
    nb = max(1, -(-N // chunk_rows))
    pad = nb * chunk_rows - N
    if w is None:
        w = xp.ones((N,), dtype=Q.dtype if xp.issubdtype(Q.dtype, xp.floating) else "float32")

    def padded(a):
        a = xp.concatenate([a, xp.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a
        return a.reshape((nb, chunk_rows) + a.shape[1:])

    return padded(Q), padded(X), padded(w)
