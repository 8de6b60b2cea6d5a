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

Layouts, chosen for the CPU kernels (``benchmarks/scale.py``; each change measured on the LeNet there): the output
of every convolution is passed on channels-last, so the layers after it run their channels-last kernels (max-pooling
7x faster than channels-first) and the gradients into it arrive as contiguous ``[b, T, out]`` rows; the input rows
of a convolution are stored patch-major (see :func:`_patches`), so the K-FAC factor of a chunk is one matrix
product and no transpose is ever copied; the per-layer work of EK-FAC takes the backpropagated columns one at a
time (:meth:`LayerGradients.backprop_columns`). None of this changes a value beyond floating-point rounding.

Applies when every selected parameter is the weight or bias of an ``nn.Linear`` or ``nn.Conv2d`` (``groups=1``,
numeric zero padding) that the forward pass calls once; :meth:`LayerGradients.supports` says whether it does, and
the callers (:mod:`influence_lib.influence`, :mod:`influence_lib.ekfac`) fall back to ``vmap`` or raise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .objective import Objective

#: Default bound, in bytes, on the intermediates of one chunk of rows (layer inputs and backpropagated columns of
#: every layer, per-example layer gradients) when the objective sets no ``chunk_size``.
MEMORY_BUDGET = 512 * 2**20
#: Most rows per chunk when the objective sets no ``chunk_size``. About a hundred rows amortise what each chunk
#: costs once (reading the test blocks in scoring, the calls themselves); more rows only add memory, and larger
#: working sets were slower: EK-FAC on the LeNet of ``benchmarks/scale.py`` took 3.5 s in chunks of 128 rows and
#: 3.9 s in chunks of 482, on its ResNet 38.0 s in chunks of 128 and 41.1 s in chunks of 32 (one thread, one run).
MAX_CHUNK_ROWS = 128
#: Bytes of per-example ``[out, cols]`` layer gradients formed at a time by :meth:`LayerGradients.inner_products`
#: (the chunk's examples are taken in groups of this size, into one reused buffer). On the ResNet of
#: ``benchmarks/scale.py`` (blocks of 100 x 901) groups of 16 MB scored a chunk of 96 rows in 18 ms against 33 ms for
#: the whole chunk at once: a block of more than 32 MB is a fresh mapping of memory on every call (glibc's largest
#: threshold for reusing freed memory), and smaller groups re-read the test blocks more often.
SCORE_GROUP_BYTES = 16 * 2**20


def example_groups(b: int, block_numel: int, element_size: int, group_bytes: int):
    """Slices of ``range(b)`` with at most ``group_bytes`` of ``[block_numel]`` per-example blocks each (at least
    one example per slice), as few as that allows and of sizes differing by at most one (a short last group would
    cost a product of the same time as a full one)."""
    most = max(1, group_bytes // max(1, block_numel * element_size))
    groups = -(-b // most)
    for k in range(groups):
        yield slice(k * b // groups, (k + 1) * b // groups)


def scratch(buffers: dict, key, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A contiguous tensor of ``shape`` (dtype and device of ``like``) carved from the buffer ``buffers[key]``,
    which grows when too small and is otherwise reused: a fresh allocation of many megabytes costs page faults on
    its first touch on every call, a reused one does not. Its contents are undefined."""
    numel = 1
    for d in shape:
        numel *= d
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = buffers[key] = like.new_empty(numel)
    return buf[:numel].view(shape)


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


def _patches(m: nn.Conv2d, inp: Tensor, bias: bool, out: Tensor | None = None) -> Tensor:
    """The unfolded patches of a convolution's input as ``[b, T, C*kh*kw (+1)]``, columns in the order of the
    flattened weight ``[out, C, kh, kw]`` (the bias column last), stored *patch-major*: the returned tensor is a
    view of a contiguous ``[C*kh*kw (+1), b, T]`` buffer (strides ``(T, 1, b*T)``).

    The buffer is filled by ``kh * kw`` strided copies of the (zero-padded) input, one per kernel offset, each
    reading whole rows of output positions; that was 2-4x faster than ``F.unfold`` followed by the transpose and the
    ones column on the layers of ``benchmarks/scale.py``'s LeNet. The layout serves every consumer without a
    copy: :func:`row_matrix` views all rows of a chunk as one ``[cols, b*T]`` matrix (the K-FAC factor is one
    product), and each example's ``[T, cols]`` block is a column-major matrix that ``torch.bmm`` reads in place.
    ``out``: a buffer of a previous call, refilled where its shape, dtype and device fit (a fresh allocation of
    this size is a fresh mapping of memory whose first touch costs page faults, about a third of the copy)."""
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    ph, pw = m.padding
    if ph or pw:
        inp = F.pad(inp, (pw, pw, ph, ph))
    # channels first, so that each copy below reads whole rows (a channels-last input would be read with stride C)
    inp = inp.contiguous()
    b, C, H, W = inp.shape
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    d = C * kh * kw
    shape = (d + bias, b, Ho * Wo)
    reuse = out is not None and out.shape == shape and out.dtype == inp.dtype and out.device == inp.device
    buf = out if reuse else inp.new_empty(shape)
    P = buf[:d].view(C, kh, kw, b, Ho, Wo)
    src = inp.transpose(0, 1)  # [C, b, H, W], a view
    for i in range(kh):
        for j in range(kw):
            P[:, i, j].copy_(src[:, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh, j * dw:j * dw + sw * (Wo - 1) + 1:sw])
    if bias:
        buf[d] = 1
    return buf.permute(1, 2, 0)


def row_matrix(a: Tensor) -> Tensor:
    """All input rows of a chunk, ``a`` ``[b, T, cols]``, as one ``[cols, b*T]`` matrix: a view for the
    patch-major rows of convolutions and for contiguous rows (then it is the transpose of ``[b*T, cols]``)."""
    return a.permute(2, 0, 1).reshape(a.shape[2], -1)


def input_rows(layer: Layer, inp: Tensor, out: Tensor | None = None) -> Tensor:
    """Layer input as ``[b, T, d_in(+1)]``: one row per output position (unfolded patches for convolutions, which
    may refill the buffer of an earlier result ``out``, see :func:`_patches`)."""
    m = layer.module
    if isinstance(m, nn.Conv2d):
        return _patches(m, inp, layer.bias is not None, None if out is None else out.permute(2, 0, 1))
    a = inp.reshape(inp.shape[0], -1, inp.shape[-1])
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
    return a


def output_rows(layer: Layer, g: Tensor) -> Tensor:
    """Gradient w.r.t. the layer output as ``[b, T, out]`` (a view; contiguous for channels-last convolution
    outputs, which :meth:`LayerGradients.forward` arranges)."""
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
        self._rows_buffers: list[Tensor | None] = [None] * len(self.layers)  # see forward
        self._scratch: dict = {}  # see inner_products
        self._probe: tuple[int, list[int], list[int]] | None = None  # see probe
        self._order: list[int] = []  # the layers' indices in the order the last forward pass called them

    @classmethod
    def supports(cls, objective: Objective, theta: Tensor) -> LayerGradients | None:
        """A :class:`LayerGradients` of ``objective`` if every selected parameter sits in a supported layer that the
        forward pass calls exactly once (checked on one training row), else None."""
        try:
            lg = cls(objective, theta)
            lg.probe()
        except ValueError:
            return None
        return lg

    def probe(self) -> tuple[int, list[int], list[int]]:
        """``(outputs, positions, output_numels)`` of one training row, from one forward pass (made once and
        kept): the model's output size per row, the rows per example of every layer (``T``: output positions of
        a convolution, 1 for a Linear on ``[b, in]`` inputs) and the number of each layer's outputs per row."""
        if self._probe is None:
            f, a, outs = self.forward(self.objective.X[:1], keep=True)
            self._probe = (f[0].numel(), [ai.shape[1] for ai in a], [o.numel() for o in outs])
        return self._probe

    def backward_flops(self, only: list[int] | None = None) -> int:
        """Floating-point operations per row of one backward column from the model's outputs down to the outputs of
        the layers ``only`` (default: all): the input gradients of every layer the forward pass calls after the
        earliest of them, ``2 T out d_in`` each. A cost model only (the layers' products, nothing else of the
        model), to compare backward passes that stop at different layers."""
        _, positions, _ = self.probe()
        idx = range(len(self.layers)) if only is None else only
        first = min(self._order.index(i) for i in idx)
        return sum(2 * positions[i] * self.layers[i].out * self.layers[i].d_in for i in self._order[first + 1:])

    def forward(self, X: Tensor, keep: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Outputs ``f`` and, per layer, its input rows ``[b, T, cols]`` and its output (in the graph of ``f``).

        The input rows of convolutions are written into the buffers of the previous call where the shapes agree
        (chunk after chunk): they are valid until the next call of :meth:`forward`; with ``keep=True`` they are
        fresh tensors that later calls leave alone (for callers that hold several chunks at once)."""
        inputs: dict[int, Tensor] = {}
        outputs: dict[int, Tensor] = {}

        def hook(i):
            def fn(_m, inp, out):
                if i in outputs:
                    raise ValueError(f"{self.who}: layer {self.layers[i].weight.removesuffix('.weight')!r} is "
                                     "called more than once per forward pass (shared weights are not supported)")
                if isinstance(self.layers[i].module, nn.Conv2d) and out.dim() == 4:
                    # the same values laid out channels-last: the layers after it (max-pooling above all: 7x on a
                    # LeNet) run their channels-last kernels, and the gradients into this output arrive as
                    # contiguous [b, T, out] rows
                    out = out.contiguous(memory_format=torch.channels_last)
                inputs[i], outputs[i] = inp[0].detach(), out
                return out
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
        self._order = list(outputs)  # dicts keep insertion order: the order the hooks ran in
        if keep:
            rows = [input_rows(L, inputs[i]) for i, L in enumerate(self.layers)]
        else:
            rows = [input_rows(L, inputs[i], self._rows_buffers[i]) for i, L in enumerate(self.layers)]
            self._rows_buffers = rows
        return f, rows, [outputs[i] for i in range(len(self.layers))]

    def backprop_columns(self, f: Tensor, outs: list[Tensor], cols: Tensor, only: list[int] | None = None):
        """Yield, for each column ``k`` of the output-space vectors ``cols`` ``[b, C, K]``, the list over layers of
        that column pulled back to the layer outputs, ``[b, T, out]`` (one backward pass on the kept graph, batched
        over the rows). One column at a time: the consumer accumulates what it needs, so the ``K`` columns of a
        chunk are never stored together. ``only``: the indices of the layers wanted (the others are None); the
        backward pass then stops at the earliest of them (autograd computes nothing below what is asked for)."""
        K = cols.shape[2]
        idx = range(len(self.layers)) if only is None else only
        for k in range(K):
            gs = torch.autograd.grad(f, [outs[i] for i in idx], grad_outputs=cols[:, :, k].reshape(f.shape),
                                     retain_graph=k < K - 1)
            out: list[Tensor | None] = [None] * len(self.layers)
            for i, g in zip(idx, gs, strict=True):
                out[i] = output_rows(self.layers[i], g)
            yield out

    def loss_gradient_column(self, f: Tensor, y: Tensor) -> Tensor:
        """``[b, C, 1]``: each row's gradient of its own loss with respect to its outputs ``f`` ``[b, C]`` (the
        output-space vector whose pull-back gives the per-example parameter gradients). The loss of a batch is the
        mean of its rows' losses (the contract of ``loss_fn``, checked by the objective), so row ``i``'s gradient is
        ``b`` times the batch loss's gradient with respect to ``f_i``: one backward pass, no ``vmap`` over rows."""
        with torch.enable_grad():
            fd = f.detach().requires_grad_(True)
            (dl,) = torch.autograd.grad(self.objective.loss_fn(fd, y), fd)
        return (dl * f.shape[0]).reshape(f.shape[0], -1, 1)

    def _loss_gradient_rows(self, X: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer, the input rows ``a`` ``[b, T, cols]`` of ``X`` and the per-example loss gradients with
        respect to the layer outputs, ``g`` ``[b, T, out]``: the two factors of ``G_i = g_i^T a_i``."""
        f, a, outs = self.forward(X)
        return a, next(self.backprop_columns(f, outs, self.loss_gradient_column(f, y)))

    def per_example(self, X: Tensor, y: Tensor) -> list[Tensor]:
        """Per-example loss gradients of every layer, ``[b, out, cols]`` (bias last; no weight decay)."""
        a, g = self._loss_gradient_rows(X, y)
        return [torch.bmm(gi.transpose(1, 2), ai) for gi, ai in zip(g, a, strict=True)]

    def positions(self) -> list[int]:
        """Rows per example of every layer (``T``: output positions of a convolution, 1 for a Linear on
        ``[b, in]`` inputs), from a forward pass on one training row (computed once, see :meth:`probe`)."""
        return self.probe()[1]

    def score_blocks(self, W: list[Tensor]) -> list[tuple[bool, Tensor]]:
        """Per-layer blocks ``W_l`` ``[m, out, cols]`` arranged once for :meth:`inner_products`, as
        ``(rank_one, block)``: a layer with one row per example and ``m < cols`` keeps ``[m * out, cols]``
        (``rank_one``); every other layer gets ``W_l^T`` as ``[m, cols * out]``."""
        out = []
        for L, T, w in zip(self.layers, self.positions(), W, strict=True):
            m = w.shape[0]
            rank_one = T == 1 and m < L.cols
            out.append((rank_one, w.reshape(m * L.out, L.cols) if rank_one
                        else w.transpose(1, 2).reshape(m, L.cols * L.out)))
        return out

    def inner_products(self, blocks: list[tuple[bool, Tensor]], X: Tensor, y: Tensor) -> Tensor:
        """``[m, b]``: ``sum_l <W_l[t], G_l[i]>`` over the selected layers, for blocks from :meth:`score_blocks`
        and the per-example loss gradients ``G_l[i] = g_i^T a_i`` of the rows ``X`` (no weight decay).

        A layer with one row per example (``G = g a^T``) is contracted as ``g^T (W a)`` without forming the outer
        products (an ``[m, out, b]`` intermediate instead of ``[b, out, cols]``; chosen where ``m < cols``). Every
        other layer forms ``G_i^T = a_i^T g_i`` (``[b, cols, out]``, the faster order of the batched product for the
        patch-major rows) and takes one product with the transposed blocks."""
        return self.contract(blocks, *self._loss_gradient_rows(X, y))

    def contract(self, blocks: list[tuple[bool, Tensor]], a: list[Tensor | None], g: list[Tensor]) -> Tensor:
        """:meth:`inner_products` for given per-layer input rows ``a`` ``[b, T, cols]`` and loss gradients into the
        layer outputs ``g`` ``[b, T, out]`` (of rows whose pass was made earlier). Where ``a[l]`` is None, ``g[l]``
        is the layer's per-example gradients already formed, transposed: ``G_i^T`` ``[b, cols, out]`` (EK-FAC's
        kept first pass keeps a convolution with many output positions and a small kernel that way)."""
        total = None
        for L, (rank_one, w), ai, gi in zip(self.layers, blocks, a, g, strict=True):
            b = gi.shape[0]
            if ai is None:  # G_i^T given: one product with the transposed blocks
                if rank_one:
                    raise ValueError("contract: formed per-example gradients need blocks of the [m, cols*out] layout")
                s = w @ gi.reshape(b, -1).T
            elif rank_one:
                Wa = (w @ ai[:, 0].T).view(-1, L.out, b)  # [m, out, b]: W_t a_i
                s = (Wa * gi[:, 0].T.unsqueeze(0)).sum(1)  # g_i^T W_t a_i
            else:  # examples in groups of at most SCORE_GROUP_BYTES of G^T, formed in one reused buffer
                s = w.new_empty(w.shape[0], b)
                groups = example_groups(b, L.cols * L.out, w.element_size(), SCORE_GROUP_BYTES)
                for sl in groups:
                    e = sl.stop - sl.start
                    Gt = torch.bmm(ai[sl].transpose(1, 2), gi[sl],
                                   out=scratch(self._scratch, "score", (e, L.cols, L.out), w))  # G_i^T
                    torch.mm(w, Gt.view(e, -1).T, out=s[:, sl])
            total = s if total is None else total + s
        return total

    def rows_per_chunk(self, memory_budget: int) -> int:
        """Rows per chunk: the objective's ``chunk_size``, else what fits ``memory_budget`` bytes of intermediates,
        at most :data:`MAX_CHUNK_ROWS`.

        Per row, what a chunk keeps for all layers at once: each layer's input rows and, in EK-FAC's eigenvalue
        pass, their rotation (``2 T cols``), one backpropagated column into every layer output and its rotation
        (``2 T out``), and the forward graph (about three times the layer outputs). In the passes over the training
        data the per-example ``[out, cols]`` gradients are formed in groups of bounded size
        (:data:`SCORE_GROUP_BYTES`, EK-FAC's own), one layer at a time, and do not grow with the chunk; only
        :meth:`per_example`, which returns them, holds a whole chunk's."""
        obj = self.objective
        if obj.chunk_size is not None:
            return obj.chunk_size
        return max(1, min(obj.n, MAX_CHUNK_ROWS, memory_budget // max(self.chunk_bytes_per_row(), 1)))

    def chunk_bytes_per_row(self) -> int:
        """Bytes per row of what a chunk keeps while it is processed (see :meth:`rows_per_chunk`)."""
        _, positions, numels = self.probe()
        per_row = sum(2 * T * (L.cols + L.out) + 3 * o for L, T, o in zip(self.layers, positions, numels, strict=True))
        return per_row * self.theta.element_size()

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
