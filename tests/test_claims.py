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
    assert "(3 models)" in c.measured and "exact 0.80," in c.measured and "cg 0.85 (2 models)" in c.measured
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
    assert "not resolved" in every  # ... the all-point one does not resolve a trend
    assert c.verdict == "depends on the procedure"
    flat = [_procedure_record(d, s, top_noise=0.0) for d in range(1, 9) for s in range(3)]
    assert claims.validation_procedure(flat, "claim").verdict.startswith("not resolved")
    assert claims.validation_procedure([], "claim").verdict == "no data"
