"""The paper's claims against our records: one row per claim, with the measurement, the verdict and its basis.

Every function takes the records of one sweep (as written by :mod:`influence_lib.experiments.executor`) and returns
a :class:`Claim`; :func:`claim_table` collects the paper's claims for the book's introduction and applies the Holm
correction across them. The rules (direction, statistic, equivalence margin, seeds) are those of
:mod:`.rules`; the statistics those of :mod:`.stats`:

* the trained model is the unit: each model contributes one value (its test points summarised by a Fisher-z mean),
  and effects are means or least-squares slopes over the model-level values, with Student-t intervals;
* verdicts use the healthy models only (:func:`.stats.split_healthy`); each claim also carries the same statistic on
  all models (``sensitivity``) and the number of excluded models with the reasons (``excluded``);
* verdicts: "reproduced" / "opposite" (shown to differ from 0, in / against the paper's direction), "absent"
  (shown inside the margin), "not resolved", or "no data"; ``provisional`` when the sweep has fewer seeds than the
  rules require.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import rules as R
from . import stats
from .report import fmt_ci

Records = Sequence[dict[str, Any]]
NAN = float("nan")


@dataclass(frozen=True)
class Claim:
    """One line of the claim table: what the paper says, what we measured, the verdict and its basis.

    ``estimate``, ``lo``, ``hi``: the effect on the healthy models with its 95% interval, in ``unit``; ``margin``:
    the equivalence margin; ``direction``: the paper's sign (+1, -1, 0 for any); ``p_zero`` / ``p_equivalence``: the
    unadjusted p-values, ``p_holm``: the Holm-adjusted p-value of the test that decided (within the intro's table);
    ``n_models`` healthy models of ``n_total``; ``excluded``: how many were left out and why; ``sensitivity``: the
    statistic on all models, with its (unadjusted) verdict ``sensitivity_verdict``.
    """

    finding: str
    paper: str
    chapter: str
    measured: str
    verdict: str
    key: str = ""
    estimate: float = NAN
    lo: float = NAN
    hi: float = NAN
    margin: float = NAN
    direction: int = 0
    unit: str = ""
    statistic: str = ""
    p_zero: float = NAN
    p_equivalence: float = NAN
    p_holm: float = NAN
    n_models: int = 0
    n_total: int = 0
    n_excluded: int = 0
    excluded: str = ""
    sensitivity: str = ""
    sensitivity_verdict: str = ""
    seeds: int = 0
    seeds_required: int = 0
    effect: stats.Effect = dataclasses.field(default=stats.NO_EFFECT, repr=False, compare=False)

    @property
    def provisional(self) -> bool:
        """Fewer seeds than the rules require: the verdict is not the pre-registered one yet."""
        return bool(self.seeds_required) and self.seeds < self.seeds_required

    @property
    def note(self) -> str:
        """The basis of the verdict in words: adjusted p-value and whether the verdict is provisional."""
        parts = []
        if np.isfinite(self.p_holm):
            parts.append(f"Holm p = {self.p_holm:.2g}")
        elif np.isfinite(self.p_zero):
            parts.append(f"p = {self.p_zero:.2g}")
        if self.provisional:
            parts.append(f"provisional: {self.seeds} of {self.seeds_required} seeds")
        return "; ".join(parts)


def _ok(records: Records) -> list[dict[str, Any]]:
    return [r for r in records if "error" not in r]


def _missing(finding: str, paper: str, chapter: str, why: str = "no records", **fields: Any) -> Claim:
    return Claim(finding, paper, chapter, why, "no data", **fields)


# --- model-level values ----------------------------------------------------------------------------------------
def _agreement(tp: dict[str, Any], setting: dict[str, Any], procedure: dict[str, Any]) -> float:
    """One test point's agreement under ``procedure`` (recomputed from the stored vectors; NaN where undefined)."""
    from . import procedures

    metric, rule, k = procedure.get("metric", "spearman"), procedure.get("rule", "all"), procedure.get("k")
    if k == "setting":
        k = setting.get("k")
    if tp.get("predicted") is None or tp.get("actual") is None:  # older or synthetic records: the stored summary
        block = tp.get("all") if rule == "all" else tp.get(f"top{k}_influence")
        v = (block or {}).get(metric)
        return NAN if v is None else float(v)
    try:
        p = np.asarray(tp["predicted"], dtype=float)
        a = np.asarray(tp["actual"], dtype=float)
        idx = procedures.select(p, rule, None if rule == "all" else min(int(k), p.size))
        return procedures.agreement(p[idx], a[idx], metric) if idx.size >= 2 else NAN
    except ValueError:  # non-finite or too short: undefined
        return NAN


def model_value(record: dict[str, Any], procedure: dict[str, Any]) -> tuple[float, int]:
    """The model's accuracy under ``procedure``: the Fisher-z mean over its chosen test points (``procedure["roles"]``,
    ``None``: all) of the agreement of predicted and actual changes; ``(value, number of defined test points)``."""
    roles = procedure.get("roles")
    vals = [_agreement(tp, record["setting"], procedure) for tp in record.get("test_points", [])
            if roles is None or tp.get("role") in roles]
    return stats.mean_correlation(vals)


def _frame(records: Records, procedure: dict[str, Any] | None = None):
    """One row per successful record: settings, health, the model-level value and lambda_max."""
    import pandas as pd

    rows = []
    for r in _ok(records):
        s = r["setting"]
        h = stats.health_of(r)
        value = model_value(r, procedure)[0] if procedure else NAN
        rows.append({"depth": s.get("depth"), "width": s.get("width"), "weight_decay": s.get("weight_decay"),
                     "seed": s.get("seed"), "model": s.get("model"), "params": s.get("params"),
                     "healthy": h["healthy"], "value": value,
                     "lambda_max": float((r.get("spectrum") or {}).get("lambda_max") or NAN)})
    return pd.DataFrame(rows, columns=["depth", "width", "weight_decay", "seed", "model", "params", "healthy", "value",
                                       "lambda_max"])


def _seeds(records: Records) -> int:
    """Seeds per setting of the sweep: the smallest number of distinct seeds of any setting (seed left out)."""
    import json

    per: dict[str, set] = {}
    for r in _ok(records):
        rest = {k: v for k, v in r["setting"].items() if k != "seed"}
        per.setdefault(json.dumps(rest, sort_keys=True, default=str), set()).add(r["setting"].get("seed"))
    return min((len(v) for v in per.values()), default=0)


def _fmt(e: stats.Effect, digits: int) -> str:
    return fmt_ci(e.estimate, e.lo, e.hi, digits)


def _judge(rule: R.Rule, finding: str, paper: str, chapter: str, records: Records,
           compute: Callable[[Any], tuple], procedure: dict[str, Any] | None = None, digits: int = 3,
           seeds: int | None = None) -> Claim:
    """The claim of ``rule``: ``compute(frame) -> (effect, description[, what is counted])`` on the healthy models
    (the verdict) and on all models (the sensitivity value). ``seeds``: the seeds per setting the sweep ran (default:
    those of ``records``), where ``records`` leaves out models on which the judged estimator failed."""
    ok = _ok(records)
    if not ok:
        return _missing(finding, paper, chapter, key=rule.key, margin=rule.margin, direction=rule.direction,
                        unit=rule.unit, statistic=rule.effect, seeds_required=rule.seeds)
    f = _frame(ok, procedure)
    _, excluded = stats.split_healthy(ok)
    eff, text, *what = compute(f[f.healthy.astype(bool)])
    eff_all, text_all, *_ = compute(f)
    units = what[0] if what else "models"
    v_all = stats.decide(eff_all, rule.direction, rule.margin)
    v = stats.decide(eff, rule.direction, rule.margin)
    n_healthy = int(f.healthy.astype(bool).sum())
    if n_healthy:
        measured = f"{text}; {rule.effect}: {_fmt(eff, digits)} ({eff.n} healthy {units})"
    else:
        measured = f"{text_all}; no healthy model: no verdict"
    return Claim(finding, paper, chapter, measured, v, key=rule.key, estimate=eff.estimate, lo=eff.lo, hi=eff.hi,
                 margin=rule.margin, direction=rule.direction, unit=rule.unit, statistic=rule.effect,
                 p_zero=eff.p_zero, p_equivalence=eff.p_equivalence(rule.margin), n_models=n_healthy,
                 n_total=len(f), n_excluded=len(excluded), excluded=stats.exclusion_summary(excluded, len(f)),
                 sensitivity=f"all {len(f)} models: {_fmt(eff_all, digits)} ({eff_all.n} {units} defined; {v_all})",
                 sensitivity_verdict=v_all, seeds=_seeds(ok) if seeds is None else seeds, seeds_required=rule.seeds,
                 effect=eff)


def _procedure_label(p: dict[str, Any], records: Records = ()) -> str:
    if p["rule"] == "all":
        pts = "every removed point"
    else:
        k = p["k"]
        if k == "setting":
            ks = sorted({r["setting"].get("k") for r in _ok(records)} - {None})
            k = "/".join(str(x) for x in ks) if ks else "k"
        pts = f"the top {k} removed points by absolute predicted change"
    who = "highest-loss test point" if p.get("roles") == ["highest"] else "Fisher-z mean over the examined test points"
    return f"Spearman over {pts}, {who}"


def _ends(part, x: str = "depth") -> str:
    """Fisher-z mean of the model values at the smallest and largest ``x``: ``"0.95 at depth 1 → 0.40 at depth 6"``."""
    g = part.dropna(subset=["value"]).groupby(x).value
    if g.ngroups < 1:
        return "no defined values"
    means = g.agg(lambda v: stats.mean_correlation(v)[0])
    return f"{means.iloc[0]:.2f} at {x} {means.index[0]} → {means.iloc[-1]:.2f} at {x} {means.index[-1]}"


# --- the paper's claims ------------------------------------------------------------------------------------------
def depth_effect(records: Records, findings: dict[str, str], chapter: str = "iris", label: str = "Iris MLP",
                 rule: str = "iris depth") -> Claim:
    """Slope of the model-level accuracy on depth (healthy models), at the width with the most depths and the largest
    weight decay; the accuracy is the rule's procedure (the paper's top-k for the headline)."""
    rl = R.RULES[rule]
    ok = _ok(records)
    if not ok:
        return _missing("depth", findings["depth"], chapter, key=rule, margin=rl.margin, direction=rl.direction,
                        unit=rl.unit, seeds_required=rl.seeds)
    f0 = _frame(ok)
    w0, wd = f0.groupby("width").depth.nunique().idxmax(), f0.weight_decay.max()

    def compute(f):
        part = f[(f.width == w0) & np.isclose(f.weight_decay, wd)]
        e = stats.slope_effect(part.depth, part.value)
        return e, f"{label} (width {w0}, wd {wd:g}), {_procedure_label(rl.procedure, ok)}: {_ends(part)}"

    finding = "depth" if rule == "iris depth" or chapter != "iris" else "depth (all points)"
    return _judge(rl, finding, findings["depth"], chapter, ok, compute, rl.procedure)


def iris_depth(records: Records, findings: dict[str, str]) -> Claim:
    """The depth effect on the Iris records under the paper's procedure (top 25 by |predicted|, highest-loss point)."""
    return depth_effect(records, findings, "iris", "Iris MLP", "iris depth")


def iris_depth_all_points(records: Records, findings: dict[str, str]) -> Claim:
    """The depth effect on the Iris records with this book's all-points Spearman (the second row)."""
    return depth_effect(records, findings, "iris", "Iris MLP", "iris depth (all points)")


def mnist_depth(records: Records, findings: dict[str, str]) -> Claim:
    """The depth effect on the small-MNIST MLPs (top-k of the setting, every examined test point)."""
    return depth_effect(records, findings, "mnist", "small-MNIST MLP", "mnist depth")


def iris_weight_decay(records: Records, findings: dict[str, str]) -> Claim:
    """Mean over (depth, width, seed) pairs of models, both healthy, of accuracy with minus without weight decay."""
    rl = R.RULES["iris weight decay"]
    ok = _ok(records)
    wds = sorted({r["setting"]["weight_decay"] for r in ok})
    if len(wds) < 2:
        return _missing("weight decay", findings["weight_decay"], "iris", key=rl.key, margin=rl.margin,
                        direction=rl.direction, seeds_required=rl.seeds)

    def compute(f):
        a = f.set_index(["depth", "width", "seed"])
        on = a[np.isclose(a.weight_decay, wds[-1])].value
        off = a[np.isclose(a.weight_decay, wds[0])].value
        diff = (on - off).dropna()
        return (stats.mean_effect(diff.to_numpy()),
                f"Iris MLPs, {_procedure_label(rl.procedure)}, wd {wds[-1]:g} minus wd {wds[0]:g} paired over "
                f"{len(diff)} (depth, width, seed) pairs", "pairs")

    return _judge(rl, "weight decay", findings["weight_decay"], "iris", ok, compute, rl.procedure)


def iris_width(records: Records, findings: dict[str, str]) -> Claim:
    """Common slope of accuracy on log2(width) at the smallest depth, weight-decay arm as a fixed effect."""
    rl = R.RULES["iris width"]
    ok = _ok(records)
    if not ok:
        return _missing("width", findings["width"], "iris", key=rl.key, margin=rl.margin, seeds_required=rl.seeds)
    d0 = min(r["setting"]["depth"] for r in ok)

    def compute(f):
        part = f[f.depth == d0]
        e = stats.slope_effect(np.log2(part.width.astype(float)), part.value, groups=part.weight_decay)
        return e, (f"Iris MLPs (depth {d0}, widths {', '.join(str(w) for w in sorted(part.width.unique()))}; "
                   f"both weight decays, arm as a fixed effect), {_procedure_label(rl.procedure)}")

    return _judge(rl, "width", findings["width"], "iris", ok, compute, rl.procedure)


def hessian_top_eigenvalue(records: Records, claim: str) -> Claim:
    """Slope of log10 of the top Hessian eigenvalue on depth (smallest width, largest weight decay)."""
    rl = R.RULES["hessian"]
    ok = _ok(records)
    if not ok:
        return _missing("Hessian", claim, "hessian", key=rl.key, margin=rl.margin, direction=rl.direction,
                        seeds_required=rl.seeds)
    f0 = _frame(ok)
    w0, wd = f0.width.min(), f0.weight_decay.max()

    def compute(f):
        part = f[(f.width == w0) & np.isclose(f.weight_decay, wd) & (f.lambda_max > 0)]
        return (stats.slope_effect(part.depth, np.log10(part.lambda_max.astype(float))),
                f"Iris MLP (width {w0}, wd {wd:g}, depths {', '.join(str(d) for d in sorted(part.depth.unique()))})")

    return _judge(rl, "Hessian", claim, "hessian", ok, compute)


def _paired_spearman(record: dict[str, Any], methods: Sequence[str]) -> tuple[list[float], float]:
    """A model's Fisher-z mean Spearman with LOO of the exact scores and of each of ``methods``, over the test points
    where every one of them is defined (paired), and the median relative error of ``methods[0]`` against the exact
    scores: ``([exact, *methods], rel_err)``; NaN where no test point has them all."""
    vals: list[list[float]] = [[] for _ in range(len(methods) + 1)]
    errs = []
    for tp in record["test_points"]:
        ests = [(tp.get("estimators") or {}).get(m) for m in methods]
        row = [tp["all"]["spearman"]] + [None if e is None else e.get("vs_loo", {}).get("spearman") for e in ests]
        if any(v is None for v in row):
            continue
        for col, v in zip(vals, row, strict=True):
            col.append(v)
        errs.append(ests[0].get("relative_error", NAN))
    if not vals[0]:
        return [NAN] * (len(methods) + 1), NAN
    return [stats.mean_correlation(v)[0] for v in vals], float(np.nanmedian(errs))


def _lissa_differences(records: Records, method: str):
    """Per model: Fisher-z mean Spearman with LOO of ``method`` minus that of the exact scores (paired test points,
    :func:`_paired_spearman`)."""
    import pandas as pd

    rows = []
    for r in _ok(records):
        (exact, est), err = _paired_spearman(r, [method])
        s = r["setting"]
        rows.append({"depth": s.get("depth"), "width": s.get("width"), "weight_decay": s.get("weight_decay"),
                     "seed": s.get("seed"), "diff": est - exact, "rel_err": err,
                     "healthy": stats.health_of(r)["healthy"]})
    return pd.DataFrame(rows, columns=["depth", "width", "weight_decay", "seed", "diff", "rel_err", "healthy"])


def lissa_decomposition(records: Records, method: str = "lissa", truncated: str = "lissa-truncated"):
    """Per model, LiSSA's change of the Spearman correlation with LOO split into its two sources: ``truncation``
    (full-batch LiSSA at the same scale and depth, in closed form, minus exact), ``sampling`` (mini-batch minus
    full-batch) and their sum ``total`` (mini-batch minus exact), each a difference of Fisher-z mean Spearmans over
    the model's test points where all three are defined (paired, like the "lissa" claim); with the relative errors of
    both against the exact scores and the truncation factor ``(1 - mu_min / scale)^(depth + 1)``. Models without
    both estimators are left out."""
    import pandas as pd

    rows = []
    for r in _ok(records):
        if truncated not in r.get("methods", {}) or "error" in r["methods"].get(truncated, {}) \
                or "error" in r["methods"].get(method, {"error": "missing"}):
            continue
        # the same (paired) test points for all three, as in the "lissa" claim (_lissa_differences)
        (exact, mini, full), err_mini = _paired_spearman(r, [method, truncated])
        _, err_full = _paired_spearman(r, [truncated, method])
        s, info = r["setting"], r["methods"][truncated]
        rows.append({"depth": s.get("depth"), "width": s.get("width"), "weight_decay": s.get("weight_decay"),
                     "seed": s.get("seed"), "healthy": stats.health_of(r)["healthy"],
                     "exact": exact, "full_batch": full, "mini_batch": mini,
                     "truncation": full - exact, "sampling": mini - full, "total": mini - exact,
                     "rel_err_full_batch": err_full, "rel_err_mini_batch": err_mini,
                     "truncation_factor": info.get("truncation_factor", NAN),
                     "n_divergent": info.get("n_divergent", 0)})
    cols = ["depth", "width", "weight_decay", "seed", "healthy", "exact", "full_batch", "mini_batch", "truncation",
            "sampling", "total", "rel_err_full_batch", "rel_err_mini_batch", "truncation_factor", "n_divergent"]
    return pd.DataFrame(rows, columns=cols)


def _lissa_claim(records: Records, findings: dict[str, str], method: str, key: str) -> Claim:
    """The LiSSA claims. A model on which ``method`` failed (LiSSA diverges where ``A + damping I`` is indefinite or
    the scale too small) has no paired difference and is left out of the effect, but it was run: the seeds are those
    of every model the sweep trained, and the failures are counted in the description (rules.py: an estimator's
    refusal is a result about the estimator, not a missing seed)."""
    rl = R.RULES[key]
    def ran(r):
        return any((tp.get("estimators") or {}).get(method) for tp in r["test_points"])

    tried = [r for r in _ok(records) if method in r["setting"].get("methods", []) or ran(r)]
    ok = [r for r in tried if ran(r)]
    n_failed = len(tried) - len(ok)
    finding = "stochastic estimation" if key == "lissa" else "stochastic estimation × depth"
    if not ok:
        return _missing(finding, findings["stochastic"], "mnist", key=key, margin=rl.margin, direction=rl.direction,
                        seeds_required=rl.seeds)
    d = _lissa_differences(ok, method)
    w0 = d.groupby("width").depth.nunique().idxmax()
    failed = (f"; {method} failed (diverged) on {n_failed} of {len(tried)} models, which have no paired difference"
              if n_failed else "")

    def compute(f):
        part = d.loc[f.index]  # the frame rows are in the order of ``ok``, as are those of ``d``
        if key == "lissa":
            return (stats.mean_effect(part["diff"].to_numpy()),
                    f"small-MNIST MLPs, {method} vs exact on the same models (model = unit; median relative error "
                    f"{np.nanmedian(part.rel_err):.2g}){failed}")
        part = part[part.width == w0]
        return (stats.slope_effect(part.depth, part["diff"], groups=part.weight_decay),
                f"small-MNIST MLPs (width {w0}, depths {', '.join(str(x) for x in sorted(part.depth.unique()))}; "
                "weight-decay arm as a fixed effect), per-model Spearman with LOO, {method} minus exact".replace(
                    "{method}", method) + failed)

    return _judge(rl, finding, findings["stochastic"], "mnist", ok, compute, seeds=_seeds(tried))


def stochastic_estimation(records: Records, findings: dict[str, str], method: str = "lissa") -> Claim:
    """Mean over models of the change of the Spearman correlation with LOO when ``method`` replaces the exact
    solve (each model: Fisher-z means over its test points)."""
    return _lissa_claim(records, findings, method, "lissa")


def stochastic_depth(records: Records, findings: dict[str, str], method: str = "lissa") -> Claim:
    """"More so in deep networks": slope on depth of the per-model change of Spearman (``method`` minus exact)."""
    return _lissa_claim(records, findings, method, "lissa x depth")


def deeper_networks(records: Records, findings: dict[str, str]) -> Claim:
    """Deeper CNNs are worse: common slope of the model's accuracy (last-layer influence, top-k) on depth, with each
    (architecture family, weight decay) as a fixed effect; per-family Fisher-z means with intervals as the
    description."""
    rl = R.RULES["cnn depth"]
    ok = [r for r in _ok(records) if r["setting"].get("params") == "last"]
    if not ok:
        return _missing("deeper CNNs", findings["depth"], "cnn", key=rl.key, margin=rl.margin, direction=rl.direction,
                        seeds_required=rl.seeds)
    data = ", ".join(sorted({r["dataset"]["name"] for r in ok}))

    def compute(f):
        parts = []
        for (model, wd, depth), g in f.groupby(["model", "weight_decay", "depth"]):
            m, lo, hi, n = stats.mean_correlation_ci(g.value)
            parts.append(f"{model} (wd {wd:g}) depth {depth} {fmt_ci(m, lo, hi)} ({n} models)")
        e = stats.slope_effect(f.depth, f.value, groups=f.model.astype(str) + " wd " + f.weight_decay.astype(str))
        why = "" if e.defined else " (one depth per family: the depth effect is not testable)"
        return e, f"{data}, last-layer influence, {_procedure_label(rl.procedure, ok)}: " + "; ".join(parts) + why

    return _judge(rl, "deeper CNNs", findings["depth"], "cnn", ok, compute, rl.procedure)


def _tau2(record: dict[str, Any]) -> float:
    """Between-test-point variance of Fisher-z Spearman (all removed points) beyond its sampling variance."""
    z, v = [], []
    for tp in record["test_points"]:
        r = _agreement(tp, record["setting"], R.ALL_POINTS)
        n = len(tp["predicted"]) if tp.get("predicted") is not None else len(record.get("removed", []))
        if np.isfinite(r) and n > 3:
            z.append(float(stats.fisher_z(r)))
            v.append(1.06 / (n - 3))
    if len(z) < 3:
        return NAN
    return float(np.var(z, ddof=1) - np.mean(v))


def test_point_dependence(records: Records, findings: dict[str, str]) -> Claim:
    """Does accuracy vary with the examined test point? Per model, the excess between-test-point variance tau^2 of the
    Fisher-z Spearman correlations (DerSimonian-Laird: observed variance minus the sampling variance 1.06/(n-3));
    its mean over models, against the margin of :data:`rules.RULES` ``["test points"]``."""
    rl = R.RULES["test points"]
    ok = _ok(records)
    if not ok:
        return _missing("test points", findings["test_points"], "test_points", key=rl.key, margin=rl.margin,
                        direction=rl.direction, seeds_required=rl.seeds)
    tau2 = np.array([_tau2(r) for r in ok])
    spans = []
    for r in ok:
        vals = [_agreement(tp, r["setting"], R.ALL_POINTS) for tp in r["test_points"]]
        vals = [x for x in vals if np.isfinite(x)]
        spans.append(max(vals) - min(vals) if vals else NAN)
    spans = np.array(spans)

    def compute(f):
        idx = f.index.to_numpy()
        return (stats.mean_effect(tau2[idx]),
                f"small-MNIST MLPs, {_procedure_label(R.ALL_POINTS)}: range across test points within a model "
                f"(median over models) {np.nanmedian(spans[idx]) if idx.size else NAN:.2f}")

    return _judge(rl, "test points", findings["test_points"], "test_points", ok, compute, digits=3)


def ground_truth_noise(records: Records, findings: dict[str, str]) -> Claim:
    """Signal-to-noise ratio of LOO retraining (mini-batch seeds) as the training set grows: per model (theta*) the
    mean log10 signal/noise over its test points, then the slope on log10 n over models."""
    from .noise import noise_summary

    rl = R.RULES["scale"]
    ok = _ok(records)
    vals, ns = [], []
    for r in ok:
        snr = [row["signal_sd_seed"] / row["noise_sd_seed"] for row in noise_summary(r)
               if row["noise_sd_seed"] and row["signal_sd_seed"]]
        vals.append(float(np.mean(np.log10(snr))) if snr else NAN)
        ns.append(r["dataset"]["n_train"])
    vals, ns = np.array(vals), np.array(ns, dtype=float)
    if np.isfinite(vals).sum() < 2:
        return _missing("scale", findings["imagenet"], "ground_truth", key=rl.key, margin=rl.margin,
                        direction=rl.direction, seeds_required=rl.seeds)

    def compute(f):
        idx = f.index.to_numpy()
        by_n = {int(k): float(10 ** np.nanmean(vals[idx][ns[idx] == k])) for k in sorted(set(ns[idx]))}
        return (stats.slope_effect(np.log10(ns[idx]), vals[idx]),
                "LOO signal/noise (sd across removals / sd across SGD seeds; geometric mean per n): "
                + ", ".join(f"n={k}: {v:.2g}" for k, v in by_n.items()) + " (offline data; not ImageNet)")

    return _judge(rl, "scale", findings["imagenet"], "ground_truth", ok, compute)


# --- beyond the paper ------------------------------------------------------------------------------------------
def _spearman_or_nan(a: np.ndarray, b: np.ndarray) -> float:
    from ..metrics import spearman

    try:
        return spearman(a, b)
    except ValueError:  # a constant vector (e.g. a collapsed model): undefined
        return NAN


def pbrf_question(records: Records, claim: str) -> Claim:
    """Bae et al.: is Gauss-Newton influence closer to the PBRF than to LOO retraining?

    Per model: the Spearman correlation of the Gauss-Newton influence scores with the PBRF changes and with the LOO
    changes over the removed points whose PBRF did not diverge, each a Fisher-z mean over the examined test points;
    the claim is the mean paired difference (PBRF minus LOO) over healthy models, with a 95% interval.
    """
    rl = R.RULES["pbrf"]
    ok = _ok(records)
    pairs = []
    for r in ok:
        per_tp = []
        for tp in r["test_points"]:
            pb = np.array([np.nan if v is None else v for v in tp["pbrf"]["actual"]], dtype=float)
            fin = np.isfinite(pb)
            gn = np.asarray(tp["curvatures"]["gauss-newton"]["predicted"], dtype=float)[fin]
            loo = np.asarray(tp["actual"], dtype=float)[fin]
            per_tp.append((_spearman_or_nan(gn, pb[fin]), _spearman_or_nan(gn, loo)))
        a, b = np.array(per_tp).T if per_tp else (np.array([]), np.array([]))
        pairs.append((stats.mean_correlation(a)[0], stats.mean_correlation(b)[0]))
    pairs = np.array(pairs, dtype=float).reshape(-1, 2)
    if np.isfinite(pairs).all(axis=1).sum() < 2:
        return _missing("what influence estimates", claim, "pbrf", key=rl.key, margin=rl.margin,
                        direction=rl.direction, seeds_required=rl.seeds)

    def compute(f):
        p = pairs[f.index.to_numpy()]
        p = p[np.isfinite(p).all(axis=1)]
        return (stats.mean_effect(p[:, 0] - p[:, 1]),
                f"Iris MLPs ({len(p)} models): Spearman of Gauss-Newton influence with the PBRF "
                f"{stats.mean_correlation(p[:, 0])[0]:.2f}, with LOO {stats.mean_correlation(p[:, 1])[0]:.2f} "
                "(Fisher-z means)")

    return _judge(rl, "what influence estimates", claim, "pbrf", ok, compute)


def lds_summary(records: Records, claim: str, alpha: float = 0.5) -> Claim:
    """Mean LDS per inverse-HVP method (subsets keeping ``alpha`` of the data), and LDS minus the paper's LOO
    Spearman for the exact scores of the same models (healthy models). A measurement beside the paper: no direction
    is claimed."""
    ok = _ok(records)
    healthy, excluded = stats.split_healthy(ok)
    per_method: dict[str, list[float]] = {}
    diff = []
    for r in healthy:
        for e in r["lds"]:
            if not np.isclose(e["alpha"], alpha):
                continue
            for m, v in e["methods"].items():
                if v.get("mean") is not None and np.isfinite(v["mean"]):
                    per_method.setdefault(m, []).append(v["mean"])
            loo = (r.get("loo") or {}).get("methods", {}).get("exact")
            ex = e["methods"].get("exact", {}).get("mean")
            if loo and ex is not None:
                rho, n = stats.mean_correlation(loo["spearman"])
                if n:
                    diff.append(ex - rho)
    if not per_method:
        return _missing("group effects", claim, "lds")
    n_models = sum(any(np.isclose(e["alpha"], alpha) for e in r["lds"]) for r in healthy)
    text = (f"Iris and small-MNIST MLPs ({n_models} healthy models), subsets keeping {alpha:g} of the data: mean LDS "
            "over the models on which a method ran: "
            + ", ".join(f"{m} {np.mean(v):.2f}" + (f" ({len(v)} models)" if len(v) < n_models else "")
                        for m, v in per_method.items()))
    if len(diff) >= 2:
        e = stats.mean_effect(np.array(diff))
        text += f"; exact LDS minus the LOO Spearman of the same scores {_fmt(e, 2)}"
    return Claim("group effects", claim, "lds", text, "measured", n_models=len(healthy), n_total=len(ok),
                 n_excluded=len(excluded), excluded=stats.exclusion_summary(excluded, len(ok)))


def validation_procedure(records: Records, claim: str, k: int = 25) -> Claim:
    """Epifano et al.: does the depth verdict (Iris, the largest weight decay, healthy models) depend on the
    validation procedure?

    Two procedures on the same records (:mod:`.procedures`): this book's (Spearman over every removed point,
    Fisher-z mean over the examined test points) and the paper's (Spearman over the top ``k`` removed points by
    |predicted change|, highest-loss test point only). The verdict is the common one, or "depends on the
    procedure" when they differ.
    """
    rl = R.RULES["validation"]
    ok = _ok(records)
    if not ok:
        return _missing("validation procedure", claim, "validation")
    healthy, excluded = stats.split_healthy(ok)
    f0 = _frame(ok)
    w0, wd = f0.groupby("width").depth.nunique().idxmax(), f0.weight_decay.max()
    parts, verdicts = [], []
    for label, proc in [("every removed point, all test points", R.ALL_POINTS),
                        (f"top {k} by absolute influence, highest-loss test point", {**R.PAPER_IRIS, "k": k})]:
        f = _frame(healthy, proc)
        part = f[(f.width == w0) & np.isclose(f.weight_decay, wd)]
        e = stats.slope_effect(part.depth, part.value)
        v = stats.decide(e, rl.direction, rl.margin)
        parts.append(f"{label}: {_fmt(e, 3)} ({v})")
        verdicts.append(v)
    text = f"Iris MLPs, slope of Spearman per layer (weight decay {wd:g}, healthy models) — " + "; ".join(parts)
    return Claim("validation procedure", claim, "validation", text,
                 verdicts[0] if verdicts[0] == verdicts[1] else "depends on the procedure", key=rl.key,
                 margin=rl.margin, direction=rl.direction, unit=rl.unit, n_models=len(healthy), n_total=len(ok),
                 n_excluded=len(excluded), excluded=stats.exclusion_summary(excluded, len(ok)),
                 seeds=_seeds(ok), seeds_required=rl.seeds)


# --- the leave-one-out noise ceiling ------------------------------------------------------------------------------
#: the replicate protocols of the ceiling sweeps (presets._ceiling), in their order
CEILING_LABELS = ("warm start, twice the steps", "cold start, another seed")
#: which ceiling sweep stands beside the claims of which sweep
CEILING_OF = {"iris": "iris-ceiling", "mnist": "mnist-ceiling", "cnn": "cnn-ceiling",
              "test_points": "test-points-ceiling"}


def _ceiling_values(r: dict[str, Any], i: int, procedure: dict[str, Any]) -> tuple[float, float]:
    """One model's ``(LOO vs replicate i, influence vs LOO)`` on the points of ``procedure`` (Fisher-z means over its
    test points of ``procedure["roles"]``), from the stored vectors; NaN where undefined."""
    from . import procedures

    pos = np.asarray(r["loo_replicates"]["positions"], dtype=int)
    k = procedure.get("k")
    k = r["setting"].get("k") if k == "setting" else k
    rule, roles = procedure.get("rule", "all"), procedure.get("roles")
    c_vals, i_vals = [], []
    for tp in r["test_points"]:
        if (roles is not None and tp.get("role") not in roles) or "replicates" not in tp:
            continue
        p = np.asarray(tp["predicted"], dtype=float)[pos]
        a = np.asarray(tp["actual"], dtype=float)[pos]
        b = np.asarray(tp["replicates"][i]["actual"], dtype=float)
        idx = procedures.select(p, rule, None if rule == "all" else min(int(k), p.size))
        if idx.size >= 3:
            c_vals.append(procedures.agreement(a[idx], b[idx], "spearman"))
            i_vals.append(procedures.agreement(p[idx], a[idx], "spearman"))
    return stats.mean_correlation(c_vals)[0], stats.mean_correlation(i_vals)[0]


def noise_ceiling(records: Records, procedure: dict[str, Any],
                  by: Sequence[str] = ("model", "depth", "width", "weight_decay")) -> list[dict[str, Any]]:
    """How high could an estimate's agreement with LOO be? Per setting (the keys ``by`` that vary) and replicate
    protocol of the records (``loo_replicates``): per healthy model, the Spearman correlation of the record's LOO with
    the replicate's LOO of the same removals on the points ``procedure`` selects (e.g. the top-``k`` |predicted| of
    its test points; Fisher-z mean over the model's test points); then the Fisher-z mean over the setting's models
    with a 95 % interval. Beside it, the agreement of the exact influence with the record's LOO on the same points
    (``influence``), so the two can be read together.

    Returns one dict per (setting, protocol): ``setting`` (the varying keys of ``by`` and their values), ``label``,
    ``protocol``, ``mean``, ``lo``, ``hi``, ``n`` (models) and ``influence`` (``mean``, ``lo``, ``hi``, ``n``)."""
    healthy, _ = stats.split_healthy(_ok(records))
    healthy = [r for r in healthy if r.get("loo_replicates")]
    if not healthy:
        return []
    varying = [k for k in by if len({str(r["setting"].get(k)) for r in healthy}) > 1]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in healthy:
        groups.setdefault(tuple(r["setting"].get(k) for k in varying), []).append(r)
    n_rep = min(len(r["loo_replicates"]["protocols"]) for r in healthy)
    out = []
    for key in sorted(groups, key=lambda t: tuple(str(x) for x in t)):
        members = groups[key]
        for i in range(n_rep):
            vals = np.array([_ceiling_values(r, i, procedure) for r in members], dtype=float).reshape(-1, 2)
            m, lo, hi, n = stats.mean_correlation_ci(vals[:, 0])
            im, ilo, ihi, inn = stats.mean_correlation_ci(vals[:, 1])
            k = procedure.get("k")
            out.append({"setting": dict(zip(varying, key, strict=True)),
                        "k": members[0]["setting"].get("k") if k == "setting" else k,
                        "label": CEILING_LABELS[i] if i < len(CEILING_LABELS) else f"replicate {i + 1}",
                        "protocol": members[0]["loo_replicates"]["protocols"][i]["protocol"],
                        "mean": m, "lo": lo, "hi": hi, "n": n,
                        "influence": {"mean": im, "lo": ilo, "hi": ihi, "n": inn}})
    return out


def ceiling_summary(ceiling: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per replicate protocol, the Fisher-z mean of the per-setting ceilings (one number per protocol)."""
    out: dict[str, list[float]] = {}
    for c in ceiling:
        out.setdefault(c["label"], []).append(c["mean"])
    return {label: stats.mean_correlation(v)[0] for label, v in out.items()}


def setting_label(setting: dict[str, Any]) -> str:
    names = {"weight_decay": "wd", "model": "", "depth": "depth", "width": "width"}
    return ", ".join(f"{names.get(k, k)} {v:g}".strip() if isinstance(v, float) else f"{names.get(k, k)} {v}".strip()
                     for k, v in setting.items()) or "all models"


def ceiling_box(ceiling: Sequence[dict[str, Any]], sweep: str, procedure: dict[str, Any]) -> str:
    """The LOO noise ceiling beside a chapter's verdicts, as a Markdown admonition: per setting and replicate
    protocol, the agreement of LOO with the replicate, and of the exact influence with the same LOO (Fisher-z means
    over the setting's models, 95 % intervals)."""
    if not ceiling:
        body = (f"No records of the ceiling sweep `{sweep}` (compute them with `python -m "
                f"influence_lib.experiments.sweep {sweep} --book`).")
    else:
        lines = []
        by_setting: dict[str, list[dict[str, Any]]] = {}
        for c in ceiling:
            by_setting.setdefault(setting_label(c["setting"]), []).append(c)
        for label, cs in by_setting.items():
            infl = cs[0]["influence"]
            lines.append(f"- **{label}** ({cs[0]['n']} models): LOO vs "
                         + "; vs ".join(f"{c['label']} {fmt_ci(c['mean'], c['lo'], c['hi'])}" for c in cs)
                         + f"; influence vs LOO {fmt_ci(infl['mean'], infl['lo'], infl['hi'])}")
        body = (f"Models of this chapter's settings (sweep `{sweep}`: the same $\\theta^*$ and influence scores), "
                f"{_procedure_label({**procedure, 'k': ceiling[0].get('k', procedure.get('k'))})}; "
                "Spearman correlation of the chapter's LOO with each replicate of the "
                "same removals, and of the exact influence with the chapter's LOO on the same points:\n\n"
                + "\n".join(lines) + "\n\nThe warm-start replicate says how settled the ground truth is: no "
                "estimate can be expected to agree with the LOO better than the LOO agrees with its longer-trained "
                "self. The cold-start replicate says how much of the LOO change belongs to the basin of "
                "$\\theta^*$: where it is low, retraining from another initialisation gives another answer, so an "
                "estimate that matches the warm-start LOO (as influence functions, a linearisation at $\\theta^*$, "
                "are built to) says little about the removal's effect on a model trained afresh.")
    return f"```{{admonition}} The leave-one-out noise ceiling\n:class: seealso\n{body}\n```"


# --- the table -------------------------------------------------------------------------------------------------
def with_holm(table: Sequence[Claim], alpha: float = R.ALPHA) -> list[Claim]:
    """The claims with verdicts re-decided on Holm-adjusted p-values: the effect and equivalence p-values of all
    claims form one family (claims without an effect are not part of it)."""
    m = len(table)
    adj = stats.holm([c.p_zero for c in table] + [c.p_equivalence for c in table])
    out = []
    for i, c in enumerate(table):
        if not c.effect.defined:
            out.append(c)
            continue
        v = stats.decide(c.effect, c.direction, c.margin, alpha, p_zero=adj[i], p_equivalence=adj[m + i])
        out.append(dataclasses.replace(c, verdict=v, p_holm=float(adj[m + i] if v == "absent" else adj[i])))
    return out


def claim_table(iris: Records, mnist: Records, cnn: Records, test_points: Records, ground_truth: Records,
                findings: dict[str, str], hessian_claim: str) -> list[Claim]:
    """Every claim of the paper that the book measures, in the order of the chapters, Holm-corrected together."""
    return with_holm([iris_depth(iris, findings), iris_depth_all_points(iris, findings), mnist_depth(mnist, findings),
                      iris_weight_decay(iris, findings), iris_width(iris, findings),
                      hessian_top_eigenvalue(iris, hessian_claim), stochastic_estimation(mnist, findings),
                      stochastic_depth(mnist, findings), deeper_networks(cnn, findings),
                      test_point_dependence(test_points, findings), ground_truth_noise(ground_truth, findings)])


def protocol_box(paper_protocol: str, our_protocol: str, divergences: str) -> str:
    """The paper's protocol, ours and the divergences between them, as one Markdown admonition (prose only)."""
    body = "\n\n".join([f"**The paper's protocol.** {paper_protocol}", f"**Ours.** {our_protocol}",
                         f"**Divergences.** {divergences}"])
    return f"```{{admonition}} Protocol: the paper's and ours\n:class: seealso\n{body}\n```"


def claim_box(c: Claim, paper_protocol: str | None = None, our_protocol: str | None = None,
              divergences: str | None = None) -> str:
    """A chapter's verdict as a Markdown admonition: the claim, (optionally) the paper's protocol, ours and the
    divergences, the statistic with its interval, the verdict (unadjusted: the intro's table Holm-corrects across all
    claims), the excluded models and the all-models sensitivity value. Only ``c``'s fields are numbers."""
    margin = f"; equivalence margin ±{c.margin:g} {c.unit}".rstrip() if np.isfinite(c.margin) else ""
    lines = [f"**Claim** ({c.finding}): {c.paper}."]
    for label, text in (("The paper's protocol", paper_protocol), ("Ours", our_protocol),
                        ("Divergences", divergences)):
        if text:
            lines.append(f"**{label}.** {text}")
    lines += [f"**Statistic.** {c.statistic or 'none'}{margin}. **Measured:** {c.measured}.",
              f"**Verdict: {c.verdict}**" + (f" ({c.note})" if c.note else "")
              + " — unadjusted here; the introduction's table applies the Holm correction across all claims."]
    if c.excluded:
        lines.append(f"**Models.** {c.excluded}.")
    if c.sensitivity:
        lines.append(f"**Sensitivity.** {c.sensitivity}.")
    body = "\n\n".join(lines)
    head = f"```{{admonition}} Verdict ({c.finding}): {c.verdict}\n:class: {_BOX_CLASS.get(c.verdict, 'note')}"
    return f"{head}\n{body}\n```"


_BOX_CLASS = {"reproduced": "tip", "opposite": "warning", "absent": "important", "not resolved": "note",
              "no data": "caution"}


VERDICT_COLOURS = {"reproduced": "tab:green", "opposite": "tab:red", "absent": "tab:blue",
                   "not resolved": "tab:gray", "no data": "lightgray"}


def effect_figure(table: Sequence[Claim], ax=None):
    """Per claim, the effect and its 95% interval in units of the claim's equivalence margin (so the margins sit at
    +-1 and zero in the middle; symmetric-log axis beyond +-2), coloured by verdict, with the paper's direction in
    the right margin (→ positive, ← negative, ↔ either sign). Claims without an estimate are listed without a bar.
    Returns the figure."""
    import matplotlib.pyplot as plt

    rows = list(table)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.42 * len(rows) + 1.7))  # the page column is about 7 inches wide
    fig = ax.figure
    ys = np.arange(len(rows))[::-1]
    lim = 3.0
    for y, c in zip(ys, rows, strict=True):
        col = VERDICT_COLOURS.get(c.verdict, "tab:purple")
        if np.isfinite(c.estimate) and np.isfinite(c.margin) and c.margin > 0:
            e, lo, hi = c.estimate / c.margin, c.lo / c.margin, c.hi / c.margin
            if np.isfinite(lo):
                ax.plot([lo, hi], [y, y], color=col, lw=3, solid_capstyle="butt")
                lim = max(lim, abs(lo), abs(hi))
            ax.plot([e], [y], "o", color=col, ms=6, mec="k", mew=0.5)
            lim = max(lim, abs(e))
        else:
            ax.text(0, y, "no estimate", ha="center", va="center", fontsize=9, color="gray")
    lim = min(lim * 1.15, 100.0)
    side = ax.get_yaxis_transform()  # x in axes units, y in data units
    ax.text(1.01, ys[0] + 0.7, "paper", transform=side, fontsize=9, ha="left", va="center")
    for y, c in zip(ys, rows, strict=True):
        ax.text(1.01, y, {1: "→ +", -1: "← −", 0: "↔ any"}[c.direction], transform=side, fontsize=10, ha="left",
                va="center")
    ax.axvspan(-1, 1, color="tab:blue", alpha=0.08, lw=0)
    for x in (-1, 1):
        ax.axvline(x, color="tab:blue", lw=0.8, ls="--")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xscale("symlog", linthresh=2.0, linscale=1.5)
    ticks = [t for t in (-100, -10, -3, -1, 0, 1, 3, 10, 100) if abs(t) <= lim]
    ax.set_xticks(ticks, [f"{t:g}".replace("-", "−") for t in ticks])
    ax.set_xlim(-lim, lim)
    ax.set_ylim(ys[-1] - 0.7, ys[0] + 0.7)
    ax.set_yticks(ys, [f"{c.finding} ({c.chapter.replace('_', ' ')})" for c in rows], fontsize=9.5)
    ax.tick_params(axis="x", labelsize=9)
    ax.set_xlabel("effect / equivalence margin, 95% interval (shaded: within ±margin)", fontsize=9.5)
    handles = [plt.Line2D([], [], color=v, lw=3, label=k) for k, v in VERDICT_COLOURS.items()]
    ax.legend(handles=handles, fontsize=9, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    return fig
