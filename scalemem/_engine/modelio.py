"""Model files without pickle: NumPy ``.npz`` archives plus JSON metadata, written atomically;
they load back bit for bit, and object arrays (pickles) are refused before anything is read
(docs/design.md, "Model files")."""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import CheckpointError
from .model import Memory

__all__ = ["save", "load", "load_with_metadata", "read_metadata", "UnsafeFileError",
           "atomic_write", "write_npz", "read_npz", "MODEL_FILE", "MODEL_FORMAT"]

MODEL_FILE = "model.npz"  # the model inside a run folder
MODEL_FORMAT = "scalemem-model"
FORMAT_VERSION = 2
_META = "__metadata__"


class UnsafeFileError(CheckpointError):
    """A model or checkpoint file that carries a pickle payload (refused, never unpickled)."""


def _fsync_dir(folder: Path) -> None:
    # platforms without directory handles, filesystems that refuse fsync on directories: skip
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, which is
    fsynced and renamed over ``path``, then the folder is fsynced. On failure ``path`` is left
    as it was and the error re-raised (``OSError`` as :class:`~scalemem.CheckpointError`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: could not be written ({type(e).__name__}: {e}); "
                                  f"the previous file, if any, is unchanged. Check the free "
                                  f"space and permissions of {path.parent}") from e
        raise
    _fsync_dir(path.parent)
    return path


def _jsonable(obj):
    """JSON-safe copy of ``obj`` (NumPy scalars and arrays become numbers and lists)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_npz(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping) -> Path:
    """Atomically write numeric ``arrays`` and JSON ``metadata`` as ``.npz``; arrays holding NaN
    or Inf are refused (:class:`~scalemem.CheckpointError`)."""
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.hasobject:
            raise CheckpointError(f"array {name!r} has dtype object; only numeric arrays are "
                                  "stored")
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = np.argwhere(~np.isfinite(a))[0]
            raise CheckpointError(f"{path}: array {name!r} holds NaN or Inf (at index "
                                  f"{tuple(int(i) for i in bad)}); refused, so a saved model or "
                                  "checkpoint is always usable. The previous file, if any, is "
                                  "unchanged")
        out[name] = a
    text = json.dumps(_jsonable(metadata), allow_nan=True)
    out[_META] = np.frombuffer(text.encode("utf-8"), np.uint8)
    return atomic_write(path, lambda f: np.savez(f, **out))


def _check_members(path: Path, zf: zipfile.ZipFile) -> None:
    """Parse every member's ``.npy`` header; refuse object dtypes (pickle payloads)."""
    for info in zf.infolist():
        name = info.filename
        if not name.endswith(".npy"):
            raise CheckpointError(f"{path}: member {name!r} is not a .npy array; not a scalemem "
                                  "file, refused")
        with zf.open(info) as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"unsupported .npy version {version}")
                _, _, dtype = read_header(f)
            except ValueError as e:
                raise CheckpointError(f"{path}: member {name!r} has no valid .npy header ({e}); "
                                      "the file is corrupted or not a scalemem file") from e
        if dtype.hasobject:
            raise UnsafeFileError(
                f"{path}: array {name[:-4]!r} has dtype {dtype} and so carries a pickle payload, "
                "which could run arbitrary code when loaded; refused without loading it. "
                "scalemem never writes object arrays: only load files you wrote with scalemem, "
                "or re-create this one")


def read_npz(path: str | os.PathLike, expect: str | None = None) -> tuple[dict, dict]:
    """``(arrays, metadata)`` of a scalemem ``.npz`` whose ``format`` is ``expect``, never
    unpickling; :class:`~scalemem.CheckpointError` for a missing, corrupted or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode PROTO
        raise UnsafeFileError(f"{path}: is a pickle file, which could run arbitrary code when "
                              "loaded; refused without loading it. scalemem files are .npz "
                              "archives without pickles")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: not an .npz archive ({e}); the file is corrupted or is "
                              "not a scalemem model/checkpoint (pickles are never loaded)") from e
    with zf:
        _check_members(path, zf)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e}); the file is "
                              "corrupted") from e
    raw = arrays.pop(_META, None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path}: no scalemem metadata; not a scalemem model or checkpoint")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path}: its metadata is not valid JSON ({e}); the file is "
                              "corrupted") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its metadata is not a JSON object")
    if expect is not None and meta.get("format") != expect:
        raise CheckpointError(f"{path}: is a {meta.get('format')!r} file, expected {expect!r}")
    return arrays, meta


def _model_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        m = p / MODEL_FILE
        if not m.is_file():
            hint = (f"; the fit has not finished: continue it with `scalemem fit --resume {p}`"
                    if (p / "checkpoints").is_dir() else "")
            raise CheckpointError(f"{p}: run folder without {MODEL_FILE}{hint}")
        return m
    return p


def save(memory: Memory, path: str | os.PathLike, metadata: Mapping | None = None) -> Path:
    """Save ``memory`` with JSON ``metadata`` (provenance) as a pickle-free ``.npz``, atomically,
    to ``path`` or a run folder's ``model.npz``; returns the file's path."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    meta = {**dict(metadata or {}), "format": MODEL_FORMAT, "version": FORMAT_VERSION,
            "key_scale": memory.key_scale, "value_scale": memory.value_scale,
            "dtype": str(np.dtype(memory.K.dtype))}
    arrays = {"K": memory.K, "V": memory.V}
    if memory.bias is not None:
        arrays["bias"] = memory.bias
    return write_npz(p, arrays, meta)


def _scale(meta: Mapping, name: str, p: Path):
    # version 1 recorded the scales only for CLI runs, in the fingerprint
    v = (meta.get("fingerprint") or {}).get(name) if meta.get("version") == 1 else meta.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                          or not np.isfinite(v) or v == 0):
        raise CheckpointError(f"{p}: {name} {v!r} is not a finite non-zero number; the file is "
                              "corrupted")
    return None if v is None else float(v)


def load_with_metadata(path) -> tuple[Memory, dict]:
    """``(memory, metadata)`` of a model file or run folder."""
    p = _model_path(path)
    arrays, meta = read_npz(p, MODEL_FORMAT)
    if meta.get("version") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{p}: model format version {meta.get('version')!r}; this "
                              f"scalemem reads versions 1 and {FORMAT_VERSION}: upgrade "
                              "scalemem, or refit the model")
    try:
        K, V = arrays["K"], arrays["V"]
    except KeyError as e:
        raise CheckpointError(f"{p}: model file without array {e.args[0]!r}") from e
    bias = arrays.get("bias")
    if K.ndim != 2 or V.ndim != 2 or K.shape[0] != V.shape[0] or (
            bias is not None and bias.shape != (K.shape[0],)):
        raise CheckpointError(f"{p}: K has shape {K.shape}, V {V.shape}"
                              f"{'' if bias is None else f', bias {bias.shape}'}; expected "
                              "(P, m), (P, n) and (P,)")
    if any(a.dtype.kind != "f" for a in (K, V) + (() if bias is None else (bias,))):
        raise CheckpointError(f"{p}: K ({K.dtype}) and V ({V.dtype}) must be floating point")
    scales = {k: _scale(meta, k, p) for k in ("key_scale", "value_scale")}
    with jax.enable_x64(np.float64 in (K.dtype, V.dtype)):
        memory = Memory(K=jnp.asarray(K), V=jnp.asarray(V),
                        bias=None if bias is None else jnp.asarray(bias), **scales)
    return memory, meta


def load(path: str | os.PathLike) -> Memory:
    """The :class:`~scalemem.Memory` saved by :func:`save` or ``scalemem fit`` (a ``.npz`` file or a
    run folder); its predictions equal the saved model's bit for bit. Files carrying a pickle
    payload are refused (:class:`~scalemem.CheckpointError`) without being unpickled."""
    return load_with_metadata(path)[0]


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a model file or run folder (views, settings, data, metrics)."""
    return read_npz(_model_path(path), MODEL_FORMAT)[1]
