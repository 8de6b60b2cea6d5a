"""Input checks that fail early with a message naming the parameter and what is accepted."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor


class NonFiniteError(FloatingPointError):
    """A loss, gradient or result that should be finite is NaN or infinite."""


def check_choice(name: str, value: Any, accepted: Iterable[Any]) -> None:
    accepted = list(accepted)
    if value not in accepted:
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_nonneg(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_finite(name: str, t: Tensor) -> Tensor:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"{name}: {bad} of {t.numel()} values are NaN or infinite")
    return t


def check_data(
    name: str,
    data: Any,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_empty: bool = False,
) -> tuple[Tensor, Tensor]:
    """Validate an ``(X, y)`` pair of tensors with equal first dimension; cast X to ``dtype``."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(f"{name} must be an (X, y) pair of tensors, got {type(data).__name__}")
    X, y = data
    if not isinstance(X, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"{name} must be an (X, y) pair of tensors, got ({type(X).__name__}, {type(y).__name__})")
    if X.dim() == 0 or y.dim() == 0 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: X and y must have the same number of rows, got X {tuple(X.shape)} and y {tuple(y.shape)}"
        )
    if X.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name}: X and y must have at least one row")
    if X.is_floating_point():
        check_finite(f"{name} X", X)
    if y.is_floating_point():
        check_finite(f"{name} y", y)
    if dtype is not None and X.is_floating_point():
        X = X.to(dtype)
    if dtype is not None and y.is_floating_point():
        y = y.to(dtype)
    if device is not None:
        X, y = X.to(device), y.to(device)
    return X, y


def check_indices(name: str, idx: Any, n: int) -> Tensor:
    """Integer indices into ``range(n)`` as a 1-D int64 tensor."""
    t = torch.as_tensor(idx)
    if t.dim() == 0:
        t = t.unsqueeze(0)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D sequence of integer indices, got {t.dtype} with shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if int(t.min()) < 0 or int(t.max()) >= n:
        raise ValueError(f"{name}: indices must lie in [0, {n}), got min {int(t.min())} and max {int(t.max())}")
    return t.long()


def check_options(where: str, options: dict[str, Any], accepted: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"{where}: unknown option(s) {unknown}; accepted: {sorted(accepted)}")


def check_finite_params(name: str, theta: Tensor) -> Tensor:
    """Refuse non-finite parameters before differentiating at them (a Hessian at NaN is NaN everywhere)."""
    if not bool(torch.isfinite(theta).all()):
        bad = int((~torch.isfinite(theta)).sum())
        raise NonFiniteError(f"{name}: {bad} of {theta.numel()} parameter values are NaN or infinite; derivatives "
                             "at such parameters are meaningless (was the model trained with too large a step?)")
    return theta


def check_not_blown_up(name: str, t: Tensor) -> Tensor:
    """Refuse non-finite values and values beyond ``sqrt(finfo.max)`` (about 1e154 in float64, 2e19 in float32).

    A result that large is an overflowing computation (squaring it overflows), not a measurement.
    """
    check_finite(name, t)
    if t.numel() and t.is_floating_point():
        limit = math.sqrt(torch.finfo(t.dtype).max)
        big = float(t.detach().abs().max())
        if big > limit:
            raise NonFiniteError(f"{name}: values blew up (max |value| {big:.3g} > {limit:.3g}, the square root of "
                                 f"the largest {t.dtype}); lower the learning rate or check the data")
    return t


#: Modules whose training-mode behaviour makes one example's loss depend on the others (batch statistics),
#: mutates buffers (running statistics) or is random (dropout): influence_lib refuses them in training mode.
def _mode_dependent(m: torch.nn.Module) -> bool:
    nn = torch.nn
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return bool(m.track_running_stats)
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    return False


def check_model(model: torch.nn.Module, names: Sequence[str]) -> None:
    """What influence_lib supports of a model, refused up front with a message saying what to do.

    - Modules in training mode whose output depends on the batch or on chance (BatchNorm, Dropout, InstanceNorm
      with running statistics): influence_lib differentiates a fixed function of each example, so call
      ``model.eval()`` first (BatchNorm then applies its running statistics, a fixed affine map, and training and
      retraining keep them fixed).
    - Selected parameters with ``requires_grad=False``: influence_lib never differentiates a frozen parameter
      silently. Select the trainable ones with ``params=[names]`` where the function offers it (hessian, hvp,
      influence, pbrf_retrain) or set ``requires_grad=True``.
    """
    bad = [f"{name or '<model>'} ({type(m).__name__})" for name, m in model.named_modules()
           if m.training and _mode_dependent(m)]
    if bad:
        raise ValueError(
            f"model is in training mode and contains {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}, whose "
            "output depends on the rest of the batch or on chance; influence_lib needs each example's loss as a fixed "
            "function of the parameters: call model.eval() first (BatchNorm then uses its running statistics, "
            "kept fixed while training)"
        )
    named = dict(model.named_parameters())
    frozen = [n for n in names if not named[n].requires_grad]
    if frozen:
        trainable = [n for n in named if named[n].requires_grad]
        raise ValueError(
            f"params: {frozen[:5]}{' ...' if len(frozen) > 5 else ''} have requires_grad=False; influence_lib does "
            "not differentiate frozen parameters silently. Select the trainable ones with params="
            f"{trainable[:5]}{' ...' if len(trainable) > 5 else ''} (hessian, hvp, influence, pbrf_retrain) or set "
            "requires_grad=True on every parameter"
        )


def check_loss_fn(loss_fn: Any, model: torch.nn.Module, X: Tensor, y: Tensor) -> int | None:
    """Check the loss contract on the first two rows, before any long computation.

    ``loss_fn(model(X[:2]), y[:2])`` must be a 0-dim tensor equal to the mean of the losses of the two rows alone
    (a batch mean, like ``F.cross_entropy`` with ``reduction="mean"``; ``"sum"`` or ``"none"`` are refused).
    Also refuses, with a message naming ``X`` or ``y``: inputs the model cannot take (e.g. integer features for a
    ``Linear`` layer), labels the loss cannot take (e.g. float labels for cross-entropy) and, for a model with
    ``C >= 2`` outputs and integer labels ``y`` of shape ``[n]``, labels outside ``[0, C)``. Returns ``C`` in that
    case (the number of classes), else None. The model is only evaluated (no gradients, nothing mutated).
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be a function loss_fn(outputs, targets) -> mean loss, got {type(loss_fn)}")
    x2, y2 = X[:2], y[:2]
    with torch.no_grad():
        try:
            out = model(x2)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            hint = (f"X has dtype {X.dtype}; pass floating-point features (e.g. X.to(torch.float64))"
                    if not X.is_floating_point() else f"X has shape {tuple(X.shape)}")
            raise ValueError(f"X: the model cannot be applied to the inputs ({hint}): {e}") from e
        if not isinstance(out, Tensor):
            raise ValueError(f"model(X) must return a tensor of outputs, got {type(out).__name__}")
        classes = None
        if not y.is_floating_point() and y.dtype != torch.bool and y.dim() == 1 and out.dim() == 2 \
                and out.shape[1] >= 2:
            classes = int(out.shape[1])
            check_labels("y", y, classes)

        def loss_of(o: Tensor, t: Tensor) -> Tensor:
            try:
                return loss_fn(o, t)
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                if y.is_floating_point() and y.dim() == 1 and out.dim() == 2 and out.shape[1] >= 2:
                    hint = ("y holds floating-point values but the loss expects integer class indices in "
                            f"[0, {out.shape[1]}): pass y.long()")
                else:
                    hint = (f"outputs of shape {tuple(out.shape[1:])} ({out.dtype}) per row, targets of shape "
                            f"{tuple(y.shape[1:])} ({y.dtype}) per row")
                raise ValueError(f"y: loss_fn(model(X), y) failed ({hint}): {e}") from e

        both = loss_of(out, y2)
        if not isinstance(both, Tensor) or both.dim() != 0:
            shape = tuple(both.shape) if isinstance(both, Tensor) else type(both).__name__
            raise ValueError(
                f"loss_fn must return the MEAN loss of a batch as a 0-dim tensor (like F.cross_entropy with "
                f"reduction='mean'), got {shape} for a batch of {x2.shape[0]} rows (reduction='none'?)"
            )
        if x2.shape[0] == 2 and bool(torch.isfinite(both)):
            a, b = loss_of(model(X[:1]), y[:1]), loss_of(model(X[1:2]), y[1:2])
            mean, total = (a + b) / 2, a + b
            tol = 10 * math.sqrt(torch.finfo(both.dtype).eps) * (a.abs() + b.abs() + 1e-30)
            if bool(torch.isfinite(mean)) and float((both - mean).abs()) > float(tol):
                sumlike = float((both - total).abs()) <= float(tol)
                raise ValueError(
                    "loss_fn must return the MEAN of the per-example losses of a batch (like F.cross_entropy with "
                    f"reduction='mean'): on two rows it gave {float(both):.6g}, but the mean of the rows alone is "
                    f"{float(mean):.6g}" + (" (it looks like reduction='sum')" if sumlike else "")
                    + "; weights that do not cancel in the mean (e.g. class weights) are not supported"
                )
    return classes


def check_labels(name: str, y: Tensor, classes: int) -> None:
    """Integer class labels must lie in ``[0, classes)``."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"{name}: class labels must lie in [0, {classes}) for a model with {classes} outputs, got "
                         f"min {int(y.min())} and max {int(y.max())}")
