"""The profiled loss as a differentiable function of the keys: ``K ↦ min_V ½‖X − A(K) V‖² +
½λ‖V‖²``, i.e. at ``V*(K)``, the exact ridge solution; its gradient is the variable-projection
gradient (the objective is stationary in ``V`` at ``V*``, so no derivative of the solve is
needed; the ridge term, ½λ‖V*‖², is what makes value and gradient agree exactly). It
plugs into any optax transformation, those that need ``value_fn`` (L-BFGS) included, and into
other JAX optimisers (docs/design.md, "The profiled loss")."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._config import FitConfig, build
from .._data import ArraySource, check_source
from .._validate import check_pair, check_scale
from . import programs as prog
from .fitting import build_engine
from .mesh import replicate
from .model import Memory, memory_at

__all__ = ["ProfiledLoss", "profiled_loss"]


class ProfiledLoss:
    """``loss(K)``: the profiled objective at keys ``K`` (P×m, P×(m+1) with ``key_bias``): the
    training loss ½‖X − A V*‖² plus the ridge term ½λ‖V*‖², summed in float64 and returned in
    the keys' dtype (``dtype``: float32 by default, float64 for a float64 value); differentiable
    (``jax.grad``, ``jax.value_and_grad``, optax's L-BFGS ``value_fn``)
    through a ``jax.custom_vjp`` whose forward pass is one statistics pass plus the solve and
    whose backward pass is one gradient pass over the rows. ``passes`` counts the passes over
    the data so far (``{"stats": …, "grad": …}``, counted when they run). :meth:`memory` gives
    the :class:`Memory` at ``K`` (``V`` solved there).

    The rows stay on the devices (a mesh over ``devices``), as in a resident fit. Call it
    eagerly or inside ``jax.jit`` under ``jax.enable_x64(True)`` (the statistics are float64;
    eager calls turn it on themselves)."""

    def __init__(self, engine, m: int, key_bias: bool, dtype, scales=(None, None)):
        self.engine, self.spec, self._scales = engine, engine.spec, scales
        self.key_dim, self.key_bias, self.dtype = m, key_bias, jnp.dtype(dtype)
        self.passes = {"stats": 0, "grad": 0}
        self._f = self._build()

    def _count(self, what: str) -> None:
        self.passes[what] += 1

    def _build(self):
        engine, spec = self.engine, self.spec

        def solved(K):
            jax.debug.callback(lambda: self._count("stats"))
            return prog.resident_final(K, engine.ridge, engine.parts, spec=spec)

        def objective(out, K):
            # the ridge term too: the gradient below is this objective's; in the keys' dtype,
            # as optimisers (optax's L-BFGS) keep values and parameters in one dtype
            return prog.objective(out, engine.ridge).astype(K.dtype)

        @jax.custom_vjp
        def f(K):
            return objective(solved(K), K)

        def fwd(K):
            out = solved(K)
            return objective(out, K), (K, out.V)

        def bwd(res, g):
            K, V = res
            jax.debug.callback(lambda: self._count("grad"))
            grad = prog.resident_grad(K, V, engine.parts, spec=spec)
            return ((g * grad).astype(K.dtype),)

        f.defvjp(fwd, bwd)
        return f

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the keys it takes."""
        return (self.engine.prototypes, self.key_dim + int(self.key_bias))

    def _keys(self, K):
        K = jnp.asarray(K, self.dtype)
        if K.shape != self.shape:
            raise ValueError(f"keys of shape {K.shape}; this loss takes {self.shape}")
        return replicate(K, self.spec.mesh) if not isinstance(K, jax.core.Tracer) else K

    def __call__(self, K) -> jax.Array:
        if isinstance(K, jax.core.Tracer):
            return self._f(K)
        with jax.enable_x64(True):
            return self._f(self._keys(K))

    def value_and_grad(self, K) -> tuple[jax.Array, jax.Array]:
        """``(loss, ∂K)`` at ``K``: one statistics pass and one gradient pass."""
        with jax.enable_x64(True):
            return jax.value_and_grad(self._f)(self._keys(K))

    def memory(self, K) -> Memory:
        """The memory at keys ``K``, ``V`` solved there exactly (one statistics pass)."""
        with jax.enable_x64(True):
            K = self._keys(K)
            self._count("stats")
            V = prog.resident_final(K, self.engine.ridge, self.engine.parts, spec=self.spec).V
            return memory_at(K, V, self.key_dim, self.key_bias, *self._scales)


def profiled_loss(Q, X=None, prototypes: int | None = None, *, key_scale=None, value_scale=None,
                  **settings: Any) -> ProfiledLoss:
    """The profiled loss of a memory of ``prototypes`` prototypes on keys ``Q`` and values
    ``X`` (arrays), or on a source ``Q`` (``X`` left out), as a differentiable function of the
    keys (:class:`ProfiledLoss`). ``settings``: the fields of :class:`scalemem.FitConfig` that
    shape the loss (``ridge``, ``dtype``, ``key_bias``, ``chunk_rows``, ``devices``,
    ``stats_precision``, ``grad_precision``).

    Example (L-BFGS from optax)::

        loss = scalemem.profiled_loss(Q, X, 64)
        opt = optax.lbfgs()
        K = K0; state = opt.init(K)
        value_and_grad = optax.value_and_grad_from_state(loss)
        with jax.enable_x64(True):
            for _ in range(50):
                value, grad = value_and_grad(K, state=state)
                updates, state = opt.update(grad, state, K, value=value, grad=grad,
                                            value_fn=loss)
                K = optax.apply_updates(K, updates)
        memory = loss.memory(K)
    """
    if X is None:
        source = check_source(Q)
    else:
        check_pair(Q, X)
        source = ArraySource(np.asarray(Q), np.asarray(X),
                             key_scale=check_scale("key_scale", key_scale),
                             value_scale=check_scale("value_scale", value_scale))
    if prototypes is None:
        raise TypeError("profiled_loss() needs the number of prototypes")
    cfg = build(FitConfig, {"prototypes": prototypes, **settings, "residency": "resident"},
                strict=True)
    with jax.enable_x64(True):
        engine = build_engine(source, cfg)
    engine.prototypes = cfg.prototypes
    return ProfiledLoss(engine, int(source.key_dim), cfg.key_bias, cfg.dtype,
                        (source.key_scale, source.value_scale))
