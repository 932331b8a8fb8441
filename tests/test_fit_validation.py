"""Validation while fitting and progress everywhere (issue 14): held-out rows (a fraction of the
fit rows, a split, START:STOP, or arrays in Python) are evaluated while fitting; early stopping
keeps the best keys, exactly the keys of that step; a resumed fit with validation is
bit-identical; validation rows that overlap the fit rows are refused; progress shows life in a
log file (plain lines at a steady interval) and is silent when asked.

Fits use the seed recipe's constant schedule, whose path up to a step does not depend on the
number of steps, so "the keys of step b" is the result of a b-step fit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import scalemem
from scalemem import ConfigError, read_metadata
from scalemem._data import write_synthetic
from scalemem._run import cli
from scalemem._run.metrics import read_metrics

FIT = ["--prototypes", "6", "--recipe", "seed", "--learning-rate", "0.05", "--quiet",
       "--no-compile-cache"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("val-data") / "s.zarr", 1000, key_dim=5,
                           value_dim=4, seed=0)


def _run(argv) -> None:
    assert cli.main(argv) == 0


def test_early_stopping_keeps_exactly_the_keys_of_the_best_step(store, tmp_path):
    run = tmp_path / "run"
    _run(["fit", str(store), *FIT, "--steps", "300", "--val-rows", "20%", "--patience", "3",
          "--out", str(run)])
    res = read_metadata(run)["result"]
    recs = read_metrics(run)
    vals = [(r["step"], r["val_rmse"]) for r in recs if "val_rmse" in r]
    best_step, best = min(vals, key=lambda v: v[1])
    assert res["stopped_early"] and res["steps_run"] < 300, res  # stopped, long before 300
    assert res["best_step"] == best_step and res["val_rmse"] == best
    # patience 3: the 3 evaluations after the best were all worse, and the fit stopped there
    assert [s for s, _ in vals][-1] == best_step + 3
    assert res["rows"] == 800  # the last 20 % of the 1000 rows were held out, not fitted
    # the model holds the keys of step best_step: a plain fit of that many steps on rows 0:800
    plain = tmp_path / "plain"
    _run(["fit", str(store), *FIT, "--steps", str(best_step), "--rows", "0:800", "--out",
          str(plain)])
    a, b = scalemem.load(run), scalemem.load(plain)
    np.testing.assert_array_equal(np.asarray(a.K), np.asarray(b.K))  # bit for bit
    np.testing.assert_array_equal(np.asarray(a.V), np.asarray(b.V))
    # and its recorded validation RMSE is the model's error on the held-out rows
    ev = scalemem.evaluate(a, scalemem.open_source(store, rows="800:1000"))
    assert ev["rmse"] == pytest.approx(best, rel=1e-6)  # float32 predictions, float64 sums


def test_a_resumed_fit_with_validation_is_bit_identical(store, tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "run"
    argv = [*FIT, "--steps", "40", "--val-rows", "800:1000", "--rows", "0:800", "--patience",
            "0", "--val-every", "3", "--checkpoint-every", "1", "--keep-checkpoints", "100"]
    _run(["fit", str(store), *argv, "--out", str(straight)])
    _run(["fit", str(store), *argv, "--out", str(run)])
    # as if killed after step 17: the model and later checkpoints gone
    (run / "model.npz").unlink()
    for p in (run / "checkpoints").glob("step-*.npz"):
        if int(p.stem.split("-")[1]) > 17:
            p.unlink()
    _run(["fit", "--resume", str(run), "--quiet", "--no-compile-cache"])
    a, b = read_metadata(straight), read_metadata(run)
    assert a["metrics"]["validation"] == b["metrics"]["validation"]
    assert [r.get("val_rmse") for r in read_metrics(straight)] == [
        r.get("val_rmse") for r in read_metrics(run)]
    np.testing.assert_array_equal(np.asarray(scalemem.load(run).K),
                                  np.asarray(scalemem.load(straight).K))
    steps = [v["step"] for v in a["metrics"]["validation"]]
    assert steps == list(range(0, 40, 3)) + [40]  # every 3rd step and the last


def test_validation_rows_that_overlap_the_fit_rows_are_refused(store, tmp_path, capsys):
    for rows, val in (("0:800", "700:900"), (None, "0:10"), ("0:800", "150%")):
        argv = ["fit", str(store), *FIT, "--steps", "2", "--val-rows", val, "--out",
                str(tmp_path / "run")] + (["--rows", rows] if rows else [])
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "val_rows=" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "config.json").exists()


def test_python_api_validation_by_fraction_or_arrays_and_quiet_progress(capsys):
    rng = np.random.default_rng(0)
    Q, X = rng.standard_normal((500, 4)), rng.standard_normal((500, 3))
    kw = dict(recipe="seed", steps=12, learning_rate=0.05, patience=0, progress=False)
    by_fraction = scalemem.fit(Q, X, 5, val_rows=0.2, **kw)
    by_arrays = scalemem.fit(Q[:400], X[:400], 5, validation=(Q[400:], X[400:]), **kw)
    assert by_fraction.rows == by_arrays.rows == 400
    assert by_fraction.validation == by_arrays.validation  # the same rows held out
    assert len(by_arrays.validation) == 13 and by_arrays.best_step is None  # patience 0
    np.testing.assert_array_equal(np.asarray(by_fraction.memory.K),
                                  np.asarray(by_arrays.memory.K))
    assert capsys.readouterr().err == ""  # progress=False: silent
    with pytest.raises(ConfigError, match="val_rows"):
        scalemem.fit(Q, X, 5, val_rows="test10k", **kw)  # a split name needs a store
    scalemem.fit(Q, X, 5, **{**kw, "progress": True})  # stderr is not a terminal here: lines
    err = capsys.readouterr().err
    assert "fit: compiling the step program" in err and "fit step 0/12" in err, err
    assert "fit step 12/12" in err  # the last state, at the end


def test_a_logged_cli_fit_writes_a_line_at_a_steady_interval(store, tmp_path):
    """stderr redirected (a batch job's log): a progress line at least every interval from the
    start, without a terminal. Lines every 0.25 s are asked for over ~3000 fast steps; the
    longest silence allowed is 6 s: one compile (of the step program or of the final pass, each
    announced by a line of its own) takes 1–3 s on a loaded 2-core machine, everything else
    writes within the interval."""
    log = tmp_path / "err.log"
    cmd = [sys.executable, "-m", "scalemem", "fit", str(store), "--prototypes", "6",
           "--recipe", "seed", "--steps", "3000", "--log-seconds", "0.25", "--no-compile-cache",
           "--out", str(tmp_path / "run")]
    arrivals = []
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        t0 = time.monotonic()
        for line in proc.stderr:
            arrivals.append(time.monotonic() - t0)
            f.write(line)
        assert proc.wait(timeout=300) == 0
    lines = log.read_text().splitlines()
    progress = [x for x in lines if x.startswith("fit step ")]
    assert lines[0].startswith("fit: fitting ") and len(progress) >= 4, lines
    assert progress[-1].startswith("fit step 3000/3000"), lines
    assert "\r" not in log.read_text()
    gaps = np.diff(arrivals)
    assert gaps.max() < 6.0, (gaps.max(), lines)
