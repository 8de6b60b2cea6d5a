"""Every inverse-HVP solver against a dense float64 solve, convex and non-convex."""

import pytest
import torch
import torch.nn.functional as F

import influence_lib as il
from influence_lib.objective import Objective


def rhs(p, k=4, seed=0):
    return torch.randn(p, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_solve(H, V, damping):
    return torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), V)


def rel_err(X, ref):
    return float((X - ref).norm() / ref.norm())


@pytest.fixture(params=["convex", "nonconvex"])
def problem(request, convex_problem, nonconvex_problem):
    """(operator from HVPs, dense H, damping): convex with damping, or indefinite H with damping above -lambda_min."""
    if request.param == "convex":
        model, (X, y), H = convex_problem
        obj, damping = Objective(model, F.cross_entropy, X, y, weight_decay=0.05), 0.01
    else:
        model, (X, y), H, evals = nonconvex_problem
        obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.01)
        damping = -float(evals[0]) + 0.05
    return il.HessianOperator(obj), H, damping


def test_exact(problem):
    op, H, damping = problem
    V = rhs(op.size)
    X, info = il.ihvp_exact(op, V, damping)
    assert rel_err(X, dense_solve(H, V, damping)) < 1e-10
    assert info["lambda_min"] == pytest.approx(float(torch.linalg.eigvalsh(H)[0]), rel=1e-8, abs=1e-12)


def test_exact_without_damping_on_an_indefinite_hessian(nonconvex_problem):
    *_, H, evals = nonconvex_problem
    V = rhs(H.shape[0])
    X, info = il.ihvp_exact(H, V, 0.0)
    assert info["n_negative"] == int((evals < 0).sum()) > 0
    assert rel_err(X, dense_solve(H, V, 0.0)) < 1e-8


@pytest.mark.parametrize("block", [True, False])
def test_cg(problem, block):
    op, H, damping = problem
    V = rhs(op.size)
    X, info = il.ihvp_cg(op, V, damping, tol=1e-10, block=block)
    assert rel_err(X, dense_solve(H, V, damping)) < 1e-7
    assert max(info["residual"]) <= 1e-10
    # the reported residual is each column's true residual (kept from its confirmation, not recomputed)
    true = (V - (H @ X + damping * X)).norm(dim=0) / V.norm(dim=0)
    torch.testing.assert_close(torch.tensor(info["residual"], dtype=true.dtype), true, rtol=1e-3, atol=1e-14)
    x0 = 0.1 * torch.ones_like(V)  # also from a given start, with a column that starts at its solution
    x0[:, 0] = dense_solve(H, V[:, :1], damping)[:, 0]
    X0, info0 = il.ihvp_cg(op, V, damping, tol=1e-10, block=block, x0=x0)
    true0 = (V - (H @ X0 + damping * X0)).norm(dim=0) / V.norm(dim=0)
    torch.testing.assert_close(torch.tensor(info0["residual"], dtype=true.dtype), true0, rtol=1e-3, atol=1e-14)
    assert all(0 < it <= 10 * op.size for it in info["iterations"])
    # a single column gives the same answer as inside a block
    x0, _ = il.ihvp_cg(op, V[:, 0], damping, tol=1e-10, block=block)
    torch.testing.assert_close(x0, X[:, 0], rtol=1e-7, atol=1e-10)


def test_block_cg_needs_no_more_steps_than_independent_cg(problem):
    """Each column's block Krylov space contains its own Krylov space, so block CG cannot need more steps."""
    op, H, damping = problem
    V = rhs(op.size, k=6, seed=1)
    Xb, ib = il.ihvp_cg(op, V, damping, tol=1e-10)
    Xc, ic = il.ihvp_cg(op, V, damping, tol=1e-10, block=False)
    # a bound, not a count: the number of steps moves by one with the floating-point kernels of the machine
    assert max(ib["iterations"]) <= max(ic["iterations"])
    torch.testing.assert_close(Xb, Xc, rtol=1e-7, atol=1e-9)


def test_block_cg_deflates_dependent_and_zero_columns(problem):
    op, H, damping = problem
    v, w = rhs(op.size, k=2, seed=2).unbind(1)
    V = torch.stack([v, 2 * v, torch.zeros_like(v), w, v - w], dim=1)  # rank 2
    X, info = il.ihvp_cg(op, V, damping, tol=1e-10)
    assert rel_err(X, dense_solve(H, V, damping)) < 1e-7
    assert torch.equal(X[:, 2], torch.zeros_like(v)) and info["iterations"][2] == 0
    # deflation: never more search directions in one step than the rank of V (2), whatever the machine's
    # rounding does to the number of steps
    assert info["max_directions"] <= 2
    assert max(info["residual"]) <= 1e-10


def test_lissa_full_batch_converges_to_exact(problem):
    op, H, damping = problem
    V = rhs(op.size)
    evals = torch.linalg.eigvalsh(H) + damping
    scale = float(evals[-1]) * 1.05
    depth = int(30 / (float(evals[0]) / scale)) + 1  # (1 - mu_min/scale)^depth < e^-30
    X, info = il.ihvp_lissa(op, V, damping, scale=scale, depth=depth)
    assert rel_err(X, dense_solve(H, V, damping)) < 1e-8
    assert info["scale"] == scale


@pytest.mark.parametrize("depth", [1, 37, 400])
def test_lissa_full_batch_limit_is_the_full_batch_recursion(problem, depth):
    """The closed form equals running full-batch LiSSA for ``depth`` steps (truncated, so not the exact solve)."""
    from influence_lib.solvers import EigenSolver, lissa_full_batch_limit

    op, H, damping = problem
    V = rhs(op.size, k=3)
    scale = float(torch.linalg.eigvalsh(H)[-1] + damping) * 1.2
    ran, _ = il.ihvp_lissa(op, V, damping, scale=scale, depth=depth)
    closed, info = lissa_full_batch_limit(EigenSolver(H, damping), V, scale=scale, depth=depth)
    assert rel_err(closed, ran) < 1e-10
    assert info["n_divergent"] == 0 and 0 < info["truncation_factor"] < 1
    if depth == 1:  # far from converged: the truncation error is what the closed form isolates
        assert rel_err(closed, dense_solve(H, V, damping)) > 1e-2


def test_lissa_full_batch_limit_converges_to_exact_and_counts_divergent_directions(nonconvex_problem):
    from influence_lib.solvers import EigenSolver, lissa_full_batch_limit

    _, _, H, evals = nonconvex_problem
    V = rhs(H.shape[0], k=2)
    damping = -float(evals[0]) + 0.05
    scale = float(evals[-1] + damping) * 1.05
    X, info = lissa_full_batch_limit(EigenSolver(H, damping), V, scale=scale, depth=200_000)
    assert rel_err(X, dense_solve(H, V, damping)) < 1e-10 and info["truncation_factor"] < 1e-12
    _, info = lissa_full_batch_limit(EigenSolver(H, 0.0), V, scale=scale, depth=10)  # negative eigenvalues
    assert info["n_divergent"] == int((evals < 0).sum()) > 0


def test_lissa_default_scale_and_stochastic_batches(convex_problem):
    model, (X, y), H = convex_problem
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.05)
    op, damping, V = il.HessianOperator(obj), 0.05, rhs(obj.p, 2)
    ref = dense_solve(H, V, damping)
    Xd, info = il.ihvp_lissa(op, V, damping, depth=600)
    assert info["lambda_max_estimate"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]) + damping, rel=1e-6)
    assert rel_err(Xd, ref) < 1e-6
    a, _ = il.ihvp_lissa(op, V, damping, depth=400, batch_size=10, repeats=4, seed=3)
    b, _ = il.ihvp_lissa(op, V, damping, depth=400, batch_size=10, repeats=4, seed=3)
    assert torch.equal(a, b)  # seeded
    assert 1e-6 < rel_err(a, ref) < 0.5  # stochastic: close, not exact


def test_lissa_divergence_raises(nonconvex_problem):
    model, (X, y), H, evals = nonconvex_problem
    op = il.HessianOperator(Objective(model, F.cross_entropy, X, y, weight_decay=0.01))
    V = rhs(op.size, 1)
    with pytest.raises(il.LissaDivergenceError, match="damping"):
        il.ihvp_lissa(op, V, 0.0, scale=float(evals[-1]) * 1.1, depth=5000)  # negative eigenvalues
    with pytest.raises(il.LissaDivergenceError, match="scale"):
        il.ihvp_lissa(op, V, -float(evals[0]) + 0.1, scale=float(evals[-1]) / 4, depth=5000)  # scale too small


def test_arnoldi_full_rank_is_exact_and_low_rank_is_a_projection(problem):
    op, H, damping = problem
    V = rhs(op.size)
    ref = dense_solve(H, V, damping)
    X, info = il.ihvp_arnoldi(op, V, damping, rank=op.size, iters=op.size)
    assert rel_err(X, ref) < 1e-7
    r = 6
    Xr, info = il.ihvp_arnoldi(op, V, damping, rank=r, iters=op.size)
    evals, Q = torch.linalg.eigh(H)
    top = evals.abs().argsort(descending=True)[:r]
    U = Q[:, top]
    torch.testing.assert_close(Xr, U @ (U.T @ ref), rtol=1e-6, atol=1e-9)
    assert len(info["eigenvalues"]) == r


@pytest.mark.parametrize("block", [True, False])
def test_cg_reports_non_positive_curvature(nonconvex_problem, block):
    model, (X, y), H, evals = nonconvex_problem
    op = il.DenseOperator(H)
    # a right-hand side along the most negative eigenvector meets negative curvature at once
    v = torch.linalg.eigh(H)[1][:, 0]
    with pytest.raises(il.SolverError, match="damping"):
        il.ihvp_cg(op, v, 0.0, block=block)


def test_minres(problem):
    op, H, damping = problem
    V = rhs(op.size)
    X, info = il.ihvp_minres(op, V, damping, tol=1e-10)
    assert rel_err(X, dense_solve(H, V, damping)) < 1e-7
    assert max(info["residual"]) <= 1e-10


@pytest.mark.parametrize("below", [0.05, 0.5])
def test_minres_solves_the_indefinite_damped_systems_cg_refuses(nonconvex_problem, below):
    """damping below -lambda_min: A + damping I is indefinite (CG must refuse), non-singular, and MINRES returns the
    dense solve, also for a zero column and a duplicated (scaled) one."""
    *_, H, evals = nonconvex_problem
    damping = max(0.0, -float(evals[0]) - below)
    shifted = evals + damping
    assert bool((shifted < 0).any()) and float(shifted.abs().min()) > 1e-6
    op = il.DenseOperator(H)
    V = rhs(H.shape[0], k=4)
    V[:, 2] = 0.0
    V[:, 3] = -3.0 * V[:, 0]
    with pytest.raises(il.SolverError, match="not positive definite"):
        il.ihvp_cg(op, V, damping)
    X, info = il.ihvp_minres(op, V, damping, tol=1e-10)
    ref = dense_solve(H, V, damping)
    cond = float(shifted.abs().max() / shifted.abs().min())
    # a relative residual of 1e-10 bounds the relative error by cond * 1e-10
    assert rel_err(X, ref) <= 10 * cond * 1e-10
    assert max(info["residual"]) <= 1e-10
    assert info["iterations"][2] == 0 and bool((X[:, 2] == 0).all())
    assert torch.allclose(X[:, 3], -3.0 * X[:, 0], rtol=1e-6, atol=1e-10 * float(X[:, 0].norm()))


def test_minres_through_the_influence_calculator_matches_exact(nonconvex_problem):
    model, (X, y), _, evals = nonconvex_problem
    damping = max(0.0, -float(evals[0]) - 0.05)  # indefinite: "cg" refuses this system, "minres" does not
    test = (X[:5], y[:5])
    exact = il.influence(model, F.cross_entropy, (X, y), test, weight_decay=0.01, method="exact", damping=damping)
    minres = il.influence(model, F.cross_entropy, (X, y), test, weight_decay=0.01, method="minres", damping=damping,
                          tol=1e-10)
    assert rel_err(minres, exact) < 1e-6


def test_minres_in_float32_reaches_its_default_tolerance(convex_problem):
    _, _, H = convex_problem
    op = il.DenseOperator(H.float())
    V = rhs(H.shape[0]).float()
    X, info = il.ihvp_minres(op, V, 0.01)
    assert max(info["residual"]) <= il.solvers.default_cg_tol(torch.float32)
    assert rel_err(X.double(), dense_solve(H, V.double(), 0.01)) < 1e-3


def test_solvers_reject_bad_input(convex_problem):
    _, _, H = convex_problem
    op = il.DenseOperator(H)
    with pytest.raises(ValueError, match="damping"):
        il.ihvp_cg(op, rhs(H.shape[0]), -1.0)
    with pytest.raises(ValueError, match="rows"):
        il.ihvp_cg(op, rhs(H.shape[0] + 1), 0.1)
    with pytest.raises(ValueError, match="depth"):
        il.ihvp_lissa(op, rhs(H.shape[0]), 0.1, depth=0)
    with pytest.raises(ValueError, match="batch_size"):
        il.ihvp_lissa(op, rhs(H.shape[0]), 0.1, batch_size=4)  # a dense operator has no rows
    with pytest.raises(ValueError, match="rank"):
        il.ihvp_arnoldi(op, rhs(H.shape[0]), 0.1, rank=10, iters=5)
    with pytest.raises(il.SolverError, match="max_iter"):
        il.ihvp_cg(op, rhs(H.shape[0]), 0.0, tol=1e-14, max_iter=2)
    with pytest.raises(il.SolverError, match="max_iter"):
        il.ihvp_cg(op, rhs(H.shape[0]), 0.0, tol=1e-14, max_iter=2, block=False)
    with pytest.raises(ValueError, match="x0"):
        il.ihvp_cg(op, rhs(H.shape[0]), 0.1, x0=rhs(H.shape[0], k=1))
    with pytest.raises(il.SolverError, match="max_iter"):
        il.ihvp_minres(op, rhs(H.shape[0]), 0.0, tol=1e-14, max_iter=2)
    with pytest.raises(ValueError, match="tol"):
        il.ihvp_minres(op, rhs(H.shape[0]), 0.1, tol=0.0)
    with pytest.raises(ValueError, match="rows"):
        il.ihvp_minres(op, rhs(H.shape[0] + 1), 0.1)


def test_eigh_falls_back_when_divide_and_conquer_fails(monkeypatch):
    """torch's eigh fails to converge on some ReLU Hessians (many repeated zero eigenvalues): the exact solver
    then uses LAPACK's dsyevr and still returns the exact solve."""
    from influence_lib.solvers import EigenSolver

    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = B @ B.T + torch.eye(6, dtype=torch.float64)
    V = torch.randn(6, 2, generator=g, dtype=torch.float64)

    def broken(_):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    X = EigenSolver(A, damping=0.1).solve(V)
    monkeypatch.undo()
    torch.testing.assert_close(X, torch.linalg.solve(A + 0.1 * torch.eye(6, dtype=torch.float64), V))


# --- mixed precision: float32 products, float64 iterates and checks ------------------------------------------------
@pytest.mark.parametrize("block", [True, False])
@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_mixed_precision_cg_meets_the_float64_tolerance(problem, block, tol):
    op, H, damping = problem
    V = rhs(op.size)
    X, info = il.ihvp_cg(op, V, damping, tol=tol, block=block, precision="mixed")
    true = (V - (H @ X + damping * X)).norm(dim=0) / V.norm(dim=0)  # the float64 residual, computed here
    assert X.dtype == torch.float64 and float(true.max()) <= tol
    torch.testing.assert_close(torch.tensor(info["residual"], dtype=true.dtype), true, rtol=1e-3, atol=1e-14)
    # the error bound of a residual: ||x - x*|| <= ||r|| / lambda_min(H + damping I)
    lam = float(torch.linalg.eigvalsh(H)[0]) + damping
    err = (X - dense_solve(H, V, damping)).norm(dim=0)
    assert bool((err <= true * V.norm(dim=0) / lam * (1 + 1e-6)).all())
    mixed = info["mixed"]
    assert mixed["float32_products"] > 0 and mixed["float32_products"] <= info["products"]


def test_mixed_precision_cg_falls_back_to_float64_where_float32_cannot_get_there():
    # an SPD matrix with condition number 1e4: float32 products (relative rounding ~6e-8) cannot resolve a relative
    # residual of 1e-10, so a check fails (or the float32 phase reaches max_iter // 2 steps) and the rest runs in
    # float64, from the true residual, which gets there
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    H = Q @ torch.diag(torch.logspace(-4, 0, 60, dtype=torch.float64)) @ Q.T
    V = torch.randn(60, 3, generator=g, dtype=torch.float64)
    for block in (True, False):
        X, info = il.ihvp_cg(il.DenseOperator(H), V, 0.0, tol=1e-10, block=block, precision="mixed")
        true = (V - H @ X).norm(dim=0) / V.norm(dim=0)
        assert info["mixed"]["fell_back"] and float(true.max()) <= 1e-10


def test_mixed_precision_is_full_precision_where_there_is_nothing_lower(convex_problem):
    model, (X, y), H = convex_problem
    op32 = il.HessianOperator(Objective(model.float(), F.cross_entropy, X.float(), y, weight_decay=0.05))
    V = rhs(op32.size).float()
    X32, info = il.ihvp_cg(op32, V, 0.01, tol=1e-4, precision="mixed")  # a float32 system: nothing lower
    assert "mixed" not in info and X32.dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        il.ihvp_cg(op32, V, 0.01, precision="half")


def test_operators_in_float32_are_the_same_matrices(convex_problem, nonconvex_problem):
    model, (X, y), H, _ = nonconvex_problem
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=0.01)
    for op in (il.HessianOperator(obj), il.GaussNewtonOperator(obj), il.DenseOperator(H)):
        ref = op.dense()
        low = op.astype(torch.float32)
        M = low.dense()
        assert M.dtype == torch.float32 and low.size == op.size
        assert float((M.double() - ref).norm() / ref.norm()) < 1e-5  # float32 rounding
    assert all(p.dtype == torch.float64 for p in model.parameters())  # the shared model is left as it was
    twin = obj.astype(torch.float32)
    assert twin.theta().dtype == torch.float32 and obj.theta().dtype == torch.float64
    assert float(twin.loss(twin.theta())) == pytest.approx(float(obj.loss(obj.theta())), rel=1e-6)
    with pytest.raises(ValueError, match="floating-point"):
        obj.astype(torch.int64)


def test_mixed_precision_influence_on_a_cnn_matches_exact():
    from influence_lib.models import small_cnn

    model = small_cnn(1, 3, image_size=8, depth=1, width=3, activation="tanh", seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    evals = torch.linalg.eigvalsh(il.hessian(model, F.cross_entropy, (X, y), weight_decay=0.01))
    damping = max(0.1, 0.1 - float(evals[0]))  # positive definite, condition number below 100
    assert float(evals[-1] + damping) / float(evals[0] + damping) < 100
    exact = il.influence(model, F.cross_entropy, (X, y), (X[:3], y[:3]), weight_decay=0.01, damping=damping)
    calc = il.InfluenceCalculator(model, F.cross_entropy, (X, y), weight_decay=0.01, damping=damping, method="cg",
                                  tol=1e-6, precision="mixed")
    S = calc.scores((X[:3], y[:3]))
    assert calc.last_info["mixed"]["float32_products"] > 0
    assert rel_err(S, exact) < 1e-4  # relative residual 1e-6 times a condition number below 100
