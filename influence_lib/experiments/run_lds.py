"""The LDS runner: the linear datamodeling score (:mod:`influence_lib.lds`) of every method on one model.

Data -> model -> ``theta*`` (the same stages, hence the same ``theta*``, as the influence runner) -> influence scores
``[n_test, n]`` of every method -> for each ``alpha``: ``n_subsets`` random subsets, one retrained model per subset
(:func:`influence_lib.lds.retrain_subsets`) -> the LDS of every method, and a leave-one-out contrast on the same
model and retraining protocol.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..curvature import eigenvalue_summary
from ..lds import _check_alpha, _check_seed, _spearman_or_nan, lds, retrain_subsets, sample_subsets
from ..models import count_params
from ..objective import LossFn, Objective, flat_params
from ..retrain import TrainConfig, retrain_without
from ..solvers import EigenSolver, SolverError
from ..validation import check_choice, check_positive_int
from . import stages
from .record import dataset_block, finish_record, vector
from .settings import LOSSES, canonical_numbers, normalize_setting

LDS_DEFAULTS: dict[str, Any] = {
    "runner": "lds",
    "dataset": "iris", "fallback": None, "data_seed": 0, "n_train": None, "n_test": None, "dtype": "float64",
    "model": "mlp", "depth": 1, "width": 5, "activation": "relu", "seed": 0,
    "weight_decay": 0.0, "optimizer": "adam", "lr": 0.01, "steps": 5000, "batch_size": None, "loss": "cross_entropy",
    "methods": ["exact", "cg", "lissa", "arnoldi", "ekfac"], "damping": 0.001, "params": "all",
    "method_options": {},
    "alphas": [0.5], "n_subsets": 100, "subset_seed": None,  # None: the setting's seed
    "retrain_optimizer": "adam", "retrain_lr": 0.001, "retrain_steps": 2000, "retrain_batch_size": None,
    "retrain_warm_start": True, "retrain_normalization": "remaining", "retrain_chunk_size": None,
    # the paper's single-removal metric on the same model, scores and retraining protocol: leave-one-out of
    # "all" training points, of a seeded random sample of this many, or None (skip)
    "loo_points": None, "loo_k": 25,
}
_SHARED = ("dataset", "fallback", "data_seed", "n_train", "n_test", "dtype", "model", "depth", "width", "activation",
           "seed", "weight_decay", "optimizer", "lr", "steps", "batch_size", "loss", "methods", "damping", "params",
           "method_options")


def normalize_lds_setting(setting: dict[str, Any]) -> dict[str, Any]:
    """Fill :data:`LDS_DEFAULTS`, reject unknown keys and bad values before any computation."""
    unknown = sorted(set(setting) - set(LDS_DEFAULTS))
    if unknown:
        raise ValueError(f"setting: unknown key(s) {unknown}; accepted: {sorted(LDS_DEFAULTS)}")
    s = canonical_numbers({**LDS_DEFAULTS, **setting}, LDS_DEFAULTS)
    check_choice("runner", s["runner"], ("lds",))
    base = normalize_setting({k: s[k] for k in _SHARED})
    s.update({k: base[k] for k in _SHARED})
    if isinstance(s["alphas"], numbers.Real):
        s["alphas"] = [s["alphas"]]
    if not s["alphas"]:
        raise ValueError("alphas must be a non-empty list of kept fractions in (0, 1)")
    s["alphas"] = [_check_alpha(a) for a in s["alphas"]]
    check_positive_int("n_subsets", s["n_subsets"])
    if s["n_subsets"] < 3:
        raise ValueError(f"n_subsets must be >= 3 (LDS is a rank correlation across subsets), got {s['n_subsets']}")
    if s["subset_seed"] is not None:
        _check_seed(s["subset_seed"])
    check_choice("retrain_normalization", s["retrain_normalization"], ("remaining", "full"))
    TrainConfig(optimizer=s["retrain_optimizer"], lr=s["retrain_lr"], steps=s["retrain_steps"],
                batch_size=s["retrain_batch_size"])
    if s["retrain_chunk_size"] is not None:
        check_positive_int("retrain_chunk_size", s["retrain_chunk_size"])
    if s["loo_points"] is not None and s["loo_points"] != "all":
        check_positive_int("loo_points", s["loo_points"])
        if s["loo_points"] < 3:
            raise ValueError(f"loo_points must be 'all', None or an integer >= 3, got {s['loo_points']!r}")
    check_positive_int("loo_k", s["loo_k"])
    return s


def retrain_protocol(s: dict[str, Any]) -> dict[str, Any]:
    """The retraining options of an LDS setting, shared by its subsets and its leave-one-out contrast."""
    return {"weight_decay": s["weight_decay"], "optimizer": s["retrain_optimizer"], "lr": s["retrain_lr"],
            "steps": s["retrain_steps"], "warm_start": s["retrain_warm_start"], "seed": s["seed"],
            "batch_size": s["retrain_batch_size"], "normalization": s["retrain_normalization"],
            "chunk_size": s["retrain_chunk_size"]}


def run_lds_setting(setting: dict[str, Any], *, progress: bool = False) -> dict[str, Any]:
    """One LDS setting end to end -> a record (a JSON-serialisable dict).

    Data -> model -> ``theta*`` (exactly as :func:`influence_lib.experiment.run_setting` trains it) -> influence
    scores ``[n_test, n]`` of every test point with each method of ``methods`` -> for each ``alpha``:
    ``n_subsets`` random subsets, one retrained model per subset (:func:`retrain_subsets`) -> :func:`lds` of every
    method. A method whose solver fails is recorded with its error (and has no LDS). The record also holds each
    method's relative error against the exact scores, the per-test-point LDS of every method, the spread of
    the actual and predicted group effects, and, for the highest-loss test point, both vectors across subsets.
    """
    s = normalize_lds_setting(setting)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    loss_fn = LOSSES[s["loss"]]

    t = time.perf_counter()
    data, model = stages.data_and_model(s)  # the same data and initial model as experiment.run_setting
    train, test = (data.X_train, data.y_train), (data.X_test, data.y_test)
    n = len(data.y_train)
    timings["data_model"] = time.perf_counter() - t

    t = time.perf_counter()
    fit = stages.fit(model, loss_fn, train, s, progress)  # theta* exactly as experiment.run_setting trains it
    timings["train"] = time.perf_counter() - t
    with torch.no_grad():
        test_out = model(data.X_test)
        test_losses = Objective(model, loss_fn, *train).per_sample_losses(flat_params(model), *test)
        train_acc = float((model(data.X_train).argmax(1) == data.y_train).double().mean())
        test_acc = float((test_out.argmax(1) == data.y_test).double().mean())

    # influence scores of every test point, per method (a method whose solver fails is recorded, not hidden)
    health = stages.model_health(model, loss_fn, data, s["weight_decay"], grad_norm=fit["grad_norm"])
    scores, method_info, calcs = stages.influence_scores(model, loss_fn, train, test, s, timings,
                                                         params=stages.influence_params(model, s),
                                                         errors=(SolverError, FloatingPointError))
    spectrum = None
    if "exact" in calcs:
        spectrum = {**eigenvalue_summary(calcs["exact"].eigenvalues),
                    **_near_singular(calcs["exact"], test, scores["exact"])}
    if not scores:
        raise SolverError("every method failed: " + "; ".join(f"{m}: {v['error']}" for m, v in method_info.items()))
    rel_err = {}
    if "exact" in scores:
        ref = scores["exact"]
        for m, sc in scores.items():
            rel_err[m] = float((sc - ref).norm() / ref.norm().clamp_min(1e-300))

    # the single-removal contrast first: with every point removed once, the actual LOO effects are themselves an
    # attribution (the "LOO oracle") whose LDS says how additive the group effects are
    subset_seed = s["seed"] if s["subset_seed"] is None else s["subset_seed"]
    loo, oracle = None, None
    if s["loo_points"] is not None:
        loo = _loo_contrast(model, loss_fn, train, test, scores, s, subset_seed, progress)
        timings["loo"] = loo.pop("seconds")
        loo_actual = loo.pop("actual")  # [R, T]
        if len(loo["removed"]) == n:
            oracle = loo_actual.T  # [T, n]: actual change of each test loss when each point is removed

    # subsets, retraining, LDS
    highest = int(torch.argmax(test_losses))
    per_alpha = []
    for alpha in s["alphas"]:
        masks = sample_subsets(n, alpha, s["n_subsets"], subset_seed)
        t = time.perf_counter()
        res = retrain_subsets(model, loss_fn, train, test, masks, **retrain_protocol(s), progress=progress)
        timings[f"retrain_alpha_{alpha:g}"] = time.perf_counter() - t
        actual = res.loss_change  # [S, T]
        entry: dict[str, Any] = {
            "alpha": alpha, "subset_size": int(masks[0].sum()), "n_subsets": s["n_subsets"],
            "subset_seed": subset_seed,
            "retrain": {"grad_norm_median": float(res.grad_norms.median()),
                        "grad_norm_max": float(res.grad_norms.max()), "reference_grad_norm": res.ref_grad_norm},
            "actual_std": vector(actual.std(dim=0)),  # [T]: spread of the actual effect across subsets
            "actual_mean": vector(actual.mean(dim=0)),
            "methods": {},
            "example": {"test_index": highest, "actual": vector(actual[:, highest]), "predicted": {}},
        }
        for m, sc in scores.items():
            entry["methods"][m], pred = _lds_entry(sc, masks, actual)
            entry["example"]["predicted"][m] = vector(pred[highest])
        if oracle is not None:
            entry["loo_oracle"], pred = _lds_entry(oracle, masks, actual)
            entry["example"]["predicted"]["loo_oracle"] = vector(pred[highest])
        per_alpha.append(entry)

    timings["total"] = time.perf_counter() - t_all
    body = {
        "dataset": dataset_block(data),
        "model": {"n_params": count_params(model)},
        "training": {**fit, "train_accuracy": train_acc, "test_accuracy": test_acc},
        "health": health,
        "spectrum": spectrum,
        "methods": method_info,
        "relative_error_vs_exact": rel_err,
        "test_losses": vector(test_losses),
        "lds": per_alpha,
        "loo": loo,
    }
    return finish_record("lds", s, body, timings)


def _near_singular(calc: Any, test: tuple[Tensor, Tensor], scores: Tensor) -> dict[str, float]:
    """How close ``H + damping I`` comes to singular, and how much of the exact scores that direction carries.

    ``damped_min_abs = min_k |lambda_k + damping|``; ``damped_n_negative``: eigenvalues with ``lambda_k + damping <
    0``; ``near_singular_share = ||S_k||_F / ||S||_F`` where ``S_k = (1/n) (G_test q_k)(G_train q_k)^T /
    (lambda_k + damping)`` is the part of the exact score matrix ``S`` that comes from that one eigendirection ``q_k``.
    """
    solver = calc.solver
    if not isinstance(solver, EigenSolver):
        return {}
    shifted = solver.evals + solver.damping
    k = int(shifted.abs().argmin())
    q = solver.evecs[:, k].to(scores.dtype)
    a = calc.gradients(test, "test") @ q
    b = calc.gradients((calc.objective.X, calc.objective.y)) @ q
    part = a.norm() * b.norm() / (calc.n_train * shifted[k].abs())
    return {"damped_min_abs": float(shifted[k].abs()), "damped_n_negative": int((shifted < 0).sum()),
            "near_singular_share": float(part / scores.norm().clamp_min(1e-300))}


def _lds_entry(scores: Tensor | np.ndarray, masks: Tensor, actual: Tensor) -> tuple[dict[str, Any], np.ndarray]:
    """LDS summary of one attribution plus the mean Pearson correlation and the spreads; and the predictions."""
    out = lds(scores, masks, actual)
    A = actual.numpy()
    pear = np.array([float(np.corrcoef(p, a)[0, 1]) if p.std() > 0 and a.std() > 0 else math.nan
                     for p, a in zip(out.predicted, A.T, strict=True)])
    return {
        **out.summary(),
        "pearson_mean": float(np.nanmean(pear)) if np.isfinite(pear).any() else None,
        "predicted_std": vector(out.predicted.std(axis=1)),  # [T]: spread of the predicted group effect
        "predicted_mean": vector(out.predicted.mean(axis=1)),
    }, out.predicted


def _loo_contrast(model: nn.Module, loss_fn: LossFn, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                  scores: dict[str, Tensor], s: dict[str, Any], seed: int, progress: bool) -> dict[str, Any]:
    """Leave-one-out retraining (same protocol as the subsets) and each method's per-test-point correlation."""
    n = train[1].shape[0]
    if s["loo_points"] == "all" or s["loo_points"] >= n:
        remove = torch.arange(n)
    else:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
        remove = torch.randperm(n, generator=gen)[: s["loo_points"]].sort().values
    t = time.perf_counter()
    res = retrain_without(model, loss_fn, train, test, remove, **retrain_protocol(s), progress=progress)
    actual = res.loss_change.detach().cpu().numpy()  # [R, T]
    k = min(s["loo_k"], remove.numel())
    out: dict[str, Any] = {"removed": [int(i) for i in remove], "k": k, "methods": {}}
    for m, sc in scores.items():
        pred = sc[:, remove].numpy()  # [T, R]
        per_all, per_top, per_pear = [], [], []
        for t_ in range(pred.shape[0]):
            per_all.append(_spearman_or_nan(pred[t_], actual[:, t_]))
            top = np.argsort(-np.abs(pred[t_]), kind="mergesort")[:k]
            per_top.append(_spearman_or_nan(pred[t_, top], actual[top, t_]))
            a, b = pred[t_], actual[:, t_]
            per_pear.append(float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else math.nan)
        out["methods"][m] = {
            "spearman": [None if math.isnan(v) else v for v in per_all],
            "spearman_top": [None if math.isnan(v) else v for v in per_top],
            "pearson": [None if math.isnan(v) else v for v in per_pear],
        }
    out["seconds"] = time.perf_counter() - t
    out["actual"] = actual
    return out


def _nanmean(values: Sequence[float | None]) -> tuple[float, int]:
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    ok = np.isfinite(v)
    return (float(v[ok].mean()) if ok.any() else math.nan), int(ok.sum())


def to_frame(records: Sequence[dict[str, Any]], per_test: bool = False):
    """Records of :func:`run_lds_setting` as a table.

    ``per_test=False``: one row per (record, alpha, method) with the mean LDS over the test points (``lds``; the
    count of defined values in ``lds_n_defined``, of undefined ones in ``lds_n_undefined``), the mean Pearson
    correlation across subsets, the method's relative error against the exact scores, the ratio of the spreads
    (std across subsets) of predicted and actual group effects, and, where the record has a leave-one-out
    contrast, the mean LOO Spearman over all removed points and over the top-k by |score| (with their counts).
    ``per_test=True``: one row per (record, alpha, method, test point) with ``lds`` and ``loo_spearman``.
    Where the record has leave-one-out effects of every training point, the method ``"loo_oracle"`` (those actual
    effects used as the attribution) gets rows too.
    Failed records are skipped; a method that failed in a record gets a row with ``error`` set and no values.
    """
    import pandas as pd

    rows = []
    for r in records:
        if "error" in r:
            continue
        s = r["setting"]
        base = {k: v for k, v in s.items() if not isinstance(v, (dict, list))}
        base.update({"n_params": r["model"]["n_params"], "train_loss": r["training"]["loss"],
                     "grad_norm": r["training"]["grad_norm"], "test_accuracy": r["training"]["test_accuracy"],
                     "dataset_used": r["dataset"]["name"], "n_train_used": r["dataset"]["n_train"]})
        loo = r.get("loo")
        for e in r["lds"]:
            for m in [*s["methods"], *(["loo_oracle"] if "loo_oracle" in e else [])]:
                row = {**base, "alpha": e["alpha"], "method": m, "subset_size": e["subset_size"],
                       "retrain_grad_norm": e["retrain"]["grad_norm_median"]}
                info = r["methods"].get(m, {})
                if "error" in info:
                    rows.append({**row, "error": info["error"]})
                    continue
                me = e["loo_oracle"] if m == "loo_oracle" else e["methods"][m]
                lm = loo["methods"][m] if loo and m in loo["methods"] else None
                if per_test:
                    for t, v in enumerate(me["per_test"]):
                        rows.append({**row, "error": None, "test_index": t, "test_loss": r["test_losses"][t],
                                     "lds": np.nan if v is None else v,
                                     "loo_spearman": np.nan if lm is None or lm["spearman"][t] is None
                                     else lm["spearman"][t]})
                    continue
                row.update({"error": None, "lds": np.nan if me["mean"] is None else me["mean"],
                            "lds_n_defined": me["n_defined"], "lds_n_undefined": me["n_undefined"],
                            "pearson": me["pearson_mean"], "relative_error": r["relative_error_vs_exact"].get(m),
                            "scale_ratio": float(np.mean(me["predicted_std"]) / max(np.mean(e["actual_std"]), 1e-300))})
                if lm is not None:
                    row["loo_spearman"], row["loo_n_defined"] = _nanmean(lm["spearman"])
                    row["loo_spearman_top"], row["loo_top_n_defined"] = _nanmean(lm["spearman_top"])
                    row["loo_k"] = loo["k"]
                rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["LDS_DEFAULTS", "normalize_lds_setting", "run_lds_setting", "to_frame"]
