"""Adapters that put existing influence libraries behind one interface.

Each adapter module (``dattri_adapter``, ``torch_influence_adapter``,
``curvlinops_adapter``, ``kronfluence_adapter``) exposes

    AVAILABLE: bool                     # the library imported
    methods() -> list[str]              # subset of exact, cg, lissa, arnoldi, ekfac (+ kfac)
    scores(method, model, loss_fn, train, test, *, damping, weight_decay=0.0, **opts)
        -> Tensor[n_test, n_train]
    hvp(model, loss_fn, train, v, weight_decay=0.0) -> Tensor[p]   # where offered
    (dattri only) loo_retrain(...)

Convention of ``scores`` (ours, whatever the library returns natively):
    score[t, i] = (1/n) g_t^T (H + damping I)^{-1} g_i
with H the Hessian of  mean_i loss(z_i) + (weight_decay/2) ||θ||²  at the given
(trained) parameters, g per-sample loss gradients WITHOUT the weight-decay term.
It is the predicted change of test loss t when training point i is REMOVED;
positive = removing the point increases the test loss. ``loss_fn(out, y)``
returns the batch mean loss (like ``F.cross_entropy``). Each adapter documents
how it maps its library's sign/scale/damping onto this.

Common options (ignored where meaningless):
    cg_iters, cg_tol                 conjugate gradients
    lissa_depth, lissa_scale, lissa_repeats, lissa_batch_size
    arnoldi_rank, arnoldi_iters
    seed

Install the libraries with ``pip install -r benchmarks/requirements-bench.txt``
in a separate environment; the self-check is ``python -m benchmarks.anchors.selfcheck``.
"""
from . import curvlinops_adapter, dattri_adapter, kronfluence_adapter, torch_influence_adapter

ADAPTERS = {
    "dattri": dattri_adapter,
    "torch-influence": torch_influence_adapter,
    "curvlinops": curvlinops_adapter,
    "kronfluence": kronfluence_adapter,
}

__all__ = ["ADAPTERS", "dattri_adapter", "torch_influence_adapter",
           "curvlinops_adapter", "kronfluence_adapter"]
