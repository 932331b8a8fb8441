#!/usr/bin/env python
"""Write a synthetic scalemem store of any size, generated and written block by block.

Keys are a random projection of a Gaussian latent plus noise; values are a smooth nonlinear
function of the latent plus noise (see ``scalemem._data.write_synthetic``). The store records
default views and ``all``/``fit``/``test`` splits, so ``open_source(OUT)`` and ``fit_source``
work on it directly. Memory use is a few row blocks, whatever ``--rows`` is.

Example::

    python scripts/make_synthetic_store.py out/synthetic-1m.zarr --rows 1000000
    python scripts/make_synthetic_store.py out/small.h5 --rows 20000 --format hdf5 --dtype float32
"""

from __future__ import annotations

import argparse
import sys
import time

from scalemem._errors import ScalememError
from scalemem._data.writer import FORMATS, write_synthetic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="store to write: a Zarr directory or an HDF5 file")
    p.add_argument("--rows", type=int, required=True, help="number of rows")
    p.add_argument("--key-dim", type=int, default=78, help="key columns (default 78)")
    p.add_argument("--value-dim", type=int, default=784, help="value columns (default 784)")
    p.add_argument("--latent-dim", type=int, default=8, help="latent dimension (default 8)")
    p.add_argument("--noise", type=float, default=0.05, help="noise level (default 0.05)")
    p.add_argument("--format", choices=FORMATS, default="zarr")
    p.add_argument("--dtype", choices=("uint8", "float32"), default="uint8",
                   help="stored dtype; uint8 data gets views scaled by 1/255")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows per stored chunk (default: 4096-16384, chunks of at most 16 MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = write_synthetic(a.out, a.rows, key_dim=a.key_dim, value_dim=a.value_dim,
                               latent_dim=a.latent_dim, dtype=a.dtype, format=a.format,
                               seed=a.seed, noise=a.noise, chunk_rows=a.chunk_rows,
                               overwrite=a.overwrite)
    except ScalememError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({a.format}, {a.rows} rows, keys {a.key_dim} × {a.dtype}, values "
          f"{a.value_dim} × {a.dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
