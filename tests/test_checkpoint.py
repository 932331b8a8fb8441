"""Checkpoints, exact resume, refusals and clean stops of ``scalemem fit``.

The subprocess tests run ``python -m scalemem fit`` on a small synthetic store (2572 fit rows,
6 key and 5 value columns, P = 8, the seed recipe for 60 steps at lr 0.02, a checkpoint after
every step). They share a JAX persistent compilation cache in a temporary folder
(``SCALEMEM_CACHE_DIR``), so only the first process pays for the XLA compiles; the in-process
fits pass ``--no-compile-cache``. Nothing is written to the user's cache.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scalemem
from scalemem import CheckpointError, read_metadata
from scalemem._data import write_synthetic
from scalemem._engine import LoopState
from scalemem._run import cli
from scalemem._run.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[1]
STEPS = 60
# the seed recipe (0.01·normal keys, constant Adam) with the steps and lr given: a constant
# schedule, so the path up to a step does not depend on the number of steps
FIT = ["--rows", "fit", "--prototypes", "8", "--recipe", "seed", "--steps", str(STEPS),
       "--learning-rate", "0.02", "--chunk-rows", "4096", "--checkpoint-every", "1", "--quiet"]
# in-process fits: never write to the user's compile cache
NO_CACHE = "--no-compile-cache"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt-data")
    return write_synthetic(d / "s.zarr", 3000, key_dim=6, value_dim=5, seed=0)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("xla-cache")
    # the CLI's compile cache (SCALEMEM_CACHE_DIR) in a temporary folder shared by the processes
    e = dict(os.environ, JAX_PLATFORMS="cpu", SCALEMEM_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
    return e


def _scalemem(*args) -> list[str]:
    return [sys.executable, "-m", "scalemem", *map(str, args)]


def _metrics(run: Path) -> list[dict]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return []
    return [json.loads(x) for x in lines if x.endswith("\n")]


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    """Poll the metrics file until it reports ``step`` (or the process ends)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        m = _metrics(run)
        if m and m[-1]["step"] >= step:
            return
        time.sleep(0.003)


def _kill_chain(store, flags, run: Path, targets, env) -> list[int]:
    """A fit of ``flags`` into ``run`` SIGKILLed once it has logged each of ``targets`` (the
    first started fresh, the others by ``fit --resume``); the last step logged before each kill."""
    killed_at: list[int] = []
    for i, target in enumerate(targets):
        cmd = (_scalemem("fit", store, *flags, "--out", run) if i == 0
               else _scalemem("fit", "--resume", run, "--quiet"))
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        # lines up to the previous kill may still be in the file: wait for a newer step
        _wait_for_step(proc, run, max([target] + [k + 1 for k in killed_at]))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()
        assert not (run / "model.npz").exists(), f"the fit finished before the kill at {target}"
        killed_at.append(_metrics(run)[-1]["step"])  # the last step logged before it died
    return killed_at


def test_sigkill_at_five_random_steps_then_resume_is_bit_identical(store, env, tmp_path):
    """Five SIGKILLs at random steps, then a SIGTERM (a clean stop: exit status 143, a
    checkpoint, the resume command on stderr), each followed by `fit --resume`: K, V and the
    loss history end bit-identical to an uninterrupted fit."""
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    # the uninterrupted fit runs beside the interrupted chain
    ref = subprocess.Popen(_scalemem("fit", store, *FIT, "--out", ref_run), env=env)
    rng = np.random.default_rng(20261127)
    # 5 distinct steps, at least 15 steps before the end so every kill lands inside the fit
    targets = sorted(rng.choice(np.arange(2, STEPS - 15), size=5, replace=False).tolist())
    killed_at = _kill_chain(store, FIT, run, targets, env)
    assert len(set(killed_at)) == 5 and killed_at[-1] < STEPS - 4, killed_at

    # SIGTERM: the handler sets a flag, the loop writes a checkpoint and stops
    proc = subprocess.Popen(_scalemem("fit", "--resume", run, "--json"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run, killed_at[-1] + 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    stop = json.loads(out)
    assert stop["interrupted"] and stop["signal"] == "SIGTERM" and stop["step"] < STEPS
    assert f"Continue with: scalemem fit --resume {run}" in err
    ck = CheckpointManager(run / "checkpoints").latest()
    assert ck.step == stop["step"] and Path(stop["checkpoint"]) == ck.path

    done = subprocess.run(_scalemem("fit", "--resume", run, "--quiet", "--json"), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["resumed_from"] == stop["step"]
    assert ref.wait() == 0

    a, b = scalemem.load(ref_run), scalemem.load(run)
    np.testing.assert_array_equal(np.asarray(b.K), np.asarray(a.K))  # bit-identical, not close
    np.testing.assert_array_equal(np.asarray(b.V), np.asarray(a.V))
    ma, mb = read_metadata(ref_run), read_metadata(run)
    assert mb["metrics"]["loss"] == ma["metrics"]["loss"]  # the whole history, exactly
    # every step logged exactly once, with the documented fields
    recs = _metrics(run)
    assert [r["step"] for r in recs] == list(range(STEPS + 1))  # K_0 … K_STEPS
    assert set(recs[0]) == {"step", "loss", "rmse", "seconds", "rows_per_s", "passes"}
    assert [r["loss"] for r in recs] == [r["loss"] for r in _metrics(ref_run)]
    # only the newest 3 checkpoints are kept; no temporary file is left behind
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 3 and all(p.startswith("step-") for p in ckpts), ckpts
    assert json.loads((run / "config.json").read_text())["steps"] == STEPS


def test_lbfgs_sigkill_then_resume_is_bit_identical(store, env, tmp_path):
    """L-BFGS (its memory of key and gradient differences is in the checkpoint; the statistics
    of the accepted trial, kept between steps, are recomputed after a resume): two SIGKILLs at
    random steps, each followed by `fit --resume`, end bit-identical to an uninterrupted fit."""
    steps = 30
    flags = ["--rows", "fit", "--prototypes", "8", "--optimizer", "lbfgs", "--steps", str(steps),
             "--chunk-rows", "4096", "--checkpoint-every", "1", "--quiet"]
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    ref = subprocess.Popen(_scalemem("fit", store, *flags, "--out", ref_run), env=env)
    rng = np.random.default_rng(20261205)
    targets = sorted(rng.choice(np.arange(3, steps - 10), size=2, replace=False).tolist())
    _kill_chain(store, flags, run, targets, env)
    done = subprocess.run(_scalemem("fit", "--resume", run, "--quiet"), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert ref.wait() == 0
    a, b = scalemem.load(ref_run), scalemem.load(run)
    np.testing.assert_array_equal(np.asarray(b.K), np.asarray(a.K))
    np.testing.assert_array_equal(np.asarray(b.V), np.asarray(a.V))
    assert read_metadata(run)["metrics"]["loss"] == read_metadata(ref_run)["metrics"]["loss"]
    assert json.loads((run / "config.json").read_text())["optimizer"] == "lbfgs"
    assert [r["step"] for r in _metrics(run)] == list(range(steps + 1))
    # passes count over the sessions: never backwards (a resume pays a pass more)
    passes = [r["passes"] for r in _metrics(run)]
    assert passes == sorted(passes) and passes[-1] >= _metrics(ref_run)[-1]["passes"], passes


@pytest.fixture(scope="module")
def short_run(store, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints after steps 1, 2, 3 (fitted in this process;
    the Adam recipe, so a cosine schedule over its 4 steps)."""
    run = tmp_path_factory.mktemp("short") / "run"
    assert cli.main(["fit", str(store), "--rows", "fit", "--prototypes", "4", "--steps", "4",
                     "--recipe", "adam",
                     "--checkpoint-every", "1", "--quiet", "--out", str(run), NO_CACHE]) == 0
    assert json.loads((run / "config.json").read_text())["schedule"] == "cosine"
    return run


@pytest.mark.parametrize("flags, field", [
    (["--learning-rate", "0.5"], "learning_rate"),
    (["--prototypes", "5"], "prototypes"),
    (["--ridge", "1e-3"], "ridge"),
    (["--rows", "0:2000"], "rows"),
    # a cosine schedule decays over the steps: the path depends on their number
    (["--steps", "6"], "steps"),
])
def test_resume_refuses_a_checkpoint_of_another_config(short_run, flags, field, capsys):
    from scalemem._run.runs import fit_run

    ns = cli.build_parser().parse_args(["fit", "--resume", str(short_run), *flags])
    given = {k: v for k, v in vars(ns).items() if not k.startswith("_")}
    cfg = cli.resolve(ns._command, given)
    with pytest.raises(CheckpointError) as e:
        fit_run(cfg, resume=True, say=lambda *a: None, progress=False)
    assert e.value.field == field
    assert repr(field) in str(e.value) and "new run" in str(e.value)
    # the command line says the same, exit status 2
    assert cli.main(["fit", "--resume", str(short_run), *flags, "--quiet"]) == 2
    assert f"'{field}'" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_other_data(short_run, tmp_path, capsys):
    # same shape, dtype and views, other numbers: only the content hash tells them apart
    other = write_synthetic(tmp_path / "other.zarr", 3000, key_dim=6, value_dim=5, seed=1)
    rc = cli.main(["fit", str(other), "--resume", str(short_run), "--quiet", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 2 and out["error"] == "CheckpointError"
    assert out["field"] == "content_hash" and "data field 'content_hash'" in out["message"]
    # more rows in the store: the row count differs
    bigger = write_synthetic(tmp_path / "bigger.zarr", 3500, key_dim=6, value_dim=5, seed=0)
    assert cli.main(["fit", str(bigger), "--resume", str(short_run), "--quiet", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["field"] == "rows"


class _Payload:
    """Unpickling this creates ``marker`` (builtins.open, so nothing of this module is needed)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payloads_are_refused_without_running_them(short_run, tmp_path, capsys):
    # the payload is live: unpickling it does create the marker
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()

    marker = tmp_path / "PWNED"
    meta = np.frombuffer(json.dumps({"format": "scalemem-model", "version": 2}).encode(),
                         np.uint8)
    evil = np.array([_Payload(marker)], dtype=object)
    model = tmp_path / "model.npz"
    np.savez(model, K=evil, V=np.zeros((1, 1)), __metadata__=meta)
    with pytest.raises(CheckpointError, match="pickle"):
        scalemem.load(model)
    assert cli.main(["eval", str(model), "--quiet"]) == 2
    assert "pickle" in capsys.readouterr().err

    # a checkpoint carrying the payload: `fit --resume` refuses it
    ckpt = short_run / "checkpoints" / "step-000099.npz"
    np.savez(ckpt, K=evil, loss=np.zeros(99), rmse=np.zeros(99), __metadata__=meta)
    try:
        assert cli.main(["fit", "--resume", str(short_run), "--quiet"]) == 2
        assert "pickle" in capsys.readouterr().err
    finally:
        ckpt.unlink()

    # a bare pickle named like a model file
    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="pickle"):
        scalemem.load(raw)
    assert not marker.exists()  # nothing was unpickled


def _state(step: int) -> LoopState:
    K = jnp.full((3, 2), float(step), jnp.float32)
    opt = optax.adam(1e-2)
    return LoopState(step, K, opt.init(K), [1.0] * step, [0.5] * step)


@pytest.mark.parametrize("broken", ["replace", "fsync"])
def test_failed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch, broken):
    mgr = CheckpointManager(tmp_path / "checkpoints")
    mgr.save(_state(1), {"config": {}, "fingerprint": {}})

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, broken, fail)
    with pytest.raises(CheckpointError, match="could not be written"):
        mgr.save(_state(2), {"config": {}, "fingerprint": {}})
    monkeypatch.undo()
    latest = mgr.latest()
    assert latest.step == 1
    np.testing.assert_array_equal(latest.K, np.ones((3, 2), np.float32))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001.npz"]


def test_sigint_writes_a_checkpoint_and_says_how_to_resume(store, short_run, tmp_path, capsys):
    """In-process (the handler only sets a flag; the loop checkpoints and stops)."""
    run = tmp_path / "run"

    finished = threading.Event()

    def interrupt():
        while not finished.wait(0.005):
            m = _metrics(run)
            if m and m[-1]["step"] >= 2:
                os.kill(os.getpid(), signal.SIGINT)
                return

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    try:
        rc = cli.main(["fit", str(store), "--rows", "fit", "--prototypes", "4", "--steps",
                       "100000", "--out", str(run), "--quiet", NO_CACHE])
    finally:
        finished.set()  # never signal this process after the fit has returned
        t.join()
    assert rc == 130
    err = capsys.readouterr().err
    assert "SIGINT received" in err and f"scalemem fit --resume {run}" in err
    assert CheckpointManager(run / "checkpoints").latest().step >= 3


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_the_first_step_stops_at_once(store, tmp_path, capsys, monkeypatch, sig):
    """A signal during the initial keys (here: raised inside k-means) stops the fit there, with
    nothing to checkpoint, instead of waiting for the first step; the run then starts again by
    ``--resume``."""
    from scalemem._engine import init

    run = tmp_path / "run"
    calls = []
    kmeans = init.kmeans_pp

    def signalled(*args, **kwargs):
        calls.append(1)
        os.kill(os.getpid(), sig)
        return kmeans(*args, **kwargs)

    monkeypatch.setattr(init, "kmeans_pp", signalled)
    flags = ["--rows", "fit", "--prototypes", "4", "--steps", "3", "--quiet", NO_CACHE]
    rc = cli.main(["fit", str(store), *flags, "--out", str(run)])
    assert calls and rc == 128 + sig
    err = capsys.readouterr().err
    assert (f"{signal.Signals(sig).name} received before the first step" in err
            and f"scalemem fit --resume {run}" in err), err
    assert not (run / "metrics.jsonl").is_file() or not _metrics(run)
    assert CheckpointManager(run / "checkpoints").latest(warn=False) is None
    monkeypatch.setattr(init, "kmeans_pp", kmeans)
    assert cli.main(["fit", "--resume", str(run), "--quiet", NO_CACHE]) == 0
    assert (run / "model.npz").is_file()


def test_a_signal_during_the_data_check_stops_with_a_message(store, tmp_path, capsys,
                                                             monkeypatch):
    """SIGINT while the data are checked (before the run folder holds anything): the fit stops
    there with a message and, under --json, a JSON object; nothing is written."""
    from scalemem._run import runs

    fingerprint = runs.data_fingerprint

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return fingerprint(*args, **kwargs)

    monkeypatch.setattr(runs, "data_fingerprint", signalled)
    run = tmp_path / "run"
    rc = cli.main(["fit", str(store), "--rows", "fit", "--prototypes", "4", "--steps", "3",
                   "--out", str(run), "--json", "--quiet", NO_CACHE])
    assert rc == 130
    cap = capsys.readouterr()
    assert ("SIGINT received before the first step (the data check), nothing was written: run "
            "the same command again") in cap.err
    out = json.loads(cap.out)
    assert out["interrupted"] and out["signal"] == "SIGINT" and out["step"] is None
    assert not (run / "config.json").exists()
