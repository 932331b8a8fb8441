"""The ``scalemem`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._errors import ScalememError

__all__ = ["main"]


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _say(args, *parts) -> None:
    """Human-readable output: stdout normally, stderr under --json (stdout is the JSON)."""
    if getattr(args, "quiet", False):
        return
    print(*parts, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


# ---------------------------------------------------------------------------------- reproduce
def _add_reproduce(sub) -> None:
    p = sub.add_parser(
        "reproduce", help="the seed article's Fashion-MNIST table: test RMSE against P",
        description="Fit the seed article's protocol for each P (78 random key pixels, all 784 "
        "pixels as values, reference permutation, fit on the first 10,000 rows, test on the "
        "other 60,000; K0 = 0.01·normal, Adam lr 5e-4, 1000 steps, ridge 1e-6), print the "
        "table, and write OUTDIR/table.json and OUTDIR/rmse_vs_prototypes.png.")
    p.add_argument("--data-dir", required=True, type=Path,
                   help="folder with the four Fashion-MNIST IDX files (.gz or raw)")
    p.add_argument("--out", type=Path, default=Path("reproduce-out"),
                   help="output folder (default: %(default)s)")
    p.add_argument("--download", action="store_true",
                   help="download the official files into --data-dir first (needs internet; "
                   "checked against the official md5)")
    p.add_argument("--prototypes", type=_int_list, default=None,
                   help="comma-separated P values (default: 2,4,8,16,32,64,128,256)")
    p.add_argument("--steps", type=int, default=1000, help="Adam steps per fit (default 1000)")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default 5e-4)")
    p.add_argument("--ridge", type=float, default=1e-6, help="ridge λ (default 1e-6)")
    p.add_argument("--chunk-rows", type=int, default=4096, help="rows per chunk (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of K0 (default 0, the article's)")
    p.add_argument("--fit-split", default="fit10k",
                   help="rows to fit: fit10k (article) or fit60k (full data); default fit10k")
    p.add_argument("--test-split", default=None,
                   help="rows to test: test60k or test10k (default: the complement of --fit-split)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=_run_reproduce)


def _run_reproduce(args) -> dict:
    from ._reproduce import DEFAULT_PROTOTYPES, SEED_TABLE, reproduce
    from .datasets import fashion_mnist

    if args.download:
        fashion_mnist.download(args.data_dir)
    test = args.test_split or {"fit10k": "test60k", "fit60k": "test10k"}.get(args.fit_split)
    if test is None:
        raise ScalememError(f"--fit-split {args.fit_split}: give --test-split as well")
    Qf, Xf, Qt, Xt = fashion_mnist.reference_split(args.data_dir, args.fit_split, test)
    Ps = args.prototypes or list(DEFAULT_PROTOTYPES)
    args.out.mkdir(parents=True, exist_ok=True)
    _say(args, f"fit {args.fit_split} ({len(Qf)} rows), test {test} ({len(Qt)} rows), "
               f"{args.steps} steps")
    _say(args, f"{'P':>5} {'test RMSE':>10} {'seed':>9} {'train':>9} {'seconds':>8}")

    def on_row(r):
        seed = f"{r['seed_rmse']:.6f}" if r["seed_rmse"] is not None else "-"
        _say(args, f"{r['prototypes']:>5} {r['rmse']:>10.6f} {seed:>9} {r['train_rmse']:>9.6f} "
                   f"{r['seconds']:>8.1f}")

    rows = reproduce(Qf, Xf, Qt, Xt, Ps, steps=args.steps, learning_rate=args.lr,
                     ridge=args.ridge, chunk_rows=args.chunk_rows, seed=args.seed, on_row=on_row)
    table = {"rows": [{k: r[k] for k in ("prototypes", "rmse", "seconds", "train_rmse",
                                         "seconds_per_step", "solve_events", "seed_rmse")}
                      for r in rows],
             "settings": {"fit_split": args.fit_split, "test_split": test, "steps": args.steps,
                          "lr": args.lr, "ridge": args.ridge, "chunk_rows": args.chunk_rows,
                          "seed": args.seed}}
    (args.out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    (args.out / "loss.json").write_text(json.dumps(
        {str(r["prototypes"]): r["loss"] for r in rows}) + "\n")
    if not args.no_plot:
        from ._plots import plot_rmse_vs_prototypes

        ref = SEED_TABLE if args.fit_split == "fit10k" else None
        png = plot_rmse_vs_prototypes(rows, args.out / "rmse_vs_prototypes.png", ref)
        table["plot"] = str(png)
    _say(args, f"wrote {args.out / 'table.json'}")
    return table


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalemem",
        description="Fit differentiable memory (attention as a lossy key-value store) to data "
        "of any size.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_reproduce(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except ScalememError as e:
        print(f"scalemem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scalemem {args.command}: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
