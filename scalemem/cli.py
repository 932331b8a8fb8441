"""The ``scalemem`` command (``python -m scalemem``); see :mod:`scalemem._run.cli`."""

from ._run.cli import build_parser, main

__all__ = ["main", "build_parser"]

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
