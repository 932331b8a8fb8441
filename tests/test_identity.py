"""Data identity, damaged sources and full disks (issue 13, cases 5, 6, 7 and 12): a store
rewritten under a running fit stops it; a resume on changed rows is refused wherever the rows
changed; an HDF5 virtual dataset whose source is gone is an error, not zeros; a full disk or a
read-only location is a typed error that keeps the previous store."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest
import zarr

import scalemem
from scalemem import DataError
from scalemem._data import open_source, write_synthetic
from scalemem._run import cli
from scalemem._run.checkpoint import CheckpointManager

NO_CACHE = "--no-compile-cache"  # in-process fits: never write to the user's compile cache


# ---- case 5: the store is replaced while a streamed fit reads it --------------------------------


def _streamed_fit(path, callback=None):
    """A short streamed fit of ``path`` (8 blocks a pass); the states it checkpoints."""
    states = []
    with open_source(path) as src:
        scalemem.fit_source(src, 4, steps=6, recipe="seed", residency="streamed", chunk_rows=512,
                            chunks_per_block=1, callback=callback, checkpoint=states.append,
                            checkpoint_every=1)
    return states


@pytest.mark.parametrize("change", ["store replaced", "last rows changed in place"])
def test_data_changed_during_a_streamed_fit_stops_it(tmp_path, change):
    path = write_synthetic(tmp_path / "live.zarr", 4000, key_dim=8, value_dim=16, seed=0,
                           chunk_rows=1000)
    ref = _streamed_fit(shutil.copytree(path, tmp_path / "copy.zarr"))

    def rewrite(report):
        if report.step != 1:
            return
        if change == "store replaced":  # `scalemem data synthetic --out live.zarr --seed 5 …`
            write_synthetic(path, 4000, key_dim=8, value_dim=16, seed=5, chunk_rows=1000,
                            overwrite=True)
        else:  # the rows of the last block only
            values = zarr.open_array(str(path / "values"), mode="r+")
            values[-10:] = 255 - values[-10:]

    states = []
    with open_source(path) as src, pytest.raises(DataError) as e:
        scalemem.fit_source(src, 4, steps=6, recipe="seed", residency="streamed", chunk_rows=512,
                            chunks_per_block=1, callback=rewrite, checkpoint=states.append,
                            checkpoint_every=1)
    msg = str(e.value)
    # a replaced store is seen before its rows are read (its zarr.json is another file); rows
    # changed in place when the block's CRC-32 differs from the first pass's
    says = ("replaced or changed while it was open (reading rows 0:" if change == "store replaced"
            else ":4000 changed while they were being read")
    assert msg.startswith(f"{path}: ") and says in msg, msg
    # every checkpoint written is one of the fit on the original data, bit for bit: none comes
    # from a step that read the new rows
    assert states and len(states) < len(ref)
    for s in states:
        np.testing.assert_array_equal(np.asarray(s.K), np.asarray(ref[s.step - 1].K))


def test_a_small_hdf5_file_edited_in_place_during_a_streamed_fit_stops_it(tmp_path):
    """h5py's caches hold a small file whole, so the edit never reaches a re-read block: the
    file's size and modification time, checked before every read, catch it."""
    path = write_synthetic(tmp_path / "live.h5", 4000, key_dim=8, value_dim=16, seed=0,
                           format="hdf5")

    def edit(report):
        if report.step == 1:  # another process (this one's HDF5 library has the file open)
            subprocess.run([sys.executable, "-c", "import h5py, sys\n"
                            "with h5py.File(sys.argv[1], 'r+', locking=False) as f:\n"
                            "    f['values'][100:101] = 255 - f['values'][100:101]\n",
                            str(path)], check=True, timeout=120)

    with open_source(path) as src, pytest.raises(DataError, match="replaced or changed while"):
        scalemem.fit_source(src, 4, steps=6, recipe="seed", residency="streamed",
                            chunk_rows=512, chunks_per_block=1, callback=edit)


def test_store_replaced_with_another_layout_is_named_so(tmp_path):
    path = write_synthetic(tmp_path / "live.zarr", 4000, key_dim=8, value_dim=16, chunk_rows=1000)
    with open_source(path) as src:
        src.read(0, 10)  # the arrays' metadata (chunks of 1000 rows) is read now
        write_synthetic(path, 4000, key_dim=8, value_dim=16, seed=5, overwrite=True)  # 1 chunk
        with pytest.raises(DataError, match="replaced or changed while it was open"):
            src.read(0, 4000)


# ---- case 6: rows changed between an interrupted fit and its resume -----------------------------


def _metric_lines(run) -> int:
    m = run / "metrics.jsonl"
    return len(m.read_text().splitlines()) if m.exists() else 0


def _fit_until_step(run, argv, step: int) -> int:
    """``cli.main(argv)``, stopped by SIGINT (in this process) once ``run``'s metrics log step
    ``step``: a fit that should have been refused ends in 130 instead of running on."""
    finished = threading.Event()

    def interrupt():
        while not finished.wait(0.005):
            if _metric_lines(run) > step:
                os.kill(os.getpid(), signal.SIGINT)
                return

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    try:
        return cli.main(argv)
    finally:
        finished.set()  # never signal this process after the fit has returned
        t.join()


@pytest.mark.parametrize("flags", [["--residency", "resident"],
                                   ["--residency", "streamed", "--chunk-rows", "2048"]])
def test_resume_refuses_rows_changed_anywhere(tmp_path, flags, capsys):
    # 20000 rows: the fingerprint used to hash rows 0:64, 8540:8604 and 17079:17143 of the 17143
    # fit rows only, so a change to rows 1000:1010 went unnoticed
    store = write_synthetic(tmp_path / "syn.zarr", 20000, key_dim=16, value_dim=32)
    run = tmp_path / "run"
    assert _fit_until_step(run, ["fit", str(store), "--rows", "fit", "--prototypes", "4",
                                 "--recipe", "seed", "--steps", "100000", "--out", str(run),
                                 "--quiet", NO_CACHE, *flags], 2) == 130
    assert CheckpointManager(run / "checkpoints").latest() is not None
    values = zarr.open_array(str(store / "values"), mode="r+")
    values[1000:1010] = 255 - values[1000:1010]
    capsys.readouterr()
    rc = _fit_until_step(run, ["fit", "--resume", str(run), "--quiet", "--json", NO_CACHE],
                         _metric_lines(run) + 1)
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert rc == 2 and out["error"] == "CheckpointError", out
    assert out["field"] == "content_hash" and "'content_hash'" in out["message"]


def test_fingerprint_of_an_older_checkpoint_can_still_be_compared(tmp_path):
    """Checkpoints of scalemem ≤ 0.2 hashed 3 × 64 rows (their ``hashed_rows``): given those,
    ``data_fingerprint`` gives that fingerprint, so such a run can still be resumed."""
    import hashlib

    from scalemem._run.checkpoint import data_fingerprint

    store = write_synthetic(tmp_path / "s.zarr", 3000, key_dim=4, value_dim=6)
    with open_source(store) as src:
        h = hashlib.blake2b(digest_size=16)  # the former hash, spelled out
        for s in (0, 1468, 2936):
            for a in map(np.ascontiguousarray, src.read(s, s + 64)):
                h.update(f"{s}:{a.dtype.str}:{a.shape}".encode() + a.tobytes())
        rows = [[0, 64], [1468, 1532], [2936, 3000]]
        old = data_fingerprint(src, hashed_rows=rows)
        assert old["content_hash"] == h.hexdigest() and old["hashed_rows"] == rows
        assert data_fingerprint(src)["content_hash"] != h.hexdigest()


# ---- case 12: an HDF5 virtual dataset whose source is missing ----------------------------------


def _virtual_store(d):
    """``v.h5``: arrays ``keys`` and ``values``, virtual datasets mapping ``src.h5``."""
    rng = np.random.default_rng(0)
    with h5py.File(d / "src.h5", "w") as f:
        f["k"], f["v"] = rng.random((100, 3)), rng.random((100, 2)) + 1
    with h5py.File(d / "v.h5", "w") as f:
        for name, src, cols in (("keys", "k", 3), ("values", "v", 2)):
            lay = h5py.VirtualLayout(shape=(100, cols), dtype="f8")
            lay[:] = h5py.VirtualSource("src.h5", src, shape=(100, cols))
            f.create_virtual_dataset(name, lay, fillvalue=0)
    return d / "v.h5"


@pytest.mark.parametrize("damage", ["file gone", "dataset gone", "dataset shorter"])
def test_virtual_dataset_with_a_missing_source_is_an_error(tmp_path, damage):
    path = _virtual_store(tmp_path)
    with open_source(path, keys="keys", values="values") as src:  # intact: reads the source
        assert src.read(0, 100)[1].min() >= 1
    if damage == "file gone":
        (tmp_path / "src.h5").unlink()
    else:
        with h5py.File(tmp_path / "src.h5", "a") as f:
            del f["v"]
            if damage == "dataset shorter":
                f["v"] = np.ones((50, 2))
    with pytest.raises(DataError) as e:
        open_source(path, keys="keys", values="values")
    msg = str(e.value)
    array, dataset = ("keys", "k") if damage == "file gone" else ("values", "v")  # the first hit
    assert f"array {array!r}" in msg and f"dataset {dataset!r}" in msg and "'src.h5'" in msg
    assert "fill value" in msg
    assert {"file gone": "missing", "dataset gone": "no dataset",
            "dataset shorter": "(50, 2)"}[damage] in msg


# ---- case 7: full disk or read-only location while writing a store ----------------------------


def _fake_statvfs(monkeypatch, free: int, flag: int = 0):
    real = os.statvfs

    def statvfs(p):
        st = real(p)
        n = free // st.f_frsize
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, n, n, st.f_files,
                                  st.f_ffree, st.f_favail, flag, st.f_namemax))

    monkeypatch.setattr(os, "statvfs", statvfs)


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _read(path):
    with open_source(path) as s:
        return s.read(0, s.rows)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("how", ["no free space", "write fails", "read-only", "cannot create"])
def test_full_disk_or_read_only_location_keeps_the_store(tmp_path, monkeypatch, fmt, how):
    path = write_synthetic(tmp_path / f"s.{fmt}", 3000, key_dim=4, value_dim=6, format=fmt)
    before = _read(path)
    if how == "no free space":  # 40 KiB free: less than one 2.3 KiB chunk plus the 64 KiB slack
        _fake_statvfs(monkeypatch, 40 << 10)
    elif how == "read-only":
        _fake_statvfs(monkeypatch, 1 << 40, os.ST_RDONLY)
    elif how == "write fails":
        monkeypatch.setattr(zarr.Array if fmt == "zarr" else h5py.Dataset, "__setitem__", _enospc)
    else:
        opener = zarr.open_group if fmt == "zarr" else h5py.File

        def denied(*a, **k):  # creating fails; reading (the check of the old store) works
            if (a[1:2] or [k.get("mode", "r")])[0] == "r":
                return opener(*a, **k)
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(zarr, "open_group", denied) if fmt == "zarr" else monkeypatch.setattr(
            h5py, "File", denied)
    with pytest.raises(DataError) as e:
        write_synthetic(path, 3000, key_dim=4, value_dim=6, format=fmt, seed=1, overwrite=True)
    monkeypatch.undo()
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "left as it was" in msg
    assert isinstance(e.value, OSError) and e.value.errno == {
        "no free space": errno.ENOSPC, "write fails": errno.ENOSPC, "read-only": errno.EROFS,
        "cannot create": errno.EACCES}[how]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing partial left
    for a, b in zip(_read(path), before):
        np.testing.assert_array_equal(a, b)
