#!/usr/bin/env python
"""Fashion-MNIST classification with a differentiable memory, beside logistic regression.

Protocol: the reference permutation of the 70,000 images (scalemem.datasets.fashion_mnist),
keys = the 78 reference key pixels / 255, values = the class label one-hot encoded (10 columns,
what ``scalemem fit --values labels --values-are-labels`` fits), P = 256 prototypes, the
full-data split: fit on the first 60,000 permuted rows (fit60k), test on the other 10,000
(test10k). The memory predicts class probabilities ``softmax(q Kᵀ) V``; the predicted class is
the argmax. The baseline is a multinomial logistic regression (scikit-learn, lbfgs, the keys
standardised) on the same 78 keys and rows.

Log-loss: the memory's probabilities are clipped to [1e-7, 1] and renormalised per row before
``-log p_y`` is averaged (ridge-solved V is not constrained to the simplex).

The memory is ``scalemem.fit`` with the seed's recipe (``--recipe seed``: K₀ = 0.01·normal,
constant Adam) at ``--steps`` steps and learning rate ``--lr``, which override the recipe's; the
keys are passed as stored (uint8) with ``key_scale=1/255``, which the memory applies when it
predicts.

Prints a table and one JSON object (``--json`` prints only the JSON on stdout)::

    python benchmarks/classification.py --data-dir DIR [--steps 1000] [--recipe seed] [--json]

Needs the ``bench`` extra (scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def load(data_dir):
    from scalemem.datasets import fashion_mnist as fm

    images, labels = fm.load(data_dir)
    perm = fm.permutation()
    cols = fm.key_columns()
    Q = images[perm][:, cols]  # uint8, scaled by 1/255 on the device
    y = labels[perm].astype(np.int64)
    (a, b), (c, d) = fm.SPLITS["fit60k"], fm.SPLITS["test10k"]
    return Q[a:b], y[a:b], Q[c:d], y[c:d]


def scores(probs: np.ndarray, y: np.ndarray) -> dict:
    p = np.clip(probs.astype(np.float64), 1e-7, 1.0)
    p /= p.sum(axis=1, keepdims=True)
    return {"accuracy": float(np.mean(np.argmax(probs, axis=1) == y)),
            "log_loss": float(-np.mean(np.log(p[np.arange(len(y)), y])))}


def run_memory(Qf, yf, Qt, yt, *, prototypes, steps, lr, ridge, seed, chunk_rows, recipe, say):
    import scalemem
    from scalemem._data import one_hot

    t0 = time.perf_counter()

    def progress(r):
        if (r.step + 1) % max(steps // 10, 1) == 0:
            say(f"  step {r.step + 1}/{steps}  train RMSE {r.rmse:.5f}  {r.seconds:.0f} s")

    res = scalemem.fit(Qf, one_hot(yf, 10), prototypes, recipe=recipe, steps=steps,
                       learning_rate=lr, ridge=ridge, seed=seed, chunk_rows=chunk_rows,
                       key_scale=1 / 255, callback=progress)
    fit_s = time.perf_counter() - t0
    # keys as the fit took them (uint8): the memory applies its key_scale 1/255 itself
    probs_t = scalemem.predict_in_chunks(res.memory, Qt)
    probs_f = scalemem.predict_in_chunks(res.memory, Qf)
    return {"model": f"memory P={prototypes}", "test": scores(probs_t, yt),
            "train": scores(probs_f, yf), "seconds": fit_s, "steps": steps,
            "train_rmse": float(res.rmse[-1]), "solve_events": res.solve_events,
            "residency": res.residency}


def run_logistic(Qf, yf, Qt, yt, *, max_iter, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    clf.fit(Qf.astype(np.float64) / 255, yf)
    fit_s = time.perf_counter() - t0
    return {"model": "logistic regression", "test": scores(clf.predict_proba(Qt / 255), yt),
            "train": scores(clf.predict_proba(Qf / 255), yf), "seconds": fit_s,
            "iterations": int(clf[-1].n_iter_.max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="folder with the four Fashion-MNIST IDX "
                   "files (.gz or raw)")
    p.add_argument("--prototypes", type=int, default=256, help="P (default 256)")
    p.add_argument("--steps", type=int, default=1000, help="Adam steps (default 1000)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3)")
    p.add_argument("--recipe", default="seed",
                   help="scalemem recipe: initial keys and schedule; --steps and --lr override "
                        "its own (default seed: 0.01·normal keys, constant learning rate)")
    p.add_argument("--ridge", type=float, default=1e-6, help="ridge λ (default 1e-6)")
    p.add_argument("--seed", type=int, default=0, help="seed of K0 and of the baseline")
    p.add_argument("--chunk-rows", type=int, default=4096, help="rows per chunk")
    p.add_argument("--max-iter", type=int, default=1000, help="lbfgs iterations of the baseline")
    p.add_argument("--json", action="store_true", help="print only the JSON object on stdout")
    a = p.parse_args(argv)

    def say(*parts):
        print(*parts, file=sys.stderr if a.json else sys.stdout, flush=True)

    Qf, yf, Qt, yt = load(a.data_dir)
    say(f"Fashion-MNIST fit60k ({len(yf)} rows) / test10k ({len(yt)} rows), 78 key pixels")
    say(f"memory: P={a.prototypes}, {a.steps} Adam steps, lr {a.lr}, ridge {a.ridge}, "
        f"recipe {a.recipe}")
    mem = run_memory(Qf, yf, Qt, yt, prototypes=a.prototypes, steps=a.steps, lr=a.lr,
                     ridge=a.ridge, seed=a.seed, chunk_rows=a.chunk_rows, recipe=a.recipe,
                     say=say)
    say("logistic regression (standardised keys, lbfgs) …")
    lr = run_logistic(Qf, yf, Qt, yt, max_iter=a.max_iter, seed=a.seed)
    rows = [mem, lr]
    say("")
    say(f"{'model':<22} {'test acc':>9} {'test log-loss':>14} {'train acc':>10} {'fit s':>8}")
    for r in rows:
        say(f"{r['model']:<22} {r['test']['accuracy']:>9.4f} {r['test']['log_loss']:>14.4f} "
            f"{r['train']['accuracy']:>10.4f} {r['seconds']:>8.1f}")
    out = {"benchmark": "fashion-mnist-classification", "split": ["fit60k", "test10k"],
           "keys": "78 reference key pixels / 255", "values": "labels one-hot (10)",
           "log_loss_note": "memory probabilities clipped to [1e-7, 1] and renormalised",
           "settings": {k: getattr(a, k) for k in ("prototypes", "steps", "lr", "ridge", "seed",
                                                  "chunk_rows", "max_iter", "recipe")},
           "results": rows}
    print(json.dumps(out) if a.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
