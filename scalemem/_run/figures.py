"""The pictures themselves (matplotlib, an optional extra: ``pip install scalemem[plot]``): each
function draws one figure from plain numbers and writes it to a PNG. What goes into them (run
folders, metrics, sibling evaluations) is gathered in :mod:`scalemem._run.plots`."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .._errors import ScalememError

__all__ = ["figure", "plot_training", "plot_rmse_vs_prototypes", "plot_image_grid",
           "plot_confusion", "Series", "reference_series", "NOT_A_KEY_COLOUR"]

NOT_A_KEY_COLOUR = "#d0e4f5"  # light blue: the pixels that are not keys in the key-pixel row


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ScalememError("plots need matplotlib: pip install 'scalemem[plot]'") from e
    return plt


@contextlib.contextmanager
def figure(path, rows: int = 1, cols: int = 1, figsize=(6.4, 4.2), rect=(0, 0, 1, 1)):
    """Yields ``(plt, fig, axes)`` (one axes, or a grid when ``rows``/``cols`` are given); the
    figure is laid out (within ``rect`` of the figure), written to ``path`` and closed on
    exit."""
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=figsize, dpi=120, squeeze=rows * cols == 1)
    try:
        yield plt, fig, axes
        fig.tight_layout(rect=rect)
        fig.savefig(Path(path))
    finally:
        plt.close(fig)


def _plain_numbers(ax, values) -> None:
    """A y axis whose ticks are plain decimals (no offset, no ×10⁻ⁿ): linear, or logarithmic
    with plain labels when the values span more than a factor of 20."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, ScalarFormatter

    v = [float(x) for x in values if x is not None and math.isfinite(x) and x > 0]
    if v and max(v) / min(v) > 20:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.3g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        fmt = ScalarFormatter(useOffset=False)
        fmt.set_scientific(False)
        ax.yaxis.set_major_formatter(fmt)


class Series:
    """One line of a plot: ``x``, ``y``, its legend ``label`` and matplotlib ``style`` keywords."""

    def __init__(self, x: Sequence, y: Sequence, label: str, **style):
        self.x, self.y, self.label, self.style = list(x), list(y), label, style


def plot_training(path, curves: Sequence[Series], title: str, *, ylabel: str = "RMSE",
                  best_step: int | None = None, hline: tuple[float, str] | None = None,
                  panel: Sequence[Series] = (), panel_ylabel: str = "") -> Path:
    """RMSE against the step: ``curves`` (training, validation …), a vertical mark at
    ``best_step`` (the step whose model was kept), a horizontal line ``hline`` = ``(value,
    label)`` (a test RMSE), and an optional second panel below (e.g. validation accuracy)."""
    rows = 2 if panel else 1
    with figure(path, rows, 1, (7.0, 4.4 if rows == 1 else 6.6)) as (_, fig, axes):
        ax = axes if rows == 1 else axes[0][0]
        for s in curves:
            ax.plot(s.x, s.y, label=s.label, **s.style)
        values = [y for s in curves for y in s.y] + ([hline[0]] if hline else [])
        if hline:
            ax.axhline(hline[0], color="gray", linestyle=":", label=hline[1])
        axs = [ax] + ([axes[1][0]] if panel else [])
        for s in panel:
            axs[1].plot(s.x, s.y, label=s.label, **s.style)
        for a in axs:
            if best_step is not None:
                a.axvline(best_step, color="tab:red", linestyle="--", linewidth=1,
                          label=f"best step {best_step} (the model kept)" if a is ax else None)
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize=8)
            a.set_xlabel("step")
        _plain_numbers(ax, values)
        ax.set_ylabel(ylabel)
        if panel:
            axs[1].set_ylabel(panel_ylabel)
            _plain_numbers(axs[1], [y for s in panel for y in s.y])
        ax.set_title(title, fontsize=9)
    return Path(path)


def plot_rmse_vs_prototypes(lines: Sequence[Series], path, title: str,
                            ylabel: str = "test RMSE") -> Path:
    """RMSE against P on a log-2 axis, one line per group of runs with matching settings (a
    group of one run is a lone marker); each line labelled in the legend."""
    with figure(path, figsize=(7.0, 4.6)) as (_, _, ax):
        ps, values = set(), []
        for s in lines:
            ax.plot(s.x, s.y, label=s.label, **{"marker": "o", **s.style})
            ps.update(s.x)
            values += s.y
        ax.set_xscale("log", base=2)
        if ps:
            ax.set_xticks(sorted(ps), [str(p) for p in sorted(ps)])
            ax.minorticks_off()
        _plain_numbers(ax, values)
        ax.set_xlabel("prototypes P")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return Path(path)


def plot_image_grid(originals, keys, predictions, path, shape=(28, 28),
                    title: str = "original / key pixels / prediction") -> Path:
    """A grid with one column per example: the original image, the key pixels alone (the other
    pixels in :data:`NOT_A_KEY_COLOUR`; ``keys`` holds NaN where there is no key, or is
    ``None`` to leave that row out) and the memory's prediction, titled with its RMSE against
    the original. Rows of the arrays are flattened images of ``shape`` with values in [0, 1]."""
    from matplotlib.patches import Patch

    originals = np.asarray(originals, dtype=np.float64)
    predictions = np.asarray(predictions, dtype=np.float64)
    rows = [("original", originals)] + ([("key pixels", keys)] if keys is not None else []) + [
        ("prediction", predictions)]
    n = int(originals.shape[0])
    errors = np.sqrt(np.mean((predictions - originals) ** 2, axis=1))
    size = (1.25 * n + 0.9, 1.45 * len(rows) + 1.0)
    with figure(path, len(rows), n, size, rect=(0, 0.07, 1, 1)) as (plt, fig, axes):
        cmap = plt.get_cmap("gray").with_extremes(bad=NOT_A_KEY_COLOUR)
        for r, (label, data) in enumerate(rows):
            data = np.asarray(data, dtype=np.float64)
            for c in range(n):
                ax = axes[r][c]
                img = np.ma.masked_invalid(data[c].reshape(shape))
                ax.imshow(img, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set(xticks=[], yticks=[])
                if c == 0:
                    ax.set_ylabel(label, fontsize=8)
                if label == "prediction":
                    ax.set_title(f"RMSE {errors[c]:.3f}", fontsize=7)
        fig.suptitle(title, fontsize=9)
        handles = [Patch(facecolor="black", edgecolor="gray", label="pixel 0"),
                   Patch(facecolor="white", edgecolor="gray", label="pixel 1")]
        if keys is not None:
            handles.append(Patch(facecolor=NOT_A_KEY_COLOUR, edgecolor="gray",
                                 label="not a key pixel (not given to the memory)"))
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7,
                   frameon=False)
    return Path(path)


def plot_confusion(counts, path, title: str, names: Sequence[str] | None = None) -> Path:
    """A confusion matrix: ``counts[i, j]`` rows of true class ``i`` predicted as ``j``; the
    colour is the share of the true class (each row sums to 1), the text the count."""
    counts = np.asarray(counts, dtype=np.int64)
    c = counts.shape[0]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    names = list(names) if names is not None else [str(i) for i in range(c)]
    side = min(max(4.8, 0.55 * c + 2.5), 14.0)
    with figure(path, figsize=(side + 1.2, side)) as (_, fig, ax):
        im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        if c <= 30:
            for i in range(c):
                for j in range(c):
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] > 0.5 else "black")
        ticks = range(c) if c <= 40 else range(0, c, max(c // 20, 1))
        ax.set_xticks(list(ticks), [names[t] for t in ticks], rotation=45, ha="right",
                      fontsize=7)
        ax.set_yticks(list(ticks), [names[t] for t in ticks], fontsize=7)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return Path(path)


def reference_series(table: Mapping[int, float], label: str) -> Series:
    """A dashed grey line of published values ``{P: rmse}``."""
    ps = sorted(table)
    return Series(ps, [table[p] for p in ps], label, linestyle="--", marker="x", color="gray")
