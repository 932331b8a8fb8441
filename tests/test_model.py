"""One model: everything prediction needs travels with it (bias, key and value scales), a saved
model predicts bit for bit like the fitted one, and every path evaluates with the same kernel."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import scalemem
from scalemem import CheckpointError
from scalemem._data import StoreWriter

N, M, NV, P = 1500, 6, 5, 8


def _uint8_data(seed=0):
    rng = np.random.default_rng(seed)
    Q = rng.integers(0, 256, (N, M), dtype=np.uint8)
    X = np.clip(Q[:, :NV].astype(np.float64) * 0.7 + rng.normal(0, 20, (N, NV)) + 30, 0,
                255).astype(np.uint8)
    return Q, X


@pytest.fixture(scope="module")
def biased_uint8_fit():
    Q, X = _uint8_data()
    res = scalemem.fit(Q, X, P, steps=8, key_bias=True, key_scale=1 / 255, value_scale=1 / 255)
    return Q, X, res


def test_fitted_memory_carries_bias_and_scales(biased_uint8_fit):
    Q, X, res = biased_uint8_fit
    mem = res.memory
    assert mem.bias is not None and mem.bias.shape == (P,)
    assert mem.key_scale == 1 / 255 and mem.value_scale == 1 / 255
    # predict takes the keys as the fit took them (raw uint8) and applies the scale itself:
    # its error per entry is the fit's own final training RMSE (same rows, same model; the
    # fit's RMSE comes from float64 statistics, the prediction from float32 products, so they
    # agree to float32 rounding of values in [0, 1]: 1e-5)
    pred = np.asarray(mem.predict(Q), np.float64)
    rmse = np.sqrt(np.mean((pred - X / 255.0) ** 2))
    assert rmse == pytest.approx(res.rmse[-1], rel=1e-5)
    assert "bias" in repr(mem) and "key_scale" in repr(mem) and len(repr(mem)) < 200


@pytest.mark.parametrize("suffix", ["model.npz", "run"])
def test_save_load_predict_is_bit_identical(biased_uint8_fit, tmp_path, suffix):
    Q, X, res = biased_uint8_fit
    path = tmp_path / suffix
    if suffix == "run":
        path.mkdir()
    scalemem.save(res.memory, path, {"note": "test"})
    back = scalemem.load(path)
    assert (back.key_scale, back.value_scale) == (res.memory.key_scale, res.memory.value_scale)
    for a, b in ((back.K, res.memory.K), (back.V, res.memory.V), (back.bias, res.memory.bias)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # the same kind of input the fit took (raw uint8 keys): identical predictions
    assert np.array_equal(np.asarray(back.predict(Q)), np.asarray(res.memory.predict(Q)))
    assert np.array_equal(scalemem.predict_in_chunks(back, Q, 256),
                          scalemem.predict_in_chunks(res.memory, Q, 256))


def test_evaluated_rmse_of_a_biased_model_equals_its_own_predictions(biased_uint8_fit):
    Q, X, res = biased_uint8_fit
    mem = res.memory
    pred = scalemem.predict_in_chunks(mem, Q).astype(np.float64)
    own = float(np.sqrt(np.mean((pred - X.astype(np.float64) / 255.0) ** 2)))
    # arrays: scaled by the memory's own scales; a source: by its views' scales (the same here)
    by_arrays = scalemem.evaluate(mem, Q, X)
    src = scalemem.ArraySource(Q, X, key_scale=1 / 255, value_scale=1 / 255)
    by_source = scalemem.evaluate(mem, src)
    # one kernel: identical float32 predictions, float64 sums in another order: 1e-12 relative
    assert by_arrays["rmse"] == pytest.approx(own, rel=1e-12)
    assert by_source["rmse"] == pytest.approx(own, rel=1e-12)
    assert by_arrays["rows"] == by_source["rows"] == N
    # in chunks of 100 rows XLA may block the float32 products differently (a few ulps, 6e-8
    # relative, on predictions of ~0.5 against residuals of ~0.08): 1e-6 bounds that
    assert scalemem.evaluate(mem, src, chunk_rows=100)["rmse"] == pytest.approx(own, rel=1e-6)


def test_cli_model_keeps_views_scales_and_bias(tmp_path):
    from scalemem import cli

    Q, X = _uint8_data(1)
    store = tmp_path / "s.zarr"
    with StoreWriter(store, "zarr") as w:
        w.create_array("px", (N, M + NV), np.uint8).append(np.hstack([Q, X]))
        w.meta.update(rows=N, splits={"fit": [0, 1200], "test": [1200, N]},
                      views={"keys": f"px[0:{M}]/255", "values": f"px[{M}:{M + NV}]/255"})
    run = tmp_path / "run"
    assert cli.main(["fit", str(store), "--rows", "fit", "--prototypes", str(P), "--steps", "5",
                     "--key-bias", "--out", str(run), "--quiet", "--no-compile-cache"]) == 0
    mem = scalemem.load(run)
    meta = scalemem.read_metadata(run)
    assert mem.bias is not None and mem.key_scale == pytest.approx(1 / 255)
    assert meta["key_view"] == f"px[0:{M}]/255" and meta["version"] == 2
    # the loaded model evaluates on the store exactly as its own predictions on the raw keys
    src = scalemem.open_source(store, rows="test")
    Qt, Xt = src.read(0, src.rows)
    own = np.sqrt(np.mean((np.asarray(mem.predict(Qt), np.float64) - Xt / 255.0) ** 2))
    assert scalemem.evaluate(mem, src, chunk_rows=src.rows)["rmse"] == pytest.approx(own,
                                                                                   rel=1e-12)


def test_model_of_the_previous_format_loads(tmp_path):
    """Format 1 (scalemem 0.1): K and V only; CLI runs recorded the scales in the fingerprint."""
    from scalemem._engine.modelio import write_npz

    rng = np.random.default_rng(0)
    K, V = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)
    path = write_npz(tmp_path / "old.npz", {"K": K, "V": V},
                     {"format": "scalemem-model", "version": 1,
                      "fingerprint": {"key_scale": 1 / 255, "value_scale": None}})
    mem = scalemem.load(path)
    assert mem.bias is None and mem.key_scale == 1 / 255 and mem.value_scale is None
    assert np.array_equal(np.asarray(mem.K), K)
    # a file of a future format is refused with what to do
    write_npz(tmp_path / "new.npz", {"K": K, "V": V}, {"format": "scalemem-model",
                                                       "version": 99})
    with pytest.raises(CheckpointError, match="upgrade scalemem"):
        scalemem.load(tmp_path / "new.npz")


def test_a_bias_of_the_wrong_shape_is_refused(tmp_path):
    mem = scalemem.Memory(K=jax.numpy.ones((4, 3)), V=jax.numpy.ones((4, 2)),
                          bias=jax.numpy.zeros(4))
    path = scalemem.save(mem, tmp_path / "m.npz")
    assert scalemem.read_metadata(path)["dtype"] == "float32"
    from scalemem._engine.modelio import read_npz, write_npz

    arrays, meta = read_npz(path)
    arrays["bias"] = np.zeros(5, np.float32)
    write_npz(tmp_path / "bad.npz", arrays, meta)
    with pytest.raises(CheckpointError, match="bias"):
        scalemem.load(tmp_path / "bad.npz")
