"""Newton-converged retraining (influence_lib.newton) against exact answers.

Every comparison is bounded by a property that holds on any machine rather than by an iteration count: for an
objective whose Hessian is at least ``mu I`` (strong convexity, globally for ridge and L2 logistic regression,
locally around the minimiser of the MLP) two points ``a``, ``b`` with gradients ``g_a``, ``g_b`` satisfy
``||a - b|| <= (||g_a|| + ||g_b||) / mu``. The gradients are computed independently of the library (closed forms
in numpy, or plain autograd on an un-batched function).
"""

import copy

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from _helpers import make_classification, make_mlp
from torch import nn
from torch.func import functional_call

import influence_lib as il
from influence_lib import newton as nw

EPS = torch.finfo(torch.float64).eps


# --- independent objectives -----------------------------------------------------------------------------------------

def plain_objective(model, loss_fn, X, y, wd, denom=None):
    """``theta -> sum_i loss_i / denom + (wd/2)||theta||^2`` with plain autograd (no vmap, no Objective)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    denom = len(X) if denom is None else denom

    def f(theta):
        params = {k: t.view(s) for k, t, s in zip(names, theta.split(sizes), shapes, strict=True)}
        out = functional_call(model, params, (X,))
        return loss_fn(out, y, reduction="sum") / denom + 0.5 * wd * theta.dot(theta)

    return f


def grad_hess(f, theta):
    t = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(t), t)
    H = torch.autograd.functional.hessian(f, theta.detach())
    return g.detach(), H


def softmax_ce_numpy(theta, X, y, wd, c):
    """Multinomial logistic regression (nn.Linear(d, c) parameter order: weight [c, d] row-major, then bias [c]):
    value, gradient and Hessian of mean cross-entropy + (wd/2)||theta||^2, in closed form."""
    n, d = X.shape
    W, b = theta[: c * d].reshape(c, d), theta[c * d:]
    Z = X @ W.T + b
    Z = Z - Z.max(1, keepdims=True)
    P = np.exp(Z)
    P /= P.sum(1, keepdims=True)
    Y = np.eye(c)[y]
    val = -np.log(P[np.arange(n), y]).mean() + 0.5 * wd * theta @ theta
    R = (P - Y) / n
    g = np.concatenate([(R.T @ X).ravel(), R.sum(0)]) + wd * theta
    Xa = np.hstack([X, np.ones((n, 1))])  # augmented: parameter A[k, j], j = d is the bias
    H_aug = np.zeros((c, d + 1, c, d + 1))
    for i in range(n):
        S = (np.diag(P[i]) - np.outer(P[i], P[i])) / n
        H_aug += np.einsum("kl,j,m->kjlm", S, Xa[i], Xa[i])
    order = [k * (d + 1) + j for k in range(c) for j in range(d)] + [k * (d + 1) + d for k in range(c)]
    H = H_aug.reshape(c * (d + 1), c * (d + 1))[np.ix_(order, order)] + wd * np.eye(c * (d + 1))
    return val, g, H


# --- ridge regression: closed form -----------------------------------------------------------------------------------

@pytest.mark.parametrize("normalization", ["remaining", "full"])
def test_ridge_loo_equals_the_closed_form(normalization):
    g = torch.Generator().manual_seed(0)
    n, d, wd = 25, 3, 0.1
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(n, generator=g,
                                                                                     dtype=torch.float64)).unsqueeze(1)
    Xt, yt = X[:4] + 0.1, y[:4]
    model = nn.Linear(d, 1).double()
    remove = [0, 7, 24]
    res = il.retrain_without(model, F.mse_loss, (X, y), (Xt, yt), remove, weight_decay=wd, optimizer="newton",
                             normalization=normalization, progress=False)
    Z = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)  # theta = [weight, bias]
    for r, i in enumerate(remove):
        keep = torch.arange(n) != i
        m = n - 1 if normalization == "remaining" else n
        A = (2 / m) * Z[keep].T @ Z[keep] + wd * torch.eye(d + 1, dtype=torch.float64)
        exact = torch.linalg.solve(A, (2 / m) * Z[keep].T @ y[keep, 0])
        lam = torch.linalg.eigvalsh(A)
        gnorm = (A @ res.theta[r] - (2 / m) * Z[keep].T @ y[keep, 0]).norm()  # closed-form gradient
        assert gnorm <= 1e-10 * max(1.0, float(res.grad_norm[r])) + 1e-13
        # ||theta - exact|| <= ||grad|| / lambda_min, plus the rounding of the exact solve (cond * eps * ||theta||)
        bound = gnorm / lam[0] + 100 * (lam[-1] / lam[0]) * EPS * exact.norm()
        assert (res.theta[r] - exact).norm() <= bound
        exact_losses = ((torch.cat([Xt, torch.ones(4, 1, dtype=torch.float64)], 1) @ exact - yt[:, 0]) ** 2)
        torch.testing.assert_close(res.test_losses[r], exact_losses, rtol=0, atol=1e-10)
    assert bool(res.converged.all()) and res.ref_converged
    assert res.iterations.min() >= 1


# --- L2 logistic regression: scipy at tight tolerance ----------------------------------------------------------------

def test_logistic_loo_matches_scipy(convex_problem):
    model, (X, y), _ = convex_problem
    wd, c = 0.05, 3
    remove = [0, 17, 33, 49]
    res = il.retrain_without(model, F.cross_entropy, (X, y), (X[:5], y[:5]), remove, weight_decay=wd,
                             optimizer="newton", progress=False)
    theta0 = il.flat_params(model).numpy()
    Xn, yn = X.numpy(), y.numpy()
    for r, i in enumerate(remove):
        keep = np.arange(len(yn)) != i
        fun = lambda th, keep=keep: softmax_ce_numpy(th, Xn[keep], yn[keep], wd, c)  # noqa: E731
        sol = scipy.optimize.minimize(lambda th: fun(th)[0], theta0, jac=lambda th: fun(th)[1],
                                      hess=lambda th: fun(th)[2], method="trust-exact", options={"gtol": 1e-13})
        g_scipy = np.linalg.norm(fun(sol.x)[1])
        g_newton = np.linalg.norm(fun(res.theta[r].numpy())[1])
        assert g_newton <= 1e-10 * max(1.0, float(res.grad_norm[r])) + 1e-14
        # strongly convex with modulus >= wd: the two minimisers differ by at most (||g_a|| + ||g_b||) / wd
        assert np.linalg.norm(res.theta[r].numpy() - sol.x) <= (g_newton + g_scipy) / wd + 1e-12
        assert abs(fun(res.theta[r].numpy())[0] - sol.fun) <= 1e-13


# --- non-convex MLP: a float64 scipy trust-region solve from the same start ------------------------------------------

@pytest.fixture(scope="module")
def mlp_problem():
    torch.set_num_threads(1)
    model = make_mlp(in_dim=3, width=4, depth=1, seed=5)
    X, y = make_classification(n=30, seed=5)
    il.train_model(model, F.cross_entropy, (X, y), weight_decay=0.01, lr=0.05, steps=300)
    return model, (X, y), make_classification(n=4, seed=6)


def test_nonconvex_mlp_loo_matches_scipy_trust_region(mlp_problem):
    model, (X, y), test = mlp_problem
    wd, remove = 0.01, [2, 11, 29]
    res = il.retrain_without(model, F.cross_entropy, (X, y), test, remove, weight_decay=wd, optimizer="newton",
                             progress=False)
    theta0 = il.flat_params(model)
    for r, i in enumerate(remove):
        keep = torch.arange(len(y)) != i
        f = plain_objective(model, F.cross_entropy, X[keep], y[keep], wd)
        sol = scipy.optimize.minimize(
            lambda th: float(f(torch.from_numpy(th))), theta0.numpy(),
            jac=lambda th: grad_hess(f, torch.from_numpy(th))[0].numpy(),
            hess=lambda th: grad_hess(f, torch.from_numpy(th))[1].numpy(), method="trust-exact",
            options={"gtol": 1e-11})
        g_n, H_n = grad_hess(f, res.theta[r])
        g_s = grad_hess(f, torch.from_numpy(sol.x))[0]
        # scipy may stop at round-off ("failure to predict improvement") short of gtol: its gradient enters the bound
        assert sol.success or float(g_s.norm()) < 1e-9, sol.message
        lam_min = float(torch.linalg.eigvalsh(H_n)[0])
        assert lam_min > 0  # a local minimum, not a saddle
        assert float(g_n.norm()) <= 1e-10 * max(1.0, float(res.grad_norm[r])) + 1e-13
        # locally strongly convex with modulus ~lam_min (factor 2: H varies over the tiny distance)
        dist = float((res.theta[r] - torch.from_numpy(sol.x)).norm())
        assert dist <= 2 * (float(g_n.norm()) + float(g_s.norm())) / lam_min + 1e-12
        assert abs(float(f(res.theta[r])) - sol.fun) <= 1e-12


def test_batched_equals_sequential_and_dense_equals_newton_cg(mlp_problem):
    model, (X, y), test = mlp_problem
    wd, remove = 0.01, [0, 5, 13, 23]
    kw = dict(weight_decay=wd, optimizer="newton", progress=False)
    batched = il.retrain_without(model, F.cross_entropy, (X, y), test, remove, **kw)
    one_by_one = [il.retrain_without(model, F.cross_entropy, (X, y), test, [i], **kw) for i in remove]
    chunked = il.retrain_without(model, F.cross_entropy, (X, y), test, remove, chunk_size=1, **kw)
    obj = il.Objective(model, F.cross_entropy, X, y, weight_decay=wd)
    W = torch.ones(len(remove), len(y), dtype=torch.float64)
    W[torch.arange(len(remove)), torch.tensor(remove)] = 0
    cg = nw.newton_minimize(nw.weighted_data_terms(obj, W), il.flat_params(model).expand(len(remove), -1), l2=wd,
                            dense_max=0)
    for r, i in enumerate(remove):
        keep = torch.arange(len(y)) != i
        f = plain_objective(model, F.cross_entropy, X[keep], y[keep], wd)
        g_b, H = grad_hess(f, batched.theta[r])
        lam_min = float(torch.linalg.eigvalsh(H)[0])
        assert lam_min > 0
        for other in (one_by_one[r].theta[0], chunked.theta[r], cg.theta[r]):
            g_o = grad_hess(f, other)[0]
            # same local minimiser: the distance is bounded by the gradients (see the module docstring)
            assert float((batched.theta[r] - other).norm()) <= 2 * float(g_b.norm() + g_o.norm()) / lam_min + 1e-12
    assert bool(cg.converged.all())
    torch.testing.assert_close(batched.theta_ref, one_by_one[0].theta_ref, rtol=0, atol=1e-8)


# --- indefinite start: descent only, ends at a minimum ---------------------------------------------------------------

def test_indefinite_start_descends_monotonically_to_a_minimum(nonconvex_problem):
    model, (X, y), _, evals = nonconvex_problem
    assert evals[0] < 0  # the start is not in a convex region
    wd = 0.01
    obj = il.Objective(model, F.cross_entropy, X, y, weight_decay=wd)
    fun = nw.weighted_data_terms(obj, torch.ones(1, len(y), dtype=torch.float64))
    theta0 = il.flat_params(model).unsqueeze(0)
    values = [float(obj.loss(theta0[0]))]
    for k in (1, 2, 3, 5, 8):  # the iterates of a run with max_iter=k are the first k of a longer run
        values.append(float(nw.newton_minimize(fun, theta0, l2=wd, max_iter=k, on_failure="flag").value[0]))
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))  # never uphill
    final = nw.newton_minimize(fun, theta0, l2=wd)
    assert final.value[0] <= values[-1] and bool(final.converged[0])
    assert final.grad_norm[0] <= final.threshold[0]
    assert float(torch.linalg.eigvalsh(obj.hessian(final.theta[0]))[0]) > 0  # a minimum, not a saddle


# --- theta* at stationarity; non-convergence is never silent ---------------------------------------------------------

def test_polish_after_adam_reaches_the_tolerance(mlp_problem):
    model, train, _ = mlp_problem
    m = copy.deepcopy(model)
    before = float(il.Objective(m, F.cross_entropy, *train, weight_decay=0.01).gradient(il.flat_params(m)).norm())
    out = il.train_model(m, F.cross_entropy, train, weight_decay=0.01, optimizer="newton")
    assert out["converged"] and out["grad_norm"] <= 1e-10 * max(1.0, out["grad_norm_start"])
    assert out["grad_norm_start"] == pytest.approx(before, rel=1e-12) and out["iterations"] >= 1
    after = float(il.Objective(m, F.cross_entropy, *train, weight_decay=0.01).gradient(il.flat_params(m)).norm())
    assert after == pytest.approx(out["grad_norm"], rel=1e-6, abs=1e-14)  # the model was updated in place
    assert after < before


def test_non_convergence_raises_or_is_flagged():
    model = make_mlp(in_dim=3, width=4, depth=1, seed=9)
    X, y = make_classification(n=20, seed=9)
    with pytest.raises(il.NewtonConvergenceError, match="max_iter"):
        il.train_model(copy.deepcopy(model), F.cross_entropy, (X, y), weight_decay=0.01, optimizer="newton",
                       max_iter=1)
    kw = dict(weight_decay=0.01, optimizer="newton", warm_start=False, seed=3, max_iter=1, progress=False)
    with pytest.raises(il.NewtonConvergenceError, match="LOO retraining"):
        il.retrain_without(model, F.cross_entropy, (X, y), (X[:3], y[:3]), [0, 1], **kw)
    res = il.retrain_without(model, F.cross_entropy, (X, y), (X[:3], y[:3]), [0, 1], on_failure="flag", **kw)
    assert not bool(res.converged.any()) and res.ref_converged is False
    assert torch.isnan(res.theta).all() and torch.isnan(res.loss_change).all()  # no answer, not a wrong one
    assert torch.isfinite(res.grad_norm).all() and (res.grad_norm > 1e-10).all()  # what was reached is reported


def test_newton_options_are_validated_and_other_optimisers_unchanged(mlp_problem):
    model, train, test = mlp_problem
    with pytest.raises(ValueError, match="batch_size"):
        il.TrainConfig(optimizer="newton", batch_size=4)
    with pytest.raises(ValueError, match="tol"):
        il.TrainConfig(optimizer="newton", tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        il.TrainConfig(optimizer="newton", max_iter=0)
    with pytest.raises(ValueError, match="on_failure"):
        il.retrain_without(model, F.cross_entropy, train, test, [0], optimizer="newton", on_failure="ignore",
                           progress=False)
    assert "tol" not in il.TrainConfig().to_dict() and "max_iter" not in il.TrainConfig().to_dict()
    assert il.TrainConfig(optimizer="newton").to_dict()["max_iter"] == 100
    # the Adam path now also reports each retrained model's gradient norm: check one against a direct computation
    res = il.retrain_without(model, F.cross_entropy, train, test, [4], weight_decay=0.01, lr=0.01, steps=20,
                             progress=False)
    keep = torch.arange(len(train[1])) != 4
    f = plain_objective(model, F.cross_entropy, train[0][keep], train[1][keep], 0.01)
    assert float(res.grad_norm[0]) == pytest.approx(float(grad_hess(f, res.theta[0])[0].norm()), rel=1e-10)
    assert res.iterations is None and res.converged is None


def test_pbrf_newton_reaches_a_stationary_point_of_the_pbrf(mlp_problem):
    model, (X, y), test = mlp_problem
    wd, damping, remove = 0.01, 0.01, [1, 4, 20]
    res = il.pbrf_response(model, F.cross_entropy, (X, y), test, remove, weight_decay=wd, damping=damping,
                           optimizer="newton", progress=False)
    assert not bool(res.diverged.any())
    obj = il.Objective(model, F.cross_entropy, X, y, weight_decay=wd)
    pbrf = il.PBRF(obj, damping=damping)
    W = pbrf.removal_weights(torch.tensor(remove), -1.0 / len(y))
    gn = pbrf.gradient_norms(res.theta, W)  # the PBRF's own gradient, computed without the Newton code
    assert (gn <= 1e-10 * res.grad_norm_start.clamp_min(1.0) + 1e-14).all()
    for r, m in enumerate(remove):  # descent from theta_s, where the PBRF's value is 0 up to the removal term
        assert float(pbrf.value(res.theta[r], m)) <= float(pbrf.value(pbrf.theta_s, m))


def test_a_minimiser_on_a_kink_is_flagged_not_returned_as_converged():
    # F(theta) = |theta_1| + |theta_2| + theta^2/2: the minimiser 0 is a kink (as a ReLU hinge through a training
    # point), where |grad F| >= 1 on both sides, so no gradient-norm tolerance can be met
    theta0 = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    res = nw.newton_minimize(lambda th, which: th.abs().sum(1), theta0, l2=1.0, max_iter=200, on_failure="flag")
    assert not bool(res.converged[0]) and bool(res.stalled[0])
    assert float(res.value[0]) < float(theta0.abs().sum() + 0.5 * theta0.pow(2).sum())  # it did descend
    with pytest.raises(il.NewtonConvergenceError, match="stalled"):
        nw.newton_minimize(lambda th, which: th.abs().sum(1), theta0, l2=1.0, max_iter=200)


def test_float32_uses_its_own_default_tolerance(mlp_problem):
    model, (X, y), _ = mlp_problem
    m = copy.deepcopy(model).float()
    out = il.newton_polish(m, F.cross_entropy, (X.float(), y), weight_decay=0.01)
    assert nw.default_tol(torch.float32) == 1e-5 and nw.default_tol(torch.float64) == 1e-10
    assert out["converged"] and out["grad_norm"] <= 1e-5 * max(1.0, out["grad_norm_start"])
    assert next(m.parameters()).dtype == torch.float32
