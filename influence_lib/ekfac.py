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
and ``nn.Conv2d`` (``groups=1``, zero padding, each layer called once per forward pass); any other selected
parameter raises a ``ValueError`` naming it.

Cost and memory (what makes it usable at scale): fitting is two passes over the training data, scoring one more.
Every pass works on chunks of rows with batched per-layer tensor products: layer inputs from forward hooks,
backpropagated vectors from ``autograd.grad`` into the layer outputs (one backward per column of ``B``, batched
over the rows), corrected eigenvalues from the rotated rows (``(a Q_A)``, ``(g Q_S)``) without any per-example
Python loop. Scores are computed layer by layer: ``score_ti = sum_l <W_tl, G_il>`` with ``W_tl`` the
preconditioned test gradient of layer ``l`` and ``G_il`` the per-example gradient of that layer, formed for one
chunk of training rows at a time, so no ``[n, p]`` matrix of gradients exists. The chunk is the objective's
``chunk_size`` or what fits ``memory_budget`` bytes. ``samples=s`` replaces the ``K`` exact columns of ``B_i``
(``K = C - 1`` for cross-entropy, ``C`` otherwise) by ``s`` random-sign combinations ``B_i eps / sqrt(s)``
(Rademacher ``eps``; ``E[r r^T] = B_i B_i^T``), an unbiased estimate of the same factors and eigenvalues (like the
sampled-label Fisher of kronfluence) with ``s`` instead of ``K`` backward columns per pass; the default ``None`` is
exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import hessian, vmap

from .layer_grads import MEMORY_BUDGET, LayerGradients, example_groups, row_matrix, scratch
from .objective import Objective
from .validation import check_finite, check_nonneg, check_positive_int

#: Bytes of per-example ``[out, cols]`` gradients formed at a time in the eigenvalue pass: about what stays in a
#: core's cache while it is squared and summed (on the ResNet of ``benchmarks/scale.py``, 100 x 901 blocks: 6.5 ms
#: for 96 examples in pairs against 31 ms in one product, and no slower for the smaller blocks of its other layers).
LAM_GROUP_BYTES = 2**20


def _loss_hessian_sqrt(objective: Objective, f: Tensor, y: Tensor) -> Tensor:
    """``B`` ``[b, C, K]`` with ``B_i B_i^T`` the Hessian of example ``i``'s loss in output space (PSD part).

    For ``F.cross_entropy`` on ``[b, C]`` logits and class labels the Hessian is ``diag(p) - p p^T`` (``p`` the
    softmax), of rank ``C - 1``, and ``K = C - 1`` columns suffice (one backward pass fewer per chunk): ``B0 =
    diag(s) - p s^T`` with ``s = sqrt(p)`` is a square root in closed form (``B0 B0^T = diag(p) - 2 p p^T + p (sum
    p) p^T``) with ``B0 s = 0``; the Householder reflection ``R`` that swaps ``s`` and the last unit vector ``e_C``
    gives ``B0 R`` (also a square root, ``R`` being orthogonal), whose last column ``B0 s`` is 0 and is dropped.
    Any other loss: ``K = C`` columns from the symmetric eigendecomposition of its Hessian (``torch.func``), negative
    eigenvalues clamped to 0."""
    if objective.loss_fn is F.cross_entropy and f.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        p = f.softmax(dim=1)
        s = p.sqrt()
        B0 = torch.diag_embed(s) - p.unsqueeze(2) * s.unsqueeze(1)  # [b, C, C]
        u = s.clone()
        u[:, -1] -= 1  # u = s - e_C; R = I - 2 u u^T / (u^T u), and R = I where s = e_C already
        uu = (u * u).sum(1, keepdim=True)
        u = torch.where(uu > 0, u / uu.clamp_min(torch.finfo(u.dtype).tiny).sqrt(), torch.zeros_like(u))
        B = B0 - 2 * (B0 @ u.unsqueeze(2)) * u.unsqueeze(1)  # B0 R
        return B[:, :, :-1]
    H = vmap(hessian(lambda o, t: objective.loss_fn(o.unsqueeze(0), t.unsqueeze(0))))(f, y)
    evals, evecs = torch.linalg.eigh((H + H.transpose(1, 2)) / 2)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(1)




def _add_lower_gram(A: Tensor, M: Tensor, band: int = 128) -> None:
    """``A += M M^T`` on and below the diagonal only (``M`` ``[d, N]``), one row band of ``band`` rows at a time:
    about ``(d + band) / (2 d)`` of the full product's work for ``d`` well above ``band`` (65% for ``d = 401``).
    The upper triangle of ``A`` is left as it was; :func:`_mirror_lower` completes it."""
    d = M.shape[0]
    for i in range(0, d, band):
        j = min(i + band, d)
        A[i:j, :j] += M[i:j] @ M[:j].T


def _mirror_lower(A: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is that of ``A``."""
    return A.tril() + A.tril(-1).T


class EKFACSolver:
    """``(G_EKFAC + (wd + damping) I)^{-1} V`` for the selected Linear/Conv2d parameters (see the module docstring).

    Fitting is two passes over the training data (the K-FAC factors, then the corrected eigenvalues), each one
    forward and one batched backward pass per chunk with one column per output dimension (the exact Gauss-Newton
    matrix; ``samples=s``: ``s`` random-sign columns instead, see the module docstring); :meth:`scores` is a third
    pass with one backward column. All per-layer work is
    batched over the rows of a chunk (forward hooks for the inputs, ``autograd.grad`` into the layer outputs for
    the backpropagated vectors). Memory: ``chunk_size`` of the objective rows at a time, or, without it, as many
    rows as fit ``memory_budget`` bytes of intermediates; nothing of size ``[n, p]`` is ever formed. Results do
    not depend on the chunking (up to floating-point summation order).
    """

    def __init__(self, objective: Objective, theta: Tensor | None = None, damping: float = 0.0, *,
                 samples: int | None = None, seed: int = 0, memory_budget: int | None = None):
        check_nonneg("damping", damping)
        if memory_budget is not None:
            check_positive_int("memory_budget", memory_budget)
        if samples is not None:
            check_positive_int("samples", samples)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.objective, self.damping = objective, damping
        self.samples, self.seed = samples, seed
        self.memory_budget = MEMORY_BUDGET if memory_budget is None else memory_budget
        self.theta = (objective.theta() if theta is None else theta).detach()
        self.grads = LayerGradients(objective, self.theta, "method='ekfac'")
        self.layers = self.grads.layers
        self.QA: list[Tensor] = []
        self.QS: list[Tensor] = []
        self.Lam: list[Tensor] = []
        self.passes = 0  # passes over the training data so far (fit: 2; each call of scores: 1 more)
        # rows per chunk: the objective's chunk_size, else what fits the budget (LayerGradients.rows_per_chunk)
        self.rows = self.grads.rows_per_chunk(self.memory_budget)
        self._fit()

    def _columns(self, f: Tensor, sl: slice, signs: Tensor | None) -> Tensor:
        """Output-space columns ``[b, C, K]`` whose outer products sum to the loss Hessian of each row: the ``C``
        columns of its square root (exact), or ``samples`` random-sign combinations of them scaled by
        ``1/sqrt(samples)`` (unbiased: ``E[r r^T] = B B^T`` for Rademacher signs)."""
        B = _loss_hessian_sqrt(self.objective, f.detach(), self.objective.y[sl])
        if signs is None:
            return B
        return B @ signs[sl].to(B) / self.samples ** 0.5

    def _signs(self, K: int) -> Tensor | None:
        """Rademacher signs ``[n, K, samples]`` for one pass, drawn for all rows at once (chunking does not
        change them)."""
        if self.samples is None:
            return None
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 7919 * self.passes)
        signs = torch.randint(0, 2, (self.objective.n, K, self.samples), generator=gen, dtype=torch.int8)
        return (2 * signs - 1).to(self.theta.device)

    def _chunks(self, n: int):
        for start in range(0, n, self.rows):
            yield slice(start, min(start + self.rows, n))

    # --- fitting ------------------------------------------------------------------------------------------
    def _fit(self) -> None:
        obj = self.objective
        dt, dev = self.theta.dtype, self.theta.device
        A = [torch.zeros(L.cols, L.cols, dtype=dt, device=dev) for L in self.layers]
        S = [torch.zeros(L.out, L.out, dtype=dt, device=dev) for L in self.layers]
        # columns of the loss Hessian's square root, from the first training row
        C = self._columns(self.grads.forward(obj.X[:1])[0].detach(), slice(0, 1), None).shape[2]
        signs = self._signs(C)
        for sl in self._chunks(obj.n):
            f, a, outs = self.grads.forward(obj.X[sl])
            for i, ai in enumerate(a):
                _add_lower_gram(A[i], row_matrix(ai))  # rows as [cols, b*T] (a view); A is symmetric
            for g in self.grads.backprop_columns(f, outs, self._columns(f, sl, signs)):  # one column at a time
                for i, gk in enumerate(g):
                    g2 = gk.reshape(-1, gk.shape[-1])  # [b*T, out]
                    S[i] += g2.T @ g2
        self.passes += 1
        # the factors only fix the eigenbasis; their scale does not matter (the eigenvalues are refitted)
        self.QA = [torch.linalg.eigh(_mirror_lower(M))[1] for M in A]
        self.QS = [torch.linalg.eigh(M)[1] for M in S]
        Lam = [torch.zeros(L.out, L.cols, dtype=dt, device=dev) for L in self.layers]
        signs = self._signs(C)
        buffers: dict = {}  # reused from chunk to chunk (see layer_grads.scratch)
        for sl in self._chunks(obj.n):
            f, a, outs = self.grads.forward(obj.X[sl])
            cols = self._columns(f, sl, signs)
            K = cols.shape[2]
            rotated: list[Tensor | None] = [None] * len(self.layers)  # inputs in the eigenbasis, once per chunk
            for g in self.grads.backprop_columns(f, outs, cols):  # one column at a time
                for i, (L, ai, gk) in enumerate(zip(self.layers, a, g, strict=True)):
                    QA, QS = self.QA[i], self.QS[i]
                    b, T = ai.shape[:2]
                    if T == 1:  # one row per example: (g a^T)^2 = g^2 (a^2)^T, no [b, out, cols] needed
                        if rotated[i] is None:
                            rotated[i] = (ai[:, 0] @ QA).square()
                        Lam[i] += (gk[:, 0] @ QS).square().T @ rotated[i]
                        continue
                    rotate_inputs = T * L.cols <= K * L.out * (L.out + L.cols)
                    if rotate_inputs and rotated[i] is None:  # rotate the inputs once, then K products
                        # [b, T, cols] in ai's patch-major layout: one product on the [cols, b*T] view
                        R = scratch(buffers, ("rotated", i), (L.cols, b * T), ai)
                        torch.mm(QA.T, row_matrix(ai), out=R)
                        rotated[i] = R.view(L.cols, b, T).permute(1, 2, 0)
                    gq = (gk @ QS).transpose(1, 2) if rotate_inputs else gk.transpose(1, 2)  # [b, out, T]
                    # the [out, cols] gradients of a few examples at a time, squared in place in a cache-sized
                    # buffer (LAM_GROUP_BYTES): 4-5x faster than one [b, out, cols] product for 100 x 901 blocks
                    for ex in example_groups(b, L.out * L.cols, ai.element_size(), LAM_GROUP_BYTES):
                        G = scratch(buffers, "gradient", (ex.stop - ex.start, L.out, L.cols), ai)
                        if rotate_inputs:
                            torch.bmm(gq[ex], rotated[i][ex], out=G)
                        else:  # few columns, many positions: form each [out, cols] gradient, then rotate it
                            G = QS.T @ torch.bmm(gq[ex], ai[ex], out=G) @ QA
                        Lam[i] += G.square_().sum(0)
        self.passes += 1
        self.Lam = [L / obj.n for L in Lam]

    # --- scores, layer by layer ---------------------------------------------------------------------------
    def scores(self, X_test: Tensor, y_test: Tensor) -> Tensor:
        """``[m, n]``: ``g_t^T (G_EKFAC + (wd + damping) I)^{-1} g_i`` for every test row ``t`` and training point
        ``i`` (without the ``1/n``), as a sum over layers of per-layer inner products with the preconditioned
        test gradients. Memory: one chunk of ``[rows, out, cols]`` per-example gradients per layer."""
        self._check_nonsingular()
        shift = self.objective.weight_decay + self.damping
        W = [[] for _ in self.layers]
        for sl in self._chunks(X_test.shape[0]):
            for i, G in enumerate(self.grads.per_example(X_test[sl], y_test[sl])):
                W[i].append(G)
        W = [torch.cat(w) for w in W]
        check_finite("per-example test gradients", torch.cat([w.reshape(w.shape[0], -1) for w in W], 1))
        W = self.grads.score_blocks([QS @ ((QS.T @ w @ QA) / (Lam + shift)) @ QA.T
                                     for w, QA, QS, Lam in zip(W, self.QA, self.QS, self.Lam, strict=True)])
        obj = self.objective
        out = [self.grads.inner_products(W, obj.X[sl], obj.y[sl]) for sl in self._chunks(obj.n)]
        self.passes += 1
        return torch.cat(out, dim=1)

    # --- solving ------------------------------------------------------------------------------------------
    def _apply(self, V: Tensor, power: float) -> Tensor:
        single = V.dim() == 1
        Vm = V.unsqueeze(1) if single else V
        shift = self.objective.weight_decay + self.damping
        out = []
        for W, QA, QS, Lam in zip(self.grads.blocks(Vm), self.QA, self.QS, self.Lam, strict=True):
            R = QS.T @ W @ QA
            R = R * (Lam + shift) if power == 1 else R / (Lam + shift) if power == -1 else R * (Lam + shift) ** power
            out.append(QS @ R @ QA.T)
        X = self.grads.unblocks(out, Vm)
        return X.squeeze(1) if single else X

    def _check_nonsingular(self) -> None:
        shift = self.objective.weight_decay + self.damping
        top = max(float(L.max()) for L in self.Lam) + shift
        if min(float(L.min()) for L in self.Lam) + shift <= 1e-12 * top:
            raise ValueError("method='ekfac': the approximation is singular (an eigenvalue is 0 and weight_decay + "
                             "damping is 0); set damping > 0")

    def solve(self, V: Tensor) -> Tensor:
        """``(G_EKFAC + (wd + damping) I)^{-1} V`` for ``V`` ``[p]`` or ``[p, m]``."""
        self._check_nonsingular()
        return self._apply(V, -1)

    def inv_sqrt(self, V: Tensor) -> Tensor:
        """``(G_EKFAC + (wd + damping) I)^{-1/2} V`` (a symmetric split preconditioner for CG)."""
        self._check_nonsingular()
        return self._apply(V, -0.5)

    def matmat(self, V: Tensor) -> Tensor:
        """``(G_EKFAC + (wd + damping) I) V`` (for tests and diagnostics)."""
        return self._apply(V, 1)

    @property
    def info(self) -> dict[str, Any]:
        return {"layers": [L.weight.removesuffix(".weight") for L in self.layers],
                "eigenvalue_range": [min(float(L.min()) for L in self.Lam), max(float(L.max()) for L in self.Lam)]}
