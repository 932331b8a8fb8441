"""Several hosts: JAX's multi-process runtime under the engine's mesh (:mod:`.mesh`). Every
process runs the same fit on the same data, checked by :func:`check_consistent`; only process 0
writes files (docs/design.md, "Several processes"; docs/distributed.md for launching)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from .._errors import ConfigError
from .._validate import check_int

__all__ = ["initialize", "is_writer", "process_index", "process_count", "barrier",
           "check_consistent", "source_fingerprint", "array_digest", "HEARTBEAT_TIMEOUT_S"]

HEARTBEAT_TIMEOUT_S = 30  # a dead process is declared dead after this long without heartbeats
SHUTDOWN_TIMEOUT_S = 30  # how long a finishing process waits for the others at shutdown


def _cluster_detected() -> str | None:
    """The launcher whose environment JAX auto-detects, when it started several tasks."""
    env = os.environ
    if all(v in env for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                              "SLURM_PROCID", "SLURM_LOCALID")):
        return "slurm" if int(env["SLURM_NTASKS"]) > 1 else None
    if "OMPI_MCA_orte_hnp_uri" in env or "OMPI_MCA_ess_base_jobid" in env:
        return "ompi" if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 else None
    return None


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(name, raw, "must be an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               local_device_ids: int | Sequence[int] | None = None,
               heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_S,
               shutdown_timeout_seconds: int = SHUTDOWN_TIMEOUT_S,
               initialization_timeout: int = 300) -> bool:
    """Join a multi-process run; call it before any other JAX computation.

    ``coordinator`` is ``"HOST:PORT"`` of process 0 (which serves the coordination service),
    ``num_processes`` the number of processes and ``process_id`` this one's index; each one left
    out comes from ``JAX_COORDINATOR_ADDRESS``, ``SCALEMEM_NUM_PROCESSES`` and
    ``SCALEMEM_PROCESS_ID``, or under SLURM (``srun``) and Open MPI (``mpirun``) from JAX's own
    auto-detection (docs/distributed.md). With nothing given and no launcher detected it
    returns False (one process), else True once connected. A process that misses heartbeats
    for ``heartbeat_timeout_seconds`` is declared dead and every other one terminated."""
    if jax.distributed.is_initialized():
        return True
    hb = check_int("heartbeat_timeout_seconds", heartbeat_timeout_seconds, 1)
    sd = check_int("shutdown_timeout_seconds", shutdown_timeout_seconds, 1)
    it = check_int("initialization_timeout", initialization_timeout, 1)
    num_processes = _env_int("SCALEMEM_NUM_PROCESSES") if num_processes is None else num_processes
    process_id = _env_int("SCALEMEM_PROCESS_ID") if process_id is None else process_id
    explicit = (coordinator is not None or num_processes is not None or process_id is not None
                or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))
    cluster = _cluster_detected()
    if not explicit and cluster is None:
        return False
    if num_processes is not None:
        num_processes = check_int("num_processes", num_processes, 1)
    if process_id is not None:
        hi = None if num_processes is None else num_processes - 1
        check_int("process_id", process_id, 0, hi)
    if cluster is None:
        missing = [n for n, v in (("coordinator", coordinator or os.environ.get(
            "JAX_COORDINATOR_ADDRESS")), ("num_processes", num_processes),
            ("process_id", process_id)) if v is None]
        if missing:
            raise ConfigError(missing[0], None, "a multi-process run outside SLURM/MPI needs "
                              "coordinator, num_processes and process_id (arguments or "
                              "JAX_COORDINATOR_ADDRESS, SCALEMEM_NUM_PROCESSES, "
                              "SCALEMEM_PROCESS_ID)")
        if num_processes == 1:
            return False
    # gloo carries collectives between CPU processes (recent jaxlibs' default; on GPU/TPU unused)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes,
            process_id=process_id, local_device_ids=local_device_ids,
            initialization_timeout=it, heartbeat_timeout_seconds=hb,
            shutdown_timeout_seconds=sd)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise ConfigError("initialize", "late", "scalemem.initialize_distributed() must run "
                              "before any JAX computation (also jax.devices())") from e
        raise
    except ValueError as e:
        given = dict(coordinator=coordinator, num_processes=num_processes, process_id=process_id)
        raise ConfigError("initialize", given, str(e)) from e
    return True


def process_index() -> int:
    return jax.process_index() if jax.distributed.is_initialized() else 0


def process_count() -> int:
    return jax.process_count() if jax.distributed.is_initialized() else 1


def is_writer() -> bool:
    """True in the one process that writes files (models, checkpoints, reports, plots):
    process 0 of a multi-process run, or the only process. Does not start JAX's backend."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``barrier(name)`` (no-op in one process)."""
    if process_count() > 1:
        multihost_utils.sync_global_devices(name)


def array_digest(*arrays) -> str:
    """A hash of the arrays' shapes, dtypes and contents (hex)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a)
    return h.hexdigest()


def _canonical(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return "ndarray:" + array_digest(value)
    if isinstance(value, np.generic):
        value = value.item()
    return json.dumps(value, sort_keys=True, default=repr)


def _digest(text: str) -> list[int]:
    """Two non-negative int32 words of the hash of ``text`` (62 bits)."""
    b = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return [int.from_bytes(b[:4], "little") & 0x7FFFFFFF,
            int.from_bytes(b[4:], "little") & 0x7FFFFFFF]


def _allgather(words: list[int]) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(np.asarray(words, np.int32)))


def check_consistent(config: Mapping[str, Any]) -> None:
    """Check that every process passed the same ``config`` (field → JSON-able value), else raise
    :class:`~scalemem.ConfigError` on every process naming the fields and processes that differ
    from process 0. Collective (every process calls it at the same point); no-op in one."""
    if process_count() < 2:
        return
    fields = sorted(config)
    # first the field names (fixed size), so a different field list cannot desynchronise the
    # gather of the values below
    head = _allgather([len(fields)] + _digest(json.dumps(fields)))
    if not (head == head[0]).all():
        bad = [int(i) for i in np.nonzero((head != head[0]).any(axis=1))[0]]
        raise ConfigError("config", fields, f"processes {bad} run with other settings than "
                          "process 0 (another scalemem version or call); every process must "
                          "run the same command on the same data")
    words = [w for f in fields for w in _digest(_canonical(config[f]))]
    table = _allgather(words).reshape(process_count(), len(fields), 2)
    differ = (table != table[0]).any(axis=2)  # (processes, fields)
    bad_fields = [fields[j] for j in range(len(fields)) if differ[:, j].any()]
    if bad_fields:
        first = bad_fields[0]
        procs = [int(i) for i in np.nonzero(differ[:, fields.index(first)])[0]]
        others = f" (also differ: {', '.join(bad_fields[1:])})" if len(bad_fields) > 1 else ""
        raise ConfigError(first, config[first],
                          f"differs between the processes of this run: process(es) {procs} "
                          f"hold another value than process 0 (this is process "
                          f"{process_index()}){others}; every process must run the same "
                          "settings on the same data")


def source_fingerprint(source) -> dict:
    """What identifies a source's data without reading rows (each process may only read its
    own): shape, dtypes, scales, views, row range and the store's ``scalemem`` attribute."""
    meta = getattr(source, "store_meta", None)
    return dict(
        rows=int(source.rows), key_dim=int(source.key_dim), value_dim=int(source.value_dim),
        key_dtype=str(np.dtype(source.key_dtype)), value_dtype=str(np.dtype(source.value_dtype)),
        key_scale=source.key_scale, value_scale=source.value_scale,
        key_view=getattr(source, "key_view", None), value_view=getattr(source, "value_view", None),
        row_offset=int(getattr(source, "row_offset", 0) or 0),
        store_meta=_canonical(meta) if meta is not None else None)
