"""Model and checkpoint files you can trust (issue 13, cases 4, 8 and 10): a damaged or crafted
file is a CheckpointError naming it (never a raw exception, never other numbers), is refused
before anything large is inflated, and `fit --resume` falls back past a damaged checkpoint.

The files come from a 3-step fit (P = 4) on a small synthetic store, fitted in this process; the
crafted archives are written byte by byte by :func:`_zip`."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import scalemem
from scalemem import CheckpointError
from scalemem._data import write_synthetic
from scalemem._run import cli
from scalemem._run.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("byteflip_sweep",
                                               REPO / "scripts" / "byteflip_sweep.py")
sweep_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep_script)

# the seed recipe has a constant schedule: a run may be resumed with more steps
FIT = ["--prototypes", "4", "--recipe", "seed", "--learning-rate", "0.02", "--checkpoint-every",
       "1", "--quiet", "--no-compile-cache"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("files-data") / "s.zarr", 2000, key_dim=6,
                           value_dim=5, seed=0)


@pytest.fixture(scope="module")
def tiny_run(store, tmp_path_factory) -> Path:
    """A finished 3-step run: checkpoints after steps 1, 2 and 3, and model.npz."""
    run = tmp_path_factory.mktemp("files-run") / "run"
    assert cli.main(["fit", str(store), *FIT, "--steps", "3", "--out", str(run)]) == 0
    return run


# ---- single-byte flips (case 4) -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["checkpoint", "model"])
def test_every_sampled_byte_flip_gives_the_same_numbers_or_a_checkpoint_error(tiny_run, kind,
                                                                             tmp_path):
    path = (sorted((tiny_run / "checkpoints").glob("step-*.npz"))[-1] if kind == "checkpoint"
            else tiny_run / "model.npz")
    size = path.stat().st_size
    # 200 distinct positions, seeded, plus the first and last bytes (zip headers and directory)
    rng = np.random.default_rng(20261204)
    positions = sorted({0, 30, size - 1, *rng.choice(size, 200, replace=False).tolist()})
    counts, first, slowest = sweep_script.sweep(kind, path, positions, 0xFF, tmp_path)
    assert set(counts) <= {"same numbers", "CheckpointError"}, (counts, first)
    assert counts["CheckpointError"] > 0
    # each load reads a file of a few kB in milliseconds; 10 s only catches a hang or an
    # unbounded inflate, even on a slow, loaded 2-core machine
    assert slowest < 10, slowest


# ---- crafted archives (case 8) ------------------------------------------------------------------


def _npy(a: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array(f, a, allow_pickle=False)
    return f.getvalue()


def _npy_header(shape: tuple, descr: str = "<f4") -> bytes:
    """A .npy (1.0) header declaring ``shape`` (no data)."""
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    pad = 64 - (10 + len(text) + 1) % 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text) + pad + 1) + text + b" " * pad + b"\n"


def _zip(members: list[dict]) -> bytes:
    """A zip archive of ``members`` (name, data as stored; optional method, flags, size (the
    declared uncompressed size, zip64 when ≥ 4 GiB) and crc)."""
    out, central = b"", b""
    for m in members:
        data, method, flags = m["data"], m.get("method", 0), m.get("flags", 0)
        size, crc = m.get("size", len(data)), m.get("crc", zlib.crc32(data))
        name = m["name"].encode()
        big = size >= 0xFFFFFFFF
        sizes = (0xFFFFFFFF, 0xFFFFFFFF) if big else (len(data), size)
        extra = struct.pack("<HHQQ", 1, 16, size, len(data)) if big else b""
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45, flags, method, 0, 33,
                               crc, *sizes, len(name), len(extra), 0, 0, 0, 0, len(out))
        central += name + extra
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, flags, method, 0, 33, crc, *sizes,
                           len(name), 0) + name + data
    n = len(members)
    return out + central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(central),
                                       len(out), 0)


def _model_members(K=None, V=None, **meta) -> list[dict]:
    """The stored members of a valid model file (K 2×3, V 2×4), with ``meta`` added."""
    K = np.ones((2, 3), np.float32) if K is None else K
    V = np.ones((2, 4), np.float32) if V is None else V
    text = json.dumps({"format": "scalemem-model", "version": 2, **meta}).encode()
    return [{"name": "K.npy", "data": _npy(K)}, {"name": "V.npy", "data": _npy(V)},
            {"name": "__metadata__.npy", "data": _npy(np.frombuffer(text, np.uint8))}]


def _deflate(chunks) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as in zip members
    return b"".join(c.compress(x) for x in chunks) + c.flush()


def _load_bounded(path: Path) -> tuple[BaseException | None, int]:
    """``(error, peak bytes allocated)`` of ``scalemem.load(path)``."""
    tracemalloc.start()
    try:
        scalemem.load(path)
        err = None
    except Exception as e:  # the test asserts on what it is
        err = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return err, peak


def test_deflate_bombs_are_refused_without_inflating_them(tmp_path):
    """A K member inflating to 128 MiB (from ~130 kB): declared honestly, it is refused before
    anything is inflated; a member declaring 2×3 floats whose stream goes on for 128 MiB (a
    lying header) is inflated no further than declared, and its CRC-32 refuses it."""
    n = 32 << 20  # float32 zeros: 128 MiB
    body = [_npy_header((n,))] + [bytes(1 << 20)] * 128
    deflated, crc = _deflate(body), zlib.crc32(b"".join(body))
    honest = _model_members()
    honest[0] = {"name": "K.npy", "data": deflated, "method": 8, "crc": crc,
                 "size": sum(map(len, body))}
    small = _npy(np.ones((2, 3), np.float32))
    lying_body = [small] + [bytes(1 << 20)] * 128
    lying = _model_members()
    lying[0] = {"name": "K.npy", "data": _deflate(lying_body), "method": 8,
                "crc": zlib.crc32(b"".join(lying_body)), "size": len(small)}
    for name, members in (("honest", honest), ("lying", lying)):
        path = tmp_path / f"{name}.npz"
        path.write_bytes(_zip(members))
        err, peak = _load_bounded(path)
        assert isinstance(err, CheckpointError) and str(path) in str(err), (name, err)
        # 128 MiB would be allocated by inflating the member; 16 MiB is room for the zip
        # reader's buffers and the small arrays, far below it
        assert peak < 16 << 20, (name, peak)
    assert "declare" in str(_load_bounded(tmp_path / "honest.npz")[0])


def test_a_member_declaring_73_tib_is_refused(tmp_path):
    n = 73 * 2 ** 38  # float32: 73 TiB
    head = _npy_header((n,))
    members = _model_members()
    members[0] = {"name": "K.npy", "data": _deflate([head, bytes(1024)]), "method": 8,
                  "size": len(head) + 4 * n}
    path = tmp_path / "huge.npz"
    path.write_bytes(_zip(members))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="declare") as e:
        scalemem.load(path)
    assert str(path) in str(e.value)
    assert time.perf_counter() - t0 < 10  # refused from the header: nothing is inflated


@pytest.mark.parametrize("change, says", [({"flags": 1}, "encrypted"),
                                          ({"method": 99}, "compression method 99")])
def test_encrypted_and_unknown_compression_members_are_refused(tmp_path, change, says, capsys):
    members = _model_members()
    members[1].update(change)
    path = tmp_path / "model.npz"
    path.write_bytes(_zip(members))
    with pytest.raises(CheckpointError, match=says):
        scalemem.load(path)
    assert cli.main(["eval", str(path), "--quiet"]) == 2
    assert says in capsys.readouterr().err


def test_metadata_of_the_wrong_type_is_refused(tmp_path, capsys):
    path = tmp_path / "model.npz"
    path.write_bytes(_zip(_model_members(config=7)))
    with pytest.raises(CheckpointError, match="'config' is int 7"):
        scalemem.load(path)
    assert cli.main(["eval", str(path), "--quiet"]) == 2
    assert "'config' is int 7" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("prototypes", "8"), ("ridge", [1]),
                                          ("values_are_labels", "yes"), ("store", 5)])
def test_settings_of_the_wrong_type_in_a_model_are_refused(tmp_path, field, value, capsys):
    path = tmp_path / "model.npz"
    path.write_bytes(_zip(_model_members(config={field: value})))
    with pytest.raises(CheckpointError, match=f"config field {field}="):
        scalemem.load(path)
    assert cli.main(["eval", str(path), "--quiet"]) == 2
    assert f"config field {field}=" in capsys.readouterr().err


def test_big_endian_arrays_in_a_model_load_in_native_byte_order(tmp_path):
    """A model whose arrays another tool wrote big-endian predicts like its native copy."""
    rng = np.random.default_rng(0)
    K, V = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)
    native, swapped = tmp_path / "native.npz", tmp_path / "big.npz"
    native.write_bytes(_zip(_model_members(K, V)))
    swapped.write_bytes(_zip(_model_members(K.astype(">f4"), V.astype(">f4"))))
    a, b = scalemem.load(native), scalemem.load(swapped)
    assert np.asarray(b.K).dtype == np.float32 and np.asarray(b.K).dtype.isnative
    q = rng.normal(size=(7, 5)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(b.predict(q)), np.asarray(a.predict(q)))


def test_a_folder_named_like_a_model_file_is_never_written_into(tmp_path):
    folder = tmp_path / "model.npz"
    folder.mkdir()
    memory = scalemem.Memory(jnp.ones((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(CheckpointError, match="is a folder, not a model file"):
        scalemem.save(memory, folder)
    assert not any(folder.iterdir())


# ---- NaN and empty models (case 10) -------------------------------------------------------------


def test_an_empty_model_is_refused_on_save(tmp_path):
    empty = scalemem.Memory(jnp.ones((0, 3)), jnp.ones((0, 4)))
    with pytest.raises(CheckpointError, match="no prototypes"):
        scalemem.save(empty, tmp_path / "model.npz")
    assert not any(tmp_path.iterdir())  # nothing written, no temporary file left


@pytest.mark.parametrize("what", ["nan V", "inf K", "nan bias", "no prototypes"])
def test_nan_and_empty_model_files_are_refused_on_load(tmp_path, what, capsys):
    K, V = np.ones((2, 3), np.float32), np.ones((2, 4), np.float32)
    members = _model_members(K, V)
    if what == "nan V":
        V[1, 2] = np.nan
    elif what == "inf K":
        K[0, 0] = -np.inf
    elif what == "nan bias":
        members.append({"name": "bias.npy", "data": _npy(np.array([0, np.nan], np.float32))})
    else:
        K, V = K[:0], V[:0]
    members[:2] = _model_members(K, V)[:2]
    path = tmp_path / "model.npz"
    path.write_bytes(_zip(members))
    with pytest.raises(CheckpointError, match="NaN or Inf|no prototypes") as e:
        scalemem.load(path)
    assert str(path) in str(e.value)
    assert cli.main(["eval", str(path), "--quiet"]) == 2
    capsys.readouterr()


# ---- resume past a damaged checkpoint (case 4) --------------------------------------------------


def test_resume_falls_back_past_a_damaged_checkpoint_bit_identically(store, tmp_path):
    """A 4-step run (checkpoints 2–4 kept) whose newest checkpoint has one flipped byte (in the
    first member's name, which zipfile checks while opening it) is continued to 6 steps by
    `fit --resume`: from step 3, saying so, ending bit-identical to an uninterrupted 6-step fit."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli.main(["fit", str(store), *FIT, "--steps", "6", "--out", str(ref)]) == 0
    assert cli.main(["fit", str(store), *FIT, "--steps", "4", "--out", str(run)]) == 0
    newest = run / "checkpoints" / "step-000004.npz"
    data = bytearray(newest.read_bytes())
    data[30] ^= 0xFF  # the first byte of the first local header's file name
    newest.write_bytes(data)

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "scalemem", "fit", "--resume", str(run),
                           "--steps", "6", "--json"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["resumed_from"] == 3
    assert "step-000004.npz" in done.stderr and "from step 3 (step-000003.npz)" in done.stderr
    a, b = scalemem.load(ref), scalemem.load(run)
    np.testing.assert_array_equal(np.asarray(b.K), np.asarray(a.K))  # bit-identical, not close
    np.testing.assert_array_equal(np.asarray(b.V), np.asarray(a.V))
    ma, mb = scalemem.read_metadata(ref), scalemem.read_metadata(run)
    assert mb["metrics"]["loss"] == ma["metrics"]["loss"]


def test_latest_lists_the_checkpoints_it_skipped(tiny_run, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for p in (tiny_run / "checkpoints").glob("step-*.npz"):
        (folder / p.name).write_bytes(p.read_bytes())
    newest = sorted(folder.glob("step-*.npz"))[-1]
    newest.write_bytes(newest.read_bytes()[:30] + b"\xff" + newest.read_bytes()[31:])
    mgr = CheckpointManager(folder)
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        ck = mgr.latest()
    assert ck.step == int(newest.stem[5:]) - 1 and [p for p, _ in mgr.skipped] == [newest]
    assert str(newest) in mgr.skipped[0][1]
