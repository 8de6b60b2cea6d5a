"""The claim table's statistics on synthetic records whose answer is known."""

import numpy as np

from influence_lib import claims, report

FINDINGS = {k: k for k in ("depth", "weight_decay", "width", "test_points", "stochastic", "imagenet")}


def _record(depth, width, wd, seed, rhos, lam_max=1.0, model="mlp", params="all"):
    return {"setting": {"depth": depth, "width": width, "weight_decay": wd, "seed": seed, "model": model,
                        "params": params},
            "spectrum": {"lambda_max": lam_max}, "dataset": {"name": "synthetic"},
            "test_points": [{"index": i, "all": {"spearman": r, "pearson": r}} for i, r in enumerate(rhos)]}


def test_slope_and_verdict():
    x = np.repeat(np.arange(1, 9), 3)
    rng = np.random.default_rng(0)
    est, lo, hi = report.slope_ci(x, 0.9 - 0.05 * x + 0.01 * rng.standard_normal(x.size))
    assert lo < -0.05 < hi and report.verdict(est, lo, hi, -1) == "reproduced"
    assert report.verdict(est, lo, hi, +1) == "opposite"
    assert report.verdict(0.01, -0.1, 0.2, -1).startswith("not resolved")
    assert report.verdict(0.3, np.nan, np.nan, 1).startswith("no interval")
    assert np.isnan(report.slope_ci([1, 1, 1], [0.1, 0.2, 0.3])[0])


def test_iris_claims_follow_the_records():
    rng = np.random.default_rng(1)
    recs = []
    for seed in range(3):
        for depth in range(1, 9):
            for wd, base in ((0.0, 0.2), (0.005, 0.8)):
                rho = base - (0.05 * depth if wd else 0) + 0.01 * rng.standard_normal(2)
                recs.append(_record(depth, 5, wd, seed, list(rho), lam_max=10.0 ** (0.2 * depth)))
    assert claims.iris_depth(recs, FINDINGS).verdict == "reproduced"
    assert claims.iris_weight_decay(recs, FINDINGS).verdict == "reproduced"
    assert claims.hessian_top_eigenvalue(recs, "c").verdict == "reproduced"
    flipped = [_record(r["setting"]["depth"], 5, r["setting"]["weight_decay"], r["setting"]["seed"],
                       [-t["all"]["spearman"] for t in r["test_points"]]) for r in recs]
    assert claims.iris_weight_decay(flipped, FINDINGS).verdict == "opposite"
    assert claims.iris_depth([], FINDINGS).verdict == "no data"


def test_test_point_anova_detects_a_point_effect_and_only_then():
    rng = np.random.default_rng(2)
    effect = rng.uniform(-0.5, 0.9, 30)
    strong = [_record(1, 8, 0.001, s, list(effect + 0.02 * rng.standard_normal(30))) for s in range(2)]
    assert claims.test_point_dependence(strong, FINDINGS).verdict == "reproduced"
    noise_only = [_record(1, 8, 0.001, s, list(0.5 + 0.1 * rng.standard_normal(30))) for s in range(2)]
    assert claims.test_point_dependence(noise_only, FINDINGS).verdict.startswith("not resolved")
