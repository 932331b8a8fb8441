"""The ``scalemem`` command line.

Commands::

    scalemem data fashion-mnist --from DIR --out STORE [--format zarr|hdf5]
    scalemem data synthetic --rows N --out STORE
    scalemem fit STORE --prototypes P --steps S --out RUN …      (or: fit --resume RUN)
    scalemem eval RUN [STORE] --rows NAME [--plots]
    scalemem predict MODEL [STORE] --out OUT
    scalemem reproduce --data-dir DIR

Settings come from, lowest precedence first: the built-in defaults, the resumed run's
``config.json`` (``fit --resume``), a TOML file (``--config FILE``: top-level keys apply to every
command that has such an option, a ``[fit]``/``[eval]``/``[predict]``/``[data]``/``[reproduce]``
table to that command only; keys are the option names, ``chunk_rows`` or ``chunk-rows``), and
the command-line flags, which always win. ``--json`` prints one JSON object on stdout (the
human-readable text then goes to stderr). Exit status: 0 done, 2 error (a typed
:class:`~scalemem.ScalememError`, message on stderr), 130/143 stopped by SIGINT/SIGTERM after a
checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from ._errors import ConfigError, ScalememError

__all__ = ["main", "build_parser"]


# ----------------------------------------------------------------------------------------------
# option specs: one table drives argparse, the TOML loader and the defaults


@dataclasses.dataclass(frozen=True)
class Opt:
    name: str  # dest, and the TOML key
    help: str
    type: Any = str  # str, int, float, bool, "int_list", "rows", "opt_float"
    default: Any = None
    positional: bool = False
    flag: str | None = None  # default: --name-with-dashes
    metavar: str | None = None
    choices: tuple | None = None
    toml: bool = True  # settable from --config

    @property
    def flag_text(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def _int_list(text) -> list[int]:
    if isinstance(text, list):
        return [int(t) for t in text]
    try:
        return [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _opt_float(text) -> float | None:
    v = float(text)
    return None if v == 0 else v


_CONVERT: dict[Any, Callable] = {str: str, int: int, float: float, "int_list": _int_list,
                                 "rows": str, "opt_float": _opt_float}


def _coerce(opt: Opt, value, where: str):
    """A TOML value as the option's type (TOML already types numbers, booleans and strings)."""
    bad = ConfigError(opt.name, value, f"in {where}: expected {_type_name(opt)}")
    if opt.type is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, bool):
        raise bad
    if opt.type is int and not isinstance(value, int):
        raise bad
    if opt.type in (float, "opt_float") and not isinstance(value, (int, float)):
        raise bad
    if opt.type is str and not isinstance(value, str):
        raise bad
    if opt.type == "rows" and isinstance(value, list):
        if len(value) != 2 or not all(isinstance(v, int) for v in value):
            raise bad
        return f"{value[0]}:{value[1]}"
    if opt.type == "rows" and not isinstance(value, str):
        raise bad
    try:
        v = _CONVERT[opt.type](value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise ConfigError(opt.name, value, f"in {where}: {e}") from e
    if opt.choices and v not in opt.choices:
        raise ConfigError(opt.name, value, f"in {where}: must be one of {', '.join(opt.choices)}")
    return v


def _type_name(opt: Opt) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            "int_list": "a list of integers", "rows": "a split name or 'START:STOP'",
            "opt_float": "a number"}[opt.type]


_CONFIG = Opt("config", "TOML file with settings for this command (top-level keys and a "
              "[COMMAND] table; command-line flags win)", metavar="FILE", toml=False)
_JSON = Opt("json", "print one JSON object with the result on stdout (human-readable text goes "
            "to stderr)", bool, False)
_QUIET = Opt("quiet", "no progress bar and no human-readable messages (errors still go to "
             "stderr)", bool, False)
_KEYS = Opt("keys", "keys view: NAME[COLUMNS][/SCALE|*SCALE] of a 2-D array of the store, e.g. "
            "'pixels[@key_columns]/255', 'features[0:10,20]' (default: the store's default keys "
            "view{ctx})", metavar="SPEC")
_VALUES = Opt("values", "values view, same syntax as --keys; with --values-are-labels the name "
              "of an integer label array, e.g. 'labels' (default: the store's default values "
              "view{ctx})", metavar="SPEC")
_ROWS = Opt("rows", "rows to use: a split recorded in the store (fit10k, test60k, fit60k, "
            "test10k, all for Fashion-MNIST; fit, test, all for synthetic stores) or START:STOP "
            "(default: all rows)", "rows", metavar="NAME|START:STOP")
_LABELS = Opt("values_are_labels", "--values names an integer class-label array: fit to its "
              "one-hot encoding, so predictions are class probabilities; eval then reports "
              "accuracy and log-loss{ctx}", bool, False)


def _with(opt: Opt, **kw) -> Opt:
    if "ctx" in kw:
        kw["help"] = opt.help.format(ctx=kw.pop("ctx"))
    return dataclasses.replace(opt, **kw)


FIT_OPTS = [
    Opt("store", "the store to fit: a Zarr directory or an HDF5 file (see `scalemem data`); "
        "with --resume, defaults to the run's store", positional=True, metavar="STORE"),
    _with(_KEYS, ctx=""), _with(_VALUES, ctx=""), _ROWS, _with(_LABELS, ctx=""),
    Opt("classes", "number of classes with --values-are-labels (default: largest label + 1)",
        int, None, metavar="C"),
    Opt("prototypes", "number of prototypes P (rows of K and V)", int, 64, metavar="P"),
    Opt("steps", "optimiser steps (a larger value on --resume extends the fit)", int, 1000,
        metavar="S"),
    Opt("lr", "Adam learning rate", float, 5e-4, metavar="LR"),
    Opt("ridge", "ridge λ of the exact solve for V", float, 1e-6, metavar="λ"),
    Opt("chunk_rows", "rows per chunk of the scanned computation (memory per chunk ∝ R·P)", int,
        4096, metavar="R"),
    Opt("chunks_per_block", "chunks per read and device transfer", int, 4, metavar="B"),
    Opt("seed", "seed of the initial keys K₀ = 0.01·normal", int, 0, metavar="N"),
    Opt("out", "run folder to write (config.json, metrics.jsonl, checkpoints/, model.npz); "
        "default runs/fit-DATE-TIME", metavar="RUN"),
    Opt("checkpoint_every", "write a checkpoint every K steps (0: not by step count)", int, 0,
        metavar="K"),
    Opt("checkpoint_seconds", "write a checkpoint every T seconds (0: not by time)", "opt_float",
        300.0, metavar="T"),
    Opt("keep_checkpoints", "how many of the newest checkpoints to keep", int, 3, metavar="N"),
    Opt("resume", "continue the run in folder RUN from its newest checkpoint (settings default "
        "to the run's config.json; on CPU the result is bit-identical to an uninterrupted fit)",
        metavar="RUN"),
    Opt("overwrite", "start over in an --out folder that already holds a run", bool, False),
    Opt("devices", "split the rows over this many devices (0: every device of the run; on a "
        "CPU-only machine that is 1). With more than one, statistics and gradients are "
        "psum-reduced across devices", int, 0, metavar="D"),
    Opt("distributed", "join a multi-process run through jax.distributed: coordinator, "
        "process count and id from JAX_COORDINATOR_ADDRESS, SCALEMEM_NUM_PROCESSES and "
        "SCALEMEM_PROCESS_ID, or found by JAX under SLURM/Open MPI (automatic when those "
        "variables are set). Each process reads only its own rows; process 0 writes the run "
        "folder", bool, False),
    _QUIET, _JSON, _CONFIG,
]

EVAL_OPTS = [
    Opt("run", "a run folder (or a model .npz file) to evaluate", positional=True,
        metavar="RUN"),
    Opt("store", "the store to evaluate on (default: the store the model was fitted on)",
        positional=True, metavar="STORE"),
    _with(_KEYS, ctx="; default: the model's"), _with(_VALUES, ctx="; default: the model's"),
    _ROWS, _with(_LABELS, ctx="; default: as the model was fitted"),
    Opt("chunk_rows", "rows per evaluated chunk", int, 8192, metavar="R"),
    Opt("plots", "write pictures to the run folder: loss curve, RMSE against P (with the "
        "sibling runs evaluated on the same rows) and, for 784-column values, a grid of "
        "original / key pixels / prediction (needs matplotlib)", bool, False),
    _QUIET, _JSON, _CONFIG,
]

PREDICT_OPTS = [
    Opt("model", "a model .npz file or a run folder", positional=True, metavar="MODEL"),
    Opt("store", "the store with the keys (default: the store the model was fitted on)",
        positional=True, metavar="STORE"),
    _with(_KEYS, ctx="; default: the model's"), _ROWS,
    Opt("out", "store to write: a Zarr directory, or an HDF5 file (.h5/.hdf5); array "
        "'predictions' (rows × value columns), plus 'predicted_labels' for a label model",
        metavar="OUT"),
    Opt("format", "format of --out (default: from its suffix, zarr otherwise)",
        choices=("zarr", "hdf5"), metavar="{zarr,hdf5}"),
    Opt("chunk_rows", "rows predicted and written per chunk", int, 8192, metavar="R"),
    Opt("overwrite", "replace an existing --out", bool, False),
    _QUIET, _JSON, _CONFIG,
]

DATA_FMNIST_OPTS = [
    Opt("from_dir", "folder with the four Fashion-MNIST IDX files (.gz or raw)", flag="--from",
        metavar="DIR"),
    Opt("out", "store to write (Zarr directory or HDF5 file)", metavar="STORE"),
    Opt("format", "store format (default: hdf5 for a .h5/.hdf5 name, else zarr)",
        choices=("zarr", "hdf5"), metavar="{zarr,hdf5}"),
    Opt("download", "download the official files into --from first (needs internet; checked "
        "against the official md5)", bool, False),
    Opt("chunk_rows", "rows per stored chunk (default: 16384)", int, None, metavar="R"),
    Opt("overwrite", "replace an existing store", bool, False),
    _QUIET, _JSON, _CONFIG,
]

DATA_SYNTH_OPTS = [
    Opt("out", "store to write (Zarr directory or HDF5 file)", metavar="STORE"),
    Opt("rows", "number of rows", int, None, metavar="N"),
    Opt("key_dim", "key columns", int, 78, metavar="M"),
    Opt("value_dim", "value columns", int, 784, metavar="N"),
    Opt("latent_dim", "latent dimension of the generator", int, 8, metavar="D"),
    Opt("noise", "noise level", float, 0.05, metavar="X"),
    Opt("dtype", "stored dtype (uint8 data gets views scaled by 1/255)",
        choices=("uint8", "float32"), default="uint8", metavar="{uint8,float32}"),
    Opt("format", "store format (default: hdf5 for a .h5/.hdf5 name, else zarr)",
        choices=("zarr", "hdf5"), metavar="{zarr,hdf5}"),
    Opt("seed", "generator seed", int, 0, metavar="N"),
    Opt("chunk_rows", "rows per stored chunk (default: 4096-16384, chunks ≤ 16 MiB)", int, None,
        metavar="R"),
    Opt("overwrite", "replace an existing store", bool, False),
    _QUIET, _JSON, _CONFIG,
]

REPRODUCE_OPTS = [
    Opt("data_dir", "folder with the four Fashion-MNIST IDX files (.gz or raw)", metavar="DIR"),
    Opt("out", "output folder", default="reproduce-out", metavar="OUT"),
    Opt("download", "download the official files into --data-dir first (needs internet; "
        "checked against the official md5)", bool, False),
    Opt("prototypes", "comma-separated P values (default: 2,4,8,16,32,64,128,256)", "int_list",
        None, metavar="P,P,…"),
    Opt("steps", "Adam steps per fit", int, 1000, metavar="S"),
    Opt("lr", "Adam learning rate", float, 5e-4, metavar="LR"),
    Opt("ridge", "ridge λ", float, 1e-6, metavar="λ"),
    Opt("chunk_rows", "rows per chunk (default: 2²²/P rows, within 1024-16384)", int, None,
        metavar="R"),
    Opt("seed", "seed of K0 (0 is the article's)", int, 0, metavar="N"),
    Opt("fit_split", "rows to fit: fit10k (article) or fit60k (full data)", default="fit10k",
        metavar="NAME"),
    Opt("test_split", "rows to test: test60k or test10k (default: the complement of "
        "--fit-split)", metavar="NAME"),
    Opt("no_plot", "skip the PNG", bool, False),
    _JSON, _QUIET, _CONFIG,
]


@dataclasses.dataclass(frozen=True)
class Command:
    key: str  # "fit", "data fashion-mnist", …
    table: str  # TOML table
    opts: list
    run: Callable


def _help(opt: Opt) -> str:
    text = opt.help.replace("%", "%%")
    if opt.default is not None and opt.default is not False and "default" not in opt.help:
        text += f" (default: {opt.default})"
    if opt.toml and not opt.positional:
        text += f" [config: {opt.name}]"
    return text


def _add_opts(p: argparse.ArgumentParser, cmd: Command) -> None:
    for o in cmd.opts:
        if o.positional:
            p.add_argument(o.name, nargs="?", default=argparse.SUPPRESS, metavar=o.metavar,
                           help=_help(o) + f" [config: {o.name}]")
        elif o.type is bool:
            p.add_argument(o.flag_text, dest=o.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=_help(o))
        else:
            conv = _CONVERT[o.type]
            p.add_argument(o.flag_text, dest=o.name, type=conv, default=argparse.SUPPRESS,
                           metavar=o.metavar, choices=o.choices, help=_help(o))
    p.set_defaults(_command=cmd)


# ----------------------------------------------------------------------------------------------
# config resolution


def _read_toml(path: str) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError("config", path, "no such file") from e
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError("config", path, f"not a valid TOML file ({e})") from e


def _all_names() -> set[str]:
    return {o.name for c in COMMANDS for o in c.opts if o.toml}


def _toml_settings(path: str, cmd: Command) -> dict:
    data = _read_toml(path)
    tables = {c.table for c in COMMANDS}
    names = {o.name: o for o in cmd.opts if o.toml}
    known = _all_names()
    out: dict[str, Any] = {}

    def take(items: dict, where: str, strict: bool) -> None:
        for raw, value in items.items():
            key = raw.replace("-", "_")
            if key == "from":
                key = "from_dir"
            if key in names:
                out[key] = _coerce(names[key], value, where)
            elif strict or key not in known:
                raise ConfigError(raw, value, f"in {where}: not a setting of `scalemem "
                                  f"{cmd.key}` (settings: {', '.join(sorted(names))})")

    top = {k: v for k, v in data.items() if not (k in tables and isinstance(v, dict))}
    take(top, path, strict=False)
    section = data.get(cmd.table)
    if isinstance(section, dict):
        take(section, f"{path} [{cmd.table}]", strict=True)
    return out


def resolve(cmd: Command, given: dict) -> dict:
    """Defaults < resumed run's config.json < TOML (--config) < command-line flags."""
    cfg = {o.name: o.default for o in cmd.opts}
    toml = _toml_settings(given["config"], cmd) if given.get("config") else {}
    if cmd.key == "fit":
        resume = given.get("resume", toml.get("resume"))
        if resume is not None:
            from ._run import saved_config

            saved = saved_config(resume)
            cfg.update({k: v for k, v in saved.items() if k in cfg and k not in (
                "resume", "json", "quiet", "config", "overwrite")})
    cfg.update(toml)
    cfg.update({k: v for k, v in given.items() if k in cfg})
    return cfg


# ----------------------------------------------------------------------------------------------
# commands


class _Out:
    """Human-readable output: stdout, or stderr under --json; nothing under --quiet."""

    def __init__(self, cfg: dict):
        self.json, self.quiet = bool(cfg.get("json")), bool(cfg.get("quiet"))

    def __call__(self, *parts) -> None:
        if not self.quiet:
            print(*parts, file=sys.stderr if self.json else sys.stdout, flush=True)


def _store_format(out, fmt):
    if fmt:
        return fmt
    return "hdf5" if Path(out).suffix.lower() in (".h5", ".hdf5", ".hdf") else "zarr"


def _need(cfg: dict, name: str, flag: str, what: str) -> None:
    if cfg.get(name) is None:
        raise ConfigError(name, None, f"missing: give {flag} ({what})")


def _run_data_fmnist(cfg: dict, say: _Out) -> dict:
    import time

    from ._store import write_fashion_mnist
    from .datasets import fashion_mnist

    _need(cfg, "from_dir", "--from DIR", "the folder with the Fashion-MNIST IDX files")
    _need(cfg, "out", "--out STORE", "the store to write")
    fmt = _store_format(cfg["out"], cfg["format"])
    if cfg["download"]:
        fashion_mnist.download(cfg["from_dir"])
    t0 = time.perf_counter()
    path = write_fashion_mnist(cfg["from_dir"], cfg["out"], format=fmt,
                               overwrite=cfg["overwrite"], chunk_rows=cfg["chunk_rows"])
    res = {"store": str(path), "format": fmt, "rows": 70000,
           "arrays": ["pixels", "labels", "key_columns", "source_row"],
           "splits": ["fit10k", "test60k", "fit60k", "test10k", "all"],
           "seconds": time.perf_counter() - t0}
    say(f"wrote {path} ({fmt}): pixels 70000×784 uint8, labels, key_columns; splits "
        f"{', '.join(res['splits'])}")
    return res


def _run_data_synthetic(cfg: dict, say: _Out) -> dict:
    from ._store import write_synthetic

    _need(cfg, "out", "--out STORE", "the store to write")
    _need(cfg, "rows", "--rows N", "the number of rows")
    fmt = _store_format(cfg["out"], cfg["format"])
    path = write_synthetic(cfg["out"], cfg["rows"], key_dim=cfg["key_dim"],
                           value_dim=cfg["value_dim"], latent_dim=cfg["latent_dim"],
                           dtype=cfg["dtype"], format=fmt, seed=cfg["seed"], noise=cfg["noise"],
                           chunk_rows=cfg["chunk_rows"], overwrite=cfg["overwrite"])
    say(f"wrote {path} ({fmt}, {cfg['rows']} rows, keys {cfg['key_dim']} × {cfg['dtype']}, "
        f"values {cfg['value_dim']} × {cfg['dtype']}; splits all, fit, test)")
    return {"store": str(path), "format": fmt, "rows": cfg["rows"], "arrays": ["keys", "values"],
            "splits": ["all", "fit", "test"]}


def _run_fit(cfg: dict, say: _Out) -> dict:
    from ._run import fit_run

    resume = cfg.get("resume")
    if resume is not None:
        if cfg.get("out") is not None and Path(cfg["out"]).resolve() != Path(resume).resolve():
            raise ConfigError("out", cfg["out"], f"--resume continues the run in {resume}; "
                              "leave out --out (or give the same folder)")
        cfg["out"] = resume
    elif cfg.get("store") is None:
        raise ConfigError("store", None, "give the store to fit (scalemem fit STORE …), or "
                          "--resume RUN")
    from ._distributed import initialize

    joining = bool(cfg.get("distributed")) or any(
        os.environ.get(v) for v in ("JAX_COORDINATOR_ADDRESS", "SCALEMEM_NUM_PROCESSES"))
    if joining:  # launched as one process of several: join them
        if cfg.get("json"):
            _stdout_for_json_only()
        initialize()
    return fit_run(cfg, resume=resume is not None, say=say, progress=not cfg["quiet"])


def _run_eval(cfg: dict, say: _Out) -> dict:
    from ._run import eval_run

    return eval_run(cfg, say=say)


def _run_predict(cfg: dict, say: _Out) -> dict:
    from ._run import predict_run

    return predict_run(cfg, say=say)


def _run_reproduce(cfg: dict, say: _Out) -> dict:
    from ._reproduce import DEFAULT_PROTOTYPES, SEED_TABLE, reproduce
    from .datasets import fashion_mnist

    _need(cfg, "data_dir", "--data-dir DIR", "the folder with the Fashion-MNIST IDX files")
    data_dir, out = Path(cfg["data_dir"]), Path(cfg["out"])
    if cfg["download"]:
        fashion_mnist.download(data_dir)
    fit_split = cfg["fit_split"]
    test = cfg["test_split"] or {"fit10k": "test60k", "fit60k": "test10k"}.get(fit_split)
    if test is None:
        raise ConfigError("fit_split", fit_split, "give --test-split as well")
    Qf, Xf, Qt, Xt = fashion_mnist.reference_split(data_dir, fit_split, test)
    Ps = cfg["prototypes"] or list(DEFAULT_PROTOTYPES)
    out.mkdir(parents=True, exist_ok=True)
    say(f"fit {fit_split} ({len(Qf)} rows), test {test} ({len(Qt)} rows), {cfg['steps']} steps")
    say(f"{'P':>5} {'test RMSE':>10} {'seed':>9} {'train':>9} {'seconds':>8}")

    def on_row(r):
        seed = f"{r['seed_rmse']:.6f}" if r["seed_rmse"] is not None else "-"
        say(f"{r['prototypes']:>5} {r['rmse']:>10.6f} {seed:>9} {r['train_rmse']:>9.6f} "
            f"{r['seconds']:>8.1f}")

    rows = reproduce(Qf, Xf, Qt, Xt, Ps, steps=cfg["steps"], learning_rate=cfg["lr"],
                     ridge=cfg["ridge"], chunk_rows=cfg["chunk_rows"], seed=cfg["seed"],
                     on_row=on_row)
    table = {"rows": [{k: r[k] for k in ("prototypes", "rmse", "seconds", "train_rmse",
                                         "seconds_per_step", "solve_events", "seed_rmse")}
                      for r in rows],
             "settings": {"fit_split": fit_split, "test_split": test, "steps": cfg["steps"],
                          "lr": cfg["lr"], "ridge": cfg["ridge"],
                          "chunk_rows": cfg["chunk_rows"], "seed": cfg["seed"]}}
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "loss.json").write_text(json.dumps(
        {str(r["prototypes"]): r["loss"] for r in rows}) + "\n")
    if not cfg["no_plot"]:
        from ._plots import plot_rmse_vs_prototypes

        ref = SEED_TABLE if fit_split == "fit10k" else None
        png = plot_rmse_vs_prototypes(rows, out / "rmse_vs_prototypes.png", ref)
        table["plot"] = str(png)
    say(f"wrote {out / 'table.json'}")
    return table


COMMANDS = [
    Command("data fashion-mnist", "data", DATA_FMNIST_OPTS, _run_data_fmnist),
    Command("data synthetic", "data", DATA_SYNTH_OPTS, _run_data_synthetic),
    Command("fit", "fit", FIT_OPTS, _run_fit),
    Command("eval", "eval", EVAL_OPTS, _run_eval),
    Command("predict", "predict", PREDICT_OPTS, _run_predict),
    Command("reproduce", "reproduce", REPRODUCE_OPTS, _run_reproduce),
]
_BY_KEY = {c.key: c for c in COMMANDS}

_EPILOG = ("Settings: defaults < the resumed run's config.json < --config FILE (TOML) < "
           "command-line flags. Exit status: 0 done, 2 error, 130/143 stopped by SIGINT/SIGTERM "
           "(a checkpoint was written; continue with `scalemem fit --resume RUN`).")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="scalemem", formatter_class=fmt, epilog=_EPILOG,
        description="Fit differentiable memory (attention as a lossy key-value store) to data "
        "of any size.\n\nTypical session:\n"
        "  scalemem data fashion-mnist --from DIR --out fm.zarr\n"
        "  scalemem fit fm.zarr --rows fit60k --prototypes 64 --steps 1000 --out runs/p64\n"
        "  scalemem eval runs/p64 --rows test10k --plots\n"
        "  scalemem predict runs/p64 fm.zarr --rows test10k --out pred.zarr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    data = sub.add_parser("data", help="write a store (Zarr or HDF5) to fit from",
                          description="Write a dataset as a chunked store (Zarr v3 directory or "
                          "HDF5 file) with row splits and default key/value views.", epilog=_EPILOG)
    dsub = data.add_subparsers(dest="dataset", metavar="DATASET")
    dsub.required = True
    _add_opts(dsub.add_parser(
        "fashion-mnist", help="Fashion-MNIST from its IDX files",
        description="Write Fashion-MNIST (70000 rows in the reference permutation: pixels "
        "70000×784 uint8, labels, key_columns; splits fit10k, test60k, fit60k, test10k, all; "
        "default views keys pixels[@key_columns]/255, values pixels/255).", epilog=_EPILOG),
        _BY_KEY["data fashion-mnist"])
    _add_opts(dsub.add_parser(
        "synthetic", help="a synthetic data set of any size",
        description="Write a synthetic store (keys: a noisy projection of a Gaussian latent; "
        "values: a smooth function of it), generated block by block; arrays keys and values, "
        "splits all, fit, test.", epilog=_EPILOG), _BY_KEY["data synthetic"])
    _add_opts(sub.add_parser(
        "fit", help="fit a memory to a store (checkpointed, resumable)", epilog=_EPILOG,
        description="Fit P prototypes: V is solved exactly (ridge, float64 statistics) at every "
        "step and K moved by Adam; the store is streamed chunk by chunk. Writes the run folder "
        "RUN: config.json (the resolved settings), metrics.jsonl (step, loss, train RMSE, "
        "seconds, rows/s), checkpoints/ and model.npz. SIGINT/SIGTERM write a checkpoint and "
        "stop; `scalemem fit --resume RUN` continues bit-identically. Tip: set "
        "JAX_COMPILATION_CACHE_DIR to a folder so that a resumed fit reuses the compiled "
        "programs."), _BY_KEY["fit"])
    _add_opts(sub.add_parser(
        "eval", help="evaluate a model on rows of a store", epilog=_EPILOG,
        description="Evaluate a model on a store: RMSE per value entry and the row count "
        "(with labels also accuracy and log-loss, probabilities clipped to [1e-7, 1] and "
        "renormalised). Writes RUN/eval.json."), _BY_KEY["eval"])
    _add_opts(sub.add_parser(
        "predict", help="write a model's predictions to a Zarr/HDF5 store", epilog=_EPILOG,
        description="Predict softmax(Q Kᵀ) V for every selected row of a store and write the "
        "predictions chunk by chunk to a new store (written atomically)."), _BY_KEY["predict"])
    _add_opts(sub.add_parser(
        "reproduce", help="the seed article's Fashion-MNIST table: test RMSE against P",
        epilog=_EPILOG,
        description="Fit the seed article's protocol for each P (78 random key pixels, all 784 "
        "pixels as values, reference permutation, fit on the first 10,000 rows, test on the "
        "other 60,000; K0 = 0.01·normal, Adam lr 5e-4, 1000 steps, ridge 1e-6), print the "
        "table, and write OUT/table.json and OUT/rmse_vs_prototypes.png."),
        _BY_KEY["reproduce"])
    return parser


def _stdout_for_json_only() -> None:
    """Keep stdout for the ``--json`` object in a multi-process run: the collectives library
    that ``jax.distributed`` loads (gloo on CPUs) prints connection lines on file descriptor 1,
    so that descriptor is pointed at stderr and Python's ``sys.stdout`` writes to the original
    stdout through a descriptor of its own."""
    sys.stdout.flush()
    original = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(original, "w", buffering=1)


def main(argv: list[str] | None = None) -> int:
    # The LAPACK calls of a step are small P×P factorisations: one BLAS thread beats a pool whose
    # threads spin against XLA's. SciPy's OpenBLAS, which JAX's CPU LAPACK kernels use, is loaded
    # at the first solve, after this line; a value set by the user wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from ._run import RunInterrupted

    parser = build_parser()
    ns = parser.parse_args(argv)
    cmd: Command = ns._command
    given = {k: v for k, v in vars(ns).items() if not k.startswith("_")}
    name = cmd.key
    json_out = bool(given.get("json"))
    try:
        cfg = resolve(cmd, given)
        json_out = bool(cfg.get("json"))
        result = cmd.run(cfg, _Out(cfg))
    except RunInterrupted as e:
        print(f"scalemem {name}: {e}", file=sys.stderr, flush=True)
        if json_out:
            print(json.dumps(e.result()), flush=True)
        return e.exit_code
    except ScalememError as e:
        print(f"scalemem {name}: error: {e}", file=sys.stderr, flush=True)
        if json_out:
            print(json.dumps({"error": type(e).__name__, "message": str(e),
                              "field": getattr(e, "field", None)}), flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"scalemem {name}: interrupted", file=sys.stderr)
        return 130
    if json_out:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
