"""Agreement between predicted and actual effects: correlations, top-k selection, bootstrap intervals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import Tensor

from .validation import check_positive_int

ArrayLike = Tensor | np.ndarray | list


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64).ravel()
    y = np.asarray(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same number of values, got {x.size} and {y.size}")
    if x.size < 2:
        raise ValueError(f"a correlation needs at least 2 values, got {x.size}")
    for name, v in (("a", x), ("b", y)):
        if not np.isfinite(v).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    return x, y


def _unit_scale(v: np.ndarray) -> np.ndarray:
    """``v`` times the power of two that brings ``max |v|`` into ``[0.5, 1)``: exact (only the exponents change), so
    a correlation computed from it equals, bit for bit, the one computed from ``v`` wherever that one neither
    overflows nor underflows, and is safe where it would (inputs of magnitude 1e200 or 1e-200)."""
    top = float(np.abs(v).max()) if v.size else 0.0
    if top == 0.0 or not np.isfinite(top):
        return v
    return np.ldexp(v, -int(np.frexp(top)[1]))


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    x, y = _unit_scale(x), _unit_scale(y)  # before the mean, whose sum could overflow
    xc, yc = _unit_scale(x - x.mean()), _unit_scale(y - y.mean())  # before the squares, which could underflow
    sx, sy = np.sqrt((xc * xc).sum()), np.sqrt((yc * yc).sum())
    if sx == 0 or sy == 0:
        raise ValueError("correlation is undefined: one of the inputs is constant")
    return float(np.clip((xc * yc).sum() / (sx * sy), -1.0, 1.0))


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    r = np.empty(x.size, dtype=np.float64)
    # boundaries of groups of equal values
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1..end
    r[order] = np.repeat(avg, ends - starts)
    return r


def pearson(a: ArrayLike, b: ArrayLike) -> float:
    """Pearson correlation of two equally long vectors (raises on constant or non-finite input).

    Scale-safe: each input is brought to unit magnitude by an exact power-of-two scaling before centring and again
    before the products, so inputs near 1e200 or 1e-200 give their true correlation (and ordinary inputs the same
    bits as the textbook formula)."""
    return _corr(*_pair(a, b))


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation (Pearson of the tie-averaged ranks)."""
    x, y = _pair(a, b)
    return _corr(ranks(x), ranks(y))


def top_k(scores: ArrayLike, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``|scores|``, largest first (ties broken by index)."""
    s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64).ravel()
    check_positive_int("k", k)
    if k > s.size:
        raise ValueError(f"k must be <= the number of scores ({s.size}), got {k}")
    return np.argsort(-np.abs(s), kind="mergesort")[:k]


METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {"pearson": pearson, "spearman": spearman}


def bootstrap_ci(
    a: ArrayLike,
    b: ArrayLike,
    metric: str | Callable[[ArrayLike, ArrayLike], float] = "spearman",
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(a, b)`` over resampled pairs ``(a_i, b_i)``.

    Resamples whose inputs are constant (correlation undefined) are skipped.
    """
    fn = METRICS[metric] if isinstance(metric, str) else metric
    if isinstance(metric, str) and metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    check_positive_int("n_boot", n_boot)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    x, y = _pair(a, b)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        i = rng.integers(0, x.size, x.size)
        try:
            vals.append(fn(x[i], y[i]))
        except ValueError:
            continue
    if not vals:
        raise ValueError("bootstrap_ci: every resample was degenerate (constant input)")
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_ci(values: ArrayLike, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a Student-t interval of the mean over independent runs (e.g. seeds): ``(mean, lo, hi)``."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN or infinite entries")
    if v.size == 0:
        raise ValueError("values must not be empty")
    m = float(v.mean())
    if v.size == 1:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return m, m - half, m + half


__all__ = ["pearson", "spearman", "ranks", "top_k", "bootstrap_ci", "mean_ci", "METRICS"]
