"""The training objective as a pure function of one flat parameter vector.

For data ``(X, y)`` with ``n`` rows, a model ``f`` and a per-batch *mean* loss ``loss_fn``::

    J(theta) = (1/n) sum_i loss_fn(f(theta, x_i), y_i) + (weight_decay / 2) ||theta||^2

``theta`` is the concatenation of the selected parameters (all of them by default, in
``model.parameters()`` order); parameters that are not selected stay fixed at their current values.
Everything here is built on :func:`torch.func.functional_call`, so nothing mutates the model.
Data are processed in chunks of ``chunk_size`` rows: memory does not grow with ``n`` and the results do
not depend on the chunk size (up to floating-point summation order).
"""

from __future__ import annotations

import copy
import math
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, linearize, vjp, vmap

from .mlp_hessian import mlp_data_hessian, mlp_plan
from .validation import check_data, check_labels, check_loss_fn, check_model, check_nonneg, check_positive_int

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class LinearizedChunk:
    """A chunk of training rows linearized at fixed parameters (:meth:`Objective.linearize_chunk`).

    ``outputs``: the model outputs ``[b, ...]``; ``jvp_fn``: ``v [p] -> J v [b, ...]``, with the forward pass's
    intermediates held inside it; ``y``: the chunk's labels; ``scale``: ``b / n``, its weight in the data term.
    """

    outputs: Tensor
    jvp_fn: Callable[[Tensor], Tensor]
    y: Tensor
    scale: float


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of the selected parameters and the map between dict and flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.numels)

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Flat ``theta`` of shape ``[p]`` -> ``{name: tensor of the parameter's shape}``."""
        return {
            n: t.view(s) for n, t, s in zip(self.names, theta.split(self.numels), self.shapes, strict=True)
        }

    def flatten(self, tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """``{name: tensor}`` (or a sequence in ``names`` order) -> flat vector ``[p]``."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])


def param_spec(model: nn.Module, names: Sequence[str] | None = None) -> ParamSpec:
    """The :class:`ParamSpec` of ``model``'s parameters ``names`` (default: all, in model order)."""
    named = dict(model.named_parameters())
    if names is None:
        names = list(named)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"params: unknown parameter names {unknown}; the model has {list(named)}")
    if not names:
        raise ValueError("params: at least one parameter must be selected")
    return ParamSpec(tuple(names), tuple(named[n].shape for n in names))


def flat_params(model: nn.Module, names: Sequence[str] | None = None) -> Tensor:
    """Current values of the selected parameters as one detached flat vector ``[p]``."""
    spec = param_spec(model, names)
    named = dict(model.named_parameters())
    return spec.flatten([named[n].detach() for n in spec.names])


def set_flat_params(model: nn.Module, theta: Tensor, names: Sequence[str] | None = None) -> None:
    """Write flat ``theta`` (``[p]``) into the model's selected parameters, in place."""
    spec = param_spec(model, names)
    if theta.shape != (spec.size,):
        raise ValueError(f"theta: expected shape ({spec.size},), got {tuple(theta.shape)}")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in spec.unflatten(theta).items():
            named[n].copy_(t)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("model: it has no parameters")
    return p.device, p.dtype


#: Columns per batched Hessian-vector product when a dense matrix is assembled from unit vectors. One batched
#: double-backward over ``k`` columns costs about ``k`` single products up to ~16 columns and more per column
#: beyond (vmapped convolution backward passes move ever larger intermediates): on the small-MNIST CNNs of
#: ``benchmarks/compare.py`` blocks of 4-16 were 1.6x faster than blocks of 64 and 2.5x faster than 128.
HVP_BLOCK = 16
#: Up to this many parameters the dense matrix is assembled in one block: for such tiny models the fixed cost of
#: each backward call dominates (Iris MLP, p = 43: one block of 43 columns took 0.65x the time of three of 16).
ONE_BLOCK_MAX_P = 64


def dense_from_products(apply: Callable[[Tensor], Tensor], like: Tensor, p: int, block_size: int = HVP_BLOCK) -> Tensor:
    """The ``[p, p]`` matrix of the linear map ``apply`` (``[p, k] -> [p, k]``), from blocks of unit vectors.

    ``like`` gives the dtype and device. Models with at most :data:`ONE_BLOCK_MAX_P` parameters use one block.
    """
    check_positive_int("block_size", block_size)
    if p <= ONE_BLOCK_MAX_P:
        block_size = max(block_size, p)
    M = like.new_empty(p, p)
    for start in range(0, p, block_size):
        stop = min(start + block_size, p)
        E = like.new_zeros(p, stop - start)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1
        M[:, start:stop] = apply(E)
    return M


@dataclass
class Objective:
    """``J(theta)`` above, with its gradients, Hessian- and Gauss-Newton-vector products.

    ``X`` is cast to the model's dtype and moved, with ``y``, to the model's device. ``params`` selects
    the parameters that form ``theta`` (default: all); ``chunk_size`` is the number of data rows
    processed at once (default: all rows).

    Refused up front (:func:`~influence_lib.validation.check_model`, :func:`~influence_lib.validation.check_loss_fn`),
    so that every entry point built on it refuses them before any computation: a ``loss_fn`` that is not the
    mean loss of a batch (``reduction="sum"`` / ``"none"``); inputs or labels the model or loss cannot take and
    class labels out of range; a model in training mode with BatchNorm / Dropout (call ``model.eval()``);
    selected parameters with ``requires_grad=False`` (never differentiated silently: leave them out with
    ``params``).
    """

    model: nn.Module
    loss_fn: LossFn
    X: Tensor
    y: Tensor | None = None  # None only to refuse ``Objective(model, loss_fn, *(X,))`` with a clear message
    weight_decay: float = 0.0
    params: Sequence[str] | None = None
    chunk_size: int | None = None
    spec: ParamSpec = field(init=False)

    def __post_init__(self) -> None:
        check_nonneg("weight_decay", self.weight_decay)
        if self.chunk_size is not None:
            check_positive_int("chunk_size", self.chunk_size)
        device, dtype = model_device_dtype(self.model)
        if self.y is None:
            raise ValueError("data: the training data must be an (X, y) pair of tensors, got X alone (a 1-tuple?)")
        self.X, self.y = check_data("data", (self.X, self.y), device=device, dtype=dtype)
        self.spec = param_spec(self.model, self.params)
        check_model(self.model, self.spec.names)
        self.n_classes = check_loss_fn(self.loss_fn, self.model, self.X, self.y)
        named = dict(self.model.named_parameters())
        self._fixed = {k: v.detach() for k, v in named.items() if k not in self.spec.names}
        self._fixed.update({k: v.detach() for k, v in self.model.named_buffers()})
        self._gn_reverse = False  # see gnvp
        self._cast: torch.dtype | None = None  # set by astype: theta() is the model's parameters in this dtype
        # convolution weights with more than one input channel: the ones forward(..., channels_last=True) converts
        self._conv_weights = frozenset(f"{m_name}.weight" if m_name else "weight"
                                       for m_name, m in self.model.named_modules()
                                       if isinstance(m, nn.Conv2d) and m.in_channels > 1)

    def check_points(self, name: str, data: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Validate further points (e.g. test points) ``(X, y)`` against the training data: the same features per row,
        the same kind of labels, class labels in range. Returns them cast and moved like the training data."""
        X, y = check_data(name, data, device=self.X.device, dtype=self.X.dtype if self.X.is_floating_point() else None)
        if X.shape[1:] != self.X.shape[1:] or X.dtype != self.X.dtype:
            raise ValueError(
                f"{name}: inputs must have shape [m, {', '.join(map(str, self.X.shape[1:]))}] and dtype {self.X.dtype} "
                f"like the training inputs, got {tuple(X.shape)} {X.dtype}"
            )
        if y.shape[1:] != self.y.shape[1:] or y.is_floating_point() != self.y.is_floating_point():
            raise ValueError(
                f"{name}: labels must have shape [m{''.join(', ' + str(d) for d in self.y.shape[1:])}] and a "
                f"{'floating-point' if self.y.is_floating_point() else 'integer'} dtype like the training labels, got "
                f"{tuple(y.shape)} {y.dtype}"
            )
        if self.n_classes is not None:
            check_labels(f"{name} y", y, self.n_classes)
        return X, y

    # --- basic pieces -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def p(self) -> int:
        return self.spec.size

    @property
    def is_convolutional(self) -> bool:
        """Whether the model has an ``nn.Conv2d`` with more than one input channel (see :meth:`forward`)."""
        return bool(self._conv_weights)

    def astype(self, dtype: torch.dtype) -> Objective:
        """The same objective evaluated in floating-point ``dtype``: the data, the fixed parameters and the buffers cast
        (a shallow copy; the model is shared and left untouched, since every forward pass passes all its parameters
        and buffers, :meth:`forward`). Its :meth:`theta` is the model's parameters, cast. For lower-precision
        products beside a float64 objective (mixed-precision CG, :func:`influence_lib.solvers.ihvp_cg`)."""
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")

        def cast(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        twin = copy.copy(self)
        twin.X, twin.y = cast(self.X), cast(self.y)
        twin._fixed = {k: cast(v) for k, v in self._fixed.items()}
        twin._cast = dtype
        return twin

    def theta(self) -> Tensor:
        """The model's current selected parameters, flat ``[p]`` (cast to the dtype of :meth:`astype` for a twin)."""
        theta = flat_params(self.model, self.spec.names)
        return theta if self._cast is None else theta.to(self._cast)

    def forward(self, theta: Tensor, x: Tensor, *, channels_last: bool = False) -> Tensor:
        """Model outputs for inputs ``x`` (``[b, ...]``) at flat parameters ``theta``.

        ``channels_last=True`` passes the weights of every ``nn.Conv2d`` with more than one input channel in the
        channels-last memory format, so that oneDNN runs those convolutions (and, through the activations' layout,
        the layers after them) channels-last: the same function, rounded differently. For the book's few-channel
        CNNs one model at a time this way trains a stack of 17 1.1-1.7x faster per step than vmap over channels-first
        models, and a single model about as fast (benchmarks/cnn_layout.py). Not inside ``torch.func.vmap`` over
        ``theta`` (a batched tensor cannot change its memory format there): the stacked training calls it once per
        model.
        """
        params = {**self._fixed, **self.spec.unflatten(theta)}
        if channels_last:
            for name in self._conv_weights:
                params[name] = params[name].contiguous(memory_format=torch.channels_last)
        return functional_call(self.model, params, (x,))

    def sample_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Loss of one example (``x`` without batch dimension), a scalar."""
        return self.loss_fn(self.forward(theta, x.unsqueeze(0)), y.unsqueeze(0))

    def chunks(self, n: int | None = None) -> Iterator[slice]:
        n = self.n if n is None else n
        step = self.chunk_size or max(n, 1)
        for start in range(0, n, step):
            yield slice(start, min(start + step, n))

    def _chunk_term(self, theta: Tensor, sl: slice) -> Tensor:
        """Contribution of rows ``sl`` to the data term: (len/n) * mean loss over the chunk."""
        rows = sl.stop - sl.start
        return self.loss_fn(self.forward(theta, self.X[sl]), self.y[sl]) * (rows / self.n)

    # --- values and first derivatives ---------------------------------------------------------
    def loss(self, theta: Tensor) -> Tensor:
        """``J(theta)``, a scalar."""
        total = sum(self._chunk_term(theta, sl) for sl in self.chunks())
        return total + 0.5 * self.weight_decay * theta.dot(theta)

    def gradient(self, theta: Tensor) -> Tensor:
        """``grad J(theta)``, shape ``[p]``."""
        g = sum(grad(self._chunk_term)(theta, sl) for sl in self.chunks())
        return g + self.weight_decay * theta

    def per_sample_losses(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """``loss_fn(f(theta, x_i), y_i)`` for every row, shape ``[m]`` (no weight decay)."""
        out = []
        for sl in self.chunks(X.shape[0]):
            out.append(vmap(self.sample_loss, in_dims=(None, 0, 0))(theta, X[sl], y[sl]))
        return torch.cat(out) if out else X.new_zeros(0)

    def per_sample_grads(self, theta: Tensor, X: Tensor, y: Tensor) -> Iterator[tuple[slice, Tensor]]:
        """Yield ``(rows, G)`` with ``G[j] = grad_theta loss(z_{rows.start + j})``, ``[len(rows), p]``.

        Per-example gradients of the loss only: the weight-decay term is *not* included (it is not a
        property of any single training point). Chunked with ``chunk_size``.
        """
        g = vmap(grad(self.sample_loss), in_dims=(None, 0, 0))
        for sl in self.chunks(X.shape[0]):
            yield sl, g(theta, X[sl], y[sl])

    # --- second derivatives -------------------------------------------------------------------
    def hvp(self, theta: Tensor, V: Tensor, rows: Tensor | None = None) -> Tensor:
        """Hessian-vector products ``H V`` of ``J`` at ``theta``; ``V`` is ``[p]`` or ``[p, k]``.

        Reverse-over-reverse: the gradient graph of each data chunk is built once, then differentiated
        again against all ``k`` columns in one batched backward pass. With ``rows`` (indices into the data)
        the data term is the mean loss over those rows only (a stochastic estimate of the Hessian, as used
        by LiSSA); the weight-decay term is always exact. For many products at the same ``theta`` use
        :meth:`hvp_operator`, which keeps the graphs.
        """
        return self.hvp_operator(theta, rows, keep_graphs=False)(V)

    def _subset(self, names: Sequence[str]) -> tuple[Tensor, tuple[str, ...]]:
        """Flat positions in ``theta`` of the selected parameters ``names`` and those names, both in the selected
        order."""
        unknown = [m for m in names if m not in self.spec.names]
        if unknown or not names:
            raise ValueError(f"params: must be a non-empty subset of the selected parameters {list(self.spec.names)}, "
                             f"got {list(names)}")
        wanted = set(names)
        pos, start = [], 0
        for name, numel in zip(self.spec.names, self.spec.numels, strict=True):
            if name in wanted:
                pos.append(torch.arange(start, start + numel))
            start += numel
        ordered = tuple(m for m in self.spec.names if m in wanted)
        return torch.cat(pos).to(self.X.device), ordered

    def _forward_subset(self, theta: Tensor, leaf: Tensor, names: tuple[str, ...], x: Tensor) -> Tensor:
        """Model outputs with the parameters ``names`` (in the selected order) taken from the flat ``leaf`` and every
        other selected parameter from ``theta``."""
        params = {**self._fixed, **self.spec.unflatten(theta)}
        shapes = dict(zip(self.spec.names, self.spec.shapes, strict=True))
        sizes = [math.prod(shapes[m]) for m in names]
        for m, t in zip(names, leaf.split(sizes), strict=True):
            params[m] = t.view(shapes[m])
        return functional_call(self.model, params, (x,))

    @contextmanager
    def convolutions_as_matmul(self) -> Iterator[None]:
        """Within this context, every ``nn.Conv2d`` of the model (``groups=1``, numeric zero padding) computes its
        output as ``W [out, C*kh*kw] @ unfold(x)``: the same function, rounded differently, and one that autograd
        differentiates twice by matrix products. Used for the kept Hessian graphs of float64 models on the CPU,
        where PyTorch has no fast convolution kernel (oneDNN has no float64 one) and the double backward of its
        fallback goes through ``slow_conv_transpose2d``: exact influence on ``benchmarks/compare.py``'s 210-parameter
        CNN (200 images) went from 1.15 to 0.56 s this way. Sets an instance attribute on each such
        module for the duration and removes it afterwards."""
        convs = [m for m in self.model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1
                 and m.padding_mode == "zeros" and not isinstance(m.padding, str) and "_conv_forward" not in vars(m)]
        for m in convs:
            m._conv_forward = types.MethodType(_conv_by_matmul, m)
        try:
            yield
        finally:
            for m in convs:
                vars(m).pop("_conv_forward", None)

    def hvp_operator(
        self, theta: Tensor, rows: Tensor | None = None, *, keep_graphs: bool = True,
        params: Sequence[str] | None = None,
    ) -> Callable[[Tensor], Tensor]:
        """A function ``V -> H V`` at fixed ``theta`` (see :meth:`hvp`).

        ``keep_graphs=True`` builds each chunk's gradient graph once and reuses it for every call (fast;
        memory of one forward/backward over all rows); ``False`` rebuilds chunk by chunk (memory of one chunk).
        ``params`` (a subset of the selected names): the block ``H[S, S]`` of those parameters ``S`` only, the
        others held at their values in ``theta`` (``V``: ``[|S|]`` or ``[|S|, k]``, coordinates in the selected
        order). Autograd records only what depends on ``S``: for the parameters of a late layer the graph is the
        part of the network downstream of that layer.
        """
        if rows is None:
            X, y, n = self.X, self.y, self.n
        else:
            X, y, n = self.X[rows], self.y[rows], rows.numel()
        theta = theta.detach()
        subset = None if params is None else self._subset(params)

        # float64 convolutions on the CPU: the kept graphs by matrix products (see convolutions_as_matmul)
        matmul_convs = theta.dtype == torch.float64 and theta.device.type == "cpu"

        def chunk_graph(sl: slice) -> tuple[Tensor, Tensor]:
            with torch.enable_grad():
                # with a subset, the other parameters are constants: autograd does not record what depends only on them
                leaf = (theta if subset is None else theta[subset[0]]).clone().requires_grad_(True)
                with self.convolutions_as_matmul() if matmul_convs else nullcontext():
                    outputs = (self.forward(leaf, X[sl]) if subset is None
                               else self._forward_subset(theta, leaf, subset[1], X[sl]))
                    term = self.loss_fn(outputs, y[sl]) * ((sl.stop - sl.start) / n)
                    (g,) = torch.autograd.grad(term, leaf, create_graph=True)
            return leaf, g

        graphs = [chunk_graph(sl) for sl in self.chunks(n)] if keep_graphs else None
        # a block of vectors: one batched backward (vmap over the double-backward graph), except for convolutional
        # models, where vmap turns each convolution's double backward into a grouped convolution: k separate backward
        # passes over the same graph were 1.3-1.7x faster there (CNNs of 210 and 640 parameters, k = 5 to 16)
        conv = any(isinstance(m, nn.Conv2d) for m in self.model.modules())

        def apply(V: Tensor) -> Tensor:
            single = V.dim() == 1
            Vm = V.unsqueeze(1) if single else V
            out = self.weight_decay * Vm
            for i, sl in enumerate(self.chunks(n)):
                leaf, g = graphs[i] if graphs is not None else chunk_graph(sl)
                if not g.requires_grad:  # the loss is linear in theta on this chunk
                    continue
                with torch.enable_grad():
                    if conv:  # one backward per column (see above)
                        k = Vm.shape[1]
                        cols = [torch.autograd.grad(g, leaf, Vm[:, j].contiguous(), allow_unused=True,
                                                    retain_graph=graphs is not None or j < k - 1)[0]
                                for j in range(k)]
                        hv = None if cols[0] is None else torch.stack(cols)
                    else:
                        (hv,) = torch.autograd.grad(g, leaf, Vm.T.contiguous(), retain_graph=graphs is not None,
                                                    is_grads_batched=True, allow_unused=True)
                if hv is not None:
                    out = out + hv.T
            return out.squeeze(1) if single else out

        return apply

    def gnvp(self, theta: Tensor, V: Tensor, rows: Tensor | None = None) -> Tensor:
        """Generalised Gauss-Newton products ``G V`` with ``G = (1/n) sum_i J_i^T H_out,i J_i + wd I``
        (``rows``: the same average over those training rows only, a stochastic estimate of ``G``).

        ``J_i`` is the Jacobian of the outputs w.r.t. ``theta`` and ``H_out,i`` the Hessian of the loss
        in output space. ``G`` is positive semi-definite for convex losses (cross-entropy, MSE).
        ``V`` is ``[p]`` or ``[p, k]``. ``H_out J v`` is computed forward-over-reverse; where PyTorch cannot
        differentiate the loss that way (``F.mse_loss``, "ZeroTensors are immutable"), reverse-over-reverse
        (the same product, in other rounding), from then on for this objective.
        """
        single = V.dim() == 1
        Vm = V.unsqueeze(1) if single else V
        X, y = (self.X, self.y) if rows is None else (self.X[rows], self.y[rows])
        n = y.shape[0]
        out = self.weight_decay * Vm
        for sl in self.chunks(n):
            out = out + self._gnvp_chunk(theta, X[sl], y[sl], (sl.stop - sl.start) / n, Vm)
        return out.squeeze(1) if single else out

    def _h_out(self, outputs: Tensor, yc: Tensor, scale: float, reverse: bool) -> Callable[[Tensor], Tensor]:
        """``u -> H_out u``: the Hessian of ``scale * loss_fn(., yc)`` in output space at ``outputs``, by
        forward-over-reverse or (``reverse=True``) reverse-over-reverse (``H_out`` is symmetric)."""

        def loss_out(o: Tensor) -> Tensor:
            return self.loss_fn(o, yc) * scale

        if reverse:
            return lambda u: vjp(grad(loss_out), outputs)[1](u)[0]
        return lambda u: jvp(grad(loss_out), (outputs,), (u,))[1]

    def _with_h_out(self, product: Callable[[bool], Tensor]) -> Tensor:
        """``product(reverse)``, forward-over-reverse first; where PyTorch cannot differentiate the loss that way
        (``F.mse_loss``: "ZeroTensors are immutable"), reverse-over-reverse, from then on for this objective."""
        if not self._gn_reverse:
            try:
                return product(False)
            except RuntimeError as err:
                try:
                    out = product(True)
                except RuntimeError:
                    raise err from None
                self._gn_reverse = True
                return out
        return product(True)

    def _gnvp_chunk(self, theta: Tensor, Xc: Tensor, yc: Tensor, scale: float, Vm: Tensor) -> Tensor:

        def outputs_of(t: Tensor) -> Tensor:
            return self.forward(t, Xc)

        outputs, pullback = vjp(outputs_of, theta)

        def product(reverse: bool) -> Tensor:
            h_out = self._h_out(outputs, yc, scale, reverse)

            def gv(v: Tensor) -> Tensor:
                jv = jvp(outputs_of, (theta,), (v,))[1]
                return pullback(h_out(jv))[0]

            return vmap(gv, in_dims=1, out_dims=1)(Vm)

        return self._with_h_out(product)

    def linearize_chunk(self, theta: Tensor, sl: slice, n: int | None = None) -> LinearizedChunk:
        """The outputs of training rows ``sl`` at ``theta`` and the linear map ``v -> J v`` of their Jacobian
        (:func:`torch.func.linearize`): the forward pass is done once and its intermediates are kept, so that
        each later Gauss-Newton product of the chunk (:meth:`gnvp_linearized`) only runs the tangent pass and its
        transpose. ``n``: the number of rows the data term averages over (all training rows by default)."""
        n = self.n if n is None else n
        Xc = self.X[sl]
        with warnings.catch_warnings():  # linearize traces with torch.fx, which warns about its own internals
            warnings.simplefilter("ignore")
            outputs, jvp_fn = linearize(lambda t: self.forward(t, Xc), theta.detach())
            # the traced tangent pass folds its constants on its first call: here, outside any transform, so that the
            # kept constants are plain tensors (folded under a later vjp they would be that transform's wrappers)
            jvp_fn(torch.zeros_like(theta))
        return LinearizedChunk(outputs.detach(), jvp_fn, self.y[sl], (sl.stop - sl.start) / n)

    def gnvp_linearized(self, chunk: LinearizedChunk, Vm: Tensor) -> Tensor:
        """The chunk's term of :meth:`gnvp` (no weight decay), ``[p, k]`` for ``Vm`` ``[p, k]``:
        ``scale * J^T H_out J v`` per column, ``J v`` by the kept linear map and ``J^T u`` by reverse-mode through
        it (the transpose of a linear map is its pullback). Columns one at a time for convolutional models
        (vmap turns the convolutions' tangent and transposed passes into grouped convolutions, about 2x slower on
        the CPU for the LeNet of ``benchmarks/scale.py``), batched by vmap otherwise."""

        def product(reverse: bool) -> Tensor:
            h_out = self._h_out(chunk.outputs, chunk.y, chunk.scale, reverse)

            def gv(v: Tensor) -> Tensor:
                jv, transpose = vjp(chunk.jvp_fn, v)
                return transpose(h_out(jv))[0]

            if any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
                return torch.stack([gv(Vm[:, j]) for j in range(Vm.shape[1])], dim=1)
            return vmap(gv, in_dims=1, out_dims=1)(Vm)

        return self._with_h_out(product)

    def hessian(self, theta: Tensor, block_size: int | None = None) -> Tensor:
        """Dense Hessian ``[p, p]`` of ``J`` at ``theta``, assembled layer by layer (:meth:`dense_hessian`).

        Each gradient graph is built once and reused for every block (unless ``chunk_size`` is set, in which
        case each block rebuilds it chunk by chunk so that memory stays that of one chunk).
        """
        block_size = HVP_BLOCK if block_size is None else block_size
        return self.dense_hessian(theta, block_size=block_size, keep_graphs=self.chunk_size is None)

    # --- the dense Hessian, layer by layer -----------------------------------------------------
    def parameter_groups(self) -> tuple[tuple[tuple[str, ...], float], ...]:
        """The selected parameters grouped by the module that holds them, in the order the modules first run in a
        forward pass, each group with the estimated cost of a Hessian-vector product on its downstream graph
        (:meth:`dense_hessian`) relative to one on the whole graph.

        The cost is estimated from one forward pass on one training row: the number of output elements of the leaf
        modules that run from the group's module on, over that of all of them, plus a fixed 1/16 of a whole product
        for each call. Parameters that no module's forward hook sees (used outside any module) form the first group.
        Found once and kept.
        """
        if getattr(self, "_groups", None) is not None:
            return self._groups
        owner = {}
        for m_name, m in self.model.named_modules():
            for p_name, _ in m.named_parameters(prefix=m_name, recurse=False):
                if p_name in self.spec.names:
                    owner.setdefault(id(m), []).append(p_name)
        start: dict[int, int] = {}
        sizes: list[int] = []

        def pre(mod: nn.Module, args: tuple) -> None:
            start.setdefault(id(mod), len(sizes))

        def post(mod: nn.Module, args: tuple, out: object) -> None:
            sizes.append(out.numel() if isinstance(out, Tensor) else 0)

        hooks = []
        for m in self.model.modules():
            if id(m) in owner:
                hooks.append(m.register_forward_pre_hook(pre))
            if next(m.children(), None) is None:
                hooks.append(m.register_forward_hook(post))
        try:
            with torch.no_grad():
                self.forward(self.theta(), self.X[:1])
        finally:
            for h in hooks:
                h.remove()
        seen = sorted(start, key=start.get)
        named = {n for m_id in seen for n in owner[m_id]}
        unseen = tuple(n for n in self.spec.names if n not in named)
        total = float(sum(sizes)) or 1.0
        overhead = total / 16

        def cost(first_call: int) -> float:
            return (sum(sizes[first_call:]) + overhead) / (total + overhead)

        groups = ([(unseen, 1.0)] if unseen else []) + [(tuple(owner[m_id]), cost(start[m_id])) for m_id in seen]
        self._groups = tuple(groups)
        return self._groups

    def assembly_cost(self) -> float:
        """The cost of :meth:`dense_hessian` estimated in Hessian-vector products on the whole graph (``p`` without
        layer-by-layer assembly): the sum over :meth:`parameter_groups` of their sizes times their costs."""
        if self.p <= ONE_BLOCK_MAX_P:
            return float(self.p)
        numel = dict(zip(self.spec.names, self.spec.numels, strict=True))
        return sum(sum(numel[n] for n in names) * c for names, c in self.parameter_groups())

    def _mlp_plan(self) -> list[tuple] | None:
        """The plan of :func:`~influence_lib.mlp_hessian.mlp_plan` for this objective (computed once), or None."""
        if not hasattr(self, "_mlp"):
            plan = mlp_plan(self.model, self.spec.names, self.loss_fn)
            flattened = plan is not None and any(step[0] == "flatten" for step in plan)
            self._mlp = plan if plan is not None and (flattened or self.X.dim() == 2) else None
        return self._mlp

    def dense_hessian(
        self,
        theta: Tensor,
        rows: Tensor | None = None,
        *,
        block_size: int = HVP_BLOCK,
        keep_graphs: bool = True,
        apply_all: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """The dense Hessian ``[p, p]`` of ``J`` at ``theta`` (over all training rows, or over ``rows``), assembled
        layer by layer from Hessian-vector products with unit vectors (in blocks of ``block_size``).

        With the parameters in groups ``S_1, ..., S_m`` by the order their modules run (:meth:`parameter_groups`),
        the columns of group ``S_g`` are needed only in the rows of ``T_g = S_g u ... u S_m``: the others follow from
        the symmetry of ``H``. ``H[T_g, S_g]`` is a block of the Hessian of ``J`` as a function of ``T_g`` alone,
        the parameters of earlier layers held fixed (:meth:`hvp_operator` with ``params``), and its gradient graph is
        the part of the network downstream of ``S_g``. This is the Hessian of ``J`` whatever the order; the order
        only decides the cost: for a CNN of 640 parameters the columns of its last convolution cost 0.16 and those of
        its classifier 0.02 of a product on the whole graph. ``apply_all``: the products on the whole graph, if the
        caller has them already. Models of at most :data:`ONE_BLOCK_MAX_P` parameters are assembled in one batched
        product over all columns (nothing to save there). A plain MLP under ``F.cross_entropy`` with every parameter
        selected takes neither: its Hessian comes from the hand-derived pass of :mod:`influence_lib.mlp_hessian`.
        """
        check_positive_int("block_size", block_size)
        p = self.p
        plan = self._mlp_plan()
        if plan is not None:  # a plain MLP under cross-entropy: by the hand-derived pass of influence_lib.mlp_hessian
            X, y = (self.X, self.y) if rows is None else (self.X[rows], self.y[rows])
            H = mlp_data_hessian(plan, theta.detach(), X, y)
            H.diagonal().add_(self.weight_decay)
            return H
        groups = [names for names, _ in self.parameter_groups()] if p > ONE_BLOCK_MAX_P else [self.spec.names]
        if len(groups) == 1:
            apply = apply_all or self.hvp_operator(theta, rows, keep_graphs=keep_graphs)
            return dense_from_products(apply, theta, p, block_size)
        H = theta.new_empty(p, p)
        for g, names in enumerate(groups):
            later = [m for grp in groups[g:] for m in grp]
            rows_idx, ordered = self._subset(later)
            if g == 0 and apply_all is not None:
                apply = apply_all
            else:
                apply = self.hvp_operator(theta, rows, keep_graphs=keep_graphs, params=ordered)
            own = set(names)
            local, start = [], 0  # positions of the group's columns inside T_g
            for m in ordered:
                numel = self.spec.numels[self.spec.names.index(m)]
                if m in own:
                    local.append(torch.arange(start, start + numel))
                start += numel
            local = torch.cat(local).to(theta.device)
            rows_at = _as_slice(rows_idx)  # T_g is a range of theta when the groups come in the selected order
            n_own = local.numel()
            own_first = bool((local == torch.arange(n_own, device=local.device)).all())  # S_g leads T_g
            for b in range(0, local.numel(), block_size):
                cols = local[b:b + block_size]
                E = theta.new_zeros(rows_idx.numel(), cols.numel())
                E[cols, torch.arange(cols.numel(), device=theta.device)] = 1
                block = apply(E)  # H[T_g, cols]
                cols_at = _as_slice(rows_idx[cols])
                if rows_at is not None and cols_at is not None and own_first:  # slices: plain copies
                    H[rows_at, cols_at] = block
                    # the transpose fills the group's rows against the later groups (its own block is written above)
                    H[cols_at, rows_at.start + n_own:rows_at.stop] = block[n_own:].T
                else:
                    H[rows_idx.unsqueeze(1), rows_idx[cols]] = block
                    H[rows_idx[cols].unsqueeze(1), rows_idx] = block.T
            del apply
        return H


def _as_slice(idx: Tensor) -> slice | None:
    """``slice(a, b)`` if the 1-D index tensor ``idx`` is ``a, a + 1, ..., b - 1``, else ``None``."""
    if idx.numel() == 0:
        return None
    a = int(idx[0])
    b = a + idx.numel()
    return slice(a, b) if int(idx[-1]) == b - 1 and bool((idx.diff() == 1).all()) else None


def _conv_by_matmul(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``nn.Conv2d`` (``groups=1``, zero padding) as ``weight.reshape(out, -1) @ unfold(x)`` (see
    :meth:`Objective.convolutions_as_matmul`); bound to a module as its ``_conv_forward``."""
    if x.dim() != 4:  # an unbatched [C, H, W] input: PyTorch's own convolution
        return nn.Conv2d._conv_forward(conv, x, weight, bias)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    b, _, H, W = x.shape
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))  # [b, C*kh*kw, Ho*Wo]
    # one batched product with the weight expanded over the batch (a view): 3-8x faster than broadcasting matmul,
    # which copies the transposed patches
    out = torch.bmm(weight.reshape(1, weight.shape[0], -1).expand(b, -1, -1), cols)
    if bias is not None:
        out = out + bias.unsqueeze(1)
    return out.view(b, weight.shape[0], Ho, Wo)
