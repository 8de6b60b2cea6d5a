"""The claim table's statistics on synthetic records whose answer is known."""

import numpy as np
import pytest

from influence_lib.experiments import claims, report, rules

FINDINGS = {k: k for k in ("depth", "weight_decay", "width", "test_points", "stochastic", "imagenet")}


def _record(depth, width, wd, seed, rhos, lam_max=1.0, model="mlp", params="all", train_acc=0.97, grad_norm=1e-4,
            dataset="iris", n_removed=120, k=25):
    """A record whose test points carry stored correlations only (the first is the highest-loss point)."""
    tps = [{"index": i, "role": "highest" if i == 0 else "random",
            "all": {"spearman": r, "pearson": r}, f"top{k}_influence": {"spearman": r, "pearson": r}}
           for i, r in enumerate(rhos)]
    return {"setting": {"depth": depth, "width": width, "weight_decay": wd, "seed": seed, "model": model,
                        "params": params, "k": k},
            "spectrum": {"lambda_max": lam_max}, "dataset": {"name": dataset},
            "training": {"train_accuracy": train_acc, "grad_norm": grad_norm},
            "removed": list(range(n_removed)), "test_points": tps}


def test_slope_and_verdict():
    x = np.repeat(np.arange(1, 9), 3)
    rng = np.random.default_rng(0)
    est, lo, hi = report.slope_ci(x, 0.9 - 0.05 * x + 0.01 * rng.standard_normal(x.size))
    assert lo < -0.05 < hi and report.verdict(est, lo, hi, -1) == "reproduced"
    assert report.verdict(est, lo, hi, +1) == "opposite"
    assert report.verdict(0.01, -0.1, 0.2, -1).startswith("not resolved")
    assert report.verdict(0.3, np.nan, np.nan, 1).startswith("no interval")
    assert np.isnan(report.slope_ci([1, 1, 1], [0.1, 0.2, 0.3])[0])


def _iris(rng, seeds=3, collapse_deep=False):
    recs = []
    for seed in range(seeds):
        for depth in range(1, 9):
            for wd, base in ((0.0, 0.2), (0.005, 0.8)):
                rho = base - (0.05 * depth if wd else 0) + 0.01 * rng.standard_normal(2)
                dead = collapse_deep and wd and depth >= 7
                recs.append(_record(depth, 5, wd, seed, [0.99, 0.99] if dead else list(rho),
                                    lam_max=1e-6 if dead else 10.0 ** (0.2 * depth),
                                    train_acc=1 / 3 if dead else 0.97))
    return recs


def test_iris_claims_follow_the_records():
    recs = _iris(np.random.default_rng(1))
    c = claims.iris_depth(recs, FINDINGS)
    assert c.verdict == "reproduced" and c.lo < -0.05 < c.hi and c.direction == -1 and c.margin > 0
    assert c.n_excluded == 0 and c.excluded.startswith("none of 48") and c.provisional  # 3 of 10 seeds
    assert claims.iris_weight_decay(recs, FINDINGS).verdict == "reproduced"
    assert claims.hessian_top_eigenvalue(recs, "c").verdict == "reproduced"
    flipped = [_record(r["setting"]["depth"], 5, r["setting"]["weight_decay"], r["setting"]["seed"],
                       [-t["all"]["spearman"] for t in r["test_points"]]) for r in recs]
    assert claims.iris_weight_decay(flipped, FINDINGS).verdict == "opposite"
    assert claims.iris_depth([], FINDINGS).verdict == "no data"
    full = _iris(np.random.default_rng(1), seeds=rules.SEEDS["iris"])
    assert not claims.iris_depth(full, FINDINGS).provisional


def test_collapsed_models_are_excluded_counted_and_shown_as_sensitivity():
    recs = _iris(np.random.default_rng(2), collapse_deep=True)
    c = claims.iris_depth_all_points(recs, FINDINGS)
    assert c.verdict == "reproduced" and c.n_excluded == 6 and c.n_models == 42
    assert c.excluded.startswith("6 of 48 models excluded") and "not above chance" in c.excluded
    assert "all 48 models" in c.sensitivity  # with the dead models (r = 0.99 at depth 7-8) the slope is shallower
    h = claims.hessian_top_eigenvalue(recs, "c")
    assert h.verdict == "reproduced" and h.sensitivity_verdict != "reproduced"  # the dead models' tiny lambda_max


def test_absent_when_the_effect_is_shown_inside_the_margin():
    rng = np.random.default_rng(3)
    recs = [_record(d, 5, 0.005, s, [0.7 + 0.002 * rng.standard_normal()]) for d in range(1, 9) for s in range(5)]
    c = claims.iris_depth(recs, FINDINGS)
    assert c.verdict == "absent" and -c.margin < c.lo and c.hi < c.margin


def test_width_is_one_test_across_weight_decay_arms():
    rng = np.random.default_rng(4)
    recs = [_record(1, w, wd, s, [0.3 + 0.4 * wd / 0.005 + 0.05 * np.log2(w) + 0.01 * rng.standard_normal()])
            for w in (5, 10, 20, 40) for wd in (0.0, 0.005) for s in range(3)]
    c = claims.iris_width(recs, FINDINGS)
    assert c.verdict == "reproduced" and c.direction == 0 and c.lo < 0.05 < c.hi


def test_test_point_claim_uses_the_model_as_unit():
    rng = np.random.default_rng(5)
    effect = rng.uniform(-0.5, 0.9, 30)
    strong = [_record(1, 8, 0.001, s, list(effect + 0.02 * rng.standard_normal(30)), dataset="mnist-small",
                      n_removed=150) for s in range(3)]
    c = claims.test_point_dependence(strong, FINDINGS)
    assert c.verdict == "reproduced" and c.n_models == 3
    sd = np.sqrt(1.06 / 147)  # only the sampling noise of a Spearman correlation over 150 points
    noise_only = [_record(1, 8, 0.001, s, list(np.tanh(np.arctanh(0.5) + sd * rng.standard_normal(30))),
                          dataset="mnist-small", n_removed=150) for s in range(3)]
    assert claims.test_point_dependence(noise_only, FINDINGS).verdict in ("absent", "not resolved")


def _mnist(depth, wd, seed, lissa_drop, rng):
    r = _record(depth, 4, wd, seed, list(0.6 + 0.02 * rng.standard_normal(3)), dataset="mnist-small", k=15)
    for tp in r["test_points"]:
        tp["estimators"] = {"lissa": {"relative_error": 0.5,
                                      "vs_loo": {"spearman": tp["all"]["spearman"] - lissa_drop * depth}}}
    return r


def test_lissa_claims_pair_within_models():
    rng = np.random.default_rng(6)
    recs = [_mnist(d, wd, s, 0.1, rng) for d in (1, 2, 3) for wd in (0.0, 0.001) for s in range(3)]
    assert claims.stochastic_estimation(recs, FINDINGS).verdict == "reproduced"
    c = claims.stochastic_depth(recs, FINDINGS)
    assert c.verdict == "reproduced" and c.n_models == 18  # the drop grows with depth
    same = [_mnist(d, 0.001, s, 0.0, rng) for d in (1, 2, 3) for s in range(5)]
    assert claims.stochastic_estimation(same, FINDINGS).verdict == "absent"


def test_a_model_on_which_lissa_failed_counts_as_run_and_is_named():
    """rules.py: an estimator's refusal is a result about the estimator, not a missing seed. A sweep of 5 seeds in
    which LiSSA diverged on one model is not provisional; the failure is counted in the measured text."""
    rng = np.random.default_rng(8)
    recs = [_mnist(d, 0.001, s, 0.1, rng) for d in (1, 2) for s in range(5)]
    for r in recs:
        r["setting"]["methods"] = ["exact", "lissa"]
    for tp in recs[3]["test_points"]:
        del tp["estimators"]["lissa"]  # diverged: the record keeps the error, the test points no scores
    c = claims.stochastic_estimation(recs, FINDINGS)
    assert not c.provisional and c.seeds == 5
    assert "failed (diverged) on 1 of 10 models" in c.measured and c.n_models == 9


def test_cnn_claim_needs_depths_and_stationary_models():
    rng = np.random.default_rng(7)
    one_depth = [_record(2, 4, 0.001, s, [0.5, 0.6], model=m, params="last", dataset="fashion-mnist", k=8)
                 for m in ("vgg", "resnet") for s in range(3)]
    for r in one_depth:
        r["dataset"]["name"] = "fashion-mnist"
    c = claims.deeper_networks(one_depth, FINDINGS)
    assert c.verdict == "no data" and "not testable" in c.measured
    depths = [_record(d, 4, 0.001, s, list(0.9 - 0.2 * d + 0.01 * rng.standard_normal(2)), model=m, params="last",
                      dataset="fashion-mnist", k=8) for m in ("vgg", "resnet") for d in (1, 2, 3) for s in range(3)]
    assert claims.deeper_networks(depths, FINDINGS).verdict == "reproduced"
    moving = [{**r, "training": {"train_accuracy": 0.9, "grad_norm": 5.0}} for r in depths]
    c = claims.deeper_networks(moving, FINDINGS)
    assert c.verdict == "no data" and "no healthy model" in c.measured and "18 not stationary" in c.excluded
    assert c.sensitivity_verdict == "reproduced"


def test_claim_table_order_holm_and_text():
    rng = np.random.default_rng(8)
    table = claims.claim_table(_iris(rng), [], [], [], [], FINDINGS, "hessian claim")
    assert [c.key for c in table] == list(rules.FAMILY)
    assert table[0].verdict == "reproduced" and np.isfinite(table[0].p_holm) and table[0].p_holm >= table[0].p_zero
    assert table[2].verdict == "no data" and not np.isfinite(table[2].p_holm)
    for c in table:
        assert "|" not in c.measured + c.excluded + c.sensitivity + c.note  # the intro's Markdown table
        assert c.verdict in ("reproduced", "opposite", "absent", "not resolved", "no data")
    fig = claims.effect_figure(table)
    assert len(fig.axes[0].get_yticklabels()) == len(table)


def test_holm_can_overturn_a_borderline_verdict():
    import dataclasses

    from influence_lib.experiments import stats

    border = stats.mean_effect([0.1, 0.2, 0.05, 0.15, 0.0, 0.12])
    weak = stats.mean_effect([0.1, -0.2, 0.05, 0.3, -0.1])
    base = claims.Claim("f", "p", "iris", "m", "reproduced", direction=+1, margin=0.01, effect=border,
                        estimate=border.estimate, lo=border.lo, hi=border.hi, p_zero=border.p_zero,
                        p_equivalence=border.p_equivalence(0.01))
    others = [dataclasses.replace(base, verdict="not resolved", effect=weak, p_zero=weak.p_zero,
                                  p_equivalence=weak.p_equivalence(0.01)) for _ in range(4)]
    assert claims.with_holm([base])[0].verdict == "reproduced"
    out = claims.with_holm([base, *others])
    assert out[0].verdict == "not resolved" and out[0].p_holm > 0.05


def _pbrf_record(seed, pbrf_noise, loo_noise, diverged=()):
    """Gauss-Newton scores g; the PBRF follows g up to ``pbrf_noise``, LOO up to ``loo_noise``."""
    rng = np.random.default_rng(seed)
    tps = []
    for i in range(3):
        g = rng.standard_normal(40)
        pb = [None if j in diverged else float(v) for j, v in enumerate(g + pbrf_noise * rng.standard_normal(40))]
        tps.append({"index": i, "actual": list(g + loo_noise * rng.standard_normal(40)), "pbrf": {"actual": pb},
                    "curvatures": {"gauss-newton": {"predicted": list(g)}}})
    return {"setting": {"seed": seed}, "test_points": tps}


def test_pbrf_claim_follows_the_records_and_skips_diverged_points():
    closer = [_pbrf_record(s, 0.1, 2.0, diverged=(0, 5)) for s in range(4)]
    c = claims.pbrf_question(closer, "claim")
    assert c.verdict == "reproduced" and c.chapter == "pbrf" and "4 models" in c.measured
    farther = [_pbrf_record(s, 2.0, 0.1) for s in range(4)]
    assert claims.pbrf_question(farther, "claim").verdict == "opposite"
    assert claims.pbrf_question([{"error": "x"}], "claim").verdict == "no data"


def _lds_record(exact, loo, alpha=0.5, cg_failed=False):
    methods = {"exact": {"mean": exact}, "cg": {"mean": None if cg_failed else exact}}
    return {"setting": {}, "lds": [{"alpha": alpha, "methods": methods}],
            "loo": {"methods": {"exact": {"spearman": [loo, None, loo]}}}}


def test_lds_summary_reports_means_counts_and_the_paired_difference():
    recs = [_lds_record(0.8, 0.5), _lds_record(0.7, 0.5, cg_failed=True), _lds_record(0.9, 0.5),
            _lds_record(0.1, 0.9, alpha=0.9)]  # another alpha: ignored
    c = claims.lds_summary(recs, "definition")
    assert "(3 healthy models)" in c.measured and "exact 0.80," in c.measured and "cg 0.85 (2 models)" in c.measured
    assert "0.30 [" in c.measured and c.verdict == "measured"  # 0.8 - 0.5 on average
    assert claims.lds_summary([], "definition").verdict == "no data"


def _procedure_record(depth, seed, top_noise):
    """120 removed points, predicted = 1..120; the actual changes agree everywhere except among the top 25 by
    |predicted|, which are shuffled with probability ``top_noise`` (so only a top-25 validation sees it)."""
    rng = np.random.default_rng(100 * depth + seed)
    pred = np.arange(1.0, 121.0)
    act = pred + 25 * rng.standard_normal(120)  # all-120 agreement varies from seed to seed
    top = np.arange(95, 120)
    mix = rng.random(25) < top_noise
    act[top] = pred[top] + 2 * rng.standard_normal(25)
    act[top[mix]] = 95 + 25 * rng.random(int(mix.sum()))  # shuffled among themselves: the all-120 ranks barely move
    tp = {"role": "highest", "index": 0, "predicted": list(pred), "actual": list(act)}
    return {"setting": {"depth": depth, "width": 5, "weight_decay": 0.005, "seed": seed}, "removed": list(range(120)),
            "test_points": [tp]}


def test_validation_claim_shows_when_the_depth_verdict_depends_on_the_procedure():
    recs = [_procedure_record(d, s, top_noise=(d - 1) / 7) for d in range(1, 9) for s in range(3)]
    c = claims.validation_procedure(recs, "claim")
    assert c.chapter == "validation" and "top 25 by absolute influence" in c.measured
    every, top = c.measured.split(" — ")[1].split("; ")
    assert top.endswith("(reproduced)")  # the top-25 correlation falls with depth ...
    assert not every.endswith("(reproduced)")  # ... the all-point one does not show a trend
    assert c.verdict == "depends on the procedure"
    flat = [_procedure_record(d, s, top_noise=0.0) for d in range(1, 9) for s in range(3)]
    assert claims.validation_procedure(flat, "claim").verdict in ("not resolved", "absent")
    assert claims.validation_procedure([], "claim").verdict == "no data"


def test_lissa_decomposition_splits_the_change_into_truncation_and_sampling():
    """Per model: truncation = full batch - exact, sampling = mini-batch - full batch, and they add up to the total;
    a model without the full-batch estimator is left out."""
    recs = []
    for seed, (exact, full, mini) in enumerate([(0.9, 0.5, 0.45), (0.8, 0.6, 0.65), (0.7, 0.7, 0.2)]):
        r = _record(1, 4, 0.001, seed, [exact, exact], dataset="mnist-small")
        for tp in r["test_points"]:
            tp["estimators"] = {"lissa": {"vs_loo": {"spearman": mini}, "relative_error": 0.9},
                                "lissa-truncated": {"vs_loo": {"spearman": full}, "relative_error": 0.8}}
        r["methods"] = {"exact": {}, "lissa": {}, "lissa-truncated": {"truncation_factor": 0.94, "n_divergent": 0}}
        recs.append(r)
    plain = _record(2, 4, 0.001, 9, [0.5, 0.5], dataset="mnist-small")
    plain["methods"] = {"exact": {}, "lissa": {}}
    d = claims.lissa_decomposition([*recs, plain])
    assert len(d) == 3 and list(d.seed) == [0, 1, 2]
    np.testing.assert_allclose(d.truncation, [0.5 - 0.9, 0.6 - 0.8, 0.0], atol=1e-12)
    np.testing.assert_allclose(d.sampling, [0.45 - 0.5, 0.65 - 0.6, 0.2 - 0.7], atol=1e-12)
    np.testing.assert_allclose(d.truncation + d.sampling, d.total, atol=1e-12)
    assert (d.truncation_factor == 0.94).all() and (d.rel_err_full_batch == 0.8).all()


def test_lissa_decomposition_total_is_the_lissa_claims_paired_difference():
    """Both pair the test points: one where the exact correlation is undefined (a constant LOO vector) is left out
    of the decomposition's three means as it is out of the claim's difference, so the total equals that difference."""
    r = _record(1, 4, 0.001, 0, [0.9, 0.3], dataset="mnist-small")
    r["test_points"][1]["all"]["spearman"] = None
    for tp, (full, mini) in zip(r["test_points"], [(0.6, 0.5), (0.2, 0.1)], strict=True):
        tp["estimators"] = {"lissa": {"vs_loo": {"spearman": mini}, "relative_error": 0.9},
                            "lissa-truncated": {"vs_loo": {"spearman": full}, "relative_error": 0.8}}
    r["methods"] = {"exact": {}, "lissa": {}, "lissa-truncated": {"truncation_factor": 0.9, "n_divergent": 0}}
    d = claims.lissa_decomposition([r])
    diff = claims._lissa_differences([r], "lissa")
    assert d.total.iloc[0] == pytest.approx(diff["diff"].iloc[0]) == pytest.approx(0.5 - 0.9)
    assert d.truncation.iloc[0] == pytest.approx(0.6 - 0.9)


def test_claim_box_carries_the_verdict_and_its_basis():
    recs = _iris(np.random.default_rng(1))
    c = claims.iris_depth(recs, FINDINGS)
    box = claims.claim_box(c, "their protocol", "ours", "the differences")
    assert box.startswith("```{admonition} Verdict (") and box.rstrip().endswith("```")
    for text in (c.verdict, c.statistic, "their protocol", "the differences", "Holm", c.excluded):
        assert text in box
    assert "The paper's protocol" not in claims.claim_box(c)  # the protocol is optional (one box per chapter)


def test_fmt_ci_clips_an_interval_to_the_range_of_its_statistic():
    assert report.fmt_ci(0.98, 0.94, 1.01, bounds=(-1.0, 1.0)) == "0.98 [0.94, 1.00]"
    assert report.fmt_ci(0.05, -0.02, 0.1, bounds=(0.0, 1.0)) == "0.05 [0.00, 0.10]"
    assert report.fmt_ci(0.98, 0.94, 1.01) == "0.98 [0.94, 1.01]"  # no bounds: unchanged
    assert report.fmt_ci(0.5, float("nan"), float("nan"), bounds=(-1.0, 1.0)) == "0.50 (no interval)"


def test_two_ground_truths_table_follows_the_records():
    """The optimiser error is median |warm - Newton| / median |Newton| over the converged removals; a removal whose
    Newton retraining did not converge (None) is left out; the model is the unit."""
    from influence_lib.experiments.report import two_ground_truths

    def rec(seed, warm, newton):
        tp = {"actual": warm, "all": {"spearman": 0.5}, "newton": {"actual": newton, "all": {"spearman": 0.25},
                                                                  "vs_warm_start": {"spearman": 0.75}}}
        return {"setting": {"depth": 1, "seed": seed}, "test_points": [tp], "health": {"healthy": True},
                "training": {"grad_norm": 1e-11, "train_accuracy": 1.0}, "dataset": {"name": "iris"},
                "loo_newton": {"n_converged": sum(v is not None for v in newton), "converged": [v is not None
                                                                                           for v in newton]}}

    recs = [rec(0, [1.0, 2.0, 4.0], [1.0, 1.0, None]), rec(1, [2.0, 2.0, 2.0], [1.0, 1.0, 1.0])]
    table, sentence = two_ground_truths(recs)
    assert table.loc[1, "models"] == 2
    # per model: seed 0 -> median(|0|, |1|) / median(1, 1) = 0.5; seed 1 -> 1.0; mean 0.75
    assert table.loc[1, "optimiser error"].startswith("0.750")
    assert table.loc[1, "influence vs Newton"].startswith("0.250")
    assert "5 of 6 leave-one-out models" in sentence and "1.0e-11" in sentence
    assert two_ground_truths([{"error": "boom", "setting": {}}])[0] is None
