"""PBRF (proximal Bregman response function) against exact answers and a hand-written loop."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_classification, make_mlp
from torch import nn
from torch.func import grad, hessian

import influence_lib as il
from influence_lib.objective import Objective
from influence_lib.pbrf import PBRF, pbrf_response, pbrf_retrain


def loss_gradient(model, loss_fn, X, y, m):
    """``grad_theta L(z_m, theta)`` at the model's parameters, ``[p]``."""
    obj = Objective(model, loss_fn, X, y)
    return next(obj.per_sample_grads(obj.theta(), X[m:m + 1], y[m:m + 1]))[1][0]


@pytest.fixture
def ridge():
    """A linear model with squared error: its PBRF objective is quadratic. Not trained: PBRF needs no optimum."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(20, 2, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model, (X, Y)


@pytest.fixture
def mlp():
    """A tanh MLP trained a little (far from a stationary point) on a small classification problem."""
    model = make_mlp(in_dim=3, width=4, depth=1, seed=5)
    X, y = make_classification(n=30, seed=5)
    il.train_model(model, F.cross_entropy, (X, y), weight_decay=0.01, lr=0.05, steps=100)
    return model, (X, y), make_classification(n=5, seed=6)


def test_linear_mse_pbrf_equals_the_dense_closed_form(ridge):
    # PBRF = (1/n) sum_i D_i - (1/n) L_m + (c/2)||theta - theta_s||^2 with c = wd + damping is quadratic here:
    # D_i = L_i - (its first-order expansion at theta_s), so the gradient at theta is
    # (G + c I)(theta - theta_s) - (1/n)(g_m + G_m (theta - theta_s)) and the minimiser is
    # theta_s + (1/n) (G - G_m / n + c I)^{-1} g_m, with G the Gauss-Newton (= Hessian) of the mean loss, G_m that of
    # L_m alone and g_m = grad L_m(theta_s).
    model, (X, Y) = ridge
    n, wd, damping, remove = X.shape[0], 0.05, 0.1, [4, 7, 19]
    theta_s = il.flat_params(model)
    G = il.hessian(model, F.mse_loss, (X, Y))
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    res = pbrf_response(model, F.mse_loss, (X, Y), (X[:3], Y[:3]), remove, weight_decay=wd, damping=damping,
                        optimizer="sgd", lr=0.3, momentum=0.5, steps=400, progress=False)
    for row, m in enumerate(remove):
        G_m = il.hessian(model, F.mse_loss, (X[m:m + 1], Y[m:m + 1]))
        g_m = loss_gradient(model, F.mse_loss, X, Y, m)
        exact = theta_s + torch.linalg.solve(G - G_m / n + (wd + damping) * eye, g_m) / n
        first_order = theta_s + torch.linalg.solve(G + (wd + damping) * eye, g_m) / n
        assert (first_order - exact).abs().max() > 1e-4  # the closed form is not just the influence prediction
        torch.testing.assert_close(res.theta[row], exact, rtol=0, atol=1e-12)
    assert torch.equal(res.theta_ref, theta_s)
    # weight decay enters as (wd/2)||theta - theta_s||^2: only wd + damping matters, not how it is split
    moved = pbrf_response(model, F.mse_loss, (X, Y), (X[:3], Y[:3]), remove, weight_decay=wd + damping, damping=0.0,
                          optimizer="sgd", lr=0.3, momentum=0.5, steps=400, progress=False)
    torch.testing.assert_close(moved.theta, res.theta, rtol=0, atol=1e-12)
    assert float(res.relative_grad_norm.max()) < 1e-10


def test_linear_mse_pbrf_at_the_ridge_optimum_is_exact_leave_one_out(ridge):
    # At the exact ridge optimum (stationary: (1/n) sum_i grad L_i = -wd theta_s) the Bregman terms of a quadratic
    # loss sum to the training objective up to a constant, so PBRF without damping = retraining with the weight of
    # z_m set to 0 in the mean over n (loo_normalization "full").
    model, (X, Y) = ridge
    wd = 0.05
    A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    n, k = X.shape[0], Y.shape[1]
    # minimiser of (1/n) sum_i (1/k)||W a_i - y_i||^2 + (wd/2)||W||^2: (A^T A / n + (k wd / 2) I) W^T = A^T Y / n
    Wb = torch.linalg.solve(A.T @ A / n + 0.5 * k * wd * torch.eye(A.shape[1], dtype=A.dtype), A.T @ Y / n).T
    with torch.no_grad():
        model.weight.copy_(Wb[:, :-1])
        model.bias.copy_(Wb[:, -1])
    assert Objective(model, F.mse_loss, X, Y, weight_decay=wd).gradient(il.flat_params(model)).norm() < 1e-12
    remove, test = [0, 9, 13], (X[:4] + 0.5, Y[:4])
    kw = dict(weight_decay=wd, optimizer="sgd", lr=0.3, momentum=0.5, steps=500, progress=False)
    pbrf = pbrf_retrain(model, F.mse_loss, (X, Y), test, remove, damping=0.0, **kw)
    loo = il.loo_retrain(model, F.mse_loss, (X, Y), test, remove, normalization="full", reference="original", **kw)
    assert pbrf.abs().max() > 1e-4
    torch.testing.assert_close(pbrf, loo, rtol=0, atol=1e-12)


def test_pbrf_gradient_and_hessian_at_theta_s_are_those_of_the_influence_function(mlp):
    model, (X, y), _ = mlp
    wd, damping, n, m = 0.01, 0.05, X.shape[0], 11
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=wd)
    pbrf = PBRF(obj, damping=damping)
    theta_s = obj.theta()
    assert obj.gradient(theta_s).norm() > 1e-2  # not a stationary point of training
    g_m = loss_gradient(model, F.cross_entropy, X, y, m)
    torch.testing.assert_close(grad(lambda t: pbrf.value(t, m))(theta_s), -g_m / n, rtol=0, atol=1e-14)
    torch.testing.assert_close(grad(lambda t: pbrf.value(t, m, 0.0))(theta_s), torch.zeros_like(theta_s),
                               rtol=0, atol=1e-15)
    G = il.GaussNewtonOperator(obj, theta_s).dense()  # includes wd * I
    Hp = hessian(lambda t: pbrf.value(t, m, 0.0))(theta_s)
    eye = torch.eye(len(theta_s), dtype=G.dtype)
    torch.testing.assert_close(Hp, G + damping * eye, rtol=0, atol=1e-12)
    assert (il.hessian(model, F.cross_entropy, (X, y), weight_decay=wd) - G).abs().max() > 1e-2  # H != G here


def test_pbrf_change_matches_gauss_newton_influence_to_first_order(mlp):
    # with the removal weight epsilon = -s/n the PBRF test-loss change is s * (GN influence score) + O(s^2)
    model, (X, y), test = mlp
    wd, damping, n, remove = 0.01, 0.05, X.shape[0], [0, 3, 11, 29]
    kw = dict(weight_decay=wd, damping=damping)
    gn = il.influence(model, F.cross_entropy, (X, y), test, curvature="gauss-newton", **kw)[:, remove].T
    hess = il.influence(model, F.cross_entropy, (X, y), test, **kw)[:, remove].T
    errors = {}
    for s in (0.1, 0.01):
        res = pbrf_response(model, F.cross_entropy, (X, y), test, remove, epsilon=-s / n, optimizer="sgd", lr=0.5,
                            momentum=0.9, steps=1500, progress=False, **kw)
        assert float(res.relative_grad_norm.max()) < 1e-10  # solved: the gap below is not optimisation error
        errors[s] = float((res.loss_change / s - gn).norm() / gn.norm())
        if s == 0.01:
            assert float((res.loss_change / s - hess).norm() / hess.norm()) > 0.1  # the Hessian answers otherwise
    assert errors[0.01] < 5e-3
    assert 5 < errors[0.1] / errors[0.01] < 20  # the gap shrinks linearly with the removal weight


@pytest.mark.parametrize("optimizer,lr,momentum,batch_size", [("adam", 0.01, 0.0, None), ("sgd", 0.3, 0.9, None),
                                                               ("sgd", 0.2, 0.0, 7)])
def test_batched_pbrf_equals_a_sequential_torch_optim_loop(mlp, optimizer, lr, momentum, batch_size):
    model, (X, y), (Xt, yt) = mlp
    wd, damping, n, steps, seed = 0.01, 0.05, X.shape[0], 120, 3
    remove = [0, 5, 13, 29]
    with torch.no_grad():
        anchor = model(X)
    a_grad = torch.autograd.functional.jacobian(lambda o: F.cross_entropy(o, y, reduction="sum"), anchor)
    a_loss = F.cross_entropy(anchor, y, reduction="none")
    batches = None
    if batch_size is not None:  # the library's mini-batch order: seeded permutations cut into batches
        gen, batches = torch.Generator().manual_seed(seed), []
        while len(batches) < steps:
            perm = torch.randperm(n, generator=gen)
            batches += [perm[i:i + batch_size] for i in range(0, n, batch_size)]

    expected = []
    for m in remove:  # what a user writes by hand, one removal at a time
        net = copy.deepcopy(model)
        opt = (torch.optim.Adam(net.parameters(), lr=lr) if optimizer == "adam"
               else torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum))
        for t in range(steps):
            rows = torch.arange(n) if batches is None else batches[t]
            opt.zero_grad()
            out = net(X[rows])
            losses = F.cross_entropy(out, y[rows], reduction="none")
            bregman = losses - a_loss[rows] - (a_grad[rows] * (out - anchor[rows])).sum(1)
            removal = torch.where(rows == m, -losses, torch.zeros_like(losses))  # n * (-1/n) * L_m
            obj = (bregman + removal).mean() + 0.5 * (wd + damping) * sum(
                ((p - q) ** 2).sum() for p, q in zip(net.parameters(), model.parameters(), strict=True))
            obj.backward()
            opt.step()
        with torch.no_grad():
            expected.append(F.cross_entropy(net(Xt), yt, reduction="none") - F.cross_entropy(model(Xt), yt,
                                                                                             reduction="none"))
    expected = torch.stack(expected)
    kw = dict(weight_decay=wd, damping=damping, optimizer=optimizer, lr=lr, steps=steps, seed=seed,
              momentum=momentum, batch_size=batch_size, progress=False)
    got = pbrf_retrain(model, F.cross_entropy, (X, y), (Xt, yt), remove, **kw)
    assert got.shape == (4, 5) and got.abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    chunked = pbrf_retrain(model, F.cross_entropy, (X, y), (Xt, yt), remove, chunk_size=3, **kw)
    torch.testing.assert_close(chunked, got, rtol=0, atol=1e-12)


def test_pbrf_rejects_bad_input(mlp):
    model, train, test = mlp
    f = pbrf_retrain
    with pytest.raises(ValueError, match="remove"):
        f(model, F.cross_entropy, train, test, [30], progress=False)
    with pytest.raises(ValueError, match="remove"):
        f(model, F.cross_entropy, train, test, [], progress=False)
    with pytest.raises(ValueError, match="damping"):
        f(model, F.cross_entropy, train, test, [0], damping=-0.1, progress=False)
    with pytest.raises(ValueError, match="weight_decay"):
        f(model, F.cross_entropy, train, test, [0], weight_decay=float("nan"), progress=False)
    with pytest.raises(ValueError, match="epsilon"):
        f(model, F.cross_entropy, train, test, [0], epsilon=float("inf"), progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        f(model, F.cross_entropy, train, test, [0], optimizer="lbfgs", progress=False)
    with pytest.raises(ValueError, match="steps"):
        f(model, F.cross_entropy, train, test, [0], steps=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        f(model, F.cross_entropy, train, test, [0], batch_size=31, progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        f(model, F.cross_entropy, train, test, [0], chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="test"):
        f(model, F.cross_entropy, train, (test[0], test[1][:-1]), [0], progress=False)
    with pytest.raises(ValueError, match="params"):
        f(model, F.cross_entropy, train, test, [0], params=["nope"], progress=False)
    with pytest.raises(TypeError, match="warm_start"):
        f(model, F.cross_entropy, train, test, [0], warm_start=False, progress=False)
    with pytest.raises(il.NonFiniteError, match="every PBRF diverged"):
        f(model, F.cross_entropy, train, test, [0, 1], damping=1.0, optimizer="sgd", lr=1e200, steps=50,
          progress=False)


def test_a_diverging_model_of_a_stack_stops_alone():
    from influence_lib.retrain import TrainConfig, minimize_stacked

    # model b minimises (a_b / 2)||theta||^2 by gradient descent: it diverges exactly when lr * a_b > 2
    a = torch.tensor([1.0, 1000.0, 0.5], dtype=torch.float64)
    theta0 = torch.ones(3, 4, dtype=torch.float64)

    def terms(th, rows):
        return 0.5 * a * (th * th).sum(1)

    cfg = TrainConfig(optimizer="sgd", lr=0.1, steps=300)
    out = minimize_stacked(terms, theta0, 1, cfg, on_nonfinite="stop")
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    expected = theta0[[0, 2]] * (1 - 0.1 * a[[0, 2]]).unsqueeze(1) ** 300  # the exact iterates
    torch.testing.assert_close(out[[0, 2]], expected, rtol=1e-12, atol=0)
    with pytest.raises(il.NonFiniteError, match="lr"):
        minimize_stacked(terms, theta0, 1, cfg)
    with pytest.raises(ValueError, match="on_nonfinite"):
        minimize_stacked(terms, theta0, 1, cfg, on_nonfinite="ignore")


TINY = {"dataset": "iris", "depth": 1, "width": 3, "activation": "tanh", "steps": 60, "loo_steps": 15,
        "n_random_test": 1, "weight_decay": 0.01, "damping": 0.1}


def test_experiment_records_pbrf_and_gauss_newton_without_changing_other_keys():
    from influence_lib import experiments as sweep
    from influence_lib.experiments.run_influence import run_setting
    from influence_lib.experiments.settings import normalize_setting

    # the optional keys at their defaults leave the setting (and so every existing record's key) unchanged
    assert normalize_setting({**TINY, "pbrf": False, "curvatures": ["hessian"], "pbrf_steps": 1000}) \
        == normalize_setting(TINY)
    assert "pbrf" not in normalize_setting(TINY)
    assert sweep.setting_key({**TINY, "curvatures": "hessian"}) == sweep.setting_key(TINY)
    setting = {**TINY, "curvatures": ["hessian", "gauss-newton"], "pbrf": True, "pbrf_steps": 200}
    assert sweep.setting_key(setting) != sweep.setting_key(TINY)
    rec = run_setting(setting)
    assert rec["pbrf"]["lr"] > 0 and len(rec["pbrf"]["relative_grad_norm"]) == 120
    assert max(rec["pbrf"]["relative_grad_norm"]) < 1e-3  # smooth model, damping 0.1: 200 steps solve every PBRF
    for tp in rec["test_points"]:
        gn = tp["curvatures"]["gauss-newton"]
        assert len(tp["pbrf"]["actual"]) == len(gn["predicted"]) == 120
        assert {"all", "top25_influence", "vs_loo"} <= set(tp["pbrf"])
        assert {"all", "top25_influence", "vs_reference", "pbrf"} <= set(gn)
        assert gn["pbrf"]["all"]["spearman"] > 0.99  # a small model with strong damping: PBRF ~ GN influence
    again = run_setting(setting)
    assert again["test_points"] == rec["test_points"]


def test_experiment_rejects_bad_pbrf_settings():
    from influence_lib.experiments.settings import normalize_setting

    with pytest.raises(ValueError, match="curvatures"):
        normalize_setting({**TINY, "curvatures": ["newton"]})
    with pytest.raises(ValueError, match="curvatures"):
        normalize_setting({**TINY, "curvatures": []})
    with pytest.raises(ValueError, match="pbrf"):
        normalize_setting({**TINY, "pbrf": "yes"})
    with pytest.raises(ValueError, match="pbrf_lr"):
        normalize_setting({**TINY, "pbrf": True, "pbrf_optimizer": "adam"})
    with pytest.raises(ValueError, match="pbrf_steps"):
        normalize_setting({**TINY, "pbrf": True, "pbrf_steps": 0})
    with pytest.raises(ValueError, match="pbrf_optimizer"):
        normalize_setting({**TINY, "pbrf": True, "pbrf_optimizer": "lbfgs"})
