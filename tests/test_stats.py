"""The statistics behind the verdicts (influence_lib.experiments.stats) on cases whose answer is known."""

import numpy as np
import pytest

from influence_lib.experiments import rules, stats


def test_fisher_z_interval_matches_the_textbook_case_and_stays_in_range():
    # r = 0.5 from n = 28 pairs: z = artanh(0.5) = 0.5493, se = 1/sqrt(25) = 0.2, z +- 1.96 * 0.2 -> tanh
    r, lo, hi = stats.correlation_ci(0.5, 28)
    assert r == 0.5
    assert lo == pytest.approx(np.tanh(np.arctanh(0.5) - 1.959964 * 0.2), abs=1e-6)
    assert hi == pytest.approx(np.tanh(np.arctanh(0.5) + 1.959964 * 0.2), abs=1e-6)
    assert lo == pytest.approx(0.156, abs=1e-3) and hi == pytest.approx(0.736, abs=1e-3)
    _, lo_s, hi_s = stats.correlation_ci(0.5, 28, spearman=True)  # Spearman: a wider interval (1.06 / (n - 3))
    assert lo_s < lo and hi_s > hi
    for r in (0.999, -0.9999, 1.0, -1.0, 0.0):
        _, lo, hi = stats.correlation_ci(r, 5)
        assert -1 <= lo <= hi <= 1
    assert np.isnan(stats.correlation_ci(0.3, 3)[1])


def test_mean_correlation_is_a_fisher_z_mean_and_its_interval_never_leaves_the_range():
    m, n = stats.mean_correlation([0.2, None, np.nan, 0.6])
    assert n == 2 and m == pytest.approx(np.tanh((np.arctanh(0.2) + np.arctanh(0.6)) / 2))
    assert np.isnan(stats.mean_correlation([None, np.nan])[0])
    rng = np.random.default_rng(0)
    for _ in range(50):
        vals = np.tanh(rng.normal(rng.uniform(-3, 3), rng.uniform(0.01, 2), size=rng.integers(2, 6)))
        vals[rng.random(vals.size) < 0.2] = rng.choice([1.0, -1.0])  # exact +-1 included
        r, lo, hi, n = stats.mean_correlation_ci(vals)
        assert -1 <= lo <= r <= hi <= 1 and n == vals.size  # (+-1 only by floating-point rounding of tanh)


def test_mean_and_slope_effects_and_the_duality_of_p_values_and_intervals():
    rng = np.random.default_rng(1)
    for _ in range(30):
        e = stats.mean_effect(rng.normal(rng.normal(0, 0.1), 0.2, size=rng.integers(3, 12)))
        assert (e.p_zero < 0.05) == (e.lo > 0 or e.hi < 0)
        m = abs(rng.normal(0, 0.3))
        assert (e.p_equivalence(m) < 0.05) == (-m < e.lo and e.hi < m)
    x = np.repeat(np.arange(1.0, 7.0), 4)
    groups = np.tile([0, 1], 12)
    y = 0.9 - 0.05 * x + 0.5 * groups + 0.01 * rng.standard_normal(x.size)  # arms differ in level only
    with_arm = stats.slope_effect(x, y, groups=groups)
    assert with_arm.lo < -0.05 < with_arm.hi and with_arm.df == x.size - 3
    assert stats.slope_effect(x, y).se > 5 * with_arm.se  # ignoring the arm inflates the residuals
    assert not stats.slope_effect([1, 1, 1], [0.1, 0.2, 0.3]).defined  # one x value: no slope
    assert not stats.slope_effect([1, 2], [0.1, 0.2]).defined  # no residual degree of freedom: no interval
    assert not stats.mean_effect([0.3]).defined and stats.mean_effect([]).n == 0


def test_holm_against_a_hand_computed_example():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> running max 0.06
    adj = stats.holm([0.01, 0.04, 0.03, 0.005, np.nan])
    np.testing.assert_allclose(adj[:4], [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(adj[4])
    np.testing.assert_allclose(stats.holm([0.5, 0.9]), [1.0, 1.0])  # 0.5 * 2 caps at 1; monotone after
    np.testing.assert_allclose(stats.holm([0.01, 0.2]), [0.02, 0.2])
    assert np.isnan(stats.holm([np.nan])).all()


def test_the_four_verdicts_on_constructed_data():
    rng = np.random.default_rng(2)
    x = np.repeat(np.arange(1.0, 9.0), 5)
    clear = stats.slope_effect(x, 0.9 - 0.05 * x + 0.02 * rng.standard_normal(x.size))
    assert stats.decide(clear, -1, 0.02) == "reproduced"
    assert stats.decide(clear, +1, 0.02) == "opposite"
    assert stats.decide(clear, 0, 0.02) == "reproduced"  # any sign
    flat = stats.slope_effect(x, 0.7 + 0.002 * rng.standard_normal(x.size))
    assert -0.02 < flat.lo and flat.hi < 0.02 and stats.decide(flat, -1, 0.02) == "absent"
    few = stats.slope_effect([1, 2, 3, 4], [0.8, 0.3, 0.9, 0.4])
    assert stats.decide(few, -1, 0.02) == "not resolved"
    assert stats.decide(stats.NO_EFFECT, -1, 0.02) == "no data"
    # a family: the clear effect survives Holm among weak ones, a borderline one does not
    border = stats.mean_effect([0.1, 0.2, 0.05, 0.15, 0.0, 0.12])
    assert 0.005 < border.p_zero < 0.05 and stats.decide(border, +1, 0.01) == "reproduced"
    adj = stats.holm([border.p_zero, clear.p_zero, 0.4, 0.5, 0.6, 0.7])
    assert stats.decide(border, +1, 0.01, p_zero=adj[0]) == "not resolved"
    assert stats.decide(clear, -1, 0.02, p_zero=adj[1]) == "reproduced"
    with pytest.raises(ValueError, match="direction"):
        stats.decide(clear, 2, 0.02)


def _record(train_acc, predicted, dataset="iris", model="mlp", grad_norm=1e-4, health=None):
    r = {"setting": {"model": model, "seed": 0, "depth": 1},
         "dataset": {"name": dataset}, "training": {"train_accuracy": train_acc, "grad_norm": grad_norm},
         "test_points": [{"role": "highest", "predicted": list(p)} for p in predicted]}
    if health is not None:
        r["health"] = health
    return r


def test_health_of_detects_a_collapsed_model_and_passes_a_healthy_one():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 120)
    bias_only = [list(np.array([0.01, -0.02, 0.03])[labels] * s) for s in (1.0, 0.5)]  # one value per class
    collapsed = stats.health_of(_record(1 / 3, bias_only))
    assert not collapsed["healthy"] and collapsed["derived"]
    assert {stats.reason_key(x) for x in collapsed["reasons"]} == {"not above chance", "constant predictor"}
    constant = stats.health_of(_record(0.9, [[0.5] * 10, [0.1] * 10]))
    assert not constant["healthy"] and constant["constant_predictor"]
    healthy = stats.health_of(_record(0.97, [list(rng.standard_normal(120)) for _ in range(3)]))
    assert healthy["healthy"] and healthy["reasons"] == [] and healthy["chance_accuracy"] == pytest.approx(1 / 3)
    # a CNN far from a stationary point
    cnn = stats.health_of(_record(0.9, [list(rng.standard_normal(12))], "fashion-mnist", "vgg", grad_norm=5.0))
    assert not cnn["healthy"] and cnn["stationary"] is False and stats.reason_key(cnn["reasons"][0]) == "not stationary"
    lim = rules.GRAD_NORM_LIMIT["vgg"]
    assert stats.health_of(_record(0.9, [list(rng.standard_normal(12))], "fashion-mnist", "vgg", lim / 2))["healthy"]
    # a recorded health block is used as it is (and the CNN limit is applied where it was computed without one)
    block = {"healthy": False, "reasons": ["a hidden layer is entirely dead (zero for every training input)"],
             "stationary": None, "grad_norm": 0.01}
    h = stats.health_of(_record(0.99, [list(rng.standard_normal(120))], health=block))
    assert not h["healthy"] and not h["derived"] and stats.reason_key(h["reasons"][0]) == "dead hidden layer"
    ok_block = {"healthy": True, "reasons": [], "stationary": None, "grad_norm": 3.0}
    assert not stats.health_of(_record(0.99, [[0.0, 1.0]], "fashion-mnist", "resnet", health=ok_block))["healthy"]
    assert not stats.health_of(_record(0.99, [[0.0, 1.0]], health=ok_block))["healthy"]  # the MLP limit too
    settled = {**ok_block, "grad_norm": rules.GRAD_NORM_LIMIT["mlp"] / 2}
    assert stats.health_of(_record(0.99, [[0.0, 1.0]], health=settled))["healthy"]
    assert stats.health_of(_record(0.99, [[0.0, 1.0]], "iris", "linear", health=ok_block))["healthy"]  # no limit


def test_split_healthy_counts_exclusions_by_reason():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 120)
    good = [_record(0.97, [list(rng.standard_normal(120))]) for _ in range(3)]
    bad = [_record(1 / 3, [list(np.array([0.1, 0.2, 0.3])[labels])]) for _ in range(2)]
    healthy, excluded = stats.split_healthy(good + bad + [{"setting": {}, "error": "failed"}])
    assert len(healthy) == 3 and len(excluded) == 2
    text = stats.exclusion_summary(excluded, 5)
    assert text.startswith("2 of 5 models excluded") and "2 not above chance" in text and "2 constant" in text
    assert stats.exclusion_summary([], 4) == "none of 4 models excluded"
