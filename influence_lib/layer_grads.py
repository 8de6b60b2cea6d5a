"""Per-example gradients of ``nn.Linear`` / ``nn.Conv2d`` layers from one batched forward and backward pass.

For a layer with input rows ``a_it`` (``[b, T, in(+1)]``: the unfolded patches of a convolution, one row per
output position ``t``, a trailing 1 for the bias) and the loss gradient ``g_it`` with respect to its outputs
(``[b, T, out]``), the gradient of example ``i``'s loss with respect to the layer's ``[out, in(+1)]`` weight (bias
as the last column) is

    G_i = sum_t g_it a_it^T = g_i^T a_i                                            ([out, in(+1)])

so every example's gradient of every layer comes from one forward pass (inputs captured by forward hooks) and one
backward pass into the layer outputs (``autograd.grad`` with the per-example output gradients of the loss), then one
batched matrix product per layer: no ``torch.func.vmap`` over examples. Under ``vmap`` a convolution's weight
gradient per example is a grouped convolution, the slowest path of oneDNN on CPU (a LeNet on 4,000 images: about 50
training epochs for the gradients of all examples, against 1-2 here; ``benchmarks/scale.py``).

Applies when every selected parameter is the weight or bias of an ``nn.Linear`` or ``nn.Conv2d`` (``groups=1``,
numeric zero padding) that the forward pass calls once; :meth:`LayerGradients.supports` says whether it does, and
the callers (:mod:`influence_lib.influence`, :mod:`influence_lib.ekfac`) fall back to ``vmap`` or raise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from .objective import Objective

#: Default bound, in bytes, on the intermediates of one chunk of rows (layer inputs and backpropagated columns of
#: every layer, per-example layer gradients) when the objective sets no ``chunk_size``.
MEMORY_BUDGET = 256 * 2**20


@dataclass
class Layer:
    """One layer that owns selected parameters: its module, parameter names and positions in the flat vector."""

    module: nn.Module
    weight: str
    bias: str | None
    w_slice: slice
    b_slice: slice | None
    out: int
    d_in: int  # columns of the unfolded input, without the bias column

    @property
    def cols(self) -> int:
        return self.d_in + (self.bias is not None)


def layers_of(objective: Objective, who: str) -> list[Layer]:
    """The ``nn.Linear`` / ``nn.Conv2d`` layers that own the selected parameters, in flat-vector order; a
    ``ValueError`` (its message starting with ``who``) names any selected parameter outside such a layer."""
    offsets, pos = {}, 0
    for name, numel in zip(objective.spec.names, objective.spec.numels, strict=True):
        offsets[name] = slice(pos, pos + numel)
        pos += numel
    covered, layers = set(), []
    for mname, m in objective.model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        w, b = f"{mname}.weight" if mname else "weight", f"{mname}.bias" if mname else "bias"
        if w not in offsets:
            if b in offsets:
                raise ValueError(f"{who}: parameter {b!r} is selected without its layer's weight {w!r}")
            continue
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
            raise ValueError(f"{who}: layer {mname!r} needs groups=1 and numeric zero padding, got {m}")
        bias = b if b in offsets else None
        d_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        layers.append(Layer(m, w, bias, offsets[w], offsets[bias] if bias else None, out, d_in))
        covered.update({w, bias} - {None})
    rest = [n for n in objective.spec.names if n not in covered]
    if rest:
        raise ValueError(f"{who} supports parameters of nn.Linear and nn.Conv2d layers only; "
                         f"select other parameters with params=..., not supported: {rest}")
    return sorted(layers, key=lambda L: L.w_slice.start)


def input_rows(layer: Layer, inp: Tensor) -> Tensor:
    """Layer input as ``[b, T, d_in(+1)]``: one row per output position (unfolded patches for convolutions)."""
    m = layer.module
    if isinstance(m, nn.Conv2d):
        a = F.unfold(inp, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride).transpose(1, 2)
    else:
        a = inp.reshape(inp.shape[0], -1, inp.shape[-1])
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
    return a


def output_rows(layer: Layer, g: Tensor) -> Tensor:
    """Gradient w.r.t. the layer output as ``[b, T, out]``."""
    if isinstance(layer.module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


class LayerGradients:
    """Batched per-layer pieces at fixed parameters ``theta`` of an objective (see the module docstring).

    ``who`` names the caller in error messages. Raises ``ValueError`` where the model is not supported (use
    :meth:`supports` to ask first).
    """

    def __init__(self, objective: Objective, theta: Tensor, who: str = "per-example layer gradients"):
        self.objective, self.theta, self.who = objective, theta.detach(), who
        self.layers = layers_of(objective, who)

    @classmethod
    def supports(cls, objective: Objective, theta: Tensor) -> LayerGradients | None:
        """A :class:`LayerGradients` of ``objective`` if every selected parameter sits in a supported layer that the
        forward pass calls exactly once (checked on one training row), else None."""
        try:
            lg = cls(objective, theta)
            lg.forward(objective.X[:1])
        except ValueError:
            return None
        return lg

    def forward(self, X: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Outputs ``f`` and, per layer, its input rows ``[b, T, cols]`` and its output (in the graph of ``f``)."""
        inputs: dict[int, Tensor] = {}
        outputs: dict[int, Tensor] = {}

        def hook(i):
            def fn(_m, inp, out):
                if i in outputs:
                    raise ValueError(f"{self.who}: layer {self.layers[i].weight.removesuffix('.weight')!r} is "
                                     "called more than once per forward pass (shared weights are not supported)")
                inputs[i], outputs[i] = inp[0].detach(), out
            return fn

        handles = [L.module.register_forward_hook(hook(i)) for i, L in enumerate(self.layers)]
        try:
            with torch.enable_grad():
                leaf = self.theta.clone().requires_grad_(True)
                f = self.objective.forward(leaf, X)
        finally:
            for h in handles:
                h.remove()
        missing = [L.weight for i, L in enumerate(self.layers) if i not in outputs]
        if missing:
            raise ValueError(f"{self.who}: the layers of {missing} are not called by the model's forward pass")
        return f, [input_rows(L, inputs[i]) for i, L in enumerate(self.layers)], [outputs[i] for i in
                                                                                 range(len(self.layers))]

    def backprop(self, f: Tensor, outs: list[Tensor], cols: Tensor) -> list[Tensor]:
        """Per layer ``[K, b, T, out]``: the output-space vectors ``cols`` ``[b, C, K]`` pulled back to the layer
        outputs (one backward pass per column on the kept graph; batched over the rows)."""
        K = cols.shape[2]
        per: list[list[Tensor]] = [[] for _ in self.layers]
        for k in range(K):
            gs = torch.autograd.grad(f, outs, grad_outputs=cols[:, :, k].reshape(f.shape), retain_graph=k < K - 1)
            for i, (L, g) in enumerate(zip(self.layers, gs, strict=True)):
                per[i].append(output_rows(L, g))
        return [torch.stack(p) for p in per]

    def per_example(self, X: Tensor, y: Tensor) -> list[Tensor]:
        """Per-example loss gradients of every layer, ``[b, out, cols]`` (bias last; no weight decay)."""
        f, a, outs = self.forward(X)
        loss_fn = self.objective.loss_fn
        dl = vmap(grad(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0))))(f.detach(), y)
        g = self.backprop(f, outs, dl.reshape(dl.shape[0], -1, 1))
        return [torch.bmm(gi[0].transpose(1, 2), ai) for gi, ai in zip(g, a, strict=True)]

    def rows_per_chunk(self, K: int, memory_budget: int) -> int:
        """Rows per chunk for ``K`` backpropagated columns: the objective's ``chunk_size``, else what fits
        ``memory_budget`` bytes of intermediates."""
        obj = self.objective
        if obj.chunk_size is not None:
            return obj.chunk_size
        f, a, outs = self.forward(obj.X[:1])
        per_row = 0
        for L, ai, o in zip(self.layers, a, outs, strict=True):
            T = ai.shape[1]
            # inputs and rotated inputs, K backpropagated columns and their rotations, one [out, cols] gradient
            per_row += 2 * T * L.cols + 2 * K * T * L.out + 2 * L.out * L.cols + 3 * o.numel()
        per_row *= self.theta.element_size()
        return max(1, min(obj.n, memory_budget // max(per_row, 1)))

    # --- between the flat parameter vector and per-layer blocks -------------------------------------------
    def blocks(self, V: Tensor) -> list[Tensor]:
        """Flat ``[p, m]`` -> per layer ``[m, out, cols]``."""
        out = []
        for L in self.layers:
            W = V[L.w_slice].T.reshape(V.shape[1], L.out, L.d_in)
            if L.b_slice is not None:
                W = torch.cat([W, V[L.b_slice].T.unsqueeze(2)], dim=2)
            out.append(W)
        return out

    def unblocks(self, blocks: list[Tensor], like: Tensor) -> Tensor:
        """Per layer ``[m, out, cols]`` -> flat ``[p, m]`` (dtype and device of ``like``)."""
        X = torch.empty_like(like)
        for L, W in zip(self.layers, blocks, strict=True):
            X[L.w_slice] = W[:, :, :L.d_in].reshape(W.shape[0], -1).T
            if L.b_slice is not None:
                X[L.b_slice] = W[:, :, L.d_in].T
        return X

    def flat_per_example(self, X: Tensor, y: Tensor) -> Tensor:
        """Per-example loss gradients as flat vectors ``[b, p]`` (no weight decay)."""
        like = self.theta.new_empty(self.objective.p, X.shape[0])
        return self.unblocks(self.per_example(X, y), like).T
