"""The differentiable memory: prototypes ``K`` (P×m) and ``V`` (P×n), read by attention."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Memory", "predict_in_chunks"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Memory:
    """A fitted memory. A JAX pytree, so it can be passed through ``jit``, ``grad`` and ``vmap``.

    ``memory.predict(Q)`` (or ``memory(Q)``) returns ``softmax(Q Kᵀ + bias) V`` for queries
    ``Q`` (…×m); it is pure and differentiable in ``K``, ``V``, ``bias`` and ``Q``. ``bias`` (P,)
    is optional (``None``: the seed's plain dot-product memory).
    """

    K: jax.Array
    V: jax.Array
    bias: jax.Array | None = None

    def __post_init__(self):
        k, v = self.K, self.V
        # pytree unflattening may pass placeholders (None, object()): only check real arrays
        if hasattr(k, "shape") and hasattr(v, "shape") and len(k.shape) == 2 == len(v.shape):
            if k.shape[0] != v.shape[0]:
                raise ValueError(f"K has {k.shape[0]} prototypes but V has {v.shape[0]}")

    @property
    def prototypes(self) -> int:
        return int(self.K.shape[0])

    @property
    def key_dim(self) -> int:
        return int(self.K.shape[1])

    @property
    def value_dim(self) -> int:
        return int(self.V.shape[1])

    def weights(self, Q: jax.Array) -> jax.Array:
        """Attention weights ``softmax(Q Kᵀ)`` (…×P)."""
        Q = jnp.asarray(Q, self.K.dtype)
        logits = Q @ self.K.T
        if self.bias is not None:
            logits = logits + self.bias.astype(self.K.dtype)
        return jax.nn.softmax(logits, axis=-1)

    def predict(self, Q: jax.Array) -> jax.Array:
        """``softmax(Q Kᵀ) V``: the values recalled for queries ``Q`` (…×m)."""
        return self.weights(Q) @ self.V.astype(self.K.dtype)

    __call__ = predict


@jax.jit
def _predict(memory: Memory, Q):
    return memory.predict(Q)


def predict_in_chunks(memory: Memory, Q, chunk_rows: int = 8192) -> np.ndarray:
    """Predict for a large host array ``Q`` chunk by chunk (at most one chunk on the device)."""
    Q = np.asarray(Q)
    out = np.empty((Q.shape[0], memory.value_dim), dtype=np.dtype(memory.K.dtype))
    for s in range(0, Q.shape[0], chunk_rows):
        out[s:s + chunk_rows] = np.asarray(_predict(memory, Q[s:s + chunk_rows]))
    return out
