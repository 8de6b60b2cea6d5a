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

Cost and memory (what makes it usable at scale): streamed, fitting is two passes over the training data (factors,
then eigenvalues) and scoring one more; where it fits ``memory_budget``, the first pass keeps what the others need
of its backpropagated columns (:meth:`EKFACSolver.plan`: every layer, or the first convolutions as per-example
gradients with the other layers recomputed by backward passes that stop at them), so that the exact columns are
backpropagated in full once instead of twice. Every pass works on chunks of rows with batched per-layer tensor
products: layer inputs from forward hooks, backpropagated vectors from ``autograd.grad`` into the layer outputs (one
backward per column of ``B``, batched over the rows), corrected eigenvalues from the rotated rows (``(a Q_A)``,
``(g Q_S)``) without any per-example Python loop. Scores are computed layer by layer: ``score_ti = sum_l <W_tl, G_il>``
with ``W_tl`` the preconditioned test gradient of layer ``l`` and ``G_il`` the per-example gradient of that layer,
formed for one chunk of training rows at a time, so no ``[n, p]`` matrix of gradients exists. The chunk is the
objective's ``chunk_size`` or what fits ``memory_budget`` bytes. ``samples=s`` replaces the ``K`` exact columns of
``B_i`` (``K = C - 1`` for cross-entropy, ``C`` otherwise) by ``s`` random-sign combinations ``B_i eps / sqrt(s)``
(Rademacher ``eps``; ``E[r r^T] = B_i B_i^T``), an unbiased estimate of the same factors and eigenvalues (like the
sampled-label Fisher of kronfluence) with ``s`` instead of ``K`` backward columns per pass; the default ``None`` is
exact. ``fisher="empirical"`` estimates the empirical Fisher instead, ``(1/n) sum_i vec(G_i) vec(G_i)^T`` of the
per-example loss gradients ``G_i`` (the loss gradient in output space as the one column; dattri's EK-FAC): one
backward column per pass, and a different matrix from the Gauss-Newton one (it is the Gauss-Newton matrix only in
expectation over labels drawn from the model, and is known to be a worse curvature estimate away from a perfect
fit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import hessian, vmap

from .layer_grads import MEMORY_BUDGET, LayerGradients, example_groups, row_matrix, scratch
from .objective import Objective
from .validation import check_choice, check_finite, check_nonneg, check_positive_int

#: Bytes of per-example ``[out, cols]`` gradients formed at a time in the eigenvalue pass: about what stays in a
#: core's cache while it is squared and summed (on the ResNet of ``benchmarks/scale.py``, 100 x 901 blocks: 6.5 ms
#: for 96 examples in pairs against 31 ms in one product, and no slower for the smaller blocks of its other layers).
LAM_GROUP_BYTES = 2**20
#: With ``samples``, the first pass keeps every layer only where that takes at most this fraction (1/KEEP_SMALL) of
#: ``memory_budget`` (see :meth:`EKFACSolver.plan`).
KEEP_SMALL = 16
#: The curvature the factors and eigenvalues estimate: "true", the Gauss-Newton matrix (exact columns of the loss
#: Hessian's square root, or ``samples`` random-sign combinations of them), or "empirical", the empirical Fisher
#: ``(1/n) sum_i g_i g_i^T`` of the per-example loss gradients (one column per row; dattri's EK-FAC).
FISHERS = ("true", "empirical")


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




@dataclass
class KeepPlan:
    """What EK-FAC's first pass keeps of every chunk for the eigenvalue correction and the scores (see
    :meth:`EKFACSolver.plan`): ``columns`` backpropagated columns per row (the eigenvalue pass's ``lam`` of them,
    then, at index ``score``, the loss gradient where it is kept for the scores, else ``score`` is None), per layer in
    the form ``forms[l]``: ``"rows"`` keeps the columns at the layer output (``[b, columns, T, out]``) and the
    layer's input rows, ``"gradient"`` the per-example layer gradients the columns make, transposed (``[b, columns,
    cols, out]``: far smaller for a convolution with many output positions and a small kernel), ``"recompute"``
    nothing: a later pass recomputes the layer's columns by a forward pass and a backward pass that stops at the
    earliest such layer (cheap where the kept layers are the early ones). ``bytes``: the estimate of all that is
    kept, over the whole training set."""

    forms: list[str]
    columns: int
    lam: int
    score: int | None
    bytes: int

    @property
    def recomputed(self) -> list[int]:
        """The indices of the ``"recompute"`` layers."""
        return [i for i, form in enumerate(self.forms) if form == "recompute"]


def _add_lower_gram(A: Tensor, M: Tensor, band: int = 64) -> None:
    """``A += M M^T`` on and below the diagonal only (``M`` ``[d, N]``), one row band of ``band`` rows at a time:
    about ``(d + band) / (2 d)`` of the full product's work for ``d`` well above ``band`` (58% for ``d = 401``; bands
    of 64 rows were 5-9% faster than of 128 and about as fast as of 32 for the layers of ``benchmarks/scale.py``,
    0.56-0.71 of the full product's time, one thread).
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
    matrix; ``samples=s``: ``s`` random-sign columns instead; ``fisher="empirical"``: the loss gradient as the one
    column, see the module docstring); :meth:`scores` is a third pass with one backward column. All per-layer work is
    batched over the rows of a chunk (forward hooks for the inputs, ``autograd.grad`` into the layer outputs for
    the backpropagated vectors). Memory: ``chunk_size`` of the objective rows at a time, or, without it, as many
    rows as fit ``memory_budget`` bytes of intermediates; nothing of size ``[n, p]`` is ever formed. Results do
    not depend on the chunking (up to floating-point summation order).

    Where what the later passes need of the backpropagated columns fits ``memory_budget`` (together with one
    chunk's intermediates), the first pass keeps it (:meth:`plan`): the eigenvalue correction is computed from the
    kept columns (those of its own random signs, with ``samples``, backpropagated on the same graph) and, with
    ``for_scores=True``, the training rows' loss gradients are pulled back on that graph too and kept for
    :meth:`scores`. Each layer keeps its columns at its outputs with its input rows or, where smaller, the
    per-example gradients they make; where not all of that fits, only the layers whose gradients are the smaller
    form (the first convolutions, typically) are kept, and the others are recomputed by passes whose backward stops
    at them. The same values either way (the same columns and signs as the streamed passes). ``passes`` counts the
    passes over the training data: 1 after a fit that kept every layer, 2 after a streamed one or one that
    recomputes layers; :meth:`scores` adds one where it needs its own. ``for_scores=False`` (a preconditioner,
    :meth:`solve` only) keeps nothing after fitting.
    """

    def __init__(self, objective: Objective, theta: Tensor | None = None, damping: float = 0.0, *,
                 samples: int | None = None, fisher: str = "true", seed: int = 0, memory_budget: int | None = None,
                 for_scores: bool = True, layer_gradients: LayerGradients | None = None):
        check_nonneg("damping", damping)
        check_choice("fisher", fisher, FISHERS)
        if memory_budget is not None:
            check_positive_int("memory_budget", memory_budget)
        if samples is not None:
            check_positive_int("samples", samples)
            if fisher == "empirical":
                raise ValueError("samples applies to fisher='true' (the empirical Fisher has one column per row: "
                                 "the loss gradient); leave samples unset")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.objective, self.damping = objective, damping
        self.samples, self.fisher, self.seed = samples, fisher, seed
        self.memory_budget = MEMORY_BUDGET if memory_budget is None else memory_budget
        self.theta = (objective.theta() if theta is None else theta).detach()
        # a LayerGradients of the same objective and theta may be handed in (it keeps its one-row probe)
        ok = layer_gradients is not None and layer_gradients.objective is objective and torch.equal(
            layer_gradients.theta, self.theta)
        self.grads = layer_gradients if ok else LayerGradients(objective, self.theta, "method='ekfac'")
        self.layers = self.grads.layers
        self.QA: list[Tensor] = []
        self.QS: list[Tensor] = []
        self.Lam: list[Tensor] = []
        self.passes = 0  # passes over the training data so far (see the class docstring)
        # rows per chunk: the objective's chunk_size, else what fits the budget (LayerGradients.rows_per_chunk)
        self.rows = self.grads.rows_per_chunk(self.memory_budget)
        self.keep_plan: KeepPlan | None = None  # what the first pass keeps (see plan)
        # per chunk of training rows: its rows and what the scores need of the first pass (see _score_factors)
        self._kept: list[tuple[slice, list[Tensor | None], list[Tensor | None]]] | None = None
        self._fit(for_scores)

    def _columns(self, f: Tensor, sl: slice, signs: Tensor | None) -> Tensor:
        """Output-space columns ``[b, C, K]`` whose outer products sum to the curvature of each row's loss: the
        ``K`` columns of the loss Hessian's square root (exact), ``samples`` random-sign combinations of them scaled
        by ``1/sqrt(samples)`` (unbiased: ``E[r r^T] = B B^T`` for Rademacher signs), or, for the empirical Fisher,
        the loss gradient itself (``K = 1``)."""
        if self.fisher == "empirical":
            return self.grads.loss_gradient_column(f, self.objective.y[sl])
        B = _loss_hessian_sqrt(self.objective, f.detach(), self.objective.y[sl])
        if signs is None:
            return B
        return B @ signs[sl].to(B) / self.samples ** 0.5

    def _column_count(self) -> int:
        """``K``: the output-space columns per row of one pass (see :meth:`_columns`), from one training row."""
        if self.fisher == "empirical":
            return 1
        if self.samples is not None:
            return self.samples
        obj = self.objective
        with torch.no_grad():
            f = obj.forward(self.theta, obj.X[:1])
        return _loss_hessian_sqrt(obj, f, obj.y[:1]).shape[2]

    def _signs(self, K: int, pass_index: int) -> Tensor | None:
        """Rademacher signs ``[n, K, samples]`` for the pass ``pass_index`` (0: factors, 1: eigenvalues), drawn for
        all rows at once (chunking does not change them)."""
        if self.samples is None or self.fisher == "empirical":
            return None
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 7919 * pass_index)
        signs = torch.randint(0, 2, (self.objective.n, K, self.samples), generator=gen, dtype=torch.int8)
        return (2 * signs - 1).to(self.theta.device)

    def _chunks(self, n: int):
        for start in range(0, n, self.rows):
            yield slice(start, min(start + self.rows, n))

    def plan(self, for_scores: bool = True) -> KeepPlan | None:
        """What the first pass keeps within ``memory_budget`` (with one chunk's own intermediates), or None where
        nothing fits and every pass streams. The first that fits of: (1) every layer, each in its smaller form, the
        eigenvalue pass's columns and (``for_scores``) the loss gradient: one pass over the data in all (with
        ``samples`` only where that is at most ``1 / KEEP_SMALL`` of the budget: it saves no backward work then);
        (2) the layers whose per-example gradients are smaller than their columns at the outputs (more output
        positions than kernel columns: typically the first convolutions, which the backward pass reaches last) as
        gradients, the others recomputed (a forward and a partial backward pass for the eigenvalues, one for the
        scores), where that backpropagates less than streaming (:meth:`_partial_passes_pay`). Per row
        and layer of ``T`` output positions, ``c`` columns keep ``c T out`` values at the outputs plus ``T cols``
        input rows, or ``c cols out`` as gradients (only where ``T > 1``)."""
        K = self._column_count()
        shared = self.fisher == "empirical"  # the one column is the loss gradient: it serves every use
        _, positions, _ = self.grads.probe()
        elt, n = self.theta.element_size(), self.objective.n
        room = self.memory_budget - self.rows * self.grads.chunk_bytes_per_row()
        columns = K + (for_scores and not shared)
        score = (0 if shared else K) if for_scores else None
        forms, per_row = [], 0
        for L, T in zip(self.layers, positions, strict=True):
            rows, gradient = columns * T * L.out + T * L.cols, columns * L.cols * L.out
            forms.append("gradient" if T > 1 and gradient < rows else "rows")
            per_row += gradient if forms[-1] == "gradient" else rows
        # with samples the first pass backpropagates the eigenvalues' own columns as well, so keeping every layer
        # saves two forward passes and no backward work: worth it only where what it keeps is small (on the LeNet of
        # benchmarks/scale.py, keeping 435 MB with samples=1 made EK-FAC no faster and its process 0.55 GB larger)
        small = n * per_row * elt <= self.memory_budget // KEEP_SMALL
        if n * per_row * elt <= room and (small or self.samples is None or self.fisher == "empirical"):
            return KeepPlan(forms, columns, K, score, n * per_row * elt)
        forms = ["gradient" if T > 1 and L.cols < T else "recompute" for L, T in zip(self.layers, positions,
                                                                                      strict=True)]
        if "gradient" not in forms or not self._partial_passes_pay(forms, K, for_scores):
            return None
        kept = sum(columns * L.cols * L.out for L, form in zip(self.layers, forms, strict=True) if form == "gradient")
        # the partial pass holds its K columns of the recomputed layers at once, for one chunk
        stacked = sum(K * T * L.out for L, T, form in zip(self.layers, positions, forms, strict=True)
                      if form == "recompute")
        if (n * kept + self.rows * stacked) * elt <= room:
            return KeepPlan(forms, columns, K, score, n * kept * elt)
        return None

    def _partial_passes_pay(self, forms: list[str], K: int, for_scores: bool) -> bool:
        """Whether plan (2) of :meth:`plan` backpropagates less than streaming, by the layers' products
        (:meth:`LayerGradients.backward_flops`): its first pass backpropagates the eigenvalue pass's columns (their
        own, with ``samples``) and the loss gradient in full, then ``K`` columns and the loss gradient only down to
        the recomputed layers; streaming backpropagates ``K`` columns twice and the loss gradient once, in full."""
        full = self.grads.backward_flops()
        part = self.grads.backward_flops([i for i, form in enumerate(forms) if form == "recompute"])
        shared_lam = self.samples is None or self.fisher == "empirical"  # the factors' columns serve the eigenvalues
        loss_column = for_scores and self.fisher != "empirical"
        first = K + (0 if shared_lam else K) + loss_column
        return first * full + (K + for_scores) * part < (2 * K + for_scores) * full

    # --- fitting ------------------------------------------------------------------------------------------
    def _fit(self, for_scores: bool) -> None:
        obj = self.objective
        dt, dev = self.theta.dtype, self.theta.device
        A = [torch.zeros(L.cols, L.cols, dtype=dt, device=dev) for L in self.layers]
        S = [torch.zeros(L.out, L.out, dtype=dt, device=dev) for L in self.layers]
        plan = self.keep_plan = self.plan(for_scores)
        signs = signs_lam = None
        kept = []  # per chunk: (rows, input rows or None, per layer the kept columns stacked), where plan
        for sl in self._chunks(obj.n):
            f, a, outs = self.grads.forward(obj.X[sl], keep=plan is not None and "rows" in plan.forms)
            # the loss of the chunk's rows at theta, from this pass's outputs (InfluenceCalculator leaves it to us)
            check_finite("loss at the model's current parameters", obj.loss_fn(f.detach(), obj.y[sl]))
            if self.samples is not None and signs is None:  # against the columns of the loss Hessian's root
                KB = _loss_hessian_sqrt(obj, f[:1].detach(), obj.y[sl][:1]).shape[2]
                signs, signs_lam = self._signs(KB, 0), self._signs(KB, 1)
            for i, ai in enumerate(a):
                _add_lower_gram(A[i], row_matrix(ai))  # rows as [cols, b*T] (a view); A is symmetric
            cols = self._columns(f, sl, signs)
            K = cols.shape[2]
            parts, lam_at, wanted = [cols], 0, set()
            if plan is not None:
                if signs_lam is not None:  # the eigenvalue pass's own random signs, from the same graph
                    parts.append(self._columns(f, sl, signs_lam))
                    lam_at = K
                wanted = set(range(lam_at, lam_at + K))
                if plan.score is not None and self.fisher != "empirical":  # the loss gradient's own column
                    parts.append(self.grads.loss_gradient_column(f, obj.y[sl]))
                    wanted.add(lam_at + K)
            store: list[list[Tensor]] = [[] for _ in self.layers]
            for k, g in enumerate(self.grads.backprop_columns(f, outs, torch.cat(parts, 2))):  # one at a time
                for i, gk in enumerate(g):
                    if k < K:
                        g2 = gk.reshape(-1, gk.shape[-1])  # [b*T, out]
                        S[i] += g2.T @ g2
                    if k in wanted and plan.forms[i] != "recompute":  # G_i^T = a_i^T g_i, or the column itself
                        store[i].append(torch.bmm(a[i].transpose(1, 2), gk) if plan.forms[i] == "gradient" else gk)
            if plan is not None:  # the input rows of the "rows" layers only
                kept.append((sl, [ai if form == "rows" else None for ai, form in zip(a, plan.forms, strict=True)],
                             [torch.stack(c, 1) if c else None for c in store]))
        self.passes += 1
        # the factors only fix the eigenbasis; their scale does not matter (the eigenvalues are refitted)
        self.QA = [torch.linalg.eigh(_mirror_lower(M))[1] for M in A]
        self.QS = [torch.linalg.eigh(M)[1] for M in S]
        Lam = [torch.zeros(L.out, L.cols, dtype=dt, device=dev) for L in self.layers]
        buffers: dict = {}  # reused from chunk to chunk (see layer_grads.scratch)
        if plan is not None:
            again = plan.recomputed
            self._kept = [] if for_scores else None
            while kept:  # each chunk's columns are released as soon as its eigenvalues are added
                sl, a, columns = kept.pop(0)
                if again:
                    self._recompute(sl, a, columns, lambda f, sl=sl: self._columns(f, sl, signs_lam))
                self._add_kept_eigenvalues(Lam, a, columns, plan, buffers)
                if for_scores:
                    self._kept.append((sl, *self._score_factors(a, columns, plan)))
            self.passes += bool(again)
        else:
            for sl in self._chunks(obj.n):
                f, a, outs = self.grads.forward(obj.X[sl])
                cols = self._columns(f, sl, signs_lam)
                self._add_eigenvalues(Lam, a, self.grads.backprop_columns(f, outs, cols), cols.shape[2], buffers)
            self.passes += 1
        self.Lam = [L / obj.n for L in Lam]

    def _recompute(self, sl: slice, a: list, columns: list, columns_of) -> None:
        """Fill in, for the rows ``sl``, the input rows ``a[l]`` and the stacked backpropagated columns
        ``columns[l]`` (``[b, k, T, out]``) of the ``"recompute"`` layers of the plan: one forward pass and a backward
        pass per column of ``columns_of(f)`` (``[b, C, k]``) that stops at those layers' outputs."""
        again = self.keep_plan.recomputed
        f, fresh, outs = self.grads.forward(self.objective.X[sl])
        store: dict[int, list[Tensor]] = {i: [] for i in again}
        for g in self.grads.backprop_columns(f, outs, columns_of(f), only=again):
            for i in again:
                store[i].append(g[i])
        for i in again:
            a[i], columns[i] = fresh[i], torch.stack(store[i], 1)

    def _score_factors(self, a: list[Tensor | None], columns: list[Tensor | None], plan: KeepPlan
                       ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """What :meth:`scores` needs of a kept chunk, for :meth:`LayerGradients.contract`, as tensors of their own
        (the chunk's other columns are freed): per layer the input rows and the loss gradient at the outputs
        (``"rows"``), the per-example gradients ``G_i^T`` (``"gradient"``), or None for both (``"recompute"``: the
        scores recompute them)."""
        rows = [ai if form == "rows" else None for ai, form in zip(a, plan.forms, strict=True)]
        grads = [None if form == "recompute" else C[:, plan.score].clone()
                 for C, form in zip(columns, plan.forms, strict=True)]
        return rows, grads

    def _add_kept_eigenvalues(self, Lam: list[Tensor], a: list[Tensor | None], columns: list[Tensor],
                              plan: KeepPlan, buffers: dict) -> None:
        """:meth:`_add_eigenvalues` for one kept chunk: per layer the first ``plan.lam`` kept columns, all at once
        (``[b, c, T, out]`` at the outputs, or the gradients ``[b, c, cols, out]`` they make)."""
        K = plan.lam
        for i, (L, form, ai, C) in enumerate(zip(self.layers, plan.forms, a, columns, strict=True)):
            QA, QS = self.QA[i], self.QS[i]
            b = C.shape[0]
            if form == "gradient":  # (Q_A^T G^T Q_S)^2 summed over examples and columns, in cache-sized groups
                for ex in example_groups(b, K * L.cols * L.out, C.element_size(), LAM_GROUP_BYTES):
                    R = QA.T @ C[ex, :K] @ QS  # [e, K, cols, out]
                    Lam[i] += R.square_().sum((0, 1)).T
                continue
            T = ai.shape[1]
            if T == 1:  # (g a^T)^2 = g^2 (a^2)^T, summed over the columns first
                Lam[i] += (C[:, :K, 0] @ QS).square().sum(1).T @ (ai[:, 0] @ QA).square()
                continue
            if T * L.cols <= K * L.out * (L.out + L.cols):  # rotate the inputs once, then one product per group
                R = scratch(buffers, ("rotated", i), (L.cols, b * T), ai)
                torch.mm(QA.T, row_matrix(ai), out=R)
                rotated = R.view(L.cols, b, T).permute(1, 2, 0)  # [b, T, cols]
                gq = (C[:, :K] @ QS).transpose(2, 3).reshape(b, K * L.out, T)  # all K columns of an example
                for ex in example_groups(b, K * L.out * L.cols, ai.element_size(), LAM_GROUP_BYTES):
                    G = scratch(buffers, "gradient", (ex.stop - ex.start, K * L.out, L.cols), ai)
                    torch.bmm(gq[ex], rotated[ex], out=G)
                    Lam[i] += G.square_().view(-1, L.out, L.cols).sum(0)
                continue
            for k in range(K):  # few columns, many positions: form each [out, cols] gradient, then rotate it
                gk = C[:, k].transpose(1, 2)  # [b, out, T]
                for ex in example_groups(b, L.out * L.cols, ai.element_size(), LAM_GROUP_BYTES):
                    G = scratch(buffers, "gradient", (ex.stop - ex.start, L.out, L.cols), ai)
                    Lam[i] += (QS.T @ torch.bmm(gk[ex], ai[ex], out=G) @ QA).square_().sum(0)

    def _add_eigenvalues(self, Lam: list[Tensor], a: list[Tensor], columns, K: int, buffers: dict) -> None:
        """Add one chunk's squared rotated per-example gradients to ``Lam``: for each of its ``K`` backpropagated
        columns (``columns`` yields, per column, the list over layers of ``[b, T, out]``) and each layer,
        ``sum_i (Q_S^T G_ik Q_A)^2`` with ``G_ik = g_ik^T a_i``."""
        rotated: list[Tensor | None] = [None] * len(self.layers)  # inputs in the eigenbasis, once per chunk
        for g in columns:  # one column at a time
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

    # --- scores, layer by layer ---------------------------------------------------------------------------
    def scores(self, X_test: Tensor, y_test: Tensor) -> Tensor:
        """``[m, n]``: ``g_t^T (G_EKFAC + (wd + damping) I)^{-1} g_i`` for every test row ``t`` and training point
        ``i`` (without the ``1/n``), as a sum over layers of per-layer inner products with the preconditioned
        test gradients. Memory: one chunk of ``[rows, out, cols]`` per-example gradients per layer. The training
        rows' loss gradients come from the first pass where it kept them (see the class docstring), else from a
        pass of their own."""
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
        if self._kept is not None:
            again, out = self.keep_plan.recomputed, []
            for sl, a, g in self._kept:
                if again:  # the recomputed layers' loss gradients (one column, taken out of its stack)
                    a, g = list(a), list(g)
                    self._recompute(sl, a, g, lambda f, sl=sl: self.grads.loss_gradient_column(f, obj.y[sl]))
                    for i in again:
                        g[i] = g[i][:, 0]
                out.append(self.grads.contract(W, a, g))
            self.passes += bool(again)
        else:
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
        """``layers``, ``eigenvalue_range`` (of the corrected eigenvalues), ``passes`` (over the training data so
        far) and ``kept``: what the first pass kept (per layer its form, see :class:`KeepPlan`, and the bytes), or
        ``"streamed"``."""
        plan = self.keep_plan
        kept = "streamed" if plan is None else {"forms": plan.forms, "bytes": plan.bytes}
        return {"layers": [L.weight.removesuffix(".weight") for L in self.layers],
                "eigenvalue_range": [min(float(L.min()) for L in self.Lam), max(float(L.max()) for L in self.Lam)],
                "passes": self.passes, "kept": kept}
