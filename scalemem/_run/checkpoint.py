"""Checkpoints of a fit, ``RUN/checkpoints/step-NNNNNN.npz``: everything needed to continue it
bit for bit, without pickle; :func:`check_compatible` refuses a checkpoint of other settings or
other data, naming the field (docs/design.md, "Checkpoints")."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .._config import DataConfig, FitConfig
from .._engine.modelio import UnsafeFileError, read_npz, write_npz
from .._errors import CheckpointError

__all__ = ["Checkpoint", "CheckpointManager", "data_fingerprint", "check_compatible",
           "restore_opt_state", "CHECKPOINT_FORMAT", "TRAJECTORY_FIELDS"]

CHECKPOINT_FORMAT = "scalemem-checkpoint"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^step-(\d+)\.npz$")

# Config fields that determine the trajectory K_0, K_1, …: a checkpoint is only resumed under the
# same values (the fields marked ``trajectory`` in scalemem._config). ``steps`` may grow on
# resume (the path up to a step does not depend on it) unless a schedule decays over the steps.
TRAJECTORY_FIELDS = tuple(f.name for c in (DataConfig, FitConfig) for f in dataclasses.fields(c)
                          if f.metadata["trajectory"])


def data_fingerprint(source, *, block_rows: int = 1 << 16, hashed_rows=None, poll=None) -> dict:
    """What identifies the data a fit reads: the source's name, shape, dtypes, views and row
    range, and a hash of every row (keys and values as read, before scaling): the CRC-32 of
    each block of ``block_rows`` rows (zlib, ~3 GB/s), all of them hashed with BLAKE2b. Any
    changed byte changes ``content_hash`` (docs/design.md, "Data identity"). ``hashed_rows``
    (the ``[[start, stop], …]`` of a fingerprint of scalemem ≤ 0.2, which hashed 3 × 64 rows)
    gives that older fingerprint instead, to compare with a checkpoint of that version.
    ``poll()`` is called before each block (it may raise to stop the pass)."""
    import zlib

    rows = int(source.rows)
    h = hashlib.blake2b(digest_size=16)
    if hashed_rows is not None:
        hashed_rows = [[int(s), int(e)] for s, e in hashed_rows]
        for s, e in hashed_rows:
            for a in map(np.ascontiguousarray, source.read(s, e)):  # keys, then values
                h.update(f"{s}:{a.dtype.str}:{a.shape}".encode() + a.tobytes())
    for s in range(0, rows, block_rows) if hashed_rows is None else ():
        if poll is not None:
            poll()
        crc = 0
        for a in source.read(s, min(s + block_rows, rows)):  # keys, then values
            a = np.ascontiguousarray(a)
            crc = zlib.crc32(a, zlib.crc32(f"{a.dtype.str}{a.shape}".encode(), crc))
        h.update(f"{s}:{crc:08x};".encode())
    return dict(source=str(source.name), keys=getattr(source, "key_view", None),
                values=getattr(source, "value_view", None), rows=rows,
                row_offset=int(getattr(source, "row_offset", 0) or 0), key_dim=int(source.key_dim),
                value_dim=int(source.value_dim), key_dtype=np.dtype(source.key_dtype).str,
                value_dtype=np.dtype(source.value_dtype).str, key_scale=source.key_scale,
                value_scale=source.value_scale, content_hash=h.hexdigest(),
                hashed_rows="all" if hashed_rows is None else hashed_rows)


def check_compatible(meta: Mapping, config: Mapping, fingerprint: Mapping, where) -> None:
    """Raise :class:`~scalemem.CheckpointError` (with ``field`` set) when the checkpoint ``meta``
    was made with another trajectory-determining config value or with other data."""
    saved_cfg = meta.get("config") or {}
    if "lr" in saved_cfg and "learning_rate" not in saved_cfg:
        raise CheckpointError(f"{where}: written by scalemem 0.1, whose settings had other "
                              "names; its model loads (`scalemem eval` works), but the fit "
                              "cannot be continued: start a new run (a new --out folder)")
    for field in TRAJECTORY_FIELDS + (("steps",) if config.get("schedule") != "constant" else ()):
        a, b = saved_cfg.get(field), config.get(field)
        if a != b:
            _refuse(where, "config", field, a, b,
                    f"resume with {field} = {a!r}, or start a new run (a new --out folder)")
    saved_fp = meta.get("fingerprint") or {}
    # the shape fields first, the content hash last (it differs whenever anything else does)
    for field in list(saved_fp) + [f for f in fingerprint if f not in saved_fp]:
        if field == "source":  # not compared: the store may be moved or copied
            continue
        a, b = saved_fp.get(field), fingerprint.get(field)
        if a != b:
            _refuse(where, "data", field, a, b, "resume on the data the run was started with, "
                    "or start a new run (a new --out folder)")


def _refuse(where, kind, field, saved, now, todo):
    e = CheckpointError(f"{where}: the checkpoint was made with {kind} field {field!r} = "
                        f"{saved!r}, this fit has {now!r}; {todo}")
    e.field = field
    raise e


@dataclasses.dataclass
class Checkpoint:
    path: Path
    step: int
    K: np.ndarray
    opt_leaves: list[np.ndarray]
    loss: list[float]
    rmse: list[float]
    meta: dict
    K_best: np.ndarray | None = None  # with validation: the keys of the best evaluation

    @property
    def validation(self) -> dict | None:
        """The validation state to resume (history, best step, evaluations since, best keys)."""
        v = self.meta.get("validation")
        return None if v is None else {**v, "best_K": self.K_best}


def restore_opt_state(ckpt: Checkpoint, template):
    """Put the checkpoint's optimiser leaves into the structure of ``template`` (the state of a
    freshly initialised optimiser of the same config), checking structure, shapes and dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten(template)
    saved = ckpt.meta.get("opt_treedef")
    if saved != str(treedef):
        raise CheckpointError(f"{ckpt.path}: the optimiser state has structure {saved!r}, this "
                              f"fit's optimiser has {str(treedef)!r}; resume with the optimiser "
                              "the run was started with")
    if len(leaves) != len(ckpt.opt_leaves):
        raise CheckpointError(f"{ckpt.path}: {len(ckpt.opt_leaves)} optimiser arrays, expected "
                              f"{len(leaves)}")
    out = []
    for i, (want, got) in enumerate(zip(leaves, ckpt.opt_leaves)):
        if tuple(want.shape) != got.shape or np.dtype(want.dtype) != got.dtype:
            raise CheckpointError(f"{ckpt.path}: optimiser array {i} is {got.dtype}{got.shape}, "
                                  f"expected {np.dtype(want.dtype)}{tuple(want.shape)}")
        out.append(jnp.asarray(got, dtype=got.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


class CheckpointManager:
    """Writes and finds the checkpoints of a run folder (``folder`` is ``RUN/checkpoints``):
    ``save(state, meta)`` writes ``step-NNNNNN.npz`` atomically and then deletes all but the
    newest ``keep``; ``latest()`` loads the newest readable checkpoint (a torn or corrupted file
    is skipped with a warning; an unsafe one is refused)."""

    def __init__(self, folder: str | os.PathLike, keep: int = 3):
        if int(keep) < 1:
            raise CheckpointError(f"keep={keep}: at least one checkpoint must be kept")
        self.folder, self.keep = Path(folder), int(keep)
        self.last_saved: int | None = None
        self.skipped: list[tuple[Path, str]] = []  # by the last latest()

    def paths(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of the checkpoints present, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.folder.iterdir()
                      if (m := _NAME_RE.match(p.name)) and p.is_file())

    def save(self, state, meta: Mapping[str, Any]) -> Path:
        """Write a checkpoint of ``state`` (a :class:`scalemem._engine.LoopState`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        leaves, treedef = jax.tree_util.tree_flatten(state.opt_state)
        leaves = [np.asarray(x) for x in leaves]
        arrays = {"K": np.asarray(state.K), "loss": np.asarray(state.loss, np.float64),
                  "rmse": np.asarray(state.rmse, np.float64),
                  **{f"opt_{i:03d}": leaf for i, leaf in enumerate(leaves)}}
        val = getattr(state, "validation", None)
        if val is not None:
            if val["best_K"] is not None:
                arrays["K_best"] = np.asarray(val["best_K"])
            meta = {**dict(meta), "validation": {k: v for k, v in val.items() if k != "best_K"}}
        full = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, **dict(meta),
                "step": int(state.step), "opt_treedef": str(treedef),
                "opt_leaves": [{"shape": list(a.shape), "dtype": a.dtype.str} for a in leaves]}
        path = write_npz(self.folder / f"step-{int(state.step):06d}.npz", arrays, full)
        self.last_saved = int(state.step)
        self._prune()
        return path

    def _prune(self) -> None:
        stale = [p for _, p in self.paths()[:-self.keep]] + [  # and files of a killed writer
            p for p in self.folder.glob(".step-*.npz.tmp-*")
            if not p.name.endswith(f".tmp-{os.getpid()}")]
        for p in stale:
            with contextlib.suppress(OSError):  # a vanished file is fine
                p.unlink()

    @staticmethod
    def load(path: str | os.PathLike) -> Checkpoint:
        """The checkpoint at ``path``; :class:`~scalemem.CheckpointError` for any damaged,
        inconsistent or unsafe file (its arrays are checked against its metadata before they
        are read)."""
        path = Path(path)
        arrays, meta = read_npz(path, CHECKPOINT_FORMAT, lambda m, h: _check_arrays(path, m, h))
        leaves = [arrays[f"opt_{i:03d}"] for i in range(len(meta["opt_leaves"]))]
        return Checkpoint(path, meta["step"], arrays["K"], leaves,
                          [float(x) for x in arrays["loss"]], [float(x) for x in arrays["rmse"]],
                          meta, arrays.get("K_best"))

    def latest(self, warn: bool = True) -> Checkpoint | None:
        """The newest loadable checkpoint, or ``None`` when there is none. Damaged ones are
        skipped (with a warning if ``warn``) and listed in ``skipped`` (``(path, reason)``,
        newest first); one carrying a pickle payload is refused (:class:`UnsafeFileError`)."""
        self.skipped = []
        for step, p in reversed(self.paths()):
            try:
                ckpt = self.load(p)
                if ckpt.step != step:  # renamed or copied: its name would order it wrongly
                    raise CheckpointError(f"{p}: named step {step} but holds step {ckpt.step}")
                return ckpt
            except UnsafeFileError:
                raise
            except CheckpointError as e:
                self.skipped.append((p, str(e)))
                if warn:
                    warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
        return None


def _check_arrays(path: Path, meta: dict, heads: dict) -> None:
    """Refuse a checkpoint whose arrays (names, shapes, dtypes) do not match its metadata."""
    step, leaves, treedef = meta.get("step"), meta.get("opt_leaves"), meta.get("opt_treedef")
    try:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise TypeError(f"step {step!r}")
        if not isinstance(treedef, str):
            raise TypeError(f"opt_treedef {treedef!r}")
        want = {"loss": ((step,), np.dtype(np.float64)), "rmse": ((step,), np.dtype(np.float64)),
                **{f"opt_{i:03d}": (tuple(leaf["shape"]), np.dtype(leaf["dtype"]))
                   for i, leaf in enumerate(leaves)}}
        if not all(isinstance(n, int) and n >= 0 for shape, _ in want.values() for n in shape):
            raise TypeError("opt_leaves shapes")
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: incomplete checkpoint metadata ({e}); it cannot be "
                              "resumed") from e
    val = meta.get("validation")
    if val is not None:
        ok = (isinstance(val, dict) and isinstance(val.get("history"), list)
              and isinstance(val.get("bad"), int) and all(
                  isinstance(h, dict) and isinstance(h.get("step"), int)
                  and isinstance(h.get("rmse"), float) for h in val["history"])
              and (val.get("best_step") is None) == (not val["history"]))
        if not ok:
            raise CheckpointError(f"{path}: malformed validation state {val!r}; it cannot be "
                                  "resumed")
    got = {n: h for n, h in heads.items() if n not in ("K", "K_best")}
    if val is not None and val["best_step"] is not None and heads.get("K_best") != heads.get("K"):
        raise CheckpointError(f"{path}: its best validated keys are {heads.get('K_best')}, its "
                              f"keys {heads.get('K')}; the checkpoint is inconsistent")
    if "K" not in heads or got != want:
        raise CheckpointError(f"{path}: holds arrays {heads}, its metadata says K and {want}; "
                              "the checkpoint is inconsistent and cannot be resumed")
    shape, dtype = heads["K"]
    if len(shape) != 2 or dtype.kind != "f":
        raise CheckpointError(f"{path}: K is {dtype}{shape}, not a floating-point matrix")
