"""Batched leave-one-out retraining against a plain sequential torch.optim loop."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_classification, make_mlp

import influence_lib as il
from influence_lib.models import build_model


def sequential_loo(model, X, y, Xt, yt, remove, *, wd, optimizer, lr, steps, momentum=0.0):
    """What a user writes by hand: copy the model, drop the point, train with torch.optim, measure."""

    def fit(Xs, ys):
        m = copy.deepcopy(model)
        opt = (torch.optim.Adam(m.parameters(), lr=lr) if optimizer == "adam"
               else torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum))
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(m(Xs), ys) + 0.5 * wd * sum((p * p).sum() for p in m.parameters())
            loss.backward()
            opt.step()
        with torch.no_grad():
            return F.cross_entropy(m(Xt), yt, reduction="none"), il.flat_params(m)

    ref, theta_ref = fit(X, y)
    out, thetas = [], []
    for i in remove:
        keep = torch.arange(len(X)) != i
        losses, theta = fit(X[keep], y[keep])
        out.append(losses - ref)
        thetas.append(theta)
    return torch.stack(out), torch.stack(thetas)


@pytest.fixture
def setup():
    model = make_mlp(in_dim=3, width=5, depth=2, seed=11)
    X, y = make_classification(n=24, seed=11)
    Xt, yt = make_classification(n=4, seed=12)
    return model, (X, y), (Xt, yt)


@pytest.mark.parametrize("optimizer,lr,momentum", [("adam", 0.01, 0.0), ("sgd", 0.2, 0.9), ("sgd", 0.3, 0.0)])
def test_batched_loo_equals_the_sequential_loop(setup, optimizer, lr, momentum):
    model, (X, y), (Xt, yt) = setup
    remove = [0, 5, 13, 23]
    expected, thetas = sequential_loo(model, X, y, Xt, yt, remove, wd=0.01, optimizer=optimizer, lr=lr, steps=150,
                                      momentum=momentum)
    res = il.retrain_without(model, F.cross_entropy, (X, y), (Xt, yt), remove, weight_decay=0.01,
                             optimizer=optimizer, lr=lr, steps=150, momentum=momentum, progress=False)
    assert res.loss_change.abs().max() > 1e-4  # the removals do change something
    torch.testing.assert_close(res.loss_change, expected, rtol=0, atol=1e-8)
    torch.testing.assert_close(res.theta, thetas, rtol=0, atol=1e-8)
    contract = il.loo_retrain(model, F.cross_entropy, (X, y), (Xt, yt), remove, weight_decay=0.01,
                              optimizer=optimizer, lr=lr, steps=150, momentum=momentum, progress=False)
    assert contract.shape == (4, 4)
    torch.testing.assert_close(contract, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name,kw", [("small_cnn", {"depth": 2, "width": 3}), ("resnet", {"blocks": 2, "width": 3}),
                                     ("vgg", {"stages": 2, "width": 2})])
def test_batched_loo_of_a_cnn_equals_the_sequential_loop(name, kw):
    # convolutional stacks are trained one model at a time with channels-last weights (retrain.fit_stacked): the
    # same numbers as a plain torch.optim loop on the channels-first model, to float64 rounding
    torch.manual_seed(0)
    X, y = torch.randn(12, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (12,))
    Xt, yt = torch.randn(3, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (3,))
    model = build_model(name, in_shape=(2, 8, 8), n_classes=3, seed=5, dtype=torch.float64, **kw)
    remove = [0, 7, 11]
    expected, thetas = sequential_loo(model, X, y, Xt, yt, remove, wd=0.01, optimizer="adam", lr=0.01, steps=40)
    res = il.retrain_without(model, F.cross_entropy, (X, y), (Xt, yt), remove, weight_decay=0.01,
                             optimizer="adam", lr=0.01, steps=40, progress=False)
    assert res.loss_change.abs().max() > 1e-4
    torch.testing.assert_close(res.loss_change, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.theta, thetas, rtol=0, atol=1e-10)


def test_channels_last_forward_is_the_same_function():
    torch.manual_seed(1)
    X, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    model = build_model("resnet", in_shape=(3, 8, 8), n_classes=4, seed=2, dtype=torch.float64, blocks=2, width=3)
    obj = il.Objective(model, F.cross_entropy, X, y)
    assert obj.is_convolutional
    theta = obj.theta()
    a, b = obj.forward(theta, X), obj.forward(theta, X, channels_last=True)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert not il.Objective(make_mlp(in_dim=3, width=4, depth=1, seed=0), F.cross_entropy,
                            *make_classification(n=5, seed=0)).is_convolutional


@pytest.mark.parametrize("batch_size", [None, 5])
def test_chunk_size_does_not_change_results_and_runs_are_bit_identical(setup, batch_size):
    model, train, test = setup
    kw = dict(weight_decay=0.01, lr=0.01, steps=60, batch_size=batch_size, seed=3, progress=False)
    remove = list(range(10))
    a = il.loo_retrain(model, F.cross_entropy, train, test, remove, **kw)
    b = il.loo_retrain(model, F.cross_entropy, train, test, remove, chunk_size=3, **kw)
    c = il.loo_retrain(model, F.cross_entropy, train, test, remove, chunk_size=1, **kw)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    torch.testing.assert_close(c, a, rtol=0, atol=1e-10)
    again = il.loo_retrain(model, F.cross_entropy, train, test, remove, **kw)
    assert torch.equal(again, a)


def test_minibatch_training_is_seeded_and_seed_matters(setup):
    model, train, test = setup
    kw = dict(weight_decay=0.0, lr=0.05, steps=40, batch_size=4, progress=False)
    a = il.loo_retrain(model, F.cross_entropy, train, test, [1, 2], seed=0, **kw)
    b = il.loo_retrain(model, F.cross_entropy, train, test, [1, 2], seed=1, **kw)
    assert not torch.allclose(a, b)


def test_from_scratch_uses_one_seeded_initialisation(setup):
    model, (X, y), test = setup
    res = il.retrain_without(model, F.cross_entropy, (X, y), test, [3], warm_start=False, seed=7, lr=0.01,
                             steps=50, progress=False)
    fresh = copy.deepcopy(model)
    il.set_flat_params(fresh, il.retrain.initial_params(model, 7))
    assert not torch.allclose(il.flat_params(fresh), il.flat_params(model))
    il.train_model(fresh, F.cross_entropy, (X, y), lr=0.01, steps=50)
    torch.testing.assert_close(res.theta_ref, il.flat_params(fresh), rtol=0, atol=1e-12)
    state = torch.random.get_rng_state()
    il.retrain.initial_params(model, 7)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_train_model_reaches_a_stationary_point():
    model = make_mlp(seed=2)
    X, y = make_classification(n=30, seed=2)
    before = il.train_model(model, F.cross_entropy, (X, y), weight_decay=0.05, lr=0.05, steps=1)
    out = il.train_model(model, F.cross_entropy, (X, y), weight_decay=0.05, optimizer="sgd", lr=0.5, momentum=0.9,
                         steps=800)
    assert out["loss"] < before["loss"] and out["grad_norm"] < 1e-6


def test_retrain_rejects_bad_input(setup):
    model, train, test = setup
    f = il.loo_retrain
    with pytest.raises(ValueError, match="remove"):
        f(model, F.cross_entropy, train, test, [24], progress=False)
    with pytest.raises(ValueError, match="remove"):
        f(model, F.cross_entropy, train, test, [], progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        f(model, F.cross_entropy, train, test, [0], optimizer="lbfgs", progress=False)
    with pytest.raises(ValueError, match="steps"):
        f(model, F.cross_entropy, train, test, [0], steps=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        f(model, F.cross_entropy, train, test, [0], batch_size=1000, progress=False)
    with pytest.raises(ValueError, match="reference"):
        f(model, F.cross_entropy, train, test, [0], warm_start=False, reference="original", progress=False)
    with pytest.raises(ValueError, match="test"):
        f(model, F.cross_entropy, train, (test[0], test[1][:-1]), [0], progress=False)
    relu_model = make_mlp(in_dim=3, width=5, depth=2, seed=11, act=torch.nn.ReLU)
    with pytest.raises(il.NonFiniteError, match="lr"):
        f(relu_model, F.cross_entropy, train, test, [0], optimizer="sgd", lr=1e200, steps=50, progress=False)


@pytest.mark.parametrize("optimizer,lr,momentum", [("adam", 0.02, 0.0), ("sgd", 0.2, 0.9)])
def test_train_stack_equals_training_each_model_alone(optimizer, lr, momentum):
    """B seeds trained in one stack: each row is the model torch.optim trains alone from that seed's initialisation
    (float64, to rounding), with the loss and gradient norm train_model reports for it; the model passed is left
    unchanged."""
    X, y = make_classification(n=30, seed=4)
    models = [make_mlp(in_dim=3, width=5, depth=2, seed=s) for s in range(4)]
    theta0 = torch.stack([il.flat_params(m) for m in models])
    Theta, loss, grad_norm = il.train_stack(models[0], F.cross_entropy, (X, y), theta0, weight_decay=0.01,
                                            optimizer=optimizer, lr=lr, momentum=momentum, steps=150)
    assert torch.equal(il.flat_params(models[0]), theta0[0])
    for b, m in enumerate(models):
        alone = copy.deepcopy(m)
        report = il.train_model(alone, F.cross_entropy, (X, y), weight_decay=0.01, optimizer=optimizer, lr=lr,
                                momentum=momentum, steps=150)
        opt = (torch.optim.Adam(m.parameters(), lr=lr) if optimizer == "adam"
               else torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum))
        for _ in range(150):
            opt.zero_grad()
            (F.cross_entropy(m(X), y) + 0.005 * sum((p * p).sum() for p in m.parameters())).backward()
            opt.step()
        torch.testing.assert_close(Theta[b], il.flat_params(m), rtol=0, atol=1e-10)
        torch.testing.assert_close(Theta[b], il.flat_params(alone), rtol=0, atol=1e-12)
        assert loss[b].item() == pytest.approx(report["loss"], rel=1e-10)
        assert grad_norm[b].item() == pytest.approx(report["grad_norm"], rel=1e-8)
    with pytest.raises(ValueError, match="theta0"):
        il.train_stack(models[0], F.cross_entropy, (X, y), theta0[0])
    with pytest.raises(il.NonFiniteError):
        il.train_stack(models[0], F.cross_entropy, (X, y), theta0 * float("nan"))
