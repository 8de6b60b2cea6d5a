"""Adapter for kronfluence (PyPI ``kronfluence``, tested with 1.0.1).

kronfluence only implements Kronecker-factored curvature: strategies
"identity", "diagonal", "kfac", "ekfac" on nn.Linear / nn.Conv2d modules
(all parameters of other module types are ignored). Here: "ekfac" and "kfac".
No explicit Hessian, HVP, CG, LiSSA or Arnoldi -> ``hvp`` is not provided and
the other methods raise NotImplementedError.

kronfluence API used
--------------------
* subclass ``kronfluence.Task``: ``compute_train_loss(batch, model, sample)`` and
  ``compute_measurement(batch, model)`` must return the SUM over the batch
  (per-sample gradients are read off the summed-loss backward pass with module
  hooks). We return ``loss_fn(out, y) * batch_size``. ``sample=True`` (true
  Fisher) draws labels from the model's softmax; only implemented for
  cross-entropy (otherwise pass ``fisher="empirical"``).
* ``prepare_model(model, task)`` wraps Linear/Conv2d in TrackedModules *in place*
  and freezes parameters -> we work on a deepcopy.
* ``Analyzer(name, model, task, cpu=True, output_dir=tmp)``;
  ``fit_all_factors(factors_name, dataset, per_device_batch_size, factor_args)``;
  ``compute_pairwise_scores(scores_name, factors_name, query_dataset, train_dataset,
  per_device_query_batch_size, per_device_train_batch_size, score_args)``;
  ``load_pairwise_scores(name)["all_modules"]`` -> [n_query, n_train].
  Everything goes through files on disk (safetensors) even for tiny problems.
* All covariance / eigendecomposition / lambda / gradient / score dtypes are
  separate arguments defaulting to float32; we set them all to the model dtype.

Sign / scale conversion (confirmed by selfcheck.py)
---------------------------------------------------
Covariances and eigenvalue corrections are averaged over examples, i.e. EK-FAC
approximates the Fisher/GGN of the MEAN loss; ``damping_factor`` is added to the
(corrected) eigenvalues. The pairwise score is  g_test^T (F + λI)^{-1} g_train,
with "positive = helpful" meaning removing the train point raises the test loss,
which is our sign. No 1/n -> ours = score / n.
Weight decay cannot be put into kronfluence's curvature; since
H_total + λI = H_data + (wd + λ) I we pass damping_factor = λ + wd (exact for the
wd part; the data part is of course only EK-FAC-approximate). Note that
``damping_factor=None`` means a heuristic 0.1 * mean eigenvalue, not zero.
"""
from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from . import _common as C

try:
    import kronfluence  # noqa: F401
    from kronfluence import Analyzer, FactorArguments, ScoreArguments, Task, prepare_model

    AVAILABLE = True
except Exception:  # pragma: no cover
    AVAILABLE = False

NAME = "kronfluence"
_METHODS = ("ekfac", "kfac")


def methods() -> list[str]:
    return list(_METHODS) if AVAILABLE else []


def _make_task(loss_fn: Callable, label_dtype: torch.dtype):
    ce = C.loss_kind(loss_fn) == "ce"

    class _T(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            out = model(x)
            if sample:
                if not ce:
                    raise NotImplementedError("true-Fisher sampling only for cross-entropy; "
                                              "use fisher='empirical'")
                with torch.no_grad():
                    y = torch.distributions.Categorical(logits=out.detach()).sample()
            return loss_fn(out, y.to(label_dtype)) * x.shape[0]  # SUM over the batch

        def compute_measurement(self, batch, model):
            x, y = batch
            return loss_fn(model(x), y.to(label_dtype)) * x.shape[0]

    return _T()


def scores(method: str, model: nn.Module, loss_fn: Callable, train, test, *,
           damping: float, weight_decay: float = 0.0, fisher: str = "true",
           train_batch_size: int | None = None, seed: int = 0, **_ignored) -> Tensor:
    C.check_method(method, methods())
    n, m = train[0].shape[0], test[0].shape[0]
    dtype = C.model_dtype(model)
    task = _make_task(loss_fn, train[1].dtype)
    torch.manual_seed(seed)  # true-Fisher label sampling is random
    kmodel = prepare_model(copy.deepcopy(model).eval(), task)
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as out_dir:
        an = Analyzer("anchor", kmodel, task, cpu=True, output_dir=out_dir,
                      disable_tqdm=True, log_level=logging.WARNING)
        fargs = FactorArguments(strategy=method, use_empirical_fisher=(fisher == "empirical"),
                                activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
                                eigendecomposition_dtype=torch.float64,
                                per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
        sargs = ScoreArguments(damping_factor=damping + weight_decay,  # wd folded in
                               per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
                               score_dtype=dtype, query_gradient_svd_dtype=torch.float64)
        tr_ds, te_ds = TensorDataset(*train), TensorDataset(*test)
        an.fit_all_factors("f", dataset=tr_ds, per_device_batch_size=train_batch_size or n,
                           factor_args=fargs, overwrite_output_dir=True)
        an.compute_pairwise_scores("s", factors_name="f", query_dataset=te_ds,
                                   train_dataset=tr_ds, per_device_query_batch_size=m,
                                   per_device_train_batch_size=train_batch_size or n,
                                   score_args=sargs, overwrite_output_dir=True)
        s = an.load_pairwise_scores("s")["all_modules"].clone()
    return s.to(dtype) / n
