"""The dense Hessian assembled layer by layer (``Objective.dense_hessian``) is the Hessian: checked in float64
against every column by Hessian-vector products on the whole graph and against ``torch.autograd.functional.hessian``,
on models where the layer order is plain (MLP, CNN), where it is not (a residual CNN, a parameter used outside any
submodule, a layer applied twice), on parameter subsets, row subsets and in chunks; and the operator that switches to
the dense matrix does so once the products have cost as much as assembling it."""

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_classification, make_mlp
from torch import nn

import influence_lib as il
from influence_lib.models import resnet_style, small_cnn
from influence_lib.objective import ONE_BLOCK_MAX_P, Objective, dense_from_products


class _Scaled(nn.Module):
    """An MLP whose output is multiplied by a parameter of the root module (used outside any submodule)."""

    def __init__(self):
        super().__init__()
        self.body = make_mlp(in_dim=3, width=7, out_dim=3, depth=2, seed=5)
        self.temperature = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))

    def forward(self, x):
        return self.body(x) * self.temperature


class _Twice(nn.Module):
    """The same ``nn.Linear`` applied twice (a parameter that acts both early and late)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.inp = nn.Linear(3, 8).double()
        self.shared = nn.Linear(8, 8).double()
        self.out = nn.Linear(8, 3).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


def _images(n, seed, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g, dtype=torch.float64), torch.arange(n) % 4


def _problems():
    X, y = make_classification(n=24, seed=1)
    Xi, yi = _images(12, 2)
    return {
        "mlp": (make_mlp(in_dim=3, width=8, depth=2, seed=1), X, y),
        "cnn": (small_cnn(1, 4, image_size=8, depth=2, width=3, activation="tanh", seed=0, dtype=torch.float64),
                Xi, yi),
        "resnet": (resnet_style(1, 4, image_size=8, width=2, blocks=2, activation="tanh", seed=0,
                                dtype=torch.float64), Xi, yi),
        "scaled": (_Scaled(), X, y),
        "twice": (_Twice(), X, y),
    }


def _flat_loss(obj):
    return lambda th: obj.loss_fn(obj.forward(th, obj.X), obj.y) + 0.5 * obj.weight_decay * th.dot(th)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "scaled", "twice"])
def test_layerwise_hessian_is_the_hessian(name):
    model, X, y = _problems()[name]
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.01)
    th = obj.theta()
    assert obj.p > ONE_BLOCK_MAX_P and len(obj.parameter_groups()) > 1  # the layer-by-layer path is taken
    H = obj.hessian(th)
    every_column = dense_from_products(obj.hvp_operator(th), th, obj.p)
    torch.testing.assert_close(H, every_column, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H, torch.autograd.functional.hessian(_flat_loss(obj), th), rtol=1e-10, atol=1e-12)


def test_groups_follow_the_forward_order_and_later_layers_cost_less():
    model = small_cnn(1, 4, image_size=8, depth=2, width=3, activation="tanh", seed=0, dtype=torch.float64)
    obj = Objective(model, F.cross_entropy, *_images(6, 0))
    groups = obj.parameter_groups()
    names = [n for names, _ in groups for n in names]
    assert names == list(obj.spec.names)  # every selected parameter once, here in model order
    costs = [c for _, c in groups]
    assert costs[0] == pytest.approx(1.0)
    assert all(0 < b < a for a, b in zip(costs, costs[1:], strict=False))  # strictly downstream: cheaper
    assert obj.assembly_cost() < obj.p
    # a parameter used outside any submodule (here by the root module) is a group of its own, costed as the whole
    scaled = Objective(_Scaled(), F.cross_entropy, *make_classification(n=5))
    first, cost = scaled.parameter_groups()[0]
    assert first == ("temperature",) and cost == pytest.approx(1.0)


def test_parameter_subsets_rows_and_chunks():
    model, X, y = _problems()["cnn"]
    full = Objective(model, F.cross_entropy, X, y, weight_decay=0.02)
    H = full.hessian(full.theta())
    # a selection of parameters: the block of the full Hessian
    sel = ["0.weight", "3.weight", "3.bias", "7.weight"]
    part = Objective(model, F.cross_entropy, X, y, weight_decay=0.02, params=sel)
    idx, ordered = full._subset(sel)
    assert ordered == tuple(sel)
    torch.testing.assert_close(part.hessian(part.theta()), H[idx][:, idx], rtol=1e-10, atol=1e-12)
    # hvp_operator on a subset: products with the same block
    V = torch.randn(idx.numel(), 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(full.hvp_operator(full.theta(), params=sel)(V), H[idx][:, idx] @ V,
                               rtol=1e-10, atol=1e-12)
    # rows: the Hessian of those rows' objective
    rows = torch.tensor([0, 3, 4, 9])
    on_rows = Objective(model, F.cross_entropy, X[rows], y[rows], weight_decay=0.02)
    torch.testing.assert_close(full.dense_hessian(full.theta(), rows),
                               on_rows.hessian(on_rows.theta()), rtol=1e-10, atol=1e-12)
    # chunks: the same matrix
    chunked = Objective(model, F.cross_entropy, X, y, weight_decay=0.02, chunk_size=5)
    torch.testing.assert_close(chunked.hessian(chunked.theta()), H, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="subset of the selected parameters"):
        part.hvp_operator(part.theta(), params=["0.bias"])


def test_operator_densifies_after_p_columns_or_when_announced_products_cost_the_assembly():
    model, X, y = _problems()["cnn"]
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.01)
    H = obj.hessian(obj.theta())
    fast, plain = il.HessianOperator(obj), il.HessianOperator(obj, densify=False)
    k = 4
    assert k < fast.assembly_columns < obj.p  # a deeper model: the assembly costs less than p products
    V = torch.randn(obj.p, k, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    used = 0
    while used < obj.p:  # unannounced products: the switch after p columns
        assert fast._dense is None
        torch.testing.assert_close(fast.matmat(V), plain.matmat(V), rtol=1e-10, atol=1e-12)
        used += k
    assert fast._dense is not None and fast._apply is None  # the kept graph is let go once the matrix is there
    torch.testing.assert_close(fast._dense, H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.matmat(V), plain.matmat(V), rtol=1e-10, atol=1e-12)
    announced = il.HessianOperator(obj)
    announced.reserve(announced.assembly_columns - 1)  # cheaper than the assembly: products stay by AD
    assert announced._dense is None
    announced.reserve(announced.assembly_columns)
    assert announced._dense is not None
    torch.testing.assert_close(announced._dense, H, rtol=1e-10, atol=1e-12)


def test_cg_switches_to_the_dense_matrix_when_its_remaining_products_cost_more():
    model, X, y = _problems()["cnn"]
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.01)
    damping = max(0.0, -float(torch.linalg.eigvalsh(obj.hessian(obj.theta()))[0])) + 1e-3
    V = torch.randn(obj.p, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fast, plain = il.HessianOperator(obj), il.HessianOperator(obj, densify=False)
    switched_at = []
    real = fast._assemble
    fast._assemble = lambda block_size: switched_at.append(fast._columns) or real(block_size)
    a, info_a = il.ihvp_cg(fast, V, damping, tol=1e-10)
    b, info_b = il.ihvp_cg(plain, V, damping, tol=1e-10)
    # announced: the rest of the run would have cost more than the assembly, and the switch came well before its end
    assert fast._dense is not None and len(switched_at) == 1
    assert switched_at[0] < info_b["products"] / 2
    assert float((a - b).norm() / b.norm()) < 1e-8
    assert max(info_a["residual"]) <= 1e-10
    # a short run (a loose tolerance, one right-hand side) announces less than the assembly and stays on products
    short = il.HessianOperator(obj)
    _, info_s = il.ihvp_cg(short, V[:, :1], damping, tol=1e-2)
    assert short._dense is None and info_s["products"] < short.assembly_columns


def test_remaining_steps_of_a_geometric_residual():
    from influence_lib.solvers import remaining_steps
    rel0 = torch.ones(2, dtype=torch.float64)
    rel = torch.tensor([0.5 ** 4, 0.9 ** 4], dtype=torch.float64)  # four steps at rates 0.5 and 0.9
    tol = 1e-6
    expected = max(torch.log(torch.tensor(tol) / rel) / torch.log(torch.tensor([0.5, 0.9], dtype=torch.float64)))
    assert remaining_steps(rel, rel0, 4, tol) == pytest.approx(float(expected))
    assert remaining_steps(torch.tensor([1e-7]), torch.ones(1), 4, tol) == 0.0  # already there
    assert remaining_steps(torch.tensor([1.2]), torch.ones(1), 4, tol) == float("inf")  # not falling
