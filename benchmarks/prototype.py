"""The seed article's prototype, verbatim in its maths, as the baseline every benchmark compares
against. Whole dataset on one device, float32 (or float64 when x64 is on), LU solve."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax


def loss(K, V, Q, X):
    A = jax.nn.softmax(Q @ K.T, axis=1)
    return 0.5 * jnp.sum((X - A @ V) ** 2)


def up_V(K, Q, X, lam=1e-6):
    A = jax.nn.softmax(Q @ K.T, axis=1)
    M = A.shape[1]
    return jnp.linalg.solve(A.T @ A + lam * jnp.eye(M, dtype=A.dtype), A.T @ X)


grad_K = jax.grad(loss, 0)


@partial(jax.jit, static_argnums=3)
def step(K, V, state, opt, Q, X):
    V = up_V(K, Q, X)
    ups, state = opt.update(grad_K(K, V, Q, X), state, K)
    return optax.apply_updates(K, ups), V, state


def init(P, Q, lr=5e-4, dtype=jnp.float32):
    m = Q.shape[1]
    K = 0.01 * jax.random.normal(jax.random.PRNGKey(0), (P, m), dtype=dtype)
    V = jnp.zeros((P, 784 if Q.shape[1] == 78 else Q.shape[1]), dtype)
    opt = optax.adam(lr)
    return K, V, opt.init(K), opt


def fit(Q, X, P, iters=1000, lr=5e-4):
    K, _, state, opt = init(P, Q, lr, Q.dtype)
    V = jnp.zeros((P, X.shape[1]), Q.dtype)
    for _ in range(iters):
        K, V, state = step(K, V, state, opt, Q, X)
    return (lambda Q_: jax.nn.softmax(Q_ @ K.T, axis=1) @ V), K, V
