"""Preconditioned conjugate gradients: ``X = (A + damping I)^{-1} V`` with a symmetric positive definite
approximation ``M ~ A + damping I`` (EK-FAC, as in ASTRA, Wang et al. 2025) to speed up the Krylov iteration.

The preconditioner enters symmetrically (split preconditioning): CG runs on

    (M^{-1/2} (A + damping I) M^{-1/2}) Y = M^{-1/2} V,        X = M^{-1/2} Y,

which in exact arithmetic is the same iteration as left-preconditioned CG with ``M^{-1}``, and reuses the block
CG of :func:`influence_lib.solvers.ihvp_cg` (shared Krylov space for all columns, deflation, true-residual
checks) unchanged. Its convergence depends on the spectrum of ``M^{-1/2} (A + damping I) M^{-1/2}`` instead of
that of ``A + damping I``: when ``M`` captures the large eigenvalues (EK-FAC captures the dominant block-diagonal
Gauss-Newton curvature), far fewer steps are needed. The stopping rule is the one of plain CG, on the *true*
residual of the original system: ``||v - (A + damping I) x|| <= tol ||v||`` for every column. The transformed
residual is what CG monitors; when it is below ``tol`` but the true residual is not, the iteration continues from
the current iterate with a tighter internal tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .curvature import LinearOperator
from .solvers import SolverError, _columnwise_cg, default_cg_tol, ihvp_cg
from .validation import check_nonneg, check_positive, check_positive_int

#: continuations with a tighter internal tolerance before giving up on the true residual
RESTARTS = 4


class _SplitPreconditioned(LinearOperator):
    """``M^{-1/2} (A + damping I) M^{-1/2}`` as an operator (symmetric positive definite when ``A + damping I``
    is)."""

    def __init__(self, A: LinearOperator, damping: float, inv_sqrt: Callable[[Tensor], Tensor]):
        self.A, self.damping, self.inv_sqrt = A, damping, inv_sqrt
        self.size, self.dtype, self.device = A.size, A.dtype, A.device
        self.products = 0

    def matmat(self, V: Tensor) -> Tensor:
        self.products += V.shape[1]
        W = self.inv_sqrt(V)
        return self.inv_sqrt(self.A.matmat(W) + self.damping * W)


def _check_preconditioner(preconditioner: Any) -> None:
    if not (hasattr(preconditioner, "inv_sqrt") and hasattr(preconditioner, "solve")):
        raise ValueError("preconditioner must offer solve(V) = M^(-1) V and inv_sqrt(V) = M^(-1/2) V (e.g. an "
                         f"influence_lib.EKFACSolver), got {type(preconditioner).__name__}")


def ihvp_pcg(
    A: LinearOperator,
    V: Tensor,
    damping: float = 0.0,
    *,
    preconditioner: Any,
    tol: float | None = None,
    max_iter: int | None = None,
    block: bool = True,
) -> tuple[Tensor, dict[str, Any]]:
    """Preconditioned (block) CG on ``(A + damping I) X = V`` for ``V`` ``[p]`` or ``[p, k]`` (module docstring).

    ``preconditioner``: an object with ``solve(V) = M^{-1} V`` and ``inv_sqrt(V) = M^{-1/2} V`` (an
    :class:`~influence_lib.ekfac.EKFACSolver` built with the same damping); ``M`` symmetric positive definite.
    ``block=True``: block CG on the split-preconditioned system (above); ``block=False``: ``k`` independent
    left-preconditioned CG recursions (``z = M^{-1} r``), which monitor the true residual directly. ``tol``,
    ``max_iter`` (steps per CG run, default ``10 p``) and ``block`` as in :func:`~influence_lib.solvers.ihvp_cg`.
    ``info``: ``iterations`` (steps per column, summed over continuations), ``residual`` (final relative true
    residual per column), ``products`` (columns multiplied by ``A``), ``restarts``, ``preconditioned``.
    """
    check_nonneg("damping", damping)
    tol = default_cg_tol(V.dtype) if tol is None else tol  # 1e-8 in float64, 100 eps in lower precision
    check_positive("tol", tol)
    if max_iter is not None:
        check_positive_int("max_iter", max_iter)
    _check_preconditioner(preconditioner)
    single = V.dim() == 1
    Vb = V.unsqueeze(1) if single else V
    if Vb.dim() != 2 or Vb.shape[0] != A.size:
        raise ValueError(f"V must have shape [{A.size}] or [{A.size}, k], got {tuple(V.shape)}")
    vnorm = Vb.norm(dim=0).clamp_min(1e-300)
    if not block:  # k independent left-preconditioned recursions: the loop of ihvp_cg(block=False), z = M^-1 r
        products = [0]

        def apply(Z: Tensor) -> Tensor:
            products[0] += Z.shape[1]
            return A.matmat(Z) + damping * Z

        X, R = torch.zeros_like(Vb), Vb.clone()
        iters, _ = _columnwise_cg(apply, Vb, X, R, Vb.norm(dim=0), tol,
                                  10 * A.size if max_iter is None else max_iter, damping,
                                  precondition=preconditioner.solve)
        res = (Vb - (A.matmat(X) + damping * X)).norm(dim=0) / vnorm
        out = {"iterations": iters.tolist(), "residual": res.tolist(), "products": products[0] + Vb.shape[1],
               "block": False, "restarts": 0, "preconditioned": True}
        return (X.squeeze(1) if single else X), out
    inv_sqrt = preconditioner.inv_sqrt
    op = _SplitPreconditioned(A, damping, inv_sqrt)
    rhs = inv_sqrt(Vb)
    inner_tol, Y, iters, checks = tol, None, None, 0
    for restart in range(RESTARTS + 1):
        Y, info = ihvp_cg(op, rhs, 0.0, tol=inner_tol, max_iter=max_iter, x0=Y, block=True)
        its = info["iterations"]
        iters = its if iters is None else [a + b for a, b in zip(iters, its, strict=True)]
        X = inv_sqrt(Y)
        res = (Vb - (A.matmat(X) + damping * X)).norm(dim=0) / vnorm
        checks += Vb.shape[1]
        worst = float(res.max())
        if worst <= tol:
            break
        if restart == RESTARTS:
            raise SolverError(f"preconditioned CG: true relative residual {worst:.3g} > tol={tol:g} after "
                              f"{RESTARTS} continuations; increase tol or damping")
        inner_tol = max(inner_tol * 0.5 * tol / worst, 1e-3 * inner_tol)
    out = {"iterations": iters, "residual": res.tolist(), "products": op.products + checks, "block": True,
           "restarts": restart, "preconditioned": True}
    return (X.squeeze(1) if single else X), out
