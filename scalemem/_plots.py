"""Pictures (matplotlib is an optional extra: ``pip install scalemem[plot]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ._errors import ScalememError

__all__ = ["plot_rmse_vs_prototypes", "plot_loss_curve"]


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
