"""Adapter for dattri (PyPI ``dattri``, tested with 0.3.0).

dattri API used
---------------
* ``dattri.task.AttributionTask(loss_func, model, checkpoints)`` with
  ``loss_func(params, data)`` in torch.func style (params = dict, data = (x, y)).
  Per-sample gradients come from ``vmap(grad(loss_func))`` over dim 1 of
  ``data.unsqueeze(0)``, so the loss sees each sample as a batch of one.
* ``dattri.algorithm.influence_function``:
    IFAttributorExplicit(task, regularization)            -> "exact"
    IFAttributorCG(task, max_iter, tol, regularization)   -> "cg"
    IFAttributorLiSSA(task, batch_size, num_repeat, recursion_depth, damping, scaling) -> "lissa"
    IFAttributorArnoldi(task, proj_dim, max_iter, regularization, ...)  -> "arnoldi"
    IFAttributorEKFAC(task, damping)                      -> "ekfac"
  ``attributor.cache(full_train_loader)``; ``attributor.attribute(train_loader,
  test_loader)`` returns a [n_train, n_test] tensor.
* ``dattri.func.hessian.hvp(func, regularization)`` for Hessian-vector products.
* ``dattri.model_util.retrain.retrain_loo`` + ``dattri.metric.ground_truth`` for LOO.

Sign / scale conversion (derived from the source and confirmed by selfcheck.py)
--------------------------------------------------------------------------------
dattri's IF attributors return  g_i^T (H_mean + reg I)^{-1} g_test  where H_mean is
the Hessian of the MEAN training loss over the (single) full-train batch given to
``cache``; there is no 1/n and the sign is already "positive = removing i raises
test loss".  Ours = attribute(...).T / n.

Weight decay: dattri's loss_func feeds both the Hessian and the per-sample train
gradients, so putting wd/2||θ||² into it would wrongly add wd·θ to every g_i.
Instead we fold it into the regulariser:  H_total + λI = H_data + (wd + λ) I
(exactly equivalent).  For LiSSA dattri iterates
    h <- v + (1 - damping) h - H h / scaling,  result h / scaling
whose fixed point is (H + scaling*damping I)^{-1} v, so we pass
damping = (λ + wd) / scaling.  EK-FAC adds ``damping`` to the corrected
eigenvalues of the (empirical-Fisher) EK-FAC of the mean loss, so damping = λ + wd.

Gotchas found while wiring it up
--------------------------------
* The explicit/CG attributors loop over the batches of the cached full-train
  loader and SUM the per-batch inverse-HVPs — only a single full batch gives the
  right answer, so we always cache a loader with batch_size = n.
* ``attribute`` allocates its output with ``torch.zeros`` (global default dtype)
  and Arnoldi draws its start vector with ``torch.rand``; we run everything under
  ``torch.set_default_dtype(model dtype)`` to keep float64 end to end.
* LiSSA's collate_fn casts every data tensor with ``.float()`` (labels included),
  so our loss_func casts inputs back to the model dtype and labels back to their
  original dtype.
* ``calculate_loo_ground_truth`` calls ``torch.load`` without ``weights_only=False``
  and fails on torch>=2.6 for the pickled full modules that ``retrain_loo`` saves,
  so ``loo_retrain`` reloads the checkpoints itself.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from . import _common as C

try:
    import dattri  # noqa: F401
    from dattri.algorithm.influence_function import (
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorEKFAC,
        IFAttributorExplicit,
        IFAttributorLiSSA,
    )
    from dattri.func.hessian import hvp as _dattri_hvp
    from dattri.model_util.retrain import retrain_loo as _dattri_retrain_loo
    from dattri.task import AttributionTask

    AVAILABLE = True
except Exception:  # pragma: no cover - import guard
    AVAILABLE = False

NAME = "dattri"
_METHODS = ("exact", "cg", "lissa", "arnoldi", "ekfac")


def methods() -> list[str]:
    return list(_METHODS) if AVAILABLE else []


def _task(model: nn.Module, loss_fn: Callable, label_dtype: torch.dtype) -> AttributionTask:
    dtype = C.model_dtype(model)

    def loss_func(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x.to(dtype),))
        return loss_fn(out, y.to(label_dtype))

    return AttributionTask(loss_func=loss_func, model=model,
                           checkpoints=model.state_dict())


def _loader(data, batch_size=None):
    x, y = data
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or x.shape[0], shuffle=False)


def scores(method: str, model: nn.Module, loss_fn: Callable, train, test, *,
           damping: float, weight_decay: float = 0.0,
           cg_iters: int = 200, cg_tol: float = 1e-10,
           lissa_depth: int = 1000, lissa_scale: float = 10.0, lissa_repeats: int = 1,
           lissa_batch_size: int | None = None,
           arnoldi_rank: int = 20, arnoldi_iters: int = 60,
           train_batch_size: int | None = None, seed: int = 0, **_ignored) -> Tensor:
    """[n_test, n_train] scores in our convention (see module docstring)."""
    C.check_method(method, methods())
    n = train[0].shape[0]
    reg = damping + weight_decay          # weight decay folded into the damping
    dtype = C.model_dtype(model)
    model.eval()
    task = _task(model, loss_fn, train[1].dtype)
    torch.manual_seed(seed)
    if method == "exact":
        attr = IFAttributorExplicit(task, regularization=reg)
    elif method == "cg":
        attr = IFAttributorCG(task, max_iter=cg_iters, tol=cg_tol, regularization=reg)
    elif method == "lissa":
        attr = IFAttributorLiSSA(task, batch_size=lissa_batch_size or n,
                                 num_repeat=lissa_repeats, recursion_depth=lissa_depth,
                                 damping=reg / lissa_scale, scaling=lissa_scale)
    elif method == "arnoldi":
        attr = IFAttributorArnoldi(task, proj_dim=arnoldi_rank, max_iter=arnoldi_iters,
                                   regularization=reg, seed=seed)
    else:  # ekfac
        attr = IFAttributorEKFAC(task, damping=reg)
    with C.default_dtype(dtype):
        attr.cache(_loader(train))  # one full batch (see gotchas)
        out = attr.attribute(_loader(train, train_batch_size), _loader(test))
    return out.T.detach().to(dtype) / n


def hvp(model: nn.Module, loss_fn: Callable, train, v: Tensor, weight_decay: float = 0.0) -> Tensor:
    """(∇² [mean loss] + wd I) v via dattri.func.hessian.hvp (regularization = wd
    adds exactly wd*v, i.e. the Hessian of wd/2||θ||²)."""
    like = C.named_params(model)
    x, y = train

    def f(theta):
        return loss_fn(torch.func.functional_call(model, C.unflatten(theta, like), (x,)), y)

    return _dattri_hvp(f, regularization=weight_decay)((C.flat_params(model),), v).detach()


def loo_retrain(train_func: Callable[..., nn.Module], loss_fn: Callable, train, test,
                base_model: nn.Module, *, indices: Sequence[int] | None = None,
                seed: int | None = 0, path: str | None = None, **train_kwargs) -> Tensor:
    """Leave-one-out ground truth through dattri's retraining utility.

    ``dattri.model_util.retrain.retrain_loo(train_func, dataloader, path, indices, seed)``
    calls ``train_func(loader_without_i, seed=seed, **kwargs)`` once per removed index
    (the loader keeps the original batch size, unshuffled; it re-seeds torch once
    at the start, not per run), and ``torch.save``s each returned *module* under
    ``path/index_{i}/model_weights.pt`` plus a ``metadata.yml``.  It does not
    evaluate anything; we then reload every model (weights_only=False) and return
    ``[n_test, len(indices)]`` = test loss of the retrained model minus test loss of
    ``base_model`` — i.e. the actual quantity our scores predict.
    ``train_func`` must accept ``(dataloader, seed=None, **train_kwargs)``.
    """
    n = train[0].shape[0]
    indices = list(range(n)) if indices is None else list(indices)
    tmp = tempfile.TemporaryDirectory() if path is None else None
    root = Path(tmp.name if tmp else path)
    try:
        _dattri_retrain_loo(train_func, _loader(train), str(root), indices=indices,
                            seed=seed, **train_kwargs)
        x, y = test

        def losses(m):
            m.eval()
            with torch.no_grad():
                out = m(x)
                return torch.stack([loss_fn(out[j:j + 1], y[j:j + 1]) for j in range(len(y))])

        base = losses(base_model)
        cols = []
        for i in indices:
            m = torch.load(root / f"index_{i}" / "model_weights.pt", weights_only=False)
            cols.append(losses(m) - base)
        return torch.stack(cols, dim=1)
    finally:
        if tmp is not None:
            tmp.cleanup()
