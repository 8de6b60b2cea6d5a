"""A fused forward pass for a stack of plain feed-forward networks (the fast path of stacked training).

Stacked training (:func:`influence_lib.retrain.fit_stacked`) evaluates ``B`` copies of one network with different
parameters at every step. For a general model this is ``torch.func.vmap`` over ``functional_call``, whose
per-step overhead dominates on small models (Iris, small MNIST). For an ``nn.Sequential`` of ``nn.Linear`` layers,
element-wise activations and ``nn.Flatten`` — the MLPs and linear models of the experiments — the stack is
evaluated directly with batched matrix products: with ``Theta`` ``[B, p]`` split into ``W_l`` ``[B, out, in]`` and
``b_l`` ``[B, out]`` (views, in ``model.parameters()`` order),

    h_0 = X  [n, d]  (shared by all models),    h_l = act(h_{l-1} W_l^T + b_l)  [B, n, out_l],

and the per-point cross-entropy ``-log softmax(h_L)[y]`` ``[B, n]``. The data term of model ``b`` is
``sum_i w_bi loss_bi / denominator`` exactly as in the vmap path (the same objective; the floating-point
reductions differ only in their order). One autograd pass over these few batched operations replaces ``B``
vmapped ``functional_call``\\ s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.Softplus, nn.Identity)


def sequential_plan(model: nn.Module, names: Sequence[str]) -> list[tuple] | None:
    """The layer plan of ``model`` if the fused path applies, else None.

    Applies when ``model`` is an ``nn.Linear`` (with bias) or an ``nn.Sequential`` of such layers, element-wise
    activations and ``nn.Flatten``, without buffers, and ``names`` (the differentiated parameters) are all of its
    parameters in ``model.parameters()`` order. The plan lists ``("linear", offset, out, in)``, ``("act", module)`` and
    ``("flatten", start_dim)``, offsets into the flat parameter vector.
    """
    if not isinstance(model, (nn.Sequential, nn.Linear)) or list(model.buffers()):
        return None
    if list(names) != [n for n, _ in model.named_parameters()]:
        return None
    plan: list[tuple] = []
    offset = 0
    for m in (model if isinstance(model, nn.Sequential) else [model]):
        if isinstance(m, nn.Linear):
            if m.bias is None:
                return None
            plan.append(("linear", offset, m.out_features, m.in_features))
            offset += m.weight.numel() + m.bias.numel()
        elif isinstance(m, _ELEMENTWISE):
            plan.append(("act", m))
        elif isinstance(m, nn.Flatten):
            if m.end_dim != -1:
                return None
            plan.append(("flatten", m.start_dim))
        else:
            return None
    if not plan or plan[-1][0] != "linear":
        return None
    return plan


def stacked_forward(plan: list[tuple], Theta: Tensor, X: Tensor) -> Tensor:
    """Outputs ``[B, n, k]`` of the ``B`` networks with flat parameters ``Theta`` ``[B, p]`` on inputs ``X``."""
    B = Theta.shape[0]
    h: Tensor = X
    shared = True  # h is [n, d] (the inputs, the same for every model) until the first linear layer
    for step in plan:
        if step[0] == "flatten":
            h = h.flatten(start_dim=step[1] + (0 if shared else 1))
        elif step[0] == "act":
            h = step[1](h)
        else:
            _, off, out, inp = step
            W = Theta[:, off:off + out * inp].reshape(B, out, inp)
            b = Theta[:, off + out * inp:off + out * inp + out]
            if shared:
                h = torch.matmul(h, W.transpose(1, 2)) + b.unsqueeze(1)
                shared = False
            else:
                h = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2))
    return h


def fused_data_terms(model: nn.Module, names: Sequence[str], loss_fn,
                     normalization: str) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None:
    """``batched(Theta [B, p], w [B, b], xb [b, ...], yb [b]) -> [B]`` data terms with the fused forward pass, or None
    where it does not apply (another architecture, another loss than ``F.cross_entropy``)."""
    if loss_fn is not F.cross_entropy:
        return None
    plan = sequential_plan(model, names)
    if plan is None:
        return None

    def batched(Theta: Tensor, w: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        out = stacked_forward(plan, Theta, xb)  # [B, b, k]
        logp = torch.log_softmax(out, dim=-1)
        losses = -logp.gather(-1, yb.view(1, -1, 1).expand(out.shape[0], -1, 1)).squeeze(-1)  # [B, b]
        denom = w.sum(1) if normalization == "remaining" else w.new_full((w.shape[0],), float(w.shape[1]))
        return (w * losses).sum(1) / denom

    return batched
