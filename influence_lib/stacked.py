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


def cross_entropy_plan(model: nn.Module, names: Sequence[str], loss_fn) -> tuple[list[tuple], int] | None:
    """:func:`sequential_plan` and the position of its first linear layer where ``loss_fn`` is ``F.cross_entropy``
    (the loss the hand-derived passes know), else None."""
    if loss_fn is not F.cross_entropy:
        return None
    plan = sequential_plan(model, names)
    if plan is None:
        return None
    return plan, next(i for i, step in enumerate(plan) if step[0] == "linear")


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


# ------------------------------------------------------------------------------------------------------------------
# Hand-derived backward pass (the fast path of stacked *training*)
#
# Training needs the data terms and their gradient with respect to Theta at every step. Autograd through
# stacked_forward costs, for the small networks of the experiments, several times the arithmetic: log_softmax over
# a class dimension of size 3 to 10 is slow in the [B, n, k] layout, batched products of [n, in] by [in, out] are
# slower than [out, in] by [in, n], and the graph adds slicing, copies and accumulations. The functions below compute
# the same quantities with the activations kept as [B, features, n] (the examples in the contiguous dimension):
#
#   Z_1 = W_1 X^T + b_1,   H_l = act(Z_l),   Z_l = W_l H_{l-1} + b_l,
#   loss_bi = logsumexp_c Z_L[b, c, i] - Z_L[b, y_i, i]
#   data_b = sum_i c_bi loss_bi,  c_bi = w_bi / denom_b  (denom_b = sum_i w_bi for "remaining", n for "full";
#                                                        a model with denom_b = 0 has c_b = 0: no data, no gradient)
#
# and backwards dZ_L = c * (softmax(Z_L) - onehot(y)), dW_l = dZ_l H_{l-1}^T, db_l = sum_i dZ_l, dH_{l-1} = W_l^T dZ_l,
# dZ_{l-1} = act'(.) dH_{l-1} (the derivative of each activation as autograd computes it: aten's *_backward ops).
# The result equals autograd's to rounding (tests/test_stacked.py); the floating-point reductions differ in order.
# ------------------------------------------------------------------------------------------------------------------

def _act_backward(module: nn.Module, dH: Tensor, Z: Tensor, H: Tensor) -> Tensor:
    """``dZ`` from ``dH`` for ``H = module(Z)``, with the derivative autograd uses for that module."""
    aten = torch.ops.aten
    if isinstance(module, nn.ReLU):
        return aten.threshold_backward(dH, H, 0)
    if isinstance(module, nn.Tanh):
        return aten.tanh_backward(dH, H)
    if isinstance(module, nn.Sigmoid):
        return aten.sigmoid_backward(dH, H)
    if isinstance(module, nn.GELU):
        return aten.gelu_backward(dH, Z, approximate=module.approximate)
    if isinstance(module, nn.Softplus):
        return aten.softplus_backward(dH, Z, module.beta, module.threshold)
    return dH  # nn.Identity


class StackedMLPGrad:
    """Data terms ``[B]`` and their gradient ``[B, p]`` for a stack of plain MLPs under cross-entropy, by the
    hand-derived backward pass above. Build with :func:`fused_value_and_grad`; call :meth:`prepare` once per set of
    training rows and :meth:`__call__` at every step."""

    def __init__(self, plan: list[tuple], normalization: str):
        self.plan = plan
        self.normalization = normalization
        self.k = next(step[2] for step in reversed(plan) if step[0] == "linear")

    def prepare(self, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(X2 [n, d], XT [d, n], y index [1, 1, n], onehot [1, k, n])`` of the rows ``X``, ``y``."""
        h = X
        for step in self.plan:
            if step[0] == "flatten":
                h = h.flatten(start_dim=step[1])
            elif step[0] == "linear":
                break
        X2 = h.reshape(h.shape[0], -1)
        n = X2.shape[0]
        onehot = torch.zeros(1, self.k, n, dtype=X2.dtype, device=X2.device)
        onehot[0, y, torch.arange(n, device=y.device)] = 1
        return X2, X2.t().contiguous(), y.view(1, 1, n), onehot

    def coefficients(self, w: Tensor) -> Tensor:
        """``c = w / denom`` ``[B, n]`` of the data weights ``w`` ``[B, n]`` (0 for a model without data)."""
        denom = w.sum(1) if self.normalization == "remaining" else w.new_full((w.shape[0],), float(w.shape[1]))
        return w / torch.where(denom == 0, torch.ones_like(denom), denom).unsqueeze(1)

    def __call__(self, Theta: Tensor, c: Tensor,
                 prepared: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``(data terms [B], gradient [B, p])`` at ``Theta`` ``[B, p]`` with the coefficients ``c`` ``[B, n]``
        (:meth:`coefficients`) on the rows ``prepared`` (:meth:`prepare`)."""
        X2, XT, yidx, onehot = prepared
        B = Theta.shape[0]
        layers, acts = [], []  # per linear layer: (W [B, o, i], input H [B, i, n] or None for X); per act: (Z, H)
        H: Tensor | None = None
        Z: Tensor
        for step in self.plan:
            if step[0] == "linear":
                _, off, out, inp = step
                W = Theta[:, off:off + out * inp].reshape(B, out, inp)
                b = Theta[:, off + out * inp:off + out * inp + out]
                if H is None:  # first layer: one product for the whole stack, X shared
                    Z = torch.addmm(b.reshape(B * out, 1), W.reshape(B * out, inp), XT).view(B, out, -1)
                else:
                    Z = torch.baddbmm(b.unsqueeze(2), W, H)
                layers.append((W, H))
                H = Z
            elif step[0] == "act":
                Hn = step[1](H)
                acts.append((len(layers), step[1], H, Hn))
                H = Hn
        Z = H  # logits [B, k, n]
        Zs = Z - Z.amax(1, keepdim=True)
        E = Zs.exp()
        S = E.sum(1, keepdim=True)  # [B, 1, n]
        losses = S.log().squeeze(1) - Zs.gather(1, yidx.expand(B, 1, -1)).squeeze(1)  # [B, n]
        data = (c * losses).sum(1)
        c3 = c.unsqueeze(1)
        dZ = (E / S).mul_(c3).addcmul_(onehot, c3, value=-1)
        grads: list[Tensor] = []
        act_i = len(acts) - 1
        for li in range(len(layers) - 1, -1, -1):
            W, Hin = layers[li]
            grads.append(dZ.sum(2))
            if Hin is None:
                grads.append(torch.mm(dZ.reshape(-1, dZ.shape[2]), X2).view(B, -1))
                break
            grads.append(torch.bmm(dZ, Hin.transpose(1, 2)).view(B, -1))
            dH = torch.bmm(W.transpose(1, 2), dZ)
            while act_i >= 0 and acts[act_i][0] == li:  # activations between layer li - 1 and li
                _, module, Zpre, Hpost = acts[act_i]
                dH = _act_backward(module, dH, Zpre, Hpost)
                act_i -= 1
            dZ = dH
        return data, torch.cat(grads[::-1], dim=1)


def fused_value_and_grad(model: nn.Module, names: Sequence[str], loss_fn, normalization: str) -> StackedMLPGrad | None:
    """The hand-derived data terms and gradient of a stack of ``model`` (see :class:`StackedMLPGrad`), or None where
    it does not apply: another architecture or loss than ``F.cross_entropy`` (as :func:`fused_data_terms`), or a
    ``nn.Flatten`` after the first linear layer."""
    found = cross_entropy_plan(model, names, loss_fn)
    if found is None:
        return None
    plan, first = found
    if any(step[0] == "flatten" for step in plan[first:]):
        return None
    if any(step[0] == "act" for step in plan[:first]):
        return None
    return StackedMLPGrad(plan, normalization)
