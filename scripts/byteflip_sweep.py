"""Flip every byte of a checkpoint and of a model file, one position at a time, and load each
damaged copy: it must give the same numbers (bit for bit) or a CheckpointError; anything else
(another exception, other numbers) is a failure and the exit status is 1.

    python scripts/byteflip_sweep.py                      # files of a tiny fit, made here
    python scripts/byteflip_sweep.py --checkpoint RUN/checkpoints/step-000003.npz \\
        --model RUN/model.npz --xor 0x01
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def numbers(kind: str, path: Path) -> list[np.ndarray]:
    """The arrays a load of ``path`` gives (a model's K, V, bias; a checkpoint's everything)."""
    from scalemem import load
    from scalemem._run.checkpoint import CheckpointManager

    if kind == "model":
        m = load(path)
        return [np.asarray(a) for a in (m.K, m.V, m.bias) if a is not None] + [
            np.array([m.key_scale or 0.0, m.value_scale or 0.0])]
    c = CheckpointManager.load(path)
    return [np.asarray(c.step), c.K, *c.opt_leaves, np.asarray(c.loss), np.asarray(c.rmse)]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape
                                    and x.tobytes() == y.tobytes() for x, y in zip(a, b))


def sweep(kind: str, path: Path, positions, xor: int = 0xFF, scratch: Path | None = None):
    """``(Counter of outcomes, {outcome: first position}, slowest load in seconds)``."""
    from scalemem import CheckpointError

    data, ref = path.read_bytes(), numbers(kind, path)
    scratch = Path(scratch or tempfile.mkdtemp(prefix="byteflip-"))
    target = scratch / path.name  # checkpoints are found by name: keep it
    counts, first, slowest = collections.Counter(), {}, 0.0
    for i in positions:
        bad = bytearray(data)
        bad[i] ^= xor
        target.write_bytes(bad)
        t0 = time.perf_counter()
        try:
            outcome = "same numbers" if same(numbers(kind, target), ref) else "OTHER NUMBERS"
        except CheckpointError:
            outcome = "CheckpointError"
        except Exception as e:  # what the sweep looks for
            outcome = f"{type(e).__name__}: {e}"[:160]
        slowest = max(slowest, time.perf_counter() - t0)
        counts[outcome] += 1
        first.setdefault(outcome, i)
    return counts, first, slowest


def tiny_fit(folder: Path) -> tuple[Path, Path]:
    """A 3-step fit (P = 4) on a small synthetic store: ``(newest checkpoint, model)``."""
    from scalemem._data import write_synthetic
    from scalemem._run import cli

    store = write_synthetic(folder / "s.zarr", 2000, key_dim=6, value_dim=5, seed=0)
    run = folder / "run"
    rc = cli.main(["fit", str(store), "--prototypes", "4", "--steps", "3", "--checkpoint-every",
                   "1", "--quiet", "--no-compile-cache", "--out", str(run)])
    if rc != 0:
        sys.exit(f"the tiny fit failed (exit status {rc})")
    return sorted((run / "checkpoints").glob("step-*.npz"))[-1], run / "model.npz"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="a checkpoint file (default: a tiny fit's)")
    ap.add_argument("--model", type=Path, help="a model file (default: a tiny fit's)")
    ap.add_argument("--xor", type=lambda s: int(s, 0), default=0xFF,
                    help="the byte at each position is XORed with this (default 0xFF)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="byteflip-"))
    ckpt, model = args.checkpoint, args.model
    if ckpt is None or model is None:
        made = tiny_fit(work)
        ckpt, model = ckpt or made[0], model or made[1]
    bad = 0
    for kind, path in (("checkpoint", ckpt), ("model", model)):
        n = path.stat().st_size
        counts, first, slowest = sweep(kind, path, range(n), args.xor, work)
        print(f"{kind} {path} ({n} bytes, xor {args.xor:#04x}), slowest load {slowest:.3f} s:")
        for outcome, c in counts.most_common():
            print(f"  {c:6d}  {outcome}   (first at byte {first[outcome]})")
            bad += c if outcome not in ("same numbers", "CheckpointError") else 0
    print("FAIL: outcomes other than the same numbers or CheckpointError" if bad else "OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
