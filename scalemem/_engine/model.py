"""The model: prototypes ``K`` (P×m), ``V`` (P×n), an optional logit bias and the input scaling,
with the one prediction kernel every path uses."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._core import F64, HIGHEST, scaled
from .._data import ArraySource, ChunkStream, check_source, locate_nonfinite
from .._errors import DataError
from .._validate import check_int, check_pair, check_scale
from .engines import bucket_rows
from .mesh import host

__all__ = ["Memory", "memory_at", "attention", "predict_array", "predict_in_chunks", "evaluate", "PROB_FLOOR"]

PROB_FLOOR = 1e-7  # log-loss: probabilities are clipped to [PROB_FLOOR, 1] and renormalised


def attention(K, bias, Q, key_scale):
    """``softmax(s·Q Kᵀ + b)`` in ``K``'s dtype at HIGHEST matmul precision (``s`` the key
    scale, ``b`` the bias; either may be None)."""
    logits = jnp.matmul(scaled(Q, K.dtype, key_scale), K.T, precision=HIGHEST)
    if bias is not None:
        logits = logits + bias.astype(K.dtype)
    return jax.nn.softmax(logits, axis=-1)


def predict_array(K, V, bias, Q, key_scale):
    """``softmax(s·Q Kᵀ + b) V``: the prediction kernel."""
    return jnp.matmul(attention(K, bias, Q, key_scale), V.astype(K.dtype), precision=HIGHEST)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)
class Memory:
    """A fitted memory; a JAX pytree (``jit``, ``grad`` and ``vmap`` see ``K``, ``V``, ``bias``).

    ``memory.predict(Q)`` (or ``memory(Q)``) returns ``softmax(s·Q Kᵀ + bias) V`` for queries
    ``Q`` (…×m) as the fit took them, ``s`` the ``key_scale``; predictions are values as the fit
    saw them (stored values times ``value_scale``). ``bias`` (P,) is optional."""

    K: jax.Array
    V: jax.Array
    bias: jax.Array | None = None
    key_scale: float | None = dataclasses.field(default=None, metadata=dict(static=True))
    value_scale: float | None = dataclasses.field(default=None, metadata=dict(static=True))

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

    def weights(self, Q) -> jax.Array:
        """Attention weights ``softmax(s·Q Kᵀ + bias)`` (…×P)."""
        return attention(self.K, self.bias, jnp.asarray(Q), self.key_scale)

    def predict(self, Q) -> jax.Array:
        """The values recalled for queries ``Q`` (…×m)."""
        return predict_array(self.K, self.V, self.bias, jnp.asarray(Q), self.key_scale)

    __call__ = predict

    def __repr__(self) -> str:
        """One short line, never the arrays: P, the dimensions, the dtype, whether there is a
        bias, and the scales (``None``: the data as given)."""
        return (f"Memory(P={self.prototypes}, key_dim={self.key_dim}, value_dim="
                f"{self.value_dim}, dtype={self.K.dtype}, bias="
                f"{'yes' if self.bias is not None else 'no'}, key_scale={self.key_scale!r}, "
                f"value_scale={self.value_scale!r})")


def memory_at(K, V, key_dim: int, key_bias: bool, key_scale=None, value_scale=None) -> Memory:
    """The :class:`Memory` of a fit's key rows ``K`` (their last column the logit bias when
    ``key_bias``) and values ``V`` (host copies; ``V`` in ``K``'s dtype)."""
    K = np.asarray(host(K))
    V = np.asarray(host(V), K.dtype)
    return Memory(K=jnp.asarray(K[:, :key_dim]), V=jnp.asarray(V),
                  bias=jnp.asarray(K[:, key_dim]) if key_bias else None,
                  key_scale=key_scale, value_scale=value_scale)


@functools.partial(jax.jit, static_argnames=("key_scale",))
def _predict(memory: Memory, Q, *, key_scale):
    return predict_array(memory.K, memory.V, memory.bias, Q, key_scale)


_OWN = object()


def predict_in_chunks(memory: Memory, Q, chunk_rows: int = 8192, *,
                      key_scale=_OWN) -> np.ndarray:
    """Predict for a large host array ``Q`` chunk by chunk (one chunk on the device at a time);
    ``key_scale`` replaces the memory's own (e.g. the scale of a store view). A chunk shorter
    than ``chunk_rows`` is padded with zero rows to :func:`~.engines.bucket_rows` of its length,
    so arrays of nearby row counts (test folds of 3333 and 3334 rows) share one compiled
    program; every row's prediction depends on that row alone. A float64 memory predicts in
    float64 (JAX's 64-bit mode, as it was fitted)."""
    Q = np.asarray(Q)
    ks = memory.key_scale if key_scale is _OWN else key_scale
    out = np.empty((Q.shape[0], memory.value_dim), dtype=np.dtype(memory.K.dtype))
    with jax.enable_x64(True) if out.dtype == np.float64 else contextlib.nullcontext():
        for s in range(0, Q.shape[0], chunk_rows):
            q = Q[s:s + chunk_rows]
            n = q.shape[0]
            if n < chunk_rows:
                pad = min(bucket_rows(n), chunk_rows) - n
                q = np.concatenate([q, np.zeros((pad,) + q.shape[1:], q.dtype)]) if pad else q
            out[s:s + n] = np.asarray(_predict(memory, q, key_scale=ks))[:n]
    return out


@functools.partial(jax.jit, static_argnames=("key_scale", "value_scale", "labels"))
def _eval_block(acc, K, V, bias, Qb, Xb, wb, *, key_scale, value_scale, labels):
    """``acc`` + (Σ w‖x − v̂‖², correct predictions, Σ −log p_label) over a block of chunks."""

    def body(total, chunk):
        q, x, w = chunk
        pred = predict_array(K, V, bias, q, key_scale).astype(F64)
        x = x.astype(F64) * (1.0 if value_scale is None else value_scale)
        w = w.astype(F64)
        sse = jnp.sum(jnp.sum(jnp.square(x - pred), axis=1) * w)
        if not labels:
            return total + jnp.stack([sse, 0.0, 0.0]), None
        y = jnp.argmax(x, axis=1)
        correct = jnp.sum((jnp.argmax(pred, axis=1) == y) * w)
        p = jnp.clip(pred, PROB_FLOOR, 1.0)
        p = p / jnp.sum(p, axis=1, keepdims=True)
        nll = -jnp.sum(jnp.log(jnp.take_along_axis(p, y[:, None], axis=1))[:, 0] * w)
        return total + jnp.stack([sse, correct, nll]), None

    return acc + jax.lax.scan(body, jnp.zeros((3,), F64), (Qb, Xb, wb))[0]


def evaluate(memory: Memory, Q, X=None, *, labels: bool = False,
             chunk_rows: int = 8192) -> dict:
    """Error of ``memory`` on arrays ``Q``, ``X`` as the fit took them (scaled by the memory's
    scales), or on a source ``Q`` (``X`` left out; scaled by its views), chunk by chunk.

    Returns ``{"rmse", "sse", "rows"}``: ``sse = Σ‖x − v̂‖²`` in float64, ``rmse =
    sqrt(sse / (rows · value_dim))`` as the fit reports it. With ``labels`` (one-hot value rows)
    also ``accuracy`` and ``log_loss`` (mean ``−log p_y``, predictions clipped to
    ``[PROB_FLOOR, 1]`` and renormalised). NaN or Inf in the data raises
    :class:`~scalemem.NonFiniteDataError` naming the first such row."""
    if X is None:
        source = check_source(Q)
    else:
        check_pair(Q, X)
        source = ArraySource(np.asarray(Q), np.asarray(X), key_scale=memory.key_scale,
                             value_scale=memory.value_scale)
    if (memory.key_dim, memory.value_dim) != (source.key_dim, source.value_dim):
        raise DataError(f"{source.name}: the memory maps {memory.key_dim} key columns to "
                        f"{memory.value_dim} value columns, the data has {source.key_dim} and "
                        f"{source.value_dim}")
    rows = int(source.rows)
    # fewer rows than a chunk: one chunk of bucket_rows(rows), padded with rows of weight 0, so
    # arrays of nearby row counts share the compiled block
    c = min(check_int("chunk_rows", chunk_rows, 1), bucket_rows(rows))
    key_scale = check_scale("key_scale", source.key_scale)
    value_scale = check_scale("value_scale", source.value_scale)
    with jax.enable_x64(True):
        K, V, bias = (None if a is None else jnp.asarray(a)
                      for a in (memory.K, memory.V, memory.bias))
        acc = jnp.zeros((3,), F64)
        for b in ChunkStream(source, chunk_rows=c, weight_dtype=K.dtype, verify=False):
            acc = _eval_block(acc, K, V, bias, b.Q, b.X, b.w, key_scale=key_scale,
                              value_scale=value_scale, labels=bool(labels))
        sse, correct, nll = (float(v) for v in np.asarray(acc))
    if not np.isfinite([sse, correct, nll]).all():  # NaN/Inf in the data: name the row
        raise locate_nonfinite(source, chunk_rows=c)
    out = {"rmse": float(np.sqrt(sse / (rows * source.value_dim))), "sse": sse, "rows": rows}
    if labels:
        out.update(accuracy=correct / rows, log_loss=nll / rows)
    return out
