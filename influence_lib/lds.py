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
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .metrics import ranks
from .objective import LossFn, Objective, flat_params
from .retrain import TrainConfig, fit_stacked, initial_params, test_losses_of
from .validation import check_choice, check_data, check_positive_int

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
    Xt, yt = check_data("test", test, device=obj.X.device, dtype=obj.X.dtype)
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


# --------------------------------------------------------------------------- #
# a sweep runner: one model, several inverse-HVP methods, LDS at one or more alphas
# --------------------------------------------------------------------------- #
#: Settings of :func:`run_lds_setting`. The data/model/training/influence keys mean what they mean in
#: :data:`influence_lib.experiment.DEFAULTS` (same values -> the same trained model ``theta*`` as a record of the
#: other chapters); the ``retrain_*`` keys configure :func:`retrain_subsets`.
LDS_DEFAULTS: dict[str, Any] = {
    "runner": "lds",
    "dataset": "iris", "fallback": None, "data_seed": 0, "n_train": None, "n_test": None, "dtype": "float64",
    "model": "mlp", "depth": 1, "width": 5, "activation": "relu", "seed": 0,
    "weight_decay": 0.0, "optimizer": "adam", "lr": 0.01, "steps": 5000, "batch_size": None, "loss": "cross_entropy",
    "methods": ["exact", "cg", "lissa", "arnoldi", "ekfac"], "damping": 0.001, "params": "all",
    "method_options": {},
    "alphas": [0.5], "n_subsets": 100, "subset_seed": None,  # None: the setting's seed
    "retrain_optimizer": "adam", "retrain_lr": 0.001, "retrain_steps": 2000, "retrain_batch_size": None,
    "retrain_warm_start": True, "retrain_normalization": "remaining", "retrain_chunk_size": None,
    # the paper's single-removal metric on the same model, scores and retraining protocol: leave-one-out of
    # "all" training points, of a seeded random sample of this many, or None (skip)
    "loo_points": None, "loo_k": 25,
}
_SHARED = ("dataset", "fallback", "data_seed", "n_train", "n_test", "dtype", "model", "depth", "width", "activation",
           "seed", "weight_decay", "optimizer", "lr", "steps", "batch_size", "loss", "methods", "damping", "params",
           "method_options")


def normalize_lds_setting(setting: dict[str, Any]) -> dict[str, Any]:
    """Fill :data:`LDS_DEFAULTS`, reject unknown keys and bad values before any computation."""
    from .experiment import normalize_setting

    unknown = sorted(set(setting) - set(LDS_DEFAULTS))
    if unknown:
        raise ValueError(f"setting: unknown key(s) {unknown}; accepted: {sorted(LDS_DEFAULTS)}")
    s = {**LDS_DEFAULTS, **setting}
    check_choice("runner", s["runner"], ("lds",))
    base = normalize_setting({k: s[k] for k in _SHARED})
    s.update({k: base[k] for k in _SHARED})
    if isinstance(s["alphas"], numbers.Real):
        s["alphas"] = [s["alphas"]]
    if not s["alphas"]:
        raise ValueError("alphas must be a non-empty list of kept fractions in (0, 1)")
    s["alphas"] = [_check_alpha(a) for a in s["alphas"]]
    check_positive_int("n_subsets", s["n_subsets"])
    if s["n_subsets"] < 3:
        raise ValueError(f"n_subsets must be >= 3 (LDS is a rank correlation across subsets), got {s['n_subsets']}")
    if s["subset_seed"] is not None:
        _check_seed(s["subset_seed"])
    check_choice("retrain_normalization", s["retrain_normalization"], ("remaining", "full"))
    TrainConfig(optimizer=s["retrain_optimizer"], lr=s["retrain_lr"], steps=s["retrain_steps"],
                batch_size=s["retrain_batch_size"])
    if s["retrain_chunk_size"] is not None:
        check_positive_int("retrain_chunk_size", s["retrain_chunk_size"])
    if s["loo_points"] is not None and s["loo_points"] != "all":
        check_positive_int("loo_points", s["loo_points"])
        if s["loo_points"] < 3:
            raise ValueError(f"loo_points must be 'all', None or an integer >= 3, got {s['loo_points']!r}")
    check_positive_int("loo_k", s["loo_k"])
    return s


def _versions() -> dict[str, str]:
    import scipy

    from . import __version__

    return {"influence_lib": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": str(torch.get_num_threads())}


def _r(x: Any, digits: int = 8) -> list[float]:
    a = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64).ravel()
    if not np.isfinite(a).all():
        raise FloatingPointError("refusing to record non-finite values")
    return [float(f"{v:.{digits}g}") for v in a]


def run_lds_setting(setting: dict[str, Any], *, progress: bool = False) -> dict[str, Any]:
    """One LDS setting end to end -> a record (a JSON-serialisable dict).

    Data -> model -> ``theta*`` (exactly as :func:`influence_lib.experiment.run_setting` trains it) -> influence
    scores ``[n_test, n]`` of every test point with each method of ``methods`` -> for each ``alpha``:
    ``n_subsets`` random subsets, one retrained model per subset (:func:`retrain_subsets`) -> :func:`lds` of every
    method. A method whose solver fails is recorded with its error (and has no LDS). The record also holds each
    method's relative error against the exact scores, the per-test-point LDS of every method, the spread of
    the actual and predicted group effects, and, for the highest-loss test point, both vectors across subsets.
    """
    from .curvature import eigenvalue_summary
    from .experiment import LOSSES, data_and_model, fit_setting
    from .influence import InfluenceCalculator
    from .models import count_params, last_layer_params
    from .solvers import SolverError

    s = normalize_lds_setting(setting)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    loss_fn = LOSSES[s["loss"]]

    t = time.perf_counter()
    data, model = data_and_model(s)  # the same data and initial model as experiment.run_setting
    train, test = (data.X_train, data.y_train), (data.X_test, data.y_test)
    n = len(data.y_train)
    timings["data_model"] = time.perf_counter() - t

    t = time.perf_counter()
    fit = fit_setting(model, loss_fn, train, s, progress)  # theta* exactly as experiment.run_setting trains it
    timings["train"] = time.perf_counter() - t
    with torch.no_grad():
        test_out = model(data.X_test)
        test_losses = Objective(model, loss_fn, *train).per_sample_losses(flat_params(model), *test)
        train_acc = float((model(data.X_train).argmax(1) == data.y_train).double().mean())
        test_acc = float((test_out.argmax(1) == data.y_test).double().mean())

    # influence scores of every test point, per method
    params = None if s["params"] == "all" else last_layer_params(model)
    scores: dict[str, Tensor] = {}
    method_info: dict[str, Any] = {}
    spectrum = None
    for m in s["methods"]:
        t = time.perf_counter()
        calc = InfluenceCalculator(model, loss_fn, train, weight_decay=s["weight_decay"], damping=s["damping"],
                                   method=m, params=params, **s["method_options"].get(m, {}))
        try:
            scores[m] = calc.scores(test)
        except (SolverError, FloatingPointError) as e:  # recorded, not hidden
            method_info[m] = {"error": f"{type(e).__name__}: {e}"}
            continue
        timings[f"influence_{m}"] = time.perf_counter() - t
        method_info[m] = {k: v for k, v in calc.last_info.items() if not isinstance(v, list)}
        if m == "exact":
            spectrum = {**eigenvalue_summary(calc.eigenvalues), **_near_singular(calc, test, scores[m])}
    if not scores:
        raise SolverError("every method failed: " + "; ".join(f"{m}: {v['error']}" for m, v in method_info.items()))
    rel_err = {}
    if "exact" in scores:
        ref = scores["exact"]
        for m, sc in scores.items():
            rel_err[m] = float((sc - ref).norm() / ref.norm().clamp_min(1e-300))

    # the single-removal contrast first: with every point removed once, the actual LOO effects are themselves an
    # attribution (the "LOO oracle") whose LDS says how additive the group effects are
    subset_seed = s["seed"] if s["subset_seed"] is None else s["subset_seed"]
    loo, oracle = None, None
    if s["loo_points"] is not None:
        loo = _loo_contrast(model, loss_fn, train, test, scores, s, subset_seed, progress)
        timings["loo"] = loo.pop("seconds")
        loo_actual = loo.pop("actual")  # [R, T]
        if len(loo["removed"]) == n:
            oracle = loo_actual.T  # [T, n]: actual change of each test loss when each point is removed

    # subsets, retraining, LDS
    highest = int(torch.argmax(test_losses))
    per_alpha = []
    for alpha in s["alphas"]:
        masks = sample_subsets(n, alpha, s["n_subsets"], subset_seed)
        t = time.perf_counter()
        res = retrain_subsets(model, loss_fn, train, test, masks, weight_decay=s["weight_decay"],
                              optimizer=s["retrain_optimizer"], lr=s["retrain_lr"], steps=s["retrain_steps"],
                              warm_start=s["retrain_warm_start"], seed=s["seed"], batch_size=s["retrain_batch_size"],
                              normalization=s["retrain_normalization"], chunk_size=s["retrain_chunk_size"],
                              progress=progress)
        timings[f"retrain_alpha_{alpha:g}"] = time.perf_counter() - t
        actual = res.loss_change  # [S, T]
        entry: dict[str, Any] = {
            "alpha": alpha, "subset_size": int(masks[0].sum()), "n_subsets": s["n_subsets"],
            "subset_seed": subset_seed,
            "retrain": {"grad_norm_median": float(res.grad_norms.median()),
                        "grad_norm_max": float(res.grad_norms.max()), "reference_grad_norm": res.ref_grad_norm},
            "actual_std": _r(actual.std(dim=0)),  # [T]: spread of the actual effect across subsets
            "actual_mean": _r(actual.mean(dim=0)),
            "methods": {},
            "example": {"test_index": highest, "actual": _r(actual[:, highest]), "predicted": {}},
        }
        for m, sc in scores.items():
            entry["methods"][m], pred = _lds_entry(sc, masks, actual)
            entry["example"]["predicted"][m] = _r(pred[highest])
        if oracle is not None:
            entry["loo_oracle"], pred = _lds_entry(oracle, masks, actual)
            entry["example"]["predicted"]["loo_oracle"] = _r(pred[highest])
        per_alpha.append(entry)

    timings["total"] = time.perf_counter() - t_all
    return {
        "setting": s,
        "dataset": {"requested": data.requested, "name": data.name, "source": data.source, "n_train": n,
                    "n_test": len(data.y_test), "substitute": data.is_substitute},
        "model": {"n_params": count_params(model)},
        "training": {**fit, "train_accuracy": train_acc, "test_accuracy": test_acc},
        "spectrum": spectrum,
        "methods": method_info,
        "relative_error_vs_exact": rel_err,
        "test_losses": _r(test_losses),
        "lds": per_alpha,
        "loo": loo,
        "timings": timings,
        "versions": _versions(),
    }


def _near_singular(calc: Any, test: tuple[Tensor, Tensor], scores: Tensor) -> dict[str, float]:
    """How close ``H + damping I`` comes to singular, and how much of the exact scores that direction carries.

    ``damped_min_abs = min_k |lambda_k + damping|``; ``damped_n_negative``: eigenvalues with ``lambda_k + damping <
    0``; ``near_singular_share = ||S_k||_F / ||S||_F`` where ``S_k = (1/n) (G_test q_k)(G_train q_k)^T /
    (lambda_k + damping)`` is the part of the exact score matrix ``S`` that comes from that one eigendirection ``q_k``.
    """
    from .solvers import EigenSolver

    solver = calc._solver
    if not isinstance(solver, EigenSolver):
        return {}
    shifted = solver.evals + solver.damping
    k = int(shifted.abs().argmin())
    q = solver.evecs[:, k].to(scores.dtype)
    a = calc.gradients(test, "test") @ q
    b = calc.gradients((calc.objective.X, calc.objective.y)) @ q
    part = a.norm() * b.norm() / (calc.n_train * shifted[k].abs())
    return {"damped_min_abs": float(shifted[k].abs()), "damped_n_negative": int((shifted < 0).sum()),
            "near_singular_share": float(part / scores.norm().clamp_min(1e-300))}


def _lds_entry(scores: Tensor | np.ndarray, masks: Tensor, actual: Tensor) -> tuple[dict[str, Any], np.ndarray]:
    """LDS summary of one attribution plus the mean Pearson correlation and the spreads; and the predictions."""
    out = lds(scores, masks, actual)
    A = actual.numpy()
    pear = np.array([float(np.corrcoef(p, a)[0, 1]) if p.std() > 0 and a.std() > 0 else math.nan
                     for p, a in zip(out.predicted, A.T, strict=True)])
    return {
        **out.summary(),
        "pearson_mean": float(np.nanmean(pear)) if np.isfinite(pear).any() else None,
        "predicted_std": _r(out.predicted.std(axis=1)),  # [T]: spread of the predicted group effect
        "predicted_mean": _r(out.predicted.mean(axis=1)),
    }, out.predicted


def _loo_contrast(model: nn.Module, loss_fn: LossFn, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                  scores: dict[str, Tensor], s: dict[str, Any], seed: int, progress: bool) -> dict[str, Any]:
    """Leave-one-out retraining (same protocol as the subsets) and each method's per-test-point correlation."""
    from .retrain import retrain_without

    n = train[1].shape[0]
    if s["loo_points"] == "all" or s["loo_points"] >= n:
        remove = torch.arange(n)
    else:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
        remove = torch.randperm(n, generator=gen)[: s["loo_points"]].sort().values
    t = time.perf_counter()
    res = retrain_without(model, loss_fn, train, test, remove, weight_decay=s["weight_decay"],
                          optimizer=s["retrain_optimizer"], lr=s["retrain_lr"], steps=s["retrain_steps"],
                          warm_start=s["retrain_warm_start"], seed=s["seed"], batch_size=s["retrain_batch_size"],
                          normalization=s["retrain_normalization"], chunk_size=s["retrain_chunk_size"],
                          progress=progress)
    actual = res.loss_change.detach().cpu().numpy()  # [R, T]
    k = min(s["loo_k"], remove.numel())
    out: dict[str, Any] = {"removed": [int(i) for i in remove], "k": k, "methods": {}}
    for m, sc in scores.items():
        pred = sc[:, remove].numpy()  # [T, R]
        per_all, per_top, per_pear = [], [], []
        for t_ in range(pred.shape[0]):
            per_all.append(_spearman_or_nan(pred[t_], actual[:, t_]))
            top = np.argsort(-np.abs(pred[t_]), kind="mergesort")[:k]
            per_top.append(_spearman_or_nan(pred[t_, top], actual[top, t_]))
            a, b = pred[t_], actual[:, t_]
            per_pear.append(float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else math.nan)
        out["methods"][m] = {
            "spearman": [None if math.isnan(v) else v for v in per_all],
            "spearman_top": [None if math.isnan(v) else v for v in per_top],
            "pearson": [None if math.isnan(v) else v for v in per_pear],
        }
    out["seconds"] = time.perf_counter() - t
    out["actual"] = actual
    return out


def _nanmean(values: Sequence[float | None]) -> tuple[float, int]:
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    ok = np.isfinite(v)
    return (float(v[ok].mean()) if ok.any() else math.nan), int(ok.sum())


def to_frame(records: Sequence[dict[str, Any]], per_test: bool = False):
    """Records of :func:`run_lds_setting` as a table.

    ``per_test=False``: one row per (record, alpha, method) with the mean LDS over the test points (``lds``; the
    count of defined values in ``lds_n_defined``, of undefined ones in ``lds_n_undefined``), the mean Pearson
    correlation across subsets, the method's relative error against the exact scores, the ratio of the spreads
    (std across subsets) of predicted and actual group effects, and, where the record has a leave-one-out
    contrast, the mean LOO Spearman over all removed points and over the top-k by |score| (with their counts).
    ``per_test=True``: one row per (record, alpha, method, test point) with ``lds`` and ``loo_spearman``.
    Where the record has leave-one-out effects of every training point, the method ``"loo_oracle"`` (those actual
    effects used as the attribution) gets rows too.
    Failed records are skipped; a method that failed in a record gets a row with ``error`` set and no values.
    """
    import pandas as pd

    rows = []
    for r in records:
        if "error" in r:
            continue
        s = r["setting"]
        base = {k: v for k, v in s.items() if not isinstance(v, (dict, list))}
        base.update({"n_params": r["model"]["n_params"], "train_loss": r["training"]["loss"],
                     "grad_norm": r["training"]["grad_norm"], "test_accuracy": r["training"]["test_accuracy"],
                     "dataset_used": r["dataset"]["name"], "n_train_used": r["dataset"]["n_train"]})
        loo = r.get("loo")
        for e in r["lds"]:
            for m in [*s["methods"], *(["loo_oracle"] if "loo_oracle" in e else [])]:
                row = {**base, "alpha": e["alpha"], "method": m, "subset_size": e["subset_size"],
                       "retrain_grad_norm": e["retrain"]["grad_norm_median"]}
                info = r["methods"].get(m, {})
                if "error" in info:
                    rows.append({**row, "error": info["error"]})
                    continue
                me = e["loo_oracle"] if m == "loo_oracle" else e["methods"][m]
                lm = loo["methods"][m] if loo and m in loo["methods"] else None
                if per_test:
                    for t, v in enumerate(me["per_test"]):
                        rows.append({**row, "error": None, "test_index": t, "test_loss": r["test_losses"][t],
                                     "lds": np.nan if v is None else v,
                                     "loo_spearman": np.nan if lm is None or lm["spearman"][t] is None
                                     else lm["spearman"][t]})
                    continue
                row.update({"error": None, "lds": np.nan if me["mean"] is None else me["mean"],
                            "lds_n_defined": me["n_defined"], "lds_n_undefined": me["n_undefined"],
                            "pearson": me["pearson_mean"], "relative_error": r["relative_error_vs_exact"].get(m),
                            "scale_ratio": float(np.mean(me["predicted_std"]) / max(np.mean(e["actual_std"]), 1e-300))})
                if lm is not None:
                    row["loo_spearman"], row["loo_n_defined"] = _nanmean(lm["spearman"])
                    row["loo_spearman_top"], row["loo_top_n_defined"] = _nanmean(lm["spearman_top"])
                    row["loo_k"] = loo["k"]
                rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["LDSResult", "SubsetRetrainResult", "group_predictions", "lds", "linear_datamodeling_score",
           "normalize_lds_setting", "retrain_subsets", "run_lds_setting", "sample_subsets", "subset_retrain",
           "subset_size", "to_frame"]
