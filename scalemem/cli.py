"""The ``scalemem`` command (``python -m scalemem``); see :mod:`scalemem._run.cli`."""

from ._run.cli import build_parser, console, main

__all__ = ["main", "build_parser", "console"]

if __name__ == "__main__":  # pragma: no cover
    console()
