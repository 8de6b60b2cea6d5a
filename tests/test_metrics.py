import numpy as np
import pytest
import torch
from scipy import stats

import influence_lib as il
from influence_lib.metrics import ranks


def test_correlations_match_scipy_including_ties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = a + rng.normal(size=50)
    b_ties = np.round(b)  # many ties
    assert il.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    assert il.spearman(a, b_ties) == pytest.approx(stats.spearmanr(a, b_ties)[0], abs=1e-12)
    assert il.spearman(torch.tensor(a), torch.tensor(b)) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
    np.testing.assert_array_equal(ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])


def test_top_k_by_absolute_value():
    s = torch.tensor([0.1, -5.0, 2.0, -0.2, 3.0])
    assert il.top_k(s, 3).tolist() == [1, 4, 2]
    with pytest.raises(ValueError, match="k must be <= the number of scores"):
        il.top_k(s, 6)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        il.top_k(s, 0)


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(1)
    a = rng.normal(size=80)
    b = 0.6 * a + rng.normal(size=80)
    lo, hi = il.bootstrap_ci(a, b, "pearson", n_boot=500, seed=0)
    assert lo < il.pearson(a, b) < hi
    assert hi - lo < 0.5
    assert il.bootstrap_ci(a, b, n_boot=200, seed=4) == il.bootstrap_ci(a, b, n_boot=200, seed=4)


def test_mean_ci():
    m, lo, hi = il.mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and lo < 0.6 < hi


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="same number"):
        il.pearson([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        il.spearman([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="constant"):
        il.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least 2"):
        il.spearman([1.0], [2.0])
