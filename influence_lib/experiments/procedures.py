"""Validation procedures: how the accuracy of influence estimates is *measured*, as explicit, swappable choices.

A validation of influence estimates for one test point compares, over a set ``S`` of removed training points, the
predicted loss changes ``p_i`` with the actual (leave-one-out) ones ``a_i``. A *procedure* fixes three choices:

* which points ``S`` (:func:`select`): all of them, the ``k`` largest ``|p_i|`` (Koh & Liang's convention, used by
  Basu et al.), or ``k`` points drawn at random;
* which agreement metric (:func:`agreement`): Spearman's rho, its absolute value (the replication of
  Epifano et al. 2023 averages ``|rho|``), or Pearson's r;
* which test point(s): the highest-loss, the median-loss or random ones (a column of :func:`accuracy_table`).

:func:`subset_distribution` gives the sampling distribution of a metric over random ``k``-point subsets of the
removed points, i.e. how much a ``k``-point validation would vary had other points been removed;
:func:`accuracy_table` recomputes one row per (record, examined test point) for a procedure from the stored
predicted and actual changes, and :func:`effects` turns such a table into the depth and weight-decay verdicts.

Undefined correlations (a constant input, e.g. a collapsed network whose removals all change the loss equally) are
NaN, never 0: averaging them in as 0 would bias every summary towards "no agreement".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

RULES = ("all", "top_abs_influence", "random")
AGREEMENTS = ("spearman", "abs_spearman", "pearson")


# --- checks ----------------------------------------------------------------------------------------------
def _vector(name: str, values: Any) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(v)).sum())} NaN or infinite value(s)")
    return v


def _pair(predicted: Any, actual: Any) -> tuple[np.ndarray, np.ndarray]:
    p, a = _vector("predicted", predicted), _vector("actual", actual)
    if p.shape != a.shape:
        raise ValueError(f"predicted and actual must have the same length, got {p.size} and {a.size}")
    if p.size < 2:
        raise ValueError(f"predicted and actual need at least 2 values for a correlation, got {p.size}")
    return p, a


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _check_choice(name: str, value: Any, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {list(accepted)}, got {value!r}")


# --- the three choices -----------------------------------------------------------------------------------
def select(predicted: Sequence[float] | np.ndarray, rule: str, k: int | None = None, seed: int = 0) -> np.ndarray:
    """Indices of the removed points a procedure validates on, as an int64 array.

    ``predicted``: shape ``(n,)``, the predicted loss changes (one per removed point).

    * ``"all"``: ``arange(n)``; ``k`` must be ``None`` (or ``n``).
    * ``"top_abs_influence"``: the ``k`` indices with the largest ``|predicted|``, largest first (ties: lower index
      first).
    * ``"random"``: ``k`` distinct indices drawn uniformly without replacement with ``numpy.random.default_rng(seed)``,
      in increasing order.
    """
    p = _vector("predicted", predicted)
    _check_choice("rule", rule, RULES)
    n = p.size
    if rule == "all":
        if k is not None and k != n:
            raise ValueError(f"k must be None (or n = {n}) for rule 'all', got {k!r}")
        return np.arange(n, dtype=np.int64)
    if k is None:
        raise ValueError(f"k is required for rule {rule!r}")
    k = _check_int("k", k, 1, n)
    if rule == "top_abs_influence":
        return np.argsort(-np.abs(p), kind="mergesort")[:k].astype(np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)).astype(np.int64)


def _rowwise(x: np.ndarray, y: np.ndarray, metric: str) -> np.ndarray:
    """The metric of every row of ``x`` and ``y`` (shape ``(m, k)`` each); NaN where a row is constant."""
    from scipy.stats import rankdata

    constant = (np.ptp(x, axis=1) == 0) | (np.ptp(y, axis=1) == 0)
    if metric != "pearson":
        x, y = rankdata(x, axis=1), rankdata(y, axis=1)  # ties share their mean rank
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(1) / np.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))
    r = np.clip(r, -1.0, 1.0)
    r[constant] = np.nan
    return np.abs(r) if metric == "abs_spearman" else r


def agreement(predicted: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray,
              metric: str = "spearman") -> float:
    """Agreement of predicted and actual changes over the given points (both of shape ``(k,)``, ``k >= 2``).

    * ``"spearman"``: :math:`\\rho = \\operatorname{corr}(R(p), R(a))`, the Pearson correlation of the ranks
      (ties get the mean of the ranks they span);
    * ``"abs_spearman"``: :math:`|\\rho|` (what the replication averages; it cannot tell a good estimate from one
      that is anti-correlated with the truth);
    * ``"pearson"``: :math:`r = \\sum (p_i-\\bar p)(a_i-\\bar a) / \\sqrt{\\sum (p_i-\\bar p)^2 \\sum (a_i-\\bar a)^2}`.

    Returns NaN when the correlation is undefined (``predicted`` or ``actual`` constant). Raises ``ValueError`` on
    an unknown metric, unequal lengths, fewer than 2 values or non-finite values.
    """
    _check_choice("metric", metric, AGREEMENTS)
    p, a = _pair(predicted, actual)
    return float(_rowwise(p[None], a[None], metric)[0])


def subset_distribution(predicted: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray, k: int,
                        n_draws: int = 1000, seed: int = 0, metric: str = "spearman") -> np.ndarray:
    """The metric over ``n_draws`` random ``k``-point subsets of the ``n`` removed points: shape ``(n_draws,)``.

    Each draw takes ``k`` of the ``n`` pairs ``(predicted_i, actual_i)`` uniformly without replacement and computes
    :func:`agreement` on them. The spread of the result is the sampling noise of a ``k``-point validation relative to
    the ``n`` points at hand (it shrinks to 0 at ``k = n``: a finite-population distribution). Entries are NaN where a
    subset's correlation is undefined (constant values within the subset).
    """
    _check_choice("metric", metric, AGREEMENTS)
    p, a = _pair(predicted, actual)
    k = _check_int("k", k, 2, p.size)
    n_draws = _check_int("n_draws", n_draws, 1)
    rng = np.random.default_rng(seed)
    idx = rng.permuted(np.broadcast_to(np.arange(p.size), (n_draws, p.size)), axis=1)[:, :k]
    return _rowwise(p[idx], a[idx], metric)


# --- from records ----------------------------------------------------------------------------------------
def _stream(seed: int, setting: dict[str, Any], j: int) -> int:
    """A seed for test point ``j`` of the record with ``setting``: independent of the order of the records."""
    blob = json.dumps(setting, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha1(blob + f"|{seed}|{j}".encode()).digest()[:8], "little")


def accuracy_table(records: Sequence[dict[str, Any]], metric: str = "spearman", rule: str = "all",
                   k: int | None = None, seed: int = 0):
    """One row per (record, examined test point): the accuracy of its influence estimates under a procedure.

    ``records``: sweep records with ``"removed"`` and, per test point, the full ``"predicted"`` and ``"actual"``
    vectors over the removed points (failed records, those with an ``"error"`` key, are skipped). The points are
    chosen by :func:`select` (``rule``, ``k``; random draws are seeded from ``seed``, the record's setting and the
    test point, so they do not depend on the order of ``records``), the value is :func:`agreement` (``metric``).

    Returns a ``pandas.DataFrame`` with columns ``depth, width, weight_decay, seed, role, test_index, point, value``
    (``point``: position of the test point in the record; ``value``: NaN where undefined).
    """
    import pandas as pd

    _check_choice("metric", metric, AGREEMENTS)
    _check_choice("rule", rule, RULES)
    rows = []
    for r in records:
        if "error" in r:
            continue
        s = r["setting"]
        for j, tp in enumerate(r["test_points"]):
            if "predicted" not in tp or "actual" not in tp:
                raise ValueError(f"records: test point {j} of the record {s.get('depth')}/{s.get('width')}/"
                                 f"{s.get('weight_decay')}/{s.get('seed')} has no 'predicted'/'actual' vectors")
            p, a = _pair(tp["predicted"], tp["actual"])
            idx = select(p, rule, k, _stream(seed, s, j) if rule == "random" else 0)
            value = agreement(p[idx], a[idx], metric) if idx.size >= 2 else np.nan
            rows.append({"depth": s["depth"], "width": s["width"], "weight_decay": s["weight_decay"],
                         "seed": s["seed"], "role": tp["role"], "test_index": tp["index"], "point": j,
                         "value": value})
    return pd.DataFrame(rows, columns=["depth", "width", "weight_decay", "seed", "role", "test_index", "point",
                                       "value"])


def per_model(table, roles: Sequence[str] | None = None):
    """Mean ``value`` over the chosen test-point ``roles`` (all roles if ``None``) of each model.

    ``table``: an :func:`accuracy_table` frame. Returns ``depth, width, weight_decay, seed, value, n_points`` (one
    row per model; undefined values are left out of the mean, and a model with none left has NaN).
    """
    keys = ["depth", "width", "weight_decay", "seed"]
    part = table if roles is None else table[table.role.isin(list(roles))]
    if roles is not None and part.empty and not table.empty:
        raise ValueError(f"roles {list(roles)} match no test point; present: {sorted(table.role.unique())}")
    g = part.groupby(keys, as_index=False)
    return g.agg(value=("value", "mean"), n_points=("value", "count"))


def effects(models, depth_width: int | None = None, wd_pair: tuple[float, float] | None = None,
            level: float = 0.95) -> dict[str, dict[str, Any]]:
    """The paper's depth and weight-decay effects, with intervals and verdicts, on a :func:`per_model` frame.

    * ``"depth wd=<w>"`` for each weight decay ``w``: least-squares slope of ``value`` on depth over the models of
      width ``depth_width`` (default: the width with the most depths), with a Student-t interval
      (:func:`influence_lib.report.slope_ci`); verdict against the paper's direction ``-1`` (accuracy falls with
      depth).
    * ``"weight decay"``: mean paired difference ``value(wd_hi) - value(wd_lo)`` over models with the same depth,
      width and seed (``wd_pair = (wd_lo, wd_hi)``, default: the smallest and largest weight decay), with a Student-t
      interval (:func:`influence_lib.metrics.mean_ci`); verdict against direction ``+1``.

    Each entry: ``{"estimate", "lo", "hi", "n", "verdict"}``.
    """
    from ..metrics import mean_ci
    from .report import slope_ci, verdict

    out: dict[str, dict[str, Any]] = {}
    if models.empty:
        return out
    if depth_width is None:
        depth_width = int(models.groupby("width").depth.nunique().idxmax())
    wds = sorted(models.weight_decay.unique())
    for wd in wds:
        part = models[(models.width == depth_width) & np.isclose(models.weight_decay, wd)]
        est, lo, hi = slope_ci(part.depth, part.value, level)
        out[f"depth wd={wd:g}"] = {"estimate": est, "lo": lo, "hi": hi, "n": int(part.value.notna().sum()),
                                   "verdict": verdict(est, lo, hi, -1)}
    lo_wd, hi_wd = wd_pair if wd_pair is not None else (wds[0], wds[-1])
    if len(wds) >= 2 or wd_pair is not None:
        a = models.set_index(["depth", "width", "seed"])
        diff = (a[np.isclose(a.weight_decay, hi_wd)].value - a[np.isclose(a.weight_decay, lo_wd)].value).dropna()
        est, lo, hi = mean_ci(diff.to_numpy(), level) if len(diff) else (np.nan,) * 3
        out["weight decay"] = {"estimate": est, "lo": lo, "hi": hi, "n": int(len(diff)),
                               "verdict": verdict(est, lo, hi, +1)}
    return out


__all__ = ["AGREEMENTS", "RULES", "accuracy_table", "agreement", "effects", "per_model", "select",
           "subset_distribution"]
