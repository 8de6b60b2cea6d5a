"""EK-FAC against dense float64 answers: exact where the Gauss-Newton block is a Kronecker product, and its
corrected eigenvalues equal the exact diagonal of every layer's Gauss-Newton block in the Kronecker eigenbasis."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import influence_lib as il
import influence_lib.ekfac as ekfac_mod
from influence_lib.curvature import GaussNewtonOperator
from influence_lib.ekfac import EKFACSolver, _add_lower_gram, _loss_hessian_sqrt, _mirror_lower
from influence_lib.models import mlp, small_cnn
from influence_lib.objective import Objective

D = torch.float64


def test_ekfac_is_exact_for_ridge_regression():
    """Linear model + squared error: G = (2/C) I kron (1/n) sum a a^T is a Kronecker product, so EK-FAC is
    exact, and for a linear model G is the Hessian."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(40, 5, generator=g, dtype=D), torch.randn(40, 3, generator=g, dtype=D)
    model = nn.Linear(5, 3).double()
    obj = Objective(model, F.mse_loss, X, Y, weight_decay=0.1)
    H = obj.hessian(obj.theta())
    V = torch.randn(obj.p, 4, generator=g, dtype=D)
    want = torch.linalg.solve(H + 0.01 * torch.eye(obj.p, dtype=D), V)
    got = EKFACSolver(obj, damping=0.01).solve(V)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _layer_index(L):
    idx = torch.zeros(L.out, L.cols, dtype=torch.long)
    idx[:, :L.d_in] = torch.arange(L.w_slice.start, L.w_slice.stop).reshape(L.out, L.d_in)
    if L.b_slice is not None:
        idx[:, L.d_in] = torch.arange(L.b_slice.start, L.b_slice.stop)
    return idx.reshape(-1)


class _Block(nn.Module):
    """A residual block as in benchmarks/scale.py's ResNet: the convolutions' outputs feed a sum with the input."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + 0.5 * self.conv2(torch.tanh(self.conv1(torch.tanh(x))))


@pytest.mark.parametrize("one_example_at_a_time", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "residual", "few-positions"])
def test_corrected_eigenvalues_are_the_exact_gauss_newton_diagonal(kind, one_example_at_a_time, monkeypatch):
    # every branch of the eigenvalue pass: one row per example (mlp), many positions and few channels (cnn,
    # residual: each gradient formed, then rotated), few positions (the second convolution of few-positions: the
    # inputs rotated once per chunk); in groups of the default size, and one example per group
    if one_example_at_a_time:
        monkeypatch.setattr(ekfac_mod, "LAM_GROUP_BYTES", 1)
    g = torch.Generator().manual_seed(1)
    if kind == "few-positions":
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.Tanh(),
                            nn.Flatten(), nn.Linear(16, 3)).double()
        X = torch.randn(12, 1, 9, 9, generator=g, dtype=D)
    elif kind == "mlp":
        net = mlp(4, 3, depth=2, width=5, activation="tanh", seed=0, dtype=D)
        X = torch.randn(30, 4, generator=g, dtype=D)
    elif kind == "residual":  # a stride-2 convolution and a residual block (the scale benchmark's ResNet, small)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), _Block(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(2, 3)).double()
        X = torch.randn(12, 1, 7, 7, generator=g, dtype=D)
    else:
        net = small_cnn(1, 3, image_size=6, depth=1, width=2, activation="tanh", seed=0, dtype=D)
        X = torch.randn(12, 1, 6, 6, generator=g, dtype=D)
    y = torch.randint(0, 3, (X.shape[0],), generator=g)
    obj = Objective(net, F.cross_entropy, X, y, weight_decay=0.01, chunk_size=7)  # chunks must not matter
    ek = EKFACSolver(obj, damping=0.1)
    G = GaussNewtonOperator(obj).dense() - 0.01 * torch.eye(obj.p, dtype=D)  # the data term only
    assert len(ek.layers) == {"mlp": 3, "cnn": 2, "residual": 4, "few-positions": 3}[kind]
    for L, QA, QS, lam in zip(ek.layers, ek.QA, ek.QS, ek.Lam, strict=True):
        f = _layer_index(L)
        Q = torch.kron(QS, QA)
        diag = torch.diagonal(Q.T @ G[f][:, f] @ Q).reshape(L.out, L.cols)
        torch.testing.assert_close(lam, diag, rtol=1e-9, atol=1e-12)
    V = torch.randn(obj.p, 3, generator=g, dtype=D)
    torch.testing.assert_close(ek.matmat(ek.solve(V)), V, rtol=1e-10, atol=1e-12)  # an inverse, with wd + damping


def test_ekfac_in_influence_and_bad_inputs():
    g = torch.Generator().manual_seed(2)
    net = mlp(4, 3, depth=1, width=6, activation="tanh", seed=0, dtype=D)
    X, y = torch.randn(40, 4, generator=g, dtype=D), torch.randint(0, 3, (40,), generator=g)
    s = il.influence(net, F.cross_entropy, (X, y), (X[:3], y[:3]), method="ekfac", damping=0.1)
    ggn = il.influence(net, F.cross_entropy, (X, y), (X[:3], y[:3]), method="exact", damping=0.1,
                       curvature="gauss-newton")
    assert s.shape == (3, 40)
    assert il.pearson(s.flatten(), ggn.flatten()) > 0.9  # a block-diagonal approximation of the same matrix
    with pytest.raises(ValueError, match="selected without its layer's weight"):
        il.influence(net, F.cross_entropy, (X, y), (X[:3], y[:3]), method="ekfac", damping=0.1, params=["0.bias"])
    with pytest.raises(ValueError, match="damping > 0"):  # 2 points cannot determine 21 first-layer directions
        il.influence(net, F.cross_entropy, (X[:2], y[:2]), (X[:3], y[:3]), method="ekfac")
    bn = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).double()
    with pytest.raises(ValueError, match="nn.Linear and nn.Conv2d layers only.*1.weight"):
        il.influence(bn, F.cross_entropy, (X, y), (X[:3], y[:3]), method="ekfac", damping=0.1)


def test_cross_entropy_hessian_square_root_in_closed_form():
    # the closed form B = diag(sqrt p) - p sqrt(p)^T against torch.func's Hessian of the loss (the generic path,
    # taken by any other callable) and the EK-FAC that each of them gives
    g = torch.Generator().manual_seed(4)
    f, y = torch.randn(6, 4, generator=g, dtype=D) * 3, torch.randint(0, 4, (6,), generator=g)
    X = torch.randn(6, 5, generator=g, dtype=D)
    closed = _loss_hessian_sqrt(Objective(mlp(5, 4, depth=1, width=3, seed=0, dtype=D), F.cross_entropy, X, y), f, y)
    wrapped = Objective(mlp(5, 4, depth=1, width=3, seed=0, dtype=D), lambda o, t: F.cross_entropy(o, t), X, y)
    H = torch.func.vmap(torch.func.hessian(lambda o, t: F.cross_entropy(o[None], t[None])))(f, y)
    torch.testing.assert_close(closed @ closed.transpose(1, 2), H, rtol=1e-12, atol=1e-14)
    generic = _loss_hessian_sqrt(wrapped, f, y)
    torch.testing.assert_close(generic @ generic.transpose(1, 2), H, rtol=1e-12, atol=1e-14)
    a = EKFACSolver(Objective(mlp(5, 4, depth=2, width=3, seed=0, dtype=D), F.cross_entropy, X, y), damping=0.1)
    b = EKFACSolver(Objective(mlp(5, 4, depth=2, width=3, seed=0, dtype=D), lambda o, t: F.cross_entropy(o, t), X, y),
                    damping=0.1)
    for la, lb in zip(a.Lam, b.Lam, strict=True):
        torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("d,band", [(5, 128), (7, 3), (9, 3), (10, 4)])
def test_lower_gram_bands_accumulate_the_full_gram_matrix(d, band):
    g = torch.Generator().manual_seed(d)
    A, want = torch.zeros(d, d, dtype=D), torch.zeros(d, d, dtype=D)
    for _ in range(2):  # accumulated chunk after chunk
        M = torch.randn(d, 11, generator=g, dtype=D)
        _add_lower_gram(A, M, band=band)
        want += M @ M.T
    torch.testing.assert_close(_mirror_lower(A), want, rtol=1e-13, atol=1e-13)
