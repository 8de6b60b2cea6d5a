"""Curvature as linear operators: Hessian, Gauss-Newton, dense matrices; extreme eigenvalues.

An operator ``A`` of size ``p`` offers ``A.matmat(V)`` for ``V`` of shape ``[p, k]`` (returns ``A V``,
``[p, k]``), ``A.dense()`` (the ``[p, p]`` matrix) and, for data-based operators, ``A.on_rows(idx)``: the
same operator with the data term averaged over a subset of training rows (a stochastic estimate).
Damping is never part of an operator; solvers add ``damping * I`` themselves.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .objective import HVP_BLOCK, ONE_BLOCK_MAX_P, LinearizedChunk, LossFn, Objective, dense_from_products
from .validation import check_data, check_finite, check_finite_params, check_positive_int


class LinearOperator:
    """A symmetric ``[p, p]`` operator known through products with blocks of vectors."""

    size: int
    dtype: torch.dtype
    device: torch.device

    def matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def dense(self, block_size: int = HVP_BLOCK) -> Tensor:
        """The operator as a dense ``[p, p]`` matrix, from products with blocks of unit vectors."""
        return dense_from_products(self.matmat, torch.empty(0, dtype=self.dtype, device=self.device), self.size,
                                   block_size)

    def on_rows(self, rows: Tensor) -> LinearOperator:
        raise NotImplementedError(f"{type(self).__name__} has no data rows to subsample")

    def reserve(self, columns: int) -> None:
        """A solver announces about ``columns`` further products; an operator may switch to a cheaper form."""

    def astype(self, dtype: torch.dtype) -> LinearOperator | None:
        """The same operator with its products computed in ``dtype`` (e.g. float32 beside a float64 operator, for
        mixed-precision CG), or None where this operator cannot make them."""
        return None

    @property
    def n_rows(self) -> int | None:
        return None


class DenseOperator(LinearOperator):
    """A given symmetric matrix ``M`` ``[p, p]``."""

    def __init__(self, M: Tensor):
        if M.dim() != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"M must be a square matrix, got shape {tuple(M.shape)}")
        self.M, self.size, self.dtype, self.device = M, M.shape[0], M.dtype, M.device

    def matmat(self, V: Tensor) -> Tensor:
        return self.M @ V

    def dense(self, block_size: int = 128) -> Tensor:
        return self.M

    def astype(self, dtype: torch.dtype) -> DenseOperator:
        return DenseOperator(self.M.to(dtype))


class HessianOperator(LinearOperator):
    """``H = Hessian of J`` at ``theta`` (weight decay included), products by reverse-over-reverse AD.

    The gradient graph of the data is built on the first product and kept. ``densify=True`` (default,
    ``p <= densify_max_size``, full data only): the dense ``[p, p]`` matrix is assembled layer by layer from products
    with unit vectors (:meth:`~influence_lib.objective.Objective.dense_hessian`, in blocks of
    :data:`~influence_lib.objective.HVP_BLOCK` columns) once the products asked for have used ``p`` columns, or
    earlier, when a solver announces (:meth:`reserve`) products that cost at least as much as the assembly; every
    later product is a matrix multiplication. The assembly's cost, :attr:`assembly_columns`, is counted in products on
    the whole graph: ``p`` for a model of one layer, less for deeper ones, whose later layers' columns are products on
    the graph downstream of them only.
    The switch at most doubles the cost of the products already made and makes the remaining ones nearly
    free: iterative solvers that need many more than ``p`` products (CG on many right-hand sides, LiSSA) then
    cost about one dense Hessian. A solver that knows its number of products in advance (full-batch LiSSA) or can
    estimate the rest (CG, from its convergence rate) announces it with :meth:`reserve`, and the matrix is assembled
    when that is cheaper. The results agree to rounding error.
    """

    #: largest ``p`` for which the operator may switch to a dense matrix (``p^2`` floats of memory)
    densify_max_size = 4096

    def __init__(self, objective: Objective, theta: Tensor | None = None, rows: Tensor | None = None,
                 *, densify: bool = True):
        self.objective = objective
        self.theta = objective.theta() if theta is None else theta
        self.rows = rows
        self.size, self.dtype, self.device = objective.p, self.theta.dtype, self.theta.device
        self.densify = densify and rows is None and self.size <= self.densify_max_size
        self._apply: Callable[[Tensor], Tensor] | None = None
        self._dense: Tensor | None = None
        self._columns = 0  # columns multiplied by AD so far

    @property
    def assembly_columns(self) -> int:
        """The estimated cost of assembling the dense matrix, in products on the whole graph
        (:meth:`~influence_lib.objective.Objective.assembly_cost`)."""
        return math.ceil(self.objective.assembly_cost())

    def _hvp(self, V: Tensor) -> Tensor:
        if self._apply is None:  # build the gradient graphs on first use and keep them
            self._apply = self.objective.hvp_operator(self.theta, self.rows)
        block = self.size if self.size <= ONE_BLOCK_MAX_P else HVP_BLOCK
        if V.shape[1] <= block:
            return self._apply(V)
        return torch.cat([self._apply(V[:, j:j + block]) for j in range(0, V.shape[1], block)], dim=1)

    def matmat(self, V: Tensor) -> Tensor:
        if self._dense is not None:
            return self._dense @ V
        out = self._hvp(V)
        if self.densify:
            self._columns += V.shape[1]
            if self._columns >= self.size:
                self._dense = self._assemble(HVP_BLOCK)
        return out

    def reserve(self, columns: int) -> None:
        """Assemble the dense matrix now if ``columns`` announced products would cost at least as much."""
        if self.densify and self._dense is None and columns >= self.assembly_columns:
            self._dense = self._assemble(HVP_BLOCK)

    def _assemble(self, block_size: int) -> Tensor:
        M = self.objective.dense_hessian(self.theta, self.rows, block_size=block_size, apply_all=self._hvp)
        if self.densify:  # every later product is by the matrix: the kept graph is not needed any more
            self._apply = None
        return (M + M.T) / 2

    def dense(self, block_size: int = HVP_BLOCK) -> Tensor:
        if self._dense is not None:
            return self._dense
        M = self._assemble(block_size)  # products on the kept gradient graph (of the selected rows, if any)
        if self.densify:
            self._dense = M
        return M

    def on_rows(self, rows: Tensor) -> HessianOperator:
        return HessianOperator(self.objective, self.theta, rows)

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        if self._dense is not None:  # already assembled: its products are matrix products
            return DenseOperator(self._dense.to(dtype))
        return HessianOperator(self.objective.astype(dtype), self.theta.to(dtype), self.rows, densify=self.densify)

    @property
    def n_rows(self) -> int:
        return self.objective.n


class GaussNewtonOperator(LinearOperator):
    """Generalised Gauss-Newton matrix ``G`` of ``J`` at ``theta`` (weight decay included); ``rows``: the data term
    averaged over those training rows only (:meth:`on_rows`, the mini-batches of stochastic solvers such as LiSSA).

    ``keep=True`` (default; full data only): from the second product on, each chunk of training rows is linearized
    once (:meth:`Objective.linearize_chunk`) and its forward pass's intermediates are kept, while they fit in
    :attr:`keep_budget` bytes; every later product of a kept chunk runs only the tangent pass and its transpose, the
    chunks beyond the budget are recomputed as before. On the LeNet of ``benchmarks/scale.py`` (46,730 parameters,
    500-row chunks, one CPU thread) a product then costs about 1.0 s instead of 2.3-3.1 s, for about 80 MB kept per
    chunk; linearizing costs about half a second per chunk, once, which the first product does not pay (a single
    product is not worth it). The results agree with the recomputed products to rounding error. A model that
    :func:`torch.func.linearize` cannot trace (data-dependent control flow) is recomputed, with a warning.
    """

    #: bytes of kept intermediates (the linearized chunks' tensors) a full-data operator may hold
    keep_budget = 1 << 30

    def __init__(self, objective: Objective, theta: Tensor | None = None, rows: Tensor | None = None,
                 *, keep: bool = True):
        self.objective = objective
        self.theta = objective.theta() if theta is None else theta
        self.rows = rows
        self.size, self.dtype, self.device = objective.p, self.theta.dtype, self.theta.device
        self.keep = keep and rows is None
        self._kept: list[LinearizedChunk] | None = None  # the linearized chunks, in chunk order (a prefix)
        self.kept_bytes = 0
        self._products = 0

    def matmat(self, V: Tensor) -> Tensor:
        self._products += 1
        if not self.keep or self._products == 1:
            return self.objective.gnvp(self.theta, V, self.rows)
        obj = self.objective
        out = obj.weight_decay * V
        building = self._kept is None
        if building:
            self._kept = []
        for i, sl in enumerate(obj.chunks()):
            if i < len(self._kept):
                out = out + obj.gnvp_linearized(self._kept[i], V)
                continue
            if building and self.keep:
                chunk = self._linearize(sl)
                if chunk is not None:
                    out = out + obj.gnvp_linearized(chunk, V)
                    size = kept_nbytes(chunk)
                    if self.kept_bytes + size <= self.keep_budget:
                        self._kept.append(chunk)
                        self.kept_bytes += size
                    else:
                        building = False  # the budget is spent: the remaining chunks are recomputed
                    continue
            out = out + obj._gnvp_chunk(self.theta, obj.X[sl], obj.y[sl], (sl.stop - sl.start) / obj.n, V)
        return out

    def _linearize(self, sl: slice) -> LinearizedChunk | None:
        try:
            return self.objective.linearize_chunk(self.theta, sl)
        except Exception as err:  # noqa: BLE001 - any tracing failure: the products are recomputed instead
            warnings.warn(f"GaussNewtonOperator: torch.func.linearize could not trace the model ({type(err).__name__}: "
                          f"{err}); each product recomputes the forward pass instead", stacklevel=3)
            self.keep = False
            return None

    def on_rows(self, rows: Tensor) -> GaussNewtonOperator:
        return GaussNewtonOperator(self.objective, self.theta, rows)

    def astype(self, dtype: torch.dtype) -> GaussNewtonOperator:
        return GaussNewtonOperator(self.objective.astype(dtype), self.theta.to(dtype), self.rows, keep=self.keep)

    @property
    def n_rows(self) -> int:
        return self.objective.n


def kept_nbytes(chunk: LinearizedChunk) -> int:
    """Bytes of the tensors a linearized chunk holds (its outputs and the constants of its traced tangent pass),
    each storage counted once."""
    seen: dict[int, int] = {}

    def add(t: Tensor) -> None:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()

    add(chunk.outputs)
    for cell in chunk.jvp_fn.__closure__ or ():
        obj = cell.cell_contents
        if isinstance(obj, nn.Module):
            for t in (*obj.parameters(), *obj.buffers()):
                add(t)
        elif isinstance(obj, Tensor):
            add(obj)
    return sum(seen.values())


def hessian(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[Tensor, Tensor],
    *,
    weight_decay: float = 0.0,
    params: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Dense Hessian ``[p, p]`` of ``mean_i loss_fn(model(x_i), y_i) + (weight_decay/2)||theta||^2``.

    Parameters are flattened in ``model.parameters()`` order (or the order of ``params``), at their
    current values; the result has the model's dtype and device.
    """
    obj = _objective(model, loss_fn, data, weight_decay, params, chunk_size)
    return check_finite("hessian: the Hessian", obj.hessian(obj.theta()))


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[Tensor, Tensor],
    v: Tensor,
    *,
    weight_decay: float = 0.0,
    params: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Hessian-vector product ``H v`` (``v``: ``[p]`` or ``[p, k]``) of the same objective as :func:`hessian`."""
    obj = _objective(model, loss_fn, data, weight_decay, params, chunk_size)
    if not isinstance(v, Tensor) or not v.is_floating_point() or v.dim() not in (1, 2) or v.shape[0] != obj.p:
        got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"v must be a floating-point tensor of shape [{obj.p}] or [{obj.p}, k] (p = the number of "
                         f"parameters), got {got}")
    check_finite("v", v)
    return check_finite("hvp: the Hessian-vector product", obj.hvp(obj.theta(), v.to(dtype=obj.theta().dtype,
                                                                                       device=obj.theta().device)))


def _objective(model: nn.Module, loss_fn: LossFn, data: tuple[Tensor, Tensor], weight_decay: float,
               params: Sequence[str] | None, chunk_size: int | None) -> Objective:
    """The objective of :func:`hessian` / :func:`hvp`; refuses bad data and non-finite parameters up front."""
    X, y = check_data("data", data)
    obj = Objective(model, loss_fn, X, y, weight_decay=weight_decay, params=params, chunk_size=chunk_size)
    check_finite_params("model parameters", obj.theta())
    return obj


def lanczos(
    op: LinearOperator | Callable[[Tensor], Tensor],
    size: int | None = None,
    *,
    iters: int = 60,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Lanczos with full re-orthogonalisation: Ritz values ``[m]`` (ascending) and vectors ``[p, m]``.

    ``m = min(iters, p)``. The extreme Ritz values converge first: with ``m = p`` the decomposition is
    exact (up to rounding). ``op`` is a :class:`LinearOperator` or a function ``V[p,k] -> A V``.
    """
    check_positive_int("iters", iters)
    if isinstance(op, LinearOperator):
        matmat, size, dtype, device = op.matmat, op.size, op.dtype, op.device
    else:
        matmat = op
        if size is None or dtype is None:
            raise ValueError("size and dtype are required when op is a function")
    m = min(iters, size)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(size, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    Q = torch.zeros(size, m, dtype=dtype, device=device)
    alpha = torch.zeros(m, dtype=dtype, device=device)
    beta = torch.zeros(m, dtype=dtype, device=device)
    q = q / q.norm()
    for j in range(m):
        Q[:, j] = q
        w = matmat(q.unsqueeze(1)).squeeze(1)
        alpha[j] = q.dot(w)
        # full re-orthogonalisation (twice is enough, "twice is enough" of Parlett)
        for _ in range(2):
            w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        b = w.norm()
        if j + 1 < m:
            if b <= 1e-10 * alpha[: j + 1].abs().max().clamp_min(1e-30):
                # invariant subspace found (e.g. a repeated eigenvalue): restart from a fresh random
                # direction orthogonal to it, leaving beta[j] = 0 (T becomes block diagonal)
                w = torch.randn(size, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
                for _ in range(2):
                    w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
                q = w / w.norm()
                continue
            beta[j] = b
            q = w / b
    T = torch.diag(alpha) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    evals, S = torch.linalg.eigh(T)
    return evals, Q @ S


def extreme_eigenvalues(op: LinearOperator, *, iters: int = 60, seed: int = 0) -> tuple[float, float]:
    """Estimates ``(lambda_min, lambda_max)`` of a symmetric operator by Lanczos (no dense matrix)."""
    evals, _ = lanczos(op, iters=iters, seed=seed)
    return float(evals[0]), float(evals[-1])


def spectrum_summary(H: Tensor) -> dict[str, float]:
    """Summary of a dense symmetric matrix's spectrum (see :func:`eigenvalue_summary`)."""
    return eigenvalue_summary(torch.linalg.eigvalsh(H.double()))


def eigenvalue_summary(ev: Tensor) -> dict[str, float]:
    """Extremes, number and mass of negative eigenvalues, trace and condition number of a spectrum.

    ``negative_mass = sum |negative eigenvalues| / sum |eigenvalues|``; ``condition_abs = max|e| / min|e|``.
    """
    ev = ev.double().sort().values
    abs_ev = ev.abs()
    neg = ev[ev < 0]
    return {
        "lambda_max": float(ev[-1]),
        "lambda_min": float(ev[0]),
        "n_negative": int(neg.numel()),
        "negative_mass": float(neg.abs().sum() / abs_ev.sum()) if abs_ev.sum() > 0 else 0.0,
        "trace": float(ev.sum()),
        "condition_abs": float(abs_ev.max() / abs_ev.min()) if abs_ev.min() > 0 else float("inf"),
    }
