"""The linear datamodeling score: random subsets, batched subset retraining, the additive model and the score.

Exact references: the closed-form ridge refit on any weighted subset, the first derivative of that refit (the
additive model's sign and scale), a model whose test loss is a monotone function of a quantity that is exactly
additive in the removed points (LDS = 1), scipy's Spearman, and a plain sequential torch.optim loop.
"""

import copy
import hashlib
import importlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import make_classification, make_mlp
from scipy import stats
from torch import nn

import influence_lib as il
from influence_lib import experiments as sweep
from influence_lib.experiments import run_lds as R
from influence_lib.experiments.settings import normalize_setting
from influence_lib.retrain import initial_params

# the module itself (robust even if the package exports a function named `lds` that shadows the attribute)
L = importlib.import_module("influence_lib.lds")
WD = 0.1


# --------------------------------------------------------------------------- #
# ridge regression: nn.Linear + MSE + weight decay, closed form on any weighted subset
# --------------------------------------------------------------------------- #
def ridge_data(n=30, d=3, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, 1, generator=g, dtype=torch.float64)
    y = X @ w + 0.5 + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    Xt = torch.randn(m, d, generator=g, dtype=torch.float64)
    yt = Xt @ w + 0.5 + 0.3 * torch.randn(m, 1, generator=g, dtype=torch.float64)
    return (X, y), (Xt, yt)


def ridge_solution(X, y, weights, wd, denom=None):
    """argmin sum_i w_i (x_i^T a + b - y_i)^2 / denom + (wd/2)(|a|^2 + b^2); denom = sum w (default). [d + 1]."""
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)  # parameter order: weight, then bias
    w = weights.to(X.dtype)
    denom = w.sum() if denom is None else denom
    A = (2 / denom) * Xa.T @ (w[:, None] * Xa) + wd * torch.eye(Xa.shape[1], dtype=X.dtype)
    return torch.linalg.solve(A, (2 / denom) * Xa.T @ (w[:, None] * y)).squeeze(1)


def ridge_test_losses(theta, Xt, yt):
    return ((Xt @ theta[:-1] + theta[-1]) - yt.squeeze(1)) ** 2


def ridge_model(theta):
    model = nn.Linear(len(theta) - 1, 1).double()
    il.set_flat_params(model, theta)
    return model


@pytest.mark.parametrize("normalization", ["remaining", "full"])
@pytest.mark.parametrize("warm_start", [True, False])
def test_subset_retrain_equals_the_closed_form_ridge_refit(normalization, warm_start):
    (X, y), (Xt, yt) = ridge_data()
    n = len(X)
    theta_star = ridge_solution(X, y, torch.ones(n), WD)
    model = ridge_model(theta_star)
    masks = L.sample_subsets(n, 0.5, 6, seed=1)
    res = L.retrain_subsets(model, F.mse_loss, (X, y), (Xt, yt), masks, weight_decay=WD, optimizer="sgd", lr=0.3,
                            momentum=0.3, steps=300, warm_start=warm_start, seed=3, normalization=normalization,
                            progress=False)
    denom = None if normalization == "remaining" else float(n)
    expected = torch.stack([ridge_solution(X, y, mk, WD, denom) for mk in masks])
    assert (expected - theta_star).norm(dim=1).min() > 1e-2  # the subsets do move the solution
    torch.testing.assert_close(res.theta, expected, rtol=0, atol=1e-10)
    exp_losses = torch.stack([ridge_test_losses(t, Xt, yt) for t in expected])
    torch.testing.assert_close(res.test_losses, exp_losses, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.ref_theta, theta_star, rtol=0, atol=1e-10)  # the reference: all points kept
    torch.testing.assert_close(res.loss_change, exp_losses - ridge_test_losses(theta_star, Xt, yt), rtol=0,
                               atol=1e-10)
    assert float(res.grad_norms.max()) < 1e-9 and res.ref_grad_norm < 1e-9  # each model minimised its own objective
    plain = L.subset_retrain(model, F.mse_loss, (X, y), (Xt, yt), masks, weight_decay=WD, optimizer="sgd", lr=0.3,
                             momentum=0.3, steps=300, warm_start=warm_start, seed=3, normalization=normalization,
                             progress=False)
    assert plain.shape == (6, len(Xt))
    torch.testing.assert_close(plain, res.test_losses, rtol=0, atol=0)


def test_group_prediction_is_the_first_order_effect_of_removing_the_complement():
    """Sign and scale of the additive model: d/d(eps) L_t(theta(w = 1 - eps 1_R)) at 0 = sum_{i in R} score_ti.

    Influence functions linearise the objective (1/n) sum_i w_i L_i + (wd/2)|theta|^2 in the weights; its exact
    minimiser theta(w) is the ridge closed form with denominator n, differentiated here by central differences.
    """
    (X, y), (Xt, yt) = ridge_data(seed=4)
    n = len(X)
    theta_star = ridge_solution(X, y, torch.ones(n), WD)
    scores = il.influence(ridge_model(theta_star), F.mse_loss, (X, y), (Xt, yt), weight_decay=WD, method="exact")
    masks = L.sample_subsets(n, 0.5, 8, seed=5)
    pred = L.group_predictions(scores, masks)  # [T, S]
    assert pred.shape == (len(Xt), 8)
    eps = 1e-4
    for k, mk in enumerate(masks):
        drop = (~mk).double()
        up = ridge_test_losses(ridge_solution(X, y, 1 - eps * drop, WD, float(n)), Xt, yt)
        down = ridge_test_losses(ridge_solution(X, y, 1 + eps * drop, WD, float(n)), Xt, yt)
        derivative = ((up - down) / (2 * eps)).numpy()
        np.testing.assert_allclose(pred[:, k], derivative, rtol=1e-6, atol=1e-12)
        manual = np.array([sum(float(scores[t, i]) for i in range(n) if not mk[i]) for t in range(len(Xt))])
        np.testing.assert_allclose(pred[:, k], manual, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- #
# a deliberately additive case: LDS of the exact influence is exactly 1
# --------------------------------------------------------------------------- #
@pytest.fixture
def additive_case():
    """A constant input (x = 1) fitted by nn.Linear(1, 1) with MSE and weight decay.

    The prediction is f = w + b. For a subset S of fixed size m the refit is w = b = 2 mean_S(y) / (4 + wd), so
    f_S = 4 (sum(y) - sum_{i not in S} y_i) / (m (4 + wd)): exactly affine (decreasing) in the sum of the removed
    targets. Test targets lie outside the range of every possible f_S, so each test loss (f_S - y_t)^2 is a strictly
    monotone function of that sum. The exact influence of point i is proportional to (y_i - f*) with the sign of
    (y_t - f*), so the additive prediction is affine in the same sum with the same direction: ranks agree exactly.
    """
    g = torch.Generator().manual_seed(7)
    n = 40
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    X = torch.ones(n, 1, dtype=torch.float64)
    top = float(y.abs().max())
    yt = torch.tensor([[top + 1.0], [top + 3.0], [-top - 0.5], [-top - 2.0]], dtype=torch.float64)
    Xt = torch.ones(len(yt), 1, dtype=torch.float64)
    theta_star = ridge_solution(X, y, torch.ones(n), WD)
    model = ridge_model(theta_star)
    scores = il.influence(model, F.mse_loss, (X, y), (Xt, yt), weight_decay=WD, method="exact")
    masks = L.sample_subsets(n, 0.5, 60, seed=8)
    actual = L.subset_retrain(model, F.mse_loss, (X, y), (Xt, yt), masks, weight_decay=WD, optimizer="sgd", lr=0.2,
                              steps=300, progress=False)
    return scores, masks, actual, (X, y, Xt, yt)


def test_lds_is_one_where_the_test_loss_is_exactly_additive(additive_case):
    scores, masks, actual, (X, y, Xt, yt) = additive_case
    m = int(masks[0].sum())
    # the retrained outputs are the closed form, and the closed form is what the docstring says
    f_S = 4 * torch.stack([y[mk].sum() for mk in masks]) / (m * (4 + WD))
    torch.testing.assert_close(actual, (f_S[:, None] - yt.squeeze(1)[None, :]) ** 2, rtol=0, atol=1e-12)
    res = L.lds(scores, masks, actual)
    pred = res.predicted
    gaps = np.diff(np.sort(pred, axis=1), axis=1)
    assert gaps.min() > 1e-6  # distinct predictions: the ranking is not decided by rounding
    for t in range(len(yt)):
        assert np.array_equal(np.argsort(pred[t]), np.argsort(actual[:, t].numpy()))
    assert res.per_test == pytest.approx([1.0] * 4, abs=1e-12)
    assert res.mean == pytest.approx(1.0, abs=1e-12) and res.n_undefined == 0 and res.n_defined == 4
    neg = L.lds(-scores, masks, actual)
    assert neg.per_test == pytest.approx([-1.0] * 4, abs=1e-12) and neg.mean == pytest.approx(-1.0, abs=1e-12)


def test_lds_of_random_scores_is_near_zero(additive_case):
    """Scores independent of the outcome: LDS(-tau) = -LDS(tau) exactly, so its mean over random tau is 0.

    (Its spread is not the textbook 1/sqrt(S - 1): with S = 60 subsets of n = 40 points, predicted and actual both lie
    in the n-dimensional span of the masks, so the null correlation is that of random directions there.)
    """
    scores, masks, actual, _ = additive_case
    rng = np.random.default_rng(0)
    draws = [rng.normal(size=tuple(scores.shape)) for _ in range(400)]
    vals = np.array([L.lds(tau, masks, actual).per_test for tau in draws])  # [400, T]
    flipped = np.array([L.lds(-tau, masks, actual).per_test for tau in draws[:20]])
    np.testing.assert_allclose(flipped, -vals[:20], rtol=0, atol=1e-12)
    for t in range(vals.shape[1]):
        se = vals[:, t].std(ddof=1) / math.sqrt(len(vals))
        assert abs(vals[:, t].mean()) < 4 * se
        assert abs(vals[:, t].mean()) < 0.05
    assert 0.05 < vals.std() < 0.5  # random scores do produce correlations of either sign, just no systematic one


# --------------------------------------------------------------------------- #
# the score itself: ties, undefined values, scipy
# --------------------------------------------------------------------------- #
def test_lds_matches_scipy_with_ties_and_reports_undefined_values():
    rng = np.random.default_rng(1)
    n, S, T = 12, 30, 3
    masks = L.sample_subsets(n, 0.5, S, seed=2).numpy()
    scores = np.round(rng.normal(size=(T, n)), 1)
    actual = np.round(rng.normal(size=(S, T)), 0)  # many ties
    actual[:, 2] = 0.7  # constant across subsets: undefined
    res = L.lds(scores, masks, actual)
    pred = scores @ (~masks).T
    for t in range(2):
        assert res.per_test[t] == pytest.approx(stats.spearmanr(pred[t], actual[:, t])[0], abs=1e-12)
    assert math.isnan(res.per_test[2])
    assert res.n_defined == 2 and res.n_undefined == 1
    assert res.mean == pytest.approx(np.mean(res.per_test[:2]), abs=1e-15)
    summary = res.summary()
    assert summary["per_test"][2] is None and summary["n_undefined"] == 1
    json.dumps(summary, allow_nan=False)  # records hold no NaN
    zero = L.lds(np.zeros((T, n)), masks, actual)  # constant predictions: every value undefined
    assert zero.n_undefined == T and math.isnan(zero.mean) and zero.summary()["mean"] is None


# --------------------------------------------------------------------------- #
# batched retraining against a sequential torch.optim loop
# --------------------------------------------------------------------------- #
def sequential_subsets(model, X, y, Xt, yt, masks, *, wd, optimizer, lr, steps, momentum=0.0, start=None):
    """What a user writes by hand: copy the model, keep the subset, train with torch.optim, measure."""
    out = []
    for mk in masks:
        m = copy.deepcopy(model)
        if start is not None:
            il.set_flat_params(m, start)
        opt = (torch.optim.Adam(m.parameters(), lr=lr) if optimizer == "adam"
               else torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum))
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(m(X[mk]), y[mk]) + 0.5 * wd * sum((p * p).sum() for p in m.parameters())
            loss.backward()
            opt.step()
        with torch.no_grad():
            out.append(F.cross_entropy(m(Xt), yt, reduction="none"))
    return torch.stack(out)


@pytest.fixture
def mlp_setup():
    model = make_mlp(in_dim=3, width=5, depth=2, seed=11)
    X, y = make_classification(n=24, seed=11)
    Xt, yt = make_classification(n=5, seed=12)
    return model, (X, y), (Xt, yt)


@pytest.mark.parametrize("optimizer,lr,momentum,warm_start", [("adam", 0.01, 0.0, True), ("sgd", 0.2, 0.9, True),
                                                               ("adam", 0.01, 0.0, False)])
def test_batched_subset_retraining_equals_the_sequential_loop(mlp_setup, optimizer, lr, momentum, warm_start):
    model, (X, y), (Xt, yt) = mlp_setup
    masks = L.sample_subsets(len(X), 0.5, 5, seed=4)
    start = None if warm_start else initial_params(model, 9)
    expected = sequential_subsets(model, X, y, Xt, yt, masks, wd=0.01, optimizer=optimizer, lr=lr, steps=120,
                                  momentum=momentum, start=start)
    got = L.subset_retrain(model, F.cross_entropy, (X, y), (Xt, yt), masks, weight_decay=0.01, optimizer=optimizer,
                           lr=lr, momentum=momentum, steps=120, warm_start=warm_start, seed=9, progress=False)
    assert (expected - expected.mean(0)).abs().max() > 1e-3  # the subsets give different models
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("batch_size", [None, 5])
def test_chunk_size_does_not_change_subset_results(mlp_setup, batch_size):
    model, train, test = mlp_setup
    masks = L.sample_subsets(len(train[0]), 0.5, 7, seed=5)
    kw = dict(weight_decay=0.01, lr=0.01, steps=40, batch_size=batch_size, seed=2, progress=False)
    a = L.retrain_subsets(model, F.cross_entropy, train, test, masks, **kw)
    b = L.retrain_subsets(model, F.cross_entropy, train, test, masks, chunk_size=3, **kw)
    c = L.retrain_subsets(model, F.cross_entropy, train, test, masks, chunk_size=1, **kw)
    for r in (b, c):
        torch.testing.assert_close(r.test_losses, a.test_losses, rtol=0, atol=1e-10)
        torch.testing.assert_close(r.ref_losses, a.ref_losses, rtol=0, atol=1e-10)
    assert torch.equal(L.retrain_subsets(model, F.cross_entropy, train, test, masks, **kw).test_losses,
                       a.test_losses)


# --------------------------------------------------------------------------- #
# random subsets
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n,alpha,size", [(50, 0.5, 25), (120, 0.9, 108), (7, 0.5, 4), (10, 0.25, 2), (3, 0.5, 2)])
def test_sample_subsets_have_the_exact_size(n, alpha, size):
    masks = L.sample_subsets(n, alpha, 40, seed=0)
    assert masks.dtype == torch.bool and masks.shape == (40, n)
    assert masks.sum(1).tolist() == [size] * 40
    assert L.subset_size(n, alpha) == size == round(alpha * n)


def test_sample_subsets_are_seeded_uniform_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = L.sample_subsets(20, 0.5, 4000, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(a, L.sample_subsets(20, 0.5, 4000, seed=3))
    assert not torch.equal(a, L.sample_subsets(20, 0.5, 4000, seed=4))
    assert len({tuple(r.tolist()) for r in a[:50]}) == 50  # rows are different subsets
    freq = a.double().mean(0)  # every point is kept with probability alpha; sd sqrt(0.25 / 4000) = 0.008
    assert (freq - 0.5).abs().max() < 0.04


# --------------------------------------------------------------------------- #
# bad input fails early, naming the parameter
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_bad_alpha_is_rejected(alpha):
    with pytest.raises(ValueError, match="alpha"):
        L.sample_subsets(10, alpha, 5, seed=0)


def test_bad_subset_arguments_are_rejected():
    with pytest.raises(ValueError, match="alpha"):
        L.sample_subsets(3, 0.1, 5, seed=0)  # round(0.3) = 0 points kept
    with pytest.raises(ValueError, match="alpha"):
        L.sample_subsets(3, 0.9, 5, seed=0)  # round(2.7) = 3 = every point
    with pytest.raises(ValueError, match="n_subsets"):
        L.sample_subsets(10, 0.5, 0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        L.sample_subsets(10, 0.5, 3, seed=-1)
    with pytest.raises(ValueError, match="n must"):
        L.sample_subsets(0, 0.5, 3, seed=0)


def test_bad_lds_inputs_are_rejected():
    masks = L.sample_subsets(10, 0.5, 6, seed=0)
    scores, actual = np.zeros((2, 10)), np.ones((6, 2))
    with pytest.raises(ValueError, match="scores must be a 2-D"):
        L.lds(np.zeros(10), masks, actual)
    with pytest.raises(ValueError, match="masks must have one column per training point"):
        L.lds(np.zeros((2, 11)), masks, actual)
    with pytest.raises(ValueError, match=r"actual must have shape \[n_subsets, n_test\] = \[6, 2\]"):
        L.lds(scores, masks, actual.T)
    bad = scores.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="scores contains 1 NaN or infinite"):
        L.lds(bad, masks, actual)
    bad_a = actual.copy()
    bad_a[0, 0] = np.inf
    with pytest.raises(ValueError, match="actual contains 1 NaN or infinite"):
        L.lds(scores, masks, bad_a)
    with pytest.raises(ValueError, match="masks must be boolean"):
        L.lds(scores, masks.long() * 2, actual)
    empty = masks.clone()
    empty[4] = False
    with pytest.raises(ValueError, match=r"masks: subset\(s\) \[4\] keep no training point"):
        L.lds(scores, empty, actual)
    with pytest.raises(ValueError, match="at least 3"):
        L.lds(scores, masks[:2], actual[:2])
    with pytest.raises(ValueError, match="masks must have one column"):
        L.group_predictions(scores, masks[:, :9])


def test_bad_retraining_inputs_fail_before_any_training(mlp_setup, monkeypatch):
    model, train, test = mlp_setup

    def no_training(*a, **k):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(L, "fit_stacked", no_training)
    masks = L.sample_subsets(len(train[0]), 0.5, 4, seed=0)
    f = L.subset_retrain
    with pytest.raises(ValueError, match="masks must have one column per training point"):
        f(model, F.cross_entropy, train, test, masks[:, :-1], progress=False)
    empty = masks.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="keep no training point"):
        f(model, F.cross_entropy, train, test, empty, progress=False)
    with pytest.raises(ValueError, match="normalization"):
        f(model, F.cross_entropy, train, test, masks, normalization="mean", progress=False)
    with pytest.raises(ValueError, match="test"):
        f(model, F.cross_entropy, train, (test[0], test[1][:-1]), masks, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        f(model, F.cross_entropy, train, test, masks, batch_size=1000, progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        f(model, F.cross_entropy, train, test, masks, chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        f(model, F.cross_entropy, train, test, masks, optimizer="lbfgs", progress=False)


# --------------------------------------------------------------------------- #
# the sweep runner
# --------------------------------------------------------------------------- #
TINY_LDS = {"runner": "lds", "dataset": "iris", "depth": 1, "width": 3, "steps": 60, "weight_decay": 0.01,
            "damping": 1.0, "methods": ["exact", "cg"], "alphas": [0.5], "n_subsets": 6, "retrain_steps": 10,
            "loo_points": "all"}


def test_lds_settings_are_checked_early():
    with pytest.raises(ValueError, match="unknown key"):
        R.normalize_lds_setting({**TINY_LDS, "loo_steps": 3})
    with pytest.raises(ValueError, match="alpha"):
        R.normalize_lds_setting({**TINY_LDS, "alphas": [0.5, 1.0]})
    with pytest.raises(ValueError, match="n_subsets"):
        R.normalize_lds_setting({**TINY_LDS, "n_subsets": 2})
    with pytest.raises(ValueError, match="methods"):
        R.normalize_lds_setting({**TINY_LDS, "methods": ["newton"]})
    with pytest.raises(ValueError, match="loo_points"):
        R.normalize_lds_setting({**TINY_LDS, "loo_points": 2})
    with pytest.raises(ValueError, match="runner must be one of"):
        sweep.setting_key({**TINY_LDS, "runner": "other"})


def test_experiment_keys_are_unchanged_by_the_runner_dispatch():
    s = {"dataset": "iris", "depth": 2}
    blob = json.dumps(normalize_setting(s), sort_keys=True, default=str)
    assert sweep.setting_key(s) == hashlib.sha1(blob.encode()).hexdigest()[:16]


def test_lds_records_through_the_sweep(tmp_path):
    recs = sweep.run_grid("lds", sweep.expand(TINY_LDS, seeds=[0]), root=tmp_path, jobs=1, progress=False)
    (r,) = recs
    assert "error" not in r, r.get("error")
    assert r["setting"]["runner"] == "lds" and r["dataset"]["n_train"] == 120
    (e,) = r["lds"]
    assert e["subset_size"] == 60 and e["n_subsets"] == 6
    for m in ("exact", "cg"):
        me = e["methods"][m]
        assert me["n_defined"] + me["n_undefined"] == r["dataset"]["n_test"] == len(me["per_test"])
        assert all(v is None or -1 <= v <= 1 for v in me["per_test"])
    assert e["methods"]["cg"]["per_test"] == pytest.approx(e["methods"]["exact"]["per_test"], abs=1e-6)
    assert len(r["loo"]["removed"]) == 120 and "loo_oracle" in e
    frame = R.to_frame(recs)
    assert set(frame.method) == {"exact", "cg", "loo_oracle"}
    again = sweep.run_grid("lds", sweep.expand(TINY_LDS, seeds=[0]), root=tmp_path, jobs=1, progress=False)
    assert again == recs  # resumed from the record, not recomputed
