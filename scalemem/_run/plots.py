"""The pictures of ``scalemem eval --plots`` and ``scalemem reproduce``: what goes into them (a
run's metrics, the sibling runs' evaluations, predictions); the drawing is in
:mod:`scalemem._run.figures`."""

from __future__ import annotations

import json
import math
import numbers
import re
import sys
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .._engine import predict_in_chunks
from .._errors import CheckpointError
from .checkpoint import TRAJECTORY_FIELDS
from .figures import (Series, plot_confusion, plot_image_grid, plot_rmse_vs_prototypes,
                      plot_training, reference_series)
from .metrics import METRICS_FILE, read_metrics

__all__ = ["eval_plots", "eval_file_name", "fit_settings", "reproduce_plot", "LEGACY_EVAL_FILE",
           "plot_rmse_vs_prototypes", "plot_image_grid", "GROUP_FIELDS"]

LEGACY_EVAL_FILE = "eval.json"  # one file for every split, written by scalemem ≤ 0.3
# The settings two runs must share for their RMSEs to be joined into one line against P: the
# data and everything that shapes the path of K except P itself (and chunk_rows, which only
# changes rounding), and the number of steps.
GROUP_FIELDS = ("store",) + tuple(f for f in TRAJECTORY_FIELDS
                                  if f not in ("prototypes", "chunk_rows")) + ("steps",)
# What a legend says of every group; the other GROUP_FIELDS only where groups differ in them.
_ALWAYS = ("rows", "steps", "recipe")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


def eval_file_name(split: str) -> str:
    """The file of a run's evaluation on the rows ``split``: ``eval-test10k.json``,
    ``eval-0-5000.json`` (rows 0:5000), ``eval-all-rows.json``."""
    return "eval-" + (re.sub(r"[^A-Za-z0-9_.]+", "-", str(split)).strip("-.") or "rows") + ".json"


def fit_settings(config) -> dict | None:
    """The :data:`GROUP_FIELDS` of a run's config (its ``config.json`` or the model's
    ``config``), or ``None`` when there is none."""
    if not isinstance(config, Mapping) or not config:
        return None
    return {f: config.get(f) for f in GROUP_FIELDS}


def _note(text: str) -> None:
    print(f"scalemem eval --plots: {text}", file=sys.stderr, flush=True)


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _rows_text(rows, n=None) -> str:
    name = "all rows" if rows is None else str(rows)
    return f"{name} ({n:,} rows)" if isinstance(n, int) and not isinstance(n, bool) else name


def _fit_text(meta: Mapping, memory, steps_run: int | None = None) -> str:
    """``P = 64 · fit on fit10k (10,000 rows) · 35 steps · recipe fast`` from a model's
    metadata (the parts it records)."""
    cfg, result = meta.get("config") or {}, meta.get("result") or {}
    p = cfg.get("prototypes") or getattr(memory, "prototypes", None)
    parts = [f"P = {p}"] if p else []
    if cfg:
        parts.append("fit on " + _rows_text(cfg.get("rows"), result.get("rows")))
    steps = cfg.get("steps")
    if steps_run is not None and isinstance(steps, int) and steps_run < steps:
        parts.append(f"{steps_run} of {steps} steps")
    elif steps is not None or steps_run is not None:
        parts.append(f"{steps if steps is not None else steps_run} steps")
    if cfg.get("recipe"):
        parts.append(f"recipe {cfg['recipe']}")
    if cfg.get("val_rows") is not None:
        parts.append(f"validation rows {cfg['val_rows']}")
    return " · ".join(parts)


# ------------------------------------------------------------------------------- training curves

def _history(folder: Path, meta: Mapping, say) -> dict[int, dict] | None:
    """Step → record (``rmse``, maybe ``val_rmse``, ``val_accuracy``, ``val_log_loss``): from
    ``folder/metrics.jsonl`` when there is one, else from the model's ``metrics``."""
    path = folder / METRICS_FILE
    if path.is_file():
        try:
            recs = {r["step"]: r for r in read_metrics(path)}  # a resumed step: its last record
        except CheckpointError as e:
            say(f"the loss curve is skipped: {e}")
            return None
        keep = {t: {k: v for k, v in r.items() if k != "step" and _number(v)}
                for t, r in sorted(recs.items())}
        return {t: r for t, r in keep.items() if r} or None
    metrics = meta.get("metrics")
    hist = metrics.get("rmse") if isinstance(metrics, dict) else None
    if hist and not (isinstance(hist, list) and all(_number(x) for x in hist)):
        say("the loss curve is skipped: the model's training RMSE history is not a list of "
            "numbers")
        return None
    if not hist:
        return None
    out = {t: {"rmse": float(x)} for t, x in enumerate(hist)}
    val = metrics.get("validation")  # [{"step": t, "rmse": …, "accuracy": …}, …]
    for v in val if isinstance(val, list) else ():
        t = v.get("step") if isinstance(v, dict) else None
        if isinstance(t, int) and not isinstance(t, bool) and t >= 0:
            out.setdefault(t, {}).update(
                {f"val_{k}": x for k, x in v.items() if k != "step" and _number(x)})
    return out


def _series(hist: dict, key: str, label: str, **style) -> Series | None:
    pts = [(t, r[key]) for t, r in hist.items() if key in r]
    return Series(*zip(*pts), label, **style) if pts else None


def _training_plot(path: Path, hist: dict, meta: Mapping, memory, res: Mapping,
                   labels: bool) -> Path:
    result = meta.get("result") or {}
    train = _series(hist, "rmse", "training RMSE" + (" (one-hot values)" if labels else ""))
    val = _series(hist, "val_rmse", "validation RMSE")
    if val is not None and len(val.x) <= 40:  # sparse evaluations (--val-every): show each
        val.style["marker"] = "."
    curves = [s for s in (train, val) if s is not None]
    for s in curves:
        s.label += f" (last {s.y[-1]:.4f})"
    best = result.get("best_step")
    best = best if isinstance(best, int) and not isinstance(best, bool) else None
    if best is not None and val is not None and best in val.x and best != val.x[-1]:
        val.label = val.label[:-1] + f", at the kept step {val.y[val.x.index(best)]:.4f})"
    steps_run = result.get("steps_run")  # recorded when validation stopped the fit early
    steps_run = steps_run if isinstance(steps_run, int) and not isinstance(steps_run, bool) \
        else None
    test = None
    if _number(res.get("rmse")):
        overlap = ("; it includes fit or validation rows" if res.get("fit_rows_overlap")
                   or res.get("val_rows_overlap") else "")
        test = (float(res["rmse"]), f"RMSE on {res['split']} (this eval{overlap})")
    panel = [s for s in (_series(hist, "val_accuracy", "validation accuracy", marker=".",
                                 color="tab:green"),) if s is not None] if labels else []
    title = "Training curve\n" + _fit_text(meta, memory, steps_run)
    return plot_training(path, curves, title, best_step=best, hline=test, panel=panel,
                         panel_ylabel="accuracy")


# ------------------------------------------------------------------------------ RMSE against P

def _point(f: Path, res: Mapping) -> tuple[int, float, dict] | str | None:
    """``(P, rmse, eval object)`` of the sibling run's evaluation file ``f`` when it evaluated
    the same rows of the same store; ``None`` when it did not; a ``str`` saying why when ``f``
    is malformed."""
    try:
        other = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        return f"{f}: skipped, cannot be read as JSON ({type(e).__name__})"
    if not isinstance(other, dict):
        return f"{f}: skipped, not a JSON object"
    if not all(other.get(k) == res.get(k) for k in ("store", "split", "keys", "values")):
        return None
    p, rmse = other.get("prototypes"), other.get("rmse")
    if not (isinstance(p, int) and not isinstance(p, bool) and 1 <= p < 2**53 and _number(rmse)):
        return f"{f}: skipped, its prototypes {p!r} or rmse {rmse!r} is not a valid value"
    return p, float(rmse), other


def _sibling_settings(run: Path, other: Mapping) -> dict | None:
    """The fit settings of a sibling evaluation: recorded in it, else in its run's config.json."""
    if isinstance(other.get("fit"), dict):
        return fit_settings(other["fit"])
    try:
        return fit_settings(json.loads((run / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, RecursionError):
        return None


def _key(settings: dict | None):
    return None if settings is None else json.dumps(settings, sort_keys=True, default=str)


def _group_labels(groups: dict) -> dict:
    """A legend label per group key: rows, steps and recipe always, and each other setting in
    which the groups differ."""
    known = [json.loads(k) for k in groups if k is not None]
    differ = [f for f in GROUP_FIELDS if f not in _ALWAYS and len(
        {json.dumps(s.get(f), default=str) for s in known}) > 1]
    out = {}
    for k in groups:
        if k is None:
            continue
        s = json.loads(k)
        parts = [f"fit on {_rows_text(s.get('rows'))}", f"{s.get('steps')} steps",
                 f"recipe {s.get('recipe')}"]
        for f in differ:
            v = s.get(f)
            parts.append(f"store {Path(v).name}" if f == "store" and v else f"{f} {v}")
        out[k] = ", ".join(parts)
    return out


def _rmse_vs_p(folder: Path, meta: Mapping, res: Mapping, say) -> Path:
    """This run's RMSE and those of the sibling runs evaluated on the same rows of the same
    store, one line per group of runs with the same fit settings (:data:`GROUP_FIELDS`)."""
    mine = _key(fit_settings(meta.get("config")))
    groups: dict = {mine: {}}
    unknown: list[tuple[str, int, float]] = []
    for run in sorted(p for p in folder.parent.iterdir() if p.is_dir() and p != folder):
        for name in (eval_file_name(res["split"]), LEGACY_EVAL_FILE):  # the newer file first
            if not (run / name).is_file():
                continue
            point = _point(run / name, res)
            if isinstance(point, str):
                say(point)
            elif point is not None:
                p, rmse, other = point
                k = _key(_sibling_settings(run, other))
                if k is None:
                    unknown.append((run.name, p, rmse))
                else:
                    groups.setdefault(k, {}).setdefault(p, rmse)
                break
    groups[mine][int(res["prototypes"])] = float(res["rmse"])  # this evaluation wins
    labels = _group_labels(groups)
    lines = []
    for k, pts in groups.items():
        label = labels.get(k, "this model (settings not recorded)")
        ps = sorted(pts)
        style = {"linewidth": 2.2} if k == mine else {}
        lines.append(Series(ps, [pts[p] for p in ps], label + (" ← this run" if k == mine
                                                               else ""), **style))
    for name, p, rmse in unknown:
        lines.append(Series([p], [rmse], f"{name} (fit settings not recorded)", linestyle="none"))
    n = res.get("rows")
    title = (f"RMSE on {_rows_text(res['split'], n)} of {Path(str(res.get('store'))).name} "
             "against P")
    if res.get("fit_rows_overlap") or res.get("val_rows_overlap"):
        title += "\n(these rows include this run's fit or validation rows: not a test error)"
    return plot_rmse_vs_prototypes(lines, folder / "rmse_vs_prototypes.png", title,
                                   ylabel=f"RMSE on {res['split']}")


# ---------------------------------------------------------------------- predictions, confusion

def _prediction_grid(folder: Path, memory, meta, source, res) -> Path:
    n = min(8, int(source.rows))
    Q, X = source.read(0, n)
    X = X.astype(np.float64) * (source.value_scale or 1.0)
    pred = predict_in_chunks(memory, Q, key_scale=source.key_scale)
    pos = source.key_columns()
    keys_img = None
    if pos is not None:
        keys_img = np.full_like(X, np.nan)
        keys_img[:, pos] = X[:, pos]
    keys = f" / key pixels ({len(pos)} of {X.shape[1]})" if pos is not None else ""
    title = (f"The first {n} rows of {res['split']}: original{keys} / prediction; "
             f"{_fit_text(meta, memory)}")
    return plot_image_grid(X, keys_img, pred, folder / "predictions.png", title=title)


def confusion_counts(memory, source, chunk_rows: int = 8192) -> np.ndarray:
    """``counts[i, j]``: rows of ``source`` (one-hot values) of class ``i`` whose predicted
    class (the largest predicted probability) is ``j``."""
    c, n = int(source.value_dim), int(source.rows)
    counts = np.zeros(c * c, dtype=np.int64)
    for s in range(0, n, chunk_rows):
        Q, Y = source.read(s, min(s + chunk_rows, n))
        pred = predict_in_chunks(memory, Q, chunk_rows, key_scale=source.key_scale)
        counts += np.bincount(np.argmax(Y, axis=1) * c + np.argmax(pred, axis=1), minlength=c * c)
    return counts.reshape(c, c)


def _confusion(folder: Path, memory, meta, source, res) -> Path:
    counts = confusion_counts(memory, source)
    c = counts.shape[0]
    store_meta = getattr(source, "store_meta", None) or {}
    names = store_meta.get("class_names")
    if not (isinstance(names, list) and len(names) == c and all(isinstance(x, str) for x in names)):
        names = (FASHION_MNIST_CLASSES if store_meta.get("dataset") == "fashion-mnist"
                 and c == len(FASHION_MNIST_CLASSES) else None)
    acc = res.get("accuracy")
    acc = f"accuracy {acc:.4f}" if _number(acc) else ""
    title = (f"{res['split']} ({int(source.rows):,} rows): {acc}\n{_fit_text(meta, memory)}")
    return plot_confusion(counts, folder / "confusion.png", title, names)


def eval_plots(folder: Path, memory, meta, source, res, labels,
               say: Callable[[str], None] = _note) -> list[str]:
    """The pictures of ``scalemem eval --plots``, written into ``folder`` (a run folder holding
    ``metrics.jsonl``, or a folder of their own): the training curves, RMSE against P beside
    the sibling runs of ``folder`` evaluated on the same rows, the prediction grid (784-column
    values) and, for a label model, the confusion matrix. ``say`` gets a note for each input
    it skips (a malformed sibling evaluation or training history)."""
    out = []
    hist = _history(folder, meta, say)
    if hist:
        out.append(str(_training_plot(folder / "loss_curve.png", hist, meta, memory, res,
                                      labels)))
    out.append(str(_rmse_vs_p(folder, meta, res, say)))
    if labels:
        out.append(str(_confusion(folder, memory, meta, source, res)))
    elif source.value_dim == 784:
        out.append(str(_prediction_grid(folder, memory, meta, source, res)))
    return out


def reproduce_plot(rows, path, *, steps: int, recipe: str, fit_split: str, test_split: str,
                   reference: Mapping[int, float] | None, reference_steps: int) -> Path:
    """``scalemem reproduce``'s picture: its test RMSE against P beside the article's table,
    each line saying how many steps it ran."""
    lines = [Series([r["prototypes"] for r in rows], [r["rmse"] for r in rows],
                    f"scalemem, recipe {recipe}, {steps} steps", linewidth=2.2)]
    if reference:
        lines.append(reference_series(reference, f"seed article (published), {reference_steps} "
                                      "steps"))
    title = (f"Test RMSE on {test_split} against P (fit on {fit_split}): scalemem {steps} steps"
             + (f", the article {reference_steps}" if reference else ""))
    diffs = [(abs(r["rmse"] - reference[r["prototypes"]]), r["prototypes"]) for r in rows
             if reference and r["prototypes"] in reference]
    if diffs:  # the lines can lie on top of each other: say by how much they differ
        d, p = max(diffs)
        title += f"\nlargest difference from the article: {d:.6f} (P = {p})"
    return plot_rmse_vs_prototypes(lines, path, title, ylabel=f"RMSE on {test_split}")
