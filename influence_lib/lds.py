"""The linear datamodeling score (LDS) of Park et al. (2023, "TRAK"): attribution scores judged on groups.

The paper this project reproduces judges influence scores by *single* removals (leave-one-out). The LDS asks a
different question: do the scores, *added up*, predict what happens when a large random part of the training
set is removed? For a test point ``z_t`` and random subsets ``S_1..S_K`` of the training set (each of size
``m = round(alpha * n)``):

* the **actual** outcome of subset ``S_k`` is the test loss ``L(z_t, theta_{S_k})`` of a model retrained on
  ``S_k`` only (:func:`subset_retrain`);
* the **predicted** outcome is the additive model of the scores. With the project's sign convention, a score
  ``tau_ti`` is the predicted change of ``L(z_t, .)`` when training point ``i`` is *removed* (``1/n`` included,
  positive = the point helped), so training on ``S_k`` means removing its complement ``R_k = {1..n} \\ S_k`` and

      predicted_tk = sum_{i not in S_k} tau_ti                                          (group_predictions)

  is the predicted change ``L(z_t, theta_{S_k}) - L(z_t, theta*)`` (first order: effects of removals add up);
* ``LDS_t = Spearman_k(predicted_tk, actual_tk)``, the rank correlation *across the K subsets* (:func:`lds`).

Because ``sum_{i not in S} tau_ti = sum_i tau_ti - sum_{i in S} tau_ti`` and all subsets have the same size, this
is the TRAK definition (Spearman between ``sum_{i in S} tau'_ti`` and the model output ``f(z_t, theta_S)``) with
``tau' = tau`` and ``f = -loss``: a point that helped (positive score) lowers the loss when it is kept. Ranks
ignore any constant offset and any positive scale, so ``actual`` may be the test loss or its change against a
reference model, and the ``1/n`` does not matter. ``LDS_t`` is undefined (NaN, counted, never averaged) when
either vector is constant across the subsets; ties get average ranks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from .metrics import ranks
from .objective import LossFn, Objective
from .retrain import TrainConfig, fit_stacked, initial_params, test_losses_of
from .validation import check_choice, check_positive_int

ArrayLike = Tensor | np.ndarray | Sequence[Any]


# --------------------------------------------------------------------------- #
# input checks
# --------------------------------------------------------------------------- #
def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) \
            or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in the open interval (0, 1) (the kept fraction), got {alpha!r}")
    return float(alpha)


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _as_float_matrix(name: str, x: ArrayLike) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite values")
    return a


def _as_masks(masks: ArrayLike, n: int | None = None, name: str = "masks") -> np.ndarray:
    """Boolean ``[S, n]`` from a bool or 0/1 array; checks the width and that no subset is empty."""
    m = np.asarray(masks.detach().cpu() if isinstance(masks, Tensor) else masks)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D boolean array [n_subsets, n_train], got shape {m.shape}")
    if m.dtype != np.bool_:
        if not np.isin(m, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1): True = the training point is kept")
        m = m.astype(bool)
    if n is not None and m.shape[1] != n:
        raise ValueError(f"{name} must have one column per training point ({n}), got {m.shape[1]}")
    if m.shape[0] == 0:
        raise ValueError(f"{name} must contain at least one subset")
    empty = np.flatnonzero(~m.any(axis=1))
    if empty.size:
        raise ValueError(f"{name}: subset(s) {empty[:5].tolist()} keep no training point")
    return m


# --------------------------------------------------------------------------- #
# (a) random subsets
# --------------------------------------------------------------------------- #
def subset_size(n: int, alpha: float) -> int:
    """``round(alpha * n)`` (Python's ``round``: halves go to the even integer); must lie in ``[1, n - 1]``."""
    check_positive_int("n", n)
    alpha = _check_alpha(alpha)
    m = round(alpha * n)
    if not 1 <= m <= n - 1:
        raise ValueError(f"alpha: round(alpha * n) = round({alpha:g} * {n}) = {m}, but a subset must keep between 1 "
                         f"and n - 1 = {n - 1} points; choose alpha in [1/n, 1 - 1/n] = [{1 / n:.3g}, {1 - 1 / n:.3g}]")
    return m


def sample_subsets(n: int, alpha: float, n_subsets: int, seed: int = 0) -> Tensor:
    """``n_subsets`` random subsets of ``range(n)``, each of exactly ``round(alpha * n)`` points: bool ``[S, n]``.

    Row ``k`` is True where training point ``i`` is *kept* in subset ``k``. Each row is an independent uniformly
    random subset of that size (without replacement), drawn from a private generator seeded with ``seed``: the
    same arguments give the same masks, and the global RNG is untouched.
    """
    m = subset_size(n, alpha)
    check_positive_int("n_subsets", n_subsets)
    _check_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    keys = torch.rand(n_subsets, n, generator=gen, dtype=torch.float64)
    keep = keys.argsort(dim=1)[:, :m]
    masks = torch.zeros(n_subsets, n, dtype=torch.bool)
    masks.scatter_(1, keep, True)
    return masks


# --------------------------------------------------------------------------- #
# (b) retraining on subsets
# --------------------------------------------------------------------------- #
@dataclass
class SubsetRetrainResult:
    """Models retrained on subsets of the training data.

    ``masks`` ``[S, n]`` (True = kept); ``theta`` ``[S, p]``; ``test_losses`` ``[S, m]`` (per-example test loss of
    every subset model); ``ref_theta`` ``[p]`` and ``ref_losses`` ``[m]``: the full-data model trained with exactly
    the same start, optimiser, steps and batches (so that optimiser drift cancels in ``loss_change``);
    ``grad_norms`` ``[S]``: norm of the gradient of each subset model's own objective at its final parameters
    (small = that objective was minimised), ``ref_grad_norm`` the same for the reference.
    """

    masks: Tensor
    theta: Tensor
    test_losses: Tensor
    ref_theta: Tensor
    ref_losses: Tensor
    grad_norms: Tensor
    ref_grad_norm: float
    config: dict[str, Any]

    @property
    def loss_change(self) -> Tensor:
        """``L(z_t, theta_S) - L(z_t, theta_ref)``: ``[S, m]``."""
        return self.test_losses - self.ref_losses.unsqueeze(0)


def _objective_grad_norms(obj: Objective, Theta: Tensor, W: Tensor, normalization: str, chunk: int = 16) -> Tensor:
    """``||grad J_b(theta_b)||`` of each model's own weighted objective ``J_b`` (see :mod:`influence_lib.retrain`)."""
    X, y, wd = obj.X, obj.y, obj.weight_decay

    def J(theta: Tensor, w: Tensor) -> Tensor:
        per = torch.func.vmap(obj.sample_loss, in_dims=(None, 0, 0))(theta, X, y)
        denom = w.sum() if normalization == "remaining" else w.new_tensor(float(w.shape[0]))
        return (w * per).sum() / denom + 0.5 * wd * theta.dot(theta)

    g = torch.func.vmap(torch.func.grad(J))
    return torch.cat([g(Theta[s:s + chunk], W[s:s + chunk]).norm(dim=1) for s in range(0, Theta.shape[0], chunk)])


def retrain_subsets(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    masks: ArrayLike,
    *,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    lr: float = 1e-3,
    steps: int = 1000,
    warm_start: bool = True,
    seed: int = 0,
    batch_size: int | None = None,
    momentum: float = 0.0,
    normalization: str = "remaining",
    chunk_size: int | None = None,
    progress: bool = True,
) -> SubsetRetrainResult:
    """Retrain one model per subset (row of ``masks``, True = kept), many models at once.

    Each model minimises ``sum_{i in S} L(z_i, theta) / |S| + (weight_decay/2) ||theta||^2`` (ordinary training
    on the subset; ``normalization="full"`` divides by ``n`` instead, see :mod:`influence_lib.retrain`). The
    models of a chunk of ``chunk_size`` subsets (default: all) are trained together by
    :func:`influence_lib.retrain.fit_stacked` with the masks as data weights; results do not depend on the
    chunk size. A progress bar counts optimiser steps over all chunks.

    ``warm_start=True`` (default): every model starts from the model's current parameters ``theta*``. This is the
    response influence functions linearise (the same start as the leave-one-out ground truth of the other
    chapters, Koh & Liang's protocol), and it keeps the retrained models in ``theta*``'s basin, so the measured
    differences between subsets come from the data and not from landing in different minima.
    ``warm_start=False``: every model (and the reference) starts from the *same* fresh initialisation drawn
    with ``seed`` — training from scratch, as TRAK does, which measures the behaviour of the whole training
    procedure (use the original training budget for ``steps``).

    The output function is the per-example **test loss** (``loss_fn`` on each test point), the quantity the
    influence scores predict.
    """
    check_choice("normalization", normalization, ("remaining", "full"))
    cfg = TrainConfig(optimizer=optimizer, lr=lr, steps=steps, batch_size=batch_size, seed=seed, momentum=momentum,
                      normalization=normalization)
    obj = Objective(model, loss_fn, *train, weight_decay=weight_decay)
    if batch_size is not None and batch_size > obj.n:
        raise ValueError(f"batch_size must be <= the number of training rows ({obj.n}), got {batch_size}")
    Xt, yt = obj.check_points("test", test)
    M = torch.as_tensor(_as_masks(masks, obj.n), device=obj.X.device)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    _check_seed(seed)
    theta_star = obj.theta()
    start = theta_star if warm_start else initial_params(model, seed).to(obj.X.device, theta_star.dtype)
    # the full-data reference goes first, in the first chunk
    W_all = torch.cat([torch.ones(1, obj.n, dtype=obj.X.dtype, device=obj.X.device), M.to(obj.X.dtype)])
    B = W_all.shape[0]
    chunk = B if chunk_size is None else chunk_size
    n_chunks = len(range(0, B, chunk))
    bar = tqdm(total=n_chunks * cfg.steps, desc=f"subset retraining ({B - 1} models)", disable=not progress,
               leave=False)
    thetas = []
    for s in range(0, B, chunk):
        W = W_all[s:s + chunk]
        theta0 = start.unsqueeze(0).expand(W.shape[0], -1)
        thetas.append(fit_stacked(obj, theta0, W, cfg, progress=bar))
    bar.close()
    Theta = torch.cat(thetas)
    losses = test_losses_of(obj, Theta, Xt, yt)
    gnorms = _objective_grad_norms(obj, Theta, W_all, normalization)
    config = {**cfg.to_dict(), "warm_start": warm_start, "weight_decay": weight_decay, "output": "test loss"}
    return SubsetRetrainResult(M.cpu(), Theta[1:], losses[1:], Theta[0], losses[0], gnorms[1:], float(gnorms[0]),
                               config)


def subset_retrain(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    masks: ArrayLike,
    *,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    lr: float = 1e-3,
    steps: int = 1000,
    warm_start: bool = True,
    seed: int = 0,
    **options: Any,
) -> Tensor:
    """Test loss of a model retrained on each subset: ``[S, n_test]``, row ``k`` for ``masks[k]``.

    ``L(z_t, theta_{S_k})`` for every test point ``z_t``; see :func:`retrain_subsets` for the objective, the
    warm start (default, from ``theta*``) or from-scratch start, and ``batch_size``, ``momentum``,
    ``normalization``, ``chunk_size``, ``progress``.
    """
    return retrain_subsets(model, loss_fn, train, test, masks, weight_decay=weight_decay, optimizer=optimizer, lr=lr,
                           steps=steps, warm_start=warm_start, seed=seed, **options).test_losses


# --------------------------------------------------------------------------- #
# (c) the score
# --------------------------------------------------------------------------- #
def group_predictions(scores: ArrayLike, masks: ArrayLike) -> np.ndarray:
    """The additive model: ``predicted[t, k] = sum_{i not in S_k} scores[t, i]``, shape ``[n_test, S]``.

    ``scores`` ``[n_test, n]``: predicted change of each test loss when each training point is removed (the
    project's sign, ``1/n`` included); ``masks`` ``[S, n]``, True = kept. The result is the predicted change
    ``L(z_t, theta_{S_k}) - L(z_t, theta*)`` of removing the complement of ``S_k``, to first order.
    """
    tau = _as_float_matrix("scores", scores)
    M = _as_masks(masks, tau.shape[1])
    return tau @ (~M).T.astype(np.float64)


@dataclass
class LDSResult:
    """Linear datamodeling scores of one set of attribution scores.

    ``per_test`` ``[n_test]``: ``LDS_t`` (NaN where undefined: a constant predicted or actual vector across the
    subsets); ``mean``: the mean over the *defined* values (NaN if none); ``n_undefined``: how many were left out
    (always report it with the mean); ``predicted`` ``[n_test, S]``: the group predictions.
    """

    per_test: np.ndarray
    mean: float
    n_defined: int
    n_undefined: int
    predicted: np.ndarray

    def summary(self) -> dict[str, Any]:
        """JSON-friendly: per-test values (None where undefined), mean and counts."""
        return {"mean": None if math.isnan(self.mean) else self.mean, "n_defined": self.n_defined,
                "n_undefined": self.n_undefined,
                "per_test": [None if math.isnan(v) else float(v) for v in self.per_test]}


def _spearman_or_nan(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    sa, sb = math.sqrt(float(ra @ ra)), math.sqrt(float(rb @ rb))
    if sa == 0 or sb == 0:
        return math.nan
    return float(np.clip((ra @ rb) / (sa * sb), -1.0, 1.0))


def lds(scores: ArrayLike, masks: ArrayLike, actual: ArrayLike) -> LDSResult:
    """Linear datamodeling score of ``scores`` against retrained models.

    Parameters
    ----------
    scores:
        ``[n_test, n]`` attribution scores in the project's convention: ``scores[t, i]`` is the predicted change
        of test point ``t``'s loss when training point ``i`` is removed (positive = it helped; ``1/n`` included).
    masks:
        ``[S, n]`` boolean, True where a training point is kept in subset ``k`` (e.g. :func:`sample_subsets`).
    actual:
        ``[S, n_test]``: the test loss of the model retrained on each subset (:func:`subset_retrain`), or its
        change against any fixed reference (ranks do not see a per-test-point offset).

    Returns
    -------
    :class:`LDSResult` with ``LDS_t = Spearman_k(predicted[t, k], actual[k, t])`` where
    ``predicted[t, k] = sum_{i not in S_k} scores[t, i]`` (:func:`group_predictions`): for a perfect additive
    model LDS is 1; scores of the wrong sign give -1; scores unrelated to the outcome give about 0.
    Ties get average ranks; a test point whose predicted or actual vector is constant across subsets gets NaN,
    is counted in ``n_undefined`` and left out of ``mean``.
    """
    tau = _as_float_matrix("scores", scores)
    M = _as_masks(masks, tau.shape[1])
    A = _as_float_matrix("actual", actual)
    if A.shape != (M.shape[0], tau.shape[0]):
        raise ValueError(f"actual must have shape [n_subsets, n_test] = [{M.shape[0]}, {tau.shape[0]}] (one row per "
                         f"subset of masks, one column per row of scores), got {list(A.shape)}")
    if M.shape[0] < 3:
        raise ValueError(f"masks: LDS is a rank correlation across subsets and needs at least 3, got {M.shape[0]}")
    pred = tau @ (~M).T.astype(np.float64)
    per = np.array([_spearman_or_nan(pred[t], A[:, t]) for t in range(tau.shape[0])])
    defined = ~np.isnan(per)
    mean = float(per[defined].mean()) if defined.any() else math.nan
    return LDSResult(per, mean, int(defined.sum()), int((~defined).sum()), pred)


#: The same function under a name that can be exported at package level without shadowing this module
#: (``from .lds import lds`` in ``influence_lib/__init__.py`` would replace the submodule attribute ``lds``).
linear_datamodeling_score = lds


__all__ = ["LDSResult", "SubsetRetrainResult", "group_predictions", "lds", "linear_datamodeling_score",
           "retrain_subsets", "sample_subsets", "subset_retrain", "subset_size"]
