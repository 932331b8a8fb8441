"""How rows and sums are laid over devices: a one-axis mesh of 1…D devices over 1…H processes
(docs/design.md, "Engines, programs and the mesh")."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .._core import HIGHEST
from .._errors import ConfigError

__all__ = ["DATA_AXIS", "make_mesh", "row_ranges", "local_row_ranges", "mesh_devices",
           "platform", "replicate", "host", "smap", "assemble", "resolve_precision"]

DATA_AXIS = "data"


def make_mesh(devices: int | None = None, mesh: Mesh | None = None) -> Mesh:
    """``mesh`` as given (exactly one axis), else a mesh named ``"data"`` over the first
    ``devices`` devices of ``jax.devices()`` (``None`` or 0: all of them, of every process)."""
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise ConfigError("mesh", type(mesh).__name__, "expected a jax.sharding.Mesh")
        if len(mesh.axis_names) != 1:
            raise ConfigError("mesh", dict(mesh.shape), "the mesh must have exactly one axis "
                              "(the data axis the rows are split over)")
        return mesh
    everything = jax.devices()
    if devices:
        if devices > len(everything):
            raise ConfigError("devices", devices, f"only {len(everything)} devices are available")
        everything = everything[:devices]
    return Mesh(np.array(everything, dtype=object), (DATA_AXIS,))


def mesh_devices(mesh: Mesh) -> list:
    return list(mesh.devices.flat)


def platform(mesh: Mesh) -> str:
    return mesh_devices(mesh)[0].platform


def row_ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous half-open ranges covering ``0 … rows-1``, lengths differing by at
    most one (the first ``rows % parts`` ranges hold the extra row)."""
    q, r = divmod(int(rows), int(parts))
    starts = [i * q + min(i, r) for i in range(parts + 1)]
    return list(zip(starts[:-1], starts[1:]))


def local_row_ranges(rows: int, mesh: Mesh) -> list[tuple[Any, tuple[int, int]]]:
    """``(device, (start, stop))`` for each device of ``mesh`` that belongs to this process."""
    devs = mesh_devices(mesh)
    pi = jax.process_index()
    return [(d, r) for d, r in zip(devs, row_ranges(rows, len(devs))) if d.process_index == pi]


def host(x) -> np.ndarray:
    """A host copy of ``x`` (a replicated global array, a local array or NumPy data)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_shards[0].data
    return np.asarray(x)


def replicate(tree, mesh: Mesh):
    """Every leaf of ``tree`` replicated on every device of ``mesh`` (each process supplies its
    own, identical, host copy)."""
    sharding = NamedSharding(mesh, P())

    def rep(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        h = host(x)
        return jax.make_array_from_callback(h.shape, sharding, lambda idx: h[idx])

    return jax.tree.map(rep, tree)


def assemble(per_device: dict, mesh: Mesh):
    """A global ``(D·a, …)`` array (or pytree) sharded over the mesh axis from ``per_device``:
    this process's devices → their local ``(a, …)`` array(s), the same shapes on every device."""
    D = len(mesh_devices(mesh))
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    devices = list(per_device)

    def one(*leaves):
        shape = (D * leaves[0].shape[0],) + tuple(leaves[0].shape[1:])
        order = sharding.addressable_devices_indices_map(shape)
        arrays = [jax.device_put(leaves[devices.index(d)], d) for d in order]
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    return jax.tree.map(one, *(per_device[d] for d in devices))


def smap(mesh: Mesh, f, in_specs, out_specs):
    """``shard_map`` over the data axis. check_vma=False: folds start from unvarying zeros and
    carry device-varying sums; the psum'ed outputs are replicated by construction."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def resolve_precision(name: str, dtype, plat: str):
    """The ``precision=`` of the matmuls for a precision setting (``highest``/``tf32``/``bf16``).
    XLA's CPU backend has no TF32 dot: there ``tf32`` is plain float32."""
    if name == "highest" or jnp.dtype(dtype) != jnp.float32:
        return HIGHEST
    if name == "bf16":
        return jax.lax.DotAlgorithmPreset.BF16_BF16_F32
    return jax.lax.DotAlgorithmPreset.TF32_TF32_F32 if plat == "gpu" else HIGHEST
