"""Validation procedures against answers known in advance (selection rules, null distributions, monotone data)."""

import itertools

import numpy as np
import pytest

from influence_lib import metrics
from influence_lib.experiments import procedures

Z = 4.0  # tolerance in standard errors: a correct implementation fails with probability < 1e-4 per check


def _exact_null_spearman(k):
    """Every permutation of k ranks: Spearman's rho under independence (no ties) is uniform over these."""
    r = np.arange(k)
    return np.array([1 - 6 * ((r - np.array(q)) ** 2).sum() / (k * (k * k - 1)) for q in itertools.permutations(r)])


# --- select -----------------------------------------------------------------------------------------------
def test_top_abs_influence_picks_the_largest_magnitudes_largest_first():
    p = [0.1, -5.0, 3.0, 0.2, -0.05, 3.0]
    assert procedures.select(p, "top_abs_influence", 2).tolist() == [1, 2]
    assert procedures.select(p, "top_abs_influence", 3).tolist() == [1, 2, 5]  # tie: lower index first
    assert procedures.select(p, "all").tolist() == list(range(6))
    assert procedures.select(p, "all", 6).tolist() == list(range(6))


def test_random_rule_is_distinct_seeded_and_uniform():
    p = np.linspace(-1, 1, 40)
    a = procedures.select(p, "random", 10, seed=3)
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 40 and (np.diff(a) > 0).all()
    assert a.tolist() == procedures.select(p, "random", 10, seed=3).tolist()
    assert a.tolist() != procedures.select(p, "random", 10, seed=4).tolist()
    # each index is chosen with probability k/n = 1/4; count over m draws ~ Binomial(m, 1/4)
    m = 4000
    counts = np.bincount(np.concatenate([procedures.select(p, "random", 10, seed=s) for s in range(m)]),
                         minlength=40)
    se = np.sqrt(m * 0.25 * 0.75)
    assert np.abs(counts - m * 0.25).max() < 4.5 * se  # 4.5 SE: max over 40 counts


# --- agreement --------------------------------------------------------------------------------------------
def test_agreement_matches_the_library_correlations_and_abs():
    rng = np.random.default_rng(0)
    p, a = rng.standard_normal(30), rng.standard_normal(30)
    a[:5] = a[0]  # ties
    assert procedures.agreement(p, a, "spearman") == pytest.approx(metrics.spearman(p, a), abs=1e-12)
    assert procedures.agreement(p, a, "pearson") == pytest.approx(metrics.pearson(p, a), abs=1e-12)
    assert procedures.agreement(p, -a, "abs_spearman") == pytest.approx(abs(metrics.spearman(p, a)), abs=1e-12)


def test_undefined_correlation_is_nan_not_zero():
    for m in procedures.AGREEMENTS:
        assert np.isnan(procedures.agreement([1.0, 2.0, 3.0], [0.5, 0.5, 0.5], m))
    d = procedures.subset_distribution([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0], 2, 200, 0)
    assert np.isnan(d).any() and not np.isnan(d).all()  # subsets without the 4th point are constant in actual


def test_monotone_data_give_one_under_every_rule():
    p = np.random.default_rng(1).standard_normal(50)
    a = np.exp(3 * p)  # strictly increasing, far from linear
    for rule, k in (("all", None), ("top_abs_influence", 10), ("random", 10)):
        idx = procedures.select(p, rule, k, seed=2)
        assert procedures.agreement(p[idx], a[idx], "spearman") == pytest.approx(1.0)
        assert procedures.agreement(p[idx], a[idx], "abs_spearman") == pytest.approx(1.0)
        assert procedures.agreement(p[idx], -a[idx], "spearman") == pytest.approx(-1.0)
        assert procedures.agreement(p[idx], -a[idx], "abs_spearman") == pytest.approx(1.0)
        assert procedures.agreement(p[idx], 2 * p[idx] + 1, "pearson") == pytest.approx(1.0)
    assert procedures.agreement(p, a, "pearson") < 0.9  # Pearson is not rank-based: a check that it differs
    for m in ("spearman", "abs_spearman"):
        assert np.allclose(procedures.subset_distribution(p, a, 5, 300, 0, m), 1.0)


# --- subset_distribution ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [5, 6])
def test_null_mean_abs_spearman_matches_the_exact_expectation(k):
    """Independent predicted and actual values: the k-point rho is distribution-free, uniform over k! permutations.

    Reference: E|rho| and E[rho] = 0 by enumerating all k! rank permutations (E|rho| = 0.42 for k = 5, 0.3711 for
    k = 6). A random k-subset of n i.i.d. pairs is k i.i.d. pairs, so the mean over draws is unbiased for these
    values; the draws share a data set, so the standard error is taken over R independent data sets (the mean of
    each data set's draws), which includes the data-set-level variation.
    """
    exact = _exact_null_spearman(k)
    rng = np.random.default_rng(100 + k)
    R, draws = 300, 60
    abs_means, means = np.empty(R), np.empty(R)
    for i in range(R):
        p, a = rng.standard_cauchy(120), rng.standard_cauchy(120)  # heavy tails: a rank statistic must not care
        rho = procedures.subset_distribution(p, a, k, draws, seed=i, metric="spearman")
        abs_means[i] = procedures.subset_distribution(p, a, k, draws, seed=i, metric="abs_spearman").mean()
        means[i] = rho.mean()
        assert np.allclose(np.abs(rho), procedures.subset_distribution(p, a, k, draws, seed=i, metric="abs_spearman"))
    se_abs, se = abs_means.std(ddof=1) / np.sqrt(R), means.std(ddof=1) / np.sqrt(R)
    assert abs(abs_means.mean() - np.abs(exact).mean()) < Z * se_abs
    assert abs(means.mean() - exact.mean()) < Z * se and exact.mean() == pytest.approx(0.0, abs=1e-12)


def test_null_second_moment_of_spearman_is_one_over_k_minus_one():
    """E[rho^2] = Var(rho) = 1/(k-1) exactly under independence without ties (here k = 25: 1/24)."""
    k, R, draws = 25, 200, 50
    rng = np.random.default_rng(7)
    sq = np.array([(procedures.subset_distribution(rng.standard_normal(120), rng.standard_normal(120), k, draws,
                                                   seed=i) ** 2).mean() for i in range(R)])
    assert abs(sq.mean() - 1 / (k - 1)) < Z * sq.std(ddof=1) / np.sqrt(R)


def test_subsets_are_drawn_without_replacement():
    rng = np.random.default_rng(3)
    p, a = rng.standard_normal(30), rng.standard_normal(30)
    full = procedures.agreement(p, a)
    assert np.allclose(procedures.subset_distribution(p, a, 30, 50, 0), full)  # k = n: always the full set
    d = procedures.subset_distribution(p, a, 10, 500, 0)
    assert d.shape == (500,) and d.std() > 0.05
    assert np.array_equal(d, procedures.subset_distribution(p, a, 10, 500, 0))


# --- from records -----------------------------------------------------------------------------------------
def _record(depth, wd, seed, sign, n=20, roles=("highest", "median", "random")):
    rng = np.random.default_rng([depth, seed, int(wd * 1000)])
    tps = []
    for j, role in enumerate(roles):
        p = rng.standard_normal(n)
        tps.append({"role": role, "index": j, "predicted": p.tolist(), "actual": (sign * p ** 3).tolist()})
    return {"setting": {"depth": depth, "width": 5, "weight_decay": wd, "seed": seed}, "removed": list(range(n)),
            "test_points": tps}


def test_accuracy_table_rows_values_and_order_independence():
    recs = [_record(1, 0.0, 0, +1), _record(2, 0.0, 0, -1), {"setting": {}, "error": "failed"}]
    t = procedures.accuracy_table(recs, "spearman", "all")
    assert len(t) == 6 and list(t.columns[:5]) == ["depth", "width", "weight_decay", "seed", "role"]
    assert np.allclose(t[t.depth == 1].value, 1.0) and np.allclose(t[t.depth == 2].value, -1.0)
    assert np.allclose(procedures.accuracy_table(recs, "abs_spearman", "top_abs_influence", 5).value, 1.0)
    r1 = procedures.accuracy_table(recs[:2], "pearson", "random", 6, seed=1)
    r2 = procedures.accuracy_table(recs[1::-1], "pearson", "random", 6, seed=1)
    assert np.allclose(r1.sort_values(["depth", "point"]).value, r2.sort_values(["depth", "point"]).value)
    m = procedures.per_model(t, ["highest"])
    assert len(m) == 2 and (m.n_points == 1).all()
    with pytest.raises(ValueError, match="roles"):
        procedures.per_model(t, ["nonexistent"])
    with pytest.raises(ValueError, match="predicted"):
        procedures.accuracy_table([{"setting": {"depth": 1}, "test_points": [{"role": "x", "index": 0}]}])


def test_effects_recover_a_known_depth_slope_and_weight_decay_gain():
    import pandas as pd

    rng = np.random.default_rng(5)
    rows = [{"depth": d, "width": 5, "weight_decay": wd, "seed": s,
             "value": (0.8 - 0.05 * d if wd else 0.2) + 0.01 * rng.standard_normal()}
            for d in range(1, 9) for wd in (0.0, 0.005) for s in range(3)]
    rows += [{"depth": 1, "width": 20, "weight_decay": wd, "seed": s, "value": -0.5}  # a width sweep: not in the
             for wd in (0.0, 0.005) for s in range(3)]  # depth slope, in the paired difference (with gain 0)
    e = procedures.effects(pd.DataFrame(rows))
    deep = e["depth wd=0.005"]
    assert deep["verdict"] == "reproduced" and deep["lo"] < -0.05 < deep["hi"]
    assert e["depth wd=0"]["verdict"].startswith("not resolved")
    assert e["weight decay"]["verdict"] == "reproduced" and e["weight decay"]["n"] == 27
    flipped = pd.DataFrame(rows).assign(value=lambda f: -f.value)
    assert procedures.effects(flipped)["weight decay"]["verdict"] == "opposite"


# --- bad input --------------------------------------------------------------------------------------------
def test_bad_input_raises_naming_the_parameter():
    p, a = np.arange(5.0), np.arange(5.0)
    cases = [
        (lambda: procedures.select(p, "largest", 2), "rule"),
        (lambda: procedures.select(p, "top_abs_influence", 6), "k"),
        (lambda: procedures.select(p, "random", 0), "k"),
        (lambda: procedures.select(p, "random", 2.5), "k"),
        (lambda: procedures.select(p, "random"), "k"),
        (lambda: procedures.select(p, "all", 3), "k"),
        (lambda: procedures.select([1.0, np.nan], "all"), "predicted"),
        (lambda: procedures.agreement(p, a, "kendall"), "metric"),
        (lambda: procedures.agreement(p, a[:4]), "same length"),
        (lambda: procedures.agreement([1.0], [2.0]), "at least 2"),
        (lambda: procedures.agreement(p, [0, 1, np.inf, 3, 4]), "actual"),
        (lambda: procedures.subset_distribution(p, a, 1, 10), "k"),
        (lambda: procedures.subset_distribution(p, a, 6, 10), "k"),
        (lambda: procedures.subset_distribution(p, a, 3, 0), "n_draws"),
        (lambda: procedures.accuracy_table([], rule="top"), "rule"),
    ]
    for call, word in cases:
        with pytest.raises(ValueError, match=word):
            call()
