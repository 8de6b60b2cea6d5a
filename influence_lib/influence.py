"""Influence scores: the predicted change of a test loss when a training point is removed.

With ``theta*`` the trained parameters, ``A = H + damping I`` (``H`` the Hessian of the full objective,
weight decay included), ``g_i`` the loss gradient of training point ``i`` and ``g_t`` that of test point
``t`` (both at ``theta*``, weight decay not included), removing point ``i`` from the mean over ``n`` points
moves the optimum by

    theta*_{-i} - theta*  ~=  (1/n) A^{-1} g_i                                 (predicted parameter change)

and the test loss by

    L(z_t, theta*_{-i}) - L(z_t, theta*)  ~=  (1/n) g_t^T A^{-1} g_i           (the influence score)

Positive score = removing the point *raises* the test loss: the point helped that prediction. The test-side
product ``A^{-1} g_t`` is computed once per test point; the scores for all training points are then one
matrix product per chunk of training gradients. Where every selected parameter belongs to an ``nn.Linear`` or
``nn.Conv2d`` layer, the per-example gradients come layer by layer from one batched backward pass
(:mod:`influence_lib.layer_grads`) and the scores are summed over layers, so no ``[n, p]`` matrix is formed; other
models use ``torch.func.vmap`` over examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .curvature import GaussNewtonOperator, HessianOperator, LinearOperator
from .ekfac import EKFACSolver
from .layer_grads import MEMORY_BUDGET, LayerGradients
from .objective import LossFn, Objective
from .preconditioned import ihvp_pcg
from .solvers import (
    METHODS,
    PRECISIONS,
    SOLVER_OPTIONS,
    ArnoldiSolver,
    EigenSolver,
    check_result,
    ihvp_cg,
    ihvp_lissa,
    ihvp_minres,
)
from .streaming import as_tensors
from .validation import check_choice, check_data, check_finite, check_indices, check_nonneg, check_options

CURVATURES = ("hessian", "gauss-newton")
#: Without ``chunk_size``, per-example gradients are formed at most this many numbers at a time (rows x p) when
#: scoring: one vectorised pass for small problems, chunks of rows for large ones (results do not change).
SCORE_ONE_PASS_MAX = 2**24


class InfluenceCalculator:
    """Influence of the training points of ``train`` on test losses, for one trained model.

    Parameters
    ----------
    model, loss_fn, train:
        the trained model (its current parameters are ``theta*``), a batch-mean loss
        ``loss_fn(outputs, targets)`` and the training data ``(X, y)``.
    weight_decay:
        the ``wd`` of the training objective ``mean loss + (wd/2)||theta||^2``; part of ``H``.
    damping:
        ``lambda`` in ``(H + lambda I)^{-1}``.
    method:
        inverse-HVP solver, one of :data:`influence_lib.solvers.METHODS`; ``options`` go to it
        (cg: ``tol``, ``max_iter``, ``block``, ``precision`` (``"mixed"``: float32 products, float64 checks, see
        :func:`~influence_lib.solvers.ihvp_cg`), ``preconditioner`` (None, ``"ekfac"`` or a fitted
        :class:`~influence_lib.ekfac.EKFACSolver`: preconditioned CG, :mod:`influence_lib.preconditioned`);
        minres: ``tol``, ``max_iter`` (symmetric indefinite systems, where CG refuses);
        lissa: ``scale``, ``depth``, ``repeats``, ``batch_size``, ``seed``;
        arnoldi: ``rank``, ``iters``, ``seed``; ekfac: ``samples``, ``seed``, ``memory_budget`` — it approximates
        the Gauss-Newton matrix of the Linear/Conv2d layers, whatever ``curvature`` says, see
        :mod:`influence_lib.ekfac`).
    train:
        ``(X, y)`` tensors, or a ``torch.utils.data.Dataset`` / non-shuffling ``DataLoader`` of ``(x, y)`` items
        (read in batches, :mod:`influence_lib.streaming`); the same for ``test`` in :meth:`scores`.
    curvature:
        ``"hessian"`` (default) or ``"gauss-newton"`` (the GGN, as in PBRF / EK-FAC).
    params:
        names of the parameters to differentiate (default: all), e.g. the last layer only.
    chunk_size:
        rows of data per vectorised chunk (memory knob; results do not depend on it).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train: tuple[Tensor, Tensor],
        *,
        weight_decay: float = 0.0,
        damping: float = 0.0,
        method: str = "exact",
        curvature: str = "hessian",
        params: Sequence[str] | None = None,
        chunk_size: int | None = None,
        **options: Any,
    ):
        check_choice("method", method, METHODS)
        check_choice("curvature", curvature, CURVATURES)
        check_nonneg("damping", damping)
        check_options(f"method={method!r}", options, SOLVER_OPTIONS[method])
        pre = options.get("preconditioner")
        if not (pre is None or isinstance(pre, str) and pre in ("none", "ekfac") or hasattr(pre, "inv_sqrt")):
            raise ValueError(f"preconditioner must be None, 'none', 'ekfac' or an EKFACSolver, got {pre!r}")
        if "precision" in options:
            check_choice("precision", options["precision"], PRECISIONS)
            if options["precision"] != "full" and pre not in (None, "none"):
                raise ValueError("precision='mixed' is for plain CG: the preconditioned CG runs in full precision")
        train = as_tensors("train", train)
        self.objective = Objective(model, loss_fn, *train, weight_decay=weight_decay, params=params,
                                   chunk_size=chunk_size)
        self.theta = self.objective.theta()
        if method != "ekfac":  # EK-FAC checks every chunk's loss on the outputs of its own first pass
            check_finite("loss at the model's current parameters", self.objective.loss(self.theta).detach())
        self.method, self.damping, self.options = method, damping, options
        self.operator: LinearOperator = (
            HessianOperator(self.objective, self.theta) if curvature == "hessian"
            else GaussNewtonOperator(self.objective, self.theta)
        )
        self._solver: EigenSolver | ArnoldiSolver | EKFACSolver | None = None
        self._preconditioner: EKFACSolver | None = None
        self.last_info: dict[str, Any] = {}
        # per-example gradients of Linear/Conv2d layers from one batched backward pass (influence_lib.layer_grads)
        # where every selected parameter sits in such a layer; otherwise vmap over examples
        self._layer_grads = LayerGradients.supports(self.objective, self.theta)
        self._rows: int | None = None

    @property
    def n_train(self) -> int:
        return self.objective.n

    @property
    def solver(self) -> EigenSolver | ArnoldiSolver | EKFACSolver | None:
        """The factorised solver that ``method`` "exact", "arnoldi" or "ekfac" built on first use (None before that,
        and always None for the iterative methods "cg", "minres" and "lissa", which keep no state between calls)."""
        return self._solver

    # --- the inverse-HVP ----------------------------------------------------------------------
    def ihvp(self, V: Tensor) -> Tensor:
        """``(A + damping I)^{-1} V`` for ``V`` ``[p]`` or ``[p, k]`` with the configured method."""
        V = V.to(dtype=self.theta.dtype, device=self.theta.device)
        if self.method == "exact":
            if self._solver is None:
                self._solver = EigenSolver(self.operator.dense(), self.damping)
            X, info = self._solver.solve(V), self._solver.info
        elif self.method == "arnoldi":
            if self._solver is None:
                self._solver = ArnoldiSolver(self.operator, self.damping, **self.options)
            X, info = self._solver.solve(V), self._solver.info
        elif self.method == "ekfac":
            X, info = self._ekfac().solve(V), self._ekfac().info
        elif self.method == "cg":
            opts = {k: v for k, v in self.options.items() if k != "preconditioner"}
            pre = self.options.get("preconditioner")
            if pre not in (None, "none"):
                opts.pop("precision", None)  # "full" (__init__ refuses anything else with a preconditioner)
            if pre is None or pre == "none":
                X, info = ihvp_cg(self.operator, V, self.damping, **opts)
            else:  # EK-FAC-preconditioned (block) CG, see influence_lib.preconditioned
                if pre == "ekfac":
                    if self._preconditioner is None:
                        self._preconditioner = EKFACSolver(self.objective, self.theta, self.damping, for_scores=False)
                    pre = self._preconditioner
                X, info = ihvp_pcg(self.operator, V, self.damping, preconditioner=pre, **opts)
        elif self.method == "minres":
            X, info = ihvp_minres(self.operator, V, self.damping, **self.options)
        else:  # lissa
            X, info = ihvp_lissa(self.operator, V, self.damping, **self.options)
        self.last_info = info
        return check_result(f"method={self.method!r}", X)

    def _ekfac(self) -> EKFACSolver:
        if not isinstance(self._solver, EKFACSolver):
            self._solver = EKFACSolver(self.objective, self.theta, self.damping, layer_gradients=self._layer_grads,
                                       **self.options)
        return self._solver

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues (ascending, float64) of the curvature without damping; computed once, exact method."""
        if not isinstance(self._solver, EigenSolver):
            self._solver = EigenSolver(self.operator.dense(), self.damping) if self.method == "exact" else None
            if self._solver is None:
                return torch.linalg.eigvalsh(self.operator.dense().double())
        return self._solver.evals

    # --- gradients ----------------------------------------------------------------------------
    def _check_points(self, name: str, data: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        X, y = check_data(name, as_tensors(name, data), device=self.theta.device, dtype=self.theta.dtype)
        if X.shape[1:] != self.objective.X.shape[1:]:
            raise ValueError(
                f"{name}: inputs must have shape [m, {', '.join(map(str, self.objective.X.shape[1:]))}] like "
                f"the training inputs, got {tuple(X.shape)}"
            )
        return self.objective.check_points(name, (X, y))  # labels of the kind and range of the training labels

    def gradients(self, data: tuple[Tensor, Tensor], name: str = "data") -> Tensor:
        """Per-example loss gradients ``[m, p]`` at ``theta*`` (no weight decay)."""
        X, y = self._check_points(name, data)
        if self._layer_grads is not None:
            lg, rows = self._layer_grads, self._score_rows()
            G = torch.cat([lg.flat_per_example(X[s:s + rows], y[s:s + rows]) for s in range(0, X.shape[0], rows)])
        else:
            G = torch.cat([g for _, g in self.objective.per_sample_grads(self.theta, X, y)])
        return check_finite("per-example gradients", G)

    def _score_rows(self) -> int:
        """Rows per chunk of the layer-gradient path: ``chunk_size``, else what fits the memory budget."""
        if self._rows is None:
            self._rows = self._layer_grads.rows_per_chunk(MEMORY_BUDGET)
        return self._rows

    def test_ihvp(self, test: tuple[Tensor, Tensor]) -> Tensor:
        """``A^{-1} g_t`` for every test point, ``[p, m]``."""
        return self.ihvp(self.gradients(test, "test").T)

    # --- scores -------------------------------------------------------------------------------
    def scores(self, test: tuple[Tensor, Tensor]) -> Tensor:
        """``[m_test, n_train]``: ``(1/n) g_t^T (H + damping I)^{-1} g_i`` (see the module docstring)."""
        obj = self.objective
        if self.method == "ekfac":  # layer by layer in the Kronecker eigenbasis, training rows streamed in chunks
            Xt, yt = self._check_points("test", test)
            solver = self._ekfac()
            self.last_info = solver.info
            return check_finite("influence scores", solver.scores(Xt, yt) / self.n_train)
        if self._layer_grads is not None and obj.chunk_size is None:
            lg, (Xt, yt) = self._layer_grads, self._check_points("test", test)
            m = Xt.shape[0]
            # the training rows in one chunk, and the test rows with them within the budget: one pass for both
            if self.n_train <= self._score_rows() and (m + self.n_train) * lg.chunk_bytes_per_row() <= MEMORY_BUDGET:
                f, a, outs = lg.forward(torch.cat([Xt, obj.X]), keep=True)
                g = next(lg.backprop_columns(f, outs, lg.loss_gradient_column(f, torch.cat([yt, obj.y]))))
                Gt = [torch.bmm(gi[:m].transpose(1, 2), ai[:m]) for gi, ai in zip(g, a, strict=True)]
                G = check_finite("per-example gradients", lg.unblocks(Gt, self.theta.new_empty(obj.p, m)))
                S = lg.score_blocks(lg.blocks(self.ihvp(G)))
                out = lg.contract(S, [ai[m:] for ai in a], [gi[m:] for gi in g])
                return check_finite("influence scores", out / self.n_train)
        if self._layer_grads is not None:  # layer by layer, training rows in chunks: no [n, p] gradients
            lg, rows = self._layer_grads, self._score_rows()
            S = lg.score_blocks(lg.blocks(self.test_ihvp(test)))  # per layer, from [m, out, cols]
            out = [lg.inner_products(S, obj.X[start:start + rows], obj.y[start:start + rows])
                   for start in range(0, self.n_train, rows)]
            return check_finite("influence scores", torch.cat(out, dim=1) / self.n_train)
        if obj.chunk_size is None and self.n_train * obj.p <= SCORE_ONE_PASS_MAX:
            # one vectorised pass for the test and the training gradients (per-example results are the same)
            Xt, yt = self._check_points("test", test)
            m = Xt.shape[0]
            _, G = next(obj.per_sample_grads(self.theta, torch.cat([Xt, obj.X]), torch.cat([yt, obj.y])))
            G = check_finite("per-example gradients", G)
            S = self.ihvp(G[:m].T)  # [p, m]
            return check_finite("influence scores", (G[m:] @ S).T / self.n_train)
        S = self.test_ihvp(test)  # [p, m]
        out = []
        rows = obj.chunk_size or max(1, SCORE_ONE_PASS_MAX // obj.p)  # at most [rows, p] gradients at a time
        for start in range(0, self.n_train, rows):
            sl = slice(start, min(start + rows, self.n_train))
            _, G = next(obj.per_sample_grads(self.theta, obj.X[sl], obj.y[sl]))
            out.append((G @ S).T)  # [m, chunk]
        return check_finite("influence scores", torch.cat(out, dim=1) / self.n_train)

    def param_change(self, remove: Sequence[int] | Tensor) -> Tensor:
        """Predicted ``theta*_{-i} - theta*`` ``= (1/n) A^{-1} g_i`` for each removed ``i``: ``[len, p]``."""
        idx = check_indices("remove", remove, self.n_train)
        G = self.gradients((self.objective.X[idx], self.objective.y[idx]))
        return (self.ihvp(G.T) / self.n_train).T

    def self_influence(self, indices: Sequence[int] | Tensor | None = None, batch: int = 256) -> Tensor:
        """``(1/n) g_i^T A^{-1} g_i`` for the training points ``indices`` (default all), ``[len]``.

        The predicted rise of a point's own loss when it is removed (its leave-one-out "memorisation").
        """
        idx = torch.arange(self.n_train) if indices is None else check_indices("indices", indices, self.n_train)
        out = []
        for start in range(0, idx.numel(), batch):
            sub = idx[start:start + batch].to(self.objective.X.device)
            G = self.gradients((self.objective.X[sub], self.objective.y[sub]))
            out.append((G * self.ihvp(G.T).T).sum(1) / self.n_train)
        return torch.cat(out)


def influence(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    weight_decay: float = 0.0,
    method: str = "exact",
    damping: float = 0.0,
    **options: Any,
) -> Tensor:
    """Predicted change of each test loss when each training point is removed: ``[n_test, n_train]``.

    ``(1/n) g_test^T (H + damping I)^{-1} g_i`` with ``H`` the Hessian of
    ``mean_i loss_fn(model(x_i), y_i) + (weight_decay/2)||theta||^2`` at the model's current parameters.
    ``method`` in ``("exact", "cg", "minres", "lissa", "arnoldi", "ekfac")``; ``options`` go to
    :class:`InfluenceCalculator` (``curvature``, ``params``, ``chunk_size``) or the solver. ``train`` and ``test``
    are ``(X, y)`` tensors or a ``torch.utils.data.Dataset`` / non-shuffling ``DataLoader`` of ``(x, y)`` items.
    """
    calc_keys = {"curvature", "params", "chunk_size"}
    calc_opts = {k: options.pop(k) for k in list(options) if k in calc_keys}
    calc = InfluenceCalculator(model, loss_fn, train, weight_decay=weight_decay, damping=damping, method=method,
                               **calc_opts, **options)
    return calc.scores(test)
