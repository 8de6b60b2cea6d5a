"""GaussNewtonOperator with kept linearizations (keep=True): the same products as the recomputed ones, memory within
its budget, and a recomputing fallback for a model torch.func.linearize cannot trace."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_classification, make_mlp
from torch import nn

import influence_lib as il
from influence_lib.curvature import kept_nbytes
from influence_lib.objective import Objective


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 4)).double()


def problems():
    g = torch.Generator().manual_seed(3)
    X_img = torch.randn(29, 2, 10, 10, generator=g, dtype=torch.float64)
    y_img = torch.randint(0, 4, (29,), generator=g)
    X, y = make_classification(n=33, seed=4)
    y_reg = torch.randn(33, 3, generator=g, dtype=torch.float64)
    return {
        # convolutional: the columns one at a time through the kept map
        "cnn, cross-entropy": (small_cnn(0), X_img, y_img, F.cross_entropy),
        # no convolution: the columns batched by vmap
        "mlp, cross-entropy": (make_mlp(seed=4), X, y, F.cross_entropy),
        # F.mse_loss: H_out by reverse-over-reverse (forward-over-reverse fails inside PyTorch)
        "mlp, mse": (make_mlp(seed=5), X, y_reg, F.mse_loss),
    }


@pytest.mark.parametrize("name", list(problems()))
def test_kept_products_equal_the_recomputed_ones(name):
    model, X, y, loss = problems()[name]
    obj = Objective(model, loss, X, y, weight_decay=0.03, chunk_size=7)
    ref_obj = Objective(model, loss, X, y, weight_decay=0.03, chunk_size=7)
    theta = obj.theta()
    V = torch.randn(obj.p, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = ref_obj.gnvp(theta, V)
    op = il.GaussNewtonOperator(obj)
    first = op.matmat(V)  # recomputed (a single product does not pay for the linearization)
    assert op._kept is None
    second = op.matmat(V)  # linearizes every chunk
    n_chunks = len(list(obj.chunks()))
    assert len(op._kept) == n_chunks and op.kept_bytes > 0
    third = op.matmat(V[:, :1])  # from the kept chunks only
    for out in (first, second):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(third, ref[:, :1], rtol=1e-12, atol=1e-13)
    # the dense matrix from kept products: symmetric, the same as the recomputed operator's
    G = op.dense()
    torch.testing.assert_close(G, G.T, rtol=0, atol=1e-13)
    torch.testing.assert_close(G, il.GaussNewtonOperator(ref_obj, keep=False).dense(), rtol=1e-11, atol=1e-13)


def test_kept_constants_are_plain_tensors_and_counted():
    """The traced pass's constants are folded outside any transform: plain tensors whose bytes can be counted (at
    least the chunk's inputs and every intermediate it keeps, here the first convolution's output)."""
    model, X, y, loss = problems()["cnn, cross-entropy"]
    obj = Objective(model, loss, X, y, weight_decay=0.03, chunk_size=7)
    chunk = obj.linearize_chunk(obj.theta(), slice(0, 7))
    assert kept_nbytes(chunk) >= 7 * 3 * 8 * 8 * 8  # the [7, 3, 8, 8] float64 conv output, at least once


def test_the_budget_bounds_what_is_kept():
    model, X, y, loss = problems()["cnn, cross-entropy"]
    obj = Objective(model, loss, X, y, weight_decay=0.03, chunk_size=7)
    one = kept_nbytes(obj.linearize_chunk(obj.theta(), slice(0, 7)))
    V = torch.randn(obj.p, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = obj.gnvp(obj.theta(), V)
    op = il.GaussNewtonOperator(obj)
    op.keep_budget = int(2.5 * one)  # room for two chunks, not three
    for _ in range(3):
        torch.testing.assert_close(op.matmat(V), ref, rtol=1e-12, atol=1e-13)
    assert len(op._kept) == 2 and op.kept_bytes <= op.keep_budget
    nothing = il.GaussNewtonOperator(obj)
    nothing.keep_budget = 0
    for _ in range(3):
        torch.testing.assert_close(nothing.matmat(V), ref, rtol=1e-12, atol=1e-13)
    assert nothing._kept == [] and nothing.kept_bytes == 0


class DataDependent(nn.Module):
    """A branch on the data's values: torch.func.linearize (torch.fx tracing) cannot follow it."""

    def __init__(self):
        super().__init__()
        self.lin = make_mlp(seed=6)

    def forward(self, x):
        out = self.lin(x)
        if float(x.sum()) > 0:
            out = out * 2.0
        return out


def test_a_model_linearize_cannot_trace_is_recomputed_with_a_warning():
    X, y = make_classification(n=20, seed=6)
    model = DataDependent()
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.03, chunk_size=6)
    V = torch.randn(obj.p, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = obj.gnvp(obj.theta(), V)
    op = il.GaussNewtonOperator(obj)
    op.matmat(V)
    with pytest.warns(UserWarning, match="could not trace"):
        second = op.matmat(V)
    torch.testing.assert_close(second, ref, rtol=1e-12, atol=1e-13)
    assert not op.keep
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(op.matmat(V), ref, rtol=1e-12, atol=1e-13)


def test_stochastic_rows_are_never_kept():
    X, y = make_classification(n=20, seed=7)
    obj = Objective(make_mlp(seed=7), F.cross_entropy, X, y, weight_decay=0.03)
    sub = il.GaussNewtonOperator(obj).on_rows(torch.tensor([0, 3, 5]))
    V = torch.randn(obj.p, 2, dtype=torch.float64)
    a, b = sub.matmat(V), sub.matmat(V)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not sub.keep and sub._kept is None
