"""SIGKILL a checkpointing ``scalemem fit`` at random moments, then ``--resume`` it.

Each of ``--trials`` fits (``--checkpoint-every 1`` on a small synthetic store) is killed with
SIGKILL at a seeded random moment: a quarter in the first second (imports, opening the store,
creating the run folder), a quarter the moment a checkpoint is being written (its temporary file
exists), the rest uniformly over the length of an uninterrupted fit. Then ``scalemem fit --resume
RUN`` must either finish bit-identical to the uninterrupted fit (K, V, bias and the loss
history), or refuse because the folder is not a run yet (killed before config.json was written;
then a plain rerun must be bit-identical). Prints one line per trial and the counts as JSON;
exit status 0 when every trial ends bit-identical.

    python scripts/kill9_resume.py [--trials 20] [--seed 0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIT = ["--rows", "fit", "--prototypes", "8", "--recipe", "seed", "--learning-rate", "0.05",
       "--steps", "30", "--checkpoint-every", "1", "--quiet"]
NOT_YET = ("not a run folder yet", "no such run folder")


def scalemem(*args) -> list[str]:
    return [sys.executable, "-m", "scalemem", *map(str, args)]


def identical(a: Path, b: Path) -> bool:
    import scalemem as sm

    ma, mb = sm.load(a), sm.load(b)
    same = all(np.array_equal(np.asarray(x), np.asarray(y)) if x is not None else y is None
               for x, y in ((ma.K, mb.K), (ma.V, mb.V), (ma.bias, mb.bias)))
    return same and sm.read_metadata(a)["metrics"]["loss"] == sm.read_metadata(b)["metrics"]["loss"]


def kill_at(cmd, env, when: float | None, run: Path, limit: float) -> str:
    """Start ``cmd``; SIGKILL it ``when`` seconds later, or (``when`` None) as soon as a
    checkpoint's temporary file appears. Returns what happened."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, ckpts = time.monotonic(), run / "checkpoints"
    while proc.poll() is None and time.monotonic() - t0 < limit:
        if when is not None and time.monotonic() - t0 >= when:
            break
        if when is None and ckpts.is_dir() and any(p.name.startswith(".step-")
                                                   for p in os.scandir(ckpts)):
            break
        time.sleep(0.0005 if when is None else 0.002)
    if proc.poll() is not None:
        return f"finished before the kill (exit {proc.returncode})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"killed after {time.monotonic() - t0:.3f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="scalemem-kill9-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", SCALEMEM_CACHE_DIR=str(work / "cache"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    store = work / "syn.zarr"
    if not store.exists():
        subprocess.run(scalemem("data", "synthetic", "--out", store, "--rows", "3000",
                                "--key-dim", "8", "--value-dim", "16", "--quiet"),
                       env=env, check=True)
    ref = work / "ref"
    subprocess.run(scalemem("fit", store, *FIT, "--out", ref, "--overwrite"), env=env, check=True)
    t0 = time.monotonic()  # the length of a fit whose programs are in the compile cache
    subprocess.run(scalemem("fit", store, *FIT, "--out", work / "warm", "--overwrite"), env=env,
                   check=True)
    length = time.monotonic() - t0
    assert identical(ref, work / "warm"), "two uninterrupted fits differ"
    rng = np.random.default_rng(a.seed)
    quarter = max(a.trials // 4, 1)
    moments = ([float(t) for t in rng.uniform(0.0, 1.0, quarter)] + [None] * quarter
               + [float(t) for t in rng.uniform(0.0, length, a.trials - 2 * quarter)])
    counts = {"identical_after_resume": 0, "not_a_run_yet_then_rerun_identical": 0, "failed": 0}
    for i, when in enumerate(moments):
        run = work / f"run-{i:02d}"
        what = kill_at(scalemem("fit", store, *FIT, "--out", run), env, when, run, 4 * length)
        r = subprocess.run(scalemem("fit", "--resume", run, "--quiet"), env=env,
                           capture_output=True, text=True)
        if r.returncode == 0 and identical(ref, run):
            outcome = "identical_after_resume"
        elif r.returncode == 2 and any(s in r.stderr for s in NOT_YET):
            rerun = subprocess.run(scalemem("fit", store, *FIT, "--out", run), env=env,
                                   capture_output=True, text=True)
            ok = rerun.returncode == 0 and identical(ref, run)
            outcome = "not_a_run_yet_then_rerun_identical" if ok else "failed"
        else:
            outcome = "failed"
        counts[outcome] += 1
        moment = "at a checkpoint write" if when is None else f"at {when:.3f} s"
        print(f"trial {i:2d} {moment:>22}: {what}; {outcome}"
              + ("" if outcome != "failed" else f" (resume exit {r.returncode}: "
                 f"{r.stderr.strip()[-300:]})"), flush=True)
    print(json.dumps({"trials": len(moments), "seed": a.seed, "fit_seconds": round(length, 2),
                      **counts}))
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
