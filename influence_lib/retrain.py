"""Training to ``theta*`` and leave-one-out (LOO) retraining, many models at once.

All training here minimises, for each model ``b`` of a stack, the weighted objective

    J_b(theta) = sum_i w_bi loss(z_i, theta) / sum_i w_bi + (weight_decay/2) ||theta||^2

with ``w_bi`` in {0, 1} (``w_bi = 0``: point ``i`` removed from model ``b``) and the denominator
``sum_i w_bi`` (``normalization="remaining"``: the mean over the remaining points, i.e. ordinary training
on the reduced data set). ``normalization="full"`` divides by ``n`` instead: the perturbation
``epsilon = -1/n`` of one point's weight that influence functions linearise. With weight decay the two
differ: the mean over ``n - 1`` points strengthens the data term relative to the penalty by ``n/(n-1)``,
which shifts every LOO result by about ``-(1/(n-1)) sum_{j != i} score_j`` (a first-order effect of the
same size as the scores themselves). The stack of ``B`` parameter
vectors ``[B, p]`` is trained together: one vectorised forward/backward per step (``torch.func.vmap`` over
the models) instead of ``B`` Python loops. The optimisers reproduce ``torch.optim.SGD`` (with momentum) and
``torch.optim.Adam`` step for step, with weight decay as part of the objective (coupled L2), so a stack
gives the same numbers as training each model alone.

Mini-batches (``batch_size``): each epoch is a seeded permutation of all ``n`` indices cut into batches; all
models of a stack see the same batches, and a removed point simply has weight zero in its batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap
from tqdm import tqdm

from .newton import NewtonConvergenceError, NewtonResult, newton_minimize, newton_polish, weighted_data_terms
from .objective import LossFn, Objective, flat_params, set_flat_params
from .stacked import fused_data_terms, fused_value_and_grad
from .validation import (
    NonFiniteError,
    check_choice,
    check_finite,
    check_indices,
    check_nonneg,
    check_not_blown_up,
    check_positive,
    check_positive_int,
)

OPTIMIZERS = ("sgd", "adam", "newton")  # "newton": influence_lib.newton, to a gradient-norm tolerance
REFERENCES = ("retrained", "original")
NORMALIZATIONS = ("remaining", "full")
#: learning-rate schedules of the first-order optimisers: ``"constant"``, or ``"cosine"``: step ``t`` of ``T`` uses
#: ``lr * (1 + cos(pi (t - 1) / T)) / 2`` (from ``lr`` down towards 0), which lets Adam settle at a point of small
#: gradient instead of hovering around it at the step size ``lr``
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimiser, learning rate, number of steps, mini-batch size (None = full batch).

    ``optimizer="newton"`` (:func:`influence_lib.newton.newton_minimize`, full batch only) ignores ``lr``, ``steps``,
    ``momentum``, ``betas`` and ``eps`` and stops at the relative gradient-norm tolerance ``tol`` (default
    :func:`influence_lib.newton.default_tol` of the dtype) or after ``max_iter`` iterations (then it raises).
    ``lr_schedule`` (:data:`LR_SCHEDULES`): ``"constant"`` or ``"cosine"`` decay of ``lr`` over the ``steps``.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    steps: int = 1000
    batch_size: int | None = None
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0
    normalization: str = "remaining"
    tol: float | None = None
    max_iter: int = 100
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.optimizer == "newton":
            if self.batch_size is not None:
                raise ValueError(f"batch_size must be None (full batch) for optimizer='newton', got {self.batch_size}")
            if self.tol is not None:
                check_positive("tol", self.tol)
            check_positive_int("max_iter", self.max_iter)
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_positive("lr", self.lr)
        check_positive_int("steps", self.steps)
        if self.batch_size is not None:
            check_positive_int("batch_size", self.batch_size)
        check_nonneg("momentum", self.momentum)
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        check_positive("eps", self.eps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.optimizer != "newton":  # the Newton options, absent from the configs of the other optimisers
            del d["tol"], d["max_iter"]
        if self.lr_schedule == "constant":  # listed only where it differs (configs recorded before it keep their form)
            del d["lr_schedule"]
        return d

    def lr_at(self, t: int) -> float:
        """The learning rate of step ``t`` (1-based) under ``lr_schedule``."""
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * (t - 1) / self.steps))
        return self.lr


def _batches(n: int, cfg: TrainConfig, device: torch.device):
    """Yield ``cfg.steps`` index tensors (None = full batch)."""
    if cfg.batch_size is None:
        for _ in range(cfg.steps):
            yield None
        return
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    step = 0
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            if step == cfg.steps:
                return
            yield perm[start:start + cfg.batch_size].to(device)
            step += 1


def fit_stacked(
    objective: Objective,
    theta0: Tensor,
    weights: Tensor,
    cfg: TrainConfig,
    *,
    progress: bool | tqdm = False,
) -> Tensor:
    """Train a stack of models from ``theta0`` ``[B, p]`` with data weights ``weights`` ``[B, n]``.

    Returns the final parameters ``[B, p]``. Raises :class:`NonFiniteError` if a loss becomes non-finite or the
    final parameters blow up (beyond ``sqrt(finfo.max)``, see :func:`~influence_lib.validation.check_not_blown_up`).
    ``progress`` is a bool or an existing tqdm bar to advance by one per step.
    """
    X, y, n = objective.X, objective.y, objective.n
    if theta0.dim() != 2 or theta0.shape[1] != objective.p:
        raise ValueError(f"theta0 must have shape [B, {objective.p}], got {tuple(theta0.shape)}")
    if weights.shape != (theta0.shape[0], n):
        raise ValueError(f"weights must have shape [{theta0.shape[0]}, {n}], got {tuple(weights.shape)}")
    if cfg.optimizer == "newton":  # raises NewtonConvergenceError if a model misses the tolerance
        return newton_minimize(weighted_data_terms(objective, weights, cfg.normalization), theta0,
                               l2=objective.weight_decay, tol=cfg.tol, max_iter=cfg.max_iter).theta
    loss_fn = objective.loss_fn

    # convolutional models: one model at a time, channels-last (oneDNN's channels-first backward pass is slow for
    # few-channel convolutions, and vmap over models turns each convolution into a grouped one, slower still:
    # benchmarks/cnn_layout.py); every other model: vmap over the stack
    conv = objective.is_convolutional

    def per_model(theta: Tensor, w: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        out = objective.forward(theta, xb, channels_last=conv)
        losses = vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, yb)
        denom = w.sum() if cfg.normalization == "remaining" else w.new_tensor(float(w.shape[0]))
        return (w * losses).sum() / denom

    if conv:
        def batched(th: Tensor, w: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
            return torch.stack([per_model(th[b], w[b], xb, yb) for b in range(th.shape[0])])
    else:
        batched = vmap(per_model, in_dims=(0, 0, None, None))
    fused = fused_data_terms(objective.model, objective.spec.names, loss_fn, cfg.normalization)
    if fused is not None:  # plain MLPs and linear models: batched matrix products instead of vmap (same objective)
        batched = fused
    if theta0.shape[0] == 1 and bool((weights == 1).all()) and cfg.normalization == "remaining":
        # a single model on all its data: the plain batch-mean objective, without vmap overhead
        def batched(th: Tensor, w: Tensor, xb: Tensor, yb: Tensor) -> Tensor:  # noqa: F811
            return loss_fn(objective.forward(th[0], xb, channels_last=conv), yb).unsqueeze(0)
    W = weights.to(dtype=theta0.dtype, device=theta0.device)

    def data_terms(th: Tensor, rows: Tensor | None) -> Tensor:
        xb, yb, wb = (X, y, W) if rows is None else (X[rows], y[rows], W[:, rows])
        return _batch_objective(batched, th, wb, xb, yb)

    value_and_grad = None
    manual = fused_value_and_grad(objective.model, objective.spec.names, loss_fn, cfg.normalization)
    if manual is not None:
        # plain MLPs and linear models: the hand-derived backward pass (influence_lib.stacked), same objective
        full, c_full = manual.prepare(X, y), manual.coefficients(W)

        def value_and_grad(th: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
            if rows is None:
                return manual(th, c_full, full)
            return manual(th, manual.coefficients(W[:, rows]), manual.prepare(X[rows], y[rows]))

    Theta = minimize_stacked(data_terms, theta0, n, cfg, l2=objective.weight_decay, progress=progress,
                             value_and_grad=value_and_grad)
    return check_not_blown_up("training: the trained parameters", Theta)  # finite but absurd: an overflow


def minimize_stacked(
    data_terms: Callable[[Tensor, Tensor | None], Tensor],
    theta0: Tensor,
    n: int,
    cfg: TrainConfig,
    *,
    l2: float = 0.0,
    center: Tensor | None = None,
    on_nonfinite: str = "raise",
    progress: bool | tqdm = False,
    value_and_grad: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """The optimiser loop shared by every stacked training: minimise, for each model ``b`` of the stack,

        data_terms(Theta, rows)[b] + (l2 / 2) ||theta_b - center||^2        (center = 0 when None)

    from ``theta0`` ``[B, p]`` with ``cfg`` (SGD with momentum or Adam, step for step like ``torch.optim``; the
    quadratic term's gradient is added analytically, as coupled L2). ``data_terms(Theta, rows)`` returns the
    ``[B]`` data terms of the stacked parameters ``Theta`` on the training rows ``rows`` (``None``: all ``n`` rows;
    otherwise the index tensor of the current mini-batch, see ``cfg.batch_size``); the models must not interact.
    A model whose data term or parameters become non-finite: ``on_nonfinite="raise"`` (default) raises
    :class:`NonFiniteError`; ``"stop"`` stops that model alone, returns its row as NaN (no answer) and continues
    with the others. ``value_and_grad(Theta, rows)``, where given, returns the data terms ``[B]`` and their gradient
    ``[B, p]`` in one call (a hand-derived backward pass) and replaces autograd through ``data_terms``.
    """
    check_choice("on_nonfinite", on_nonfinite, ("raise", "stop"))
    theta = theta0.detach().clone()
    dead = torch.zeros(theta.shape[0], dtype=torch.bool, device=theta.device)
    anchor = None if center is None else center.detach().to(dtype=theta.dtype, device=theta.device)
    buf = torch.zeros_like(theta)  # SGD momentum buffer / Adam first moment
    sq = torch.zeros_like(theta)  # Adam second moment
    b1, b2 = cfg.betas
    own_bar = progress is True
    bar = tqdm(total=cfg.steps, desc="training", leave=False) if own_bar else progress
    any_dead = False
    for t, rows in enumerate(_batches(n, cfg, theta.device), start=1):
        if value_and_grad is not None:
            data_losses, g = value_and_grad(theta, rows)
        else:
            with torch.enable_grad():
                th = theta.requires_grad_(True)
                data_losses = data_terms(th, rows)
                (g,) = torch.autograd.grad(data_losses.sum(), th)
            theta = th.detach()
        # one scalar test while every model is alive (a non-finite entry makes the sum non-finite); the per-model test
        # where it fails or once a model has stopped
        if any_dead or not math.isfinite(float(data_losses.detach().sum() + theta.sum())):
            bad = ~torch.isfinite(data_losses) | ~torch.isfinite(theta).all(1)
            dead, theta, any_dead = _handle_nonfinite(bad, dead, theta, on_nonfinite, any_dead,
                                                      f"training loss became non-finite at step {t}: lower lr "
                                                      f"(now {cfg.lr:g})")
        g = g + l2 * (theta if anchor is None else theta - anchor)
        if cfg.optimizer == "sgd":
            if cfg.momentum > 0:
                buf = g.clone() if t == 1 else cfg.momentum * buf + g
                g = buf
            theta = theta - cfg.lr_at(t) * g
        else:
            buf.mul_(b1).add_(g, alpha=1 - b1)
            sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (sq.sqrt() / ((1 - b2 ** t) ** 0.5)).add_(cfg.eps)
            theta = theta - (cfg.lr_at(t) / (1 - b1 ** t)) * buf / denom
        if any_dead or not math.isfinite(float(theta.sum())):
            dead, theta, any_dead = _handle_nonfinite(~torch.isfinite(theta).all(1), dead, theta, on_nonfinite,
                                                      any_dead, f"parameters became non-finite at step {t}: lower "
                                                      f"lr (now {cfg.lr:g})")
        if bar:
            bar.update(1)
    if own_bar:
        bar.close()
    return theta


def _handle_nonfinite(bad: Tensor, dead: Tensor, theta: Tensor, on_nonfinite: str, any_dead: bool,
                      message: str) -> tuple[Tensor, Tensor, bool]:
    """Models ``bad`` ``[B]`` that were alive: raise :class:`NonFiniteError` with ``message``
    (``on_nonfinite="raise"``) or stop them (``"stop"``). Returns ``(dead, theta, any_dead)``."""
    if not bool((bad & ~dead).any()):
        return dead, theta, any_dead
    if on_nonfinite == "raise":
        raise NonFiniteError(message)
    dead, theta = _stop(dead | bad, theta)
    return dead, theta, True


def _stop(dead: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Mark the models ``dead`` as stopped: their parameter rows become NaN (rows never mix, so the rest go on)."""
    return dead, torch.where(dead.unsqueeze(1), torch.full_like(theta, float("nan")), theta)


def _batch_objective(batched, th: Tensor, wb: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
    """Data term of every model; a model whose mini-batch holds only removed points contributes zero."""
    empty = wb.sum(1) == 0
    if not bool(empty.any()):
        return batched(th, wb, xb, yb)
    w_safe = torch.where(empty.unsqueeze(1), torch.ones_like(wb), wb)
    return batched(th, w_safe, xb, yb) * (~empty).to(th.dtype)


def initial_params(model: nn.Module, seed: int, params: Sequence[str] | None = None) -> Tensor:
    """Fresh initial parameters (flat) of ``model``'s architecture, seeded; the global RNG is untouched."""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return flat_params(fresh, params)


def train_model(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    *,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    lr: float = 1e-3,
    steps: int = 1000,
    batch_size: int | None = None,
    seed: int = 0,
    momentum: float = 0.0,
    progress: bool = False,
    chunk_size: int | None = None,
    tol: float | None = None,
    max_iter: int = 100,
    lr_schedule: str = "constant",
) -> dict[str, Any]:
    """Train ``model`` in place (from its current parameters) on the objective above with all weights 1.

    Returns ``{"loss": J(theta), "grad_norm": ||grad J(theta)||}`` at the end: a small gradient norm is
    the sign of a stationary point, which the influence approximation assumes. ``optimizer="newton"`` is
    :func:`influence_lib.newton.newton_polish` (to the stationary point nearest the current parameters, e.g. after
    Adam; ``tol``, ``max_iter``; raises :class:`~influence_lib.newton.NewtonConvergenceError` if it is not reached)
    and adds ``"grad_norm_start"``, ``"iterations"`` and ``"converged"``. ``lr_schedule``: see :class:`TrainConfig`.
    """
    cfg = TrainConfig(optimizer=optimizer, lr=lr, steps=steps, batch_size=batch_size, seed=seed, momentum=momentum,
                      tol=tol, max_iter=max_iter, lr_schedule=lr_schedule)
    if optimizer == "newton":
        return newton_polish(model, loss_fn, train, weight_decay=weight_decay, tol=tol, max_iter=max_iter)
    obj = Objective(model, loss_fn, *train, weight_decay=weight_decay, chunk_size=chunk_size)
    if batch_size is not None and batch_size > obj.n:
        raise ValueError(f"batch_size must be <= the number of training rows ({obj.n}), got {batch_size}")
    theta = fit_stacked(obj, obj.theta().unsqueeze(0), torch.ones(1, obj.n), cfg, progress=progress)[0]
    set_flat_params(model, theta)
    return {"loss": float(obj.loss(theta)), "grad_norm": float(obj.gradient(theta).norm())}


def train_stack(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    theta0: Tensor,
    *,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    lr: float = 1e-3,
    steps: int = 1000,
    momentum: float = 0.0,
    lr_schedule: str = "constant",
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Train ``B`` models of ``model``'s architecture at once, from the initial parameters ``theta0`` ``[B, p]``
    (for example :func:`initial_params` of ``B`` seeds), each on the whole objective of :func:`train_model`
    (full batch, all weights 1): ``J(theta_b) = mean_i loss(f(x_i; theta_b), y_i) + (weight_decay / 2)
    ||theta_b||^2``.

    Returns ``(Theta [B, p], loss [B], grad_norm [B])``: the trained parameters and, for each model, ``J`` and
    ``||grad J||`` there. ``model`` is left unchanged. Every model follows the same optimiser trajectory as
    :func:`train_model` from its row of ``theta0`` (the models never interact); one stacked step costs much less
    than ``B`` separate ones on small models, and only the floating-point rounding differs from training them one
    by one. Full batch only: models trained with mini-batches would share one batch order.
    """
    if theta0.dim() != 2:
        raise ValueError(f"theta0 must have shape [B, p], got {tuple(theta0.shape)}")
    cfg = TrainConfig(optimizer=optimizer, lr=lr, steps=steps, momentum=momentum, lr_schedule=lr_schedule)
    obj = Objective(copy.deepcopy(model), loss_fn, *train, weight_decay=weight_decay)
    check_finite("theta0", theta0)
    weights = torch.ones(theta0.shape[0], obj.n)
    Theta = fit_stacked(obj, theta0.to(dtype=obj.theta().dtype), weights, cfg, progress=progress)
    loss = torch.stack([obj.loss(th) for th in Theta]).detach()
    grad_norm = torch.stack([obj.gradient(th).norm() for th in Theta]).detach()
    return Theta, loss, grad_norm


@dataclass
class LOOResult:
    """Outcome of leave-one-out retraining.

    ``theta``: ``[R, p]`` parameters without each removed point; ``theta_ref``: ``[p]`` the reference
    (see ``reference`` in :func:`retrain_without`); ``test_losses`` ``[R, m]`` and ``ref_losses`` ``[m]``.
    Stationarity of the retrained models: ``grad_norm`` ``[R]`` the norm of the gradient of each one's training
    objective at ``theta`` and ``ref_grad_norm`` that of the reference at ``theta_ref``; with ``optimizer="newton"``
    also ``iterations`` ``[R]`` and ``converged`` ``[R]`` (``ref_iterations``, ``ref_converged`` for the reference).
    """

    remove: Tensor
    theta: Tensor
    theta_ref: Tensor
    test_losses: Tensor
    ref_losses: Tensor
    config: dict[str, Any]
    grad_norm: Tensor | None = None
    ref_grad_norm: float | None = None
    iterations: Tensor | None = None
    converged: Tensor | None = None
    ref_iterations: int | None = None
    ref_converged: bool | None = None

    @property
    def loss_change(self) -> Tensor:
        """Actual change of each test loss: ``[R, m]``."""
        return self.test_losses - self.ref_losses.unsqueeze(0)

    @property
    def param_change(self) -> Tensor:
        """``theta_{-i} - theta_ref``: ``[R, p]``."""
        return self.theta - self.theta_ref.unsqueeze(0)


def retrain_without(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    remove: Sequence[int] | Tensor,
    *,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    lr: float = 1e-3,
    steps: int = 1000,
    warm_start: bool = True,
    seed: int = 0,
    batch_size: int | None = None,
    momentum: float = 0.0,
    normalization: str = "remaining",
    reference: str = "retrained",
    chunk_size: int | None = None,
    progress: bool = True,
    tol: float | None = None,
    max_iter: int = 100,
    on_failure: str = "raise",
    lr_schedule: str = "constant",
) -> LOOResult:
    """Retrain once per removed training point; all models of a chunk are trained together.

    ``warm_start=True``: every model starts from the model's current parameters ``theta*`` (Koh & Liang's
    protocol). ``warm_start=False``: every model starts from the same fresh initialisation drawn with
    ``seed``. ``reference="retrained"`` (default): the baseline is the full-data model trained with exactly
    the same start, optimiser, steps and batches, so that optimiser drift cancels in the difference;
    ``"original"``: the baseline is the model as given (requires ``warm_start=True``).
    ``normalization``: ``"remaining"`` (mean over the remaining points) or ``"full"`` (sum / n), see above.
    ``chunk_size``: models trained at once (default: all); results do not depend on it.
    ``optimizer="newton"``: damped Newton (:mod:`influence_lib.newton`) from the start to the relative
    gradient-norm tolerance ``tol``, at most ``max_iter`` iterations (``lr`` and ``steps`` are not used). A model that
    misses it: ``on_failure="raise"`` (default) raises :class:`~influence_lib.newton.NewtonConvergenceError`;
    ``"flag"`` returns its row of ``theta`` and ``test_losses`` as NaN with ``converged`` False (a reference that
    misses it makes every loss change NaN). ``lr_schedule``: see :class:`TrainConfig` (the reference is trained
    under the same schedule).
    """
    check_choice("reference", reference, REFERENCES)
    check_choice("on_failure", on_failure, ("raise", "flag"))
    if reference == "original" and not warm_start:
        raise ValueError("reference='original' requires warm_start=True (a from-scratch model has no original)")
    cfg = TrainConfig(optimizer=optimizer, lr=lr, steps=steps, batch_size=batch_size, seed=seed, momentum=momentum,
                      normalization=normalization, tol=tol, max_iter=max_iter, lr_schedule=lr_schedule)
    obj = Objective(model, loss_fn, *train, weight_decay=weight_decay)
    if batch_size is not None and batch_size > obj.n:
        raise ValueError(f"batch_size must be <= the number of training rows ({obj.n}), got {batch_size}")
    Xt, yt = obj.check_points("test", test)
    idx = check_indices("remove", remove, obj.n)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    start = obj.theta() if warm_start else initial_params(model, seed).to(obj.X.device, obj.theta().dtype)
    R = idx.numel()
    chunk = R + 1 if chunk_size is None else chunk_size
    # the row for the reference model (no point removed) goes first, in the first chunk
    rows_removed = torch.cat([torch.tensor([-1]), idx])
    newton = cfg.optimizer == "newton"
    total = len(range(0, R + (reference == "retrained"), chunk)) * (1 if newton else cfg.steps)
    bar = tqdm(total=total, desc=f"LOO retraining ({R} models)", disable=not progress, leave=False)
    thetas, gnorms, runs = [], [], []
    todo = rows_removed if reference == "retrained" else idx
    for s in range(0, todo.numel(), chunk):
        part = todo[s:s + chunk]
        W = torch.ones(part.numel(), obj.n, dtype=obj.X.dtype, device=obj.X.device)
        keep = part >= 0
        W[torch.arange(part.numel())[keep], part[keep].to(W.device)] = 0
        theta0 = start.unsqueeze(0).expand(part.numel(), -1)
        fun = weighted_data_terms(obj, W, normalization)
        if newton:
            runs.append(newton_minimize(fun, theta0, l2=weight_decay, tol=tol, max_iter=max_iter, on_failure="flag"))
            thetas.append(runs[-1].theta)
            bar.update(1)
        else:
            thetas.append(fit_stacked(obj, theta0, W, cfg, progress=bar))
        gnorms.append(_grad_norms(fun, thetas[-1], weight_decay))
    bar.close()
    Theta, gnorm = torch.cat(thetas), torch.cat(gnorms)
    ok = torch.cat([r.converged for r in runs]) if newton else None
    its = torch.cat([r.iterations for r in runs]) if newton else None
    if newton and on_failure == "raise" and not bool(ok.all()):
        res = NewtonResult(*(torch.cat([getattr(r, f) for r in runs]) for f in NewtonResult.__dataclass_fields__))
        raise NewtonConvergenceError("LOO retraining: " + res.failure_message())
    if newton and not bool(ok.all()):  # flagged: no answer for the models that missed the tolerance
        Theta = torch.where(ok.unsqueeze(1), Theta, torch.full_like(Theta, float("nan")))
    ref: dict[str, Any] = {}
    if reference == "retrained":
        theta_ref, Theta = Theta[0], Theta[1:]
        ref["ref_grad_norm"], gnorm = float(gnorm[0]), gnorm[1:]
        if newton:
            ref.update(ref_iterations=int(its[0]), ref_converged=bool(ok[0]))
            its, ok = its[1:], ok[1:]
    else:
        theta_ref = obj.theta()
        ref["ref_grad_norm"] = float(obj.gradient(theta_ref).norm())
    test_losses = test_losses_of(obj, Theta, Xt, yt)
    ref_losses = test_losses_of(obj, theta_ref.unsqueeze(0), Xt, yt)[0]
    answered = ok if newton else torch.ones(Theta.shape[0], dtype=torch.bool, device=Theta.device)  # NaN = flagged
    check_not_blown_up("LOO retraining: the retrained parameters", Theta[answered])
    check_not_blown_up("LOO retraining: the test losses", test_losses[answered])
    if not newton or bool(torch.isfinite(theta_ref).all()):
        check_not_blown_up("LOO retraining: the reference model's test losses", ref_losses)
    config = {**cfg.to_dict(), "warm_start": warm_start, "reference": reference, "weight_decay": weight_decay}
    return LOOResult(idx, Theta, theta_ref, test_losses, ref_losses, config, grad_norm=gnorm, iterations=its,
                     converged=ok, **ref)


def _grad_norms(fun: Callable[[Tensor, Tensor], Tensor], Theta: Tensor, l2: float) -> Tensor:
    """``||grad (fun + (l2/2)||theta||^2)||`` of every model of a stack ``[B, p]`` (full batch): ``[B]``."""
    with torch.enable_grad():
        th = Theta.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fun(th, torch.arange(th.shape[0], device=th.device)).sum(), th)
    return (g + l2 * Theta).norm(dim=1)


def test_losses_of(obj: Objective, Theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """Per-example losses ``[B, m]`` of the stacked models ``Theta`` ``[B, p]`` on ``(X, y)``."""
    with torch.no_grad():
        f = vmap(lambda th: obj.per_sample_losses(th, X, y))
        return f(Theta)


def loo_retrain(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    remove: Sequence[int] | Tensor,
    *,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    lr: float = 1e-3,
    steps: int = 1000,
    warm_start: bool = True,
    seed: int = 0,
    **options: Any,
) -> Tensor:
    """Actual change of each test loss after retraining without each removed point: ``[len(remove), n_test]``.

    ``L(z_t, theta_{-i}) - L(z_t, theta_ref)``; see :func:`retrain_without` for ``warm_start``,
    ``reference``, ``normalization``, ``batch_size``, ``momentum``, ``chunk_size`` and ``progress``.
    """
    return retrain_without(model, loss_fn, train, test, remove, weight_decay=weight_decay, optimizer=optimizer,
                           lr=lr, steps=steps, warm_start=warm_start, seed=seed, **options).loss_change
