"""Fixtures shared by the tests (float64 throughout, CPU)."""

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_classification, make_mlp
from torch import nn

import influence_lib as il

torch.set_num_threads(1)  # tiny models: one thread is fastest and keeps timings stable


@pytest.fixture
def nonconvex_problem():
    """A random-init tanh MLP whose Hessian has negative eigenvalues (asserted)."""
    model = make_mlp(seed=1)
    X, y = make_classification(n=30, seed=1)
    H = il.hessian(model, F.cross_entropy, (X, y), weight_decay=0.01)
    evals = torch.linalg.eigvalsh(H)
    assert evals[0] < -1e-3, "fixture must be non-convex"
    return model, (X, y), H, evals


@pytest.fixture
def convex_problem():
    """Multiclass logistic regression with weight decay: H positive definite."""
    X, y = make_classification(n=50, d=4, seed=2)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
        model.bias.zero_()
    H = il.hessian(model, F.cross_entropy, (X, y), weight_decay=0.05)
    return model, (X, y), H
