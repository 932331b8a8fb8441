"""Pictures (matplotlib is an optional extra: ``pip install scalemem[plot]``)."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .._engine import predict_in_chunks
from .._errors import ScalememError

__all__ = ["plot_rmse_vs_prototypes", "plot_image_grid", "eval_plots"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ScalememError("plots need matplotlib: pip install 'scalemem[plot]'") from e
    return plt


@contextlib.contextmanager
def _figure(path, rows: int = 1, cols: int = 1, figsize=(6, 4)):
    """Yields ``(plt, fig, axes)`` (one axes, or a grid when ``rows``/``cols`` are given); the
    figure is laid out, written to ``path`` and closed on exit."""
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=figsize, dpi=120, squeeze=rows * cols == 1)
    yield plt, fig, axes
    fig.tight_layout()
    fig.savefig(Path(path))
    plt.close(fig)


def plot_rmse_vs_prototypes(rows: Sequence[dict], path, reference: dict | None = None,
                            title: str = "Test RMSE against the number of prototypes") -> Path:
    """RMSE against P on a log-2 axis; ``reference`` ({P: rmse}) is drawn dashed beside it."""
    with _figure(path) as (_, _, ax):
        ax.plot([r["prototypes"] for r in rows], [r["rmse"] for r in rows], marker="o",
                label="scalemem")
        if reference:
            ax.plot(*zip(*sorted(reference.items())), "--", marker="x", color="gray",
                    label="seed article")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="prototypes P", ylabel="test RMSE", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    return Path(path)


def plot_image_grid(originals, keys, predictions, path, shape=(28, 28),
                    title: str = "original / key pixels / prediction") -> Path:
    """A grid with one column per example: the original image, the key pixels alone (the other
    pixels blank; ``keys`` holds NaN where there is no key, or is ``None`` to leave that row
    out) and the memory's prediction. Rows of the arrays are flattened images of ``shape``."""
    rows = [("original", originals)] + ([("key pixels", keys)] if keys is not None else []) + [
        ("prediction", predictions)]
    n = int(np.asarray(originals).shape[0])
    with _figure(path, len(rows), n, (1.2 * n + 0.8, 1.3 * len(rows) + 0.4)) as (plt, fig, axes):
        cmap = plt.get_cmap("gray").with_extremes(bad="#d0e4f5")  # light blue: not a key pixel
        for r, (label, data) in enumerate(rows):
            data = np.asarray(data, dtype=np.float64)
            for c in range(n):
                ax = axes[r][c]
                img = np.ma.masked_invalid(data[c].reshape(shape))
                ax.imshow(img, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set(xticks=[], yticks=[])
                if c == 0:
                    ax.set_ylabel(label, fontsize=8)
        fig.suptitle(title, fontsize=9)
    return Path(path)


def _point(f: Path, res: dict) -> tuple[int, float] | str | None:
    """``(P, rmse)`` of the sibling run's eval.json ``f`` when it evaluated the same rows of the
    same store; ``None`` when it did not; a ``str`` saying why when ``f`` is malformed."""
    try:
        other = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        return f"{f}: skipped, cannot be read as JSON ({type(e).__name__})"
    if not isinstance(other, dict):
        return f"{f}: skipped, not a JSON object"
    if not all(other.get(k) == res.get(k) for k in ("store", "split", "keys", "values")):
        return None
    p, rmse = other.get("prototypes"), other.get("rmse")
    if not (isinstance(p, int) and not isinstance(p, bool) and 1 <= p < 2**53
            and isinstance(rmse, numbers.Real) and not isinstance(rmse, bool)
            and math.isfinite(rmse)):
        return f"{f}: skipped, its prototypes {p!r} or rmse {rmse!r} is not a valid value"
    return p, float(rmse)


def _note(text: str) -> None:
    print(f"scalemem eval --plots: {text}", file=sys.stderr, flush=True)


def eval_plots(folder: Path, memory, meta, source, res, labels,
               say: Callable[[str], None] = _note) -> list[str]:
    """The pictures of ``scalemem eval --plots``, written into ``folder``; ``say`` gets a note
    for each input it skips (a malformed sibling eval.json or training history)."""
    out = []
    metrics = meta.get("metrics")
    hist = metrics.get("rmse") if isinstance(metrics, dict) else None
    if hist and not (isinstance(hist, list) and all(
            isinstance(x, numbers.Real) and not isinstance(x, bool) for x in hist)):
        say("the loss curve is skipped: the model's training RMSE history is not a list of "
            "numbers")
        hist = None
    if hist:  # the training RMSE against the step
        with _figure(folder / "loss_curve.png") as (_, _, ax):
            ax.plot(range(len(hist)), hist)
            ax.set(xlabel="step", ylabel="training RMSE", yscale="log")
            ax.grid(True, which="both", alpha=0.3)
        out.append(str(folder / "loss_curve.png"))
    # RMSE against P: this run and the sibling runs evaluated on the same rows of the same store
    points = {}
    for f in sorted(p for p in folder.parent.glob("*/eval.json") if p.parent != folder):
        point = _point(f, res)
        if isinstance(point, str):
            say(point)
        elif point is not None:
            points[point[0]] = point[1]
    points[int(res["prototypes"])] = float(res["rmse"])
    rows = [{"prototypes": p, "rmse": points[p]} for p in sorted(points)]
    out.append(str(plot_rmse_vs_prototypes(
        rows, folder / "rmse_vs_prototypes.png",
        title=f"RMSE on {res['split']} against the number of prototypes")))
    if not labels and source.value_dim == 784:
        n = min(8, int(source.rows))
        Q, X = source.read(0, n)
        X = X.astype(np.float64) * (source.value_scale or 1.0)
        pred = predict_in_chunks(memory, Q, key_scale=source.key_scale)
        pos = source.key_columns()
        keys_img = None
        if pos is not None:
            keys_img = np.full_like(X, np.nan)
            keys_img[:, pos] = X[:, pos]
        out.append(str(plot_image_grid(X, keys_img, pred, folder / "predictions.png")))
    return out
