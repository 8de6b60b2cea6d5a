"""The hand-derived MLP Hessian (influence_lib.mlp_hessian) against autograd's dense Hessian of the same objective."""

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_classification, make_mlp
from torch import nn

import influence_lib as il
from influence_lib import mlp_hessian
from influence_lib.objective import Objective


def autograd_hessian(obj: Objective) -> torch.Tensor:
    """``d^2 J / d theta^2`` by torch.autograd.functional.hessian (no code of influence_lib's Hessian paths)."""
    return torch.autograd.functional.hessian(obj.loss, obj.theta())


def softplus_near_threshold():
    return nn.Softplus(beta=2.0, threshold=1.0)  # beta * z > threshold for part of the data: the linear branch too


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU, nn.Identity, nn.GELU, softplus_near_threshold])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_the_mlp_hessian_is_the_autograd_hessian(act, depth):
    model = make_mlp(in_dim=3, width=4, out_dim=3, depth=depth, seed=depth, act=act)
    X, y = make_classification(n=25, seed=depth)
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.03)
    assert obj._mlp_plan() is not None
    H = obj.dense_hessian(obj.theta())
    ref = autograd_hessian(obj)
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-12)


def test_rows_blocks_and_flattened_images(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    X = torch.randn(30, 1, 3, 4, dtype=torch.float64)
    y = torch.arange(30) % 4
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.0)
    assert obj._mlp_plan() is not None
    rows = torch.tensor([0, 3, 4, 9, 17, 29])
    monkeypatch.setattr(mlp_hessian, "BLOCK_ELEMENTS", 100)  # the directions in many small blocks
    H = obj.dense_hessian(obj.theta(), rows)
    sub = Objective(model, F.cross_entropy, X[rows], y[rows])
    torch.testing.assert_close(H, autograd_hessian(sub), rtol=1e-10, atol=1e-12)


def test_where_the_hand_derived_pass_does_not_apply_autograd_does():
    X, y = make_classification(n=20)
    cases = {
        "mse loss": (make_mlp(), lambda out, t: F.mse_loss(out, F.one_hot(t, 3).double())),
        "tanh-approximate GELU": (make_mlp(act=lambda: nn.GELU(approximate="tanh")), F.cross_entropy),
        "two activations in a row": (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.ReLU(), nn.Linear(4, 3)).double(),
                                     F.cross_entropy),
        "a layer without bias": (nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)).double(),
                                 F.cross_entropy),
    }
    for name, (model, loss) in cases.items():
        obj = Objective(model, loss, X, y, weight_decay=0.01)
        assert obj._mlp_plan() is None, name
        torch.testing.assert_close(obj.dense_hessian(obj.theta()), autograd_hessian(obj), rtol=1e-9, atol=1e-11)
    # a subset of the parameters: the plan needs them all
    model = make_mlp()
    obj = Objective(model, F.cross_entropy, X, y, params=["2.weight", "2.bias"])
    assert obj._mlp_plan() is None


def test_exact_influence_on_an_mlp_is_unchanged_by_the_fast_hessian():
    model = make_mlp(depth=2, seed=4)
    X, y = make_classification(n=40, seed=4)
    calc = il.InfluenceCalculator(model, F.cross_entropy, (X, y), weight_decay=0.05, damping=0.1)
    S = calc.scores((X[:4], y[:4]))
    H = autograd_hessian(Objective(model, F.cross_entropy, X, y, weight_decay=0.05))
    def flat_grad(i: int) -> torch.Tensor:
        loss = F.cross_entropy(model(X[i:i + 1]), y[i:i + 1])
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])

    G = torch.stack([flat_grad(i) for i in range(40)])
    ref = G[:4] @ torch.linalg.solve(H + 0.1 * torch.eye(H.shape[0], dtype=H.dtype), G.T) / 40
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-12)
