"""The ``scalemem`` command line, generated from the configuration dataclasses: every flag is a
field of :mod:`scalemem._config` or :mod:`.options`. Settings precedence, ``--json`` and exit
status: docs/design.md, "The command line"."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import tomllib
import warnings
from typing import Any, Callable

from .. import __version__
from .._config import DataConfig, FitConfig, RunConfig, check_value
from .._errors import ConfigError, NumericsWarning, ScalememError
from . import commands
from .options import (EvalConfig, FashionMNISTConfig, FitSession, PredictConfig,
                      ReproduceConfig, Session, SyntheticConfig)
from .runs import CONFIG_FILE, InterruptedEarly, RunInterrupted, saved_config, to_json

__all__ = ["main", "build_parser", "resolve", "COMMANDS", "Command"]


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its settings are the fields of ``classes``; its help line and description
    are the first line and the rest of ``run``'s docstring."""
    key: str  # "fit", "data fashion-mnist", …
    table: str  # its TOML table
    classes: tuple  # the dataclasses whose fields are its settings
    run: Callable
    epilog: str = ""

    @property
    def help(self) -> str:
        return self.run.__doc__.split("\n", 1)[0]

    @property
    def description(self) -> str:
        return " ".join(self.run.__doc__.split("\n", 1)[1].split())

    def fields(self) -> list[dataclasses.Field]:
        """The fields of its classes; of two fields of one name the first class's wins
        (``reproduce --prototypes`` is its list of P, each fit's P comes from it)."""
        out: dict[str, dataclasses.Field] = {}
        for f in (f for c in self.classes for f in dataclasses.fields(c)):
            out.setdefault(f.name, f)
        return list(out.values())


COMMANDS = [
    Command("data fashion-mnist", "data", (FashionMNISTConfig, Session), commands.data_fmnist),
    Command("data synthetic", "data", (SyntheticConfig, Session), commands.data_synthetic),
    Command("fit", "fit", (DataConfig, FitConfig, RunConfig, FitSession), commands.fit,
            "SIGINT/SIGTERM write a checkpoint and stop (exit 130/143); `scalemem fit --resume "
            "RUN` continues bit-identically."),
    Command("eval", "eval", (EvalConfig, Session), commands.evaluate),
    Command("predict", "predict", (PredictConfig, Session), commands.predict),
    Command("reproduce", "reproduce", (ReproduceConfig, FitConfig, Session), commands.reproduce),
]


def _flag(f) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _parse(f) -> Callable:
    """The argparse ``type=`` of a field: converts text and validates like the dataclass."""
    kind = f.metadata["type"]

    def parse(text):
        value = {int: int, float: float}.get(kind, str)(text) if kind != "ints" else text
        try:
            return check_value(f.name, value, f.metadata)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = {int: "integer", float: "number"}.get(kind, "value")
    return parse


def _help(f) -> str:
    text = f.metadata["help"].replace("%", "%%")
    if f.default is not None and f.default is not False and "default" not in text:
        text += f" (default: {f.default})"
    return text + (f" [config: {f.name}]" if f.metadata["toml"] else "")


def _add_options(p: argparse.ArgumentParser, cmd: Command) -> None:
    groups = {}
    for f in cmd.fields():
        owner = next(c.__name__ for c in cmd.classes if f in dataclasses.fields(c))
        g = groups.setdefault(owner, p.add_argument_group(owner))
        kw = dict(default=argparse.SUPPRESS, help=_help(f))
        if f.metadata["positional"]:
            g.add_argument(f.name, nargs="?", metavar=f.metadata["metavar"], **kw)
        elif f.metadata["type"] is bool:
            g.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction, **kw)
        else:
            g.add_argument(_flag(f), dest=f.name, type=_parse(f), metavar=f.metadata["metavar"],
                           **kw)
    p.set_defaults(_command=cmd)


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (exit 2) keep their message for ``--json``."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        e = SystemExit(2)
        e.message = f"{self.prog}: {message}"
        raise e


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="scalemem", formatter_class=fmt, allow_abbrev=False,  # a typo is an error
        description="Fit differentiable memory (attention as a lossy key-value store) to data\n"
        "of any size.\n\nTypical session:\n"
        "  scalemem data fashion-mnist --from DIR --out fm.zarr\n"
        "  scalemem fit fm.zarr --rows fit60k --prototypes 256 --out runs/p256\n"
        "  scalemem eval runs/p256 --rows test10k --plots\n"
        "  scalemem predict runs/p256 fm.zarr --rows test10k --out pred.zarr",
        epilog="Settings: defaults < the resumed run's config.json < --config FILE (TOML) <\n"
        "command-line flags. Exit status: 0 done, 2 error. The settings of a command:\n"
        "scalemem COMMAND --help.")
    parser.add_argument("--version", action="version", version=f"scalemem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data = sub.add_parser("data", help="write a store (Zarr or HDF5) to fit from",
                          description="Write a dataset as a chunked store (Zarr v3 directory or "
                          "HDF5 file) with row splits and default key/value views.",
                          allow_abbrev=False)
    dsub = data.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for cmd in COMMANDS:
        parent, name = (dsub, cmd.key.split()[1]) if cmd.key.startswith("data ") else (
            sub, cmd.key)
        # a command's description and epilog are prose: wrapped to the terminal's width
        _add_options(parent.add_parser(name, help=cmd.help, description=cmd.description,
                                       epilog=cmd.epilog or None, allow_abbrev=False), cmd)
    return parser


def _checked(key: str, value, meta, where: str):
    """``check_value`` whose error also names the file the value came from."""
    try:
        return check_value(key, value, meta)
    except ConfigError as e:
        why = str(e).removeprefix(f"{e.field}={e.value!r}: ")
        raise ConfigError(key, value, f"in {where}: {why}") from None


_MAX_TOML = 1 << 20  # a settings file is a few lines


def _toml_settings(path: str, cmd: Command) -> dict:
    """The settings of ``cmd`` in the TOML file ``path``: its top-level keys that are settings of
    some command, and its ``[TABLE]`` of ``cmd``, whose keys must all be ``cmd``'s."""
    try:
        if os.path.exists(path) and not os.path.isfile(path):  # a device, FIFO or folder
            raise ConfigError("config", path, "not a regular file")
        if os.path.exists(path) and os.path.getsize(path) > _MAX_TOML:
            raise ConfigError("config", path, f"larger than {_MAX_TOML >> 20} MiB: not a "
                              "settings file")
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError("config", path, "no such file") from e
    except (OSError, ValueError, RecursionError) as e:  # ValueError: also not UTF-8 text
        raise ConfigError("config", path, f"not a valid TOML file ({e})") from None
    tables = {c.table for c in COMMANDS}
    mine = {f.name: f for f in cmd.fields() if f.metadata["toml"]}
    known = {f.name for c in COMMANDS for f in c.fields() if f.metadata["toml"]}
    top = {k: v for k, v in data.items() if not (k in tables and isinstance(v, dict))}
    table = data[cmd.table] if isinstance(data.get(cmd.table), dict) else {}
    out: dict[str, Any] = {}
    for items, where, strict in ((top, path, False), (table, f"{path} [{cmd.table}]", True)):
        for raw, value in items.items():
            key = {"from": "from_dir"}.get(raw.replace("-", "_"), raw.replace("-", "_"))
            if key in mine:
                out[key] = _checked(key, value, mine[key].metadata, where)
            elif strict or key not in known:
                raise ConfigError(raw, value, f"in {where}: not a setting of `scalemem "
                                  f"{cmd.key}` (settings: {', '.join(sorted(mine))})")
    return out


def resolve(cmd: Command, given: dict) -> dict:
    """The command's settings, merged by precedence (validated when the command builds its
    configuration objects from them)."""
    cfg = {f.name: f.default for f in cmd.fields()}
    toml = _toml_settings(given["config"], cmd) if given.get("config") else {}
    resume = given.get("resume", toml.get("resume")) if cmd.key == "fit" else None
    if resume is not None:  # the run's config.json, each setting checked like a flag
        fields = {f.name: f for f in cmd.fields()}
        session = {f.name for f in dataclasses.fields(FitSession)}
        where = os.path.join(resume, CONFIG_FILE)
        cfg.update({k: _checked(k, v, fields[k].metadata, where)
                    for k, v in saved_config(resume).items() if k in cfg and k not in session})
    cfg.update(toml)
    cfg.update({k: v for k, v in given.items() if k in cfg})
    return cfg


def _stdout_gone() -> None:
    """stdout's reader went away (``cmd | head``, ``| true``) or it cannot be written (a full
    disk): what is still printed there goes to the null device, and the command carries on
    (a fit is not lost for want of its messages)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):  # no file descriptor (a replaced sys.stdout): leave it
        pass


def _print_out(text: str) -> OSError | None:
    """``text`` on stdout; the error (and stdout silenced) when it cannot be written."""
    try:
        print(text, flush=True)
        return None
    except OSError as e:  # BrokenPipeError, ENOSPC, …
        _stdout_gone()
        return e


def _printer(cfg: dict) -> Callable[..., None]:
    """Human-readable output: stdout, or stderr under --json; nothing under --quiet."""

    def say(*parts) -> None:
        if cfg.get("quiet"):
            return
        if cfg.get("json"):
            print(*parts, file=sys.stderr, flush=True)
        else:
            _print_out(" ".join(map(str, parts)))

    return say


@contextlib.contextmanager
def _warnings_shown_as(prefix: str):
    """scalemem's own warnings (NumericsWarning) printed as one ``PREFIX: warning: …`` line on
    stderr, not with the Python source line that raised them; others as Python shows them."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, NumericsWarning):
            print(f"{prefix}: warning: {message}", file=sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = default


def main(argv: list[str] | None = None) -> int:
    # The LAPACK calls of a step are small P×P factorisations: one BLAS thread beats a pool whose
    # threads spin against XLA's. SciPy's OpenBLAS, which JAX's CPU LAPACK kernels use, is loaded
    # at the first solve, after this line; a value set by the user wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error: with --json, stdout still gets a JSON object
        if getattr(e, "message", None) and "--json" in (sys.argv[1:] if argv is None else argv):
            _print_out(to_json({"error": "UsageError", "message": e.message, "field": None}))
        raise
    cmd: Command = ns._command
    given = {k: v for k, v in vars(ns).items() if not k.startswith("_")}
    json_out = bool(given.get("json"))
    try:
        # Ctrl-C: a KeyboardInterrupt, except in `fit`, which keeps the immediate exit of
        # scalemem/__init__ until its own handlers take over (an exception raised inside one of
        # JAX's callbacks is swallowed, and the fit would run on)
        if threading.current_thread() is threading.main_thread() and cmd.key != "fit":
            signal.signal(signal.SIGINT, signal.default_int_handler)
        cfg = resolve(cmd, given)
        json_out = bool(cfg.get("json"))
        with _warnings_shown_as(f"scalemem {cmd.key}"):
            result = cmd.run(cfg, _printer(cfg))
    except RunInterrupted as e:
        print(f"scalemem {cmd.key}: {e}", file=sys.stderr, flush=True)
        if json_out:
            _print_out(to_json(e.result))
        return e.exit_code
    except (ScalememError, OSError) as e:  # OSError: a path the file system refuses
        print(f"scalemem {cmd.key}: error: {e}", file=sys.stderr, flush=True)
        if json_out:
            _print_out(to_json({"error": type(e).__name__, "message": str(e),
                                "field": getattr(e, "field", None)}))
        return 2
    except KeyboardInterrupt as e:
        if isinstance(e, InterruptedEarly):
            what = (f"{e} (the initial keys), nothing saved yet; start it again with: "
                    f"{e.resume}" if e.resume else
                    f"{e} (the data check), nothing was written: run the same command again")
        else:
            what = "interrupted"
        print(f"scalemem {cmd.key}: {what}", file=sys.stderr, flush=True)
        if json_out and isinstance(e, InterruptedEarly):
            _print_out(to_json(e.result))
        return 128 + getattr(e, "signum", signal.SIGINT)
    failed = _print_out(to_json(result)) if json_out else None
    if isinstance(failed, BrokenPipeError):  # the reader left: as a Unix tool ended by SIGPIPE
        return 128 + signal.SIGPIPE
    if failed is not None:
        print(f"scalemem {cmd.key}: error: the result could not be written to stdout ({failed}); "
              "the command itself completed", file=sys.stderr, flush=True)
        return 2
    return 0


def console() -> None:
    """The ``scalemem`` command (and ``python -m scalemem``): :func:`main`, then a quick exit
    with its status. Tearing the interpreter down (every module, XLA's client and its thread
    pools) took ~0.35 s after a 4-second fit on a CPU, 8% of the command; the exit handlers
    still run (``jax.distributed`` shutdown, logging), the output is flushed, and every file a
    command writes is complete (written atomically) before ``main`` returns. An exception
    from ``main`` (a usage error, a bug) exits the ordinary way."""
    code = main()
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython; else exit normally
    if run_exit_handlers is None:
        raise SystemExit(code)
    try:
        run_exit_handlers()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more to say
                pass
        os._exit(code)
