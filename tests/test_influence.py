"""Influence scores against exact leave-one-out on convex models, and their conventions."""

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_classification, make_mlp
from torch import nn

import influence_lib as il


def ridge_problem(n=40, d=3, wd=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    y[:3] += 1.5  # a few outliers with large influence
    return X, y.unsqueeze(1), wd


def ridge_fit(X, y, wd, n=None):
    """argmin (1/n) sum (x^T w + b - y)^2 + wd/2 (||w||^2 + b^2), closed form (n = len(X) by default)."""
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    n = len(X) if n is None else n
    A = 2 * Xa.T @ Xa / n + wd * torch.eye(Xa.shape[1], dtype=X.dtype)
    sol = torch.linalg.solve(A, 2 * Xa.T @ y / n)
    return sol[:-1].T, sol[-1]


def set_linear(model, w, b):
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b)


def agree(pred, actual, frac=0.1):
    """Pearson > 0.99 and the same sign wherever the actual effect is not negligible."""
    assert il.pearson(pred, actual) > 0.99
    big = actual.abs() > frac * actual.abs().max()
    assert bool((torch.sign(pred[big]) == torch.sign(actual[big])).all())


@pytest.mark.parametrize("normalization", ["full", "remaining"])
def test_ridge_influence_matches_exact_loo(normalization):
    """Exact LOO in closed form. "full": drop the point's 1/n term (the perturbation influence linearises);
    "remaining": ordinary retraining on n-1 points, whose first-order effect is s_i - sum_{j!=i} s_j/(n-1)."""
    X, y, wd = ridge_problem()
    Xt, yt, _ = ridge_problem(n=5, seed=9)
    model = nn.Linear(3, 1).double()
    set_linear(model, *ridge_fit(X, y, wd))
    scores = il.influence(model, F.mse_loss, (X, y), (Xt, yt), weight_decay=wd)
    assert scores.shape == (5, 40)
    loo = torch.empty(40, 5, dtype=torch.float64)
    for i in range(40):
        keep = torch.arange(40) != i
        w, b = ridge_fit(X[keep], y[keep], wd, n=40 if normalization == "full" else 39)
        loo[i] = ((Xt @ w.T + b - yt) ** 2).squeeze(1) - ((model(Xt) - yt) ** 2).squeeze(1).detach()
    for t in range(5):
        pred = scores[t] if normalization == "full" else scores[t] - (scores[t].sum() - scores[t]) / 39
        agree(pred, loo[:, t])


def newton_fit(model, loss_fn, X, y, wd, iters=60, n=None):
    """Minimise (len(X)/n) loss_fn(X, y) + wd/2 |theta|^2 to machine precision with damped Newton steps."""
    scale = 1.0 if n is None else len(X) / n
    theta = il.flat_params(model).clone()
    shapes = [p.shape for p in model.parameters()]

    def J(t):
        W = t[: shapes[0].numel()].view(shapes[0])
        b = t[shapes[0].numel():]
        return scale * loss_fn(X @ W.T + b, y) + 0.5 * wd * t.dot(t)

    for _ in range(iters):
        g = torch.autograd.functional.jacobian(J, theta)
        if g.norm() < 1e-13:
            break
        H = torch.autograd.functional.hessian(J, theta)
        step = torch.linalg.solve(H, g)
        # backtracking: a full Newton step from a start far from the optimum (the model's random initialisation,
        # which depends on the global RNG and hence on the tests run before) can overshoot on a convex objective
        t, f0 = 1.0, J(theta)
        while J(theta - t * step) > f0 + 1e-12 * abs(f0) and t > 1e-8:  # a real increase, not rounding
            t /= 2
        theta = theta - t * step
    assert torch.autograd.functional.jacobian(J, theta).norm() < 1e-12
    return theta


def test_logistic_regression_influence_matches_exact_loo():
    X, y = make_classification(n=200, d=4, seed=3)
    Xt, yt = make_classification(n=6, d=4, seed=4)
    wd = 0.1
    model = nn.Linear(4, 3).double()
    il.set_flat_params(model, newton_fit(model, F.cross_entropy, X, y, wd))
    scores = il.influence(model, F.cross_entropy, (X, y), (Xt, yt), weight_decay=wd)
    base = F.cross_entropy(model(Xt), yt, reduction="none").detach()
    loo = torch.empty(200, 6, dtype=torch.float64)
    for i in range(200):
        keep = torch.arange(200) != i
        m = nn.Linear(4, 3).double()
        il.set_flat_params(m, il.flat_params(model))
        il.set_flat_params(m, newton_fit(m, F.cross_entropy, X[keep], y[keep], wd, n=200))
        loo[i] = F.cross_entropy(m(Xt), yt, reduction="none").detach() - base
    for t in range(6):
        agree(scores[t], loo[:, t])
    # the batched retrainer, fully converged, reproduces the same exact LOO
    retrained = il.loo_retrain(model, F.cross_entropy, (X, y), (Xt, yt), [0, 7, 33], weight_decay=wd,
                               optimizer="sgd", lr=1.0, steps=3000, reference="original", normalization="full",
                               progress=False)
    torch.testing.assert_close(retrained, loo[[0, 7, 33]], rtol=1e-6, atol=1e-9)


def test_sign_a_duplicate_of_the_test_point_helps_it(convex_problem):
    model, (X, y), _ = convex_problem
    il.train_model(model, F.cross_entropy, (X, y), weight_decay=0.05, optimizer="sgd", lr=0.5, steps=500)
    scores = il.influence(model, F.cross_entropy, (X, y), (X[:1], y[:1]), weight_decay=0.05)
    assert scores[0, 0] > 0  # removing the test point's own copy raises its loss


@pytest.mark.parametrize("method,opts", [("cg", {"tol": 1e-12}), ("arnoldi", {"rank": 15, "iters": 15}),
                                         ("lissa", {"depth": 4000})])
def test_methods_agree_with_exact(convex_problem, method, opts):
    model, (X, y), _ = convex_problem
    train, test = (X[:40], y[:40]), (X[40:], y[40:])
    exact = il.influence(model, F.cross_entropy, train, test, weight_decay=0.05, damping=0.01)
    other = il.influence(model, F.cross_entropy, train, test, weight_decay=0.05, damping=0.01, method=method, **opts)
    torch.testing.assert_close(other, exact, rtol=1e-6, atol=1e-10)


def test_influence_is_independent_of_chunk_size_and_consistent_views(nonconvex_problem):
    model, (X, y), H, evals = nonconvex_problem
    damping = -float(evals[0]) + 0.1
    calc = il.InfluenceCalculator(model, F.cross_entropy, (X, y), weight_decay=0.01, damping=damping)
    full = calc.scores((X[:5], y[:5]))
    chunked = il.influence(model, F.cross_entropy, (X, y), (X[:5], y[:5]), weight_decay=0.01, damping=damping,
                           chunk_size=4)
    torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-13)
    # explicit formula with the dense Hessian
    G = calc.gradients((X, y))
    ref = G[:5] @ torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), G.T) / len(X)
    torch.testing.assert_close(full, ref, rtol=1e-9, atol=1e-12)
    # self-influence is the diagonal of train-on-train scores; param change is (1/n) A^-1 g_i
    torch.testing.assert_close(calc.self_influence(torch.arange(5)), torch.diagonal(full), rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(calc.param_change([2]) @ G[0], full[0, 2:3], rtol=1e-9, atol=1e-13)


def test_last_layer_influence_uses_the_last_layer_block():
    model = make_mlp(seed=3)
    X, y = make_classification(seed=3)
    names = ["2.weight", "2.bias"]
    s = il.influence(model, F.cross_entropy, (X, y), (X[:2], y[:2]), weight_decay=0.1, params=names)
    calc = il.InfluenceCalculator(model, F.cross_entropy, (X, y), weight_decay=0.1)
    G = calc.gradients((X, y))[:, -15:]
    Hb = il.hessian(model, F.cross_entropy, (X, y), weight_decay=0.1)[-15:, -15:]
    torch.testing.assert_close(s, G[:2] @ torch.linalg.solve(Hb, G.T) / len(X), rtol=1e-9, atol=1e-12)


def test_bad_inputs_raise_clear_errors(convex_problem):
    model, (X, y), _ = convex_problem
    train, test = (X, y), (X[:2], y[:2])
    with pytest.raises(ValueError, match="method"):
        il.influence(model, F.cross_entropy, train, test, method="newton")
    with pytest.raises(ValueError, match="damping"):
        il.influence(model, F.cross_entropy, train, test, damping=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        il.influence(model, F.cross_entropy, train, test, weight_decay=float("nan"))
    with pytest.raises(TypeError, match="depth"):
        il.influence(model, F.cross_entropy, train, test, method="cg", depth=3)
    with pytest.raises(ValueError, match="same number of rows"):
        il.influence(model, F.cross_entropy, (X, y[:-1]), test)
    with pytest.raises(ValueError, match="test"):
        il.influence(model, F.cross_entropy, train, (X[:2, :3], y[:2]))
    with pytest.raises(ValueError, match="params"):
        il.influence(model, F.cross_entropy, train, test, params=["nope"])
    with pytest.raises(ValueError, match="remove"):
        il.InfluenceCalculator(model, F.cross_entropy, train).param_change([len(X)])
    broken = nn.Linear(4, 3).double()
    with torch.no_grad():
        broken.weight[0, 0] = float("nan")
    for method in ("exact", "ekfac"):  # EK-FAC: from the outputs of its first pass, at its first chunk
        with pytest.raises(il.NonFiniteError, match="loss at the model's current parameters"):
            il.influence(broken, F.cross_entropy, train, test, method=method, damping=0.1)
