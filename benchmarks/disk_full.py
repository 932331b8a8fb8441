"""Store writes on a really full (and a read-only) file system: every `scalemem data synthetic` and
`scalemem predict` into a 2 MiB tmpfs that holds a previous store and is then filled to the last
block must end with exit status 2 and a one-line typed error naming the path: no signal (HDF5
used to die by SIGSEGV, exit 139), no traceback, the previous store byte for byte as it was and
nothing partial left behind (issue 13, case 7; docs/reliability.md).

Each write is run twice: as is (the free-space check refuses it before HDF5 or Zarr write a
byte) and with ``os.statvfs`` faked to report plenty of room, so the write itself hits ENOSPC (a
disk filled by another process between the check and the write). Needs root for ``mount``:

    sudo python benchmarks/disk_full.py            # mounts a tmpfs under a temporary folder
    python benchmarks/disk_full.py --dir MOUNTED   # or a small file system mounted already
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the child that lies about free space: the write itself must fail, and fail cleanly
LIAR = ("import os, sys\nreal = os.statvfs\n"
        "class St:\n    def __init__(s, st): s.st = st\n"
        "    def __getattr__(s, k): return 1 << 40 if k == 'f_bavail' else getattr(s.st, k)\n"
        "os.statvfs = lambda p: St(real(p))\n"
        "from scalemem._run.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def scalemem(*args, lie=False, env=None):
    cmd = [sys.executable] + (["-c", LIAR] if lie else ["-m", "scalemem"]) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def digest(p: Path) -> str:
    h = hashlib.sha256()
    for f in sorted([p] if p.is_file() else p.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(p.parent).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def fill(d: Path, leave: int) -> None:
    """Write a filler file until the file system refuses another byte, then free ``leave``."""
    with open(d / "filler", "ab", buffering=0) as f:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    os.truncate(d / "filler", max(0, (d / "filler").stat().st_size - leave))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="a small file system mounted already (default: mount a 2 MiB "
                    "tmpfs)")
    a = ap.parse_args()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    work = Path(tempfile.mkdtemp(prefix="scalemem-disk-full-"))
    full, mounted = Path(a.dir) if a.dir else work / "full", False
    if not a.dir:
        full.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(full)],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"cannot mount a tmpfs ({r.stderr.strip()}); run as root or pass --dir")
            return 2
        mounted = True
    rows = ["--rows", 20000, "--key-dim", 16, "--value-dim", 32]
    ok = True
    try:
        assert scalemem("data", "synthetic", "--out", work / "syn.zarr", *rows, env=env).returncode == 0
        assert scalemem("fit", work / "syn.zarr", "--prototypes", 4, "--steps", 2, "--quiet",
                        "--out", work / "run", "--no-compile-cache", env=env).returncode == 0
        cases = {  # name -> (command, the store it replaces)
            "synthetic .h5": (["data", "synthetic", *rows], "s.h5"),
            "synthetic .zarr": (["data", "synthetic", *rows], "s.zarr"),
            "predict .h5": (["predict", work / "run", work / "syn.zarr"], "pred.h5"),
            "predict .zarr": (["predict", work / "run", work / "syn.zarr"], "pred.zarr"),
        }
        for _, out in cases.values():  # the previous stores, small
            assert scalemem("data", "synthetic", "--out", full / out, "--rows", 300, "--key-dim",
                            16, "--value-dim", 4, env=env).returncode == 0
        before = {out: digest(full / out) for _, out in cases.values()}
        # full to the last block, and 200 KiB free: the stores start but do not fit
        for leave, lie in ((0, False), (0, True), (200 << 10, False), (200 << 10, True)):
            fill(full, leave)
            st = os.statvfs(full)
            print(f"\n{full}: {st.f_blocks * st.f_frsize >> 10} KiB, {st.f_bavail * st.f_frsize}"
                  f" bytes free{'; os.statvfs faked: the writes themselves fail' if lie else ''}")
            print(f"{'case':<16} {'exit':>4}  {'kept':<5} {'clean':<5} message")
            for name, (args, out) in cases.items():
                r = scalemem(*args, "--out", full / out, "--overwrite", lie=lie, env=env)
                kept = digest(full / out) == before[out]
                left = sorted(p.name for p in full.iterdir() if p.name.startswith("."))
                last = (r.stderr.strip().splitlines() or [""])[-1]
                good = (r.returncode == 2 and kept and not left and "Traceback" not in r.stderr
                        and str(full / out) in last)
                ok &= good
                print(f"{name:<16} {r.returncode:>4}  {str(kept):<5} {str(not left):<5} "
                      f"{last[:150]}")
        if mounted:  # a read-only file system
            (full / "filler").unlink()
            subprocess.run(["mount", "-o", "remount,ro", str(full)], check=True)
            r = scalemem("data", "synthetic", *rows, "--out", full / "s.h5", "--overwrite",
                         env=env)
            last = (r.stderr.strip().splitlines() or [""])[-1]
            good = r.returncode == 2 and "read-only" in last and digest(full / "s.h5") == before[
                "s.h5"]
            ok &= good
            print(f"\nread-only file system\n{'synthetic .h5':<16} {r.returncode:>4}  "
                  f"{str(good):<11} {last[:150]}")
    finally:
        if mounted:
            subprocess.run(["umount", str(full)])
    print("\nall cases: a typed error, the previous store kept" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
