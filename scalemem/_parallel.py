"""Data-parallel fitting over the devices of a mesh (one host or many).

Layout. The rows are split into one contiguous range per device of a :class:`jax.sharding.Mesh`
with a single (data) axis: device ``i`` of the mesh (in ``mesh.devices`` order) owns rows
``row_ranges(N, D)[i]``, ranges that differ in length by at most one row. Each device pads its
range to the same number of ``chunk_rows``-row chunks with zero rows of weight 0, so every device
runs the same program on the same shapes and no row is ever dropped. ``K``, ``V`` and the
optimiser state are replicated on every device.

A step. Each device scans its own chunks with :func:`scalemem._core.scan_stats` (float64
accumulation, HIGHEST-precision chunk products, exactly as on one device); the per-device
statistics are summed with ``jax.lax.psum`` inside ``jax.shard_map``; every device then solves the
same float64 ridge system (replicated, so no broadcast is needed) and computes the gradient of its
chunks, again summed with ``psum``; the optimiser update runs replicated. In memory, both passes
and the update are one jitted XLA program (:func:`scalemem._step.make_fused_step`).

Exactness. Only the order of the float64 sums changes with the device count (per-device sums,
then a sum over devices), so the statistics agree with one device to float64 rounding: relative
differences of order ``log2(D)·u₆₄`` on top of the chunk products, which are identical when the
chunk boundaries coincide and differ by float32/float64 rounding of the products otherwise
(``tests/test_parallel.py`` checks rtol 1e-12 on float64 data).

Streaming. :class:`ShardedStreamingEngine` streams each device's own row range through its own
:class:`~scalemem._stream.ChunkStream` (one reader thread per local device, blocks copied straight
to that device). Per-device statistics and gradients are accumulated in per-device float64
accumulators (a ``(D, ...)`` array sharded over the data axis) and ``psum``'ed once per pass, so a
pass costs one collective, not one per block. In a multi-process run (see
:mod:`scalemem._distributed`) each process reads only the ranges of its own devices.

Gradient precision. ``matmul_precision`` selects the precision of the gradient pass's matmuls
(the statistics always use HIGHEST and float64 sums): ``"highest"`` (default, full float32 or
float64), ``"tf32"`` (TensorFloat-32 on GPUs that have it; plain float32 on CPU) or ``"bf16"``
(bfloat16 operands, float32 accumulation). The reduced modes need float32 compute.
"""

from __future__ import annotations

import functools
import hashlib
from collections import deque
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import _core
from ._errors import ConfigError, NonFiniteDataError
from ._fit import (FitResult, StepReport, default_optimizer, fit_engine, init_keys,
                   locate_nonfinite_arrays)
from ._model import Memory
from ._source import Source
from ._step import StepOut, apply_gradient, make_fused_step, solve_and_loss
from ._stream import ChunkStream
from ._streaming import PassEngine, _compute_dtype, locate_nonfinite
from ._validate import check_init, check_int, check_number, check_pair, check_scale

__all__ = ["DATA_AXIS", "MATMUL_PRECISIONS", "make_mesh", "row_ranges", "local_row_ranges",
           "resolve_precision", "ShardedEngine", "ShardedStreamingEngine", "fit_sharded",
           "fit_source_sharded"]

DATA_AXIS = "data"
MATMUL_PRECISIONS = ("highest", "tf32", "bf16")
_MAX_INFLIGHT = 2  # block computations dispatched ahead of the oldest unfinished one
HIGHEST = jax.lax.Precision.HIGHEST
F64 = jnp.float64


# ----------------------------------------------------------------------------------------------
# mesh, ranges, precision


def make_mesh(devices=None, mesh: Mesh | None = None) -> Mesh:
    """The one-axis mesh to shard rows over: ``mesh`` as given (it must have exactly one axis),
    else a mesh named ``"data"`` over ``devices`` (a sequence of devices, or an int: the first
    that many of ``jax.devices()``), by default every device of every process."""
    if mesh is not None:
        if devices is not None:
            raise ConfigError("devices", devices, "give either mesh or devices, not both")
        if not isinstance(mesh, Mesh):
            raise ConfigError("mesh", type(mesh).__name__, "expected a jax.sharding.Mesh")
        if len(mesh.axis_names) != 1:
            raise ConfigError("mesh", dict(mesh.shape), "the mesh must have exactly one axis "
                              "(the data axis the rows are split over)")
        return mesh
    everything = jax.devices()
    if devices is None:
        devices = everything
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if not 1 <= devices <= len(everything):
            raise ConfigError("devices", devices, f"must be between 1 and the {len(everything)} "
                              "available devices")
        devices = everything[:devices]
    devices = list(devices)
    if not devices:
        raise ConfigError("devices", devices, "no devices given")
    return Mesh(np.array(devices, dtype=object), (DATA_AXIS,))


def row_ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous half-open ranges covering ``0 … rows-1``, lengths differing by at
    most one (the first ``rows % parts`` ranges hold the extra row)."""
    q, r = divmod(int(rows), int(parts))
    out, s = [], 0
    for i in range(parts):
        e = s + q + (1 if i < r else 0)
        out.append((s, e))
        s = e
    return out


def _axis(mesh: Mesh) -> str:
    return mesh.axis_names[0]


def _mesh_devices(mesh: Mesh) -> list:
    return list(mesh.devices.flat)


def local_row_ranges(rows: int, mesh: Mesh) -> list[tuple[Any, tuple[int, int]]]:
    """``(device, (start, stop))`` for each device of ``mesh`` that belongs to this process: the
    only rows this process reads."""
    devs = _mesh_devices(mesh)
    pi = jax.process_index()
    return [(d, r) for d, r in zip(devs, row_ranges(rows, len(devs))) if d.process_index == pi]


def resolve_precision(matmul_precision: str, dtype, platform: str):
    """The ``precision=`` argument of the gradient matmuls for ``matmul_precision``."""
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ConfigError("matmul_precision", matmul_precision,
                          f"must be one of {', '.join(MATMUL_PRECISIONS)}")
    if matmul_precision == "highest":
        return HIGHEST
    if jnp.dtype(dtype) != jnp.float32:
        raise ConfigError("matmul_precision", matmul_precision,
                          f"reduced-precision matmuls need float32 compute, not {jnp.dtype(dtype)}"
                          " (pass dtype='float32' or matmul_precision='highest')")
    if matmul_precision == "bf16":
        return jax.lax.DotAlgorithmPreset.BF16_BF16_F32
    # TF32 exists on NVIDIA GPUs (Ampere and later); XLA's CPU backend has no TF32 dot, where
    # plain float32 is the closest (and exact-er) choice.
    return jax.lax.DotAlgorithmPreset.TF32_TF32_F32 if platform == "gpu" else HIGHEST


def _platform(mesh: Mesh) -> str:
    return _mesh_devices(mesh)[0].platform


# ----------------------------------------------------------------------------------------------
# replicated and sharded arrays


def _host(x) -> np.ndarray:
    """A host copy of ``x`` (a replicated global array, a local array or NumPy data)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_shards[0].data
    return np.asarray(x)


def _replicate(tree, mesh: Mesh):
    """Every leaf of ``tree`` as a global array replicated on every device of ``mesh`` (each
    process supplies its own, identical, host copy)."""
    sharding = NamedSharding(mesh, P())

    def rep(x):
        h = _host(x)
        return jax.make_array_from_callback(h.shape, sharding, lambda idx: h[idx])

    return jax.tree.map(rep, tree)


def _shard_blocks(parts: dict, mesh: Mesh, block_shape: tuple, dtype) -> jax.Array:
    """A global ``(D·b, *block_shape[1:])`` array sharded over the data axis from ``parts``,
    device → NumPy block of shape ``block_shape`` (only this process's devices)."""
    D = len(_mesh_devices(mesh))
    shape = (D * block_shape[0],) + tuple(block_shape[1:])
    sharding = NamedSharding(mesh, P(_axis(mesh)))
    arrays = [jax.device_put(np.asarray(parts[d], dtype), d)
              for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _device_blocks(Q, X, start, stop, nb, c, wdtype):
    """Rows ``start … stop-1`` as ``(nb, c, ·)`` blocks padded with zero rows of weight 0."""
    n = stop - start
    rows = nb * c
    q = np.zeros((rows, Q.shape[1]), Q.dtype)
    x = np.zeros((rows, X.shape[1]), X.dtype)
    w = np.zeros((rows,), wdtype)
    q[:n], x[:n], w[:n] = Q[start:stop], X[start:stop], 1
    return q.reshape(nb, c, -1), x.reshape(nb, c, -1), w.reshape(nb, c)


def _smap(mesh, f, in_specs, out_specs):
    # check_vma=False: the scans start from unvarying zeros and carry device-varying sums; the
    # psum'ed outputs are replicated by construction.
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# ----------------------------------------------------------------------------------------------
# in memory


class ShardedEngine:
    """All rows resident in device memory, split over the data axis of ``mesh``; one jitted
    step (statistics pass, ridge solve, gradient pass, update) per call. Implements the engine
    protocol of :func:`scalemem._fit.fit_engine`.

    ``Q``/``X`` are the full arrays (N×m, N×n; NumPy or anything ``np.asarray`` accepts, the
    same on every process); each process copies only its own devices' rows to its devices.
    """

    def __init__(self, Q, X, *, mesh: Mesh, optimizer: optax.GradientTransformation,
                 ridge: float, chunk_rows: int, dtype, key_scale=None, value_scale=None,
                 matmul_precision: str = "highest"):
        self.rows = check_pair(Q, X)
        self.key_dim, self.value_dim = int(Q.shape[1]), int(X.shape[1])
        self.mesh = make_mesh(mesh=mesh)
        self.dtype = jnp.dtype(dtype)
        self.precision = resolve_precision(matmul_precision, self.dtype, _platform(self.mesh))
        self._Q, self._X = Q, X
        D = len(_mesh_devices(self.mesh))
        self.ranges = row_ranges(self.rows, D)
        per = max(e - s for s, e in self.ranges)
        c = _core.balanced_chunk(max(per, 1), check_int("chunk_rows", chunk_rows, 1))
        nb = max(1, -(-per // c))
        self.chunk_rows, self.blocks_per_device = c, nb
        Qh, Xh = np.asarray(Q), np.asarray(X)
        local = local_row_ranges(self.rows, self.mesh)
        blocks = {d: _device_blocks(Qh, Xh, s, e, nb, c, self.dtype) for d, (s, e) in local}
        self._data = tuple(
            _shard_blocks({d: b[i] for d, b in blocks.items()}, self.mesh, shape, dt)
            for i, (shape, dt) in enumerate((((nb, c, self.key_dim), Qh.dtype),
                                             ((nb, c, self.value_dim), Xh.dtype),
                                             ((nb, c), self.dtype))))
        ax = _axis(self.mesh)
        prec = self.precision
        # the values centred per chunk, with their moments: computed once (K-independent), so
        # a step touches them only inside the two big products (as the one-device engine)
        prep = _smap(self.mesh, lambda Xb, wb: jax.vmap(lambda x, w: _core.centre_values(
            x, w, value_scale=value_scale, dtype=self.dtype))(Xb, wb), (P(ax), P(ax)),
            (P(ax), P(ax), P(ax)))
        Qb, Xb, wb = self._data
        Yb, mom, mu = jax.jit(prep)(Xb, wb)
        self._data = (Qb, Yb, wb, mom, mu)
        del Xb

        def stats_local(K, Qb, Yb, wb, mom, mu):
            return jax.lax.psum(_core.scan_stats(K, Qb, Yb, wb, moments=mom, centred=True,
                                                 key_scale=key_scale), ax)

        def grad_local(K, V, Qb, Yb, wb, mom, mu):
            return jax.lax.psum(_core.scan_grad(K, V, Qb, Yb, wb, precision=prec, centres=mu,
                                                key_scale=key_scale), ax)

        data_specs = (P(ax),) * 5
        self._stats_fn = _smap(self.mesh, stats_local, (P(),) + data_specs, P())
        grad_fn = _smap(self.mesh, grad_local, (P(), P()) + data_specs, P())
        self._step, self._final = make_fused_step(optimizer, ridge, self._stats_fn, grad_fn)
        self._stats = jax.jit(self._stats_fn)
        self._grad = jax.jit(grad_fn)

    def replicate(self, tree):
        """``tree`` (keys, optimiser state) replicated over the mesh."""
        return _replicate(tree, self.mesh)

    def stats(self, K) -> _core.Stats:
        """The (psum'ed, replicated) statistics at ``K``."""
        with jax.enable_x64(True):
            return self._stats(self.replicate(K), *self._data)

    def grad(self, K, V) -> jax.Array:
        """The (psum'ed, replicated) gradient ``∂/∂K`` at ``(K, V)``, float64."""
        with jax.enable_x64(True):
            return self._grad(self.replicate(K), self.replicate(V), *self._data)

    def step(self, K, opt_state):
        return self._step(K, opt_state, *self._data)

    def final(self, K):
        return self._final(K, *self._data)

    def locate_nonfinite(self) -> NonFiniteDataError:
        # rows are split over devices, so a global chunk index would mean nothing: row and column
        return locate_nonfinite_arrays(self._Q, self._X)


# ----------------------------------------------------------------------------------------------
# streaming


class _RowRange:
    """Rows ``start … stop-1`` of ``source`` as a source of its own (for one device's stream)."""

    def __init__(self, source: Source, start: int, stop: int):
        self._source, self.start = source, int(start)
        self.rows = int(stop) - int(start)
        for f in ("name", "key_dim", "value_dim", "key_dtype", "value_dtype", "key_scale",
                  "value_scale"):
            setattr(self, f, getattr(source, f))

    def read(self, start: int, stop: int):
        return self._source.read(self.start + start, self.start + stop)


def _stats_from(acc, K, Qb, Xb, wb, key_scale, value_scale):
    def body(a, chunk):
        q, x, w = chunk
        return _core.merge(a, _core.chunk_stats(K, q, x, w, key_scale=key_scale,
                                                value_scale=value_scale)), None

    return jax.lax.scan(body, acc, (Qb, Xb, wb))[0]


def _grad_from(acc, K, V, Qb, Xb, wb, key_scale, value_scale, precision):
    # the same centred operands as _core.scan_grad, so every engine computes the same gradient
    Vd, VVt, nu = _core.grad_operands(V, K.dtype, precision)

    def body(g, chunk):
        q, x, w = chunk
        return g + _core.chunk_grad(K, Vd, VVt, q, x, w, key_scale=key_scale,
                                    value_scale=value_scale, precision=precision,
                                    shift=nu), None

    return jax.lax.scan(body, acc, (Qb, Xb, wb))[0]


_solve = jax.jit(solve_and_loss)  # shared by all engines (compiled once per shape)


def _first(tree):
    return jax.tree.map(lambda a: a[0], tree)


def _lead(tree):
    return jax.tree.map(lambda a: a[None], tree)


class ShardedStreamingEngine(PassEngine):
    """The streamed counterpart of :class:`ShardedEngine` (engine protocol of
    :func:`scalemem._fit.fit_engine`): device ``i`` of ``mesh`` streams rows
    ``row_ranges(N, D)[i]`` of ``source`` in blocks of ``chunks_per_block`` chunks of
    ``chunk_rows`` rows; this process reads only the ranges of its own devices. ``one_pass`` as in
    :class:`scalemem._streaming.StreamingEngine` (statistics at ``K_t`` and the gradient at
    ``(K_t, V_{t-1})`` in one read)."""

    def __init__(self, source: Source, *, mesh: Mesh, optimizer: optax.GradientTransformation,
                 ridge: float, chunk_rows: int, chunks_per_block: int, dtype,
                 one_pass: bool = False, prefetch: int = 2, matmul_precision: str = "highest"):
        from ._streaming import _check_source

        self.source = _check_source(source)
        self.rows = int(source.rows)
        self.key_dim, self.value_dim = int(source.key_dim), int(source.value_dim)
        self.mesh = make_mesh(mesh=mesh)
        self.dtype = jnp.dtype(dtype)
        self.ridge = check_number("ridge", ridge, 0.0)
        self.one_pass = bool(one_pass)
        self.precision = resolve_precision(matmul_precision, self.dtype, _platform(self.mesh))
        D = len(_mesh_devices(self.mesh))
        self.ranges = row_ranges(self.rows, D)
        per = max(e - s for s, e in self.ranges)
        c = _core.balanced_chunk(max(per, 1), check_int("chunk_rows", chunk_rows, 1))
        k = min(check_int("chunks_per_block", chunks_per_block, 1), max(1, -(-per // c)))
        self.chunk_rows, self.chunks_per_block = c, k
        self.num_blocks = max(1, -(-per // (c * k)))  # blocks per device and pass
        self._local = local_row_ranges(self.rows, self.mesh)
        self._streams = [
            (d, ChunkStream(_RowRange(source, s, e), chunk_rows=c, chunks_per_block=k,
                            weight_dtype=self.dtype, prefetch=check_int("prefetch", prefetch, 1),
                            device=d) if e > s else None)
            for d, (s, e) in self._local]
        self._zero_blocks: dict = {}
        self._scales = dict(key_scale=source.key_scale, value_scale=source.value_scale)
        self._build(optimizer)
        self._last: tuple[Any, Any] | None = None
        self.passes = 0

    # -- compiled pieces -------------------------------------------------------------------------

    def _build(self, optimizer):
        mesh, ax = self.mesh, _axis(self.mesh)
        sc, prec = self._scales, self.precision
        D = len(_mesh_devices(mesh))
        sh = NamedSharding(mesh, P(ax))
        n = self.value_dim

        def stats_block(acc, K, Qb, Xb, wb):
            return _lead(_stats_from(_first(acc), K, Qb, Xb, wb, **sc))

        def grad_block(acc, K, V, Qb, Xb, wb):
            return _lead(_grad_from(_first(acc), K, V, Qb, Xb, wb, precision=prec, **sc))

        def both_block(acc, K, V, Qb, Xb, wb):
            s, g = _first(acc)
            return _lead((_stats_from(s, K, Qb, Xb, wb, **sc),
                          _grad_from(g, K, V, Qb, Xb, wb, precision=prec, **sc)))

        d3 = (P(ax),) * 3
        self._stats_block = jax.jit(_smap(mesh, stats_block, (P(ax), P()) + d3, P(ax)))
        self._grad_block = jax.jit(_smap(mesh, grad_block, (P(ax), P(), P()) + d3, P(ax)))
        self._both_block = jax.jit(_smap(mesh, both_block, (P(ax), P(), P()) + d3, P(ax)))
        self._reduce = jax.jit(_smap(mesh, lambda a: jax.lax.psum(_first(a), ax), P(ax), P()))

        def zero_stats(K):
            return jax.tree.map(lambda z: jnp.zeros((D,) + z.shape, z.dtype),
                                _core.zero_stats(K.shape[0], n))

        self._zero_stats = jax.jit(zero_stats, out_shardings=sh)
        self._zero_grad = jax.jit(lambda K: jnp.zeros((D,) + K.shape, F64), out_shardings=sh)
        self._solve = _solve
        self._apply = jax.jit(functools.partial(apply_gradient, optimizer))

    # -- passes ----------------------------------------------------------------------------------

    def _zero_block(self, d):
        if d not in self._zero_blocks:
            c, k = self.chunk_rows, self.chunks_per_block
            kd, vd = np.dtype(self.source.key_dtype), np.dtype(self.source.value_dtype)
            self._zero_blocks[d] = jax.device_put(
                (np.zeros((k, c, self.key_dim), kd), np.zeros((k, c, self.value_dim), vd),
                 np.zeros((k, c), self.dtype)), d)
        return self._zero_blocks[d]

    def _blocks(self):
        """Global ``(Q, X, w)`` blocks of one pass: block ``j`` of every device's range (zero
        blocks of weight 0 where a range has fewer blocks)."""
        iters = []
        for _, s in self._streams:
            if s is not None:
                s.rewind()
            iters.append(iter(s) if s is not None else iter(()))
        D = len(_mesh_devices(self.mesh))
        c, k = self.chunk_rows, self.chunks_per_block
        sh = NamedSharding(self.mesh, P(_axis(self.mesh)))
        shapes = ((D * k, c, self.key_dim), (D * k, c, self.value_dim), (D * k, c))
        try:
            for _ in range(self.num_blocks):
                per_dev = []
                for (d, _), it in zip(self._streams, iters):
                    b = next(it, None)
                    per_dev.append(self._zero_block(d) if b is None else (b.Q, b.X, b.w))
                yield tuple(jax.make_array_from_single_device_arrays(
                    shapes[i], sh, [p[i] for p in per_dev]) for i in range(3))
        finally:
            for it in iters:
                close = getattr(it, "close", None)
                if close is not None:
                    close()

    def _pass(self, fn, acc, *args):
        inflight: deque = deque()
        for Qg, Xg, wg in self._blocks():
            acc = fn(acc, *args, Qg, Xg, wg)
            inflight.append(acc)
            if len(inflight) > _MAX_INFLIGHT:
                jax.block_until_ready(inflight.popleft())
        self.passes += 1
        return acc

    def stats(self, K) -> _core.Stats:
        """The (psum'ed, replicated) statistics at ``K`` (one pass)."""
        with jax.enable_x64(True):
            return self._stats_pass(_replicate(K, self.mesh))

    def _stats_pass(self, K):
        return self._reduce(self._pass(self._stats_block, self._zero_stats(K), K))

    def _grad_pass(self, K, V):
        return self._reduce(self._pass(self._grad_block, self._zero_grad(K), K, V))

    def _both_pass(self, K, V):
        return self._reduce(self._pass(self._both_block,
                                       (self._zero_stats(K), self._zero_grad(K)), K, V))

    def locate_nonfinite(self) -> NonFiniteDataError:
        """The first NaN/Inf in *this process's* rows (rows count from the start of the
        source); a process whose rows are finite reports the logit-overflow explanation."""
        return locate_nonfinite(
            self.source, self.chunk_rows * self.chunks_per_block, self.chunk_rows,
            ranges=[r for _, r in self._local], finite_hint=(
                f"{self.source.name}: statistics became non-finite; this process's rows are "
                "finite (another process may report a bad row), else the logits overflow: scale "
                "the keys down"))


# ----------------------------------------------------------------------------------------------
# entry points


def _local_result(res: FitResult) -> FitResult:
    """``res`` with ``memory`` as process-local arrays (the replicated K copied to the host)."""
    K = jnp.asarray(_host(res.memory.K))
    V = jnp.asarray(_host(res.memory.V), K.dtype)
    res.memory = Memory(K=K, V=V)
    return res


def _fingerprint_arrays(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _common_checks(prototypes, rows, steps, ridge, chunk_rows, seed, optimizer, learning_rate,
                   matmul_precision):
    """Checked settings; the optimiser defaults to Adam(``learning_rate``). ``chunk_rows`` stays
    None when not given: its default depends on the devices (:func:`_default_chunk`)."""
    P_ = check_int("prototypes", prototypes, 1, rows)
    steps = check_int("steps", steps, 0)
    ridge = check_number("ridge", ridge, 0.0)
    chunk_rows = None if chunk_rows is None else check_int("chunk_rows", chunk_rows, 1)
    seed = check_int("seed", seed)
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ConfigError("matmul_precision", matmul_precision,
                          f"must be one of {', '.join(MATMUL_PRECISIONS)}")
    if optimizer is None:
        optimizer = default_optimizer(check_number("learning_rate", learning_rate, 0.0))
    return P_, steps, ridge, chunk_rows, seed, optimizer


def _default_chunk(chunk_rows, P: int, mesh: Mesh, resident: bool) -> int:
    """``chunk_rows``, or the default for ``mesh``'s platform: rows resident on the devices get
    :func:`scalemem._core.default_chunk_rows` of that platform; streamed rows the CPU rule, which
    bounds the host memory of the blocks in flight."""
    if chunk_rows is not None:
        return chunk_rows
    return _core.default_chunk_rows(P, _platform(mesh) if resident else "cpu")


def _start(K0, engine, optimizer, loop: dict):
    """Replicated ``K0`` and optimiser state (a given ``opt_state`` is replicated as well)."""
    K0 = engine.replicate(K0) if hasattr(engine, "replicate") else _replicate(K0, engine.mesh)
    if loop.get("opt_state") is not None:
        loop["opt_state"] = _replicate(loop["opt_state"], engine.mesh)
    else:
        loop["opt_state"] = jax.jit(optimizer.init,
                                    out_shardings=NamedSharding(engine.mesh, P()))(K0)
    return K0


def _run_config(P_, optimizer, custom_optimizer, learning_rate, mesh, loop, **settings):
    """The settings every process of a multi-process run must share (the optimiser through
    its learning rate, or the structure of its state when it is a custom one)."""
    probe = np.zeros((P_, 1), np.float32)
    return dict(prototypes=P_, **settings,
                learning_rate=None if custom_optimizer else learning_rate,
                optimizer_state=str(jax.tree.structure(optimizer.init(probe))),
                devices=len(_mesh_devices(mesh)), loop_options=sorted(loop))


def _check_processes(config: dict, data: Callable[[], dict]) -> None:
    """In a multi-process run: every process has the same ``config`` and ``data()``."""
    if jax.process_count() > 1:
        from ._distributed import check_consistent

        check_consistent({**config, **{f"data.{k}": v for k, v in data().items()}})


class _Replicating:
    """An engine whose ``final`` takes a process-local ``K`` (for ``_fit._data_init``)."""

    def __init__(self, engine: ShardedEngine):
        self._engine = engine

    def final(self, K):
        return self._engine.final(self._engine.replicate(K))


def fit_sharded(Q, X, prototypes: int, *, mesh: Mesh | None = None, devices=None,
                steps: int = 1000, optimizer: optax.GradientTransformation | None = None,
                learning_rate: float = 5e-4, ridge: float = 1e-6,
                chunk_rows: int | None = None, seed: int = 0, init="normal", dtype=None, key_scale: float | None = None,
                value_scale: float | None = None, key_bias: bool = False,
                callback: Callable[[StepReport], Any] | None = None,
                matmul_precision: str = "highest", **loop) -> FitResult:
    """:func:`scalemem.fit` with the rows split over the devices of ``mesh`` (a one-axis
    :class:`jax.sharding.Mesh`) or of ``devices`` (a sequence, or an int: the first that many);
    by default every device of every process. Same settings and result as :func:`scalemem.fit`
    (``init`` ``"normal"``/``"kmeans"``/``"sample"``/array, ``key_bias``, ...), plus
    ``matmul_precision`` (``"highest"``, ``"tf32"`` or ``"bf16"``: the gradient matmuls; the
    statistics always use HIGHEST with float64 sums). Further keyword arguments go to
    :func:`scalemem._fit.fit_engine` (``checkpoint``, ``should_stop``, ``opt_state``, ...).

    In a multi-process run (:func:`scalemem._distributed.initialize`) every process calls this
    with the same arguments and the full ``Q``/``X``; each copies only its own devices' rows to
    its devices, and the processes first check that they agree on the settings and data
    (:class:`~scalemem.ConfigError` otherwise). ``memory`` of the result is process-local.
    """
    N = check_pair(Q, X)
    custom = optimizer is not None
    P_, steps, ridge, chunk_rows, seed, optimizer = _common_checks(
        prototypes, N, steps, ridge, chunk_rows, seed, optimizer, learning_rate, matmul_precision)
    key_scale = check_scale("key_scale", key_scale)
    value_scale = check_scale("value_scale", value_scale)
    named = isinstance(init, str)
    if named and init not in ("normal", "kmeans", "sample"):
        raise ConfigError("init", init, "use 'normal', 'kmeans', 'sample' or an array")
    m = int(Q.shape[1])
    mk = m + int(bool(key_bias))
    if not named:
        check_init("init", init, (P_, mk))
    with jax.enable_x64(True):
        mesh = make_mesh(devices, mesh)
        chunk_rows = _default_chunk(chunk_rows, P_, mesh, resident=True)
        dt = _compute_dtype(dtype, Q.dtype, X.dtype)
        if jax.process_count() > 1:
            _check_processes(
                _run_config(P_, optimizer, custom, learning_rate, mesh, loop, steps=steps,
                            ridge=ridge, chunk_rows=chunk_rows, seed=seed, dtype=str(dt),
                            init=init if named else _fingerprint_arrays(init),
                            key_bias=bool(key_bias), key_scale=key_scale,
                            value_scale=value_scale, matmul_precision=matmul_precision),
                lambda: dict(rows=N, shape=(tuple(Q.shape), tuple(X.shape)),
                             dtypes=(str(Q.dtype), str(X.dtype)),
                             content=_fingerprint_arrays(Q, X)))
        if key_bias:  # a constant-1 key column: its key entries are the logit biases
            Qn = np.asarray(Q, dt) * (1.0 if key_scale is None else dt.type(key_scale))
            Q, key_scale = np.hstack([Qn, np.ones((N, 1), dt)]), None
        engine = ShardedEngine(Q, X, mesh=mesh, optimizer=optimizer, ridge=ridge,
                               chunk_rows=chunk_rows, dtype=dt, key_scale=key_scale,
                               value_scale=value_scale, matmul_precision=matmul_precision)
        if named and init == "normal":
            K0 = init_keys(P_, mk, seed, dt)
        elif named:  # from the data: the same on every process (same rows, same seed)
            from ._fit import _data_init

            Qs = np.asarray(Q)[:, :m] * (1.0 if key_scale is None else key_scale)
            K0 = _data_init(_Replicating(engine), Qs, P_, init, seed, bool(key_bias), dt)
        else:
            K0 = jnp.asarray(init, dt)
        K0 = _start(K0, engine, optimizer, loop)
        res = _local_result(fit_engine(engine, K0, optimizer, steps=steps, callback=callback,
                                       **loop))
    if key_bias:
        K = res.memory.K
        res.memory = Memory(K=K[:, :m], V=res.memory.V, bias=K[:, m])
    return res


def fit_source_sharded(source: Source, prototypes: int, *, mesh: Mesh | None = None,
                       devices=None, steps: int = 1000,
                       optimizer: optax.GradientTransformation | None = None,
                       learning_rate: float = 5e-4, ridge: float = 1e-6, chunk_rows: int = 4096,
                       chunks_per_block: int = 4, seed: int = 0, init=None, dtype=None,
                       callback: Callable[[StepReport], Any] | None = None,
                       one_pass: bool = False, prefetch: int = 2,
                       matmul_precision: str = "highest", **loop) -> FitResult:
    """:func:`scalemem._streaming.fit_source` with the rows split over the devices of ``mesh``
    (or ``devices``; default: every device of every process): each device streams its own
    contiguous row range, and each process reads only its own devices' ranges of ``source``.
    Settings as :func:`fit_sharded` plus ``chunks_per_block``, ``one_pass`` and ``prefetch``
    (as in :func:`scalemem._streaming.fit_source`). In a multi-process run every process opens
    the same store and calls this with the same arguments; the processes first check that they
    agree (settings, source shape, dtypes, scales, views, row range and store attributes)."""
    from ._streaming import _check_source

    source = _check_source(source)
    N = int(source.rows)
    custom = optimizer is not None
    P_, steps, ridge, chunk_rows, seed, optimizer = _common_checks(
        prototypes, N, steps, ridge, chunk_rows, seed, optimizer, learning_rate, matmul_precision)
    chunks_per_block = check_int("chunks_per_block", chunks_per_block, 1)
    m = int(source.key_dim)
    if init is not None:
        check_init("init", init, (P_, m))
    with jax.enable_x64(True):
        mesh = make_mesh(devices, mesh)
        chunk_rows = _default_chunk(chunk_rows, P_, mesh, resident=False)
        dt = _compute_dtype(dtype, source.key_dtype, source.value_dtype)
        K0 = init_keys(P_, m, seed, dt) if init is None else jnp.asarray(init, dt)
        if jax.process_count() > 1:
            from ._distributed import source_fingerprint

            _check_processes(
                _run_config(P_, optimizer, custom, learning_rate, mesh, loop, steps=steps,
                            ridge=ridge, chunk_rows=chunk_rows, chunks_per_block=chunks_per_block,
                            seed=seed, dtype=str(dt), one_pass=bool(one_pass),
                            init=None if init is None else _fingerprint_arrays(init),
                            matmul_precision=matmul_precision),
                lambda: source_fingerprint(source))
        engine = ShardedStreamingEngine(
            source, mesh=mesh, optimizer=optimizer, ridge=ridge, chunk_rows=chunk_rows,
            chunks_per_block=chunks_per_block, dtype=dt, one_pass=one_pass, prefetch=prefetch,
            matmul_precision=matmul_precision)
        K0 = _start(K0, engine, optimizer, loop)
        return _local_result(fit_engine(engine, K0, optimizer, steps=steps, callback=callback,
                                        **loop))
