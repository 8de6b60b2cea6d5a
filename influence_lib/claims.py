"""The paper's claims against our records: one row per claim, with the measurement and a verdict.

Every function takes the records of one sweep (as written by :mod:`influence_lib.sweep` or
:mod:`influence_lib.noise`) and returns a :class:`Claim`; :func:`claim_table` collects them for the book's
introduction. Verdicts follow :func:`influence_lib.report.verdict`: "reproduced" when a 95% interval excludes
zero in the paper's direction, "opposite" when it excludes zero the other way, "not resolved" otherwise.
The accuracy of a model is the Spearman correlation between predicted and actual (LOO) loss changes over
all removed training points, averaged over the model's examined test points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .metrics import mean_ci
from .report import fmt_ci, slope_ci, verdict

Records = Sequence[dict[str, Any]]


@dataclass(frozen=True)
class Claim:
    """One line of the claim table: what the paper says, what we measured, and the verdict."""

    finding: str
    paper: str
    chapter: str
    measured: str
    verdict: str


def _ok(records: Records) -> list[dict[str, Any]]:
    return [r for r in records if "error" not in r]


def _per_model(records: Records):
    """One row per record: its settings and the mean Spearman (all removed points) over its test points."""
    import pandas as pd

    rows = []
    for r in _ok(records):
        s = r["setting"]
        rho = [tp["all"]["spearman"] for tp in r["test_points"] if tp["all"]["spearman"] is not None]
        rows.append({"depth": s["depth"], "width": s["width"], "weight_decay": s["weight_decay"],
                     "seed": s["seed"], "model": s["model"], "params": s["params"],
                     "spearman": float(np.mean(rho)) if rho else np.nan,
                     "lambda_max": (r.get("spectrum") or {}).get("lambda_max", np.nan)})
    return pd.DataFrame(rows)


def _missing(finding: str, paper: str, chapter: str) -> Claim:
    return Claim(finding, paper, chapter, "no records", "no data")


def depth_effect(records: Records, findings: dict[str, str], chapter: str = "iris", label: str = "Iris MLP") -> Claim:
    """Slope of accuracy against depth, at the width with the most depths and the largest weight decay."""
    f = _per_model(records)
    if f.empty:
        return _missing("depth", findings["depth"], chapter)
    w0, wd = f.groupby("width").depth.nunique().idxmax(), f.weight_decay.max()
    part = f[(f.width == w0) & np.isclose(f.weight_decay, wd)]
    est, lo, hi = slope_ci(part.depth, part.spearman)
    ends = part.groupby("depth").spearman.mean()
    text = (f"{label} (width {w0}, wd {wd:g}): Spearman {ends.iloc[0]:.2f} at depth {ends.index[0]} → "
            f"{ends.iloc[-1]:.2f} at depth {ends.index[-1]}; slope per layer {fmt_ci(est, lo, hi, 3)}")
    return Claim("depth", findings["depth"], chapter, text, verdict(est, lo, hi, -1))


def iris_depth(records: Records, findings: dict[str, str]) -> Claim:
    """The depth effect on the Iris records."""
    return depth_effect(records, findings, "iris", "Iris MLP")


def iris_weight_decay(records: Records, findings: dict[str, str]) -> Claim:
    """Mean paired difference of accuracy, with minus without weight decay (same depth, width and seed)."""
    f = _per_model(records)
    wds = sorted(f.weight_decay.unique()) if not f.empty else []
    if len(wds) < 2:
        return _missing("weight decay", findings["weight_decay"], "iris")
    a = f.set_index(["depth", "width", "seed"])
    on = a[np.isclose(a.weight_decay, wds[-1])].spearman
    off = a[np.isclose(a.weight_decay, wds[0])].spearman
    diff = (on - off).dropna()
    est, lo, hi = mean_ci(diff) if len(diff) else (np.nan,) * 3
    text = (f"Iris MLPs: Spearman with wd {wds[-1]:g} minus without, paired over {len(diff)} models: "
            f"{fmt_ci(est, lo, hi, 3)}")
    return Claim("weight decay", findings["weight_decay"], "iris", text, verdict(est, lo, hi, +1))


def iris_width(records: Records, findings: dict[str, str]) -> Claim:
    """Slope of accuracy against width (depth fixed at its smallest value), per weight decay."""
    f = _per_model(records)
    if f.empty:
        return _missing("width", findings["width"], "iris")
    d0 = f.depth.min()
    parts, verdicts = [], []
    for wd in sorted(f.weight_decay.unique()):
        part = f[(f.depth == d0) & np.isclose(f.weight_decay, wd)]
        est, lo, hi = slope_ci(part.width, part.spearman)
        parts.append(f"wd {wd:g}: slope per unit width {fmt_ci(est, lo, hi, 4)}")
        verdicts.append(verdict(est, lo, hi, 0))
    v = "reproduced (width matters)" if "reproduced" in verdicts else verdicts[0]
    return Claim("width", findings["width"], "iris", f"Iris MLP (depth {d0}): " + "; ".join(parts), v)


def hessian_top_eigenvalue(records: Records, claim: str) -> Claim:
    """Slope of log10 of the top Hessian eigenvalue against depth, with weight decay."""
    f = _per_model(records)
    if f.empty:
        return _missing("Hessian", claim, "hessian")
    w0, wd = f.width.min(), f.weight_decay.max()
    part = f[(f.width == w0) & np.isclose(f.weight_decay, wd) & (f.lambda_max > 0)]
    est, lo, hi = slope_ci(part.depth, np.log10(part.lambda_max))
    text = f"Iris MLP (width {w0}, wd {wd:g}): slope of log10 λ_max per layer {fmt_ci(est, lo, hi, 3)}"
    return Claim("Hessian", claim, "hessian", text, verdict(est, lo, hi, +1))


def stochastic_estimation(records: Records, findings: dict[str, str], method: str = "lissa") -> Claim:
    """Paired difference of the LOO Spearman of ``method`` and of the exact scores, over every examined point."""
    diffs, errs = [], []
    for r in _ok(records):
        for tp in r["test_points"]:
            e = tp.get("estimators", {}).get(method)
            if e is None or e["vs_loo"]["spearman"] is None or tp["all"]["spearman"] is None:
                continue
            diffs.append(e["vs_loo"]["spearman"] - tp["all"]["spearman"])
            errs.append(e["relative_error"])
    if not diffs:
        return _missing("stochastic estimation", findings["stochastic"], "mnist")
    est, lo, hi = mean_ci(diffs)
    text = (f"small-MNIST MLPs, {method} vs exact on the same models ({len(diffs)} test points): median relative "
            f"error {np.median(errs):.2g}; change of Spearman with LOO {fmt_ci(est, lo, hi, 3)}")
    return Claim("stochastic estimation", findings["stochastic"], "mnist", text, verdict(est, lo, hi, -1))


def deeper_networks(records: Records, findings: dict[str, str]) -> Claim:
    """Mean Spearman (last-layer influence) per architecture; 'reproduced' when every interval lies below 0.5."""
    ok = [r for r in _ok(records) if r["setting"]["params"] == "last"]
    if not ok:
        return _missing("deeper CNNs", findings["depth"], "cnn")
    parts, highs = [], []
    for model in sorted({r["setting"]["model"] for r in ok}):
        rho = [tp["all"]["spearman"] for r in ok if r["setting"]["model"] == model
               for tp in r["test_points"] if tp["all"]["spearman"] is not None]
        est, lo, hi = mean_ci(rho) if rho else (np.nan,) * 3
        parts.append(f"{model} {fmt_ci(est, max(lo, -1.0), min(hi, 1.0))} ({len(rho)} test points)")
        highs.append(hi)
    data = sorted({r["dataset"]["name"] for r in ok})
    text = (f"{', '.join(data)}; Spearman, last-layer influence: " + "; ".join(parts)
            + " (criterion: every 95% interval below 0.5, a weak correlation)")
    if not highs or not all(np.isfinite(highs)):
        v = "no interval (too few test points)"
    else:
        v = "consistent (all below 0.5)" if max(highs) < 0.5 else "not resolved (some interval reaches 0.5)"
    return Claim("deeper CNNs", findings["depth"], "cnn", text, v)


def test_point_dependence(records: Records, findings: dict[str, str]) -> Claim:
    """Two-way ANOVA without replication (test point x seed) of the Spearman correlations of each model.

    ``F = MS_point / MS_residual`` with ``(a - 1, (a - 1)(b - 1))`` degrees of freedom for ``a`` test points
    and ``b`` seeds: is the test point a real source of variation beyond seed-to-seed noise? "reproduced"
    when every model's p-value is below 0.05.
    """
    import pandas as pd
    from scipy import stats

    rows = []
    for r in _ok(records):
        s = r["setting"]
        for tp in r["test_points"]:
            if tp["all"]["spearman"] is not None:
                rows.append({"depth": s["depth"], "seed": s["seed"], "point": tp["index"],
                             "rho": tp["all"]["spearman"]})
    f = pd.DataFrame(rows)
    if f.empty:
        return _missing("test points", findings["test_points"], "test_points")
    parts, pvals = [], []
    for depth, g in f.groupby("depth"):
        A = g.pivot_table(index="point", columns="seed", values="rho").dropna().to_numpy()
        a, b = A.shape
        span = g.groupby("seed").rho.agg(lambda v: v.max() - v.min()).mean()
        if a < 2 or b < 2:
            parts.append(f"depth {depth}: range {span:.2f} (one seed: no test)")
            continue
        grand = A.mean()
        ss_point = b * ((A.mean(1) - grand) ** 2).sum()
        ss_seed = a * ((A.mean(0) - grand) ** 2).sum()
        ss_res = ((A - grand) ** 2).sum() - ss_point - ss_seed
        F = (ss_point / (a - 1)) / max(ss_res / ((a - 1) * (b - 1)), 1e-300)
        p = float(stats.f.sf(F, a - 1, (a - 1) * (b - 1)))
        pvals.append(p)
        parts.append(f"depth {depth}: range across test points {span:.2f}, F = {F:.1f}, p = {p:.2g}")
    v = ("no test (one seed)" if not pvals else
         "reproduced" if max(pvals) < 0.05 else "not resolved (test-point effect not significant in every model)")
    return Claim("test points", findings["test_points"], "test_points",
                 "small-MNIST MLPs, test point x seed ANOVA of Spearman: " + "; ".join(parts), v)


def ground_truth_noise(records: Records, findings: dict[str, str]) -> Claim:
    """Signal-to-noise ratio of LOO retraining (mini-batch seeds) as the training set grows."""
    from .noise import noise_summary

    pts = []
    for r in _ok(records):
        for row in noise_summary(r):
            if row["noise_sd_seed"]:
                pts.append((r["dataset"]["n_train"], row["signal_sd_seed"] / row["noise_sd_seed"]))
    if len(pts) < 2:
        return _missing("scale", findings["imagenet"], "ground_truth")
    n, snr = np.array(pts).T
    est, lo, hi = slope_ci(np.log10(n), np.log10(snr))
    by_n = {int(k): float(np.median(snr[n == k])) for k in sorted(set(n))}
    text = ("LOO signal/noise (sd across removals / sd across SGD seeds), median per n: "
            + ", ".join(f"n={k}: {v:.2g}" for k, v in by_n.items())
            + f"; log-log slope {fmt_ci(est, lo, hi)} (offline data; not ImageNet)")
    return Claim("scale", findings["imagenet"], "ground_truth", text, verdict(est, lo, hi, -1))


def _spearman_or_nan(a: np.ndarray, b: np.ndarray) -> float:
    from .metrics import spearman

    try:
        return spearman(a, b)
    except ValueError:  # a constant vector (e.g. a collapsed model): undefined
        return float("nan")


def pbrf_question(records: Records, claim: str) -> Claim:
    """Bae et al.: is Gauss-Newton influence closer to the PBRF than to LOO retraining?

    Per model: the Spearman correlation of the Gauss-Newton influence scores with the PBRF changes and with the LOO
    changes over the removed points whose PBRF did not diverge, averaged over the examined test points; the claim
    is the mean paired difference (PBRF minus LOO) over models, with a 95% interval.
    """
    to_pbrf, to_loo = [], []
    for r in _ok(records):
        per_tp = []
        for tp in r["test_points"]:
            pb = np.array([np.nan if v is None else v for v in tp["pbrf"]["actual"]], dtype=float)
            fin = np.isfinite(pb)
            gn = np.asarray(tp["curvatures"]["gauss-newton"]["predicted"], dtype=float)[fin]
            loo = np.asarray(tp["actual"], dtype=float)[fin]
            per_tp.append((_spearman_or_nan(gn, pb[fin]), _spearman_or_nan(gn, loo)))
        a, b = np.array(per_tp).T
        if np.isfinite(a).any() and np.isfinite(b).any():
            to_pbrf.append(np.nanmean(a))
            to_loo.append(np.nanmean(b))
    if len(to_pbrf) < 2:
        return _missing("what influence estimates", claim, "pbrf")
    to_pbrf, to_loo = np.array(to_pbrf), np.array(to_loo)
    est, lo, hi = mean_ci(to_pbrf - to_loo)
    text = (f"Iris MLPs ({len(to_pbrf)} models): Spearman of Gauss-Newton influence with the PBRF "
            f"{np.mean(to_pbrf):.2f}, with LOO {np.mean(to_loo):.2f}; paired difference {fmt_ci(est, lo, hi, 3)}")
    return Claim("what influence estimates", claim, "pbrf", text, verdict(est, lo, hi, +1))


def lds_summary(records: Records, claim: str, alpha: float = 0.5) -> Claim:
    """Mean LDS per inverse-HVP method (subsets keeping ``alpha`` of the data), and LDS minus the paper's LOO
    Spearman for the exact scores of the same models. A measurement beside the paper: no direction is claimed."""
    per_method: dict[str, list[float]] = {}
    diff = []
    for r in _ok(records):
        for e in r["lds"]:
            if not np.isclose(e["alpha"], alpha):
                continue
            for m, v in e["methods"].items():
                if v.get("mean") is not None and np.isfinite(v["mean"]):
                    per_method.setdefault(m, []).append(v["mean"])
            loo = (r.get("loo") or {}).get("methods", {}).get("exact")
            ex = e["methods"].get("exact", {}).get("mean")
            if loo and ex is not None:
                rho = np.array([np.nan if x is None else x for x in loo["spearman"]], dtype=float)
                if np.isfinite(rho).any():
                    diff.append(ex - np.nanmean(rho))
    if not per_method:
        return _missing("group effects", claim, "lds")
    n_models = sum(any(np.isclose(e["alpha"], alpha) for e in r["lds"]) for r in _ok(records))
    text = (f"Iris and small-MNIST MLPs ({n_models} models), subsets keeping {alpha:g} of the data: mean LDS over "
            "the models on which a method ran: "
            + ", ".join(f"{m} {np.mean(v):.2f}" + (f" ({len(v)} models)" if len(v) < n_models else "")
                        for m, v in per_method.items()))
    v = "measured"
    if len(diff) >= 2:
        est, lo, hi = mean_ci(np.array(diff))
        text += f"; exact LDS minus the LOO Spearman of the same scores {fmt_ci(est, lo, hi)}"
    return Claim("group effects", claim, "lds", text, v)


def validation_procedure(records: Records, claim: str, k: int = 25) -> Claim:
    """Epifano et al.: does the depth verdict (Iris, the largest weight decay) depend on the validation procedure?

    Two procedures on the same records (:mod:`influence_lib.procedures`): this book's (Spearman over every removed
    point, mean over the examined test points) and the paper's (Spearman over the top ``k`` removed points by
    |predicted change|, highest-loss test point only). The verdict is the common one, or "depends on the
    procedure" when they differ.
    """
    from . import procedures

    ok = _ok(records)
    if not ok:
        return _missing("validation procedure", claim, "validation")
    wd = max(r["setting"]["weight_decay"] for r in ok)
    parts, verdicts = [], []
    for label, rule, kk, roles in [("every removed point, all test points", "all", None, None),
                                   (f"top {k} by absolute influence, highest-loss test point", "top_abs_influence", k,
                                    ["highest"])]:
        table = procedures.accuracy_table(ok, metric="spearman", rule=rule, k=kk)
        eff = procedures.effects(procedures.per_model(table, roles)).get(f"depth wd={wd:g}")
        if eff is None:
            return _missing("validation procedure", claim, "validation")
        parts.append(f"{label}: {fmt_ci(eff['estimate'], eff['lo'], eff['hi'], 3)} ({eff['verdict']})")
        verdicts.append(eff["verdict"])
    text = f"Iris MLPs, slope of Spearman per layer (weight decay {wd:g}) — " + "; ".join(parts)
    return Claim("validation procedure", claim, "validation", text,
                 verdicts[0] if verdicts[0] == verdicts[1] else "depends on the procedure")


def claim_table(iris: Records, mnist: Records, cnn: Records, test_points: Records, ground_truth: Records,
                findings: dict[str, str], hessian_claim: str) -> list[Claim]:
    """Every claim of the paper that the book measures, in the order of the chapters."""
    return [iris_depth(iris, findings), depth_effect(mnist, findings, "mnist", "small-MNIST MLP"),
            iris_weight_decay(iris, findings), iris_width(iris, findings),
            hessian_top_eigenvalue(iris, hessian_claim), stochastic_estimation(mnist, findings),
            deeper_networks(cnn, findings), test_point_dependence(test_points, findings),
            ground_truth_noise(ground_truth, findings)]
