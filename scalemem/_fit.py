"""The fit loop (one readable loop for every data layout) and the in-memory engine."""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _core
from ._errors import ConfigError, NonFiniteDataError, NumericsWarning
from ._model import Memory
from ._step import StepOut, make_fused_step
from ._validate import check_init, check_int, check_number, check_pair, check_scale

__all__ = ["FitResult", "StepReport", "Engine", "InMemoryEngine", "LoopState", "FitInterrupted",
           "fit", "fit_engine", "init_keys", "default_optimizer"]


def default_optimizer(learning_rate: float = 5e-4) -> optax.GradientTransformation:
    """Adam, the seed's optimiser (lr 5e-4 in its Fashion-MNIST experiment)."""
    return optax.adam(learning_rate)


def init_keys(prototypes: int, key_dim: int, seed: int = 0, dtype=jnp.float32) -> jax.Array:
    """``K₀ = 0.01·normal(PRNGKey(seed), (P, m))``, the seed's initialisation."""
    return 0.01 * jax.random.normal(jax.random.PRNGKey(seed), (prototypes, key_dim), dtype=dtype)


@dataclasses.dataclass
class StepReport:
    """What the loop knows after a step; handed to ``callback``."""

    step: int  # 0-based index of the step just finished
    steps: int  # total steps of this fit
    loss: float  # ½ Σ‖x − v̂‖² over the fit rows at (K_step, V_step)
    rmse: float  # sqrt(mean squared error per value entry) at (K_step, V_step)
    rows: int
    seconds: float  # wall time since the loop started


@dataclasses.dataclass
class FitResult:
    memory: Memory  # K after the last update and V solved exactly at that K
    loss: np.ndarray  # loss at K_0 … K_steps (length steps + 1)
    rmse: np.ndarray  # training RMSE per value entry at K_0 … K_steps
    opt_state: Any
    seconds: float
    solve_events: int  # steps whose solve needed jitter or the eigen fallback


class Engine(Protocol):
    """A data layout: runs a step at ``K`` and the final statistics pass."""

    rows: int
    value_dim: int

    def step(self, K, opt_state) -> tuple[jax.Array, Any, StepOut]: ...

    def final(self, K) -> StepOut: ...

    def locate_nonfinite(self) -> NonFiniteDataError: ...


UNROLL_CHUNKS = 8  # in-memory passes unroll over at most this many chunks, else lax.scan


class InMemoryEngine:
    """All rows resident on one device, split into equal chunks (plus one shorter chunk for the
    remaining rows); both passes run inside a single jitted step.

    Up to :data:`UNROLL_CHUNKS` chunks are stored as separate arrays and each pass is unrolled
    over them; more chunks are stored as one block and each pass is a ``lax.scan``. A scan slices
    every chunk out of its block (a copy of the chunk, per pass): with few chunks the copies cost
    more than the extra compile time of the unrolled program (CPU, 60k rows in four chunks: a
    step took 639 ms scanned and 573 ms unrolled at P = 256, 244 and 144 ms at P = 64).

    Everything about the values that does not depend on ``K`` is prepared once: each chunk is
    stored centred on its column means (:func:`scalemem._core.centre_values`) with its moments,
    so a step touches the values only inside the two big products. No row is padded, so no row
    weights are multiplied in either."""

    def __init__(self, Q, X, *, optimizer, ridge: float, chunk_rows: int, dtype, key_scale=None, value_scale=None):
        self.rows = check_pair(Q, X)
        self.value_dim = int(X.shape[1])
        self._Q, self._X = Q, X
        c = min(_core.balanced_chunk(self.rows, chunk_rows), self.rows)
        self.chunk_rows = c
        nb, r = divmod(self.rows, c)
        Qh, Xh = np.asarray(Q), np.asarray(X)
        prepare = jax.jit(lambda x: _core.centre_values(x, value_scale=value_scale, dtype=dtype))
        kw = dict(key_scale=key_scale)
        if nb + (r > 0) <= UNROLL_CHUNKS:
            self._data = (tuple((jax.device_put(Qh[s:s + c]), *prepare(Xh[s:s + c]))
                                for s in range(0, self.rows, c)),)

            def stats_fn(K, chunks):
                parts = [_core.chunk_stats(K, q, y, moments=m, centred=True, **kw)
                         for q, y, m, _ in chunks]
                stats = parts[0]
                for p in parts[1:]:
                    stats = _core.merge(stats, p)
                return stats

            def grad_fn(K, V, chunks):
                Vd, VVt, nu = _core.grad_operands(V, K.dtype)
                g = [_core.chunk_grad(K, Vd, VVt, q, y, shift=nu, centre=mu, **kw)
                     for q, y, _, mu in chunks]
                return sum(g[1:], g[0])
        else:
            full = (jax.device_put(Qh[:nb * c].reshape(nb, c, -1)),
                    *jax.jit(jax.vmap(prepare))(Xh[:nb * c].reshape(nb, c, -1)))
            rest = (jax.device_put(Qh[nb * c:]), *prepare(Xh[nb * c:])) if r else None
            self._data = (full, rest)

            def stats_fn(K, full, rest):
                Qb, Yb, mom, _ = full
                stats = _core.scan_stats(K, Qb, Yb, None, moments=mom, centred=True, **kw)
                if rest is not None:
                    q, y, m, _ = rest
                    stats = _core.merge(stats, _core.chunk_stats(K, q, y, moments=m,
                                                                 centred=True, **kw))
                return stats

            def grad_fn(K, V, full, rest):
                Qb, Yb, _, mu = full
                g = _core.scan_grad(K, V, Qb, Yb, None, centres=mu, **kw)
                if rest is not None:
                    q, y, _, m = rest
                    g = _core.scan_grad(K, V, q[None], y[None], None, centres=m[None], init=g,
                                        **kw)
                return g

        self.passes = (stats_fn, grad_fn)  # (K, *data) -> Stats, (K, V, *data) -> ∂K
        self._step, self._final = make_fused_step(optimizer, ridge, stats_fn, grad_fn)

    def step(self, K, opt_state):
        return self._step(K, opt_state, *self._data)

    def final(self, K):
        return self._final(K, *self._data)

    def locate_nonfinite(self) -> NonFiniteDataError:
        """The first NaN/Inf of the data (array, row, column and chunk: ``row // chunk_rows``),
        or, when the data is finite, an error saying that the arithmetic overflowed."""
        return locate_nonfinite_arrays(self._Q, self._X, self.chunk_rows)


def locate_nonfinite_arrays(Q, X, chunk_rows: int | None = None) -> NonFiniteDataError:
    """The first NaN/Inf of in-memory keys ``Q`` and values ``X`` as a
    :class:`NonFiniteDataError` (array, row, column and, given ``chunk_rows``, the chunk
    ``row // chunk_rows``); when both are finite, the error saying that the arithmetic
    overflowed."""
    for name, a in (("keys", Q), ("values", X)):
        a = np.asarray(a)
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a).all(axis=1)
            if bad.any():
                row = int(np.argmax(bad))
                col = int(np.argmax(~np.isfinite(a[row])))
                chunk = None if chunk_rows is None else row // chunk_rows
                where = "" if chunk is None else f", in chunk {chunk}"
                return NonFiniteDataError(
                    f"memory: {name} row {row}, column {col}{where} holds {a[row, col]}; fix or "
                    "drop the row", source="memory", array=name, row=row, chunk=chunk)
    return NonFiniteDataError(OVERFLOW_HINT.format(source="memory"), source="memory")


OVERFLOW_HINT = ("{source}: the statistics or the gradient became non-finite although the data is "
                 "finite: the logits or the products overflow in the compute dtype; scale the "
                 "keys (or values) down, or compute in float64 (dtype='float64')")


def _warn_solve(step: int, info) -> None:
    if bool(info.fallback):
        what = "needed the eigendecomposition fallback"
    elif float(info.jitter) > 0:
        what = f"needed diagonal jitter {float(info.jitter):.3g} beyond the ridge"
    else:
        what = "is close to singular"
    warnings.warn(
        f"step {step}: the solve for V {what} (condition number ~{float(info.condition):.1e}, "
        f"backward error {float(info.backward_error):.1e}): the Gram matrix G + λI is "
        "numerically singular (duplicate or unused prototypes, or a ridge too small for the "
        "data). V is finite; a larger ridge removes this warning.", NumericsWarning, stacklevel=4)


@dataclasses.dataclass
class LoopState:
    """Everything needed to continue a fit exactly: handed to ``checkpoint``."""

    step: int  # steps completed
    K: jax.Array
    opt_state: Any
    loss: list  # loss at K_0 … K_{step-1}
    rmse: list


class FitInterrupted(Exception):
    """Raised by :func:`fit_engine` when ``should_stop()`` said so; ``state`` was checkpointed."""

    def __init__(self, state: LoopState):
        self.state = state
        super().__init__(f"fit stopped after step {state.step}")


def fit_engine(engine: Engine, K0, optimizer, *, steps: int, opt_state=None, start_step: int = 0,
               history: tuple[list, list] | None = None,
               callback: Callable[[StepReport], Any] | None = None,
               checkpoint: Callable[[LoopState], Any] | None = None, checkpoint_every: int = 0,
               checkpoint_seconds: float | None = None,
               should_stop: Callable[[], bool] | None = None) -> FitResult:
    """The fit loop, shared by every engine.

    Outputs of step t are read while step t+1 runs (async dispatch). ``checkpoint(state)`` is
    called every ``checkpoint_every`` steps and/or ``checkpoint_seconds`` seconds, and when
    ``should_stop()`` turns true (then :class:`FitInterrupted` is raised after the checkpoint).
    To resume, pass the saved ``K`` as ``K0``, its ``opt_state``, ``start_step`` and ``history``:
    the continuation is bit-identical to an uninterrupted fit (same programs, same inputs).
    """
    K = K0
    opt_state = optimizer.init(K) if opt_state is None else opt_state
    losses, rmses = (list(history[0]), list(history[1])) if history else ([], [])
    events = 0
    n_entries = engine.rows * engine.value_dim
    t0 = last_ckpt = time.perf_counter()

    def read(t, out: StepOut):
        nonlocal events
        out = jax.device_get(out)
        if not bool(out.finite):
            raise engine.locate_nonfinite()
        if out.info.needs_attention:
            if events == 0:
                _warn_solve(t, out.info)
            events += 1
        loss = float(out.loss)
        losses.append(loss)
        rmses.append(float(np.sqrt(2.0 * loss / n_entries)))
        if callback is not None and t < steps:
            callback(StepReport(t, steps, loss, rmses[-1], engine.rows, time.perf_counter() - t0))
        return out

    pending = None
    for t in range(start_step, steps):
        K, opt_state, out = engine.step(K, opt_state)
        if pending is not None:
            read(*pending)
        pending = (t, out)
        done = t + 1
        stop = should_stop is not None and should_stop()
        due = checkpoint is not None and (stop or done < steps and (
            (checkpoint_every and done % checkpoint_every == 0)
            or (checkpoint_seconds is not None
                and time.perf_counter() - last_ckpt >= checkpoint_seconds)))
        if due or stop:
            read(*pending)
            pending = None
            state = LoopState(done, K, opt_state, list(losses), list(rmses))
            if due:
                checkpoint(state)
                last_ckpt = time.perf_counter()
            if stop:
                raise FitInterrupted(state)
    if pending is not None:
        read(*pending)
    last = read(steps, engine.final(K))
    memory = Memory(K=K, V=jnp.asarray(last.V, K.dtype))
    return FitResult(memory, np.asarray(losses), np.asarray(rmses), opt_state,
                     time.perf_counter() - t0, events)


def _compute_dtype(dtype, *arrays):
    if dtype is not None:
        return jnp.dtype(dtype)
    kinds = [np.dtype(a.dtype) for a in arrays]
    if all(k.kind == "f" for k in kinds) and any(k == np.float64 for k in kinds):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _data_init(engine, Qs, P, init, seed, bias, dt):
    """Keys from the data (see :mod:`scalemem._init`): centres, then the logit scale with the
    lowest exact training loss over a grid (one statistics pass and solve per candidate)."""
    from ._init import initial_keys, kmeans_pp

    Qs = np.asarray(Qs, np.float64)
    rng = np.random.default_rng(seed)
    if init == "kmeans":
        C = kmeans_pp(Qs, P, seed=seed)
    else:  # "sample": P distinct rows
        C = Qs[rng.choice(Qs.shape[0], P, replace=False)]
    sub = Qs[rng.choice(Qs.shape[0], min(4096, Qs.shape[0]), replace=False)]
    d2 = ((sub[:, None, :] - C[None, :min(P, 64), :]) ** 2).sum(-1).min(1)
    s2 = float(np.median(d2)) or 1.0
    best = None
    for g in np.geomspace(1e-3, 64.0, 17):  # from the near-linear regime to sharp kernels
        K = jnp.asarray(initial_keys(C, g / s2, bias), dt)
        loss = float(engine.final(K).loss)
        if np.isfinite(loss) and (best is None or loss < best[0]):
            best = (loss, K)
    return best[1]


def fit(Q, X, prototypes: int, *, steps: int = 1000, optimizer: optax.GradientTransformation
        | None = None, learning_rate: float = 5e-4, ridge: float = 1e-6,
        chunk_rows: int | None = None, seed: int = 0, init="normal", dtype=None, key_scale: float | None = None,
        value_scale: float | None = None, key_bias: bool = False,
        callback: Callable[[StepReport], Any] | None = None, **loop) -> FitResult:
    """Fit a memory of ``prototypes`` prototypes to keys ``Q`` (N×m) and values ``X`` (N×n).

    Each step solves ``V`` exactly (float64 ridge regression on float64-accumulated statistics)
    and moves ``K`` with ``optimizer`` (default ``optax.adam(learning_rate)``) along the
    variable-projection gradient. The compute dtype is float64 when the inputs are float64,
    else float32 (override with ``dtype``). ``key_scale``/``value_scale`` multiply ``Q``/``X`` on
    the device (e.g. 1/255 for uint8 pixels). ``chunk_rows``: rows per scanned chunk (memory
    per chunk ∝ rows·max(P, n)); by default :func:`scalemem._core.default_chunk_rows` for the
    default device's platform.

    ``init``: ``"normal"`` (the seed's ``0.01·normal(PRNGKey(seed))``), ``"kmeans"`` (k-means++
    centres of the keys at the logit scale with the lowest exact loss), ``"sample"`` (random rows
    at that scale), or an array (P×m, or P×(m+1) with ``key_bias``). ``key_bias=True`` adds a
    learned per-prototype logit bias (``softmax(Q Kᵀ + b)``; with ``"kmeans"`` it starts as a
    normalised RBF kernel). Returns a :class:`FitResult` whose ``memory`` holds ``K`` after the
    last step and ``V`` solved at that ``K``. ``loop`` goes to :func:`fit_engine` (checkpoint,
    checkpoint_every, checkpoint_seconds, should_stop, and opt_state/start_step/history to
    resume).
    """
    N = check_pair(Q, X)
    P = check_int("prototypes", prototypes, 1, N)
    steps = check_int("steps", steps, 0)
    ridge = check_number("ridge", ridge, 0.0)
    chunk_rows = (_core.default_chunk_rows(P, jax.default_backend()) if chunk_rows is None
                  else check_int("chunk_rows", chunk_rows, 1))
    seed = check_int("seed", seed)
    key_scale = check_scale("key_scale", key_scale)
    value_scale = check_scale("value_scale", value_scale)
    named = isinstance(init, str)
    if named and init not in ("normal", "kmeans", "sample"):
        raise ConfigError("init", init, "use 'normal', 'kmeans', 'sample' or an array")
    if not named:
        check_init("init", init, (P, Q.shape[1] + int(key_bias)))
    if optimizer is None:
        optimizer = default_optimizer(check_number("learning_rate", learning_rate, 0.0))
    with jax.enable_x64(True):
        dt = _compute_dtype(dtype, Q, X)
        m = Q.shape[1]
        if key_bias:  # a constant-1 key column: its key entries are the logit biases
            Qn = np.asarray(Q, dt) * (1.0 if key_scale is None else dt.type(key_scale))
            Q, key_scale = np.hstack([Qn, np.ones((N, 1), dt)]), None
        mk = m + int(key_bias)
        engine = InMemoryEngine(Q, X, optimizer=optimizer, ridge=ridge, chunk_rows=chunk_rows,
                                dtype=dt, key_scale=key_scale, value_scale=value_scale)
        if named and init == "normal":
            K0 = init_keys(P, mk, seed, dt)
        elif named:
            Qs = np.asarray(Q)[:, :m] * (1.0 if key_scale is None else key_scale)
            K0 = _data_init(engine, Qs, P, init, seed, key_bias, dt)
        else:
            K0 = jnp.asarray(init, dt)
        if K0.shape != (P, mk):
            raise ConfigError("init", tuple(K0.shape), f"expected shape {(P, mk)}")
        res = fit_engine(engine, K0, optimizer, steps=steps, callback=callback, **loop)
    if key_bias:
        K = res.memory.K
        res.memory = Memory(K=K[:, :m], V=res.memory.V, bias=K[:, m])
    return res
