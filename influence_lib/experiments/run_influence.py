"""The influence runner: one setting end to end, composed from the shared stages.

    data -> model -> theta* (health checked) -> influence of every method -> spectrum -> removals
         -> leave-one-out retraining (and, optionally, the PBRF) -> metrics per examined test point -> record

Every experiment kind of the paper's protocol (convex baseline, Iris, small MNIST, CNNs, test points) is this
runner with another preset (:mod:`influence_lib.experiments.presets`); the LDS and the ground-truth noise study
have runners of their own (:mod:`.run_lds`, :mod:`.noise`), built from the same stages.

Test points examined (roles): ``"highest"`` (largest test loss at theta*), ``"median"`` (median test loss) and
``n_random_test`` random ones. Removed training points: ``remove="all"`` (every training point) or
``remove="top"`` (for each examined test point its ``k`` largest |predicted| influences, pooled).

Optional (see :data:`~.settings.OPTIONAL_DEFAULTS`): ``curvatures`` beyond the first add, per test point, the scores
of the primary method with another curvature (``entry["curvatures"]["gauss-newton"]``: predictions and their
correlations with LOO, with the primary scores and with the PBRF); ``pbrf=True`` adds a second ground truth, the
proximal Bregman response of the same removed points (``entry["pbrf"]``: its loss changes and their correlations with
the primary scores and with LOO; ``record["pbrf"]``: the optimiser's step size, the relative final gradient norm of
every PBRF and the norms of the parameter changes).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..metrics import top_k
from ..models import count_params
from ..pbrf import pbrf_response
from ..retrain import retrain_without, train_model
from ..solvers import SolverError
from . import stages
from .record import corr, dataset_block, finish_record, vector, vector_or_none
from .settings import LOSSES, OPTIONAL_DEFAULTS, REPLICATE_KEYS, normalize_setting


def run_setting(setting: dict[str, Any], *, progress: bool = False) -> dict[str, Any]:
    """Run one setting and return its record (see the module docstring and :mod:`.record`)."""
    s = normalize_setting(setting)
    o = {**OPTIONAL_DEFAULTS, **s}  # the optional settings, defaults filled in
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    loss_fn = LOSSES[s["loss"]]

    t = time.perf_counter()
    data, model = stages.data_and_model(s)
    train = (data.X_train, data.y_train)
    n = len(data.y_train)
    if s["remove"] == "all" and n > 2000:
        raise ValueError(f"remove='all' would retrain {n} models; use remove='top' for data this large")
    timings["data_model"] = time.perf_counter() - t

    t = time.perf_counter()
    fit = stages.fit(model, loss_fn, train, s, progress, data=data)
    timings["train"] = time.perf_counter() - t
    if o["polish"]:
        t = time.perf_counter()
        pol = train_model(model, loss_fn, train, weight_decay=s["weight_decay"], optimizer="newton")
        fit = {**fit, "grad_norm_before_polish": fit["grad_norm"], "loss": pol["loss"], "grad_norm": pol["grad_norm"],
               "polish_iterations": pol.get("iterations")}
        timings["polish"] = time.perf_counter() - t
    train_acc, test_acc = stages.accuracies(model, data)
    health = stages.model_health(model, loss_fn, data, s["weight_decay"], grad_norm=fit["grad_norm"])
    train_losses, test_losses = stages.test_losses(model, data)
    roles = stages.select_test_points(test_losses, s["n_random_test"], s["seed"])
    sel = torch.tensor([i for _, i in roles])
    sel_test = (data.X_test[sel], data.y_test[sel])

    params = stages.influence_params(model, s)
    scores, method_info, calcs = stages.influence_scores(model, loss_fn, train, sel_test, s, timings,
                                                         curvature=o["curvatures"][0], params=params)
    if o["lissa_truncated"] and "exact" in calcs:
        t = time.perf_counter()
        scores["lissa-truncated"], method_info["lissa-truncated"] = stages.lissa_truncated_scores(
            calcs["exact"], train, sel_test, s)
        timings["influence_lissa-truncated"] = time.perf_counter() - t
    primary = s["methods"][0]
    if primary not in scores:
        raise SolverError(f"the primary method {primary!r} failed: {method_info[primary]['error']}")
    pred = scores[primary]  # [T, n]
    calc_p = calcs[primary]
    spectrum = stages.spectrum(calcs, primary, s["curvature_limit"])

    # the primary method with the other curvatures (e.g. Gauss-Newton beside the Hessian)
    curv_scores: dict[str, torch.Tensor] = {}
    curv_calcs: dict[str, Any] = {}
    for cv in o["curvatures"][1:]:
        t = time.perf_counter()
        calc = stages.calculator(model, loss_fn, train, s, primary, cv, params)
        curv_scores[cv] = calc.scores(sel_test)
        curv_calcs[cv] = calc
        timings[f"influence_{primary}_{cv}"] = time.perf_counter() - t

    remove = stages.removal_set(pred, s, n)
    t = time.perf_counter()
    loo = stages.loo(model, loss_fn, train, sel_test, remove, s, progress)
    timings["loo"] = time.perf_counter() - t
    actual = loo.loss_change.T  # [T, R]

    # the LOO noise ceiling: the same removals (or the top ones) retrained again under other protocols
    replicate_block, replicate_actual = None, []
    if o["loo_replicates"]:
        t = time.perf_counter()
        replicate_block, replicate_actual = loo_replicates(model, loss_fn, train, sel_test, remove, pred, roles, s, o,
                                                           progress)
        timings["loo_replicates"] = time.perf_counter() - t

    # the second leave-one-out ground truth: Newton-converged from theta*
    newton_actual, newton_info = None, None
    if o["loo_newton"]:
        t = time.perf_counter()
        nl = retrain_without(model, loss_fn, train, sel_test, remove, weight_decay=s["weight_decay"],
                             optimizer="newton", normalization=s["loo_normalization"], on_failure="flag",
                             progress=progress)
        timings["loo_newton"] = time.perf_counter() - t
        newton_actual = nl.loss_change.T  # [T, R]; NaN where a model missed the tolerance
        newton_info = {"converged": [bool(c) for c in nl.converged], "n_converged": int(nl.converged.sum()),
                       "iterations": [int(i) for i in nl.iterations], "grad_norm": vector_or_none(nl.grad_norm),
                       "ref_converged": nl.ref_converged, "ref_grad_norm": nl.ref_grad_norm}

    # the second ground truth: the proximal Bregman response function of the same removals
    pbrf_actual, pbrf_info = None, None
    if o["pbrf"]:
        t = time.perf_counter()
        pb = pbrf_response(model, loss_fn, train, sel_test, remove, weight_decay=s["weight_decay"],
                           damping=s["damping"], optimizer=o["pbrf_optimizer"], lr=o["pbrf_lr"],
                           momentum=o["pbrf_momentum"], steps=o["pbrf_steps"], seed=s["seed"], params=params,
                           progress=progress)
        timings["pbrf"] = time.perf_counter() - t
        pbrf_actual = pb.loss_change.T  # [T, R]
        # a diverged PBRF (no minimiser reached near theta*) has None in every list and is left out of correlations
        pbrf_info = {"lr": pb.config["lr"], "diverged": [int(i) for i in remove[pb.diverged.cpu()]],
                     "relative_grad_norm": vector_or_none(pb.relative_grad_norm),
                     "param_change_norm": vector_or_none(pb.param_change.norm(dim=1))}
        if "gauss-newton" in curv_calcs and params is None:
            pbrf_info["predicted_param_change_norm_gn"] = vector(
                curv_calcs["gauss-newton"].param_change(remove).norm(dim=1))

    # predicted vs actual parameter change (norms), first-order prediction (1/n) A^-1 g_i
    param_norms = None
    if params is None:
        dtheta = calc_p.param_change(remove)
        param_norms = {"predicted": vector(dtheta.norm(dim=1)), "actual": vector(loo.param_change.norm(dim=1))}

    points = point_metrics(roles, test_losses, train_losses, pred, actual, remove, scores, primary, s,
                           curv_scores, pbrf_actual)
    if newton_actual is not None:
        for j, entry in enumerate(points):
            nv = newton_actual[j].detach().cpu().numpy()
            fin = np.isfinite(nv)
            p_all = pred[j, remove].detach().cpu().numpy()
            a_all = actual[j].detach().cpu().numpy()
            entry["newton"] = {"actual": vector_or_none(nv), "all": corr(p_all[fin], nv[fin]),
                               "vs_warm_start": corr(a_all[fin], nv[fin])}
    if replicate_actual:
        pos = np.asarray(replicate_block["positions"])
        for j, entry in enumerate(points):
            a = actual[j].detach().cpu().numpy()[pos]
            p = pred[j, remove].detach().cpu().numpy()[pos]
            entry["replicates"] = [{"actual": vector(rep[j]), "vs_loo": corr(a, rep[j]),
                                    "predicted_vs_loo": corr(p, a), "predicted_vs_replicate": corr(p, rep[j])}
                                   for rep in replicate_actual]
    timings["total"] = time.perf_counter() - t_all
    body: dict[str, Any] = {
        "dataset": dataset_block(data),
        "model": {"n_params": count_params(model), "n_params_influence": calc_p.objective.p},
        "training": {**fit, "train_accuracy": train_acc, "test_accuracy": test_acc},
        "health": health,
        "spectrum": spectrum,
        "methods": method_info,
        "removed": [int(i) for i in remove.numpy()],
        "loo": loo_block(loo),
        "param_change_norms": param_norms,
        "test_points": points,
    }
    if pbrf_info is not None:
        body["pbrf"] = pbrf_info
    if newton_info is not None:
        body["loo_newton"] = newton_info
    if replicate_block is not None:
        body["loo_replicates"] = replicate_block
    return finish_record("influence", s, body, timings)


def loo_replicates(model, loss_fn, train, test, remove, pred, roles, s, o, progress=False):
    """The setting's removals (the pooled top ``loo_replicate_k`` |predicted| of the highest- and median-loss test
    points, or all) retrained under each protocol of ``loo_replicates``: ``(block, [array [T, R'] per replicate])``;
    ``block["positions"]`` indexes the replicated removals within ``remove``."""
    k = o["loo_replicate_k"]
    if k is None:
        pos = np.arange(len(remove))
    else:
        chosen: set[int] = set()
        for j, (role, _) in enumerate(roles):
            if role in ("highest", "median"):
                chosen.update(int(i) for i in top_k(pred[j, remove], min(k, len(remove))))
        pos = np.array(sorted(chosen), dtype=np.int64)
    sub = remove[torch.from_numpy(pos)]
    block: dict[str, Any] = {"positions": [int(i) for i in pos], "protocols": []}
    actual = []
    for rep in o["loo_replicates"]:
        r_setting = {**s, **{REPLICATE_KEYS[key]: v for key, v in rep.items()}}
        res = stages.loo(model, loss_fn, train, test, sub, r_setting, progress)
        actual.append(res.loss_change.T.detach().cpu().numpy())
        block["protocols"].append({"protocol": dict(rep), **loo_block(res)})
    return block, actual


def loo_block(loo) -> dict[str, Any]:
    """How far the retrained models are from stationarity: the gradient norm of each one's training objective
    (``[R]``, lossless), of the reference model, and their median and maximum."""
    if loo.grad_norm is None:
        return {}
    g = loo.grad_norm.detach().cpu().double()
    return {"grad_norm": vector(g, "LOO gradient norms"), "grad_norm_median": float(g.median()),
            "grad_norm_max": float(g.max()), "ref_grad_norm": loo.ref_grad_norm}


def point_metrics(roles, test_losses, train_losses, pred, actual, remove, scores, primary, s, curv_scores,
                  pbrf_actual) -> list[dict[str, Any]]:
    """Per examined test point: its predicted and actual loss changes over the removed points (lossless) and their
    Pearson and Spearman correlations over all removed points and over the two top-``k`` subsets (largest
    |predicted|; highest training loss), the other curvatures, the PBRF and the other estimators."""
    remove_np = remove.numpy()
    train_loss_np = train_losses.detach().cpu().numpy()
    points = []
    for j, (role, idx) in enumerate(roles):
        p_all = pred[j, remove].detach().cpu().numpy()
        a_all = actual[j].detach().cpu().numpy()
        entry: dict[str, Any] = {"role": role, "index": idx, "test_loss": float(test_losses[idx]),
                                 "all": corr(p_all, a_all)}
        k = min(s["k"], len(remove_np))
        top = top_k(p_all, k)
        entry[f"top{k}_influence"] = corr(p_all[top], a_all[top])
        if s["remove"] == "all":
            hl = np.argsort(-train_loss_np[remove_np], kind="mergesort")[:k]
            entry[f"top{k}_train_loss"] = corr(p_all[hl], a_all[hl])
        entry["predicted"] = vector(p_all)
        entry["actual"] = vector(a_all)
        if pbrf_actual is not None:
            b_all = pbrf_actual[j].detach().cpu().numpy()
            fin = np.isfinite(b_all)  # False where the PBRF diverged
            top_fin = top[fin[top]]
            entry["pbrf"] = {"actual": vector_or_none(b_all), "all": corr(p_all[fin], b_all[fin]),
                             f"top{k}_influence": corr(p_all[top_fin], b_all[top_fin]),
                             "vs_loo": corr(b_all[fin], a_all[fin])}
        if curv_scores:
            entry["curvatures"] = {}
        for cv, sc in curv_scores.items():
            c_all = sc[j, remove].detach().cpu().numpy()
            c_top = top_k(c_all, k)
            ce: dict[str, Any] = {"predicted": vector(c_all), "all": corr(c_all, a_all),
                                  f"top{k}_influence": corr(c_all[c_top], a_all[c_top]),
                                  "vs_reference": corr(c_all, p_all)}
            if pbrf_actual is not None:
                c_top_fin = c_top[fin[c_top]]
                ce["pbrf"] = {"all": corr(c_all[fin], b_all[fin]),
                              f"top{k}_influence": corr(c_all[c_top_fin], b_all[c_top_fin])}
            entry["curvatures"][cv] = ce
        entry["estimators"] = {}
        for m, sc in scores.items():
            if m == primary:
                continue
            est = sc[j].detach().cpu().numpy()
            ref = pred[j].detach().cpu().numpy()
            entry["estimators"][m] = {
                "relative_error": float(np.linalg.norm(est - ref) / max(np.linalg.norm(ref), 1e-300)),
                "vs_reference": corr(est, ref),
                "vs_loo": corr(est[remove_np], a_all),
            }
        points.append(entry)
    return points
