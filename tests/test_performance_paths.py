"""The fast paths give the same numbers as the plain ones: a HessianOperator that switches to its dense
matrix after many products, and the single vectorised gradient pass of ``InfluenceCalculator.scores``."""

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_classification, make_mlp

import influence_lib as il
from influence_lib.objective import Objective


def _objective():
    model = make_mlp(in_dim=3, width=4, depth=2, seed=3)
    X, y = make_classification(n=30, seed=3)
    return model, (X, y), Objective(model, F.cross_entropy, X, y, weight_decay=0.01)


def test_operator_densifies_after_p_columns_with_the_same_products():
    _, _, obj = _objective()
    fast, plain = il.HessianOperator(obj), il.HessianOperator(obj, densify=False)
    H = obj.hessian(obj.theta())
    V = torch.randn(obj.p, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    used = 0
    while used < obj.p + 10:
        assert torch.allclose(fast.matmat(V), plain.matmat(V), rtol=1e-12, atol=1e-13)
        used += V.shape[1]
    assert fast._dense is not None and plain._dense is None
    assert torch.allclose(fast._dense, H, rtol=1e-12, atol=1e-13)
    assert torch.allclose(fast.matvec(V[:, 0]), H @ V[:, 0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mlp_pass", [True, False])
def test_full_batch_lissa_assembles_the_matrix_first_only_when_that_is_cheaper(monkeypatch, mlp_pass):
    _, _, obj = _objective()
    if not mlp_pass:  # the matrix from products with unit vectors, as for any model that is not a plain MLP
        obj._mlp = None
    damping = max(0.0, -float(torch.linalg.eigvalsh(obj.hessian(obj.theta()))[0])) + 0.1
    V = torch.randn(obj.p, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for depth, dense_first in [(obj.p, True), (obj.p // 2 - 1, False)]:  # depth * 2 columns vs p
        op = il.HessianOperator(obj)
        seen = []
        real = op._hvp
        monkeypatch.setattr(op, "_hvp", lambda W, real=real, seen=seen: seen.append(W.shape[1]) or real(W))
        a, _ = il.ihvp_lissa(op, V, damping, depth=depth, scale=20.0)
        b, _ = il.ihvp_lissa(il.HessianOperator(obj, densify=False), V, damping, depth=depth, scale=20.0)
        assert float((a - b).norm() / b.norm()) < 1e-10
        # unit vectors only (none at all where the hand-derived MLP pass makes the matrix), or products only
        assert sum(seen) == ((0 if mlp_pass else obj.p) if dense_first else 2 * depth)
    sub = il.HessianOperator(obj).on_rows(torch.arange(10))
    # a subset's Hessian is never densified (damping + 1: the 10-row Hessian is more indefinite than the full one,
    # and LiSSA refuses a series that diverges)
    il.ihvp_lissa(sub, V, damping + 1.0, depth=obj.p, scale=20.0)
    assert sub._dense is None


def test_operator_never_densifies_on_row_subsets_or_large_p():
    _, _, obj = _objective()
    sub = il.HessianOperator(obj).on_rows(torch.arange(10))
    assert not sub.densify
    old = il.HessianOperator.densify_max_size
    try:
        il.HessianOperator.densify_max_size = obj.p - 1
        assert not il.HessianOperator(obj).densify
    finally:
        il.HessianOperator.densify_max_size = old


def test_solvers_agree_with_and_without_densify():
    _, _, obj = _objective()
    V = torch.randn(obj.p, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    damping = max(0.0, -float(torch.linalg.eigvalsh(obj.hessian(obj.theta()))[0])) + 0.1
    for solve, kw in [(il.ihvp_cg, {"tol": 1e-10}), (il.ihvp_lissa, {"depth": 200})]:
        a, _ = solve(il.HessianOperator(obj), V, damping, **kw)
        b, _ = solve(il.HessianOperator(obj, densify=False), V, damping, **kw)
        assert float((a - b).norm() / b.norm()) < 1e-8


def test_scores_single_pass_equals_chunked():
    model, train, _ = _objective()
    test = make_classification(n=7, seed=9)
    one = il.influence(model, F.cross_entropy, train, test, weight_decay=0.01, damping=0.1)
    chunked = il.influence(model, F.cross_entropy, train, test, weight_decay=0.01, damping=0.1, chunk_size=4)
    assert torch.allclose(one, chunked, rtol=1e-10, atol=1e-14)
