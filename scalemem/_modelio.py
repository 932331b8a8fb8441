"""Model files without pickle: NumPy ``.npz`` archives plus JSON metadata.

A model file is an ``.npz`` (a zip of ``.npy`` arrays) holding ``K`` (P×m), ``V`` (P×n) and
``__metadata__``, a uint8 array with the UTF-8 bytes of a JSON object (format name and version,
the resolved config, the data fingerprint, training metrics). Nothing in it is executable:

* before any array is read, every member's ``.npy`` header is parsed and a member whose dtype
  holds Python objects (the only way an ``.npy`` carries a pickle) is refused with
  :class:`~scalemem.CheckpointError`; the payload is never unpickled;
* the arrays are then read with ``numpy.load(..., allow_pickle=False)``.

Files are written atomically (:func:`atomic_write`): to a temporary file in the same folder,
flushed and fsynced, renamed over the target with ``os.replace`` and the folder fsynced, so a
crash leaves either the old file or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ._errors import CheckpointError
from ._model import Memory

__all__ = ["save", "load", "read_metadata", "UnsafeFileError", "atomic_write", "write_npz",
           "read_npz", "MODEL_FILE", "MODEL_FORMAT"]

MODEL_FILE = "model.npz"  # the model inside a run folder
MODEL_FORMAT = "scalemem-model"
FORMAT_VERSION = 1
_META = "__metadata__"




class UnsafeFileError(CheckpointError):
    """A model or checkpoint file that carries a pickle payload (refused, never unpickled)."""


# ----------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, which is
    flushed, fsynced and renamed over ``path`` (``os.replace``); then the folder is fsynced.

    If anything fails, the temporary file is removed, ``path`` is left as it was and the error
    is re-raised as :class:`~scalemem.CheckpointError` (``OSError``s) or as is.
    """
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


# ----------------------------------------------------------------------------------------------
# npz with JSON metadata, read without pickle


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
    """Atomically write ``arrays`` (numeric NumPy/JAX arrays) and ``metadata`` (JSON) as ``.npz``.
    Arrays holding NaN or Inf are refused (:class:`~scalemem.CheckpointError`)."""
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
                if version == (1, 0):
                    _, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    _, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
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
    """``(arrays, metadata)`` of a scalemem ``.npz``; never unpickles anything.

    ``expect`` is the required ``format`` of the metadata (``"scalemem-model"``, ...).
    Raises :class:`~scalemem.CheckpointError` for a missing, corrupted or unsafe file.
    """
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


# ----------------------------------------------------------------------------------------------
# models


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
    """Save ``memory`` (its ``K`` and ``V``) with JSON ``metadata`` as a pickle-free ``.npz``
    (written atomically). ``path`` may be a run folder (the file is then ``model.npz`` in it).
    Returns the file's path."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    meta = {"format": MODEL_FORMAT, "version": FORMAT_VERSION, **dict(metadata or {})}
    meta["format"], meta["version"] = MODEL_FORMAT, FORMAT_VERSION
    return write_npz(p, {"K": memory.K, "V": memory.V}, meta)


def _load(path) -> tuple[Memory, dict]:
    import jax
    import jax.numpy as jnp

    p = _model_path(path)
    arrays, meta = read_npz(p, MODEL_FORMAT)
    try:
        K, V = arrays["K"], arrays["V"]
    except KeyError as e:
        raise CheckpointError(f"{p}: model file without array {e.args[0]!r}") from e
    if K.ndim != 2 or V.ndim != 2 or K.shape[0] != V.shape[0]:
        raise CheckpointError(f"{p}: K has shape {K.shape} and V {V.shape}; expected (P, m) and "
                              "(P, n)")
    if K.dtype.kind != "f" or V.dtype.kind != "f":
        raise CheckpointError(f"{p}: K ({K.dtype}) and V ({V.dtype}) must be floating point")
    wide = np.float64 in (K.dtype, V.dtype)
    with jax.enable_x64(wide):
        return Memory(K=jnp.asarray(K), V=jnp.asarray(V)), meta


def load(path: str | os.PathLike) -> Memory:
    """Load a model saved by :func:`save` or by ``scalemem fit`` (a ``.npz`` file or a run folder).

    Returns a :class:`~scalemem.Memory` with arrays ``K`` and ``V`` and a jit-able ``predict``.
    Files carrying a pickle payload are refused with :class:`~scalemem.CheckpointError`
    without being unpickled. :func:`read_metadata` gives the file's JSON metadata.
    """
    return _load(path)[0]


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a model file or run folder (config, data fingerprint, metrics)."""
    return read_npz(_model_path(path), MODEL_FORMAT)[1]
