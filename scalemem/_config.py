"""The one configuration: typed, frozen, validated once.

Every setting is a field declared with :func:`setting`: its name is the Python keyword, the TOML
key (``learning_rate`` or ``learning-rate``), the key in a run's ``config.json`` and, with
dashes, the command-line flag, whose help text is the field's ``help``. ``__post_init__``
validates, so a config object that exists is valid (a bad value raises
:class:`~scalemem.ConfigError` naming the field). Fields marked ``trajectory`` determine the path
``K₀, K₁, …`` of a fit: a resumed run must have the same values (the resume check reads this
marker, nothing else). A ``recipe`` (:data:`RECIPES`) fills the settings it names left at ``None``.
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import math
import numbers
from typing import Any, Mapping

from ._errors import ConfigError

__all__ = ["setting", "same", "Validated", "FitConfig", "DataConfig", "RunConfig", "RECIPES",
           "PRECISIONS", "build", "check_value", "check_fields", "val_fraction", "MAX_SEED",
           "MAX_CLASSES"]

PRECISIONS = ("highest", "tf32", "bf16")
RESIDENCIES = ("auto", "resident", "streamed")
# The largest seed: jax.random.PRNGKey takes a signed 64-bit integer in the x64 mode scalemem
# fits in (a larger one overflows).
MAX_SEED = 2**63 - 1
# The most classes of one-hot values (--values-are-labels): a one-hot row of 2¹⁶ float32 is
# 256 KiB, a chunk of 4096 such rows 1 GiB; a larger label is taken for a wrong label array.
MAX_CLASSES = 2**16

# The settings a recipe fills (each left at None takes the recipe's value): "fast" (the default)
# is the recipe that reached the benchmark targets in the fewest passes over the rows (L-BFGS
# from k-means++ keys; benchmarks/time_to_quality.py), "adam" the best Adam recipe (the default
# before L-BFGS), "seed" the seed article's.
RECIPES: dict[str, dict[str, Any]] = {
    "fast": dict(optimizer="lbfgs", steps=15, init="kmeans", learning_rate=1e-2, relative_lr=True,
                 schedule="constant"),
    "adam": dict(optimizer="adam", steps=35, init="kmeans", learning_rate=3e-3, relative_lr=True,
                 schedule="cosine"),
    "seed": dict(optimizer="adam", steps=1000, init="normal", learning_rate=5e-4, relative_lr=False,
                 schedule="constant"),
}


def setting(default, help: str, *, type=None, choices: tuple | None = None, lo=None, hi=None,
            trajectory: bool = False, metavar: str | None = None, positional: bool = False,
            flag: str | None = None, toml: bool = True):
    """A configuration field. ``type`` is ``int``, ``float``, ``bool``, ``str`` or ``"ints"``
    (a list of integers), by default the type of ``default`` (``str`` for ``None``); ``lo``
    bounds numbers (exclusive when given as ``(value,)``), ``hi`` from above (inclusive); a
    ``None`` default allows ``None`` (which then means "the default rule"); ``flag`` replaces
    the command-line flag ``--name-with-dashes``; ``toml=False`` keeps it out of TOML files."""
    if type is None:
        type = str if default is None else builtins.type(default)
    meta = dict(help=help, type=type, choices=choices, lo=lo, hi=hi, trajectory=trajectory,
                metavar=metavar, positional=positional, nullable=default is None, flag=flag,
                toml=toml)
    return dataclasses.field(default=default, metadata=meta)


def check_value(name: str, value, meta: Mapping):
    """``value`` converted to the field's type, or a :class:`ConfigError`."""
    if value is None:
        if meta["nullable"]:
            return None
        raise ConfigError(name, value, "must be given")
    kind = meta["type"]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, value, "must be true or false")
        return value
    if kind in (int, float):
        abc, what = (numbers.Integral, "an integer") if kind is int else (numbers.Real, "a number")
        if isinstance(value, bool) or not isinstance(value, abc):
            raise ConfigError(name, value, f"must be {what}")
        value = kind(value)
        if kind is float and not math.isfinite(value):
            raise ConfigError(name, value, "must be finite")
    elif kind == "ints":
        items = value.split(",") if isinstance(value, str) else value
        try:
            value = [check_value(name, int(v) if isinstance(v, str) else v, {**meta, "type": int})
                     for v in items]
        except (TypeError, ValueError):
            raise ConfigError(name, value, "must be a list of integers") from None
        if not value:
            raise ConfigError(name, value, "must name at least one value")
        return value
    elif not isinstance(value, str):
        raise ConfigError(name, value, "must be a string")
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(name, value, f"must be one of {', '.join(meta['choices'])}")
    lo, hi = meta["lo"], meta["hi"]
    if isinstance(lo, tuple) and value <= lo[0]:
        raise ConfigError(name, value, f"must be greater than {lo[0]}")
    if lo is not None and not isinstance(lo, tuple) and value < lo:
        raise ConfigError(name, value, f"must be at least {lo}")
    if hi is not None and value > hi:
        raise ConfigError(name, value, f"must be at most {hi}")
    return value


class Validated:
    """``__post_init__`` checks and normalises every field (frozen dataclasses)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_value(f.name, getattr(self, f.name), f.metadata))
        self._validate()

    def _validate(self) -> None:
        pass

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class FitConfig(Validated):
    """Everything that says what a fit computes and how (the Python keywords of
    :func:`scalemem.fit`, the flags of ``scalemem fit``)."""

    prototypes: int = setting(64, "number of prototypes P (rows of K and V)", lo=1, trajectory=True,
                              metavar="P")
    recipe: str = setting("fast", "settings that optimizer, steps, init, learning_rate, "
                          "relative_lr and schedule take when not given: 'fast' (k-means++ keys, "
                          "15 L-BFGS steps), 'adam' (k-means++ keys, 35 steps of cosine Adam at "
                          "3e-3 relative) or 'seed' (the seed article's: 0.01·normal keys, Adam "
                          "5e-4, 1000 steps)", choices=tuple(RECIPES), trajectory=True,
                          metavar="NAME")
    steps: int | None = setting(None, "optimiser steps (default: the recipe's)", type=int, lo=0,
                                metavar="S")
    init: str | None = setting(None, "initial keys: 'normal' (0.01·normal(seed)), 'kmeans' "
                               "(k-means++ centres of the keys at the logit scale with the lowest "
                               "exact loss) or 'sample' (random rows at that scale) (default: the "
                               "recipe's; 'given' in Python: keys passed as init=array)",
                               choices=("normal", "kmeans", "sample", "given"), trajectory=True,
                               metavar="KIND")
    seed: int = setting(0, "seed of the initial keys (0 … 2⁶³-1)", lo=0, hi=MAX_SEED,
                        trajectory=True, metavar="N")
    key_bias: bool = setting(False, "learn a per-prototype logit bias (softmax(Q Kᵀ + b); with "
                             "init kmeans it starts as a normalised RBF kernel)", trajectory=True)
    optimizer: str | None = setting(None, "optimiser of K: 'lbfgs' (quasi-Newton steps along a "
                                    "line search of exact losses, about two passes over the "
                                    "rows a step) or 'adam' ('custom' in Python: an optax "
                                    "transformation passed as optimizer=) (default: the "
                                    "recipe's; with the fast recipe, 'adam' takes the adam "
                                    "recipe's settings)", choices=("adam", "lbfgs", "custom"),
                                    trajectory=True, metavar="NAME")
    lbfgs_memory: int = setting(10, "L-BFGS: pairs of key and gradient differences kept for its "
                                "curvature estimate (1 … 1000)", lo=1, hi=1000, trajectory=True,
                                metavar="M")
    learning_rate: float | None = setting(None, "Adam: peak learning rate; L-BFGS: the root mean "
                                          "square of its first step (default: the recipe's)",
                                          type=float, lo=(0.0,), trajectory=True, metavar="LR")
    relative_lr: bool | None = setting(None, "the learning rate is relative to the spread of the "
                                       "keys: Adam's step is learning_rate/σ, σ the root mean "
                                       "square of the key columns' standard deviations (over the "
                                       "rows k-means reads), so one rate suits keys of any scale "
                                       "(default: the recipe's)", type=bool, trajectory=True)
    schedule: str | None = setting(None, "learning-rate schedule: 'constant' or 'cosine' (decays "
                                   "to 0 at the last step); default: the recipe's",
                                   choices=("constant", "cosine"), trajectory=True, metavar="KIND")
    warmup_steps: int = setting(0, "steps of linear warm-up from 0 to the learning rate", lo=0,
                                trajectory=True, metavar="W")
    ridge: float = setting(1e-6, "ridge λ of the exact solve for V", lo=0.0, trajectory=True,
                           metavar="λ")
    dtype: str = setting("float32", "compute dtype of the chunk products (statistics are always "
                         "summed in float64)", choices=("float32", "float64"), trajectory=True,
                         metavar="DTYPE")
    stats_precision: str = setting("highest", "matmul precision of the statistics pass: 'highest' "
                                   "(true float32), 'tf32' or 'bf16' (GPUs; need float32)",
                                   choices=PRECISIONS, trajectory=True, metavar="PREC")
    grad_precision: str = setting("highest", "matmul precision of the gradient pass (as "
                                  "--stats-precision)", choices=PRECISIONS, trajectory=True,
                                  metavar="PREC")
    one_pass: bool = setting(False, "streamed data: one read per step (statistics at K_t and the "
                             "gradient at the previous step's V); implies streaming; Adam only",
                             trajectory=True)
    residency: str = setting("auto", "where the rows live: 'resident' (on the devices, read once), "
                             "'streamed' (read from the store every pass) or 'auto' (resident when "
                             "they fit the memory budget)", choices=RESIDENCIES, metavar="WHERE")
    chunk_rows: int | None = setting(None, "rows per chunk of the computation (default: 2²²/P on a "
                                     "CPU, 2²⁷/P on a GPU, 4096 when streamed)", type=int, lo=1,
                                     trajectory=True, metavar="R")
    chunks_per_block: int = setting(4, "streamed: chunks per read and device transfer", lo=1,
                                    metavar="B")
    val_every: int = setting(1, "with validation rows: evaluate them every K steps (and at the "
                             "last)", lo=1, trajectory=True, metavar="K")
    patience: int = setting(10, "with validation rows: stop once this many evaluations in a row "
                            "did not improve the best validation RMSE, and keep the keys of the "
                            "best one (0: never stop early, keep the last keys)", lo=0,
                            trajectory=True, metavar="N")
    devices: int = setting(0, "devices to split the rows over (0: every device)", lo=0, metavar="D")
    processes: int = setting(0, "processes of a multi-process run (0: as launched; N > 1 joins N "
                             "processes through jax.distributed, coordinator from "
                             "JAX_COORDINATOR_ADDRESS and this process's index from "
                             "SCALEMEM_PROCESS_ID, or found under SLURM/Open MPI)", lo=0,
                             metavar="N")

    def _validate(self) -> None:
        # the fast recipe with optimizer 'adam' is the adam recipe (the fastest Adam settings)
        recipe = "adam" if self.recipe == "fast" and self.optimizer == "adam" else self.recipe
        for name, value in RECIPES[recipe].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.optimizer == "lbfgs" and (self.schedule != "constant" or self.warmup_steps):
            field = "schedule" if self.schedule != "constant" else "warmup_steps"
            raise ConfigError(field, getattr(self, field), "a learning-rate schedule is Adam's; "
                              "L-BFGS sizes its steps by a line search (use optimizer 'adam', "
                              "or recipe 'adam')")
        low = [f for f in ("stats_precision", "grad_precision") if getattr(self, f) != "highest"]
        if low and self.dtype != "float32":
            raise ConfigError(low[0], getattr(self, low[0]), "reduced-precision matmuls need "
                              "dtype float32")
        if self.one_pass and self.residency == "resident":
            raise ConfigError("one_pass", True, "one_pass halves the reads of streamed data; "
                              "with residency 'resident' there are none (use residency "
                              "'streamed' or 'auto')")
        if self.optimizer == "lbfgs" and self.one_pass:
            raise ConfigError("one_pass", True, "L-BFGS compares exact losses along a line search; "
                              "one_pass computes them at lagged solves (use optimizer 'adam', or "
                              "recipe 'adam')")
        if self.warmup_steps > self.steps:
            raise ConfigError("warmup_steps", self.warmup_steps, f"exceeds the {self.steps} steps")


@dataclasses.dataclass(frozen=True)
class DataConfig(Validated):
    """Which rows of which store a command reads (the CLI's data settings)."""

    store: str | None = setting(None, "the store: a Zarr directory or an HDF5 file (see `scalemem "
                                "data`)", positional=True, metavar="STORE")
    keys: str | None = setting(None, "keys view: NAME[COLUMNS][/SCALE|*SCALE] of a 2-D array of "
                               "the store, e.g. 'pixels[@key_columns]/255' (default: the store's, "
                               "or the model's)", trajectory=True, metavar="SPEC")
    values: str | None = setting(None, "values view, same syntax; with --values-are-labels the "
                                 "name of an integer label array (default: the store's, or the "
                                 "model's)", trajectory=True, metavar="SPEC")
    rows: str | None = setting(None, "rows: a split recorded in the store (fit10k, test60k, "
                               "fit60k, test10k for Fashion-MNIST; fit, test for synthetic stores) "
                               "or START:STOP (default: all rows)", trajectory=True,
                               metavar="NAME|START:STOP")
    val_rows: str | None = setting(None, "validation rows, evaluated while fitting (never the "
                                   "test rows): a split, START:STOP, or a fraction of the fit rows "
                                   "taken from their end, e.g. '5%' or '0.05' (those rows are "
                                   "then not fitted)", trajectory=True, metavar="ROWS|FRACTION")
    values_are_labels: bool = setting(False, "--values names an integer class-label array: fit its "
                                      "one-hot encoding (predictions are class probabilities; eval "
                                      "reports accuracy and log-loss)", trajectory=True)
    classes: int | None = setting(None, "number of classes with --values-are-labels (default: "
                                  "largest label + 1; at most 65536)", type=int, lo=2,
                                  hi=MAX_CLASSES, trajectory=True, metavar="C")

    def _validate(self) -> None:
        val_fraction(self.val_rows)  # a fraction must lie in (0, 1)


def val_fraction(spec) -> float | None:
    """The fraction a validation-rows setting names ('5%', '0.05'; the rows then come from the
    end of the fit rows), or ``None`` for a split name or START:STOP."""
    if not isinstance(spec, (str, float)) or isinstance(spec, str) and ":" in spec:
        return None
    text = spec.strip() if isinstance(spec, str) else spec
    try:
        f = float(text[:-1]) / 100 if isinstance(text, str) and text.endswith("%") else float(text)
    except ValueError:
        return None  # a split name
    if not 0 < f < 1:
        raise ConfigError("val_rows", spec, "a fraction of the fit rows must lie between 0 and 1 "
                          "(e.g. '5%' or 0.05)")
    return f


@dataclasses.dataclass(frozen=True)
class RunConfig(Validated):
    """Where a CLI fit writes and how often it checkpoints."""

    out: str | None = setting(None, "run folder to write (config.json, metrics.jsonl, "
                              "checkpoints/, model.npz); default runs/fit-DATE-TIME", metavar="RUN")
    checkpoint_every: int = setting(0, "write a checkpoint every K steps (0: not by step count)",
                                    lo=0, metavar="K")
    checkpoint_seconds: float = setting(300.0, "write a checkpoint every T seconds (0: not by "
                                        "time)", lo=0.0, metavar="T")
    keep_checkpoints: int = setting(3, "how many of the newest checkpoints to keep", lo=1,
                                    metavar="N")
    log_seconds: float = setting(10.0, "when stderr is not a terminal (a log file, a batch "
                                 "job): seconds between plain progress lines", lo=(0.0,),
                                 metavar="T")
    compile_cache: bool = setting(True, "keep compiled programs in a cache folder "
                                  "($SCALEMEM_CACHE_DIR, else the user cache folder) so a repeated "
                                  "or resumed run starts fast")


def same(cls, name: str, **changes):
    """A field declared like ``cls``'s field ``name`` (for a command that shares the setting),
    with ``changes`` to its default or metadata (``help``, ...)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = changes.pop("default", f.default)
    return dataclasses.field(default=default, metadata={**f.metadata, **changes})


def check_fields(values: Mapping[str, Any], *classes) -> dict:
    """``values`` with each key that is a field of one of ``classes`` checked like that field
    (other keys kept as they are); a wrong type or range is a :class:`ConfigError` naming it."""
    fields = {f.name: f for c in classes for f in dataclasses.fields(c)}
    return {k: check_value(k, v, fields[k].metadata) if k in fields else v
            for k, v in values.items()}


def build(cls, values: Mapping[str, Any], *, strict: bool = False):
    """``cls(**values)`` for the keys ``cls`` has; with ``strict`` an unknown key is a
    :class:`ConfigError` naming it (and the closest setting)."""
    names = [f.name for f in dataclasses.fields(cls)]
    if strict:
        for k in values:
            if k not in names:
                close = difflib.get_close_matches(k, names, 1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(k, values[k], f"not a setting of {cls.__name__}{hint} "
                                  f"(settings: {', '.join(names)})")
    return cls(**{k: v for k, v in values.items() if k in names})
