"""What each ``scalemem`` command does with its resolved settings (``cfg``: setting → value) and
its printer ``say``; each returns the object that ``--json`` prints."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .._config import FitConfig, build, val_fraction
from .._data import StoreWriter, locate_nonfinite, open_source, write_fashion_mnist, write_synthetic
from .._engine import evaluate as evaluate_memory
from .._engine import fit as fit_memory
from .._engine import initialize, load_with_metadata, predict_in_chunks
from .._engine.modelio import MODEL_FILE
from .._errors import ConfigError, DataError, ScalememError
from ..datasets import fashion_mnist
from .options import (EvalConfig, FashionMNISTConfig, PredictConfig, ReproduceConfig,
                      SyntheticConfig)
from .plots import eval_file_name, eval_plots, fit_settings, reproduce_plot
from .runs import (absolute, default_out, fit_run, is_run_folder, open_data, saved_config,
                   write_json)

__all__ = ["data_fmnist", "data_synthetic", "fit", "evaluate", "predict", "reproduce",
           "SEED_TABLE", "SEED_STEPS"]


def _store_format(out, fmt):
    return fmt or ("hdf5" if Path(out).suffix.lower() in (".h5", ".hdf5", ".hdf") else "zarr")


def _need(value, name: str, flag: str, what: str) -> None:
    if value is None:
        raise ConfigError(name, None, f"missing: give {flag} ({what})")


def data_fmnist(cfg: dict, say) -> dict:
    """Fashion-MNIST from its IDX files

    Write Fashion-MNIST (70000 rows in the reference permutation: pixels 70000×784 uint8,
    labels, key_columns; splits fit10k, test60k, fit60k, test10k, all; default views keys
    pixels[@key_columns]/255, values pixels/255)."""
    c = build(FashionMNISTConfig, cfg)
    _need(c.from_dir, "from_dir", "--from DIR", "the folder with the Fashion-MNIST IDX files")
    _need(c.out, "out", "--out STORE", "the store to write")
    fmt = _store_format(c.out, c.format)
    if c.download:
        fashion_mnist.download(c.from_dir)
    t0 = time.perf_counter()
    path = write_fashion_mnist(c.from_dir, c.out, format=fmt, overwrite=c.overwrite,
                               chunk_rows=c.chunk_rows)
    res = {"store": str(path), "format": fmt, "rows": 70000,
           "arrays": ["pixels", "labels", "key_columns", "source_row"],
           "splits": list(fashion_mnist.SPLITS), "seconds": time.perf_counter() - t0}
    say(f"wrote {path} ({fmt}): pixels 70000×784 uint8, labels, key_columns; splits "
        f"{', '.join(res['splits'])}")
    return res


def data_synthetic(cfg: dict, say) -> dict:
    """a synthetic data set of any size

    Write a synthetic store (keys: a noisy projection of a Gaussian latent; values: a smooth
    function of it), generated block by block; arrays keys and values, splits all, fit, test."""
    c = build(SyntheticConfig, cfg)
    _need(c.out, "out", "--out STORE", "the store to write")
    _need(c.rows, "rows", "--rows N", "the number of rows")
    fmt = _store_format(c.out, c.format)
    path = write_synthetic(c.out, c.rows, key_dim=c.key_dim, value_dim=c.value_dim,
                           latent_dim=c.latent_dim, dtype=c.dtype, format=fmt, seed=c.seed,
                           noise=c.noise, chunk_rows=c.chunk_rows, overwrite=c.overwrite)
    say(f"wrote {path} ({fmt}, {c.rows} rows, keys {c.key_dim} × {c.dtype}, values "
        f"{c.value_dim} × {c.dtype}; splits all, fit, test)")
    return {"store": str(path), "format": fmt, "rows": c.rows, "arrays": ["keys", "values"],
            "splits": ["all", "fit", "test"]}


def fit(cfg: dict, say) -> dict:
    """fit a memory to a store (checkpointed, resumable)

    Fit P prototypes: V is solved exactly (ridge, float64 statistics) at every step and K moved
    by L-BFGS (the default; a line search of exact losses) or Adam. The rows stay on the devices
    when they fit (--residency auto) and are streamed from the store otherwise. Writes the run folder RUN: config.json (the resolved settings),
    metrics.jsonl, checkpoints/ and model.npz."""
    resume = cfg.get("resume")
    if resume is not None:
        out = cfg.get("out")  # the recorded one (from config.json) does not bind a moved run
        if (out is not None and out != saved_config(resume).get("out")
                and Path(out).resolve() != Path(resume).resolve()):
            raise ConfigError("out", cfg["out"], f"--resume continues the run in {resume}; "
                              "leave out --out (or give the same folder)")
        cfg["out"] = resume
        if cfg.get("store") == saved_config(resume).get("store"):  # the recorded one
            _recorded_store_exists(cfg.get("store"), f"the run {resume} was fitted on it: give "
                                   f"its new place (scalemem fit STORE --resume {resume})")
    elif cfg.get("store") is None:
        raise ConfigError("store", None, "give the store to fit (scalemem fit STORE …), or "
                          "--resume RUN")
    if (cfg.get("processes") or 0) > 1 or any(  # one process of several: join them before JAX
            os.environ.get(v) for v in ("JAX_COORDINATOR_ADDRESS", "SCALEMEM_NUM_PROCESSES")):
        if cfg.get("json"):
            _stdout_for_json_only()
        initialize(num_processes=cfg.get("processes") or None)
    return fit_run(cfg, resume=resume is not None, say=say, progress=not cfg.get("quiet"))


def _stdout_for_json_only() -> None:
    """Keep stdout for the ``--json`` object in a multi-process run: the collectives library
    that ``jax.distributed`` loads (gloo on CPUs) prints connection lines on file descriptor 1,
    so that descriptor is pointed at stderr and Python's ``sys.stdout`` writes to the original
    stdout through a descriptor of its own."""
    sys.stdout.flush()
    original = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(original, "w", buffering=1)


def _recorded_store_exists(store: str | None, hint: str) -> None:
    """Refuse a store recorded in a run or model that is no longer there, saying what to do."""
    if store is not None and not os.path.exists(store):
        raise DataError(f"{store}: no such store; {hint}")


def _model(path, c):
    """The model file or run folder ``path``: ``(path, memory, metadata, its config, store,
    keys view)``, the store and keys view being ``c``'s, else the ones it was fitted on."""
    path = Path(path).expanduser().resolve()
    memory, meta = load_with_metadata(path)
    mcfg = meta.get("config") or {}
    store = absolute(c.store or meta.get("store") or mcfg.get("store"))
    if c.store is None:
        _recorded_store_exists(store, f"{path.name} was fitted on it: give its new place "
                               f"(scalemem {'eval' if isinstance(c, EvalConfig) else 'predict'} "
                               f"{path} STORE …)")
    return path, memory, meta, mcfg, store, c.keys or meta.get("key_view") or mcfg.get("keys")


def evaluate(cfg: dict, say) -> dict:
    """evaluate a model on rows of a store

    Evaluate a model on a store: RMSE per value entry and the row count (with labels also
    accuracy and log-loss, probabilities clipped to [1e-7, 1] and renormalised). Writes
    RUN/eval-ROWS.json (one file per row selection: eval-test10k.json, eval-0-5000.json) and
    warns when the rows overlap the rows the model was fitted on."""
    c = build(EvalConfig, cfg)
    _need(c.run, "run", "RUN", "the run folder or model file to evaluate")
    path, memory, meta, mcfg, store, keys = _model(c.run, c)
    run = _run_folder(path)
    labels = bool(c.values_are_labels or mcfg.get("values_are_labels"))
    # a label model's value view is its one-hot encoding: the label array comes from its config
    values = c.values or (None if labels else meta.get("value_view")) or mcfg.get("values")
    with open_data(store, keys, values, c.rows, labels=labels,
                   classes=(mcfg.get("classes") or memory.value_dim) if labels else None) as source:
        if (memory.key_dim, memory.value_dim) != (source.key_dim, source.value_dim):
            raise DataError(f"{source.name}: the model maps {memory.key_dim} key columns to "
                            f"{memory.value_dim} value columns; these views give "
                            f"{source.key_dim} and {source.value_dim}: pass the --keys/--values "
                            "the model was fitted with")
        t0 = time.perf_counter()
        r = evaluate_memory(memory, source, labels=labels, chunk_rows=c.chunk_rows)
        res = {k: v for k, v in r.items() if k != "sse"}  # rmse, rows (accuracy, log_loss)
        if labels:
            res.update(log_loss_note="probabilities clipped to [1e-07, 1] and renormalised",
                       classes=memory.value_dim)
        res.update(seconds=time.perf_counter() - t0, model=str(path), store=store,
                   keys=source.key_view, values=values if labels else source.value_view,
                   split=source.split, prototypes=memory.prototypes, fit=fit_settings(mcfg))
        overlap = _fit_rows_overlap(source, store, meta, mcfg)
        if overlap is not None:  # printed even with --quiet: the number above misleads
            res.update(overlap)
            print(f"scalemem eval: warning: {overlap['warning']}", file=sys.stderr, flush=True)
        if c.plots:
            folder = run or path.with_name(f"{path.stem}-plots")
            _plots_folder(folder)
            res["plots"] = eval_plots(folder, memory, meta, source, res, labels, say=say)
    if run is not None:
        res["eval_file"] = str(run / eval_file_name(res["split"]))
        write_json(run / eval_file_name(res["split"]), res)
    what = (f"accuracy {res['accuracy']:.4f}, log-loss {res['log_loss']:.4f} "
            f"({res['log_loss_note']}), " if labels else "")
    say(f"{res['split']} of {store}: {what}RMSE {res['rmse']:.6f} over {res['rows']} rows")
    if c.plots:
        say(f"pictures in {folder}: {', '.join(Path(p).name for p in res['plots'])}")
    return res


def _run_folder(path: Path) -> Path | None:
    """The run folder of a model: ``path`` itself, or the folder of a run's ``model.npz``."""
    if path.is_dir():
        return path
    return path.parent if path.name == MODEL_FILE and is_run_folder(path.parent) else None


def _plots_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ConfigError("plots", True, f"{folder} is a file; the pictures of a model file go "
                          "into a folder of that name: move the file away")
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise ConfigError("plots", True, f"cannot make {folder} for the pictures "
                          f"({e.strerror or e})") from None


def _resolve_rows(store, source, rows) -> tuple[int, int, str]:
    """``(start, stop, label)`` of the row selection ``rows`` of ``store`` (its splits)."""
    with open_source(store, keys=source.key_view, values=source.key_view, rows=rows) as s:
        return int(s.row_offset), int(s.row_offset + s.rows), s.split


def _fit_rows_overlap(source, store, meta, mcfg) -> dict | None:
    """``{"fit_rows_overlap": n, "val_rows_overlap": n, "warning": text}`` when rows of
    ``source`` are rows its model was fitted on, or its validation rows (which chose the kept
    model), in the same store; ``None`` when none are, or when the model does not record its
    rows (a model file of scalemem 0.1) or they no longer resolve in the store."""
    fit_store = absolute(mcfg.get("store") or meta.get("store"))
    if "rows" not in mcfg or fit_store is None or store is None or (
            Path(fit_store).resolve() != Path(store).resolve()):
        return None
    spec = mcfg.get("val_rows")
    try:
        a, b, name = _resolve_rows(store, source, mcfg["rows"])
        frac = val_fraction(spec)
        if frac is not None:  # the validation rows were the last ones of the fit rows
            k = max(1, round((b - a) * frac))
            val, b = (b - k, b, f"the last {spec} of {name}"), b - k
        else:
            val = None if spec is None else _resolve_rows(store, source, spec)
    except ScalememError:
        return None
    c, d = int(source.row_offset), int(source.row_offset + source.rows)
    n_fit = max(0, min(b, d) - max(a, c))
    n_val = 0 if val is None else max(0, min(val[1], d) - max(val[0], c))
    if not n_fit and not n_val:
        return None
    rows = source.split if source.split == f"{c}:{d}" else f"{source.split} ({c}:{d})"
    why = []
    if n_fit:
        why.append(f"{n_fit:,} are rows the model was fitted on ({name}, {a}:{b})")
    if n_val:
        why.append(f"{n_val:,} are the validation rows that chose the kept model ({val[2]}, "
                   f"{val[0]}:{val[1]})")
    return {"fit_rows_overlap": n_fit, "val_rows_overlap": n_val,
            "warning": f"of the {d - c:,} evaluated rows {rows} of {store}, "
                       f"{' and '.join(why)}: this is not a test error"}


def predict(cfg: dict, say) -> dict:
    """write a model's predictions to a Zarr/HDF5 store

    Predict softmax(s·Q Kᵀ + b) V for every selected row of a store and write the predictions
    chunk by chunk to a new store (written atomically)."""
    c = build(PredictConfig, cfg)
    _need(c.model, "model", "MODEL", "the model file or run folder to predict with")
    _need(c.out, "out", "--out OUT", "the store to write (.zarr directory or .h5 file)")
    path, memory, meta, mcfg, store, keys = _model(c.model, c)
    _need(store, "store", "STORE", "the store whose keys to predict for")
    out = Path(c.out).expanduser()
    _apart(out, store, path)
    fmt = _store_format(out, c.format)
    labels = bool(mcfg.get("values_are_labels"))
    with open_source(store, keys=keys, values=keys, rows=c.rows) as source:
        if memory.key_dim != source.key_dim:
            raise DataError(f"{source.name}: the model takes {memory.key_dim} key columns, "
                            f"view {source.key_view!r} has {source.key_dim}; pass the --keys "
                            "the model was fitted with")
        n, t0 = int(source.rows), time.perf_counter()
        dtype = np.dtype(str(memory.K.dtype))
        chunk = min(c.chunk_rows, n)
        with StoreWriter(out, fmt, overwrite=c.overwrite) as w:
            pw = w.create_array("predictions", (n, memory.value_dim), dtype, chunk_rows=chunk)
            lw = (w.create_array("predicted_labels", (n, 1), np.int32, chunk_rows=chunk)
                  if labels else None)
            for s in range(0, n, chunk):
                Q, _ = source.read(s, min(s + chunk, n))
                p = predict_in_chunks(memory, Q, chunk, key_scale=source.key_scale)
                if not np.isfinite(p).all():  # NaN/Inf keys (or overflow): name the row
                    raise locate_nonfinite(source, ranges=[(s, min(s + chunk, n))])
                pw.append(p)
                if lw is not None:
                    lw.append(np.argmax(p, axis=1).astype(np.int32)[:, None])
            w.meta.update(rows=n, splits={"all": [0, n]}, model=str(path), source=store,
                          keys=source.key_view, source_rows=source.split,
                          description="predictions of a scalemem memory (scalemem predict)",
                          views={"values": "predictions"})
    res = {"out": str(out), "format": fmt, "array": "predictions", "rows": n,
           "columns": memory.value_dim, "seconds": time.perf_counter() - t0, "model": str(path)}
    if labels:
        res["labels_array"] = "predicted_labels"
    say(f"wrote {n} × {memory.value_dim} predictions to {out} ({fmt}, array 'predictions')")
    return res


def _apart(out: Path, store: str, model: Path) -> None:
    """Refuse an output that is (or holds, or lies inside) the input store, or that is (or
    holds) the model: writing it would replace the data or the model being read."""
    o = out.resolve()
    for what, p in (("the input store", Path(store).resolve()), ("the model", model)):
        if o == p or o in p.parents or (what != "the model" and p in o.parents):
            raise ConfigError("out", str(out), f"{'is' if o == p else 'overlaps'} {what} {p}; "
                              "predictions go to a new store: choose another --out")


# Test RMSE the article published for its prototype (fit 10,000 rows, test 60,000), after
# SEED_STEPS steps of Adam.
SEED_STEPS = 1000
SEED_TABLE = {2: 0.248782, 4: 0.204451, 8: 0.173010, 16: 0.153833, 32: 0.139799, 64: 0.128507,
              128: 0.121859, 256: 0.119588}


def reproduce(cfg: dict, say) -> dict:
    """the seed article's Fashion-MNIST table: test RMSE against P

    Fit the seed article's protocol for each P (78 random key pixels, all 784 pixels as values,
    reference permutation, fit on the first 10,000 rows, test on the other 60,000; the seed
    recipe: K0 = 0.01·normal, Adam lr 5e-4, 1000 steps, ridge 1e-6), print the table, and write
    OUT/table.json and OUT/rmse_vs_prototypes.png."""
    c = build(ReproduceConfig, cfg)
    _need(c.data_dir, "data_dir", "--data-dir DIR", "the folder with the Fashion-MNIST IDX files")
    fitc = build(FitConfig, {**cfg, "prototypes": 1})  # validated once; P comes per fit
    settings = {k: v for k, v in fitc.to_dict().items() if k != "prototypes"}
    data_dir, out = Path(c.data_dir), Path(c.out or default_out("reproduce"))
    if c.download:
        fashion_mnist.download(data_dir)
    test = c.test_split or {"fit10k": "test60k", "fit60k": "test10k"}[c.fit_split]
    Qf, Xf, Qt, Xt = fashion_mnist.reference_split(data_dir, c.fit_split, test)
    out.mkdir(parents=True, exist_ok=True)
    say(f"fit {c.fit_split} ({len(Qf)} rows), test {test} ({len(Qt)} rows), recipe "
        f"{fitc.recipe}, {fitc.steps} steps")
    say(f"{'P':>5} {'test RMSE':>10} {'article':>9} {'train':>9} {'seconds':>8}")
    rows, losses = [], {}
    for P in c.prototypes or list(SEED_TABLE):
        t0 = time.perf_counter()
        res = fit_memory(Qf, Xf, int(P), **settings)
        seconds = time.perf_counter() - t0
        r = {"prototypes": int(P), "rmse": evaluate_memory(res.memory, Qt, Xt)["rmse"],
             "seconds": seconds, "train_rmse": float(res.rmse[-1]),
             "seconds_per_step": res.seconds / max(res.config.steps, 1),
             "solve_events": res.solve_events, "seed_rmse": SEED_TABLE.get(int(P))}
        rows.append(r)
        losses[str(r["prototypes"])] = res.loss.tolist()
        seed = f"{r['seed_rmse']:.6f}" if r["seed_rmse"] is not None else "-"
        say(f"{r['prototypes']:>5} {r['rmse']:>10.6f} {seed:>9} {r['train_rmse']:>9.6f} "
            f"{r['seconds']:>8.1f}")
    table = {"rows": rows, "settings": {"fit_split": c.fit_split, "test_split": test, **settings}}
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "loss.json").write_text(json.dumps(losses) + "\n")
    if c.plot:
        article = (c.fit_split, test) == ("fit10k", "test60k")  # the article's table's split
        table["plot"] = str(reproduce_plot(
            rows, out / "rmse_vs_prototypes.png", steps=fitc.steps, recipe=fitc.recipe,
            fit_split=c.fit_split, test_split=test, reference=SEED_TABLE if article else None,
            reference_steps=SEED_STEPS))
    say(f"wrote {out / 'table.json'}")
    return table
