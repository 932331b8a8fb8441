"""Pictures (matplotlib is an optional extra: ``pip install scalemem[plot]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ._errors import ScalememError

__all__ = ["plot_rmse_vs_prototypes", "plot_loss_curve", "plot_image_grid"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ScalememError("plots need matplotlib: pip install 'scalemem[plot]'") from e
    return plt


def plot_rmse_vs_prototypes(rows: Sequence[dict], path, reference: dict | None = None,
                            title: str = "Test RMSE against the number of prototypes") -> Path:
    """RMSE against P on a log-2 axis; ``reference`` ({P: rmse}) is drawn dashed beside it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    Ps = [r["prototypes"] for r in rows]
    ax.plot(Ps, [r["rmse"] for r in rows], marker="o", label="scalemem")
    if reference:
        ref = sorted(reference.items())
        ax.plot([p for p, _ in ref], [v for _, v in ref], "--", marker="x", color="gray",
                label="seed article")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prototypes P")
    ax.set_ylabel("test RMSE")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_loss_curve(loss: Sequence[float], path, ylabel: str = "training RMSE") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(range(len(loss)), loss)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_image_grid(originals, keys, predictions, path, shape=(28, 28),
                    title: str = "original / key pixels / prediction") -> Path:
    """A grid with one column per example: the original image, the key pixels alone (the other
    pixels blank; ``keys`` holds NaN where there is no key, or is ``None`` to leave that row
    out) and the memory's prediction. Rows of the arrays are flattened images of ``shape``."""
    import numpy as np

    plt = _pyplot()
    rows = [("original", originals)] + ([("key pixels", keys)] if keys is not None else []) + [
        ("prediction", predictions)]
    n = int(np.asarray(originals).shape[0])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n + 0.8, 1.3 * len(rows) + 0.4),
                             dpi=120, squeeze=False)
    cmap = plt.get_cmap("gray").with_extremes(bad="#d0e4f5")  # light blue: not a key pixel
    for r, (label, data) in enumerate(rows):
        data = np.asarray(data, dtype=np.float64)
        for c in range(n):
            ax = axes[r][c]
            img = np.ma.masked_invalid(data[c].reshape(shape))
            ax.imshow(img, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
