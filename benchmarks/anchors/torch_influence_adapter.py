"""Adapter for torch-influence (import name ``torch_influence``).

STATUS: torch-influence is NOT on PyPI (``pip install torch-influence`` -> "No
matching distribution"; the PyPI JSON API returns 404). It is only installable
from its GitHub repository, which this machine cannot reach, so ``AVAILABLE``
is False here and this adapter has NOT been run. It is written against the
public API of torch_influence 0.x (base.py / modules.py): where it can be
installed, ``selfcheck.py`` will exercise it automatically.

torch-influence API used
------------------------
* subclass ``torch_influence.BaseObjective`` with ``train_outputs(model, batch)``,
  ``train_loss_on_outputs(outputs, batch)`` (MEAN loss), ``train_regularization(params)``
  (params = flat vector) and ``test_loss(model, params, batch)`` (MEAN loss).
  ``train_loss = train_loss_on_outputs + train_regularization`` is used both for the
  Hessian AND for the per-training-point gradients.
* modules (all take model, objective, train_loader, test_loader, device, damp):
    AutogradInfluenceModule(..., damp)            -> "exact" (dense Hessian, torch.inverse)
    CGInfluenceModule(..., damp, gnh=False, **scipy_cg_kwargs) -> "cg" (scipy.sparse.linalg.cg
        on numpy copies; kwargs maxiter / rtol (scipy>=1.12 name) / atol)
    LiSSAInfluenceModule(..., damp, repeat, depth, scale) -> "lissa"; batches of
        ``train_loader.batch_size`` sampled with replacement; update
        h <- v + h - (H_batch h + damp h)/scale, result h/scale  => (H + damp I)^{-1} v.
  No Arnoldi / EK-FAC.
* ``module.influences(train_idxs, test_idxs)`` -> 1-D tensor over train_idxs for the
  MEAN test loss over test_idxs, computed as  g_z^T (H + damp I)^{-1} g_test / n
  where n = len(train_loader.dataset). Documented meaning: estimate of
  L_test(after removing z and retraining) - L_test(now). This is exactly our sign
  and scale, so no conversion other than calling it once per test point
  (``stest`` is per call; we reuse it through the ``stest=`` argument).

Weight decay: since ``train_regularization`` would also add wd·θ to every
per-sample gradient g_z (our convention excludes it), we set it to 0 and fold
weight decay into ``damp`` = λ + wd (exactly equivalent for H). The "exact"
module's ``model.eval()`` / functional re-insertion of parameters mutates the model
in place (parameters re-registered), so we pass a deepcopy.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from . import _common as C

try:
    import torch_influence  # noqa: F401
    from torch_influence import (
        AutogradInfluenceModule,
        BaseObjective,
        CGInfluenceModule,
        LiSSAInfluenceModule,
    )

    AVAILABLE = True
except Exception:
    AVAILABLE = False

NAME = "torch-influence"
_METHODS = ("exact", "cg", "lissa")


def methods() -> list[str]:
    return list(_METHODS) if AVAILABLE else []


def _objective(loss_fn: Callable):
    class _Obj(BaseObjective):
        def train_outputs(self, model, batch):
            return model(batch[0])

        def train_loss_on_outputs(self, outputs, batch):
            return loss_fn(outputs, batch[1])

        def train_regularization(self, params):
            return params.sum() * 0.0  # wd folded into damp (see module docstring)

        def test_loss(self, model, params, batch):
            return loss_fn(model(batch[0]), batch[1])

    return _Obj()


def scores(method: str, model: nn.Module, loss_fn: Callable, train, test, *,
           damping: float, weight_decay: float = 0.0,
           cg_iters: int = 200, cg_tol: float = 1e-10,
           lissa_depth: int = 1000, lissa_scale: float = 10.0, lissa_repeats: int = 1,
           lissa_batch_size: int | None = None, seed: int = 0, **_ignored) -> Tensor:
    C.check_method(method, methods())
    n, m = train[0].shape[0], test[0].shape[0]
    damp = damping + weight_decay
    bs = lissa_batch_size if method == "lissa" and lissa_batch_size else n
    tr_loader = DataLoader(TensorDataset(*train), batch_size=bs, shuffle=False)
    te_loader = DataLoader(TensorDataset(*test), batch_size=m, shuffle=False)
    common = dict(model=copy.deepcopy(model), objective=_objective(loss_fn),
                  train_loader=tr_loader, test_loader=te_loader,
                  device=train[0].device, damp=damp)
    torch.manual_seed(seed)
    if method == "exact":
        mod = AutogradInfluenceModule(**common)
    elif method == "cg":
        mod = CGInfluenceModule(**common, maxiter=cg_iters, rtol=cg_tol, atol=0.0)
    else:
        mod = LiSSAInfluenceModule(**common, repeat=lissa_repeats, depth=lissa_depth,
                                   scale=lissa_scale)
    rows = []
    for t in range(m):
        rows.append(mod.influences(list(range(n)), [t]))  # already (1/n) g_t^T A^{-1} g_i
    return torch.stack(rows).to(C.model_dtype(model))
