"""The exact Hessian of a plain MLP's mean cross-entropy by a hand-derived forward-over-reverse pass.

For the models of :func:`influence_lib.stacked.sequential_plan` (an ``nn.Sequential`` of ``nn.Linear`` layers with
bias and element-wise activations, every parameter differentiated) under ``F.cross_entropy``, the dense Hessian of
the data term is the directional derivative of the hand-derived gradient along every parameter direction at once,
with no autograd graph. Activations are kept as ``[features, n]`` (the examples in the contiguous dimension) and
the ``T`` directions of a block in front, ``[T, features, n]``; ``c = 1 / n``, ``a`` the activation:

    forward      Z_1 = W_1 X^T + b_1,   H_l = a(Z_l),   Z_l = W_l H_{l-1} + b_l,   logits Z_L, S = softmax(Z_L)
    gradient     D_L = c (S - Y),   gW_l = D_l H_{l-1}^T,   gb_l = D_l 1,   G_{l-1} = W_l^T D_l,
                 D_{l-1} = a'(Z_{l-1}) * G_{l-1}
    along t      RZ_l = RW_l H_{l-1} + W_l RH_{l-1} + Rb_l,   RH_l = a'(Z_l) * RZ_l,
                 RD_L = c (S * RZ_L - S * (1^T (S * RZ_L)))      (the softmax Jacobian diag(S) - S S^T),
                 RgW_l = RD_l H_{l-1}^T + D_l RH_{l-1}^T,   Rgb_l = RD_l 1,
                 RG_{l-1} = RW_l^T D_l + W_l^T RD_l,
                 RD_{l-1} = a'(Z_{l-1}) * RG_{l-1} + a''(Z_{l-1}) * RZ_{l-1} * G_{l-1}

where ``R(.)`` is the derivative along the direction ``t`` (a column of the identity: ``RW``, ``Rb`` are one
parameter's unit entry), so ``H[:, t] = (RgW_1, Rgb_1, ..., RgW_L, Rgb_L)`` in the flat parameter order. The
derivatives ``a'``, ``a''`` are those autograd differentiates (ReLU: ``1[z > 0]`` and 0). On the Iris MLP of
``benchmarks/compare.py`` (43 parameters, 120 rows) this takes a fraction of the batched double backward pass, in
which ``torch.func.vmap`` has no batching rule for ``tanh_backward`` and the log-softmax backward and loops over the
columns. The result equals the autograd Hessian to rounding (``tests/test_mlp_hessian.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .stacked import cross_entropy_plan

#: at most this many elements in one block's ``[T, features, n]`` tangents (the directions are taken in blocks)
BLOCK_ELEMENTS = 1 << 22


def _derivatives(module: nn.Module) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """``(Z, H) -> (a'(Z), a''(Z))`` for ``H = module(Z)``, or None for an activation without a closed form here."""
    if isinstance(module, nn.Tanh):
        def tanh(Z: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
            d1 = 1 - H * H
            return d1, -2 * H * d1
        return tanh
    if isinstance(module, nn.Sigmoid):
        def sigmoid(Z: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
            d1 = H * (1 - H)
            return d1, d1 * (1 - 2 * H)
        return sigmoid
    if isinstance(module, nn.ReLU):
        return lambda Z, H: ((H > 0).to(H.dtype), torch.zeros_like(H))
    if isinstance(module, nn.Identity):
        return lambda Z, H: (torch.ones_like(H), torch.zeros_like(H))
    if isinstance(module, nn.Softplus):
        beta, threshold = module.beta, module.threshold

        def softplus(Z: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
            linear = Z * beta > threshold  # autograd: the function is taken as linear there
            s = torch.sigmoid(Z * beta)
            return torch.where(linear, 1.0, s), torch.where(linear, 0.0, beta * s * (1 - s))
        return softplus
    if isinstance(module, nn.GELU) and module.approximate == "none":
        def gelu(Z: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
            pdf = torch.exp(-0.5 * Z * Z) / math.sqrt(2 * math.pi)
            cdf = 0.5 * (1 + torch.erf(Z / math.sqrt(2)))
            return cdf + Z * pdf, pdf * (2 - Z * Z)
        return gelu
    return None


def mlp_plan(model: nn.Module, names, loss_fn) -> list[tuple] | None:
    """The layer plan for :func:`mlp_data_hessian` (linear layers ``("linear", offset, out, in)`` and activations
    ``("act", module, derivatives)``), or None where it does not apply: another loss than ``F.cross_entropy``,
    another architecture (:func:`~influence_lib.stacked.sequential_plan`), a ``nn.Flatten`` after the first linear
    layer or from another dimension than 1, an activation before the first layer or right after another one, or an
    activation without closed-form derivatives here. The inputs must be ``[n, d]`` or flattened to it."""
    found = cross_entropy_plan(model, names, loss_fn)
    if found is None:
        return None
    plan, first = found
    out: list[tuple] = []
    for i, step in enumerate(plan):
        if step[0] == "flatten":
            if i > first or step[1] != 1:
                return None
            out.append(step)  # of the inputs to [n, d]: mlp_data_hessian reshapes them so
        elif step[0] == "act":
            deriv = _derivatives(step[1])
            if i < first or deriv is None or plan[i - 1][0] != "linear":  # one activation after each layer at most
                return None
            out.append(("act", step[1], deriv))
        else:
            out.append(step)
    return out


def mlp_data_hessian(plan: list[tuple], theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """The Hessian ``[p, p]`` of the mean cross-entropy over the rows ``X``, ``y`` at the flat parameters ``theta``
    ``[p]`` (no weight decay), for a plan of :func:`mlp_plan` (module docstring)."""
    p = theta.numel()
    X2 = X.reshape(X.shape[0], -1)
    n = X2.shape[0]
    c = 1.0 / n
    # the forward pass, once: per linear layer its weights and input (None: the data), per activation a' and a''
    layers: list[tuple[int, int, int, Tensor, Tensor | None]] = []
    acts: dict[int, tuple[Tensor, Tensor]] = {}  # index of the linear layer an activation feeds -> (a', a'')
    H: Tensor | None = None
    Z = X2.T
    widths = [X2.shape[1]]
    for step in plan:
        if step[0] == "linear":
            _, off, o, i = step
            W = theta[off:off + o * i].view(o, i)
            b = theta[off + o * i:off + o * i + o]
            layers.append((off, o, i, W, H))
            Z = torch.addmm(b.unsqueeze(1), W, X2.T if H is None else H)
            H = Z
            widths.append(o)
        elif step[0] == "act":
            Hn = step[1](H)
            acts[len(layers)] = step[2](H, Hn)
            H = Hn
    logits = Z  # [k, n]
    S = torch.softmax(logits, dim=0)
    D = S.clone()
    D[y, torch.arange(n, device=y.device)] -= 1
    D *= c
    # the gradient's backward pass, once: D_l and G_l per linear layer
    Ds: list[Tensor] = [D]
    Gs: list[Tensor | None] = [None] * len(layers)
    for li in range(len(layers) - 1, 0, -1):
        W = layers[li][3]
        G = W.T @ Ds[0]
        Gs[li - 1] = G
        a1, _ = acts.get(li, (None, None))
        Ds.insert(0, G if a1 is None else a1 * G)
    out = theta.new_empty(p, p)
    block = max(1, BLOCK_ELEMENTS // (n * max(widths)))
    eye = torch.eye(p, dtype=theta.dtype, device=theta.device)
    for j0 in range(0, p, block):
        E = eye[j0:j0 + block]  # [T, p]: the directions of this block
        T = E.shape[0]
        RZs, RHs = [], []
        RH: Tensor | None = None  # tangent of the current layer's input ([T, i, n]; None: zero, the data)
        for li, (off, o, i, W, Hin) in enumerate(layers):
            RW = E[:, off:off + o * i].view(T, o, i)
            Rb = E[:, off + o * i:off + o * i + o]
            Xin = X2.T if Hin is None else Hin
            RZ = torch.matmul(RW, Xin) + Rb.unsqueeze(2)
            if RH is not None:
                RZ = RZ + torch.matmul(W, RH)
            RZs.append(RZ)
            RHs.append(RH)
            a = acts.get(li + 1)
            RH = RZ if a is None else a[0] * RZ
        SR = S * RZs[-1]
        RD = c * (SR - S * SR.sum(1, keepdim=True))
        blocks: list[Tensor] = []
        for li in range(len(layers) - 1, -1, -1):
            off, o, i, W, Hin = layers[li]
            Xin = X2.T if Hin is None else Hin
            RgW = torch.matmul(RD, Xin.T)
            if RHs[li] is not None:
                RgW = RgW + torch.matmul(Ds[li], RHs[li].transpose(1, 2))
            blocks.append(RD.sum(2))
            blocks.append(RgW.reshape(T, o * i))
            if li == 0:
                break
            RW = E[:, off:off + o * i].view(T, o, i)
            RG = torch.matmul(RW.transpose(1, 2), Ds[li]) + torch.matmul(W.T, RD)
            a = acts.get(li)
            RD = RG if a is None else a[0] * RG + a[1] * RZs[li - 1] * Gs[li - 1]
        out[:, j0:j0 + T] = torch.cat(blocks[::-1], dim=1).T
    return out
