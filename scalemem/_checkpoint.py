"""Checkpoints of a fit: everything needed to continue it bit for bit, without pickle.

A checkpoint is ``RUN/checkpoints/step-000123.npz`` (written by :mod:`scalemem._modelio`: an
``.npz`` with JSON metadata, written atomically and read without ever unpickling) holding

* ``K`` after ``step`` completed steps;
* the optimiser state, flattened to its array leaves ``opt_000``, ``opt_001``, … plus a text
  description of the pytree structure (``str(treedef)``, e.g.
  ``PyTreeDef((CustomNode(namedtuple[ScaleByAdamState], [*, *, *]), …))``). To restore it the
  optimiser is rebuilt from the config, ``optimizer.init(K)`` gives the structure, and the
  saved leaves are put into it after checking that the description, the number, shapes and
  dtypes of the leaves all match: no code is ever loaded from the file;
* ``loss``/``rmse``: the history at ``K_0 … K_{step-1}``;
* metadata: the step, the elapsed seconds, the resolved config and the data fingerprint.

Only the last ``keep`` checkpoints (default 3) are kept. :func:`check_compatible` refuses a
checkpoint made with another config or other data, naming the field that differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ._errors import CheckpointError
from ._modelio import UnsafeFileError, read_npz, write_npz

__all__ = ["Checkpoint", "CheckpointManager", "data_fingerprint", "check_compatible",
           "restore_opt_state", "CHECKPOINT_FORMAT", "TRAJECTORY_FIELDS"]

CHECKPOINT_FORMAT = "scalemem-checkpoint"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^step-(\d+)\.npz$")

# Config fields that determine the trajectory K_0, K_1, …: a checkpoint is only resumed under the
# same values. (``steps`` may grow on resume: the path up to a step does not depend on it.)
TRAJECTORY_FIELDS = ("keys", "values", "rows", "values_are_labels", "classes", "prototypes",
                     "optimizer", "lr", "ridge", "chunk_rows", "chunks_per_block", "seed", "dtype")
# Fingerprint fields that are not compared: the store may be moved or copied.
_UNCHECKED_FINGERPRINT = ("source",)


# ----------------------------------------------------------------------------------------------
# data fingerprint


def data_fingerprint(source, *, block_rows: int = 64, blocks: int = 3) -> dict:
    """A cheap description of the data a fit reads: the source's name, shape, dtypes, views and
    row range, plus a BLAKE2b hash of ``blocks`` row blocks of ``block_rows`` rows spread evenly
    from the first row to the last (keys and values as read, i.e. before scaling)."""
    rows = int(source.rows)
    h = hashlib.blake2b(digest_size=16)
    n = min(block_rows, rows)
    starts = sorted({int(round(i * (rows - n) / max(blocks - 1, 1))) for i in range(blocks)})
    for s in starts:
        Q, X = source.read(s, s + n)
        for a in (Q, X):
            a = np.ascontiguousarray(a)
            h.update(f"{s}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
    return {
        "source": str(source.name),
        "keys": getattr(source, "key_view", None),
        "values": getattr(source, "value_view", None),
        "rows": rows,
        "row_offset": int(getattr(source, "row_offset", 0) or 0),
        "key_dim": int(source.key_dim),
        "value_dim": int(source.value_dim),
        "key_dtype": np.dtype(source.key_dtype).str,
        "value_dtype": np.dtype(source.value_dtype).str,
        "key_scale": source.key_scale,
        "value_scale": source.value_scale,
        "content_hash": h.hexdigest(),
        "hashed_rows": [[s, s + n] for s in starts],
    }


def check_compatible(meta: Mapping, config: Mapping, fingerprint: Mapping, where) -> None:
    """Raise :class:`~scalemem.CheckpointError` (with ``field`` set) when the checkpoint ``meta``
    was made with another trajectory-determining config value or with other data."""
    saved_cfg = meta.get("config") or {}
    for field in TRAJECTORY_FIELDS:
        a, b = saved_cfg.get(field), config.get(field)
        if a != b:
            _refuse(where, "config", field, a, b,
                    f"resume with {field} = {a!r}, or start a new run (a new --out folder)")
    saved_fp = meta.get("fingerprint") or {}
    # the shape fields first, the content hash last (it differs whenever anything else does)
    for field in list(saved_fp) + [f for f in fingerprint if f not in saved_fp]:
        if field in _UNCHECKED_FINGERPRINT:
            continue
        a, b = saved_fp.get(field), fingerprint.get(field)
        if isinstance(a, list) or isinstance(b, list):
            a, b = _lists(a), _lists(b)
        if a != b:
            _refuse(where, "data", field, a, b, "resume on the data the run was started with, "
                    "or start a new run (a new --out folder)")


def _lists(x):
    return [_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _refuse(where, kind, field, saved, now, todo):
    e = CheckpointError(f"{where}: the checkpoint was made with {kind} field {field!r} = "
                        f"{saved!r}, this fit has {now!r}; {todo}")
    e.field = field
    e.kind = kind
    raise e


# ----------------------------------------------------------------------------------------------
# checkpoints


@dataclasses.dataclass
class Checkpoint:
    path: Path
    step: int
    K: np.ndarray
    opt_leaves: list[np.ndarray]
    loss: list[float]
    rmse: list[float]
    meta: dict


def _describe_tree(opt_state) -> tuple[str, list[np.ndarray]]:
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(opt_state)
    return str(treedef), [np.asarray(x) for x in leaves]


def restore_opt_state(ckpt: Checkpoint, template):
    """Put the checkpoint's optimiser leaves into the structure of ``template`` (the state of a
    freshly initialised optimiser of the same config), checking structure, shapes and dtypes."""
    import jax
    import jax.numpy as jnp

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
    """Writes and finds the checkpoints of a run folder (``folder`` is ``RUN/checkpoints``).

    ``save(state, meta)`` writes ``step-NNNNNN.npz`` atomically and then deletes all but the
    newest ``keep``; ``latest()`` loads the newest readable checkpoint (a torn or corrupted file
    is skipped with a warning; an unsafe one is refused)."""

    def __init__(self, folder: str | os.PathLike, keep: int = 3):
        if int(keep) < 1:
            raise CheckpointError(f"keep={keep}: at least one checkpoint must be kept")
        self.folder = Path(folder)
        self.keep = int(keep)
        self.last_saved: int | None = None

    def paths(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of the checkpoints present, oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for p in self.folder.iterdir():
            m = _NAME_RE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, state, meta: Mapping[str, Any]) -> Path:
        """Write a checkpoint of ``state`` (a :class:`scalemem._fit.LoopState`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        treedef, leaves = _describe_tree(state.opt_state)
        arrays = {"K": np.asarray(state.K), "loss": np.asarray(state.loss, np.float64),
                  "rmse": np.asarray(state.rmse, np.float64)}
        for i, leaf in enumerate(leaves):
            arrays[f"opt_{i:03d}"] = leaf
        full = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, **dict(meta),
                "step": int(state.step), "opt_treedef": treedef,
                "opt_leaves": [{"shape": list(a.shape), "dtype": a.dtype.str} for a in leaves]}
        path = write_npz(self.folder / f"step-{int(state.step):06d}.npz", arrays, full)
        self.last_saved = int(state.step)
        self._prune()
        return path

    def _prune(self) -> None:
        for _, p in self.paths()[:-self.keep]:
            try:
                p.unlink()
            except OSError:  # pragma: no cover - a vanished file is fine
                pass
        for p in self.folder.glob(".step-*.npz.tmp-*"):  # left by a killed writer
            if not p.name.endswith(f".tmp-{os.getpid()}"):
                try:
                    p.unlink()
                except OSError:  # pragma: no cover
                    pass

    @staticmethod
    def load(path: str | os.PathLike) -> Checkpoint:
        path = Path(path)
        arrays, meta = read_npz(path, CHECKPOINT_FORMAT)
        try:
            n = len(meta["opt_leaves"])
            step = int(meta["step"])
            leaves = [arrays[f"opt_{i:03d}"] for i in range(n)]
            K, loss, rmse = arrays["K"], arrays["loss"], arrays["rmse"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: incomplete checkpoint (missing {e}); it cannot be "
                                  "resumed") from e
        if len(loss) != step or len(rmse) != step:
            raise CheckpointError(f"{path}: history of {len(loss)} losses for step {step}; the "
                                  "checkpoint is inconsistent")
        return Checkpoint(path, step, K, leaves, [float(x) for x in loss],
                          [float(x) for x in rmse], meta)

    def latest(self) -> Checkpoint | None:
        """The newest loadable checkpoint, or ``None`` when there is none."""
        for _, p in reversed(self.paths()):
            try:
                return self.load(p)
            except UnsafeFileError:
                raise
            except CheckpointError as e:
                warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
        return None
