"""The statistics behind every verdict of the book (the rules they apply live in :mod:`.rules`).

* **The unit of replication is the trained model** (one seed of one setting). Test points nest inside a model:
  they are summarised *within* the model first (:func:`mean_correlation`, a Fisher-z mean), and only the
  model-level values enter an interval. This is the two-stage form of a nested (mixed) model: with a balanced
  design (the same test points per model) the across-model t interval of the model means is the exact interval of
  the fixed effect in the random-intercept model; with unbalanced designs it weights models equally, which is
  what "the model is the unit" asks for.
* **Correlations** are averaged and given intervals on the Fisher-z scale, ``z = artanh(r)``, and transformed back
  (:func:`mean_correlation_ci`, :func:`correlation_ci`), so no interval of a correlation leaves ``(-1, 1)``.
  Values are clipped to ``|r| <= R_CLIP`` first (an exact 1 has an infinite z).
* **Effects across models** are an :class:`Effect`: an estimate, its standard error and degrees of freedom, from a
  mean over models (:func:`mean_effect`: paired differences, per-model statistics) or an ordinary least-squares slope
  over model-level values (:func:`slope_effect`, optionally with categorical fixed effects such as the weight-decay
  arm or the architecture family). Student-t intervals and p-values.
* **Tests**, each dual to the two-sided ``1 - alpha`` interval: ``p_zero`` (H0: effect = 0; below alpha exactly when
  the interval excludes 0) and ``p_equivalence`` (H0: |effect| >= margin; below alpha exactly when the interval lies
  inside ``(-margin, margin)``; twice the larger one-sided TOST p-value).
* **Holm** (:func:`holm`) across a family; the intro's table corrects the ``p_zero`` and ``p_equivalence`` of all its
  claims together (2m hypotheses: the family-wise error rate over every verdict of the table is at most alpha,
  under any dependence between them).
* **The verdict** (:func:`decide`): "absent" when the effect is shown to lie inside the margin (equivalence; this takes
  precedence, so an effect that is significant but smaller than the smallest effect the claim is about is not called
  "reproduced"); otherwise "reproduced" when it is shown to differ from 0 in the paper's direction (``direction = 0``:
  either), "opposite" when shown in the other direction; "not resolved" when neither is shown; "no data" without an
  estimate or interval.
* **Model health** (:func:`health_of`, :func:`split_healthy`): the record's ``"health"`` block (schema 2) or, for
  older records, a health block derived from what they store; unhealthy models are kept out of verdicts, counted and
  named (:func:`exclusion_summary`).

Only numpy and scipy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import rules

R_CLIP = rules.R_CLIP


# --- correlations --------------------------------------------------------------------------------------------
def fisher_z(r: Any) -> np.ndarray:
    """``artanh(r)`` with ``|r|`` clipped to :data:`R_CLIP` (NaN stays NaN)."""
    return np.arctanh(np.clip(np.asarray(r, dtype=float), -R_CLIP, R_CLIP))


def mean_correlation(values: Iterable[float | None]) -> tuple[float, int]:
    """``(tanh(mean z), n)`` over the defined (finite) correlations of ``values``; ``(nan, 0)`` without any."""
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), 0
    return float(np.tanh(fisher_z(v).mean())), int(v.size)


def correlation_ci(r: float, n: int, level: float = rules.LEVEL, spearman: bool = False) -> tuple[float, float, float]:
    """Interval of one correlation of ``n`` pairs: ``tanh(z +- q se)`` with ``se = sqrt(c / (n - 3))``.

    ``c = 1`` for Pearson, ``1.06`` for Spearman (Fieller, Hartley & Pearson 1957). NaN interval when ``n <= 3``.
    """
    from scipy import stats

    if not np.isfinite(r):
        return float("nan"), float("nan"), float("nan")
    if n <= 3:
        return float(r), float("nan"), float("nan")
    z = float(fisher_z(r))
    half = stats.norm.ppf((1 + level) / 2) * math.sqrt((1.06 if spearman else 1.0) / (n - 3))
    return float(r), float(np.tanh(z - half)), float(np.tanh(z + half))


def mean_correlation_ci(values: Iterable[float | None], level: float = rules.LEVEL) -> tuple[float, float, float, int]:
    """Mean of per-model correlations with an interval, on the Fisher-z scale: ``(r, lo, hi, n)``.

    A Student-t interval of the mean ``z`` over the models, transformed back: always inside ``(-1, 1)``.
    """
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    z = fisher_z(v[np.isfinite(v)])
    e = mean_effect(z, level)
    if e.n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    return float(np.tanh(e.estimate)), float(np.tanh(e.lo)), float(np.tanh(e.hi)), e.n


# --- effects across models -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Effect:
    """An effect across models: ``estimate`` with standard error ``se`` on ``df`` degrees of freedom (``n`` models)."""

    estimate: float
    se: float
    df: float
    n: int
    level: float = rules.LEVEL

    @property
    def defined(self) -> bool:
        return bool(np.isfinite(self.estimate) and np.isfinite(self.se) and self.df >= 1)

    def _q(self) -> float:
        from scipy import stats

        return float(stats.t.ppf((1 + self.level) / 2, self.df))

    @property
    def lo(self) -> float:
        return self.estimate - self._q() * self.se if self.defined else float("nan")

    @property
    def hi(self) -> float:
        return self.estimate + self._q() * self.se if self.defined else float("nan")

    @property
    def p_zero(self) -> float:
        """Two-sided p-value of H0: effect = 0 (below ``1 - level`` exactly when the interval excludes 0)."""
        from scipy import stats

        if not self.defined:
            return float("nan")
        if self.se == 0:
            return 0.0 if self.estimate != 0 else 1.0
        return float(2 * stats.t.sf(abs(self.estimate) / self.se, self.df))

    def p_equivalence(self, margin: float) -> float:
        """p-value of H0: |effect| >= ``margin`` (twice the larger TOST one-sided p, at most 1): below
        ``1 - level`` exactly when the interval lies inside ``(-margin, margin)``."""
        from scipy import stats

        if not self.defined or not np.isfinite(margin) or margin <= 0:
            return float("nan")
        if self.se == 0:
            return 0.0 if abs(self.estimate) < margin else 1.0
        p_low = stats.t.sf((self.estimate + margin) / self.se, self.df)  # H0: effect <= -margin
        p_high = stats.t.cdf((self.estimate - margin) / self.se, self.df)  # H0: effect >= margin
        return float(min(1.0, 2 * max(p_low, p_high)))


NO_EFFECT = Effect(float("nan"), float("nan"), float("nan"), 0)


def mean_effect(values: Sequence[float] | np.ndarray, level: float = rules.LEVEL) -> Effect:
    """Mean over model-level ``values`` (NaN left out) with its standard error on ``n - 1`` degrees of freedom."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Effect(float("nan"), float("nan"), float("nan"), 0, level)
    if v.size == 1:
        return Effect(float(v[0]), float("nan"), 0.0, 1, level)
    return Effect(float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)), float(v.size - 1), int(v.size), level)


def slope_effect(x: Sequence[float], y: Sequence[float], groups: Sequence[Any] | None = None,
                 level: float = rules.LEVEL) -> Effect:
    """Least-squares slope of model-level ``y`` on ``x`` (one row per model), optionally with a fixed effect
    (own intercept) per value of ``groups`` (a common slope across them); NaN ``y`` rows are left out.

    Standard error from the residual variance, ``df = n - (1 + number of groups)``. Undefined (NaN) with fewer than
    two distinct ``x`` values within the groups, and without an interval when no residual degree of freedom is left.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    g = np.zeros(len(x), dtype=int) if groups is None else np.unique(np.asarray(groups, dtype=str),
                                                                    return_inverse=True)[1]
    keep = np.isfinite(y) & np.isfinite(x)
    x, y, g = x[keep], y[keep], g[keep]
    levels = np.unique(g)
    if len(x) == 0:
        return Effect(float("nan"), float("nan"), float("nan"), 0, level)
    xc = x.copy()
    yc = y.copy()
    for k in levels:  # within-group centring: the fixed-effect (common slope) estimator
        m = g == k
        xc[m] -= x[m].mean()
        yc[m] -= y[m].mean()
    sxx = float((xc * xc).sum())
    if sxx <= 1e-12 * max(1.0, float((x * x).sum())):
        return Effect(float("nan"), float("nan"), float("nan"), int(len(x)), level)
    slope = float((xc * yc).sum() / sxx)
    df = len(x) - 1 - len(levels)
    if df < 1:
        return Effect(slope, float("nan"), 0.0, int(len(x)), level)
    resid = yc - slope * xc
    se = math.sqrt(float((resid * resid).sum()) / df / sxx)
    return Effect(slope, se, float(df), int(len(x)), level)


# --- multiplicity and the verdict ----------------------------------------------------------------------------
def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (step-down, family-wise error rate; valid under any dependence). NaN entries are not
    part of the family and stay NaN.

    ``p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))`` for the sorted defined p-values ``p_(1) <= ... <= p_(m)``.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="mergesort")]
    running = 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return out


VERDICTS = ("reproduced", "opposite", "absent", "not resolved", "no data")


def decide(effect: Effect, direction: int, margin: float, alpha: float = rules.ALPHA,
           p_zero: float | None = None, p_equivalence: float | None = None) -> str:
    """The verdict on ``effect`` against the paper's ``direction`` (+1, -1, or 0: any) and equivalence ``margin``.

    ``p_zero`` / ``p_equivalence`` default to the effect's own (unadjusted) p-values; pass Holm-adjusted ones to
    judge within a family. "absent" when ``p_equivalence < alpha`` (shown inside the margin), else "reproduced" /
    "opposite" when ``p_zero < alpha`` (by the sign of the estimate against ``direction``), else "not resolved";
    "no data" when the effect has no estimate or no interval.
    """
    if direction not in (-1, 0, 1):
        raise ValueError(f"direction must be -1, 0 or +1, got {direction!r}")
    if not effect.defined:
        return "no data"
    pz = effect.p_zero if p_zero is None else p_zero
    pe = effect.p_equivalence(margin) if p_equivalence is None else p_equivalence
    if np.isfinite(pe) and pe < alpha:
        return "absent"
    if pz < alpha:
        return "reproduced" if direction == 0 or np.sign(effect.estimate) == direction else "opposite"
    return "not resolved"


# --- model health ----------------------------------------------------------------------------------------------
def _dataset_name(record: dict[str, Any]) -> str | None:
    return (record.get("dataset") or {}).get("name") or (record.get("setting") or {}).get("dataset")


def _distinct(v: np.ndarray) -> int:
    scale = float(np.abs(v).max()) if v.size else 0.0
    if scale == 0:
        return 1
    return int(np.unique(np.round(v / scale, 9)).size)


def _grad_limit(record: dict[str, Any]) -> float | None:
    return rules.GRAD_NORM_LIMIT.get((record.get("setting") or {}).get("model"))


def health_of(record: dict[str, Any]) -> dict[str, Any]:
    """The health of the model of ``record``: ``{"healthy", "reasons", ..., "derived"}``.

    A record with a ``"health"`` block (schema 2, :func:`influence_lib.experiments.stages.model_health`) returns a
    copy of it (``derived: False``), with the stationarity limit of :data:`rules.GRAD_NORM_LIMIT` applied when the
    block was computed without one. Older records get a block derived from what they store (``derived: True``):

    * **not above chance**: ``training.train_accuracy <= chance + rules.HEALTH_ACCURACY_MARGIN``, chance being the
      share of the most frequent class (:data:`rules.CHANCE` by data set name; the check is skipped for an unknown
      data set or a record without a train accuracy);
    * **constant predictor**: every stored predicted vector is constant, or (a network in which only the output bias
      is alive) every one takes at most ``n_classes`` distinct values while having more than ``2 n_classes`` entries;
    * **not stationary**: ``training.grad_norm`` above the limit of the model family (:data:`rules.GRAD_NORM_LIMIT`),
      or non-finite.
    """
    training = record.get("training") or {}
    gn = training.get("grad_norm")
    limit = _grad_limit(record)
    if "health" in record and record["health"] is not None:
        h = dict(record["health"])
        h["reasons"] = list(h.get("reasons", []))
        h["derived"] = False
        g = h.get("grad_norm", gn)
        if limit is not None and h.get("stationary") is None and g is not None:
            h["grad_norm_limit"], h["stationary"] = limit, bool(g <= limit)
            if g > limit:
                h["reasons"].append(f"not stationary: gradient norm {g:.3g} > {limit:g}")
        h["healthy"] = bool(h.get("healthy", True)) and not h["reasons"]
        return h
    reasons: list[str] = []
    name = _dataset_name(record)
    chance = rules.CHANCE.get(name) if name else None
    acc = training.get("train_accuracy")
    if acc is not None and chance is not None and acc <= chance + rules.HEALTH_ACCURACY_MARGIN:
        reasons.append(f"train accuracy {acc:.3f} is not above chance {chance:.3f}")
    vectors = [np.asarray([np.nan if x is None else x for x in tp["predicted"]], dtype=float)
               for tp in record.get("test_points", []) if tp.get("predicted") is not None]
    vectors = [v[np.isfinite(v)] for v in vectors]
    vectors = [v for v in vectors if v.size]
    n_classes = rules.N_CLASSES.get(name) if name else None
    constant = bool(vectors) and all(_distinct(v) == 1 for v in vectors)
    if not constant and vectors and n_classes and all(v.size > 2 * n_classes for v in vectors):
        constant = all(_distinct(v) <= n_classes for v in vectors)
    if constant:
        reasons.append("constant predictor (predicted changes take at most one value per class)")
    stationary = None
    if gn is not None:
        if not math.isfinite(gn):
            reasons.append("non-finite gradient")
        elif limit is not None:
            stationary = bool(gn <= limit)
            if not stationary:
                reasons.append(f"not stationary: gradient norm {gn:.3g} > {limit:g}")
    return {"healthy": not reasons, "reasons": reasons, "train_accuracy": acc, "chance_accuracy": chance,
            "constant_predictor": constant, "grad_norm": gn, "grad_norm_limit": limit, "stationary": stationary,
            "derived": True}


#: short names of the reasons a model is excluded, matched in the reason texts (in this order)
REASON_KEYS = (("chance", "not above chance"), ("constant", "constant predictor"), ("dead", "dead hidden layer"),
               ("stationary", "not stationary"), ("non-finite", "non-finite gradient"))


def reason_key(reason: str) -> str:
    """The short category of a health reason (e.g. ``"not above chance"``)."""
    for needle, key in REASON_KEYS:
        if needle in reason:
            return key
    return reason


def split_healthy(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any],
                                                                                                     list[str]]]]:
    """``(healthy, excluded)``: the successful records whose model is healthy, and ``(record, reasons)`` for the
    others (failed records, those with an ``"error"``, are in neither)."""
    healthy, excluded = [], []
    for r in records:
        if "error" in r:
            continue
        h = health_of(r)
        if h["healthy"]:
            healthy.append(r)
        else:
            excluded.append((r, h["reasons"]))
    return healthy, excluded


def exclusion_summary(excluded: Sequence[tuple[dict[str, Any], list[str]]], n_total: int) -> str:
    """``"11 of 78 models excluded (11 not above chance, 11 constant predictor)"``, or ``"none of 78 excluded"``."""
    if not excluded:
        return f"none of {n_total} models excluded"
    counts: dict[str, int] = {}
    for _, reasons in excluded:
        for key in dict.fromkeys(reason_key(x) for x in reasons):
            counts[key] = counts.get(key, 0) + 1
    why = ", ".join(f"{v} {k}" for k, v in counts.items())
    return f"{len(excluded)} of {n_total} models excluded ({why})"


__all__ = ["Effect", "NO_EFFECT", "VERDICTS", "correlation_ci", "decide", "exclusion_summary", "fisher_z",
           "health_of", "holm", "mean_correlation", "mean_correlation_ci", "mean_effect", "reason_key", "slope_effect",
           "split_healthy"]
