"""The ``scalemem`` command line: help, TOML config merging, --json, eval/predict round trip,
labels, plots, the progress bar and the metrics file. Fits run in this process (P = 16, a few
steps on a 2000-row image store), so their XLA programs compile once for the module."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

import scalemem
from scalemem import ConfigError
from scalemem._data import StoreWriter
from scalemem._run import cli

N, FIT_ROWS = 2000, 1600
# the seed recipe (0.01·normal keys, constant Adam) at lr 0.1, as before the default became
# 'fast'; --no-compile-cache: in-process fits never write to the user's compile cache
FIT = ["--rows", "fit", "--prototypes", "16", "--recipe", "seed", "--learning-rate", "0.1",
       "--no-compile-cache", "--quiet"]


def _image_store(path: Path, seed: int = 0, format: str = "zarr") -> Path:
    """10 random 28×28 templates + noise as uint8 pixels, their class labels, 78 key pixels."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 1, (10, 784))
    labels = rng.integers(0, 10, N).astype(np.uint8)
    px = np.clip(templates[labels] + 0.15 * rng.standard_normal((N, 784)), 0, 1)
    cols = np.sort(rng.choice(784, 78, replace=False)).astype(np.int32)
    with StoreWriter(path, format) as w:
        w.create_array("pixels", (N, 784), np.uint8, chunk_rows=512).append(
            np.rint(255 * px).astype(np.uint8))
        w.write_array("labels", labels)
        w.write_array("key_columns", cols)
        w.meta.update(rows=N, splits={"fit": [0, FIT_ROWS], "test": [FIT_ROWS, N], "all": [0, N]},
                      views={"keys": "pixels[@key_columns]/255", "values": "pixels/255"})
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _image_store(tmp_path_factory.mktemp("cli-data") / "img.zarr")


def _json_run(capsys, argv) -> tuple[int, dict, str]:
    """Run the CLI; stdout must be exactly one JSON object."""
    rc = cli.main(argv)
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert len(lines) == 1, cap.out
    return rc, json.loads(lines[0]), cap.err


@pytest.fixture(scope="module")
def pixel_run(store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "p16"
    assert cli.main(["fit", str(store), *FIT, "--steps", "20", "--out", str(run)]) == 0
    return run


# ---------------------------------------------------------------------------------------- help

SUBCOMMANDS = [["data", "fashion-mnist"], ["data", "synthetic"], ["fit"], ["eval"], ["predict"],
               ["reproduce"]]


@pytest.mark.parametrize("argv", [[], ["data"]] + SUBCOMMANDS, ids=lambda a: " ".join(a) or "top")
def test_help_explains_every_option(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: scalemem" in text
    cmd = next((c for c in cli.COMMANDS if c.key == " ".join(argv)), None)
    assert (cmd is None) == (argv in ([], ["data"])), argv  # every subcommand is a Command
    words = " ".join(text.split())
    for f in (cmd.fields() if cmd else []):
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if meta["positional"]:
            shown = [meta["metavar"]]
        elif meta["type"] is bool:
            shown = [f"{flag}, --no-{flag[2:]}"]
        else:
            shown = [f"{flag} {meta['metavar']}" if meta["metavar"] else flag]
        for s in shown:
            assert s in text, f"{s} missing from `scalemem {' '.join(argv)} --help`"
        assert " ".join(meta["help"].split()[:3]) in words, f.name  # its help text is shown
        if meta["toml"]:
            assert f"[config: {f.name}]" in words, f.name


@pytest.mark.parametrize("argv", [["fit", "s.zarr", "--learning-rat", "0.02"],
                                  ["fit", "s.zarr", "--sched", "constant"],
                                  ["eval", "RUN", "--row", "test10k"],
                                  ["data", "synthetic", "--ro", "5"]])
def test_abbreviated_flags_are_refused(argv, capsys):
    """A shortened or mistyped flag is an error (as an unknown TOML key or keyword is), never
    argparse's silent prefix match."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--schedule", "cosin"], ["--learning-rate", "fast"],
                                 ["--steps", "-1"], ["--bogus"]])
def test_usage_errors_print_a_json_object_with_json(bad, capsys):
    """With --json, stdout is always one JSON object, a usage error included."""
    with pytest.raises(SystemExit) as e:
        cli.main(["fit", "s.zarr", "--json", *bad])
    assert e.value.code == 2
    out = json.loads(capsys.readouterr().out)
    assert out["error"] == "UsageError" and out["message"]


# -------------------------------------------------------------------------------------- config


def _resolve(argv) -> dict:
    ns = cli.build_parser().parse_args(argv)
    return cli.resolve(ns._command, {k: v for k, v in vars(ns).items() if not k.startswith("_")})


def test_config_toml_merging(tmp_path, store, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f"""
store = "{store}"
steps = 7              # top level: every command with a `steps` option
plots = true           # an eval setting: ignored by fit
checkpoint-every = 2   # dashes or underscores

[fit]
prototypes = 16
chunks_per_block = 2
learning_rate = 0.1
rows = "fit"
quiet = true
compile-cache = false  # never write to the user's compile cache

[eval]
rows = "test"
""")
    cfg = _resolve(["fit", "--config", str(toml), "--learning-rate", "0.05", "--out",
                    str(tmp_path / "r")])
    assert cfg["store"] == str(store) and cfg["steps"] == 7 and cfg["prototypes"] == 16
    assert cfg["chunks_per_block"] == 2 and cfg["checkpoint_every"] == 2 and cfg["rows"] == "fit"
    assert cfg["learning_rate"] == 0.05  # the flag wins over the [fit] table
    assert cfg["compile_cache"] is False and cfg["recipe"] == "fast"  # the default recipe
    assert cfg["ridge"] == 1e-6  # untouched: the default
    assert "plots" not in cfg
    ev = _resolve(["eval", "r", "--config", str(toml)])
    assert ev["rows"] == "test" and ev["plots"] is True and "steps" not in ev
    assert _resolve(["eval", "r", "--config", str(toml), "--no-plots"])["plots"] is False

    # the fit records the resolved config in the run folder
    rc, res, _ = _json_run(capsys, ["fit", "--config", str(toml), "--learning-rate", "0.05",
                                    "--out", str(tmp_path / "r"), "--json"])
    assert rc == 0 and res["steps"] == 7
    # an L-BFGS fit that ran its steps: not converged, and no stop reason (null, not "")
    assert res["optimizer"] == "lbfgs" and (res["converged"], res["stop_reason"]) == (False, None)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (saved["steps"], saved["prototypes"], saved["learning_rate"],
            saved["chunks_per_block"]) == (7, 16, 0.05, 2)
    # the recipe is recorded resolved: the settings that were not given are the recipe's
    assert (saved["recipe"], saved["init"], saved["optimizer"]) == ("fast", "kmeans", "lbfgs")
    assert saved["keys"] == "pixels[@key_columns]/255" and saved["values"] == "pixels/255"


@pytest.mark.parametrize("text, field", [
    ("bogus = 1", "bogus"),                    # not an option of any command
    ("[fit]\nplots = true", "plots"),          # an option, but not of fit
    ("[fit]\nprototypes = 'five'", "prototypes"),  # wrong type
    ("[fit]\nlearning_rate = true", "learning_rate"),
    ("[fit]\nlr = 0.1", "lr"),                 # the old name of learning_rate: not a setting
    ("steps = [", "config"),                   # not TOML
])
def test_config_errors_name_the_setting(tmp_path, text, field):
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError) as e:
        _resolve(["fit", "s.zarr", "--config", str(toml)])
    assert e.value.field == field


# ---------------------------------------------------------------------------------------- json


def test_json_output_of_every_command(tmp_path, store, pixel_run, capsys):
    # data: one JSON object on stdout, the human line on stderr
    rc, res, err = _json_run(capsys, ["data", "synthetic", "--rows", "500", "--key-dim", "4",
                                      "--value-dim", "3", "--out", str(tmp_path / "s.h5"),
                                      "--json"])
    assert rc == 0 and res["format"] == "hdf5" and res["rows"] == 500 and "wrote" in err
    rc, res, err = _json_run(capsys, ["data", "fashion-mnist", "--from", str(tmp_path / "none"),
                                      "--out", str(tmp_path / "fm.zarr"), "--json"])
    assert rc == 2 and res["error"] == "DataError" and "error" in err
    # fit: the run's summary
    rc, res, _ = _json_run(capsys, ["fit", str(store), *FIT, "--steps", "3", "--out",
                                    str(tmp_path / "run"), "--json"])
    assert rc == 0
    assert {"run", "model", "loss", "train_rmse", "steps", "rows", "seconds"} <= set(res)
    assert res["rows"] == FIT_ROWS and res["steps"] == 3
    # a second fit into the same folder is refused (use --resume or --overwrite)
    rc, res, _ = _json_run(capsys, ["fit", str(store), *FIT, "--steps", "3", "--out",
                                    str(tmp_path / "run"), "--json"])
    assert rc == 2 and res["field"] == "out" and "--resume" in res["message"]
    # fit --resume of a finished run: nothing to do
    rc, res, _ = _json_run(capsys, ["fit", "--resume", str(tmp_path / "run"), "--json"])
    assert rc == 0 and res["steps"] == 3
    # eval and predict
    rc, res, err = _json_run(capsys, ["eval", str(pixel_run), "--rows", "test", "--json"])
    assert rc == 0 and list(res)[:2] == ["rmse", "rows"] and "RMSE" in err
    rc, res, _ = _json_run(capsys, ["predict", str(pixel_run), "--rows", "0:10", "--out",
                                    str(tmp_path / "p.zarr"), "--json"])
    assert rc == 0 and res["rows"] == 10 and res["columns"] == 784


# ------------------------------------------------------------------------ eval/predict round trip


def test_eval_predict_round_trip(tmp_path, store, pixel_run, capsys):
    import h5py

    rc, ev, _ = _json_run(capsys, ["eval", str(pixel_run), "--rows", "test", "--json"])
    assert rc == 0 and ev["rows"] == N - FIT_ROWS
    assert json.loads((pixel_run / "eval-test.json").read_text())["rmse"] == ev["rmse"]
    out = tmp_path / "pred.h5"
    rc, pr, _ = _json_run(capsys, ["predict", str(pixel_run), "--rows", "test", "--out",
                                   str(out), "--chunk-rows", "128", "--json"])
    assert rc == 0 and pr["format"] == "hdf5"
    with h5py.File(out) as f:
        pred = f["predictions"][...]
    src = scalemem.open_source(store, rows="test")
    Q, X = src.read(0, src.rows)
    X = X.astype(np.float64) / 255
    rmse = float(np.sqrt(np.mean((pred.astype(np.float64) - X) ** 2)))
    # eval accumulates in float64 from float32 predictions, as computed here: only the order of
    # the float64 sums and the softmax formulation differ (1e-6 relative is ~10 float32 ulps)
    assert rmse == pytest.approx(ev["rmse"], rel=1e-6)
    # scalemem.load gives a Memory whose jitted predict agrees with the written predictions
    import jax

    memory = scalemem.load(pixel_run)
    assert isinstance(memory, scalemem.Memory) and memory.K.shape == (16, 78)
    # the model keeps the key view's scale: predict takes the stored uint8 pixels
    assert memory.key_scale == pytest.approx(1 / 255)
    got = np.asarray(jax.jit(lambda m, q: m.predict(q))(memory, Q))
    # float32 matmuls at default vs HIGHEST precision (equal on CPU up to summation order)
    np.testing.assert_allclose(got, pred, rtol=0, atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    import jax.numpy as jnp

    m = scalemem.Memory(K=jnp.arange(6.0, dtype=jnp.float32).reshape(3, 2),
                        V=jnp.ones((3, 4), jnp.float32))
    path = scalemem.save(m, tmp_path / "m.npz", {"note": "hi", "array": np.arange(3)})
    back = scalemem.load(path)
    np.testing.assert_array_equal(back.K, m.K)  # stored exactly
    np.testing.assert_array_equal(back.V, m.V)
    meta = scalemem.read_metadata(path)
    assert meta["note"] == "hi" and meta["array"] == [0, 1, 2]
    assert meta["format"] == "scalemem-model"
    with pytest.raises(scalemem.CheckpointError, match="scalemem fit --resume"):
        (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
        scalemem.load(tmp_path / "unfinished")


# -------------------------------------------------------------------------------------- labels


def test_values_are_labels_reports_accuracy(tmp_path, store, capsys):
    run = tmp_path / "labels"
    rc, res, _ = _json_run(capsys, ["fit", str(store), "--values", "labels",
                                    "--values-are-labels", *FIT, "--steps", "30", "--out",
                                    str(run), "--json"])
    assert rc == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["values_are_labels"] is True and cfg["classes"] == 10 and cfg["values"] == "labels"
    assert scalemem.load(run).V.shape == (16, 10)  # one column per class
    rc, ev, err = _json_run(capsys, ["eval", str(run), "--rows", "test", "--json"])
    assert rc == 0 and {"accuracy", "log_loss", "rmse", "rows"} <= set(ev)
    assert "clipped to [1e-07, 1] and renormalised" in ev["log_loss_note"] and "accuracy" in err
    # 10 templates that the 78 key pixels tell apart (noise 0.15): far above chance (0.1)
    assert ev["accuracy"] > 0.9
    # predict writes the probabilities and the argmax labels; they give the same figures
    out = tmp_path / "pred.zarr"
    rc, pr, _ = _json_run(capsys, ["predict", str(run), "--rows", "test", "--out", str(out),
                                   "--json"])
    assert rc == 0 and pr["labels_array"] == "predicted_labels"
    import zarr

    g = zarr.open_group(str(out), mode="r")
    probs, yhat = g["predictions"][...], g["predicted_labels"][...][:, 0]
    y = zarr.open_group(str(store), mode="r")["labels"][FIT_ROWS:].astype(np.int64)
    assert ev["accuracy"] == np.mean(yhat == y)  # same argmax of the same float32 predictions
    # the same rows in an HDF5 copy of the store (h5py reads the label array): same figures
    h5 = _image_store(tmp_path / "img.h5", format="hdf5")
    rc, ev5, _ = _json_run(capsys, ["eval", str(run), str(h5), "--rows", "test", "--json"])
    assert rc == 0 and (ev5["accuracy"], ev5["log_loss"]) == (ev["accuracy"], ev["log_loss"])
    p = np.clip(probs.astype(np.float64), 1e-7, 1)
    p /= p.sum(axis=1, keepdims=True)
    # same float32 predictions, float64 log-loss; sums in another order (1e-9 relative)
    assert ev["log_loss"] == pytest.approx(-np.mean(np.log(p[np.arange(len(y)), y])), rel=1e-9)


def test_labels_must_be_integers(store, tmp_path):
    rc = cli.main(["fit", str(store), "--values", "pixels", "--values-are-labels", *FIT,
                   "--steps", "1", "--out", str(tmp_path / "r")])
    assert rc == 2


# --------------------------------------------------------------------------------------- plots


def test_eval_plots(pixel_run, capsys):
    pytest.importorskip("matplotlib")
    rc, ev, _ = _json_run(capsys, ["eval", str(pixel_run), "--rows", "test", "--plots",
                                   "--json"])
    assert rc == 0
    names = sorted(Path(p).name for p in ev["plots"])
    assert names == ["loss_curve.png", "predictions.png", "rmse_vs_prototypes.png"]
    for p in ev["plots"]:
        assert Path(p).parent == pixel_run and Path(p).stat().st_size > 1000


# ------------------------------------------------------------------------- progress and metrics


def _report(step, steps=10, seconds=None):
    from scalemem import StepReport

    return StepReport(step, steps, 2.0 / (step + 1), 0.1, 1000,
                      seconds if seconds is not None else 1.0 + 0.5 * step)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_step_loss_rate_and_eta():
    from scalemem._progress import Progress

    buf = _Terminal()
    bar = Progress(stream=buf)
    for t in range(4):
        bar(_report(t))
    bar.close()
    line = buf.getvalue().split("\r")[-1]  # the last state, drawn on close
    # step t is the loss at K_t, as in metrics.jsonl; the loss shown is per row (2/4 / 1000
    # rows); 0.5 s per step after the first: 2000 rows/s, 7 steps left: 3.5 s
    assert "step 3/10" in line and "loss/row 0.0005" in line and "2.00k rows/s" in line, line
    assert "ETA 00:04" in line or "ETA 00:03" in line, line
    assert buf.getvalue().endswith("\n") and "\r" in buf.getvalue()
    off = _Terminal()
    Progress(enabled=False, stream=off)(_report(0))  # --quiet: nothing is drawn
    assert off.getvalue() == ""


def test_progress_off_a_terminal_writes_plain_lines_at_a_steady_interval():
    """A log file gets a line at the first report, then one per interval (not per step), the
    last state at close, and event lines; no carriage returns or bar characters."""
    from scalemem._progress import Progress

    now = [0.0]
    log = io.StringIO()  # not a terminal
    p = Progress(stream=log, interval=30.0, clock=lambda: now[0])
    p.note("compiling")
    for t in range(10):
        now[0] = 10.0 * t  # a report every 10 s: lines at 0, 30, 60, 90 s
        p(_report(t))
    p.close()
    lines = log.getvalue().splitlines()
    assert lines[0] == "fit: compiling"
    steps = [int(x.split()[2].split("/")[0]) for x in lines[1:]]
    assert steps == [0, 3, 6, 9], lines
    assert "\r" not in log.getvalue() and all("train RMSE 0.1" in x for x in lines[1:])


def test_metrics_lines(tmp_path):
    from scalemem._run.metrics import MetricsWriter, read_metrics, truncate_metrics

    with MetricsWriter(tmp_path / "metrics.jsonl", seconds_offset=10.0) as w:
        for t in range(4):
            w(_report(t))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a torn line from a killed process
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert recs[2] == {"step": 2, "loss": 2.0 / 3, "rmse": 0.1, "seconds": 12.0,
                       "rows_per_s": 2000.0}
    assert [r["step"] for r in truncate_metrics(tmp_path / "metrics.jsonl", 2)] == [0, 1]
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]


def test_a_numerics_warning_is_one_line_without_python_source(store, tmp_path, capsys,
                                                               monkeypatch):
    """Duplicate initial keys and no ridge make the Gram matrix singular: the CLI says so in one
    ``scalemem fit: warning: …`` line on stderr, not with the Python line that warned."""
    from scalemem._engine import init

    kmeans = init.kmeans_pp

    def duplicated(Q, P, **kw):
        C = kmeans(Q, P, **kw)
        C[1] = C[0]
        return C

    monkeypatch.setattr(init, "kmeans_pp", duplicated)
    rc = cli.main(["fit", str(store), "--rows", "fit", "--prototypes", "16", "--steps", "2",
                   "--ridge", "0", "--out", str(tmp_path / "run"), "--no-compile-cache",
                   "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0
    lines = [line for line in err.splitlines() if "warning" in line]
    assert lines and lines[0].startswith("scalemem fit: warning: step 0: the solve for V"), err
    assert "fit_engine(" not in err and "NumericsWarning" not in err, err


def test_a_closed_stdout_is_no_traceback_and_loses_no_model(store, tmp_path):
    """``scalemem fit … --json | true``: the reader is gone before the result is printed. The
    fit completes and saves its model, the exit status is 141 (a Unix tool ended by SIGPIPE),
    and there is no traceback; without --json the messages are dropped and the status is 0."""
    import subprocess
    import sys

    for json_flag, want in (["--json"], 141), ([], 0):
        run = tmp_path / f"run{len(json_flag)}"
        flags = [f for f in FIT if f != "--quiet"]  # messages too, on stdout without --json
        p = subprocess.Popen([sys.executable, "-m", "scalemem", "fit", str(store), *flags,
                              "--steps", "2", "--out", str(run), *json_flag],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()  # the reader leaves at once
        err = p.stderr.read().decode()
        assert p.wait(timeout=300) == want, err
        assert "Traceback" not in err and "Broken pipe" not in err, err
        assert (run / "model.npz").is_file()
