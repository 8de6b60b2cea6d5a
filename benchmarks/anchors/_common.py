"""Shared helpers for the anchor adapters (no third-party influence code here).

Everything in this module is plain PyTorch (torch.func). The adapters use it only
for the parts a library does not provide itself (e.g. curvlinops offers curvature
operators but no per-sample gradients / influence scores), and the self-check uses
it to build the dense reference.

Conventions shared by every adapter (see ``benchmarks/anchors/__init__.py``):

* ``loss_fn(outputs, targets)`` returns the batch MEAN loss.
* training objective  L(θ) = mean_i loss(z_i; θ) + (weight_decay / 2) ||θ||²
* H = ∇² L(θ)  (so H contains weight_decay * I)
* score[t, i] = (1/n) g_t^T (H + damping I)^{-1} g_i  — predicted change of the
  loss of test point t when training point i is REMOVED (positive = removing the
  point increases the test loss). g are per-sample loss gradients WITHOUT the
  weight-decay term.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, vmap

Pair = tuple[Tensor, Tensor]


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def named_params(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters in ``model.parameters()`` order (detached)."""
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.reshape(-1) for p in named_params(model).values()])


def unflatten(vec: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


def per_sample_grads(model: nn.Module, loss_fn: Callable, data: Pair) -> Tensor:
    """[n, p] matrix of per-sample loss gradients (no weight decay)."""
    params = named_params(model)
    x, y = data

    def one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(x.shape[0], -1) for k in params], dim=1)


def objective_flat(model: nn.Module, loss_fn: Callable, data: Pair,
                   weight_decay: float) -> Callable[[Tensor], Tensor]:
    """θ_flat -> mean loss + wd/2 ||θ||² (the training objective of our convention)."""
    like = named_params(model)
    x, y = data

    def f(theta: Tensor) -> Tensor:
        out = functional_call(model, unflatten(theta, like), (x,))
        return loss_fn(out, y) + 0.5 * weight_decay * (theta * theta).sum()

    return f


def dense_hessian(model: nn.Module, loss_fn: Callable, data: Pair,
                  weight_decay: float = 0.0) -> Tensor:
    f = objective_flat(model, loss_fn, data, weight_decay)
    return hessian(f)(flat_params(model)).detach()


def reference_scores(model: nn.Module, loss_fn: Callable, train: Pair, test: Pair, *,
                     damping: float, weight_decay: float = 0.0) -> Tensor:
    """Dense float64-capable reference: (1/n) G_test (H + λI)^{-1} G_train^T."""
    H = dense_hessian(model, loss_fn, train, weight_decay)
    p = H.shape[0]
    Gtr = per_sample_grads(model, loss_fn, train)
    Gte = per_sample_grads(model, loss_fn, test)
    S = torch.linalg.solve(H + damping * torch.eye(p, dtype=H.dtype), Gte.T)  # [p, m]
    return (S.T @ Gtr.T) / train[0].shape[0]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Some libraries allocate buffers with the global default dtype (float32);
    run them with the model's dtype as default so float64 stays float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def check_method(method: str, supported) -> None:
    if method not in supported:
        raise NotImplementedError(
            f"method {method!r} not offered by this library (supported: {list(supported)})")


def loss_kind(loss_fn: Callable) -> str:
    """Identify a standard loss so that libraries which need an nn.Module loss class
    (curvlinops' KFAC/EKFAC, kronfluence's true-Fisher sampling) can be given one."""
    import torch.nn.functional as F
    if loss_fn is F.cross_entropy or isinstance(loss_fn, nn.CrossEntropyLoss):
        return "ce"
    if loss_fn is F.mse_loss or isinstance(loss_fn, nn.MSELoss):
        return "mse"
    if loss_fn is F.binary_cross_entropy_with_logits or isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return "bce"
    return "other"
