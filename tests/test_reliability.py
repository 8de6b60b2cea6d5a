"""Reliability (issue 13): nothing silently wrong, bad input refused up front with a message naming the parameter.

One test (or a few) per class of the issue: 1 LiSSA that cannot converge, 2 the loss contract, 3 overflow (metrics,
retraining), 4 non-finite parameters and vectors, 7 wrong shapes and dtypes, 8 frozen parameters and train-mode
layers, 9 CG tolerance per dtype, 14 Gauss-Newton with every common loss.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import make_classification, make_mlp
from torch import nn

import influence_lib as il
from influence_lib.objective import Objective
from influence_lib.solvers import default_cg_tol


def rhs(p, k=1, seed=0, dtype=torch.float64):
    return torch.randn(p, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.fixture
def small():
    """A tiny tanh MLP classifier (3 classes), its data and a held-out pair of test points."""
    model = make_mlp(seed=1)
    X, y = make_classification(n=24, seed=1)
    return model, (X[:20], y[:20]), (X[20:], y[20:])


# --------------------------------------------------------------------------- 1. LiSSA that cannot converge
@pytest.fixture
def spectrum_problem(nonconvex_problem):
    model, (X, y), H, evals = nonconvex_problem
    op = il.HessianOperator(Objective(model, F.cross_entropy, X, y, weight_decay=0.01))
    return op, H, evals


def test_lissa_refuses_a_scale_slightly_too_small(spectrum_problem):
    op, H, evals = spectrum_problem
    damping = -float(evals[0]) + 0.05
    lam_max = float(evals[-1]) + damping
    # 0.49 lambda_max: the top mode grows by 4% a step, far too slowly for the norm bound in 100 steps (the old
    # code returned a relative error of about 3.6 here), caught by the growth of the increments ...
    with pytest.raises(il.LissaDivergenceError, match="scale"):
        il.ihvp_lissa(op, rhs(op.size), damping, scale=0.49 * lam_max, depth=100)
    # ... and, for a longer recursion, by the spectrum estimate before any step
    with pytest.raises(il.LissaDivergenceError, match="scale"):
        il.ihvp_lissa(il.HessianOperator(op.objective), rhs(op.size), damping, scale=0.49 * lam_max, depth=2000)


@pytest.mark.parametrize("depth", [100, 300])
def test_lissa_refuses_an_indefinite_system(spectrum_problem, depth):
    op, H, evals = spectrum_problem
    damping = -float(evals[0]) - 0.01  # A + damping I has one eigenvalue -0.01: the series grows slowly along it
    scale = 1.5 * (float(evals[-1]) + damping)
    with pytest.raises(il.LissaDivergenceError, match="damping"):
        il.ihvp_lissa(il.HessianOperator(op.objective), rhs(op.size), damping, scale=scale, depth=depth)
    with pytest.raises(il.LissaDivergenceError, match="damping"):  # the default scale sees it in its estimate
        il.ihvp_lissa(il.HessianOperator(op.objective), rhs(op.size), damping, depth=depth)


def test_lissa_refuses_zero_damping_on_an_indefinite_hessian_through_influence(small):
    model, train, test = small
    evals = torch.linalg.eigvalsh(il.hessian(model, F.cross_entropy, train))
    assert evals[0] < 0
    with pytest.raises(il.LissaDivergenceError, match="damping"):
        il.influence(model, F.cross_entropy, train, test, method="lissa", damping=0.0, depth=500)


def test_lissa_still_converges_where_it_should(spectrum_problem):
    op, H, evals = spectrum_problem
    damping = -float(evals[0]) + 0.05
    V = rhs(op.size, 2)
    ref = torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), V)
    scale = 0.51 * (float(evals[-1]) + damping)  # just above the limit lambda_max / 2: slow but convergent
    depth = int(40 / ((float(evals[0]) + damping) / scale))
    X, _ = il.ihvp_lissa(op, V, damping, scale=scale, depth=depth)
    assert float((X - ref).norm() / ref.norm()) < 1e-8


# --------------------------------------------------------------------------- 2. the loss contract
def _sum_loss(o, t):
    return F.cross_entropy(o, t, reduction="sum")


def _none_loss(o, t):
    return F.cross_entropy(o, t, reduction="none")


ENTRY_POINTS = {
    "hessian": lambda m, loss, tr, te: il.hessian(m, loss, tr),
    "hvp": lambda m, loss, tr, te: il.hvp(m, loss, tr, torch.ones(sum(p.numel() for p in m.parameters()),
                                                                  dtype=torch.float64)),
    "influence": lambda m, loss, tr, te: il.influence(m, loss, tr, te, damping=0.1),
    "loo_retrain": lambda m, loss, tr, te: il.loo_retrain(m, loss, tr, te, [0], steps=2, progress=False),
    "train_model": lambda m, loss, tr, te: il.train_model(m, loss, tr, steps=2),
    "pbrf_retrain": lambda m, loss, tr, te: il.pbrf_retrain(m, loss, tr, te, [0], steps=2, progress=False),
    "retrain_subsets": lambda m, loss, tr, te: il.retrain_subsets(m, loss, tr, te, il.sample_subsets(20, 0.5, 3),
                                                                  steps=2, progress=False),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("loss", [_sum_loss, _none_loss], ids=["sum", "none"])
def test_every_entry_point_refuses_a_loss_that_is_not_a_batch_mean(small, entry, loss):
    model, train, test = small
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="MEAN"):
        ENTRY_POINTS[entry](model, loss, train, test)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # nothing trained


def test_a_batch_mean_loss_with_any_reduction_spelling_is_accepted(small):
    model, train, _ = small
    H = il.hessian(model, lambda o, t: F.cross_entropy(o, t, reduction="mean"), train)
    # F.cross_entropy itself takes the hand-derived MLP Hessian (influence_lib.mlp_hessian), a wrapper of it autograd's:
    # two exact computations, equal to rounding
    torch.testing.assert_close(H, il.hessian(model, F.cross_entropy, train), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- 3. overflow and absurd values
def _textbook_pearson(x, y):
    xc, yc = x - x.mean(), y - y.mean()
    return float(np.clip((xc * yc).sum() / (np.sqrt((xc * xc).sum()) * np.sqrt((yc * yc).sum())), -1, 1))


def test_correlations_are_scale_safe():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 2 * x + 0.1 * rng.normal(size=40)
    r = _textbook_pearson(x, y)
    for s in (1e200, 1e-200, 1e300, 1e-300):
        assert il.pearson(x * s, y * s) == pytest.approx(r, rel=1e-12)
        assert il.pearson(x * s, x * s) == pytest.approx(1.0, abs=1e-12)
        assert il.spearman(x * s, y) == pytest.approx(il.spearman(x, y), abs=1e-12)
    assert il.pearson(x * 1e200, -3 * x * 1e200 + 1e201) == pytest.approx(-1.0, abs=1e-12)
    # ordinary inputs: the same number as the textbook formula
    for _ in range(20):
        a, b = rng.normal(size=30) * 10.0 ** rng.uniform(-5, 5), rng.normal(size=30)
        assert il.pearson(a, b) == _textbook_pearson(a, b)


def test_retraining_that_blows_up_raises_instead_of_returning_huge_values():
    X, y = make_classification(n=12, seed=4)
    model = nn.Linear(3, 3).double()
    # SGD with lr * weight_decay = 100: the parameters grow by 99x a step and reach ~1e199 after 100 steps, finite
    # but absurd, with cross-entropy test losses of the same size (the old code returned them as loss changes)
    opts = dict(weight_decay=1.0, optimizer="sgd", lr=100.0, steps=100)
    with pytest.raises(il.NonFiniteError, match="blew up"):
        il.loo_retrain(model, F.cross_entropy, (X, y), (X[:2], y[:2]), [0, 1], progress=False, **opts)
    with pytest.raises(il.NonFiniteError, match="blew up"):
        il.train_model(model, F.cross_entropy, (X, y), **opts)


# --------------------------------------------------------------------------- 4. non-finite parameters and vectors
def test_hessian_and_hvp_refuse_nan_parameters_and_vectors(small):
    model, train, _ = small
    p = sum(q.numel() for q in model.parameters())
    v = torch.ones(p, dtype=torch.float64)
    v_nan = v.clone()
    v_nan[3] = float("nan")
    with pytest.raises(il.NonFiniteError, match="v"):
        il.hvp(model, F.cross_entropy, train, v_nan)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(il.NonFiniteError, match="parameter"):
        il.hessian(model, F.cross_entropy, train)
    with pytest.raises(il.NonFiniteError, match="parameter"):
        il.hvp(model, F.cross_entropy, train, v)


# --------------------------------------------------------------------------- 7. wrong shapes and dtypes
BAD_INPUT = {
    "loo_retrain": lambda m, tr, te: il.loo_retrain(m, F.cross_entropy, tr, te, [0], steps=2, progress=False),
    "pbrf_retrain": lambda m, tr, te: il.pbrf_retrain(m, F.cross_entropy, tr, te, [0], steps=2, progress=False),
    "hessian": lambda m, tr, te: il.hessian(m, F.cross_entropy, tr),
    "influence": lambda m, tr, te: il.influence(m, F.cross_entropy, tr, te, damping=0.1),
}


@pytest.mark.parametrize("entry", sorted(BAD_INPUT))
def test_wrong_shapes_and_dtypes_get_a_clear_error(small, entry):
    model, (X, y), test = small
    call = BAD_INPUT[entry]
    cases = [
        ((X.long(), y), r"^X: .*dtype torch\.int64"),                       # integer features
        ((X, y.double()), r"^y: .*integer class indices"),                  # float labels for cross-entropy
        ((X, torch.where(y == 2, 3, y)), r"^y: class labels must lie in \[0, 3\)"),  # a label out of range
        ((X, y[:-1]), "same number of rows"),                               # X and y of different lengths
        ((X,), r"\(X, y\) pair"),                                           # (X,) instead of (X, y)
    ]
    for train, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call(model, train, test)
    if entry != "hessian":  # the test points are checked against the training data
        with pytest.raises(ValueError, match=r"^test y: class labels must lie in \[0, 3\)"):
            call(model, (X, y), (test[0], torch.full_like(test[1], 7)))
        with pytest.raises(ValueError, match="^test: labels"):
            call(model, (X, y), (test[0], test[1].double()))


def test_hvp_refuses_a_vector_of_the_wrong_length_or_dtype(small):
    model, train, _ = small
    p = sum(q.numel() for q in model.parameters())
    for v in (torch.ones(p + 1, dtype=torch.float64), torch.ones(p, dtype=torch.long), torch.ones(2, p)):
        with pytest.raises(ValueError, match=rf"^v must be a floating-point tensor of shape \[{p}\]"):
            il.hvp(model, F.cross_entropy, train, v)


# --------------------------------------------------------------------------- 8. frozen parameters, train-mode layers
def test_frozen_parameters_are_refused_unless_left_out_with_params(small):
    model, train, test = small
    model[0].weight.requires_grad_(False)
    for call in (lambda: il.hessian(model, F.cross_entropy, train),
                 lambda: il.influence(model, F.cross_entropy, train, test, damping=0.1),
                 lambda: il.loo_retrain(model, F.cross_entropy, train, test, [0], steps=2, progress=False),
                 lambda: il.hessian(model, F.cross_entropy, train, params=["0.weight", "2.bias"])):
        with pytest.raises(ValueError, match=r"requires_grad=False.*params="):
            call()
    trainable = [n for n, q in model.named_parameters() if q.requires_grad]
    H = il.hessian(model, F.cross_entropy, train, params=trainable)
    assert H.shape == (31 - 12, 31 - 12) and bool(torch.isfinite(H).all())


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(4), nn.Dropout(0.5)], ids=["batchnorm", "dropout"])
def test_train_mode_batchnorm_and_dropout_are_refused_with_what_to_do(small, layer):
    _, train, test = small
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Tanh(), nn.Linear(4, 3)).double()
    for call in (lambda: il.hessian(model, F.cross_entropy, train),
                 lambda: il.influence(model, F.cross_entropy, train, test, damping=0.1),
                 lambda: il.train_model(model, F.cross_entropy, train, steps=2)):
        with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
            call()
    model.eval()  # supported: the layer is then a fixed function of each example
    scores = il.influence(model, F.cross_entropy, train, test, damping=0.1)
    assert scores.shape == (4, 20) and bool(torch.isfinite(scores).all())


# --------------------------------------------------------------------------- 9. CG tolerance per dtype
def test_cg_default_tolerance_is_reachable_in_float32():
    X, y = make_classification(n=50, d=4, seed=2)
    model = make_mlp(in_dim=4, width=6, seed=2).float()
    obj = Objective(model, F.cross_entropy, X.float(), y, weight_decay=0.05)
    H = il.HessianOperator(obj).dense().double()
    damping = 0.01 - min(0.0, float(torch.linalg.eigvalsh(H)[0]))
    V = rhs(obj.p, 3, dtype=torch.float32)
    X32, info = il.ihvp_cg(il.HessianOperator(obj), V, damping)  # the float64 default (1e-8) can never be reached
    assert max(info["residual"]) <= default_cg_tol(torch.float32)
    ref = torch.linalg.solve(H + damping * torch.eye(obj.p, dtype=H.dtype), V.double())
    assert float((X32.double() - ref).norm() / ref.norm()) < 1e-3
    assert default_cg_tol(torch.float64) == 1e-8  # unchanged in float64
    assert 1e-6 < default_cg_tol(torch.float32) < 1e-4


# --------------------------------------------------------------------------- 14. Gauss-Newton with common losses
def _dense_gauss_newton(model, loss_fn, X, t, wd):
    """``J^T H_out J + wd I`` from the full Jacobian and the output-space Hessian of the batch loss."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [q.shape for q in model.parameters()]
    theta = torch.cat([q.detach().reshape(-1) for q in model.parameters()])

    def outputs(th):
        parts = dict(zip(names, (c.view(s) for c, s in zip(th.split([math.prod(s) for s in shapes]), shapes,
                                                              strict=True)), strict=True))
        return torch.func.functional_call(model, parts, (X,)).reshape(-1)

    out = outputs(theta)
    J = torch.autograd.functional.jacobian(outputs, theta)  # [n*k, p]
    H_out = torch.autograd.functional.hessian(lambda o: loss_fn(o.view(X.shape[0], -1), t), out)  # [n*k, n*k]
    return J.T @ H_out @ J + wd * torch.eye(theta.numel(), dtype=theta.dtype)


LOSSES = {
    "cross_entropy": (F.cross_entropy, lambda y, Y: y % 2),
    "mse": (F.mse_loss, lambda y, Y: Y),
    "bce_with_logits": (F.binary_cross_entropy_with_logits, lambda y, Y: (Y > 0).double()),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gauss_newton_with_every_common_loss_matches_a_dense_reference(name):
    loss_fn, target = LOSSES[name]
    X, y = make_classification(n=16, seed=5)
    Y = torch.randn(16, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    t = target(y, Y)
    model = make_mlp(out_dim=2, seed=5)
    obj = Objective(model, loss_fn, X, t, weight_decay=0.01)
    G = il.GaussNewtonOperator(obj).dense()
    ref = _dense_gauss_newton(model, loss_fn, X, t, 0.01)
    torch.testing.assert_close(G, ref, rtol=1e-9, atol=1e-12)
    # and through the public entry point (the PBRF / EK-FAC curvature)
    scores = il.influence(model, loss_fn, (X, t), (X[:2], t[:2]), weight_decay=0.01, damping=0.01,
                          curvature="gauss-newton")
    G_inv = torch.linalg.inv(ref + 0.01 * torch.eye(ref.shape[0], dtype=ref.dtype))
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        loss_fn(model(X[i:i + 1]), t[i:i + 1]), list(model.parameters()))]) for i in range(16)])
    torch.testing.assert_close(scores, grads[:2] @ G_inv @ grads.T / 16, rtol=1e-8, atol=1e-12)


def test_pbrf_with_automatic_step_runs_on_a_squared_error_model():
    X, _ = make_classification(n=16, seed=5)
    Y = torch.randn(16, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    model = make_mlp(out_dim=2, seed=5)
    # lr="auto" takes lambda_max of the Gauss-Newton matrix (GaussNewtonOperator), which failed for F.mse_loss
    change = il.pbrf_retrain(model, F.mse_loss, (X, Y), (X[:3], Y[:3]), [0, 1], damping=0.1, optimizer="sgd",
                             lr="auto", steps=20, progress=False)
    assert change.shape == (2, 3) and bool(torch.isfinite(change).all())
