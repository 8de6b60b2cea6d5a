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
