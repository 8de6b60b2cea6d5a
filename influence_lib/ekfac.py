"""EK-FAC: an eigenvalue-corrected Kronecker-factored approximation of the Gauss-Newton matrix.

For every selected ``nn.Linear`` / ``nn.Conv2d`` layer ``l`` with inputs ``a`` (bias: a trailing 1; convolutions:
unfolded patches, one row per output position ``t``) and output-space backpropagated vectors ``g``, the layer's
block of the generalised Gauss-Newton matrix of the mean loss,

    G_l = (1/n) sum_i sum_k vec(G_ik) vec(G_ik)^T,      G_ik = sum_t g_itk a_it^T      ([out, in(+1)]),

where ``g_itk`` backpropagates the ``k``-th column of a square root ``B_i`` of the loss Hessian in output space
(``B_i B_i^T = d^2 loss_i / d f_i^2``), is approximated (George et al. 2018) by

    G_l ~ (Q_S kron Q_A) diag(Lambda_l) (Q_S kron Q_A)^T,

with ``Q_A``, ``Q_S`` the eigenvectors of the K-FAC factors ``A = sum a a^T`` and ``S = sum g g^T``, and the
*corrected* eigenvalues ``Lambda_l[o, d] = (1/n) sum_ik (Q_S^T G_ik Q_A)[o, d]^2`` — the exact diagonal of ``G_l``
in that eigenbasis. Blocks of different layers are treated as independent (block diagonal). The inverse-HVP is

    (G + (wd + damping) I)^{-1} v   =   per layer:  Q_S [ (Q_S^T V_l Q_A) / (Lambda_l + wd + damping) ] Q_A^T,

the same damping convention as every other solver (weight decay is part of the curvature). Supported: ``nn.Linear``
and ``nn.Conv2d`` (``groups=1``, zero padding); any other selected parameter raises a ``ValueError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian, vmap

from .objective import Objective
from .validation import check_nonneg


@dataclass
class _Layer:
    module: nn.Module
    weight: str  # parameter names
    bias: str | None
    w_slice: slice  # positions in the flat parameter vector
    b_slice: slice | None
    out: int
    d_in: int  # columns of the unfolded input, without the bias column

    @property
    def cols(self) -> int:
        return self.d_in + (self.bias is not None)


def _layers(objective: Objective) -> list[_Layer]:
    """The supported layers that own the selected parameters, in flat-vector order (errors name the rest)."""
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
                raise ValueError(f"method='ekfac': parameter {b!r} is selected without its layer's weight {w!r}")
            continue
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
            raise ValueError(f"method='ekfac': layer {mname!r} needs groups=1 and numeric zero padding, got {m}")
        bias = b if b in offsets else None
        d_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        layers.append(_Layer(m, w, bias, offsets[w], offsets[bias] if bias else None, out, d_in))
        covered.update({w, bias} - {None})
    rest = [n for n in objective.spec.names if n not in covered]
    if rest:
        raise ValueError(f"method='ekfac' supports parameters of nn.Linear and nn.Conv2d layers only; "
                         f"select other parameters with params=..., not supported: {rest}")
    return sorted(layers, key=lambda L: L.w_slice.start)


def _rows(layer: _Layer, inp: Tensor) -> Tensor:
    """Layer input as ``[b, T, d_in(+1)]``: one row per output position (unfolded patches for convolutions)."""
    m = layer.module
    if isinstance(m, nn.Conv2d):
        a = F.unfold(inp, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride).transpose(1, 2)
    else:
        a = inp.reshape(inp.shape[0], -1, inp.shape[-1])
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
    return a


def _grad_rows(layer: _Layer, g: Tensor) -> Tensor:
    """Gradient w.r.t. the layer output as ``[b, T, out]``."""
    if isinstance(layer.module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _loss_hessian_sqrt(objective: Objective, f: Tensor, y: Tensor) -> Tensor:
    """``B`` ``[b, C, C]`` with ``B_i B_i^T`` the Hessian of example ``i``'s loss in output space (PSD part)."""
    H = vmap(hessian(lambda o, t: objective.loss_fn(o.unsqueeze(0), t.unsqueeze(0))))(f, y)
    evals, evecs = torch.linalg.eigh((H + H.transpose(1, 2)) / 2)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(1)


class EKFACSolver:
    """``(G_EKFAC + (wd + damping) I)^{-1} V`` for the selected Linear/Conv2d parameters (see the module docstring).

    Fitting costs two passes over the training data, each with one backward pass per output dimension.
    ``chunk_size`` of the objective bounds the memory (rows per pass).
    """

    def __init__(self, objective: Objective, theta: Tensor | None = None, damping: float = 0.0):
        check_nonneg("damping", damping)
        self.objective, self.damping = objective, damping
        self.theta = (objective.theta() if theta is None else theta).detach()
        self.layers = _layers(objective)
        self.QA: list[Tensor] = []
        self.QS: list[Tensor] = []
        self.Lam: list[Tensor] = []
        self._fit()

    # --- fitting ------------------------------------------------------------------------------------------
    def _passes(self):
        """Yield ``[(a, [g_k ...]) per layer]`` for each data chunk: inputs and the backpropagated columns."""
        obj = self.objective
        for sl in obj.chunks():
            X, y = obj.X[sl], obj.y[sl]
            inputs: dict[int, Tensor] = {}
            outputs: dict[int, Tensor] = {}

            def hook(i, inputs=inputs, outputs=outputs):
                def fn(_m, inp, out):
                    inputs[i], outputs[i] = inp[0].detach(), out
                return fn

            handles = [L.module.register_forward_hook(hook(i)) for i, L in enumerate(self.layers)]
            try:
                with torch.enable_grad():
                    leaf = self.theta.clone().requires_grad_(True)
                    f = obj.forward(leaf, X)
            finally:
                for h in handles:
                    h.remove()
            B = _loss_hessian_sqrt(obj, f.detach(), y)  # [b, C, K]
            outs = [outputs[i] for i in range(len(self.layers))]
            grads = [[] for _ in self.layers]
            for k in range(B.shape[2]):
                gs = torch.autograd.grad(f, outs, grad_outputs=B[:, :, k], retain_graph=k < B.shape[2] - 1)
                for i, (L, g) in enumerate(zip(self.layers, gs, strict=True)):
                    grads[i].append(_grad_rows(L, g))
            yield [(_rows(L, inputs[i]), grads[i]) for i, L in enumerate(self.layers)]

    def _fit(self) -> None:
        dt, dev = self.theta.dtype, self.theta.device
        A = [torch.zeros(L.cols, L.cols, dtype=dt, device=dev) for L in self.layers]
        S = [torch.zeros(L.out, L.out, dtype=dt, device=dev) for L in self.layers]
        for chunk in self._passes():
            for i, (a, gk) in enumerate(chunk):
                a2 = a.reshape(-1, a.shape[-1])
                A[i] += a2.T @ a2
                for g in gk:
                    g2 = g.reshape(-1, g.shape[-1])
                    S[i] += g2.T @ g2
        # the factors only fix the eigenbasis; their scale does not matter (the eigenvalues are refitted)
        self.QA = [torch.linalg.eigh(M)[1] for M in A]
        self.QS = [torch.linalg.eigh(M)[1] for M in S]
        Lam = [torch.zeros(L.out, L.cols, dtype=dt, device=dev) for L in self.layers]
        for chunk in self._passes():
            for i, (a, gk) in enumerate(chunk):
                for g in gk:
                    G = torch.einsum("bto,btd->bod", g, a)  # per-example weight gradients [b, out, cols]
                    Lam[i] += (self.QS[i].T @ G @ self.QA[i]).square().sum(0)
        self.Lam = [L / self.objective.n for L in Lam]

    # --- solving ------------------------------------------------------------------------------------------
    def _blocks(self, V: Tensor) -> list[Tensor]:
        """Flat ``[p, m]`` -> per layer ``[m, out, cols]``."""
        out = []
        for L in self.layers:
            W = V[L.w_slice].T.reshape(V.shape[1], L.out, L.d_in)
            if L.b_slice is not None:
                W = torch.cat([W, V[L.b_slice].T.unsqueeze(2)], dim=2)
            out.append(W)
        return out

    def _unblocks(self, blocks: list[Tensor], like: Tensor) -> Tensor:
        X = torch.empty_like(like)
        for L, W in zip(self.layers, blocks, strict=True):
            X[L.w_slice] = W[:, :, :L.d_in].reshape(W.shape[0], -1).T
            if L.b_slice is not None:
                X[L.b_slice] = W[:, :, L.d_in].T
        return X

    def _apply(self, V: Tensor, power: int) -> Tensor:
        single = V.dim() == 1
        Vm = V.unsqueeze(1) if single else V
        shift = self.objective.weight_decay + self.damping
        out = []
        for W, QA, QS, Lam in zip(self._blocks(Vm), self.QA, self.QS, self.Lam, strict=True):
            R = QS.T @ W @ QA
            R = R * (Lam + shift) if power == 1 else R / (Lam + shift)
            out.append(QS @ R @ QA.T)
        X = self._unblocks(out, Vm)
        return X.squeeze(1) if single else X

    def solve(self, V: Tensor) -> Tensor:
        """``(G_EKFAC + (wd + damping) I)^{-1} V`` for ``V`` ``[p]`` or ``[p, m]``."""
        shift = self.objective.weight_decay + self.damping
        top = max(float(L.max()) for L in self.Lam) + shift
        if min(float(L.min()) for L in self.Lam) + shift <= 1e-12 * top:
            raise ValueError("method='ekfac': the approximation is singular (an eigenvalue is 0 and weight_decay + "
                             "damping is 0); set damping > 0")
        return self._apply(V, -1)

    def matmat(self, V: Tensor) -> Tensor:
        """``(G_EKFAC + (wd + damping) I) V`` (for tests and diagnostics)."""
        return self._apply(V, 1)

    @property
    def info(self) -> dict[str, Any]:
        return {"layers": [L.weight.removesuffix(".weight") for L in self.layers],
                "eigenvalue_range": [min(float(L.min()) for L in self.Lam), max(float(L.max()) for L in self.Lam)]}
