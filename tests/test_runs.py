"""Run folders you can trust (issue 13): a finished run extends like an interrupted one and refuses
other settings or data; --overwrite checks the whole command before it removes anything and only
removes what scalemem wrote; a moved or copied run resumes; eval refuses NaN data; --out must be
a writable folder apart from the data; predict never replaces its input.

The CLI runs in this process (as in test_cli.py) on small synthetic stores (600 rows, 4 key and
3 value columns, P = 4, a few steps of the seed recipe, whose constant schedule makes a path up
to a step independent of the number of steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import scalemem
from scalemem import read_metadata
from scalemem._data import StoreWriter, write_synthetic
from scalemem._run import cli

FIT = ["--prototypes", "4", "--recipe", "seed", "--learning-rate", "0.05", "--quiet",
       "--no-compile-cache"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("runs-data") / "s.zarr", 600, key_dim=4,
                           value_dim=3, seed=0)


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """Same shape, other numbers (only the content hash tells them apart)."""
    return write_synthetic(tmp_path_factory.mktemp("runs-other") / "o.zarr", 600, key_dim=4,
                           value_dim=3, seed=1)


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, argv, *words) -> str:
    """The CLI exits 2 with one error line naming ``words``, no traceback."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def _same_model(a: Path, b: Path) -> None:
    ma, mb = scalemem.load(a), scalemem.load(b)
    np.testing.assert_array_equal(np.asarray(mb.K), np.asarray(ma.K))  # bit-identical
    np.testing.assert_array_equal(np.asarray(mb.V), np.asarray(ma.V))
    assert read_metadata(b)["metrics"]["loss"] == read_metadata(a)["metrics"]["loss"]


def _fit(store, out, steps, *more) -> None:
    assert cli.main(["fit", str(store), *FIT, "--steps", str(steps), "--out", str(out),
                     *more]) == 0


# ----------------------------------------------------------- 1: a finished run is never replaced

def test_finished_run_extends_bit_identically_and_refuses_another_fit(store, other, tmp_path,
                                                                      capsys):
    run, straight = tmp_path / "run", tmp_path / "straight"
    _fit(store, run, 4)  # seconds long: no checkpoint by time, the final one only
    assert (run / "checkpoints" / "step-000004.npz").is_file()
    before = _snapshot(run)
    # another store, P and lr: refused naming the field, nothing written
    _refused(capsys, ["fit", "--resume", str(run), str(other), "--prototypes", "3",
                      "--steps", "40", "--quiet"], "'prototypes'")
    _refused(capsys, ["fit", "--resume", str(run), str(other), "--steps", "40", "--quiet"],
             "'content_hash'")
    assert _snapshot(run) == before
    # the same fit, more steps: continues from the final checkpoint, as if run straight to 7
    capsys.readouterr()
    assert cli.main(["fit", "--resume", str(run), "--steps", "7", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"] == 4
    _fit(store, straight, 7)
    _same_model(straight, run)
    # without any checkpoint (killed before the first one) config.json still binds the run
    shutil.rmtree(run / "checkpoints")
    (run / "model.npz").unlink()
    before = _snapshot(run)
    _refused(capsys, ["fit", "--resume", str(run), "--learning-rate", "0.5", "--quiet"],
             "'learning_rate'", "config.json")
    assert _snapshot(run) == before


def test_an_lbfgs_run_extends_bit_identically(store, tmp_path, capsys):
    # L-BFGS (the default recipe) has no schedule: its first 4 steps are those of any longer fit
    run, straight = tmp_path / "lb", tmp_path / "lb-straight"
    flags = ["--prototypes", "4", "--quiet", "--no-compile-cache"]
    assert cli.main(["fit", str(store), *flags, "--steps", "4", "--out", str(run)]) == 0
    assert cli.main(["fit", "--resume", str(run), "--steps", "7", "--quiet"]) == 0
    assert cli.main(["fit", str(store), *flags, "--steps", "7", "--out", str(straight)]) == 0
    assert json.loads((run / "config.json").read_text())["optimizer"] == "lbfgs"
    _same_model(straight, run)


def test_extending_a_cosine_run_is_refused(store, tmp_path, capsys):
    # the Adam recipe's cosine schedule decays over `steps`: 4 steps of a 4-step fit are not
    # the first 4 steps of a 6-step fit, so there is nothing to extend
    run = tmp_path / "cos"
    assert cli.main(["fit", str(store), "--prototypes", "4", "--steps", "4", "--quiet",
                     "--recipe", "adam", "--no-compile-cache", "--out", str(run)]) == 0
    before = _snapshot(run)
    _refused(capsys, ["fit", "--resume", str(run), "--steps", "6", "--quiet"], "'steps'")
    assert _snapshot(run) == before


# ------------------------------------------------- 2: --overwrite checks first, removes only ours

@pytest.fixture(scope="module")
def finished(store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    _fit(store, run, 3)
    return run


@pytest.mark.parametrize("change, field", [
    ({"store": "typo.zarr"}, "typo.zarr"),
    ({"--prototypes": "999999"}, "prototypes"),
    ({"--keys": "nosuch"}, "nosuch"),
    ({"--rows": "500:100"}, "rows"),
])
def test_overwrite_with_a_bad_command_keeps_the_run(finished, store, tmp_path, change, field,
                                                    capsys):
    before = _snapshot(finished)
    args = {"store": str(store), "--prototypes": "4", "--keys": "keys", "--rows": "all"} | {
        k: str(tmp_path / v) if k == "store" else v for k, v in change.items()}
    argv = ["fit", args.pop("store"), *[x for kv in args.items() for x in kv], "--recipe",
            "seed", "--steps", "3", "--quiet", "--no-compile-cache", "--out", str(finished),
            "--overwrite"]
    _refused(capsys, argv, field)
    assert _snapshot(finished) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_files_scalemem_did_not_write_are_never_replaced(store, tmp_path, overwrite, capsys):
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "config.json").write_text('{"my": "settings"}\n')
    (mine / "checkpoints" / "weights.bin").write_bytes(b"\x00" * 16)
    before = _snapshot(mine)
    _refused(capsys, ["fit", str(store), *FIT, "--steps", "3", "--out", str(mine)]
             + ["--overwrite"] * overwrite, "config.json", "not a scalemem run folder")
    assert _snapshot(mine) == before


def test_overwrite_replaces_a_run(finished, store, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "notes.txt").write_text("kept")
    assert cli.main(["eval", str(run), "--rows", "0:100", "--quiet"]) == 0  # eval-0-100.json
    assert (run / "eval-0-100.json").is_file()
    _fit(store, run, 2, "--overwrite")
    assert json.loads((run / "config.json").read_text())["steps"] == 2
    assert (run / "notes.txt").read_text() == "kept"
    assert not (run / "eval-0-100.json").exists()  # the old run's evaluation is gone with it
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002.npz"]


# --------------------------------------------------------- 9: a moved or copied run resumes

def test_moved_and_copied_runs_resume_in_their_new_place(finished, store, tmp_path, capsys):
    before = _snapshot(finished)
    copy, moved, straight = tmp_path / "copy", tmp_path / "moved", tmp_path / "straight"
    shutil.copytree(finished, copy)
    shutil.copytree(finished, tmp_path / "tmp")
    shutil.move(tmp_path / "tmp", moved)
    for run in (copy, moved):
        assert cli.main(["fit", "--resume", str(run), "--steps", "5", "--quiet"]) == 0, \
            capsys.readouterr().err
        assert json.loads((run / "config.json").read_text())["out"] == str(run)
    _fit(store, straight, 5)
    _same_model(straight, copy)
    _same_model(straight, moved)
    assert _snapshot(finished) == before  # the original is untouched


def test_a_folder_without_config_is_not_a_run_yet(store, tmp_path, capsys):
    run = tmp_path / "run"  # what a fit killed before writing config.json leaves
    run.mkdir()
    (run / ".lock").touch()
    _refused(capsys, ["fit", "--resume", str(run), "--quiet"], "not a run folder yet")
    _fit(store, run, 2)  # a plain rerun goes ahead


# ------------------------------------------------------------ 10: eval refuses non-finite data

def test_eval_refuses_nan_data_naming_the_row(store, tmp_path, capsys):
    rng = np.random.default_rng(0)
    Q, X = rng.standard_normal((600, 4)), rng.standard_normal((600, 3))
    X[123, 1] = np.nan
    nan = tmp_path / "nan.h5"
    with StoreWriter(nan, "hdf5") as w:
        w.write_array("keys", Q.astype(np.float32))
        w.write_array("values", X.astype(np.float32))
        w.meta.update(rows=600, splits={"all": [0, 600]}, views={"keys": "keys",
                                                                  "values": "values"})
    run = tmp_path / "run"
    _fit(nan, run, 2, "--rows", "0:100")  # rows without the NaN
    _refused(capsys, ["eval", str(run), "--quiet"], "row 123", "NaN".lower())
    rc = cli.main(["eval", str(run), "--quiet", "--json"])
    out = capsys.readouterr().out

    def strict(text):
        raise ValueError(f"not JSON: {text}")

    assert rc == 2 and json.loads(out, parse_constant=strict)["error"] == "NonFiniteDataError"


# -------------------------------------------- 11: --out that cannot be a folder, no traceback

@pytest.mark.parametrize("where", ["file", "under-file", "read-only", "the-store"])
def test_out_must_be_a_writable_folder_apart_from_the_data(store, tmp_path, where, capsys):
    (tmp_path / "afile").write_text("data")
    out = {"file": tmp_path / "afile", "under-file": tmp_path / "afile" / "run",
           "read-only": Path("/sys/scalemem-test-run"), "the-store": store}[where]
    if where == "read-only" and not Path("/sys").is_dir():
        pytest.skip("no /sys (a folder no one may write, root included)")
    before = _snapshot(store)
    _refused(capsys, ["fit", str(store), *FIT, "--steps", "2", "--out", str(out)], "out=")
    assert (tmp_path / "afile").read_text() == "data" and _snapshot(store) == before


# ------------------------------------------------------ 13: predict never replaces its input

def test_predict_refuses_to_write_over_its_input(finished, store, tmp_path, capsys):
    h5 = tmp_path / "s.h5"
    write_synthetic(h5, 600, key_dim=4, value_dim=3, seed=0, format="hdf5")
    before, run_before = h5.read_bytes(), _snapshot(finished)
    _refused(capsys, ["predict", str(finished), str(h5), "--out", str(h5), "--overwrite",
                      "--quiet"], "input store")
    _refused(capsys, ["predict", str(finished), str(store), "--out", str(store / "p.zarr"),
                      "--quiet"], "input store")
    _refused(capsys, ["predict", str(finished), str(h5), "--out", str(finished), "--overwrite",
                      "--quiet"], "the model")
    assert h5.read_bytes() == before and _snapshot(finished) == run_before
    assert cli.main(["predict", str(finished), str(h5), "--out", str(finished / "p.zarr"),
                     "--quiet"]) == 0  # beside the model is fine


@pytest.mark.parametrize("after", [0.0, 0.3, 0.6])
def test_sigint_while_the_command_starts_exits_130_without_a_traceback(store, tmp_path, after):
    """A Ctrl-C while the command imports JAX (before any command code could catch it), or just
    after, ends it with status 130 and no traceback (case 11). The signal is sent ``after``
    seconds after JAX's native library is mapped into the process: an earlier one lands in the
    interpreter's own start-up (site), before any scalemem code exists to handle it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "scalemem", "fit", str(store), *FIT,
                             "--steps", "50", "--out", str(tmp_path / "run")],
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), stderr=subprocess.PIPE,
                            text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 120  # a loaded machine imports slowly; this only bounds a hang
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if "jaxlib" in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.002)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    # 300 s: the process exits at once; the bound only guards against a hang on a loaded machine
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_a_failed_metrics_append_stops_with_a_checkpoint_and_resumes(store, tmp_path, capsys,
                                                                      monkeypatch):
    """A full disk under metrics.jsonl (case 7): the fit stops at once with a CheckpointError
    naming the file, its progress kept in a checkpoint; after `--resume` the model and the
    metrics equal an uninterrupted fit's (the missing record rebuilt from the checkpoint)."""
    from scalemem._errors import CheckpointError
    from scalemem._run.metrics import MetricsWriter, read_metrics

    orig = MetricsWriter.__call__

    def full_disk(self, report):
        if report.step == 3:
            raise CheckpointError(f"{self.path}: cannot append the record of step 3 (test)")
        return orig(self, report)

    run, straight = tmp_path / "run", tmp_path / "straight"
    monkeypatch.setattr(MetricsWriter, "__call__", full_disk)
    err = _refused(capsys, ["fit", str(store), *FIT, "--steps", "6", "--out", str(run)],
                   "metrics.jsonl", "step 3")
    assert "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").glob("*.npz"))  # the progress is kept
    assert not (run / "model.npz").exists()
    monkeypatch.undo()
    assert cli.main(["fit", "--resume", str(run), "--quiet"]) == 0
    _fit(store, straight, 6)
    _same_model(straight / "model.npz", run / "model.npz")
    got, want = read_metrics(run), read_metrics(straight)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(7))  # K_0 … K_6
    assert [(r["loss"], r["rmse"]) for r in got] == [(r["loss"], r["rmse"]) for r in want]


# ------------------------------------------- found by a hostile trial of the cases above

def test_overwrite_of_data_and_predict_replaces_only_a_scalemem_store(store, tmp_path, capsys):
    """`--overwrite` of `data` and `predict` never deletes a folder or file scalemem did not
    write (a project folder, a run folder, the model being read)."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("print('mine')\n")
    before = _snapshot(proj)
    _refused(capsys, ["data", "synthetic", "--out", str(proj), "--rows", "100", "--key-dim", "4",
                      "--value-dim", "3", "--overwrite", "--quiet"], "not a store written")
    run = tmp_path / "run"
    _fit(store, run, 2)
    runs_before = _snapshot(run)
    for out in (run, run / "model.npz"):
        _refused(capsys, ["predict", str(run), str(store), "--out", str(out), "--overwrite",
                          "--quiet"])
    assert _snapshot(proj) == before and _snapshot(run) == runs_before
    pred = tmp_path / "pred.zarr"  # a store scalemem wrote is replaced
    for _ in range(2):
        assert cli.main(["predict", str(run), str(store), "--out", str(pred), "--overwrite",
                         "--quiet"]) == 0


def test_damaged_newer_checkpoints_are_set_aside_and_progress_is_kept(store, tmp_path, capsys):
    """Damaged (or misnamed) checkpoints with higher step numbers than the newest good one are
    set aside (kept, renamed), so the checkpoints the resumed fit writes are not pruned in
    their favour; with no loadable checkpoint at all, the resume is refused."""
    run, straight = tmp_path / "run", tmp_path / "straight"
    _fit(store, run, 4, "--checkpoint-every", "1")
    ck = run / "checkpoints"
    good = sorted(ck.glob("step-*.npz"))
    (ck / "step-000900.npz").write_bytes(b"damaged" * 10)
    shutil.copy(good[0], ck / "step-000950.npz")  # a good file under a wrong name
    assert cli.main(["fit", "--resume", str(run), "--steps", "6", "--quiet"]) == 0
    names = sorted(p.name for p in ck.iterdir())
    assert "step-000006.npz" in names and "step-000900.npz.damaged" in names
    assert "step-000950.npz.damaged" in names
    _fit(store, straight, 6)
    _same_model(straight / "model.npz", run / "model.npz")
    for p in ck.glob("step-*.npz"):
        p.write_bytes(b"x")
    _refused(capsys, ["fit", "--resume", str(run), "--steps", "8", "--quiet"],
             "none of its", "can be read")


def test_a_foreign_folder_with_a_checkpoint_like_file_is_not_a_run(store, tmp_path, capsys):
    folder = tmp_path / "foreign"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text('{"lr": 0.1, "note": "other tool"}')
    (folder / "checkpoints" / "step-000001.npz").write_bytes(bytes(100))
    before = _snapshot(folder)
    _refused(capsys, ["fit", str(store), *FIT, "--steps", "2", "--out", str(folder),
                      "--overwrite"], "not a scalemem run folder")
    assert _snapshot(folder) == before


def test_special_files_and_long_names_are_refused_quickly(store, tmp_path, capsys):
    """A metrics.jsonl or --config that is a device or FIFO, and a name longer than the file
    system allows, are typed errors (exit 2), not an endless read or a traceback."""
    import os

    run = tmp_path / "run"
    _fit(store, run, 2)
    (run / "metrics.jsonl").unlink()
    os.symlink("/dev/zero", run / "metrics.jsonl")
    _refused(capsys, ["fit", "--resume", str(run), "--steps", "3", "--quiet"], "metrics.jsonl")
    _refused(capsys, ["fit", str(store), *FIT, "--config", "/dev/zero"], "config")
    _refused(capsys, ["fit", str(store), *FIT, "--out", str(tmp_path / ("y" * 300))])


def test_a_damaged_model_tells_how_to_resume(store, tmp_path, capsys):
    run = tmp_path / "run"
    _fit(store, run, 2)
    data = bytearray((run / "model.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run / "model.npz").write_bytes(bytes(data))
    _refused(capsys, ["fit", "--resume", str(run), "--steps", "3", "--quiet"],
             "Delete", "resume again")
    (run / "model.npz").unlink()
    assert cli.main(["fit", "--resume", str(run), "--steps", "3", "--quiet"]) == 0


@pytest.mark.parametrize("residency", ["resident", "streamed"])
def test_a_big_endian_store_fits_like_its_native_copy(tmp_path, residency):
    """Big-endian arrays (written by other tools) are read in native byte order: the same K as
    the native copy, bit for bit (JAX refuses non-native dtypes)."""
    import h5py

    rng = np.random.default_rng(0)
    Q, X = rng.standard_normal((600, 4)), rng.standard_normal((600, 3))
    for name, order in (("be.h5", ">"), ("le.h5", "<")):
        with h5py.File(tmp_path / name, "w") as f:
            f["keys"], f["values"] = Q.astype(f"{order}f4"), X.astype(f"{order}f8")
    Ks = []
    for name in ("be.h5", "le.h5"):
        with scalemem.open_source(tmp_path / name, keys="keys", values="values") as src:
            Ks.append(np.asarray(scalemem.fit_source(src, 4, recipe="seed", steps=3,
                                                     residency=residency).memory.K))
    np.testing.assert_array_equal(Ks[0], Ks[1])


# ------------------------------------- a hostile user's second round: folders, edits, moved data

def test_resume_of_a_foreign_folder_says_it_is_not_a_run(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"a": 1}')
    before = _snapshot(foreign)
    _refused(capsys, ["fit", "--resume", str(foreign), "--quiet"], "not a run folder")
    assert _snapshot(foreign) == before


@pytest.mark.parametrize("fingerprint", [[], {}, "x", None])
def test_an_edited_fingerprint_in_config_json_is_refused(finished, tmp_path, fingerprint, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["fingerprint"] = fingerprint  # would otherwise read as a config.json without one
    (run / "config.json").write_text(json.dumps(cfg))
    before = _snapshot(run)
    _refused(capsys, ["fit", "--resume", str(run), "--steps", "5", "--quiet"], "'fingerprint'")
    assert _snapshot(run) == before


@pytest.mark.parametrize("name", ["model.npz", "metrics.jsonl", "config.json"])
def test_a_folder_where_a_run_file_belongs_is_refused(finished, store, tmp_path, name, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    (run / name).unlink()
    (run / name).mkdir()
    (run / name / "keep.txt").write_text("mine")
    for argv in (["fit", "--resume", str(run), "--steps", "5", "--quiet"],
                 ["fit", str(store), *FIT, "--steps", "3", "--out", str(run), "--overwrite"]):
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert (run / name / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (run / name).iterdir()) == ["keep.txt"]


def test_a_moved_store_error_says_how_to_give_its_new_place(store, tmp_path, capsys):
    data = shutil.copytree(store, tmp_path / "data.zarr")
    run = tmp_path / "run"
    _fit(data, run, 3)
    moved = data.rename(tmp_path / "moved.zarr")
    _refused(capsys, ["fit", "--resume", str(run), "--steps", "4", "--quiet"], "no such store",
             f"scalemem fit STORE --resume {run}")
    _refused(capsys, ["eval", str(run), "--quiet"], "no such store", "STORE")
    _refused(capsys, ["predict", str(run), "--out", str(tmp_path / "p.zarr"), "--quiet"],
             "no such store", "STORE")
    assert cli.main(["fit", str(moved), "--resume", str(run), "--steps", "4", "--quiet"]) == 0
    assert cli.main(["eval", str(run), str(moved), "--quiet"]) == 0


def test_predict_refuses_nan_keys_naming_the_row(finished, tmp_path, capsys):
    rng = np.random.default_rng(0)
    Q = rng.standard_normal((600, 4)).astype(np.float32)
    Q[321, 2] = np.nan
    nan = tmp_path / "nan.h5"
    with StoreWriter(nan, "hdf5") as w:
        w.write_array("keys", Q)
        w.meta.update(rows=600, splits={"all": [0, 600]}, views={"keys": "keys"})
    out = tmp_path / "p.zarr"
    _refused(capsys, ["predict", str(finished), str(nan), "--keys", "keys", "--out", str(out),
                      "--quiet"], "row 321", "nan")
    assert not out.exists()  # nothing partial left behind
