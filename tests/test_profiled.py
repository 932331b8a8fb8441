"""The profiled loss as a differentiable function of the keys (issue 15, first part): its value is
the ridge objective at the exact V, its gradient equals JAX's own derivative through the solve,
a value costs one statistics pass and a gradient one more, and it drives optax's L-BFGS (which
needs ``value_fn``), eagerly and under ``jax.jit``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scalemem

RIDGE = 1e-3  # large enough that leaving out the ridge term would show in the gradient


def _data(n=700, m=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, m)), rng.standard_normal((n, k))


def _direct(Q, X, K, ridge, bias=None, key_scale=1.0):
    """The objective written out: min_V ½‖X − A V‖² + ½λ‖V‖² by a dense solve, differentiated
    by JAX through the solve."""
    logits = key_scale * jnp.asarray(Q) @ K.T + (0.0 if bias is None else bias)
    A = jax.nn.softmax(logits, axis=1)
    V = jnp.linalg.solve(A.T @ A + ridge * jnp.eye(K.shape[0]), A.T @ jnp.asarray(X))
    return 0.5 * jnp.sum((jnp.asarray(X) - A @ V) ** 2) + 0.5 * ridge * jnp.sum(V * V)


@pytest.mark.parametrize("key_bias", [False, True])
def test_value_and_gradient_equal_jax_through_the_solve(key_bias):
    Q, X = _data()
    loss = scalemem.profiled_loss(Q, X, 6, dtype="float64", ridge=RIDGE, key_bias=key_bias,
                                  key_scale=0.5)
    rng = np.random.default_rng(1)
    K = rng.standard_normal(loss.shape) * 0.5
    value, grad = loss.value_and_grad(K)
    with jax.enable_x64(True):
        Kj = jnp.asarray(K)
        f = (lambda K: _direct(Q, X, K[:, :5], RIDGE, K[:, 5], 0.5)) if key_bias else (
            lambda K: _direct(Q, X, K, RIDGE, key_scale=0.5))
        want_value, want_grad = jax.value_and_grad(f)(Kj)
    # float64 both ways, different summation orders and solves (Cholesky on float64 statistics
    # against a dense LU): agreement to ~1e-12 relative; 1e-9 leaves room on any machine while a
    # missing ridge term (relative effect ~1e-3 here) or a wrong sign fails
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-9,
                               atol=1e-9 * float(np.abs(want_grad).max()))


def test_a_value_costs_one_statistics_pass_and_a_gradient_one_gradient_pass():
    Q, X = _data()
    loss = scalemem.profiled_loss(Q, X, 4)
    K = np.random.default_rng(0).standard_normal(loss.shape).astype(np.float32)
    loss(K)
    assert loss.passes == {"stats": 1, "grad": 0}
    loss.value_and_grad(K)
    assert loss.passes == {"stats": 2, "grad": 1}


def test_memory_at_the_keys_has_the_fit_loss():
    """memory(K) is the model at K: its squared error over the rows is twice the objective less
    the ridge term."""
    Q, X = _data()
    loss = scalemem.profiled_loss(Q, X, 6, dtype="float64", ridge=RIDGE)
    K = np.random.default_rng(2).standard_normal(loss.shape) * 0.5
    mem = loss.memory(K)
    with jax.enable_x64(True):
        sse = scalemem.evaluate(mem, Q, X)["sse"]
        penalty = 0.5 * RIDGE * float(jnp.sum(mem.V * mem.V))
    np.testing.assert_allclose(0.5 * sse + penalty, float(loss(K)), rtol=1e-9)


def _lbfgs(loss, K, iterations, jit):
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(K, state):
        value, grad = value_and_grad(K, state=state)
        updates, state = opt.update(grad, state, K, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(K, updates), state, value

    with jax.enable_x64(True):
        K = jnp.asarray(K)
        state = opt.init(K)
        run = jax.jit(step) if jit else step
        values = []
        for _ in range(iterations):
            K, state, value = run(K, state)
            values.append(float(value))
    return K, values


@pytest.mark.parametrize("jit, dtype", [(False, "float64"), (True, "float64"), (True, "float32")])
def test_lbfgs_from_optax_minimises_it(jit, dtype):
    """float32 keys (the default) get a float32 value, as optax's L-BFGS keeps one dtype."""
    Q, X = _data(seed=3)
    loss = scalemem.profiled_loss(Q, X, 8, dtype=dtype)
    K0 = (np.random.default_rng(4).standard_normal(loss.shape) * 0.1).astype(dtype)
    K, values = _lbfgs(loss, K0, 15, jit)
    # a line search that accepts only decreases: the objective never rises, and 15 iterations
    # take it well below its start (> 1 % here; Adam at its default rate moves it ~0.1 %)
    tol = 1e-12 if dtype == "float64" else 1e-6  # the value's rounding in its dtype
    assert all(b <= a * (1 + tol) for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.99 * values[0], values
    assert loss.passes["grad"] >= 15 and loss.passes["stats"] >= loss.passes["grad"]
