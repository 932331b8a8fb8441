"""Model files without pickle: NumPy ``.npz`` archives plus JSON metadata, written atomically;
they load back bit for bit, and object arrays (pickles) are refused before anything is read
(docs/design.md, "Model files")."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .._config import DataConfig, FitConfig, RunConfig, check_fields
from .._errors import CheckpointError, ConfigError
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


def _digest(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (C order)."""
    h = hashlib.sha256(f"{a.dtype.str}{tuple(a.shape)}".encode())
    h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return h.hexdigest()


def write_npz(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping) -> Path:
    """Atomically write numeric ``arrays`` and JSON ``metadata`` (plus the arrays' SHA-256
    ``digests``) as ``.npz``; arrays holding NaN or Inf are refused
    (:class:`~scalemem.CheckpointError`)."""
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
    meta = {**_jsonable(metadata), "digests": {k: _digest(a) for k, a in out.items()}}
    out[_META] = np.frombuffer(json.dumps(meta, allow_nan=True).encode("utf-8"), np.uint8)
    return atomic_write(path, lambda f: np.savez(f, **out))


# Reading is bounded: every member's declared size is checked before anything is inflated.
# A stored member is backed by its bytes on disk; all members together may declare at most
# max(_SMALL, _RATIO × the file's size) (scalemem writes stored members; floats deflate < 2×).
_SMALL, _RATIO = 64 << 20, 16
_HEAD = 1 << 16  # bytes read to parse a .npy header (numpy's own limit is 10,000)
_CHUNK = 16 << 20
# what a damaged archive raises from zipfile, zlib, numpy's header parser and json
_DAMAGED = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError,
            RuntimeError, SyntaxError, tokenize.TokenError, ValueError, KeyError, IndexError,
            TypeError, AttributeError, OverflowError, struct.error, zlib.error)
# metadata fields read elsewhere, and the types they must have
_META_TYPES = {"config": dict, "fingerprint": dict, "result": dict, "metrics": dict,
               "digests": dict, "store": (str, type(None)), "key_view": (str, type(None)),
               "value_view": (str, type(None))}


def _members(path: Path, zf: zipfile.ZipFile, disk: int) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by array name, after checking names, flags, methods and sizes."""
    out, total = {}, 0
    for info in zf.infolist():
        name, what = info.filename, None
        if not name.endswith(".npy") or name[:-4] in out:
            what = "is not a .npy array" if name[:-4] not in out else "appears twice"
        elif info.flag_bits & 0x1:
            what = "is encrypted"
        elif info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            what = f"uses compression method {info.compress_type} (only stored and deflate)"
        elif info.header_offset + info.compress_size > disk or (
                info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size):
            what = (f"declares {info.compress_size} stored bytes at offset {info.header_offset} "
                    f"of a {disk}-byte file")
        if what:
            raise CheckpointError(f"{path}: member {name!r} {what}; the file is damaged or not "
                                  "a scalemem model/checkpoint, refused")
        total += info.file_size
        out[name[:-4]] = info
    if total > max(_SMALL, _RATIO * disk):
        raise CheckpointError(f"{path}: its members declare {total} bytes once inflated, from a "
                              f"{disk}-byte file; refused before inflating them (a damaged file "
                              "or a zip bomb). scalemem writes uncompressed members: re-save "
                              "the arrays with numpy.savez, not savez_compressed")
    return out


def _header(path: Path, name: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo):
    """``(shape, fortran_order, dtype, header_bytes)`` of a member's .npy header, checked
    against the member's declared size; object dtypes (pickles) are refused."""
    with zf.open(info) as f:
        head = io.BytesIO(f.read(min(info.file_size, _HEAD)))
    version = np.lib.format.read_magic(head)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"member {name!r}: unsupported .npy version {version}")
    shape, fortran, dtype = read(head)
    if dtype.hasobject:
        raise UnsafeFileError(
            f"{path}: array {name!r} has dtype {dtype} and so carries a pickle payload, "
            "which could run arbitrary code when loaded; refused without loading it. "
            "scalemem never writes object arrays: only load files you wrote with scalemem, "
            "or re-create this one")
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"array {name!r} has dtype {dtype}, not a number type")
    nbytes = math.prod(shape) * dtype.itemsize
    if head.tell() + nbytes != info.file_size:
        raise ValueError(f"array {name!r}: its header says {dtype}{shape} ({nbytes} bytes), "
                         f"its member holds {info.file_size - head.tell()}")
    return shape, fortran, dtype, head.tell()


def _read_array(zf: zipfile.ZipFile, info: zipfile.ZipInfo, shape, fortran, dtype, start):
    """The array, inflated chunk by chunk up to its declared size (zipfile checks the CRC-32)."""
    out = np.empty(shape[::-1] if fortran else shape, dtype)
    buf = memoryview(out.reshape(-1).view(np.uint8))
    with zf.open(info) as f:
        f.read(start)
        pos = 0
        while pos < len(buf):
            chunk = f.read(min(_CHUNK, len(buf) - pos))
            if not chunk:
                raise EOFError(f"member {info.filename!r} ends early")
            buf[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        if f.read(1):
            raise ValueError(f"member {info.filename!r} is longer than its header says")
    return out.T if fortran else out


def _check_meta(path: Path, raw: np.ndarray, expect: str | None) -> dict:
    meta = json.loads(raw.tobytes().decode("utf-8"))
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its metadata is not a JSON object")
    if expect is not None and meta.get("format") != expect:
        raise CheckpointError(f"{path}: is a {meta.get('format')!r} file, expected {expect!r}")
    for key, kind in _META_TYPES.items():
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f"{path}: metadata field {key!r} is "
                                  f"{type(meta[key]).__name__} {meta[key]!r}; the file is "
                                  "damaged or not a scalemem file")
    if isinstance(meta.get("config"), dict):  # its settings are read back (eval, resume)
        try:
            check_fields(meta["config"], DataConfig, FitConfig, RunConfig)
        except ConfigError as e:
            raise CheckpointError(f"{path}: metadata config field {e}; the file is damaged or "
                                  "not a scalemem file") from None
    return meta


def read_npz(path: str | os.PathLike, expect: str | None = None,
             check: Callable[[dict, dict], None] | None = None) -> tuple[dict, dict]:
    """``(arrays, metadata)`` of a scalemem ``.npz`` whose ``format`` is ``expect``, never
    unpickling and with bounded memory; ``check(metadata, {name: (shape, dtype)})`` may refuse
    the arrays before they are read. Any damaged, crafted or unsafe file, or one whose arrays
    hold NaN/Inf or do not match their digests, is a :class:`~scalemem.CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            if f.read(1) == b"\x80":  # pickle protocol 2+ opcode PROTO
                raise UnsafeFileError(f"{path}: is a pickle file, which could run arbitrary code "
                                      "when loaded; refused without loading it. scalemem files "
                                      "are .npz archives without pickles")
            disk = os.fstat(f.fileno()).st_size
            with zipfile.ZipFile(f) as zf:
                members = _members(path, zf, disk)
                heads = {n: _header(path, n, zf, i) for n, i in members.items()}
                if _META not in heads or heads[_META][2] != np.uint8 or len(heads[_META][0]) != 1:
                    raise CheckpointError(f"{path}: no scalemem metadata; not a scalemem model "
                                          "or checkpoint")
                meta = _check_meta(path, _read_array(zf, members[_META], *heads[_META]), expect)
                del members[_META]
                if check is not None:
                    check(meta, {n: heads[n][:3:2] for n in members})
                arrays = {n: _read_array(zf, i, *heads[n]) for n, i in members.items()}
        _verify(path, arrays, meta.get("digests"))
        # arrays written by other tools may be big-endian: computed on in native byte order
        arrays = {n: a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))
                  for n, a in arrays.items()}
    except CheckpointError:
        raise
    except _DAMAGED as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e}); the file is "
                              "damaged or is not a scalemem model/checkpoint (pickles are "
                              "never loaded)") from e
    return arrays, meta


def _verify(path: Path, arrays: dict, digests: dict | None) -> None:
    """Refuse arrays that do not match the digests written with them (files written before
    digests existed have none), and arrays holding NaN or Inf (never written)."""
    if digests is not None and set(digests) != set(arrays):
        raise CheckpointError(f"{path}: holds arrays {sorted(arrays)}, its digests name "
                              f"{sorted(digests)}; the file is damaged")
    for name, a in arrays.items():
        if digests is not None and _digest(a) != digests[name]:
            raise CheckpointError(f"{path}: array {name!r} does not match its SHA-256 digest; "
                                  "the file is damaged")
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise CheckpointError(f"{path}: array {name!r} holds NaN or Inf, which scalemem "
                                  "never writes; the file is damaged or not a scalemem file")


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
    to ``path`` or a run folder's ``model.npz``; returns the file's path. A model without
    prototypes or with NaN/Inf is refused (:class:`~scalemem.CheckpointError`: no file is
    written, the previous one is unchanged)."""
    p = Path(path)
    if p.is_dir() and p.suffix == ".npz":
        raise CheckpointError(f"{p}: is a folder, not a model file; move it away or save to "
                              "another path")
    if p.is_dir():
        p = p / MODEL_FILE
    if int(memory.K.shape[0]) < 1:
        raise CheckpointError(f"{p}: the model has no prototypes (K is {tuple(memory.K.shape)}); "
                              "refused, so a saved model is always usable. The previous file, "
                              "if any, is unchanged")
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


def _model_check(p: Path) -> Callable[[dict, dict], None]:
    """Refuse a model file's version, arrays, shapes or dtypes before its arrays are read."""
    def check(meta: dict, heads: dict) -> None:
        if meta.get("version") not in (1, FORMAT_VERSION):
            raise CheckpointError(f"{p}: model format version {meta.get('version')!r}; this "
                                  f"scalemem reads versions 1 and {FORMAT_VERSION}: upgrade "
                                  "scalemem, or refit the model")
        for name in ("K", "V"):
            if name not in heads:
                raise CheckpointError(f"{p}: model file without array {name!r}")
        (ks, kd), (vs, vd), (bs, bd) = heads["K"], heads["V"], heads.get("bias", (None, None))
        if len(ks) != 2 or len(vs) != 2 or ks[0] != vs[0] or bs not in (None, (ks[0],)):
            raise CheckpointError(f"{p}: K has shape {ks}, V {vs}"
                                  f"{'' if bs is None else f', bias {bs}'}; expected "
                                  "(P, m), (P, n) and (P,)")
        if ks[0] < 1:
            raise CheckpointError(f"{p}: the model has no prototypes (K is {ks}); refit it")
        if any(d.kind != "f" for d in (kd, vd) + (() if bd is None else (bd,))):
            raise CheckpointError(f"{p}: K ({kd}) and V ({vd}) must be floating point")
        for name in ("key_scale", "value_scale"):
            _scale(meta, name, p)
    return check


def load_with_metadata(path) -> tuple[Memory, dict]:
    """``(memory, metadata)`` of a model file or run folder."""
    p = _model_path(path)
    arrays, meta = read_npz(p, MODEL_FORMAT, _model_check(p))
    K, V, bias = arrays["K"], arrays["V"], arrays.get("bias")
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
