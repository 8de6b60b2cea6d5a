"""Helpers for the book's pages: reference values, seed-aggregated tables, provenance sentences."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..metrics import mean_ci
from .store import reference_file


def reference_values() -> dict[str, Any]:
    """The paper's (and its replication's) reference numbers: ``book/reference_values.json`` of the checkout."""
    return json.loads(reference_file().read_text())


def aggregate(frame, by: Sequence[str], metrics: Sequence[str], level: float = 0.95):
    """Mean, Student-t interval and count over the rows of each group (e.g. over seeds).

    Returns a frame with columns ``by + [f"{m}_mean", f"{m}_lo", f"{m}_hi", f"{m}_n"]``; rows whose metric
    is missing (undefined correlation) are left out of that metric's count, never silently averaged.
    """
    import pandas as pd

    rows = []
    for key, g in frame.groupby(list(by), sort=True, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        for m in metrics:
            v = g[m].dropna().to_numpy(dtype=float)
            if v.size == 0:
                row.update({f"{m}_mean": np.nan, f"{m}_lo": np.nan, f"{m}_hi": np.nan, f"{m}_n": 0})
                continue
            mean, lo, hi = mean_ci(v, level)
            row.update({f"{m}_mean": mean, f"{m}_lo": lo, f"{m}_hi": hi, f"{m}_n": int(v.size)})
        rows.append(row)
    return pd.DataFrame(rows)


def provenance(records: Sequence[dict[str, Any]]) -> str:
    """One sentence naming the data that produced the records (and any substitution)."""
    ok = [r for r in records if "error" not in r]
    if not ok:
        return "No successful records."
    names = sorted({(r["dataset"]["requested"], r["dataset"]["name"], r["dataset"]["source"]) for r in ok})
    parts = []
    for requested, used, source in names:
        if requested != used:
            parts.append(f"**{requested} was not available: these numbers come from {used}** ({source})")
        else:
            parts.append(f"{used}: {source}")
    versions = ok[0]["versions"]
    return ("Data: " + "; ".join(parts) + f". Computed with influence_lib {versions['influence_lib']}, "
            f"torch {versions['torch']}, on {versions['machine']}.")


def runtime_summary(records: Sequence[dict[str, Any]]) -> str:
    """Total and per-record compute time of the records, as a sentence."""
    ok = [r for r in records if "error" not in r]
    if not ok:
        return ""
    t = np.array([r["timings"]["total"] for r in ok])
    return (f"{len(ok)} records, {t.sum() / 60:.1f} CPU-minutes in total "
            f"(median {np.median(t):.1f} s per record, single-threaded).")


def settings_dropdown(fixed: dict[str, Any], title: str = "Every fixed setting") -> str:
    """The settings shared by every record, as a folded Markdown table (a MyST dropdown), one row per key."""
    rows = "\n".join(f"| `{k}` | `{v!s}` |" for k, v in fixed.items())
    return f"```{{dropdown}} {title}\n| setting | value |\n| --- | --- |\n{rows}\n```"


#: how the recorded stages of a record are grouped in a compute profile (a stage not listed counts as "other")
STAGE_GROUPS = {"train": "theta* training", "polish": "theta* training", "loo": "LOO retraining",
                "loo_newton": "LOO retraining", "loo_replicates": "LOO replicates (noise ceiling)", "pbrf": "PBRF"}


def stage_group(stage: str) -> str:
    """The profile group of a recorded timing key: training, LOO, influence, subset retraining, PBRF or other."""
    if stage in STAGE_GROUPS:
        return STAGE_GROUPS[stage]
    if stage.startswith("influence"):
        return "influence (all methods)"
    if stage.startswith("retrain_alpha"):
        return "subset retraining (LDS)"
    return "other"


def stage_profile(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Where the recorded time of ``records`` goes: ``{"records", "seconds", "groups": {group: seconds}}``, the
    groups of :func:`stage_group` (their sum is the records' total; the unattributed rest counts as "other")."""
    ok = [r for r in records if "error" not in r]
    groups: dict[str, float] = {}
    total = 0.0
    for r in ok:
        t = r["timings"]
        total += t["total"]
        parts = {k: v for k, v in t.items() if k != "total" and isinstance(v, (int, float))}
        for k, v in parts.items():
            groups[stage_group(k)] = groups.get(stage_group(k), 0.0) + v
        groups["other"] = groups.get("other", 0.0) + max(0.0, t["total"] - sum(parts.values()))
    return {"records": len(ok), "seconds": total, "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]))}


def fmt_ci(mean: float, lo: float, hi: float, digits: int = 2,
           bounds: tuple[float, float] = (-np.inf, np.inf)) -> str:
    """``"m [lo, hi]"``; ``"m (no interval)"`` where the interval is undefined; ``"n/a"`` without a value. ``bounds``:
    the range of the statistic (``(-1, 1)`` for a correlation, ``(0, 1)`` for ``|rho|``), to which a t interval is
    clipped so that no interval is shown outside it."""
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(lo):
        return f"{mean:.{digits}f} (no interval)"
    lo, hi = float(np.clip(lo, *bounds)), float(np.clip(hi, *bounds))
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def slope_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Least-squares slope of ``y`` on ``x`` with a Student-t interval: ``(slope, lo, hi)``.

    Rows where ``y`` is not finite (an undefined correlation) are left out; NaN where there are fewer than two
    distinct ``x`` values, and an undefined interval with fewer than three points.
    """
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < 2:
        return np.nan, np.nan, np.nan
    res = stats.linregress(x, y)
    if len(x) < 3:
        return float(res.slope), np.nan, np.nan
    half = stats.t.ppf((1 + level) / 2, len(x) - 2) * res.stderr
    return float(res.slope), float(res.slope - half), float(res.slope + half)


def verdict(est: float, lo: float, hi: float, expected_sign: int) -> str:
    """Verdict on an effect with interval ``[lo, hi]`` against the paper's direction ``expected_sign``.

    ``"reproduced"``: the interval excludes 0 on the paper's side (``expected_sign = 0``: any side);
    ``"opposite"``: it excludes 0 on the other side; otherwise the effect is not resolved.
    """
    if not np.isfinite(est):
        return "no data"
    if not np.isfinite(lo):
        return "no interval (one seed or too few records)"
    if lo > 0 or hi < 0:
        return "reproduced" if expected_sign == 0 or np.sign(est) == expected_sign else "opposite"
    return "not resolved (interval contains 0)"


def line_ci(ax, agg, x: str, m: str, style: str = "o-", label_suffix: str = "") -> None:
    """Plot the mean over seeds with a 95% interval bar, one line per weight decay (an :func:`aggregate` frame)."""
    for i, (wd, g) in enumerate(agg.groupby("weight_decay")):
        g = g.sort_values(x)
        mean = g[f"{m}_mean"].to_numpy()
        err = np.vstack([mean - g[f"{m}_lo"].to_numpy(), g[f"{m}_hi"].to_numpy() - mean])
        ax.errorbar(g[x], mean, yerr=err, fmt=style, color=f"C{i}", capsize=3, label=f"wd {wd:g}{label_suffix}")


def diagonal_symlog(ax, x: np.ndarray, y: np.ndarray, linthresh_frac: float = 1e-4) -> None:
    """Square symmetric-log axes for predicted (``x``) against actual (``y``) changes, with the diagonal.

    Both axes span ``+-1.3 max|x, y|``, are linear within ``linthresh_frac`` of that range and carry ticks at
    0, +-10^e and +-10^(e-2) (``10^e`` the largest power of ten inside the range).
    """
    lim = float(np.abs(np.concatenate([np.ravel(x), np.ravel(y)])).max()) * 1.3
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    e = int(np.floor(np.log10(lim)))
    ticks = [sign * 10.0 ** (e - j) for sign in (-1, 1) for j in (0, 2)] + [0]
    labels = [f"{t:.0e}" if t else "0" for t in ticks]
    ax.set_xscale("symlog", linthresh=lim * linthresh_frac)
    ax.set_yscale("symlog", linthresh=lim * linthresh_frac)
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim))


def two_ground_truths(records: Sequence[dict[str, Any]], by: str = "depth"):
    """The warm-start and the Newton-converged leave-one-out ground truths of records with ``loo_newton`` set.

    Per healthy model (test points averaged first: the model is the unit), grouped by the setting ``by``: the
    Spearman correlation of the influence estimates with each ground truth, of the two ground truths with each
    other, and the optimiser error of the warm-start one, ``median |Adam - Newton| / median |Newton|`` over the
    removed points whose Newton retraining converged; each as a mean with its 95% interval over seeds.
    Returns ``(table, sentence)``: the table (None without healthy models) and a sentence on the models, their
    exclusions, the Newton convergence and the stationarity of theta*.
    """
    import pandas as pd

    from .stats import exclusion_summary, split_healthy
    from .store import split_failed

    ok, failed = split_failed(records)
    healthy, excluded = split_healthy(ok)
    rows = []
    for r in healthy:
        for tp in r["test_points"]:
            warm = np.asarray(tp["actual"], dtype=float)
            newton = np.asarray([np.nan if v is None else v for v in tp["newton"]["actual"]], dtype=float)
            fin = np.isfinite(newton)
            err = (float(np.median(np.abs(warm[fin] - newton[fin])) / max(np.median(np.abs(newton[fin])), 1e-300))
                   if fin.any() else np.nan)
            rows.append({by: r["setting"][by], "seed": r["setting"]["seed"],
                         "influence vs warm start": tp["all"]["spearman"],
                         "influence vs Newton": tp["newton"]["all"]["spearman"],
                         "warm start vs Newton": tp["newton"]["vs_warm_start"]["spearman"],
                         "optimiser error": err})
    if not rows:
        return None, "No healthy model in the Newton comparison: " + "; ".join(r["error"] for r in failed)
    two = pd.DataFrame(rows)
    cols = [c for c in two if c not in (by, "seed")]
    per_model = two.groupby([by, "seed"], as_index=False)[cols].mean()
    agg = aggregate(per_model, [by], cols)
    table = pd.DataFrame({by: agg[by], "models": agg[f"{cols[0]}_n"]})
    for c in cols:  # intervals clipped to the statistic's range: [-1, 1] for correlations, [0, inf) for the error
        bounds = (0.0, np.inf) if c == "optimiser error" else (-1.0, 1.0)
        table[c] = [fmt_ci(m, lo, hi, 3, bounds=bounds)
                    for m, lo, hi in zip(agg[f"{c}_mean"], agg[f"{c}_lo"], agg[f"{c}_hi"], strict=True)]
    conv = [(r["loo_newton"]["n_converged"], len(r["loo_newton"]["converged"])) for r in ok]
    gmax = max(r["training"]["grad_norm"] for r in ok)
    reached, total = sum(c for c, _ in conv), sum(t for _, t in conv)
    sentence = (f"{len(ok)} models ({exclusion_summary(excluded, len(ok))}); Newton reached the tolerance for "
                f"{reached} of {total} leave-one-out models"
                + (" (the others are left out of the Newton columns)" if reached < total else "")
                + f"; every polished $\\theta^*$ has gradient norm at most {gmax:.1e}.")
    if failed:
        sentence += f" {len(failed)} record(s) failed: " + "; ".join(r["error"][:200] for r in failed)
    return table.set_index(by), sentence
