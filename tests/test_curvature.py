import pytest
import torch
import torch.nn.functional as F
from _helpers import make_classification, make_mlp
from torch import nn

import influence_lib as il
from influence_lib.objective import Objective


def flat_loss_fn(model, X, y, wd):
    """J(theta) written independently with torch.autograd.functional-friendly flat parameters."""
    shapes = [p.shape for p in model.parameters()]

    def J(theta):
        out, params, i = X, [], 0
        for s in shapes:
            k = s.numel()
            params.append(theta[i:i + k].view(s))
            i += k
        W1, b1, W2, b2 = params
        out = torch.tanh(X @ W1.T + b1) @ W2.T + b2
        return F.cross_entropy(out, y) + 0.5 * wd * theta.dot(theta)

    return J


def test_hessian_matches_autograd_and_is_symmetric():
    model = make_mlp()
    X, y = make_classification()
    H = il.hessian(model, F.cross_entropy, (X, y), weight_decay=0.03)
    theta = il.flat_params(model)
    H_ref = torch.autograd.functional.hessian(flat_loss_fn(model, X, y, 0.03), theta)
    assert H.shape == (theta.numel(), theta.numel())
    torch.testing.assert_close(H, H_ref, rtol=1e-10, atol=1e-12)
    assert (H - H.T).abs().max() < 1e-12


def test_hvp_matches_finite_differences_and_dense():
    model = make_mlp(seed=4)
    X, y = make_classification(seed=4)
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.02)
    theta = obj.theta()
    v = torch.randn(obj.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-5
    fd = (obj.gradient(theta + eps * v) - obj.gradient(theta - eps * v)) / (2 * eps)
    hv = obj.hvp(theta, v)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(hv, obj.hessian(theta) @ v, rtol=1e-10, atol=1e-12)
    V = torch.randn(obj.p, 5, dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(theta, V), obj.hessian(theta) @ V, rtol=1e-10, atol=1e-12)


def test_results_do_not_depend_on_chunk_size():
    model = make_mlp(seed=5)
    X, y = make_classification(n=37, seed=5)
    full = Objective(model, F.cross_entropy, X, y, weight_decay=0.01)
    chunked = Objective(model, F.cross_entropy, X, y, weight_decay=0.01, chunk_size=5)
    th = full.theta()
    torch.testing.assert_close(chunked.hessian(th), full.hessian(th), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(chunked.loss(th), full.loss(th), rtol=1e-13, atol=0)
    torch.testing.assert_close(chunked.gradient(th), full.gradient(th), rtol=1e-12, atol=1e-14)
    V = torch.randn(full.p, 3, dtype=torch.float64)
    torch.testing.assert_close(chunked.gnvp(th, V), full.gnvp(th, V), rtol=1e-12, atol=1e-13)


def test_binary_logistic_hessian_closed_form():
    X, _ = make_classification(n=25, d=3, seed=6)
    y = (X[:, 0] > 0).double()
    model = nn.Linear(3, 1).double()

    def loss_fn(out, t):
        return F.binary_cross_entropy_with_logits(out.squeeze(-1), t)

    wd = 0.1
    H = il.hessian(model, loss_fn, (X, y), weight_decay=wd)
    Xa = torch.cat([X, torch.ones(25, 1, dtype=torch.float64)], 1)  # (weight, bias) order
    s = torch.sigmoid(Xa @ torch.cat([model.weight.detach()[0], model.bias.detach()]))
    H_ref = (Xa.T * (s * (1 - s))) @ Xa / 25 + wd * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(H, H_ref, rtol=1e-10, atol=1e-12)


def test_gauss_newton_matches_explicit_jacobians():
    model = make_mlp(seed=7)
    X, y = make_classification(n=12, seed=7)
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.05)
    theta = obj.theta()
    G_ref = 0.05 * torch.eye(obj.p, dtype=torch.float64)
    for i in range(12):
        J = torch.autograd.functional.jacobian(lambda t: obj.forward(t, X[i:i + 1])[0], theta)  # [C, p]
        out = obj.forward(theta, X[i:i + 1])[0].detach()
        Hout = torch.autograd.functional.hessian(lambda o: F.cross_entropy(o.unsqueeze(0), y[i:i + 1]), out)
        G_ref += J.T @ Hout @ J / 12
    G = il.GaussNewtonOperator(obj).dense()
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(G)[0] > 0  # PSD + wd


def test_lanczos_recovers_spectrum(nonconvex_problem):
    model, (X, y), H, evals = nonconvex_problem
    op = il.DenseOperator(H)
    ritz, vecs = il.lanczos(op, iters=H.shape[0])
    torch.testing.assert_close(ritz, evals, rtol=1e-8, atol=1e-10)
    # Ritz pairs are eigenpairs
    torch.testing.assert_close(H @ vecs, vecs * ritz, rtol=1e-7, atol=1e-8)
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.01)
    lo, hi = il.extreme_eigenvalues(il.HessianOperator(obj), iters=25)
    assert hi == pytest.approx(float(evals[-1]), rel=1e-6)
    assert lo == pytest.approx(float(evals[0]), rel=1e-3)


def test_spectrum_summary(nonconvex_problem):
    *_, H, evals = nonconvex_problem
    s = il.spectrum_summary(H)
    assert s["lambda_min"] < 0 < s["lambda_max"]
    assert s["n_negative"] == int((evals < 0).sum())
    assert 0 < s["negative_mass"] < 1


def test_parameter_subset_is_a_block_of_the_full_hessian():
    model = make_mlp(seed=8)
    X, y = make_classification(seed=8)
    H = il.hessian(model, F.cross_entropy, (X, y), weight_decay=0.01)
    H_last = il.hessian(model, F.cross_entropy, (X, y), weight_decay=0.01, params=["2.weight", "2.bias"])
    k = H_last.shape[0]
    torch.testing.assert_close(H_last, H[-k:, -k:], rtol=1e-12, atol=1e-13)


def test_gauss_newton_on_rows_is_the_gauss_newton_of_those_rows_and_lissa_uses_it():
    """GaussNewtonOperator.on_rows(idx): the GGN of the objective on the rows idx alone (weight decay once), so
    mini-batch LiSSA can run on the Gauss-Newton matrix; equal-size mini-batches average to the full G."""
    X, y = make_classification(n=24, seed=5)
    model = make_mlp(seed=5)
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.05)
    G = il.GaussNewtonOperator(obj)
    V = torch.randn(obj.p, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    idx = torch.tensor([1, 4, 7, 10, 15, 20])
    sub = il.GaussNewtonOperator(Objective(model, F.cross_entropy, X[idx], y[idx], weight_decay=0.05))
    torch.testing.assert_close(G.on_rows(idx).matmat(V), sub.matmat(V), rtol=1e-12, atol=1e-12)
    parts = torch.arange(24).reshape(4, 6)
    mean = sum(G.on_rows(p).matmat(V) for p in parts) / 4
    torch.testing.assert_close(mean, G.matmat(V), rtol=1e-10, atol=1e-12)
    assert G.n_rows == 24
    # mini-batch LiSSA on G: an unbiased-in-expectation estimate of the full-batch recursion of the same depth
    scale = float(torch.linalg.eigvalsh(G.dense())[-1]) + 1.0
    X_full, _ = il.ihvp_lissa(G, V, 0.5, scale=scale, depth=150)
    X_mini, _ = il.ihvp_lissa(G, V, 0.5, scale=scale, depth=150, batch_size=12, repeats=2)
    exact = torch.linalg.solve(G.dense() + 0.5 * torch.eye(obj.p, dtype=V.dtype), V)
    # the full-batch series contracts by (1 - mu_min / scale) <= 1 - 0.55 / scale per step: 150 steps leave < 1e-14
    assert float((X_full - exact).norm() / exact.norm()) < 1e-10
    assert float((X_mini - X_full).norm() / X_full.norm()) < 0.1  # measured 0.0035 with these batches


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_hvp_blocks_of_a_cnn_match_its_dense_hessian(chunk_size):
    """Convolutional models take one backward pass per column of a block (not vmap): a block of products equals
    torch.func's dense Hessian of an independently written loss applied to it, kept graphs or chunk by chunk."""
    from torch.func import functional_call

    from influence_lib.models import small_cnn

    model = small_cnn(1, 3, image_size=6, depth=2, width=2, seed=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.arange(20) % 3
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.01, chunk_size=chunk_size)
    theta = obj.theta()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def J(th):
        parts = torch.split(th, [s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (X,)), y) + 0.005 * th.dot(th)

    H_ref = torch.func.hessian(J)(theta)
    V = torch.randn(obj.p, 5, generator=g, dtype=torch.float64)
    apply = obj.hvp_operator(theta, keep_graphs=chunk_size is None)
    torch.testing.assert_close(apply(V), H_ref @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(apply(V[:, 2]), H_ref @ V[:, 2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(obj.hessian(theta), H_ref, rtol=1e-10, atol=1e-12)


def test_float64_hessian_graphs_with_convolutions_as_matmul_equal_pytorch_convolutions():
    """The kept Hessian graphs of float64 CNNs compute each convolution as a matrix product of unfolded patches:
    the dense Hessian equals torch.func's over PyTorch's own convolutions for strides, dilation, non-square kernels
    and a bias-free layer, and the modules are left as they were."""
    from torch.func import functional_call

    model = nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), nn.Tanh(),
                          nn.Conv2d(3, 2, 2, bias=False, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.LazyLinear(3)).double()
    g = torch.Generator().manual_seed(5)
    X = torch.randn(9, 2, 7, 6, generator=g, dtype=torch.float64)
    model(X)  # materialise the lazy layer
    y = torch.arange(9) % 3
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.01)
    names, shapes = [n for n, _ in model.named_parameters()], [p.shape for p in model.parameters()]

    def J(th):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(th, [s.numel() for s in shapes]), shapes,
                                                   strict=True)}
        return F.cross_entropy(functional_call(model, params, (X,)), y) + 0.005 * th.dot(th)

    theta = obj.theta()
    torch.testing.assert_close(obj.hessian(theta), torch.func.hessian(J)(theta), rtol=1e-10, atol=1e-12)
    with obj.convolutions_as_matmul():
        assert all("_conv_forward" in vars(m) for m in model if isinstance(m, nn.Conv2d))
        inside = model[0](X)
        torch.testing.assert_close(model[0](X[0]), inside[0], rtol=1e-12, atol=1e-12)  # an unbatched input too
    assert not any("_conv_forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(inside, model[0](X), rtol=1e-12, atol=1e-12)  # PyTorch's convolution again
