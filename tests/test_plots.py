"""The pictures of ``scalemem eval --plots`` and ``scalemem reproduce`` (what each one says: its
title, lines, legend, marks; never its pixels), the file of each evaluation, and the warning
when evaluated rows were fit or validation rows. Fits are tiny (P = 4, a few steps on a
400-row image store) and run in this process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import scalemem
from scalemem._data import StoreWriter
from scalemem._run import cli
from scalemem._run.commands import SEED_STEPS, SEED_TABLE
from scalemem._run.plots import GROUP_FIELDS, eval_file_name, eval_plots, reproduce_plot

pytest.importorskip("matplotlib")

N, FIT_ROWS = 400, 300
FIT = ["--rows", "fit", "--prototypes", "4", "--steps", "4", "--no-compile-cache", "--quiet"]


def _image_store(path: Path) -> Path:
    """Random 28×28 uint8 images of 5 templates, their labels, 78 key pixels (as fashion-mnist)."""
    rng = np.random.default_rng(0)
    templates = rng.uniform(0, 1, (5, 784))
    labels = rng.integers(0, 5, N).astype(np.uint8)
    px = np.clip(templates[labels] + 0.1 * rng.standard_normal((N, 784)), 0, 1)
    with StoreWriter(path, "zarr") as w:
        w.create_array("pixels", (N, 784), np.uint8, chunk_rows=128).append(
            np.rint(255 * px).astype(np.uint8))
        w.write_array("labels", labels)
        w.write_array("key_columns", np.sort(rng.choice(784, 78, replace=False)).astype(np.int32))
        w.meta.update(rows=N, splits={"fit": [0, FIT_ROWS], "test": [FIT_ROWS, N], "all": [0, N]},
                      views={"keys": "pixels[@key_columns]/255", "values": "pixels/255"})
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _image_store(tmp_path_factory.mktemp("plots-data") / "img.zarr")


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory) -> Path:
    """runs/p4 and runs/p8 (4 steps), runs/p4-2steps (2 steps): two groups of settings."""
    folder = tmp_path_factory.mktemp("plots-runs")
    for name, extra in (("p4", []), ("p8", ["--prototypes", "8"]), ("p4-2steps",
                                                                      ["--steps", "2"])):
        assert cli.main(["fit", str(store), *FIT, *extra, "--out", str(folder / name)]) == 0
    return folder


@pytest.fixture
def drawn(monkeypatch) -> dict:
    """The figures written while the test runs, by file name (the last one of each name)."""
    from matplotlib.figure import Figure

    figs, real = {}, Figure.savefig

    def savefig(self, fname, *a, **kw):
        figs[Path(fname).name] = self
        return real(self, fname, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figs


def _eval(capsys, argv) -> tuple[dict, str]:
    assert cli.main(["eval", *argv, "--json"]) == 0
    cap = capsys.readouterr()
    return json.loads(cap.out), cap.err


def _legend(ax_or_fig) -> list[str]:
    legends = ax_or_fig.legends if hasattr(ax_or_fig, "legends") else [ax_or_fig.get_legend()]
    return [t.get_text() for leg in legends if leg is not None for t in leg.get_texts()]


def _plain_ticks(ax) -> None:
    """Tick labels that read as plain decimals: no offset, no ×10⁻ⁿ, no exponent."""
    assert ax.yaxis.get_offset_text().get_text() == ""
    labels = [t.get_text().replace("\u2212", "-") for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(float(x) >= 0 and "e" not in x for x in labels), labels


# ------------------------------------------------------------------------ one file per evaluation

@pytest.mark.parametrize("split, name", [("test10k", "eval-test10k.json"),
                                         ("0:5000", "eval-0-5000.json"),
                                         ("all rows", "eval-all-rows.json"),
                                         ("../x", "eval-x.json")])
def test_eval_file_names(split, name):
    assert eval_file_name(split) == name


def test_each_row_selection_has_its_own_file_and_fit_rows_are_warned(runs, capsys, drawn):
    run = runs / "p4"
    test, err = _eval(capsys, [str(run), "--rows", "test"])
    assert "warning" not in test and "warning" not in err
    assert Path(test["eval_file"]) == run / "eval-test.json"
    overlap, err = _eval(capsys, [str(run), "--rows", "250:350", "--quiet", "--plots"])
    # printed even with --quiet, and recorded
    assert "warning: of the 100 evaluated rows 250:350" in err and "50 are rows the model was " \
        "fitted on (fit, 0:300)" in err
    assert overlap["fit_rows_overlap"] == 50 and "not a test error" in overlap["warning"]
    assert json.loads((run / "eval-250-350.json").read_text())["warning"] == overlap["warning"]
    assert json.loads((run / "eval-test.json").read_text())["rmse"] == test["rmse"]  # kept
    assert not (run / "eval.json").exists()
    # and the pictures say so
    assert "not a test error" in drawn["rmse_vs_prototypes.png"].axes[0].get_title()
    assert any("includes fit or validation rows" in t
               for t in _legend(drawn["loss_curve.png"].axes[0]))


def test_validation_rows_are_warned_too(store, tmp_path, capsys):
    run = tmp_path / "val"
    assert cli.main(["fit", str(store), *FIT, "--val-rows", "10%", "--out", str(run)]) == 0
    res, err = _eval(capsys, [str(run), "--rows", "280:300"])  # the last 10% of fit: 270:300
    assert res["fit_rows_overlap"] == 0 and res["val_rows_overlap"] == 20
    assert "validation rows that chose the kept model (the last 10% of fit, 270:300)" in err


# ---------------------------------------------------------------------------- training curves

def _fake_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


class _Source:
    value_dim, rows = 16, 100  # not a 28×28 image: no prediction grid, so no model is needed


RES = {"store": "/s.zarr", "split": "test", "keys": "k", "values": "v", "prototypes": 8,
       "rmse": 0.131, "rows": 100}
META = {"config": {"prototypes": 8, "rows": "fit10k", "steps": 10, "recipe": "fast",
                   "val_rows": "10%"},
        "result": {"rows": 9000, "best_step": 6, "steps_run": 9}}


def test_training_curves_say_what_was_fitted_and_mark_the_kept_step(tmp_path, drawn):
    recs = [{"step": t, "loss": 1.0, "rmse": 0.139 - 0.001 * t, "seconds": t, "rows_per_s": None}
            | ({"val_rmse": 0.14 - 0.001 * min(t, 6) + 0.0005 * max(t - 6, 0)} if t % 2 == 0
               else {}) for t in range(10)]
    run = _fake_run(tmp_path / "runs" / "r", recs)
    notes = []
    out = eval_plots(run, None, META, _Source(), RES, False, say=notes.append)
    assert [Path(p).name for p in out] == ["loss_curve.png", "rmse_vs_prototypes.png"] and not notes
    ax = drawn["loss_curve.png"].axes[0]
    title = ax.get_title()
    for part in ("P = 8", "fit10k (9,000 rows)", "9 of 10 steps", "recipe fast",
                 "validation rows 10%"):
        assert part in title, title
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    train = next(ln for k, ln in lines.items() if k.startswith("training RMSE"))
    val = next(ln for k, ln in lines.items() if k.startswith("validation RMSE"))
    assert list(train.get_xdata()) == list(range(10))
    assert list(val.get_xdata()) == [0, 2, 4, 6, 8]  # only the steps where validation ran
    best = next(ln for k, ln in lines.items() if k.startswith("best step 6"))
    assert list(best.get_xdata()) == [6, 6]
    assert "at the kept step 0.1340" in val.get_label()
    assert any(k.startswith("RMSE on test") for k in lines)  # this evaluation, for comparison
    assert ax.get_yscale() == "linear"
    _plain_ticks(ax)


def test_training_curves_of_a_label_model_add_validation_accuracy(tmp_path, drawn):
    recs = [{"step": t, "loss": 1.0, "rmse": 0.3 - 0.01 * t, "val_rmse": 0.31 - 0.01 * t,
             "val_accuracy": 0.5 + 0.04 * t, "val_log_loss": 1.0} for t in range(5)]
    run = _fake_run(tmp_path / "runs" / "r", recs)

    class Labels(_Source):  # 100 rows of 2 key columns, one-hot values of 16 classes
        key_scale, store_meta = None, {}

        def read(self, a, b):
            rng = np.random.default_rng(a)
            return rng.normal(size=(b - a, 2)), np.eye(16)[rng.integers(0, 16, b - a)]

    rng = np.random.default_rng(1)
    memory = scalemem.Memory(K=rng.normal(size=(8, 2)).astype(np.float32),
                             V=rng.uniform(size=(8, 16)).astype(np.float32), bias=None)
    eval_plots(run, memory, {"config": {"prototypes": 8}}, Labels(), RES, True,
               say=lambda s: None)
    fig = drawn["loss_curve.png"]
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "accuracy"
    assert [ln.get_label() for ln in fig.axes[1].get_lines()][0].startswith("validation accuracy")
    assert "one-hot" in _legend(fig.axes[0])[0]


# ------------------------------------------------------------------------------ RMSE against P

def _sibling(root: Path, name: str, p: int, rmse: float, *, fit: dict | None = None,
             config: dict | None = None, file: str = "eval-test.json", split: str = "test"):
    d = root / name
    d.mkdir()
    res = {**RES, "split": split, "prototypes": p, "rmse": rmse}
    if fit is not None:
        res["fit"] = fit
    (d / file).write_text(json.dumps(res))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))


def test_rmse_against_p_joins_only_runs_with_the_same_settings(tmp_path, drawn):
    mine = {f: None for f in GROUP_FIELDS} | {"store": "/s.zarr", "rows": "fit10k", "steps": 35,
                                              "recipe": "fast", "prototypes": 8}
    root = tmp_path / "runs"
    run = _fake_run(root / "p8", [])
    _sibling(root, "p4", 4, 0.15, fit=mine)                                  # same settings
    _sibling(root, "p16-old", 16, 0.12, config=mine, file="eval.json")      # legacy file
    _sibling(root, "p16-short", 16, 0.14, fit=mine | {"steps": 5})          # fewer steps
    _sibling(root, "p64-60k", 64, 0.11, fit=mine | {"rows": "fit60k", "steps": 40})
    _sibling(root, "p2-bare", 2, 0.2)                                       # nothing recorded
    _sibling(root, "p32-other-rows", 32, 0.05, fit=mine, split="0:100")     # other rows
    _sibling(root, "p128", 128, 0.01, fit=mine, file="eval.json")  # superseded by its newer
    (root / "p128" / "eval-test.json").write_text(json.dumps(        # per-split file
        {**RES, "prototypes": 128, "rmse": 0.10, "fit": mine}))
    eval_plots(run, None, {"config": mine}, _Source(), RES, False, say=lambda s: None)
    ax = drawn["rmse_vs_prototypes.png"].axes[0]
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
             for ln in ax.get_lines()}
    assert lines == {
        "fit on fit10k, 35 steps, recipe fast ← this run": ([4, 8, 16, 128],
                                                            [0.15, 0.131, 0.12, 0.10]),
        "fit on fit10k, 5 steps, recipe fast": ([16], [0.14]),
        "fit on fit60k, 40 steps, recipe fast": ([64], [0.11]),
        "p2-bare (fit settings not recorded)": ([2], [0.2])}
    assert _legend(ax) == list(lines)
    assert "RMSE on test (100 rows) of s.zarr" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "8", "16", "64", "128"]
    _plain_ticks(ax)


def test_rmse_against_p_labels_the_settings_in_which_groups_differ(tmp_path, drawn):
    mine = {f: None for f in GROUP_FIELDS} | {"rows": "fit", "steps": 35, "recipe": "fast",
                                              "learning_rate": 0.003}
    root = tmp_path / "runs"
    run = _fake_run(root / "p8", [])
    _sibling(root, "p4", 4, 0.15, fit=mine | {"learning_rate": 0.01})
    eval_plots(run, None, {"config": mine}, _Source(), RES, False, say=lambda s: None)
    assert sorted(_legend(drawn["rmse_vs_prototypes.png"].axes[0])) == [
        "fit on fit, 35 steps, recipe fast, learning_rate 0.003 ← this run",
        "fit on fit, 35 steps, recipe fast, learning_rate 0.01"]


# --------------------------------------------------------------------- end to end, from the CLI

def test_eval_plots_of_a_run(runs, capsys, drawn):
    run = runs / "p4"
    for other in ("p8", "p4-2steps"):
        _eval(capsys, [str(runs / other), "--rows", "test"])
    res, err = _eval(capsys, [str(run), "--rows", "test", "--plots"])
    assert sorted(Path(p).name for p in res["plots"]) == [
        "loss_curve.png", "predictions.png", "rmse_vs_prototypes.png"]
    assert all(Path(p).parent == run for p in res["plots"]) and f"pictures in {run}" in err
    # the two 4-step runs are one line, the 2-step run another
    ax = drawn["rmse_vs_prototypes.png"].axes[0]
    assert sorted((ln.get_label(), list(ln.get_xdata())) for ln in ax.get_lines()) == [
        ("fit on fit, 2 steps, recipe fast", [4]),
        ("fit on fit, 4 steps, recipe fast ← this run", [4, 8])]
    grid = drawn["predictions.png"]
    assert "P = 4 · fit on fit (300 rows) · 4 steps · recipe fast" in grid.get_suptitle()
    errors = [ax.get_title() for ax in grid.axes if ax.get_title()]
    assert len(errors) == 8 and all(t.startswith("RMSE 0.") for t in errors)
    assert any(t.startswith("not a key pixel") for t in _legend(grid))
    assert "training RMSE" in _legend(drawn["loss_curve.png"].axes[0])[0]


def test_eval_plots_of_a_model_file_go_to_a_folder_of_their_own(runs, tmp_path, capsys):
    model = tmp_path / "m.npz"
    shutil.copy(runs / "p4" / "model.npz", model)
    res, err = _eval(capsys, [str(model), "--rows", "test", "--plots"])
    folder = tmp_path / "m-plots"
    assert {Path(p).parent for p in res["plots"]} == {folder} and f"pictures in {folder}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-plots", "m.npz"]
    assert "eval_file" not in res  # a bare model has no run folder to hold its evaluation
    (tmp_path / "n-plots").write_text("")
    shutil.copy(model, tmp_path / "n.npz")
    assert cli.main(["eval", str(tmp_path / "n.npz"), "--plots", "--quiet"]) == 2
    assert "n-plots is a file" in capsys.readouterr().err


def test_a_label_model_gets_a_confusion_matrix_and_its_accuracy(store, tmp_path, capsys, drawn):
    run = tmp_path / "labels"
    assert cli.main(["fit", str(store), "--values", "labels", "--values-are-labels", *FIT,
                     "--out", str(run)]) == 0
    res, _ = _eval(capsys, [str(run), "--rows", "test", "--plots"])
    assert sorted(Path(p).name for p in res["plots"]) == [
        "confusion.png", "loss_curve.png", "rmse_vs_prototypes.png"]
    ax = drawn["confusion.png"].axes[0]
    assert f"accuracy {res['accuracy']:.4f}" in ax.get_title()
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    counts = np.array([int(t.get_text()) for t in ax.texts]).reshape(5, 5)
    assert counts.sum() == N - FIT_ROWS
    # the same argmax as the evaluation's accuracy; a near-tie of two classes may round either
    # way between its float64 and these float32 predictions: at most a row or two
    assert abs(np.trace(counts) - res["accuracy"] * (N - FIT_ROWS)) <= 2


# ------------------------------------------------------------------------------------ reproduce

def test_the_reproduce_plot_says_how_many_steps_each_line_ran(tmp_path, drawn):
    rows = [{"prototypes": p, "rmse": r + 0.01} for p, r in SEED_TABLE.items()]
    reproduce_plot(rows, tmp_path / "r.png", steps=200, recipe="seed", fit_split="fit10k",
                   test_split="test60k", reference=SEED_TABLE, reference_steps=SEED_STEPS)
    ax = drawn["r.png"].axes[0]
    assert "scalemem 200 steps, the article 1000" in ax.get_title()
    assert "largest difference from the article: 0.010000" in ax.get_title()
    assert _legend(ax) == ["scalemem, recipe seed, 200 steps",
                           "seed article (published), 1000 steps"]
    assert [list(ln.get_xdata()) for ln in ax.get_lines()] == [list(SEED_TABLE)] * 2


def test_reproduce_states_its_steps(fmnist_dir, tmp_path, capsys, drawn):
    out = tmp_path / "rep"
    assert cli.main(["reproduce", "--data-dir", str(fmnist_dir), "--prototypes", "2,4",
                     "--steps", "3", "--out", str(out), "--quiet"]) == 0
    ax = drawn["rmse_vs_prototypes.png"].axes[0]
    assert "scalemem 3 steps, the article 1000" in ax.get_title()
    assert (out / "rmse_vs_prototypes.png").is_file()
