"""The fused forward pass of stacked feed-forward networks equals the vmap path it replaces."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from influence_lib.models import build_model
from influence_lib.objective import Objective, flat_params
from influence_lib.retrain import TrainConfig, fit_stacked
from influence_lib.stacked import fused_data_terms, fused_value_and_grad, sequential_plan


def _vmap_terms(obj, normalization):
    def per_model(theta, w, xb, yb):
        out = obj.forward(theta, xb)
        losses = vmap(lambda o, t: F.cross_entropy(o.unsqueeze(0), t.unsqueeze(0)))(out, yb)
        denom = w.sum() if normalization == "remaining" else w.new_tensor(float(w.shape[0]))
        return (w * losses).sum() / denom

    return vmap(per_model, in_dims=(0, 0, None, None))


def _problem(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "image-mlp":
        X = torch.randn(24, 1, 4, 4, generator=g, dtype=torch.float64)
        model = build_model("mlp", in_shape=(1, 4, 4), n_classes=3, depth=2, width=6, activation="tanh", seed=seed,
                            dtype=torch.float64)
    elif kind == "linear":
        X = torch.randn(24, 5, generator=g, dtype=torch.float64)
        model = build_model("linear", in_shape=(5,), n_classes=3, seed=seed, dtype=torch.float64)
    else:
        X = torch.randn(24, 5, generator=g, dtype=torch.float64)
        model = build_model("mlp", in_shape=(5,), n_classes=3, depth=3, width=4, activation=kind, seed=seed,
                            dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return model, X, y


@pytest.mark.parametrize("kind", ["relu", "gelu", "linear", "image-mlp"])
@pytest.mark.parametrize("normalization", ["remaining", "full"])
def test_fused_terms_and_gradients_equal_the_vmap_path(kind, normalization):
    model, X, y = _problem(kind)
    obj = Objective(model, F.cross_entropy, X, y)
    B = 7
    gen = torch.Generator().manual_seed(1)
    Theta = flat_params(model).repeat(B, 1) + 0.1 * torch.randn(B, obj.p, generator=gen, dtype=torch.float64)
    W = (torch.rand(B, 24, generator=gen) > 0.3).double()
    fused = fused_data_terms(model, obj.spec.names, F.cross_entropy, normalization)
    assert fused is not None
    slow = _vmap_terms(obj, normalization)
    a = Theta.clone().requires_grad_(True)
    b = Theta.clone().requires_grad_(True)
    la, lb = fused(a, W, X, y), slow(b, W, X, y)
    (ga,) = torch.autograd.grad(la.sum(), a)
    (gb,) = torch.autograd.grad(lb.sum(), b)
    # the same objective; only the order of floating-point reductions may differ
    torch.testing.assert_close(la, lb, rtol=1e-13, atol=0)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-15)


def test_fused_training_equals_the_vmap_training_with_mini_batches(monkeypatch):
    import influence_lib.retrain as R

    model, X, y = _problem("relu", seed=3)
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.01)
    W = torch.ones(5, 24, dtype=torch.float64)
    W[torch.arange(5), torch.arange(5)] = 0
    cfg = TrainConfig(optimizer="adam", lr=0.01, steps=40, batch_size=5, seed=2)
    theta0 = flat_params(model).repeat(5, 1)
    fast = fit_stacked(obj, theta0, W, cfg)
    monkeypatch.setattr(R, "fused_value_and_grad", lambda *a, **k: None)  # autograd through the fused forward
    middle = fit_stacked(obj, theta0, W, cfg)
    monkeypatch.setattr(R, "fused_data_terms", lambda *a, **k: None)  # and through the vmap path
    slow = fit_stacked(obj, theta0, W, cfg)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(middle, slow, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["relu", "tanh", "sigmoid", "gelu", "softplus", "linear", "image-mlp"])
@pytest.mark.parametrize("normalization", ["remaining", "full"])
def test_hand_derived_gradient_equals_autograd(kind, normalization):
    """The backward pass of influence_lib.stacked (activations [B, features, n], softmax minus one-hot) gives the
    data terms and gradients autograd gives through the vmap path, for every activation it supports; a model whose
    weights are all zero (a mini-batch of removed points only) has data term 0 and gradient 0."""
    model, X, y = _problem(kind)
    if kind == "sigmoid":
        model[1] = nn.Sigmoid()
    if kind == "softplus":
        model[1] = nn.Softplus(beta=2.0)
    obj = Objective(model, F.cross_entropy, X, y)
    B = 6
    gen = torch.Generator().manual_seed(2)
    Theta = flat_params(model).repeat(B, 1) + 0.1 * torch.randn(B, obj.p, generator=gen, dtype=torch.float64)
    W = (torch.rand(B, 24, generator=gen) > 0.3).double()
    W[-1] = 0
    manual = fused_value_and_grad(model, obj.spec.names, F.cross_entropy, normalization)
    assert manual is not None
    data, grad = manual(Theta, manual.coefficients(W), manual.prepare(X, y))
    slow = _vmap_terms(obj, normalization)
    b = Theta.clone().requires_grad_(True)
    lb = slow(b, torch.where(W.sum(1, keepdim=True) == 0, torch.ones_like(W), W), X, y) * (W.sum(1) > 0)
    (gb,) = torch.autograd.grad(lb.sum(), b)
    torch.testing.assert_close(data, lb.detach(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, gb, rtol=1e-12, atol=1e-15)
    assert float(data[-1]) == 0 and float(grad[-1].abs().max()) == 0


def test_hand_derived_gradient_is_not_used_where_it_does_not_apply():
    mlp = build_model("mlp", in_shape=(5,), n_classes=3, depth=1, width=4, seed=0, dtype=torch.float64)
    names = [n for n, _ in mlp.named_parameters()]
    assert fused_value_and_grad(mlp, names, F.mse_loss, "remaining") is None
    assert fused_value_and_grad(mlp, names[-2:], F.cross_entropy, "remaining") is None
    late_flatten = nn.Sequential(nn.Linear(5, 4), nn.Flatten(), nn.Linear(4, 3)).double()
    assert fused_value_and_grad(late_flatten, [n for n, _ in late_flatten.named_parameters()], F.cross_entropy,
                                "remaining") is None


def test_other_architectures_and_losses_keep_the_general_path():
    cnn = build_model("small_cnn", in_shape=(1, 8, 8), n_classes=3, depth=1, width=2, seed=0, dtype=torch.float64)
    assert sequential_plan(cnn, [n for n, _ in cnn.named_parameters()]) is None
    mlp = build_model("mlp", in_shape=(5,), n_classes=3, depth=1, width=4, seed=0, dtype=torch.float64)
    names = [n for n, _ in mlp.named_parameters()]
    assert sequential_plan(mlp, names[-2:]) is None  # a subset of parameters
    assert fused_data_terms(mlp, names, F.mse_loss, "remaining") is None
    assert sequential_plan(nn.Sequential(nn.Linear(3, 2, bias=False)), ["0.weight"]) is None
