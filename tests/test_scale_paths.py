"""The paths that run at scale: layer-wise EK-FAC scoring with bounded memory, EK-FAC-preconditioned CG, and
data given as a Dataset / DataLoader. Tiny float64 models; every check is an agreement with a dense or
independent computation, or an invariance (chunking), never a timing or an exact iteration count."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import influence_lib as il
from influence_lib.curvature import GaussNewtonOperator, HessianOperator
from influence_lib.ekfac import EKFACSolver
from influence_lib.layer_grads import Layer, LayerGradients, example_groups, input_rows, row_matrix, scratch
from influence_lib.models import mlp
from influence_lib.objective import Objective
from influence_lib.preconditioned import ihvp_pcg

D = torch.float64
influence_mod = importlib.import_module("influence_lib.influence")
layer_grads_mod = importlib.import_module("influence_lib.layer_grads")  # the module (il.influence is the function)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _cnn_data(n=30, m=4):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n + m, 1, 9, 9, generator=g, dtype=D)
    y = torch.randint(0, 3, (n + m,), generator=g)
    return (X[:n], y[:n]), (X[n:], y[n:])


def _reference_ekfac_scores(net, train, test, wd, damping):
    """The flat route: full per-example gradients [n, p] and the EK-FAC solve of the test gradients."""
    calc = il.InfluenceCalculator(net, F.cross_entropy, train, weight_decay=wd, damping=damping, method="ekfac")
    obj = calc.objective  # per-example gradients by vmap over examples, independent of influence_lib.layer_grads
    Gt, Gi = (torch.cat([g for _, g in obj.per_sample_grads(calc.theta, *d)]) for d in (test, train))
    return (Gi @ calc.ihvp(Gt.T)).T / train[0].shape[0]


# --- 1. EK-FAC: layer-wise scores, chunk invariance, no [n, p] --------------------------------------------
@pytest.mark.parametrize("options", [{}, {"samples": 2, "seed": 3}, {"fisher": "empirical"}])
def test_ekfac_kept_first_pass_equals_the_streamed_passes(options):
    # one pass kept in memory (the default budget) against three streamed passes (a budget too small to keep
    # anything), in chunks of 7 rows either way: the same factors, eigenvalues and scores; and a preconditioner
    # (for_scores=False) keeps nothing after fitting
    net, (train, test) = _cnn(), _cnn_data()
    obj = Objective(net, F.cross_entropy, *train, weight_decay=1e-2, chunk_size=7)
    kept, streamed = EKFACSolver(obj, damping=0.1, **options), EKFACSolver(obj, damping=0.1, memory_budget=1, **options)
    assert kept.passes == 1 and streamed.passes == 2
    for a, b in zip(kept.Lam + kept.QS, streamed.Lam + streamed.QS, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kept.scores(*test), streamed.scores(*test), rtol=1e-11, atol=1e-14)
    assert EKFACSolver(obj, damping=0.1, for_scores=False, **options)._kept is None


def _cnn_one_channel():
    # a second convolution with one output channel: recomputed at its outputs, it takes the per-column branch of the
    # kept eigenvalue correction (few columns, many positions)
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 1, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(25, 3)).double()


@pytest.mark.parametrize("options", [{}, {"samples": 2, "seed": 3}, {"fisher": "empirical"}])
@pytest.mark.parametrize("make", [_cnn, _cnn_one_channel])
def test_every_keep_plan_gives_the_streamed_values(make, options):
    # budgets just below what each plan keeps walk through the plans in turn, down to streaming: (1) every layer
    # kept, (2) the first convolution kept as per-example gradients and the other layers recomputed by partial
    # passes, none; each with the factors, eigenvalues and scores of three streamed passes, the passes counted
    net, (train, test) = make(), _cnn_data()
    obj = Objective(net, F.cross_entropy, *train, weight_decay=1e-2, chunk_size=7)
    streamed = EKFACSolver(obj, damping=0.1, memory_budget=1, **options)
    assert streamed.keep_plan is None
    want = streamed.scores(*test)
    assert streamed.passes == 3
    chunk = 7 * streamed.grads.chunk_bytes_per_row()
    budget, seen = 2**40, []
    while True:
        ek = EKFACSolver(obj, damping=0.1, memory_budget=budget, **options)
        plan = ek.keep_plan
        if plan is None:
            break
        assert chunk + plan.bytes <= budget
        seen.append(plan.forms)
        for a, b in zip(ek.Lam + ek.QS + ek.QA, streamed.Lam + streamed.QS + streamed.QA, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert ek.passes == (2 if plan.recomputed else 1)
        torch.testing.assert_close(ek.scores(*test), want, rtol=1e-11, atol=1e-14)
        assert ek.passes == (3 if plan.recomputed else 1)
        budget = chunk + plan.bytes - 1
    assert "recompute" not in seen[0] and {"rows", "gradient"} <= set(seen[0])
    if "samples" in options:  # the eigenvalues' own random columns would be backpropagated in full in any case
        assert len(seen) == 1
    else:
        assert len(seen) == 2 and seen[1][0] == "gradient" and set(seen[1][1:]) == {"recompute"}


def test_backward_cost_counts_the_input_gradients_below_the_output():
    # the cost model of EK-FAC's partial passes: 2 T out d_in per layer called after the earliest one asked for
    net, (train, _) = _cnn(), _cnn_data()
    grads = LayerGradients(Objective(net, F.cross_entropy, *train), Objective(net, F.cross_entropy, *train).theta())
    conv2, lin1, lin2 = 2 * 4 * 4 * 12, 2 * 1 * 5 * 16, 2 * 1 * 3 * 5  # T out d_in: 2x2 outputs of a 3->4 2x2 conv
    assert grads.backward_flops() == conv2 + lin1 + lin2
    assert grads.backward_flops([1, 3]) == lin1 + lin2 and grads.backward_flops([3]) == 0


def test_ekfac_reuses_the_calculators_layer_gradients_only_for_its_own_objective():
    net, (train, test) = _cnn(), _cnn_data()
    calc = il.InfluenceCalculator(net, F.cross_entropy, train, weight_decay=1e-2, damping=0.1, method="ekfac")
    calc.scores(test)
    assert calc.solver.grads is calc._layer_grads  # its one-row probe is not made twice
    other = Objective(net, F.cross_entropy, *_cnn_data(n=12)[0], weight_decay=1e-2)
    assert EKFACSolver(other, damping=0.1, layer_gradients=calc._layer_grads).grads is not calc._layer_grads


def test_empirical_fisher_ekfac_is_the_empirical_fisher_in_its_eigenbasis():
    # fisher="empirical": the factor S is the sum of the loss gradients' outer products at the layer outputs (for
    # an MLP, the bias columns of the per-example gradients), and the corrected eigenvalues are the exact diagonal
    # of the empirical Fisher (1/n) sum_i g_i g_i^T of the per-example gradients in the Kronecker eigenbasis
    from test_ekfac import _layer_index
    net = mlp(4, 3, depth=2, width=5, activation="tanh", seed=0, dtype=D)
    g = torch.Generator().manual_seed(6)
    X, y = torch.randn(40, 4, generator=g, dtype=D), torch.randint(0, 3, (40,), generator=g)
    obj = Objective(net, F.cross_entropy, X, y, weight_decay=1e-2, chunk_size=9)
    ek = EKFACSolver(obj, damping=0.1, fisher="empirical")
    Gi = torch.cat([gi for _, gi in obj.per_sample_grads(obj.theta(), X, y)])  # [n, p] by vmap
    F_emp = Gi.T @ Gi / obj.n
    for L, QA, QS, lam in zip(ek.layers, ek.QA, ek.QS, ek.Lam, strict=True):
        f = _layer_index(L)
        Q = torch.kron(QS, QA)
        torch.testing.assert_close(lam, torch.diagonal(Q.T @ F_emp[f][:, f] @ Q).reshape(L.out, L.cols),
                                   rtol=1e-9, atol=1e-12)
        gb = Gi[:, L.b_slice]  # the loss gradients into the layer's outputs
        R = QS.T @ (gb.T @ gb) @ QS  # diagonal in the eigenbasis of S
        torch.testing.assert_close(R - torch.diag(torch.diagonal(R)), torch.zeros_like(R), rtol=0, atol=1e-10)
    want = _reference_ekfac_scores(net, (X, y), (X[:3], y[:3]), 1e-2, 0.1)  # the true Fisher: another matrix
    got = il.influence(net, F.cross_entropy, (X, y), (X[:3], y[:3]), weight_decay=1e-2, method="ekfac", damping=0.1,
                       fisher="empirical")
    assert got.shape == want.shape and not torch.allclose(got, want)
    with pytest.raises(ValueError, match="samples applies to fisher='true'"):
        EKFACSolver(obj, damping=0.1, fisher="empirical", samples=2)
    with pytest.raises(ValueError, match="fisher"):
        EKFACSolver(obj, damping=0.1, fisher="sampled")


def test_layerwise_ekfac_scores_equal_the_flat_route_for_every_chunking(monkeypatch):
    net, (train, test) = _cnn(), _cnn_data()
    want = _reference_ekfac_scores(net, train, test, 1e-2, 0.1)
    # the layer-wise path must not form the per-example gradients of all parameters at all
    monkeypatch.setattr(Objective, "per_sample_grads", lambda *a, **k: pytest.fail("flat per-example gradients"))
    for opts in ({}, {"chunk_size": 7}, {"chunk_size": 1}, {"memory_budget": 1}):
        got = il.influence(net, F.cross_entropy, train, test, weight_decay=1e-2, method="ekfac", damping=0.1,
                           **opts)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    monkeypatch.setattr(layer_grads_mod, "SCORE_GROUP_BYTES", 1)  # the per-example gradients one at a time
    got = il.influence(net, F.cross_entropy, train, test, weight_decay=1e-2, method="ekfac", damping=0.1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_ekfac_chunks_follow_the_memory_budget():
    net, (train, _) = _cnn(), _cnn_data()
    obj = Objective(net, F.cross_entropy, *train, weight_decay=1e-2)
    small, large = EKFACSolver(obj, damping=0.1, memory_budget=1), EKFACSolver(obj, damping=0.1)
    assert small.rows == 1 and large.rows == train[0].shape[0]  # 1 byte -> one row; the default fits 30 rows
    assert EKFACSolver(Objective(net, F.cross_entropy, *train, chunk_size=4), damping=0.1).rows == 4
    for a, b in zip(small.Lam + small.QA, large.Lam + large.QA, strict=True):
        torch.testing.assert_close(a.abs(), b.abs(), rtol=1e-9, atol=1e-12)  # eigenvectors up to sign
    # the default budget holds all 30 rows' inputs and columns: one pass kept for the eigenvalues and the scores;
    # one byte holds nothing: factors, eigenvalue correction and the scores stream a pass each
    assert large.passes == 1 and small.passes == 2
    test = _cnn_data()[1]
    large.scores(*test), small.scores(*test)
    assert large.passes == 1 and small.passes == 3
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(300, 4, generator=g, dtype=D), torch.randint(0, 3, (300,), generator=g)
    many = Objective(mlp(4, 3, depth=1, width=5, seed=0, dtype=D), F.cross_entropy, X, y, weight_decay=1e-2)
    assert EKFACSolver(many, damping=0.1).rows == layer_grads_mod.MAX_CHUNK_ROWS < 300  # small rows: the cap holds


def test_sampled_ekfac_is_deterministic_chunk_invariant_and_close_to_exact():
    net = mlp(4, 3, depth=2, width=6, activation="tanh", seed=0, dtype=D)
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(80, 4, generator=g, dtype=D), torch.randint(0, 3, (80,), generator=g)
    obj = Objective(net, F.cross_entropy, X, y, weight_decay=1e-2)
    exact = EKFACSolver(obj, damping=0.1)
    a = EKFACSolver(obj, damping=0.1, samples=8, seed=1)
    b = EKFACSolver(Objective(net, F.cross_entropy, X, y, weight_decay=1e-2, chunk_size=9), damping=0.1,
                    samples=8, seed=1)
    for la, lb in zip(a.Lam, b.Lam, strict=True):
        torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-14)  # the signs belong to rows, not chunks
    V = torch.randn(obj.p, 3, generator=g, dtype=D)
    # an unbiased estimate of the same matrix: 8 sign vectors per point x 80 points, a loose bound
    assert il.pearson(a.solve(V).flatten(), exact.solve(V).flatten()) > 0.95
    with pytest.raises(ValueError, match="samples"):
        EKFACSolver(obj, damping=0.1, samples=0)


def test_other_methods_score_in_row_chunks_without_chunk_size(monkeypatch):
    # the vmap route, for models whose parameters are not all in Linear/Conv2d layers (forced here)
    net, (train, test) = _cnn(), _cnn_data()
    want = il.influence(net, F.cross_entropy, train, test, weight_decay=1e-2, method="exact", damping=0.1)
    monkeypatch.setattr(LayerGradients, "supports", classmethod(lambda cls, obj, theta: None))
    seen = []
    orig = Objective.per_sample_grads

    def spy(self, theta, X, y):
        seen.append(X.shape[0])
        return orig(self, theta, X, y)

    monkeypatch.setattr(Objective, "per_sample_grads", spy)
    p = sum(t.numel() for t in net.parameters())
    monkeypatch.setattr(influence_mod, "SCORE_ONE_PASS_MAX", 5 * p)  # a budget of 5 rows of gradients
    got = il.influence(net, F.cross_entropy, train, test, weight_decay=1e-2, method="exact", damping=0.1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert max(seen) <= 5  # never more than the budget's rows of [rows, p] gradients at once


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + torch.tanh(self.conv(x))


class _Shared(nn.Module):  # one Linear called twice: its per-example gradient is not g^T a of one call
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x.flatten(1)[:, :4])))))


@pytest.mark.parametrize("case", ["mlp", "cnn", "residual-strided", "conv-geometry", "last-layer", "no-bias", "mse"])
def test_layer_gradients_equal_vmap_per_example_gradients(case):
    torch.manual_seed(1)
    X, y = torch.randn(9, 1, 9, 9, dtype=D), torch.randint(0, 3, (9,))
    loss, params = F.cross_entropy, None
    if case == "mlp":
        net, X = mlp(5, 3, depth=2, width=6, activation="tanh", seed=0, dtype=D), torch.randn(9, 5, dtype=D)
    elif case in ("cnn", "last-layer"):
        net = _cnn()
        params = ["8.weight", "8.bias"] if case == "last-layer" else None
    elif case == "residual-strided":
        net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), _Residual(), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(3, 3)).double()
    elif case == "conv-geometry":  # non-square kernel, unequal strides and padding, dilation, several channels in
        net = nn.Sequential(nn.Conv2d(1, 3, 2), nn.Tanh(),
                            nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), nn.Tanh(),
                            nn.Flatten(), nn.Linear(4 * 3 * 11, 3)).double()
    elif case == "no-bias":
        net = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(98, 3, bias=False))
        net = net.double()
    else:  # mse: float targets, two outputs
        net, y = nn.Sequential(nn.Flatten(), nn.Linear(81, 4), nn.Tanh(), nn.Linear(4, 2)).double(), torch.randn(9, 2,
                                                                                                            dtype=D)
        loss = F.mse_loss
    obj = Objective(net, loss, X, y, params=params)
    lg = LayerGradients.supports(obj, obj.theta())
    assert lg is not None
    want = torch.cat([g for _, g in obj.per_sample_grads(obj.theta(), X, y)])
    torch.testing.assert_close(lg.flat_per_example(X, y), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("geometry", [dict(kernel_size=3), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)),
                                      dict(kernel_size=2, dilation=(2, 3), stride=2, padding=1),
                                      dict(kernel_size=1, stride=3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_convolution_input_rows_equal_unfold(geometry, bias, channels_last):
    conv = nn.Conv2d(3, 2, bias=bias, **geometry).double()
    x = torch.randn(4, 3, 8, 9, dtype=D)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layer = Layer(conv, "weight", "bias" if bias else None, slice(0), None, 2, 3 * conv.kernel_size[0] *
                  conv.kernel_size[1])
    want = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    want = want.transpose(1, 2)
    if bias:
        want = torch.cat([want, want.new_ones(*want.shape[:2], 1)], 2)
    got = input_rows(layer, x)
    assert torch.equal(got, want)  # the same numbers, copied: no arithmetic
    # every row of the chunk as one [cols, b*T] matrix, without a copy of the patch-major buffer
    assert torch.equal(row_matrix(got), want.reshape(-1, want.shape[2]).T)
    assert row_matrix(got).data_ptr() == got.data_ptr()


def test_layer_gradients_refuse_what_they_cannot_compute_and_scores_fall_back():
    X, y = torch.randn(10, 1, 3, 3, dtype=D), torch.randint(0, 3, (10,))
    shared = _Shared().double()
    assert LayerGradients.supports(Objective(shared, F.cross_entropy, X, y), il.flat_params(shared)) is None
    normed = nn.Sequential(nn.Flatten(), nn.Linear(9, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    assert LayerGradients.supports(Objective(normed, F.cross_entropy, X, y), il.flat_params(normed)) is None
    for net in (shared, normed):  # the vmap route: the same scores as the dense formula
        calc = il.InfluenceCalculator(net, F.cross_entropy, (X, y), weight_decay=0.1, damping=0.1)
        obj = calc.objective
        G = torch.cat([g for _, g in obj.per_sample_grads(calc.theta, X, y)])
        want = G @ torch.linalg.solve(obj.hessian(calc.theta) + 0.1 * torch.eye(obj.p, dtype=D), G.T) / 10
        torch.testing.assert_close(calc.scores((X, y)), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method,opts", [("exact", {}), ("cg", {"curvature": "gauss-newton", "tol": 1e-12}),
                                         ("arnoldi", {"rank": 40})])
def test_scores_by_layer_gradients_equal_the_flat_route_in_every_chunking(monkeypatch, method, opts):
    net, (train, test) = _cnn(), _cnn_data()
    kw = dict(weight_decay=1e-2, damping=0.1, method=method, **opts)
    calc = il.InfluenceCalculator(net, F.cross_entropy, train, **kw)
    obj = calc.objective
    Gt, Gi = (torch.cat([g for _, g in obj.per_sample_grads(calc.theta, *d)]) for d in (test, train))
    want = (Gi @ calc.ihvp(Gt.T)).T / train[0].shape[0]
    # never the vmap route, never more rows than the budget
    monkeypatch.setattr(Objective, "per_sample_grads", lambda *a, **k: pytest.fail("vmap per-example gradients"))
    for chunk in ({}, {"chunk_size": 7}):
        torch.testing.assert_close(il.influence(net, F.cross_entropy, train, test, **kw, **chunk), want,
                                   rtol=1e-9, atol=1e-13)
    monkeypatch.setattr(influence_mod, "MEMORY_BUDGET", 1)  # one row per chunk
    torch.testing.assert_close(il.influence(net, F.cross_entropy, train, test, **kw), want, rtol=1e-9, atol=1e-13)
    monkeypatch.setattr(influence_mod, "MEMORY_BUDGET", layer_grads_mod.MEMORY_BUDGET)
    monkeypatch.setattr(layer_grads_mod, "SCORE_GROUP_BYTES", 1)  # chunks of rows, gradients formed one at a time
    torch.testing.assert_close(il.influence(net, F.cross_entropy, train, test, **kw), want, rtol=1e-9, atol=1e-13)


# --- 2. EK-FAC-preconditioned CG ---------------------------------------------------------------------------
def _ill_conditioned_mlp():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 6, generator=g, dtype=D) * 10 ** torch.linspace(-1.5, 1.5, 6, dtype=D)  # badly scaled
    y = torch.randint(0, 3, (60,), generator=g)
    net = mlp(6, 3, depth=1, width=8, activation="tanh", seed=0, dtype=D)
    il.train_model(net, F.cross_entropy, (X, y), weight_decay=1e-3, optimizer="adam", lr=1e-2, steps=300)
    return net, X, y


def test_ekfac_preconditioned_cg_converges_to_the_dense_solve_in_fewer_steps():
    net, X, y = _ill_conditioned_mlp()
    obj = Objective(net, F.cross_entropy, X, y, weight_decay=1e-3)
    op, lam = GaussNewtonOperator(obj), 1e-3
    A = op.dense() + lam * torch.eye(obj.p, dtype=D)
    V = torch.randn(obj.p, 4, generator=torch.Generator().manual_seed(1), dtype=D)
    want = torch.linalg.solve(A, V)
    ek = EKFACSolver(obj, damping=lam)
    X_cg, info_cg = il.ihvp_cg(op, V, lam, tol=1e-10, block=False)
    X_pcg, info_pcg = ihvp_pcg(op, V, lam, preconditioner=ek, tol=1e-10, block=False)
    torch.testing.assert_close(X_pcg, want, rtol=1e-7, atol=1e-9)
    assert max(info_pcg["residual"]) <= 1e-10  # the true residual of the original system
    # EK-FAC holds the input scaling (condition ~1e5 here) in its Kronecker factor A = E[a a^T], so the
    # preconditioned spectrum is much tighter; a conservative bound (observed about 0.6x the steps)
    assert max(info_pcg["iterations"]) < 0.8 * min(info_cg["iterations"])
    torch.testing.assert_close(X_cg, want, rtol=1e-7, atol=1e-9)


def test_pcg_is_one_step_where_ekfac_is_exact():
    """Linear model + squared error: EK-FAC equals H, the preconditioned operator is I, and CG stops after one
    step (two allowed: one more for rounding), whatever the conditioning of H."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(50, 5, generator=g, dtype=D) * 10 ** torch.linspace(-2, 2, 5, dtype=D)
    Y = torch.randn(50, 3, generator=g, dtype=D)
    model = nn.Linear(5, 3).double()
    obj = Objective(model, F.mse_loss, X, Y, weight_decay=1e-4)
    op = HessianOperator(obj, densify=False)
    V = torch.randn(obj.p, 2, generator=g, dtype=D)
    want = torch.linalg.solve(op.dense() + 1e-4 * torch.eye(obj.p, dtype=D), V)
    got, info = ihvp_pcg(op, V, 1e-4, preconditioner=EKFACSolver(obj, damping=1e-4), tol=1e-10)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert max(info["iterations"]) <= 2


def test_cg_with_ekfac_preconditioner_in_influence():
    net, (train, test) = _cnn(), _cnn_data()
    kw = dict(weight_decay=1e-2, damping=0.1, curvature="gauss-newton")
    want = il.influence(net, F.cross_entropy, train, test, method="exact", **kw)
    got = il.influence(net, F.cross_entropy, train, test, method="cg", preconditioner="ekfac", tol=1e-10, **kw)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError, match="preconditioner"):
        il.influence(net, F.cross_entropy, train, test, method="cg", preconditioner="jacobi", **kw)


# --- 3. Data as users hold it ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["exact", "ekfac"])
def test_dataset_and_dataloader_equal_tensors(method):
    net, (train, test) = _cnn(), _cnn_data()
    kw = dict(weight_decay=1e-2, method=method, damping=0.1)
    want = il.influence(net, F.cross_entropy, train, test, **kw)
    as_ds = il.influence(net, F.cross_entropy, TensorDataset(*train), TensorDataset(*test), **kw)
    as_dl = il.influence(net, F.cross_entropy, DataLoader(TensorDataset(*train), batch_size=7),
                         DataLoader(TensorDataset(*test), batch_size=3), **kw)
    torch.testing.assert_close(as_ds, want, rtol=0, atol=0)
    torch.testing.assert_close(as_dl, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shuffle=False"):
        il.influence(net, F.cross_entropy, DataLoader(TensorDataset(*train), shuffle=True), test, **kw)


@pytest.mark.parametrize("b,numel,budget",
                         [(96, 90100, 16 * 2**20), (96, 10, 400), (7, 3, 1), (5, 1, 10**6), (1, 8, 4)])
def test_example_groups_cover_the_rows_once_within_the_budget(b, numel, budget):
    groups = list(example_groups(b, numel, 4, budget))
    assert [i for sl in groups for i in range(b)[sl]] == list(range(b))  # every row once, in order
    sizes = [sl.stop - sl.start for sl in groups]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert all(k * numel * 4 <= budget for k in sizes) or sizes == [1] * b  # one example may exceed it
    assert len(groups) == -(-b // max(1, budget // (numel * 4)))  # no more groups than the budget needs


def test_scratch_buffers_are_reused_and_grow():
    bufs, like = {}, torch.zeros(1, dtype=D)
    a = scratch(bufs, "k", (3, 4), like)
    assert a.shape == (3, 4) and a.is_contiguous() and a.dtype == D
    b = scratch(bufs, "k", (2, 5), like)
    assert b.data_ptr() == a.data_ptr()  # the same memory, reused
    c = scratch(bufs, "k", (5, 5), like)
    assert c.shape == (5, 5) and bufs["k"].numel() == 25  # grown
    assert scratch(bufs, "k", (2,), torch.zeros(1)).dtype == torch.float32  # a new buffer for another dtype


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_loss_gradient_column_is_each_rows_own_loss_gradient(loss):
    # b times the batch mean's gradient, against each row's own loss differentiated alone (vmap over rows)
    from torch.func import grad, vmap
    net, (train, _) = _cnn(), _cnn_data()
    X, y = train
    loss_fn = F.cross_entropy if loss == "ce" else F.mse_loss
    if loss == "mse":
        y = torch.randn(X.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=D)
    obj = Objective(net, loss_fn, X, y)
    f = obj.forward(obj.theta(), X)
    want = vmap(grad(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0))))(f.detach(), y)
    got = LayerGradients(obj, obj.theta()).loss_gradient_column(f, y)
    torch.testing.assert_close(got[:, :, 0], want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("make", [_cnn, lambda: mlp(81, 3, depth=2, width=6, activation="tanh", seed=0, dtype=D)])
def test_scores_in_one_pass_for_test_and_training_rows_equal_the_flat_formula(make):
    # a training set in one chunk: the test and training rows' gradients from one pass; against per-example
    # gradients by vmap over examples and a dense solve
    net, (train, test) = make(), _cnn_data()
    if not isinstance(net[0], nn.Conv2d):
        train, test = (train[0].flatten(1), train[1]), (test[0].flatten(1), test[1])
    calc = il.InfluenceCalculator(net, F.cross_entropy, train, weight_decay=1e-2, damping=0.1)
    got = calc.scores(test)
    obj = calc.objective
    Gt, Gi = (torch.cat([g for _, g in obj.per_sample_grads(calc.theta, *d)]) for d in (test, train))
    H = il.hessian(net, F.cross_entropy, train, weight_decay=1e-2)
    want = Gt @ torch.linalg.solve(H + 0.1 * torch.eye(H.shape[0], dtype=D), Gi.T) / train[0].shape[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-13)
