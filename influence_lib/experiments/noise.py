"""How noisy is the leave-one-out ground truth itself?

For one trained model ``theta*`` and a fixed set of removed training points, the *same* removals are
retrained several times under different retraining protocols (``runs``): different step counts, full-batch
or mini-batch, different mini-batch orders (seeds). Each run gives an actual test-loss change per removed
point; the spread of these across runs is the noise of the ground truth, to be set against the size of the
predicted effect ``(1/n) g_test^T (H + lambda I)^{-1} g_i`` and against the spread of the actual effects
across removed points (the signal the correlation has to find).

A noise *setting* is a flat dict (see :data:`NOISE_DEFAULTS`); :func:`run_noise_setting` returns a record;
:func:`run_noise_grid` stores records as ``<root>/<name>/<key>.json`` like every other kind and
computes only the missing ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import load_dataset
from ..influence import InfluenceCalculator
from ..metrics import top_k
from ..models import build_model, count_params, last_layer_params
from ..retrain import retrain_without, train_model
from ..validation import check_choice
from .executor import run_grid
from .record import corr as _corr
from .record import dataset_block, finish_record
from .record import vector as _round
from .runners import setting_key
from .settings import DTYPES, canonical_numbers, check_common

NOISE_DEFAULTS: dict[str, Any] = {
    "dataset": "mnist-small",
    "fallback": None,
    "data_dir": None,  # e.g. an ImageNet-style folder (train/<class>/..., val/<class>/...)
    "download": False,
    "image_size": 32,
    "data_seed": 0,
    "n_train": 500,
    "n_test": 200,
    "dtype": "float64",
    "model": "mlp",
    "depth": 1,
    "width": 16,
    "activation": "relu",
    "seed": 0,
    "weight_decay": 0.001,
    "optimizer": "adam",
    "lr": 0.01,
    "steps": 2000,
    "method": "cg",
    # the curvature of the predictions that choose the removals: "gauss-newton" is positive semi-definite, so the
    # damped system is always solvable (with the Hessian, CG fails on any model whose lambda_min < -damping)
    "curvature": "hessian",
    "damping": 0.01,
    "params": "all",
    "method_options": {},
    "roles": ["highest", "median"],  # examined test points
    "k": 10,  # removed points: the k largest |predicted| influences of each examined test point, pooled
    "loo_optimizer": "adam",
    "loo_lr": 0.001,
    # retraining protocols applied to the same removals; "seed" orders the mini-batches. A run gives either
    # "steps" or "epochs" (passes over the n training points: steps = epochs * ceil(n / batch_size), or epochs for
    # a full batch), so that a protocol means the same amount of training at every training-set size
    "runs": [{"epochs": 300, "batch_size": None, "seed": 0}, {"epochs": 600, "batch_size": None, "seed": 0},
             {"epochs": 30, "batch_size": 50, "seed": 0}, {"epochs": 30, "batch_size": 50, "seed": 1},
             {"epochs": 30, "batch_size": 50, "seed": 2}],
}


def normalize_noise_setting(setting: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(setting) - set(NOISE_DEFAULTS))
    if unknown:
        raise ValueError(f"noise setting: unknown key(s) {unknown}; accepted: {sorted(NOISE_DEFAULTS)}")
    s = canonical_numbers({**NOISE_DEFAULTS, **setting}, NOISE_DEFAULTS)
    check_common(s)
    for r in s["roles"]:
        check_choice("roles", r, ("highest", "median"))
    check_choice("curvature", s["curvature"], ("hessian", "gauss-newton"))
    if not isinstance(s["k"], int) or s["k"] < 2:
        raise ValueError(f"k must be an integer >= 2, got {s['k']!r}")
    if not s["runs"] or any(not isinstance(r, dict) or set(r) - {"steps", "epochs", "batch_size", "seed"}
                            or ("steps" in r) == ("epochs" in r) for r in s["runs"]):
        raise ValueError("runs must be a non-empty list of dicts with 'batch_size', 'seed' and exactly one of "
                         f"'steps' or 'epochs', got {s['runs']!r}")
    for r in s["runs"]:
        length = r.get("steps", r.get("epochs"))
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"a run's steps / epochs must be a positive integer, got {r!r}")
    return s


def run_steps(run: dict[str, Any], n: int) -> int:
    """Optimiser steps of one retraining protocol on ``n`` training points: its ``steps``, or ``epochs`` passes
    over the data (``epochs * ceil(n / batch_size)``; one step per epoch for a full batch)."""
    if "steps" in run:
        return int(run["steps"])
    b = run["batch_size"]
    return int(run["epochs"]) * (1 if b is None or b >= n else -(-n // int(b)))


def noise_key(setting: dict[str, Any]) -> str:
    """The record key of a noise setting (the hash of its canonical form)."""
    return setting_key(setting, "noise")


def run_noise_setting(setting: dict[str, Any]) -> dict[str, Any]:
    """Train ``theta*``, predict, pick removals, retrain them under every protocol in ``runs``: a record."""
    s = normalize_noise_setting(setting)
    t_all = time.perf_counter()
    dtype = DTYPES[s["dtype"]]
    loss_fn = F.cross_entropy
    data = load_dataset(s["dataset"], seed=s["data_seed"], n_train=s["n_train"], n_test=s["n_test"],
                        fallback=s["fallback"], dtype=dtype, flatten=s["model"] in ("mlp", "linear"),
                        data_dir=s["data_dir"], download=s["download"], image_size=s["image_size"])
    train = (data.X_train, data.y_train)
    n = len(data.y_train)
    kwargs: dict[str, Any] = {"depth": s["depth"], "width": s["width"], "activation": s["activation"]}
    if s["model"] in ("vgg", "resnet"):
        kwargs = {"width": s["width"], "activation": s["activation"],
                  ("stages" if s["model"] == "vgg" else "blocks"): s["depth"]}
    model = build_model(s["model"], in_shape=tuple(data.X_train.shape[1:]), n_classes=data.n_classes,
                        seed=s["seed"], dtype=dtype, **kwargs)
    t = time.perf_counter()
    fit = train_model(model, loss_fn, train, weight_decay=s["weight_decay"], optimizer=s["optimizer"], lr=s["lr"],
                      steps=s["steps"], seed=s["seed"])
    timings = {"train": time.perf_counter() - t}
    with torch.no_grad():
        out = model(data.X_test)
        test_losses = F.cross_entropy(out, data.y_test, reduction="none")
        test_acc = float((out.argmax(1) == data.y_test).double().mean())
    order = torch.argsort(test_losses, descending=True)
    index = {"highest": int(order[0]), "median": int(order[len(order) // 2])}
    sel = torch.tensor([index[r] for r in s["roles"]])
    test = (data.X_test[sel], data.y_test[sel])

    t = time.perf_counter()
    params = None if s["params"] == "all" else last_layer_params(model)
    calc = InfluenceCalculator(model, loss_fn, train, weight_decay=s["weight_decay"], damping=s["damping"],
                               method=s["method"], params=params, curvature=s["curvature"], **s["method_options"])
    pred = calc.scores(test)  # [T, n]
    timings["influence"] = time.perf_counter() - t
    pool: list[int] = []
    for row in pred:
        pool.extend(int(i) for i in top_k(row, min(s["k"], n)))
    remove = torch.tensor(sorted(set(pool)))

    runs = []
    for run in s["runs"]:
        t = time.perf_counter()
        steps = run_steps(run, n)
        loo = retrain_without(model, loss_fn, train, test, remove, weight_decay=s["weight_decay"],
                              optimizer=s["loo_optimizer"], lr=s["loo_lr"], steps=steps,
                              batch_size=run["batch_size"], seed=run["seed"], warm_start=True,
                              reference="retrained", progress=False)
        runs.append({**run, "steps": steps, "actual": [_round(a) for a in loo.loss_change.T],  # [T][R]
                     "seconds": time.perf_counter() - t})
    timings["loo"] = sum(r["seconds"] for r in runs)
    timings["total"] = time.perf_counter() - t_all
    rem = remove.numpy()
    body = {
        "dataset": dataset_block(data),
        "model": {"n_params": count_params(model), "n_params_influence": calc.objective.p},
        "training": {**fit, "test_accuracy": test_acc},
        "test_points": [{"role": r, "index": index[r], "test_loss": float(test_losses[index[r]]),
                         "predicted": _round(pred[j, remove])} for j, r in enumerate(s["roles"])],
        "removed": [int(i) for i in rem],
        "runs": runs,
    }
    return finish_record("noise", s, body, timings)


def run_noise_grid(name: str, settings: Sequence[dict[str, Any]], *, root: Path | str,
                   recompute: bool | None = None, jobs: int | None = 1, progress: bool = True) -> list[dict[str, Any]]:
    """Records of ``settings`` under ``<root>/<name>/`` (the shared store and executor, kind ``"noise"``)."""
    return run_grid(name, settings, root=root, recompute=recompute, jobs=jobs, progress=progress, kind="noise")


def noise_summary(record: dict[str, Any], base_run: int = 0, seed_runs: Sequence[int] | None = None,
                  step_runs: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Per examined test point: the size of the predicted effect, the spread of the actual effects across
    removed points (signal), the spread of the same removal across retraining seeds and across step counts
    (noise), and the correlations between predictions and runs and between two runs.

    ``seed_runs``: indices of runs that differ only in the seed (default: all mini-batch runs);
    ``step_runs``: indices of runs that differ only in the step count (default: all full-batch runs).
    """
    runs = record["runs"]
    if seed_runs is None:
        seed_runs = [i for i, r in enumerate(runs) if r["batch_size"] is not None]
    if step_runs is None:
        step_runs = [i for i, r in enumerate(runs) if r["batch_size"] is None]
    rows = []
    for j, tp in enumerate(record["test_points"]):
        pred = np.asarray(tp["predicted"])
        A = np.asarray([r["actual"][j] for r in runs])  # [runs, R]
        row: dict[str, Any] = {"role": tp["role"], "n_removed": len(pred),
                               "mean_abs_predicted": float(np.mean(np.abs(pred))),
                               "signal_sd": float(np.std(A[base_run], ddof=1))}
        for label, idx in (("seed", seed_runs), ("steps", step_runs)):
            if len(idx) >= 2:
                row[f"noise_sd_{label}"] = float(np.mean(np.std(A[list(idx)], axis=0, ddof=1)))
                row[f"signal_sd_{label}"] = float(np.std(A[list(idx)].mean(0), ddof=1))
                row[f"run_vs_run_spearman_{label}"] = _corr(A[idx[0]], A[idx[1]])["spearman"]
            else:
                row[f"noise_sd_{label}"] = row[f"signal_sd_{label}"] = row[f"run_vs_run_spearman_{label}"] = None
        row["pred_vs_run_spearman"] = [_corr(pred, a)["spearman"] for a in A]
        rows.append(row)
    return rows


# --- the ground-truth chapter's settings --------------------------------------------------------------------
def noise_settings(profile: str, overrides: dict[str, Any] | None = None,
                   seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The ground-truth chapter's noise settings on ``profile`` (``"default"`` or ``"quick"``)."""
    from . import presets

    check_choice("profile", profile, ("default", "quick"))
    return presets.settings("ground-truth", profile, overrides, list(seeds) if seeds is not None else None)
