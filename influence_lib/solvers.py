"""Inverse-Hessian-vector products ``X = (A + damping I)^{-1} V`` for a block ``V`` of shape ``[p, k]``.

One damping convention everywhere: ``damping`` is added to the operator ``A`` (the Hessian of the full
objective, which already contains ``weight_decay * I``). Every solver returns the same quantity, so they are
interchangeable; each returns ``(X, info)`` where ``info`` is a small dict of diagnostics.

- :func:`ihvp_exact`   eigendecomposition of the dense matrix in float64 (works for indefinite ``A`` as long
                       as ``A + damping I`` is non-singular).
- :func:`ihvp_cg`      block conjugate gradients (all columns share one Krylov space; or per column),
                       stopping on the *true* residual.
- :func:`ihvp_minres`  MINRES (Paige & Saunders 1975), one Krylov recursion per column: symmetric *indefinite*
                       systems too, where CG must refuse (the Hessian of a non-convex model plus a damping below
                       ``-lambda_min``), stopping on the true residual.
- :func:`ihvp_lissa`   the stochastic Neumann-series recursion of Agarwal et al. (2017) as used by Koh & Liang.
- :func:`ihvp_arnoldi` low-rank: the top-``rank`` eigenpairs from a Krylov (Lanczos/Arnoldi) iteration,
                       inverted in that subspace and zero outside it (Schioppa et al. 2022).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .curvature import LinearOperator, lanczos
from .validation import NonFiniteError, check_nonneg, check_positive, check_positive_int


class SolverError(RuntimeError):
    """An inverse-HVP solver failed; the message says which setting to change."""


class LissaDivergenceError(SolverError):
    """The LiSSA recursion grew without bound."""


def _as_block(V: Tensor) -> tuple[Tensor, bool]:
    if V.dim() == 1:
        return V.unsqueeze(1), True
    if V.dim() != 2:
        raise ValueError(f"V must have shape [p] or [p, k], got {tuple(V.shape)}")
    return V, False


def _check_size(op: LinearOperator, V: Tensor) -> None:
    if V.shape[0] != op.size:
        raise ValueError(f"V: expected {op.size} rows (the number of parameters), got {V.shape[0]}")


def symmetric_eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``, falling back to LAPACK's relatively robust representations (``dsyevr``, SciPy) where
    the divide-and-conquer driver fails to converge (seen on float64 Hessians of ReLU networks with many exactly
    repeated zero eigenvalues from dead units)."""
    try:
        return torch.linalg.eigh(A)
    except torch.linalg.LinAlgError:
        import scipy.linalg

        w, v = scipy.linalg.eigh(A.detach().cpu().numpy(), driver="evr")
        return torch.from_numpy(w).to(A), torch.from_numpy(v).to(A)


class EigenSolver:
    """Exact solves from one eigendecomposition ``A = Q diag(e) Q^T`` (reused across right-hand sides)."""

    def __init__(self, A: Tensor, damping: float = 0.0, *, rtol: float = 1e-12):
        check_nonneg("damping", damping)
        A64 = A.detach().double()
        sym_err = (A64 - A64.T).abs().max()
        if sym_err > 1e-6 * A64.abs().max().clamp_min(1e-300):
            raise ValueError(f"A must be symmetric; max |A - A^T| = {float(sym_err):.3g}")
        self.evals, self.evecs = symmetric_eigh(A64)
        self.damping = damping
        shifted = self.evals + damping
        smallest = shifted.abs().min()
        if smallest <= rtol * shifted.abs().max():
            raise SolverError(
                f"A + damping*I is singular (smallest |eigenvalue| {float(smallest):.3g}, "
                f"lambda_min(A) = {float(self.evals[0]):.4g}); choose damping != {-float(self.evals[0]):.4g}, "
                "e.g. a positive damping above -lambda_min"
            )
        self.inv = 1.0 / shifted
        self.dtype = A.dtype

    def solve(self, V: Tensor) -> Tensor:
        Vb, single = _as_block(V)
        X = self.evecs @ (self.inv.unsqueeze(1) * (self.evecs.T @ Vb.double()))
        X = X.to(V.dtype)
        return X.squeeze(1) if single else X

    @property
    def info(self) -> dict[str, Any]:
        return {
            "lambda_min": float(self.evals[0]),
            "lambda_max": float(self.evals[-1]),
            "n_negative": int((self.evals + self.damping < 0).sum()),
        }


def ihvp_exact(A: Tensor | LinearOperator, V: Tensor, damping: float = 0.0) -> tuple[Tensor, dict[str, Any]]:
    """``(A + damping I)^{-1} V`` by a float64 eigendecomposition of the dense ``A`` (``[p, p]``)."""
    M = A.dense() if isinstance(A, LinearOperator) else A
    solver = EigenSolver(M, damping)
    return solver.solve(V), solver.info


def ihvp_cg(
    A: LinearOperator,
    V: Tensor,
    damping: float = 0.0,
    *,
    tol: float | None = None,
    max_iter: int | None = None,
    x0: Tensor | None = None,
    block: bool = True,
    precision: str = "full",
) -> tuple[Tensor, dict[str, Any]]:
    """Conjugate gradients on ``(A + damping I) X = V`` for all ``k`` columns of ``V`` ``[p, k]`` at once.

    ``block=True`` (default): block CG (O'Leary 1980). The columns share one Krylov space: step ``j`` multiplies
    ``A`` with an orthonormal basis ``P_j`` of the new search directions (at most one per unconverged column),
    and every column's iterate is the Galerkin solution over all directions found so far,

        X <- X + P a,    a = (P^T A P)^{-1} P^T R,      R = V - (A + damping I) X,
        P <- orth(R_active + P b),   b = -(P^T A P)^{-1} (A P)^T R_active   (A-conjugate to the previous P),

    so a column also profits from the directions the other columns contribute. On influence problems, whose
    right-hand sides share one spectrum, this takes 2-3x fewer steps than ``k`` independent CG runs for the
    same number of products per step. Directions that are numerically dependent (duplicate or collinear
    columns) are dropped (deflation, see :func:`_orth`). ``block=False``: ``k`` independent CG recursions
    (products still batched).

    Each column stops when its *true* residual ``||v - (A + damping I) x|| <= tol * ||v||``
    (``tol=None``: :func:`default_cg_tol` of ``V``'s dtype, ``1e-8`` in float64, ``~1.2e-5`` in float32): when the
    recursively updated residual falls below ``tol``, the true residual is recomputed and the iteration
    restarts from it if it is not small enough. From the third step on, CG estimates the products it still needs from
    the rate at which its worst relative residual has fallen so far, ``log(tol / r_j) / log((r_j / r_0)^(1/j))``
    steps of the current number of directions, and announces them to ``A`` (:meth:`LinearOperator.reserve`): a
    Hessian operator that can assemble its dense matrix for less does so, and the remaining products are matrix
    products (the same solution to rounding).

    ``precision="mixed"`` (float64 systems; default ``"full"``): the search directions are multiplied by a float32
    copy of the operator (:meth:`LinearOperator.astype`: the same data and parameters, cast), while the iterates, the
    recurrences and every true-residual check stay in float64, so the answer meets the same float64 criterion; the
    first failed check (float32 rounding stalling the recursion) or non-positive step switches the remaining products
    to float64 (``info["mixed"]``: the float32 products and whether it fell back). For loose tolerances (``1e-3`` to
    ``1e-5``; each failed check costs a restart below that): a float32 product costs about half a float64 one on
    the CPU where its convolutions run in oneDNN (the 640-parameter CNN of ``benchmarks/compare.py``: 15 against 32
    ms with 5 columns; on its 210-parameter CNN, with 4 channels, 13 against 10: slower), far less on most GPUs, and
    the float32 rounding costs some steps on ill-conditioned systems (on the 640-parameter CNN, 139 products instead
    of 102 to ``1e-3``, benchmarks/results/compare.json). Operators without a float32 copy (``astype`` None) run in
    full precision.

    Raises :class:`SolverError` if ``A + damping I`` shows non-positive curvature on the search space (CG needs a
    positive definite system: increase ``damping``) or if ``max_iter`` steps (default ``10 p``) are reached.
    ``info``: ``iterations`` (steps until each column converged), ``residual`` (final relative true residual per
    column), ``products`` (columns multiplied by ``A``, including the residual checks), ``block`` and
    ``max_directions`` (the widest search block used in one step; at most ``rank(V)`` for block CG, because dependent
    directions are deflated), and with ``precision="mixed"`` ``mixed``.
    """
    Vb, single, tol, max_iter, apply, counter = _krylov_setup(A, V, damping, tol, max_iter)
    p, k = Vb.shape
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    low = A.astype(torch.float32) if precision == "mixed" and Vb.dtype == torch.float64 else None
    search = None if low is None else _LowPrecisionApply(low, damping, counter)
    if x0 is not None and x0.numel() != p * k:
        raise ValueError(f"x0 must have the shape of V ({tuple(V.shape)}), got {tuple(x0.shape)}")
    vnorm = Vb.norm(dim=0)
    X = torch.zeros_like(Vb) if x0 is None else x0.reshape(p, k).clone()
    R = Vb - apply(X) if x0 is not None else Vb.clone()
    announce = A.reserve if low is None else low.reserve
    if block:
        iters, max_directions = _block_cg(apply, Vb, X, R, vnorm, tol, max_iter, damping, announce=announce,
                                          search=search)
    else:
        iters, max_directions = _columnwise_cg(apply, Vb, X, R, vnorm, tol, max_iter, damping, announce=announce,
                                               search=search)
    # every column ends with its true residual in R (each confirmed by a product when it converged, and left alone
    # after that): no further product is needed to report it
    residual = R.norm(dim=0) / vnorm.clamp_min(1e-300)
    info = {"iterations": iters.tolist(), "residual": residual.tolist(), "products": counter[0], "block": block,
            "max_directions": max_directions}
    if search is not None:
        info["mixed"] = {"float32_products": search.products, "fell_back": search.fell_back}
    return (X.squeeze(1) if single else X), info


#: ``precision`` of :func:`ihvp_cg`
PRECISIONS = ("full", "mixed")


class _LowPrecisionApply:
    """``Z -> (A32 + damping I) Z`` for a float64 ``Z``: the product in float32 (``low``), the result and the damping
    term in float64. Counts its columns in ``counter[0]`` (with the float64 ones) and in :attr:`products`."""

    def __init__(self, low: LinearOperator, damping: float, counter: list[int]):
        self.low, self.damping, self.counter = low, damping, counter
        self.products, self.fell_back = 0, False

    def __call__(self, Z: Tensor) -> Tensor:
        self.counter[0] += Z.shape[1]
        self.products += Z.shape[1]
        return self.low.matmat(Z.to(torch.float32)).to(Z.dtype) + self.damping * Z


def _krylov_setup(A: LinearOperator, V: Tensor, damping: float, tol: float | None, max_iter: int | None):
    """The checks and the product of the Krylov solvers (CG, MINRES): ``(Vb [p, k], single, tol, max_iter, apply,
    counter)`` with ``apply(Z) = (A + damping I) Z`` counting the columns it multiplies in ``counter[0]``."""
    check_nonneg("damping", damping)
    _check_size(A, V)
    Vb, single = _as_block(V)
    tol = default_cg_tol(Vb.dtype) if tol is None else tol
    check_positive("tol", tol)
    max_iter = 10 * Vb.shape[0] if max_iter is None else max_iter
    check_positive_int("max_iter", max_iter)
    counter = [0]

    def apply(Z: Tensor) -> Tensor:
        counter[0] += Z.shape[1]
        return A.matmat(Z) + damping * Z

    return Vb, single, tol, max_iter, apply, counter


def default_cg_tol(dtype: torch.dtype) -> float:
    """CG's default relative residual for a dtype: ``1e-8`` in float64, ``100 eps`` in lower precision (``1.2e-5`` in
    float32), where rounding alone keeps the true residual near ``eps * cond(A)`` and a float64 tolerance is
    never reached."""
    return max(1e-8, 100 * torch.finfo(dtype).eps)


def _not_positive_definite(damping: float) -> SolverError:
    return SolverError(
        "CG met non-positive curvature p^T (A + damping I) p <= 0: the system is not positive definite. "
        f"Increase damping (now {damping:g}) above -lambda_min(A), or use method='exact'"
    )


def _max_iter_reached(apply, Vb: Tensor, X: Tensor, vnorm: Tensor, tol: float, max_iter: int) -> SolverError:
    res = (Vb - apply(X)).norm(dim=0) / vnorm.clamp_min(1e-300)
    return SolverError(
        f"CG did not reach tol={tol:g} in max_iter={max_iter} iterations (worst relative residual "
        f"{float(res.max()):.3g}); increase max_iter or damping (better conditioning)"
    )


def _orth(Z: Tensor, floor: float) -> Tensor:
    """Orthonormal basis of the directions of ``Z`` ``[p, m]`` that matter (deflation).

    ``Z``'s columns are measured relative to their right-hand sides (so a column at the tolerance has norm
    ``tol``). Column by column (classical Gram-Schmidt, twice), a column's component orthogonal to the
    directions kept so far is kept when its norm exceeds ``floor``: dependent columns (duplicates, multiples,
    combinations) leave rounding noise far below ``floor`` and are dropped, while a column that still has to
    go down to ``tol`` keeps its own direction. (A plain QR would not do: a dropped column's noise direction
    would still be projected out of the columns after it.)
    """
    Q = torch.empty_like(Z)
    m = 0
    for j in range(Z.shape[1]):
        z = Z[:, j]
        if m:
            z = z - Q[:, :m] @ (Q[:, :m].T @ z)
            z = z - Q[:, :m] @ (Q[:, :m].T @ z)
        nz = z.norm()
        if nz > floor:
            Q[:, m] = z / nz
            m += 1
    return Q[:, :m]


def remaining_steps(rel: Tensor, rel0: Tensor, steps: int, tol: float) -> float:
    """Steps a Krylov solver still needs if each column's relative residual keeps falling at the average rate of its
    first ``steps`` steps: ``max_j log(tol / rel_j) / log((rel_j / rel0_j)^(1/steps))`` over columns not yet at
    ``tol`` (``inf`` where a residual has not fallen)."""
    live = rel > tol
    if not bool(live.any()):
        return 0.0
    rate = (rel[live] / rel0[live].clamp_min(1e-300)).log() / steps  # log of the per-step factor (< 0 if falling)
    if bool((rate >= 0).any()):
        return math.inf
    return float(((tol / rel[live]).log() / rate).max())


def _announce_remaining(announce, R: Tensor, active: Tensor, vnorm: Tensor, rel0: Tensor, steps: int, tol: float,
                        width: int) -> None:
    """Tell the operator how many products (``width`` per step) the solver still expects (see :func:`ihvp_cg`)."""
    if announce is None or steps < 3 or not bool(active.any()):
        return
    rel = R[:, active].norm(dim=0) / vnorm[active]
    left = remaining_steps(rel, rel0[active], steps, tol)
    if left > 0:
        announce(int(min(left * width, 2**62)))


def _block_cg(apply, Vb: Tensor, X: Tensor, R: Tensor, vnorm: Tensor, tol: float, max_iter: int,
              damping: float, announce=None, search=None) -> tuple[Tensor, int]:
    """Block CG in place on ``X`` and ``R`` (see :func:`ihvp_cg`); returns the steps per column and the widest
    search block. ``announce``: called with the estimated number of products still to come (``A.reserve``).
    ``search``: the product for the search directions where it is not ``apply`` (mixed precision, see
    :func:`ihvp_cg`); a failed true-residual check, a non-positive step matrix or ``max_iter // 2`` steps switch to
    ``apply``, every unconverged column restarting from its true residual (:func:`_to_full_precision`)."""
    k = Vb.shape[1]
    multiply = apply if search is None else search
    active = (vnorm > 0) & (R.norm(dim=0) > tol * vnorm)
    iters = torch.zeros(k, dtype=torch.long)
    floor = max(1e-2 * tol, 100 * torch.finfo(Vb.dtype).eps)

    def directions(Z: Tensor) -> Tensor:
        return _orth(Z / vnorm[active], floor)

    def restart_in_full_precision() -> Tensor:
        nonlocal multiply
        multiply = _to_full_precision(search, apply, Vb, X, R, active)
        return directions(R[:, active])

    P = directions(R[:, active])
    rel0 = R.norm(dim=0) / vnorm.clamp_min(1e-300)
    it = widest = 0
    while bool(active.any()):
        if multiply is not apply and it >= max_iter // 2:
            P = restart_in_full_precision()
        if P.shape[1] == 0:  # every direction deflated: go on from the true residual
            R[:, active] = Vb[:, active] - apply(X[:, active])
            P = directions(R[:, active])
            if P.shape[1] == 0:
                raise SolverError(f"CG cannot reduce the residual below tol={tol:g} in this precision; "
                                  "increase tol")
        if it >= max_iter:
            raise _max_iter_reached(apply, Vb, X, vnorm, tol, max_iter)
        it += 1
        widest = max(widest, P.shape[1])
        AP = multiply(P)
        PAP = P.T @ AP
        chol, bad = torch.linalg.cholesky_ex((PAP + PAP.T) / 2)
        if int(bad) != 0 and multiply is not apply:  # float32 rounding, or the system: decide in full precision
            P = restart_in_full_precision()
            AP = apply(P)
            PAP = P.T @ AP
            chol, bad = torch.linalg.cholesky_ex((PAP + PAP.T) / 2)
        if int(bad) != 0:
            raise _not_positive_definite(damping)
        a = torch.cholesky_solve(P.T @ R[:, active], chol)  # converged columns are left as confirmed
        X[:, active] += P @ a
        R[:, active] -= AP @ a
        iters[active] += 1
        done = active & (R.norm(dim=0) <= tol * vnorm)
        if bool(done.any()):  # confirm with the true residual; restart from it where the recursion drifted
            d_idx = done.nonzero().squeeze(1)
            R_true = Vb[:, d_idx] - apply(X[:, d_idx])
            ok = R_true.norm(dim=0) <= tol * vnorm[d_idx]
            R[:, d_idx] = R_true
            active[d_idx[ok]] = False
            if not bool(ok.all()) and multiply is not apply:  # the float32 recursion drifted: float64 from here
                P = restart_in_full_precision()
                continue
        if not bool(active.any()):
            break
        Ra = R[:, active]
        b = -torch.cholesky_solve(AP.T @ Ra, chol)
        P = directions(Ra + P @ b)
        _announce_remaining(announce, R, active, vnorm, rel0, it, tol, P.shape[1])
    return iters, widest


def _to_full_precision(search, apply, Vb: Tensor, X: Tensor, R: Tensor, active: Tensor):
    """End the float32 phase of mixed-precision CG: every active column's residual ``R`` becomes its true float64
    residual (the float32 recursion's has drifted from it) and ``apply`` multiplies from here. Returns ``apply``."""
    search.fell_back = True
    if bool(active.any()):
        R[:, active] = Vb[:, active] - apply(X[:, active])
    return apply


def _columnwise_cg(apply, Vb: Tensor, X: Tensor, R: Tensor, vnorm: Tensor, tol: float, max_iter: int,
                   damping: float, precondition=None, announce=None, search=None) -> tuple[Tensor, int]:
    """``k`` independent (optionally preconditioned) CG recursions in place on ``X`` and ``R``; returns the steps
    per column and the number of search directions per step (``k``).

    ``precondition``: ``Z -> M^{-1} Z`` for a symmetric positive definite ``M`` (left preconditioning: ``z = M^{-1} r``,
    ``alpha = r^T z / p^T A p``, ``p <- z + (r'^T z' / r^T z) p``); None is ``M = I``, plain CG. Each column stops on
    its true residual ``||v - (A + damping I) x|| <= tol ||v||``, confirmed by one product when the recursive residual
    gets there, and restarts from the true residual where the recursion has drifted. ``search``: as in
    :func:`_block_cg`.
    """
    k = Vb.shape[1]
    multiply = apply if search is None else search

    def M(Z: Tensor) -> Tensor:
        return Z if precondition is None else precondition(Z)

    Z = M(R)
    P = Z.clone()
    rz = (R * Z).sum(0)
    active = (vnorm > 0) & (R.norm(dim=0) > tol * vnorm)
    iters = torch.zeros(k, dtype=torch.long)
    rel0 = R.norm(dim=0) / vnorm.clamp_min(1e-300)

    def restart_in_full_precision() -> None:
        nonlocal multiply
        multiply = _to_full_precision(search, apply, Vb, X, R, active)
        Za = M(R[:, active])
        P[:, active], rz[active] = Za, (R[:, active] * Za).sum(0)

    it = 0
    while bool(active.any()):
        if multiply is not apply and it >= max_iter // 2:
            restart_in_full_precision()
        if it >= max_iter:
            raise _max_iter_reached(apply, Vb, X, vnorm, tol, max_iter)
        _announce_remaining(announce, R, active, vnorm, rel0, it, tol, int(active.sum()))
        it += 1
        idx = active.nonzero().squeeze(1)
        Pa = P[:, idx]
        AP = multiply(Pa)
        curv = (Pa * AP).sum(0)
        if bool((curv <= 0).any()) and multiply is not apply:
            restart_in_full_precision()
            Pa = P[:, idx]
            AP = apply(Pa)
            curv = (Pa * AP).sum(0)
        if bool((curv <= 0).any()):
            raise _not_positive_definite(damping)
        alpha = rz[idx] / curv
        X[:, idx] += alpha * Pa
        R[:, idx] -= alpha * AP
        iters[idx] += 1
        Ri = R[:, idx]
        done = (Ri * Ri).sum(0).sqrt() <= tol * vnorm[idx]
        if bool(done.any()):
            # confirm with the true residual; restart from it where the recursion has drifted
            d_idx = idx[done]
            R_true = Vb[:, d_idx] - apply(X[:, d_idx])
            ok = R_true.norm(dim=0) <= tol * vnorm[d_idx]
            active[d_idx[ok]] = False
            R[:, d_idx[ok]] = R_true[:, ok]  # a converged column keeps its true residual
            if not bool(ok.all()) and multiply is not apply:  # the float32 recursion drifted: float64 from here
                restart_in_full_precision()
                continue
            redo = d_idx[~ok]
            if redo.numel():
                Rr = R_true[:, ~ok]
                Zr = M(Rr)
                R[:, redo], P[:, redo], rz[redo] = Rr, Zr, (Rr * Zr).sum(0)
            idx = idx[~done]
        if idx.numel():
            Ri = R[:, idx]
            Zi = M(Ri)
            rz_new = (Ri * Zi).sum(0)
            P[:, idx] = Zi + (rz_new / rz[idx]) * P[:, idx]
            rz[idx] = rz_new
    return iters, int((vnorm > 0).sum())


def ihvp_minres(
    A: LinearOperator,
    V: Tensor,
    damping: float = 0.0,
    *,
    tol: float | None = None,
    max_iter: int | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """MINRES on ``(A + damping I) X = V``: each column's iterate minimises ``||v - (A + damping I) x||`` over the
    Krylov space ``span{v, Av, ..., A^{j-1} v}`` (Paige & Saunders 1975; the Lanczos recursion with Givens rotations).

    Unlike CG it needs ``A + damping I`` only symmetric and non-singular, not positive definite: on the damped
    Hessian of a non-convex model with ``lambda_min(A) < -damping`` it returns the same ``(A + damping I)^{-1} V`` as
    :func:`ihvp_exact`, without a dense matrix. The ``k`` columns run as independent recursions whose products are
    batched (``A`` is applied to the block of unconverged columns). Each column stops when its *true* residual
    ``||v - (A + damping I) x|| <= tol ||v||`` (``tol=None``: :func:`default_cg_tol` of the dtype): the recursion's
    residual estimate is confirmed by one product, and a column whose rounding has drifted restarts from its true
    residual. Raises :class:`SolverError` after ``max_iter`` steps in all (default ``10 p``), which is also what a
    singular system does. ``info``: ``iterations`` and ``residual`` (final relative true residual) per column,
    ``products`` (columns multiplied by ``A``, including the residual checks) and ``restarts``.
    """
    Vb, single, tol, max_iter, apply, counter = _krylov_setup(A, V, damping, tol, max_iter)
    k = Vb.shape[1]
    vnorm = Vb.norm(dim=0)
    X = torch.zeros_like(Vb)
    R = Vb.clone()
    iters = torch.zeros(k, dtype=torch.long)
    restarts = -1
    while True:
        active = (vnorm > 0) & (R.norm(dim=0) > tol * vnorm)
        if not bool(active.any()):
            break
        left = max_iter - int(iters.max())
        if left <= 0:
            res = torch.where(vnorm > 0, R.norm(dim=0) / vnorm.clamp_min(torch.finfo(vnorm.dtype).tiny), 0.0)
            raise SolverError(f"MINRES did not reach tol={tol:g} in max_iter={max_iter} iterations (worst relative "
                              f"residual {float(res.max()):.3g}); increase max_iter, or the system may be singular "
                              "(choose a damping away from -lambda_min(A))")
        restarts += 1
        idx = active.nonzero().squeeze(1)
        dX, steps = _minres_columns(apply, R[:, idx], tol * vnorm[idx], left)
        X[:, idx] += dX
        iters[idx] += steps
        R = Vb - apply(X)
    residual = torch.where(vnorm > 0, R.norm(dim=0) / vnorm.clamp_min(torch.finfo(vnorm.dtype).tiny), 0.0)
    info = {"iterations": iters.tolist(), "residual": residual.tolist(), "products": counter[0],
            "restarts": max(restarts, 0)}
    return (X.squeeze(1) if single else X), info


def _minres_columns(apply, B: Tensor, target: Tensor, max_iter: int) -> tuple[Tensor, Tensor]:
    """Independent MINRES recursions from ``x = 0`` for the columns of ``B`` ``[p, m]``, each until its residual
    estimate ``phibar`` is at most ``target`` ``[m]`` (or its Krylov space is exhausted) or ``max_iter`` steps;
    returns ``(X, steps per column)``. The state of a finished column is frozen (``torch.where``), so the columns
    never mix."""
    m = B.shape[1]
    zero = torch.zeros(m, dtype=B.dtype, device=B.device)
    beta1 = B.norm(dim=0)
    r1, r2, y = B.clone(), B.clone(), B.clone()
    oldb, beta, dbar, epsln, phibar = zero.clone(), beta1.clone(), zero.clone(), zero.clone(), beta1.clone()
    cs, sn = -torch.ones_like(zero), zero.clone()
    w, w2, X = torch.zeros_like(B), torch.zeros_like(B), torch.zeros_like(B)
    steps = torch.zeros(m, dtype=torch.long)
    active = phibar > target
    tiny = torch.finfo(B.dtype).tiny
    for it in range(1, max_iter + 1):
        if not bool(active.any()):
            break
        idx = active.nonzero().squeeze(1)
        v = y / beta.clamp_min(tiny)
        Av = torch.zeros_like(B)
        Av[:, idx] = apply(v[:, idx])
        if it > 1:
            Av = Av - (beta / oldb.clamp_min(tiny)) * r1
        alfa = (v * Av).sum(0)
        Av = Av - (alfa / beta.clamp_min(tiny)) * r2
        new_beta = Av.norm(dim=0)
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        new_eps = sn * new_beta
        new_dbar = -cs * new_beta
        gamma = torch.hypot(gbar, new_beta).clamp_min(tiny)
        new_cs, new_sn = gbar / gamma, new_beta / gamma
        phi = new_cs * phibar
        new_w = (v - epsln * w2 - delta * w) / gamma
        a = active.unsqueeze(0)
        X = torch.where(a, X + phi * new_w, X)
        w2, w = torch.where(a, w, w2), torch.where(a, new_w, w)
        r1, r2, y = torch.where(a, r2, r1), torch.where(a, Av, r2), torch.where(a, Av, y)
        oldb = torch.where(active, beta, oldb)
        beta, epsln, dbar = (torch.where(active, new_beta, beta), torch.where(active, new_eps, epsln),
                             torch.where(active, new_dbar, dbar))
        cs, sn = torch.where(active, new_cs, cs), torch.where(active, new_sn, sn)
        phibar = torch.where(active, new_sn * phibar, phibar)
        steps[idx] += 1
        active = active & (phibar > target) & (beta > 0)
    return X, steps


def ihvp_lissa(
    A: LinearOperator,
    V: Tensor,
    damping: float = 0.0,
    *,
    scale: float | None = None,
    depth: int = 1000,
    repeats: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    divergence_factor: float = 10.0,
) -> tuple[Tensor, dict[str, Any]]:
    """LiSSA: ``X ~ (A + damping I)^{-1} V`` from the truncated Neumann series, averaged over ``repeats``.

    Recursion (per column): ``x_0 = v``, ``x_{j+1} = v + (I - (A_j + damping I)/scale) x_j``, result
    ``x_depth / scale``, where ``A_j`` is ``A`` evaluated on a random mini-batch of ``batch_size`` training
    rows (``None``: all rows, a deterministic Neumann series). It converges iff every eigenvalue of
    ``(A + damping I) / scale`` lies in ``(0, 2)``: ``damping`` must exceed ``-lambda_min(A)`` and
    ``scale`` must exceed ``lambda_max(A + damping I) / 2``. ``scale=None`` picks ``1.5 lambda_max``
    estimated by 30 Lanczos steps. The truncation error decays like ``(1 - (lambda_min + damping)/scale)^depth``.

    What cannot converge is refused with :class:`LissaDivergenceError`, whose message names the setting to change:

    - always: as soon as ``||x_j||`` exceeds ``divergence_factor (j+1) ||v||`` (impossible while the recursion
      contracts) or becomes non-finite;
    - full batch (``batch_size=None``), before the recursion: when the Lanczos estimate of the spectrum of
      ``A + damping I`` (the one ``scale=None`` computes anyway; for a given ``scale`` it is computed when its
      30 products cost at most a quarter of the recursion's ``depth * k``) shows an eigenvalue ``<= 0`` (damping) or
      one ``>= 2 scale`` (scale). Ritz values lie inside the spectrum, so these refusals are never wrong;
    - full batch, during the recursion: from the recursion's own growth rate. The increments
      ``d_j = x_{j+1} - x_j = (I - B)^{j+1} v`` (``B = (A + damping I)/scale``) have a norm that is log-convex in
      ``j``: it can only fall while the recursion converges and, once it rises, rises for ever. A rise of the
      increments above their running minimum by more than 1% (and well above the rounding noise) is divergence;
      the Rayleigh quotient ``1 - d_j^T d_{j+1} / ||d_j||^2`` of ``B`` on the growing increment says whether
      the culprit is an eigenvalue ``<= 0`` (damping too small) or ``>= 2 scale`` (scale too small).

    The mini-batch recursion is checked by the norm bound only (its increments are noisy by design).
    """
    check_nonneg("damping", damping)
    check_positive_int("depth", depth)
    check_positive_int("repeats", repeats)
    check_positive("divergence_factor", divergence_factor)
    _check_size(A, V)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
        if A.n_rows is None:
            raise ValueError("batch_size: the operator has no data rows to subsample; use batch_size=None")
        if batch_size > A.n_rows:
            raise ValueError(f"batch_size must be <= the number of training rows ({A.n_rows}), got {batch_size}")
    info: dict[str, Any] = {}
    Vb, single = _as_block(V)
    full = batch_size is None
    spectrum: tuple[float, float] | None = None
    if scale is None:
        spectrum = _top_eig(A, damping, seed)
        lam_max = spectrum[1]
        scale = 1.5 * lam_max
        info["lambda_max_estimate"] = lam_max
        if scale <= 0:
            raise LissaDivergenceError(
                f"A + damping*I has no positive eigenvalue (lambda_max ~ {lam_max:.3g}); increase damping"
            )
    check_positive("scale", scale)
    products = depth * repeats * Vb.shape[1]
    if full and spectrum is None and products >= 4 * _LISSA_LANCZOS_ITERS:
        A.reserve(products + _LISSA_LANCZOS_ITERS)  # the estimate's products count towards the densify decision
        spectrum = _top_eig(A, damping, seed)
    if full and spectrum is not None:
        _check_lissa_spectrum(spectrum, scale, damping)
    vnorm = Vb.norm(dim=0).clamp_min(1e-300)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if full:  # a known number of full-data products: the operator may densify first
        A.reserve(products)
    eps = torch.finfo(Vb.dtype).eps
    noise_scale = 64 * eps * math.sqrt(Vb.shape[0])
    total = torch.zeros_like(Vb)
    for r in range(repeats):
        X = Vb.clone()
        d_prev = d_min = None
        for j in range(depth):
            op = A
            if batch_size is not None:
                rows = torch.randperm(A.n_rows, generator=gen)[:batch_size].to(Vb.device)
                op = A.on_rows(rows)
            X_new = Vb + X - (op.matmat(X) + damping * X) / scale
            xn = X_new.norm(dim=0)
            if not bool(torch.isfinite(xn).all()) or bool((xn > divergence_factor * (j + 2) * vnorm).any()):
                raise LissaDivergenceError(
                    f"LiSSA diverged at iteration {j + 1} of repeat {r + 1} (||x|| / ||v|| = "
                    f"{float((xn / vnorm).max()):.3g}). Increase scale (now {scale:.4g}; it must exceed "
                    "lambda_max(A + damping I)/2, larger for small batch_size) or increase damping (now "
                    f"{damping:g}; it must exceed -lambda_min(A))"
                )
            if full:  # the increments of a deterministic Neumann series (see the docstring)
                D = X_new - X
                dn = D.norm(dim=0)
                if d_prev is not None:
                    noise = noise_scale * (xn + vnorm)
                    growing = (dn > 1.01 * d_min + 8 * noise) & (d_min > 0)
                    if bool(growing.any()):
                        c = int(growing.nonzero()[0, 0])
                        rq = 1.0 - float(d_prev[:, c].dot(D[:, c]) / d_prev[:, c].dot(d_prev[:, c]))
                        raise _lissa_growth_error(j + 1, r + 1, float(dn[c] / d_min[c]), rq, scale, damping)
                    d_min = torch.minimum(d_min, dn)
                else:
                    d_min = dn
                d_prev = D
            X = X_new
        total += X / scale
    X = total / repeats
    info.update({"scale": scale, "depth": depth, "repeats": repeats, "batch_size": batch_size})
    return (X.squeeze(1) if single else X), info


#: Lanczos steps of LiSSA's spectrum estimate (the ``scale=None`` default and the full-batch check).
_LISSA_LANCZOS_ITERS = 30


def lissa_full_batch_limit(solver: EigenSolver, V: Tensor, *, scale: float,
                           depth: int) -> tuple[Tensor, dict[str, Any]]:
    """What full-batch LiSSA (:func:`ihvp_lissa` with ``batch_size=None``, one repeat) returns after ``depth`` steps,
    in closed form from an exact eigendecomposition ``A = Q diag(lambda) Q^T`` (``solver``, with its damping).

    The recursion ``x_{j+1} = v + (I - B) x_j``, ``B = (A + damping I) / scale``, result ``x_depth / scale``, is the
    spectral filter ``Q diag(c) Q^T V`` with ``c(mu) = (1 - (1 - mu / scale)^(depth + 1)) / mu`` for the shifted
    eigenvalues ``mu = lambda + damping`` (``(depth + 1) / scale`` at ``mu = 0``). As ``depth`` grows, ``c -> 1/mu``
    (the exact solve) wherever ``0 < mu < 2 scale``; elsewhere the series diverges and ``c`` grows geometrically.
    So the difference from the exact solve is LiSSA's *truncation* error alone, without the sampling noise of
    mini-batches. ``V``: ``[p]`` or ``[p, k]``; returns ``(X, info)`` with ``info["truncation_factor"]``
    ``= max |1 - mu / scale|^(depth + 1)`` over the convergent eigenvalues (the share of the slowest eigendirection
    still missing) and ``info["n_divergent"]``, the number of eigenvalues outside ``(0, 2 scale)``.
    """
    check_positive("scale", scale)
    check_positive_int("depth", depth)
    Vb, single = _as_block(V)
    mu = solver.evals + solver.damping  # float64
    r = 1.0 - mu / scale
    safe = mu.abs() > 1e-300
    c = torch.where(safe, (1.0 - r ** (depth + 1)) / torch.where(safe, mu, torch.ones_like(mu)),
                    torch.full_like(mu, (depth + 1) / scale))
    X = solver.evecs @ (c.unsqueeze(1) * (solver.evecs.T @ Vb.double()))
    convergent = r.abs() < 1
    factor = float((r[convergent].abs() ** (depth + 1)).max()) if convergent.any() else float("nan")
    info = {"scale": float(scale), "depth": int(depth), "n_divergent": int((~convergent).sum()),
            "truncation_factor": factor}
    X = X.to(V.dtype)
    return (X.squeeze(1) if single else X), info


def _check_lissa_spectrum(spectrum: tuple[float, float], scale: float, damping: float) -> None:
    """Refuse a full-batch LiSSA that cannot converge, from Ritz values of ``A + damping I`` (inside its spectrum)."""
    lo, hi = spectrum
    if lo <= 0:
        raise LissaDivergenceError(
            f"LiSSA cannot converge: A + damping*I has an eigenvalue <= 0 (Lanczos estimate {lo:.4g}), so the "
            f"Neumann series grows along it. Increase damping (now {damping:g}) above -lambda_min(A) "
            f"(about {damping - lo:.4g} or more), or use method='exact'"
        )
    if hi >= 2 * scale:
        raise LissaDivergenceError(
            f"LiSSA cannot converge: scale (now {scale:.4g}) must exceed lambda_max(A + damping I)/2 "
            f"(Lanczos estimate of lambda_max {hi:.4g}); increase scale, e.g. to {1.5 * hi:.4g} (or pass scale=None)"
        )


def _lissa_growth_error(it: int, rep: int, growth: float, rq: float, scale: float,
                        damping: float) -> LissaDivergenceError:
    where = f"LiSSA diverges: its increments grew {growth:.3g}x above their minimum by iteration {it} of repeat {rep}"
    if rq <= 1.0:
        return LissaDivergenceError(
            f"{where}, along a direction of non-positive curvature of A + damping*I. Increase damping (now "
            f"{damping:g}; it must exceed -lambda_min(A)) or use method='exact' (scale now {scale:.4g})"
        )
    return LissaDivergenceError(
        f"{where}, along a direction of curvature above 2*scale. Increase scale (now {scale:.4g}; it must exceed "
        f"lambda_max(A + damping I)/2) or pass scale=None (damping now {damping:g})"
    )


def _top_eig(A: LinearOperator, damping: float, seed: int) -> tuple[float, float]:
    evals, _ = lanczos(A, iters=_LISSA_LANCZOS_ITERS, seed=seed)
    return float(evals[0]) + damping, float(evals[-1]) + damping


class ArnoldiSolver:
    """Low-rank inverse from the top-``rank`` (by magnitude) eigenpairs of a Krylov iteration on ``A``.

    ``A ~ U diag(e) U^T`` with ``U`` ``[p, rank]``; the solve is ``U diag(1/(e + damping)) U^T V``: exact on
    the span of ``U`` and zero on its complement. With ``rank = iters = p`` it equals the exact solve.
    """

    def __init__(self, A: LinearOperator, damping: float = 0.0, *, rank: int = 20, iters: int | None = None,
                 seed: int = 0):
        check_nonneg("damping", damping)
        check_positive_int("rank", rank)
        iters = min(A.size, max(2 * rank, rank + 20)) if iters is None else iters
        check_positive_int("iters", iters)
        if rank > iters:
            raise ValueError(f"rank must be <= iters ({iters}), got {rank}")
        evals, evecs = lanczos(A, iters=iters, seed=seed)
        order = evals.abs().argsort(descending=True)[:rank]
        self.evals, self.U = evals[order], evecs[:, order]
        shifted = self.evals + damping
        if bool((shifted.abs() <= 1e-12 * shifted.abs().max()).any()):
            raise SolverError("A + damping*I is singular on the Arnoldi subspace; change damping")
        self.inv = 1.0 / shifted
        self.iters = iters

    def solve(self, V: Tensor) -> Tensor:
        Vb, single = _as_block(V)
        X = self.U @ (self.inv.unsqueeze(1) * (self.U.T @ Vb))
        return X.squeeze(1) if single else X

    @property
    def info(self) -> dict[str, Any]:
        return {"rank": int(self.U.shape[1]), "iters": self.iters,
                "eigenvalues": [float(e) for e in self.evals]}


def ihvp_arnoldi(
    A: LinearOperator, V: Tensor, damping: float = 0.0, *, rank: int = 20, iters: int | None = None, seed: int = 0
) -> tuple[Tensor, dict[str, Any]]:
    """Low-rank ``(A + damping I)^{-1} V`` (see :class:`ArnoldiSolver`)."""
    _check_size(A, V)
    solver = ArnoldiSolver(A, damping, rank=rank, iters=iters, seed=seed)
    return solver.solve(V), solver.info


SOLVER_OPTIONS: dict[str, tuple[str, ...]] = {
    "exact": (),
    "cg": ("tol", "max_iter", "block", "precision", "preconditioner"),  # preconditioner: influence_lib.preconditioned
    "minres": ("tol", "max_iter"),
    "lissa": ("scale", "depth", "repeats", "batch_size", "seed", "divergence_factor"),
    "arnoldi": ("rank", "iters", "seed"),
    "ekfac": ("samples", "fisher", "seed", "memory_budget"),  # influence_lib.ekfac: Linear/Conv2d layers
}
METHODS = tuple(SOLVER_OPTIONS)


def check_result(name: str, X: Tensor) -> Tensor:
    if not bool(torch.isfinite(X).all()):
        raise NonFiniteError(f"{name}: the inverse-HVP contains NaN or infinite values")
    return X


def relative_error(X: Tensor, X_ref: Tensor) -> float:
    """``||X - X_ref||_F / ||X_ref||_F``."""
    return float((X - X_ref).norm() / X_ref.norm().clamp_min(math.ulp(0.0)))
