"""Data-driven initial keys and the per-prototype logit bias."""

import jax
import numpy as np
import pytest

import scalemem
from scalemem._engine import kmeans_pp


def _clusters(N=1200, m=4, n=3, k=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = 3 * rng.normal(size=(k, m))
    lab = rng.integers(0, k, N)
    Q = centres[lab] + 0.3 * rng.normal(size=(N, m))
    X = rng.normal(size=(k, n))[lab] + 0.1 * np.sin(Q @ rng.normal(size=(m, n)))
    return Q.astype(np.float32), X.astype(np.float32), centres


def test_kmeans_pp_finds_separated_clusters():
    Q, _, centres = _clusters()
    C = kmeans_pp(Q, 6, seed=1)
    # every true centre has a found centre within 0.5 (cluster std 0.3, centres ~3 apart)
    d = np.sqrt(((centres[:, None, :] - C[None]) ** 2).sum(-1)).min(1)
    assert d.max() < 0.5


@pytest.mark.parametrize("init", ["kmeans", "sample"])
def test_data_init_starts_far_below_the_seed_init(init):
    Q, X, _ = _clusters()
    seed_init = scalemem.fit(Q, X, 6, steps=0, recipe="seed")  # K0 = 0.01·normal
    data_init = scalemem.fit(Q, X, 6, steps=0, init=init, recipe="seed")
    assert data_init.loss[0] < 0.7 * seed_init.loss[0]


def test_key_bias_gives_a_memory_with_bias_that_predicts_like_the_fit():
    Q, X, _ = _clusters()
    res = scalemem.fit(Q, X, 6, steps=20, init="kmeans", key_bias=True, learning_rate=1e-2,
                       recipe="seed")
    mem = res.memory
    assert mem.K.shape == (6, Q.shape[1]) and mem.bias.shape == (6,)
    pred = np.asarray(jax.jit(lambda m, q: m(q))(mem, Q))
    rmse = np.sqrt(np.mean((pred.astype(np.float64) - X) ** 2))
    # the fit's RMSE comes from float64 statistics, this one from a float32 prediction of
    # values of size ~1 whose residual is ~0.04: float32 rounding (6e-8 of the values, summed
    # over P terms) is ~1e-5 of the residual; 1e-3 leaves room and still catches a wrong bias
    np.testing.assert_allclose(rmse, res.rmse[-1], rtol=1e-3)


def test_unknown_init_is_a_config_error():
    Q, X, _ = _clusters(N=50)
    with pytest.raises(scalemem.ConfigError, match="init"):
        scalemem.fit(Q, X, 3, steps=1, init="random-ish")
