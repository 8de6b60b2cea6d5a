"""The proximal Bregman response function (PBRF) of Bae et al. (2022): what influence functions estimate.

Bae, Ng, Lo, Ghassemi & Grosse, "If Influence Functions are the Answer, Then What is the Question?" (NeurIPS
2022) show that for networks that are not trained to a unique optimum, the influence function with the
Gauss-Newton matrix ``G`` and damping does not approximate leave-one-out retraining but a different response:
starting from the trained parameters ``theta_s`` (a stationary point is *not* required), down-weight training
point ``m`` inside a *Bregman divergence* objective kept close to ``theta_s``. With this project's weight-decay
convention the objective of one removal is

    theta_m = argmin_theta  (1/n) sum_i D_i(f(x_i, theta), f(x_i, theta_s))          Bregman term
                            + epsilon * L(f(x_m, theta), y_m)                          the removal
                            + ((weight_decay + damping) / 2) ||theta - theta_s||^2     proximity

    D_i(a, b) = L(a, y_i) - L(b, y_i) - grad_b L(b, y_i)^T (a - b)     (Bregman divergence of the loss, OUTPUT space)

with ``epsilon = -1/n`` for removing point ``m`` (the default). ``D_i >= 0`` for a loss that is convex in the
outputs (cross-entropy, squared error), so at ``epsilon = 0`` the minimiser is ``theta_s`` itself and no
optimiser drift needs cancelling: the reference of every change below is ``theta_s``.

**Weight decay.** Bae et al. write the objective for a cost without a regulariser. The training objective here is
``mean loss + (wd/2)||theta||^2``, and the influence convention of :mod:`influence_lib.influence` is
``(H + damping I)^{-1}`` with ``H`` (or ``G``) *including* ``wd * I``. The regulariser is treated like the loss:
it enters through its own Bregman divergence (in parameter space), which for ``(wd/2)||theta||^2`` is exactly
``(wd/2)||theta - theta_s||^2``. Added to the proximity term this gives the strength ``wd + damping`` above.
(Keeping ``(wd/2)||theta||^2`` itself instead would add the gradient ``wd * theta_s`` at ``theta_s``, so that
``theta_s`` would not be the minimiser at ``epsilon = 0`` unless the model were trained to a stationary point.)

**What influence functions predict.** At ``theta_s`` the objective has gradient ``epsilon * g_m`` (``g_m`` the loss
gradient of point ``m``) and, at ``epsilon = 0``, Hessian ``G + damping I`` with
``G = (1/n) sum_i J_i^T H_out,i J_i + wd I`` the Gauss-Newton matrix of the training objective (the second
derivative of ``D_i`` is ``J_i^T H_out,i J_i`` because its first derivative in the outputs vanishes at
``theta_s``). Hence, to first order in ``epsilon``,

    theta_m - theta_s  ~=  -epsilon (G + damping I)^{-1} g_m  =  (1/n) (G + damping I)^{-1} g_m       (removal)

and the test-loss change ``L(z_t, theta_m) - L(z_t, theta_s) ~= (1/n) g_t^T (G + damping I)^{-1} g_m``: the
influence score of :func:`influence_lib.influence` with ``curvature="gauss-newton"``.
Sign convention as everywhere in this library: a change is that of the test loss when the point is REMOVED.

Many removals are optimised at once: the ``R`` parameter vectors are stacked ``[R, p]`` and trained with the
optimiser loop of :func:`influence_lib.retrain.minimize_stacked` (vmap over the models).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from tqdm import tqdm

from .curvature import GaussNewtonOperator, extreme_eigenvalues
from .newton import newton_minimize
from .objective import LossFn, Objective
from .retrain import LOOResult, TrainConfig, minimize_stacked, test_losses_of
from .validation import (
    NonFiniteError,
    check_finite,
    check_indices,
    check_nonneg,
    check_positive_int,
)


class PBRF:
    """The PBRF objective of one trained model, for any removed point and weight ``epsilon``.

    ``objective`` fixes the model, loss, training data, weight decay and the parameters that form ``theta``;
    ``theta_s`` (default: the model's current parameters) is the anchor; ``damping`` the proximity strength
    added to the weight decay. The anchor outputs ``f(x_i, theta_s)``, losses and output gradients are computed
    once here.
    """

    def __init__(self, objective: Objective, theta_s: Tensor | None = None, damping: float = 0.0):
        check_nonneg("damping", damping)
        self.objective = objective
        self.theta_s = (objective.theta() if theta_s is None else theta_s).detach()
        if self.theta_s.shape != (objective.p,):
            raise ValueError(f"theta_s must have shape ({objective.p},), got {tuple(self.theta_s.shape)}")
        self.damping = float(damping)
        self.strength = objective.weight_decay + self.damping  # of (1/2)||theta - theta_s||^2
        loss_fn = objective.loss_fn

        def out_loss(o: Tensor, t: Tensor) -> Tensor:  # the loss of one example as a function of its output
            return loss_fn(o.unsqueeze(0), t.unsqueeze(0))

        self._out_loss = out_loss
        with torch.no_grad():
            self.anchor_out = objective.forward(self.theta_s, objective.X)
        self.anchor_loss = check_finite("training losses at theta_s", vmap(out_loss)(self.anchor_out, objective.y))
        self.anchor_grad = check_finite("output gradients at theta_s",
                                        vmap(grad(out_loss))(self.anchor_out, objective.y))
        self._stacked = vmap(self._per_model, in_dims=(0, 0, None, None, None, None, None))

    @property
    def n(self) -> int:
        return self.objective.n

    def _per_model(self, theta: Tensor, r: Tensor, xb: Tensor, yb: Tensor, ab: Tensor, gb: Tensor,
                   lb: Tensor) -> Tensor:
        """Mean over the rows of ``D_i + r_i L_i`` for one model (``r = n * epsilon * e_m`` for one removal)."""
        out = self.objective.forward(theta, xb)
        losses = vmap(self._out_loss)(out, yb)
        bregman = losses - lb - (gb * (out - ab)).reshape(out.shape[0], -1).sum(1)
        return (bregman + r * losses).mean()

    def removal_weights(self, remove: Tensor, epsilon: float) -> Tensor:
        """``[R, n]`` with ``n * epsilon`` at each removed point: the data term is a mean over the rows."""
        R = torch.zeros(remove.numel(), self.n, dtype=self.theta_s.dtype, device=self.theta_s.device)
        R[torch.arange(remove.numel()), remove.to(R.device)] = self.n * epsilon
        return R

    def data_terms(self, Theta: Tensor, R: Tensor, rows: Tensor | None = None) -> Tensor:
        """Bregman plus removal terms ``[B]`` of stacked parameters ``Theta`` ``[B, p]`` (no proximity term).

        ``rows`` (indices of a mini-batch) gives the unbiased mini-batch estimate: the mean over those rows.
        """
        obj = self.objective
        if rows is None:
            return self._stacked(Theta, R, obj.X, obj.y, self.anchor_out, self.anchor_grad, self.anchor_loss)
        return self._stacked(Theta, R[:, rows], obj.X[rows], obj.y[rows], self.anchor_out[rows],
                             self.anchor_grad[rows], self.anchor_loss[rows])

    def value(self, theta: Tensor, m: int, epsilon: float | None = None) -> Tensor:
        """The full PBRF objective (see the module docstring) at flat ``theta`` ``[p]`` for point ``m``."""
        eps = -1.0 / self.n if epsilon is None else epsilon
        R = self.removal_weights(check_indices("m", m, self.n), eps)
        d = theta - self.theta_s
        return self.data_terms(theta.unsqueeze(0), R)[0] + 0.5 * self.strength * d.dot(d)

    def gradient_norms(self, Theta: Tensor, R: Tensor) -> Tensor:
        """``||grad PBRF(theta_b)||`` of every model of a stack (full batch, proximity included): ``[B]``."""
        with torch.enable_grad():
            th = Theta.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.data_terms(th, R).sum(), th)
        return (g + self.strength * (Theta - self.theta_s)).norm(dim=1)


@dataclass
class PBRFResult(LOOResult):
    """Outcome of PBRF optimisation (fields of :class:`~influence_lib.retrain.LOOResult`, with
    ``theta_ref = theta_s``), plus the convergence diagnostics ``grad_norm`` ``[R]`` (norm of the PBRF gradient at
    the returned parameters) and ``grad_norm_start`` ``[R]`` (its norm at ``theta_s``, ``|epsilon| ||g_m||``):
    their ratio says how far each optimisation got."""

    grad_norm: Tensor | None = None
    grad_norm_start: Tensor | None = None

    @property
    def diverged(self) -> Tensor:
        """``[R]`` bool: the optimisation of that PBRF became non-finite (its row of ``theta``, its loss changes and
        gradient norms are NaN)."""
        return ~torch.isfinite(self.theta).all(1)

    @property
    def relative_grad_norm(self) -> Tensor:
        """``grad_norm / grad_norm_start`` ``[R]`` (0 where the start gradient is 0)."""
        start = self.grad_norm_start
        return torch.where(start > 0, self.grad_norm / start.clamp_min(1e-300), torch.zeros_like(start))


def pbrf_response(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    remove: Sequence[int] | Tensor,
    *,
    weight_decay: float = 0.0,
    damping: float = 0.0,
    epsilon: float | None = None,
    optimizer: str = "adam",
    lr: float | str = 1e-3,
    steps: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
    momentum: float = 0.0,
    params: Sequence[str] | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    tol: float | None = None,
    max_iter: int = 100,
) -> PBRFResult:
    """Optimise the PBRF of every point of ``remove``, starting at the model's parameters ``theta_s``.

    The objective and its meaning are in the module docstring. ``epsilon`` is the weight given to the point's loss
    (default ``-1/n``: its removal); ``weight_decay`` is that of the training objective and ``damping`` the
    proximity strength (the ``damping`` of the influence function the PBRF is compared with).

    Optimiser: ``optimizer="newton"``: damped Newton (:mod:`influence_lib.newton`) from ``theta_s`` to the relative
    gradient-norm tolerance ``tol`` in at most ``max_iter`` iterations (a PBRF that misses it is reported in
    ``diverged``, its row NaN; ``lr``, ``steps`` unused). Otherwise
    ``optimizer`` in ``("sgd", "adam")`` with ``lr``, ``momentum`` and ``steps`` steps from ``theta_s``,
    full batch unless ``batch_size`` is given (mini-batches in an order seeded by ``seed``). ``lr="auto"`` (sgd only):
    ``1 / lambda_max`` of the objective's Hessian at ``theta_s``, ``G + (wd + damping) I`` (60 Lanczos steps): the
    largest step at which gradient descent with momentum ``beta`` contracts every direction of the quadratic model
    is ``2 (1 + beta) / lambda_max``, so this leaves room for the curvature to grow away from ``theta_s``. The number
    of steps needed grows with ``(lambda_max / (wd + damping))``: ``grad_norm`` shows whether the minimiser was
    reached. All models of a chunk of ``chunk_size`` removals (default: all) are optimised at once; results do not
    depend on ``chunk_size``.
    ``params`` restricts ``theta`` to the named parameters (default all; the others stay fixed).

    Returns a :class:`PBRFResult`: ``loss_change`` ``[len(remove), n_test]`` is
    ``L(z_t, theta_m) - L(z_t, theta_s)``; ``grad_norm`` / ``grad_norm_start`` show how well each PBRF was solved.
    A positive ``damping`` makes the objective strongly convex near ``theta_s``, but not everywhere: when the outputs
    grow faster than quadratically in ``theta`` (a ReLU net with two or more hidden layers) and the loss grows
    linearly in the outputs (cross-entropy), ``-(1/n) L_m`` can fall faster than the proximity term rises, so the
    objective can be unbounded below far from ``theta_s``; only the minimiser near ``theta_s`` is meant. A PBRF
    whose iterate escapes to non-finite values is stopped and reported in ``diverged`` (its rows are NaN) while the
    others continue. With ``damping = 0`` and no weight decay only the Bregman terms bound the objective.
    """
    if lr == "auto" and optimizer != "sgd":
        raise ValueError(f"lr='auto' (1 / the largest curvature) is meant for optimizer='sgd', got {optimizer!r}")
    cfg = TrainConfig(optimizer=optimizer, lr=1.0 if lr == "auto" else lr, steps=steps, batch_size=batch_size,
                      seed=seed, momentum=momentum, normalization="full", tol=tol, max_iter=max_iter)
    check_nonneg("damping", damping)
    obj = Objective(model, loss_fn, *train, weight_decay=weight_decay, params=params)
    n = obj.n
    eps = -1.0 / n if epsilon is None else epsilon
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"epsilon must be a finite number (default -1/n = removal), got {epsilon!r}")
    if batch_size is not None and batch_size > n:
        raise ValueError(f"batch_size must be <= the number of training rows ({n}), got {batch_size}")
    Xt, yt = obj.check_points("test", test)
    idx = check_indices("remove", remove, n)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    theta_s = obj.theta()
    if not bool(torch.isfinite(obj.loss(theta_s).detach())):
        raise NonFiniteError("the training loss at the model's current parameters (theta_s) is not finite")
    pbrf = PBRF(obj, theta_s, damping)
    if lr == "auto":
        top = extreme_eigenvalues(GaussNewtonOperator(obj, theta_s), iters=min(60, obj.p))[1] + damping
        cfg = replace(cfg, lr=1.0 / top)
    R = idx.numel()
    chunk = R if chunk_size is None else chunk_size
    n_chunks = len(range(0, R, chunk))
    bar = tqdm(total=n_chunks * cfg.steps, desc=f"PBRF ({R} models)", disable=not progress, leave=False)
    thetas, gnorms, gstart = [], [], []
    for s in range(0, R, chunk):
        part = idx[s:s + chunk]
        W = pbrf.removal_weights(part, eps)
        theta0 = theta_s.unsqueeze(0).expand(part.numel(), -1)
        if optimizer == "newton":  # a PBRF that misses the tolerance is reported in `diverged` (NaN row)
            res = newton_minimize(lambda th, which, W=W: pbrf.data_terms(th, W[which]), theta0, l2=pbrf.strength,
                                  center=theta_s, tol=tol, max_iter=max_iter, on_failure="flag")
            Theta = torch.where(res.converged.unsqueeze(1), res.theta, torch.full_like(res.theta, float("nan")))
            thetas.append(Theta)
            gnorms.append(res.grad_norm)
            gstart.append(res.grad_norm_start)
            bar.update(cfg.steps)
            continue
        Theta = minimize_stacked(lambda th, rows, W=W: pbrf.data_terms(th, W, rows), theta0, n, cfg,
                                 l2=pbrf.strength, center=theta_s, on_nonfinite="stop", progress=bar)
        thetas.append(Theta)
        gnorms.append(pbrf.gradient_norms(Theta, W))
        gstart.append(pbrf.gradient_norms(theta0, W))
    bar.close()
    Theta = torch.cat(thetas)
    if not bool(torch.isfinite(Theta).any(1).any()):
        raise NonFiniteError(f"every PBRF diverged (non-finite iterates): lower lr (now {cfg.lr:g}) or raise damping")
    test_losses = test_losses_of(obj, Theta, Xt, yt)
    ref_losses = test_losses_of(obj, theta_s.unsqueeze(0), Xt, yt)[0]
    config: dict[str, Any] = {**cfg.to_dict(), "weight_decay": weight_decay, "damping": damping, "epsilon": eps}
    return PBRFResult(idx, Theta, theta_s, test_losses, ref_losses, config, grad_norm=torch.cat(gnorms),
                      grad_norm_start=torch.cat(gstart))


def pbrf_retrain(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    remove: Sequence[int] | Tensor,
    *,
    weight_decay: float = 0.0,
    damping: float = 0.0,
    optimizer: str = "adam",
    lr: float | str = 1e-3,
    steps: int = 1000,
    seed: int = 0,
    **options: Any,
) -> Tensor:
    """Change of each test loss under the PBRF parameters of each removed point: ``[len(remove), n_test]``.

    ``L(z_t, theta_m) - L(z_t, theta_s)`` with ``theta_m`` the (optimised) minimiser of the proximal Bregman
    response objective for removing point ``m`` (module docstring), ``theta_s`` the model's current parameters.
    The counterpart of :func:`influence_lib.retrain.loo_retrain` with the same sign convention (positive: removing
    the point raises the test loss); to first order it equals the influence score with the Gauss-Newton matrix and
    the same ``damping``. The row of a PBRF whose optimisation diverged is NaN. ``options``: ``epsilon``,
    ``batch_size``, ``momentum``, ``params``, ``chunk_size``, ``progress`` (see :func:`pbrf_response`).
    """
    return pbrf_response(model, loss_fn, train, test, remove, weight_decay=weight_decay, damping=damping,
                         optimizer=optimizer, lr=lr, steps=steps, seed=seed, **options).loss_change
