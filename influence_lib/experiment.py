"""One setting end to end: data -> model -> theta* -> influence -> LOO retraining -> metrics -> a record.

A *setting* is a flat dict of JSON-serialisable values (see :data:`DEFAULTS`); :func:`run_setting` turns it
into a *record*: the setting, library/runtime versions, timings, training diagnostics, the curvature
spectrum, and for each examined test point the predicted and the actual loss changes over the removed
training points with their correlations. Records are plain dicts, written as JSON by :mod:`influence_lib.sweep`.

Test points examined (roles): ``"highest"`` (largest test loss at theta*), ``"median"`` (median test loss) and
``n_random_test`` random ones. Removed training points: ``remove="all"`` (every training point) or
``remove="top"`` (for each examined test point its ``k`` largest |predicted| influences, pooled).

Optional (see :data:`OPTIONAL_DEFAULTS`): ``curvatures`` beyond the first add, per test point, the scores of the
primary method with another curvature (``entry["curvatures"]["gauss-newton"]``: predictions and their correlations
with LOO, with the primary scores and with the PBRF); ``pbrf=True`` adds a second ground truth, the proximal Bregman
response of the same removed points (:mod:`influence_lib.pbrf`; ``entry["pbrf"]``: its loss changes and their
correlations with the primary scores and with LOO; ``record["pbrf"]``: the optimiser's step size, the relative final
gradient norm of every PBRF and the norms of the parameter changes).
"""

from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .curvature import eigenvalue_summary, extreme_eigenvalues, spectrum_summary
from .data import load_dataset
from .influence import CURVATURES, InfluenceCalculator
from .metrics import pearson, spearman, top_k
from .models import build_model, count_params, last_layer_params
from .pbrf import pbrf_response
from .retrain import OPTIMIZERS, retrain_without, train_model
from .solvers import METHODS, SolverError
from .validation import check_choice, check_nonneg, check_positive, check_positive_int

DEFAULTS: dict[str, Any] = {
    # data
    "dataset": "iris",
    "fallback": None,  # dataset used when `dataset` is unavailable offline (named in the record)
    "data_seed": 0,
    "n_train": None,
    "n_test": None,
    "dtype": "float64",
    # model
    "model": "mlp",
    "depth": 1,
    "width": 5,
    "activation": "relu",
    "seed": 0,
    # training to theta*
    "weight_decay": 0.0,
    "optimizer": "adam",
    "lr": 0.01,
    "steps": 5000,
    "batch_size": None,
    # influence
    "methods": ["exact"],  # the first is the one compared with LOO; others are compared with it
    "damping": 0.001,
    "params": "all",  # "all" or "last" (last linear layer only)
    "method_options": {},  # {"lissa": {...}, "cg": {...}}
    "curvature_limit": 6000,  # dense Hessian spectrum only up to this many parameters
    # examined test points
    "n_random_test": 2,
    # leave-one-out
    "remove": "all",  # "all" or "top"
    "k": 25,  # top-k size for metrics (and for remove="top")
    "loo_optimizer": "adam",
    "loo_lr": 0.001,
    "loo_steps": 2000,
    "loo_batch_size": None,
    "loo_warm_start": True,
    "loo_reference": "retrained",
    "loo_normalization": "remaining",
    "loo_chunk_size": None,
    "loss": "cross_entropy",
}

#: Settings added after records existed. A normalised setting lists one of these only where it differs from this
#: default, so the key (hash) and the stored setting of every record computed without them are unchanged.
OPTIONAL_DEFAULTS: dict[str, Any] = {
    # curvatures of the influence scores, computed with the primary method; the first gives "predicted", the others
    # are recorded per test point under "curvatures"
    "curvatures": ["hessian"],
    # a second ground truth: the proximal Bregman response function (influence_lib.pbrf) of the removed points,
    # with the setting's damping and weight decay
    "pbrf": False,
    "pbrf_optimizer": "sgd",
    "pbrf_lr": "auto",  # a number, or "auto" (sgd only): 1 / lambda_max of G + damping I at theta*
    "pbrf_momentum": 0.9,
    "pbrf_steps": 1000,
}

LOSSES = {"cross_entropy": F.cross_entropy}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def normalize_setting(setting: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults, reject unknown keys and values early (before any long computation).

    Keys of :data:`OPTIONAL_DEFAULTS` are checked too but kept only where they differ from their default.
    """
    unknown = sorted(set(setting) - set(DEFAULTS) - set(OPTIONAL_DEFAULTS))
    if unknown:
        raise ValueError(f"setting: unknown key(s) {unknown}; accepted: {sorted({*DEFAULTS, *OPTIONAL_DEFAULTS})}")
    s = {**DEFAULTS, **setting}
    if isinstance(s.get("curvatures"), str):
        s["curvatures"] = [s["curvatures"]]
    for key, default in OPTIONAL_DEFAULTS.items():  # listed only where different from the default
        if key in s and s[key] == default:
            del s[key]
    o = {**OPTIONAL_DEFAULTS, **s}
    if not isinstance(o["curvatures"], list) or not o["curvatures"]:
        raise ValueError(f"curvatures must be a non-empty list of {list(CURVATURES)}, got {o['curvatures']!r}")
    for c in o["curvatures"]:
        check_choice("curvatures", c, CURVATURES)
    if not isinstance(o["pbrf"], bool):
        raise ValueError(f"pbrf must be True or False, got {o['pbrf']!r}")
    check_choice("pbrf_optimizer", o["pbrf_optimizer"], OPTIMIZERS)
    if o["pbrf_lr"] == "auto":
        if o["pbrf_optimizer"] != "sgd":
            raise ValueError("pbrf_lr='auto' requires pbrf_optimizer='sgd'")
    else:
        check_positive("pbrf_lr", o["pbrf_lr"])
    check_nonneg("pbrf_momentum", o["pbrf_momentum"])
    check_positive_int("pbrf_steps", o["pbrf_steps"])
    if isinstance(s["methods"], str):
        s["methods"] = [s["methods"]]
    for m in s["methods"]:
        check_choice("methods", m, METHODS)
    check_choice("dtype", s["dtype"], DTYPES)
    check_choice("remove", s["remove"], ("all", "top"))
    check_choice("params", s["params"], ("all", "last"))
    check_choice("loss", s["loss"], LOSSES)
    if not isinstance(s["k"], int) or s["k"] < 2:
        raise ValueError(f"k must be an integer >= 2, got {s['k']!r}")
    return s


def versions() -> dict[str, str]:
    import numpy
    import scipy

    return {"influence_lib": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": str(torch.get_num_threads())}


def _round(x: torch.Tensor | np.ndarray, digits: int = 8) -> list[float]:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64).ravel()
    if not np.isfinite(a).all():
        raise FloatingPointError("refusing to record non-finite values")
    return [float(f"{v:.{digits}g}") for v in a]


def _round_or_none(x: torch.Tensor | np.ndarray, digits: int = 8) -> list[float | None]:
    """Like :func:`_round`, with ``None`` for each non-finite value (no answer, e.g. from a diverged PBRF)."""
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64).ravel()
    return [float(f"{v:.{digits}g}") if np.isfinite(v) else None for v in a]


def _corr(pred: np.ndarray, actual: np.ndarray) -> dict[str, float | None]:
    """Pearson and Spearman; None (never NaN) where undefined (constant input)."""
    out: dict[str, float | None] = {}
    for name, fn in (("pearson", pearson), ("spearman", spearman)):
        try:
            out[name] = fn(pred, actual)
        except ValueError:
            out[name] = None
    return out


def select_test_points(test_losses: torch.Tensor, n_random: int, seed: int) -> list[tuple[str, int]]:
    """``[(role, index)]``: highest-loss, median-loss, then ``n_random`` distinct random test points."""
    order = torch.argsort(test_losses, descending=True)
    chosen = [("highest", int(order[0])), ("median", int(order[len(order) // 2]))]
    rng = np.random.default_rng(seed)
    rest = [i for i in range(len(test_losses)) if i not in {c[1] for c in chosen}]
    for i in rng.permutation(rest)[: max(0, min(n_random, len(rest)))]:
        chosen.append(("random", int(i)))
    return chosen


def data_and_model(s: dict[str, Any]):
    """The data set and the freshly initialised (seeded) model of a normalised setting ``s``: ``(data, model)``.

    Shared by every runner, so that the same setting gives the same data and initial model everywhere.
    """
    data = load_dataset(s["dataset"], seed=s["data_seed"], n_train=s["n_train"], n_test=s["n_test"],
                        fallback=s["fallback"], dtype=DTYPES[s["dtype"]], flatten=s["model"] in ("mlp", "linear"))
    kwargs = {} if s["model"] == "linear" else {"depth": s["depth"], "width": s["width"],
                                                "activation": s["activation"]}
    if s["model"] in ("vgg", "resnet"):
        kwargs = {"width": s["width"], "activation": s["activation"],
                  ("stages" if s["model"] == "vgg" else "blocks"): s["depth"]}
    model = build_model(s["model"], in_shape=tuple(data.X_train.shape[1:]), n_classes=data.n_classes,
                        seed=s["seed"], dtype=DTYPES[s["dtype"]], **kwargs)
    return data, model


def fit_setting(model, loss_fn, train: tuple[torch.Tensor, torch.Tensor], s: dict[str, Any],
                progress: bool = False) -> dict[str, Any]:
    """Train ``model`` in place to ``theta*`` with the training settings of the normalised setting ``s``."""
    return train_model(model, loss_fn, train, weight_decay=s["weight_decay"], optimizer=s["optimizer"], lr=s["lr"],
                       steps=s["steps"], batch_size=s["batch_size"], seed=s["seed"], progress=progress)


def run_setting(setting: dict[str, Any], *, progress: bool = False) -> dict[str, Any]:
    """Run one setting and return its record (see the module docstring)."""
    s = normalize_setting(setting)
    o = {**OPTIONAL_DEFAULTS, **s}  # the optional settings, defaults filled in
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    loss_fn = LOSSES[s["loss"]]

    # data and model ---------------------------------------------------------------------------
    t = time.perf_counter()
    data, model = data_and_model(s)
    train = (data.X_train, data.y_train)
    n = len(data.y_train)
    if s["remove"] == "all" and n > 2000:
        raise ValueError(f"remove='all' would retrain {n} models; use remove='top' for data this large")
    timings["data_model"] = time.perf_counter() - t

    # training to theta* -------------------------------------------------------------------------
    t = time.perf_counter()
    fit = fit_setting(model, loss_fn, train, s, progress)
    timings["train"] = time.perf_counter() - t
    with torch.no_grad():
        train_acc = float((model(data.X_train).argmax(1) == data.y_train).double().mean())
        test_out = model(data.X_test)
        test_acc = float((test_out.argmax(1) == data.y_test).double().mean())
        test_losses = F.cross_entropy(test_out, data.y_test, reduction="none")
        train_losses = F.cross_entropy(model(data.X_train), data.y_train, reduction="none")
    roles = select_test_points(test_losses, s["n_random_test"], s["seed"])
    sel = torch.tensor([i for _, i in roles])
    sel_test = (data.X_test[sel], data.y_test[sel])

    # influence ----------------------------------------------------------------------------------
    params = None if s["params"] == "all" else last_layer_params(model)
    scores: dict[str, torch.Tensor] = {}
    method_info: dict[str, Any] = {}
    calcs: dict[str, InfluenceCalculator] = {}
    for m in s["methods"]:
        t = time.perf_counter()
        calc = InfluenceCalculator(model, loss_fn, train, weight_decay=s["weight_decay"], damping=s["damping"],
                                   method=m, params=params, curvature=o["curvatures"][0],
                                   **s["method_options"].get(m, {}))
        try:
            scores[m] = calc.scores(sel_test)
        except SolverError as e:  # recorded, not hidden: the chapter reports the failure
            method_info[m] = {"error": str(e)}
            continue
        timings[f"influence_{m}"] = time.perf_counter() - t
        calcs[m] = calc
        method_info[m] = {k: v for k, v in calc.last_info.items() if not isinstance(v, list)}
    primary = s["methods"][0]
    if primary not in scores:
        raise SolverError(f"the primary method {primary!r} failed: {method_info[primary]['error']}")
    pred = scores[primary]  # [T, n]
    calc_p = calcs[primary]
    if "exact" in calcs:
        spectrum = eigenvalue_summary(calcs["exact"].eigenvalues)
    elif calc_p.objective.p <= s["curvature_limit"]:
        spectrum = spectrum_summary(calc_p.operator.dense())
    else:
        lo, hi = extreme_eigenvalues(calc_p.operator, iters=min(60, calc_p.objective.p))
        spectrum = {"lambda_min": lo, "lambda_max": hi, "estimated_by": "lanczos-60"}

    # the primary method with the other curvatures (e.g. Gauss-Newton beside the Hessian)
    curv_scores: dict[str, torch.Tensor] = {}
    curv_calcs: dict[str, InfluenceCalculator] = {}
    for cv in o["curvatures"][1:]:
        t = time.perf_counter()
        calc = InfluenceCalculator(model, loss_fn, train, weight_decay=s["weight_decay"], damping=s["damping"],
                                   method=primary, params=params, curvature=cv,
                                   **s["method_options"].get(primary, {}))
        curv_scores[cv] = calc.scores(sel_test)
        curv_calcs[cv] = calc
        timings[f"influence_{primary}_{cv}"] = time.perf_counter() - t

    # which training points to retrain without ----------------------------------------------------
    if s["remove"] == "all":
        remove = torch.arange(n)
    else:
        pool: list[int] = []
        for row in pred:
            pool.extend(int(i) for i in top_k(row, min(s["k"], n)))
        remove = torch.tensor(sorted(set(pool)))

    # leave-one-out retraining --------------------------------------------------------------------
    t = time.perf_counter()
    loo = retrain_without(model, loss_fn, train, sel_test, remove, weight_decay=s["weight_decay"],
                          optimizer=s["loo_optimizer"], lr=s["loo_lr"], steps=s["loo_steps"],
                          batch_size=s["loo_batch_size"], warm_start=s["loo_warm_start"], seed=s["seed"],
                          reference=s["loo_reference"], normalization=s["loo_normalization"],
                          chunk_size=s["loo_chunk_size"], progress=progress)
    timings["loo"] = time.perf_counter() - t
    actual = loo.loss_change.T  # [T, R]

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
                     "relative_grad_norm": _round_or_none(pb.relative_grad_norm),
                     "param_change_norm": _round_or_none(pb.param_change.norm(dim=1))}
        if "gauss-newton" in curv_calcs and params is None:
            pbrf_info["predicted_param_change_norm_gn"] = _round(
                curv_calcs["gauss-newton"].param_change(remove).norm(dim=1))

    # predicted vs actual parameter change (norms), first-order prediction (1/n) A^-1 g_i
    param_norms = None
    if params is None:
        dtheta = calc_p.param_change(remove)
        param_norms = {"predicted": _round(dtheta.norm(dim=1)), "actual": _round(loo.param_change.norm(dim=1))}

    # metrics per examined test point ---------------------------------------------------------------
    remove_np = remove.numpy()
    train_loss_np = train_losses.detach().cpu().numpy()
    points = []
    for j, (role, idx) in enumerate(roles):
        p_all = pred[j, remove].detach().cpu().numpy()
        a_all = actual[j].detach().cpu().numpy()
        entry: dict[str, Any] = {"role": role, "index": idx, "test_loss": float(test_losses[idx]),
                                 "all": _corr(p_all, a_all)}
        k = min(s["k"], len(remove_np))
        top = top_k(p_all, k)
        entry[f"top{k}_influence"] = _corr(p_all[top], a_all[top])
        if s["remove"] == "all":
            hl = np.argsort(-train_loss_np[remove_np], kind="mergesort")[:k]
            entry[f"top{k}_train_loss"] = _corr(p_all[hl], a_all[hl])
        entry["predicted"] = _round(p_all)
        entry["actual"] = _round(a_all)
        if pbrf_actual is not None:
            b_all = pbrf_actual[j].detach().cpu().numpy()
            fin = np.isfinite(b_all)  # False where the PBRF diverged
            top_fin = top[fin[top]]
            entry["pbrf"] = {"actual": _round_or_none(b_all), "all": _corr(p_all[fin], b_all[fin]),
                             f"top{k}_influence": _corr(p_all[top_fin], b_all[top_fin]),
                             "vs_loo": _corr(b_all[fin], a_all[fin])}
        if curv_scores:
            entry["curvatures"] = {}
        for cv, sc in curv_scores.items():
            c_all = sc[j, remove].detach().cpu().numpy()
            c_top = top_k(c_all, k)
            ce: dict[str, Any] = {"predicted": _round(c_all), "all": _corr(c_all, a_all),
                                  f"top{k}_influence": _corr(c_all[c_top], a_all[c_top]),
                                  "vs_reference": _corr(c_all, p_all)}
            if pbrf_actual is not None:
                c_top_fin = c_top[fin[c_top]]
                ce["pbrf"] = {"all": _corr(c_all[fin], b_all[fin]),
                              f"top{k}_influence": _corr(c_all[c_top_fin], b_all[c_top_fin])}
            entry["curvatures"][cv] = ce
        entry["estimators"] = {}
        for m, sc in scores.items():
            if m == primary:
                continue
            est = sc[j].detach().cpu().numpy()
            ref = pred[j].detach().cpu().numpy()
            entry["estimators"][m] = {
                "relative_error": float(np.linalg.norm(est - ref) / max(np.linalg.norm(ref), 1e-300)),
                "vs_reference": _corr(est, ref),
                "vs_loo": _corr(est[remove_np], a_all),
            }
        points.append(entry)

    timings["total"] = time.perf_counter() - t_all
    extra = {} if pbrf_info is None else {"pbrf": pbrf_info}
    return {
        "setting": s,
        "dataset": {"requested": data.requested, "name": data.name, "source": data.source,
                    "n_train": n, "n_test": len(data.y_test), "substitute": data.is_substitute},
        "model": {"n_params": count_params(model), "n_params_influence": calc_p.objective.p},
        "training": {**fit, "train_accuracy": train_acc, "test_accuracy": test_acc},
        "spectrum": spectrum,
        "methods": method_info,
        "removed": [int(i) for i in remove_np],
        "param_change_norms": param_norms,
        "test_points": points,
        "timings": timings,
        "versions": versions(),
        **extra,
    }
