"""The named stages every runner is composed from.

    setting -> data_and_model -> fit -> model_health -> select_test_points -> influence_scores -> spectrum
            -> removal_set -> loo -> (pbrf) -> point_metrics -> record

Each stage is a plain function of the normalised setting and the outputs of the stages before it, so the same
setting gives the same data, initial model, ``theta*`` and scores in every runner (influence, LDS, noise).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature import eigenvalue_summary, extreme_eigenvalues, spectrum_summary
from ..data import load_dataset
from ..influence import InfluenceCalculator
from ..metrics import top_k
from ..models import build_model, last_layer_params
from ..objective import Objective, flat_params, set_flat_params
from ..retrain import retrain_without, train_model, train_stack
from ..solvers import SolverError
from .settings import DTYPES


# --- data and model ------------------------------------------------------------------------------------------
def data_and_model(s: dict[str, Any], **data_options: Any):
    """The data set and the freshly initialised (seeded) model of a normalised setting ``s``: ``(data, model)``."""
    data = load_dataset(s["dataset"], seed=s["data_seed"], n_train=s["n_train"], n_test=s["n_test"],
                        fallback=s["fallback"], dtype=DTYPES[s["dtype"]], flatten=s["model"] in ("mlp", "linear"),
                        **data_options)
    return data, model_of(s, data)


def model_of(s: dict[str, Any], data) -> nn.Module:
    """The freshly initialised model of the normalised setting ``s`` (its architecture and ``seed``) for ``data``."""
    kwargs: dict[str, Any] = {} if s["model"] == "linear" else {"depth": s["depth"], "width": s["width"],
                                                                "activation": s["activation"]}
    if s["model"] in ("vgg", "resnet"):
        kwargs = {"width": s["width"], "activation": s["activation"],
                  ("stages" if s["model"] == "vgg" else "blocks"): s["depth"]}
    return build_model(s["model"], in_shape=tuple(data.X_train.shape[1:]), n_classes=data.n_classes,
                       seed=s["seed"], dtype=DTYPES[s["dtype"]], **kwargs)


# --- theta* --------------------------------------------------------------------------------------------------
def fit(model: nn.Module, loss_fn, train: tuple[Tensor, Tensor], s: dict[str, Any],
        progress: bool = False, data=None) -> dict[str, Any]:
    """Train ``model`` in place to ``theta*`` with the training settings of the normalised setting ``s``.

    With ``theta_stack`` T > 1 (:data:`~.settings.OPTIONAL_DEFAULTS`) the theta* of the whole block of T seeds is
    trained in one stack (:func:`fit_in_stack`; ``data`` is the setting's data set) and this seed's row is used.
    """
    if s.get("theta_stack", 1) > 1:
        return fit_in_stack(model, loss_fn, train, s, data, progress)
    return train_model(model, loss_fn, train, weight_decay=s["weight_decay"], optimizer=s["optimizer"], lr=s["lr"],
                       steps=s["steps"], batch_size=s.get("batch_size"), seed=s["seed"], progress=progress,
                       lr_schedule=s.get("lr_schedule", "constant"))


#: the trained stacks of this process, oldest first: {block key: (Theta [T, p], loss [T], grad_norm [T])}, at most
#: _STACKS_BYTES of parameters (a sweep's workers meet the blocks of a grid seed by seed, so all of them are kept)
_STACKS: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
_STACKS_BYTES = 256 * 2**20


def stack_seeds(s: dict[str, Any]) -> list[int]:
    """The seeds whose theta* are trained in one stack with that of the normalised setting ``s``."""
    T = s.get("theta_stack", 1)
    first = T * (s["seed"] // T)
    return list(range(first, first + T))


def fit_in_stack(model: nn.Module, loss_fn, train: tuple[Tensor, Tensor], s: dict[str, Any], data,
                 progress: bool = False) -> dict[str, Any]:
    """theta* of ``s`` from the stack of its block of seeds (:func:`stack_seeds`), trained with
    :func:`influence_lib.retrain.train_stack` from each seed's own initial model; written into ``model`` in place.

    A process keeps its stacks (up to ``_STACKS_BYTES``), so the other seeds of a block computed in the same process
    reuse it (the same parameters, bit for bit, as training the block again). The result adds ``"theta_stack"``: the
    block.
    """
    seeds = stack_seeds(s)
    key = json.dumps({**{k: v for k, v in s.items() if k != "seed"}, "stack_first_seed": seeds[0]}, sort_keys=True,
                     default=str)
    if key not in _STACKS:
        if data is None:
            raise ValueError("fit_in_stack needs the setting's data set (to build the initial model of every seed)")
        theta0 = torch.stack([flat_params(model_of({**s, "seed": k}, data)) for k in seeds])
        _STACKS[key] = train_stack(model, loss_fn, train, theta0, weight_decay=s["weight_decay"],
                                   optimizer=s["optimizer"], lr=s["lr"], steps=s["steps"],
                                   lr_schedule=s.get("lr_schedule", "constant"), progress=progress)
        while len(_STACKS) > 1 and sum(v[0].numel() * v[0].element_size() for v in _STACKS.values()) > _STACKS_BYTES:
            del _STACKS[next(iter(_STACKS))]
    Theta, loss, grad_norm = _STACKS[key]
    row = seeds.index(s["seed"])
    set_flat_params(model, Theta[row].clone())
    return {"loss": float(loss[row]), "grad_norm": float(grad_norm[row]), "theta_stack": seeds}


def accuracies(model: nn.Module, data) -> tuple[float, float]:
    """``(train accuracy, test accuracy)`` of ``model`` on ``data``."""
    with torch.no_grad():
        train_acc = float((model(data.X_train).argmax(1) == data.y_train).double().mean())
        test_acc = float((model(data.X_test).argmax(1) == data.y_test).double().mean())
    return train_acc, test_acc


#: a model is *healthy* when its train accuracy beats always predicting the most frequent class by this margin,
#: it does not predict one class for (nearly) every input, and it is near a stationary point
HEALTH_ACCURACY_MARGIN = 0.05
HEALTH_CONSTANT_SHARE = 0.99
HEALTH_OUTPUT_SPREAD = 1e-6


def model_health(model: nn.Module, loss_fn, data, weight_decay: float, grad_norm: float | None = None,
                 grad_norm_limit: float | None = None) -> dict[str, Any]:
    """Is ``theta*`` a model influence functions can be judged on? Checks recorded for every trained model.

    * ``train_accuracy`` against ``chance_accuracy`` (the most frequent class's share): a collapsed network that
      predicts the majority class scores no better than chance;
    * ``constant_predictor``: the spread of the outputs across training inputs is below
      :data:`HEALTH_OUTPUT_SPREAD` (only the output bias alive) or one class is predicted for more than
      :data:`HEALTH_CONSTANT_SHARE` of the inputs;
    * ``dead_unit_fraction``: the share of hidden units (outputs of activation modules) that are zero for every
      training input (dead ReLUs), and ``dead_layer`` when some hidden layer is entirely dead;
    * ``grad_norm``: the norm of the full objective's gradient at ``theta*``, and, when ``grad_norm_limit`` is
      given, whether it is below it (``stationary``).

    ``healthy`` is True when none of the checks fails; ``reasons`` names those that do.
    """
    X, y = data.X_train, data.y_train
    acts: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: acts.append(out.detach()))
             for m in model.modules() if isinstance(m, (nn.ReLU, nn.GELU, nn.Softplus, nn.Tanh, nn.Sigmoid))]
    try:
        with torch.no_grad():
            out = model(X)
    finally:
        for h in hooks:
            h.remove()
    n_classes = int(out.shape[1])
    counts = torch.bincount(y, minlength=n_classes).double()
    chance = float(counts.max() / counts.sum())
    pred = out.argmax(1)
    train_acc = float((pred == y).double().mean())
    top_share = float(torch.bincount(pred, minlength=n_classes).max()) / len(pred)
    spread = float(out.std(dim=0).max())
    constant = spread < HEALTH_OUTPUT_SPREAD or top_share > HEALTH_CONSTANT_SHARE
    dead_units, units, dead_layer = 0, 0, False
    for a in acts:
        a2 = a.reshape(a.shape[0], a.shape[1], -1).abs().amax(dim=(0, 2)) if a.dim() > 2 else a.abs().amax(dim=0)
        dead = int((a2 == 0).sum())
        dead_units += dead
        units += a2.numel()
        dead_layer = dead_layer or dead == a2.numel()
    if grad_norm is None:
        obj = Objective(model, loss_fn, X, y, weight_decay=weight_decay)
        grad_norm = float(obj.gradient(flat_params(model)).norm())
    reasons = []
    if train_acc < chance + HEALTH_ACCURACY_MARGIN:
        reasons.append(f"train accuracy {train_acc:.3f} is not above chance {chance:.3f}")
    if constant:
        reasons.append("constant predictor (one class for every input or no output spread)")
    if dead_layer:
        reasons.append("a hidden layer is entirely dead (zero for every training input)")
    stationary = None
    if grad_norm_limit is not None:
        stationary = bool(grad_norm <= grad_norm_limit)
        if not stationary:
            reasons.append(f"not stationary: gradient norm {grad_norm:.3g} > {grad_norm_limit:g}")
    if not math.isfinite(grad_norm):
        reasons.append("non-finite gradient")
    return {"healthy": not reasons, "reasons": reasons, "train_accuracy": train_acc, "chance_accuracy": chance,
            "constant_predictor": bool(constant), "top_class_share": top_share, "output_spread": spread,
            "dead_unit_fraction": dead_units / units if units else 0.0, "dead_layer": bool(dead_layer),
            "grad_norm": grad_norm, "grad_norm_limit": grad_norm_limit, "stationary": stationary}


# --- test points -----------------------------------------------------------------------------------------------
def test_losses(model: nn.Module, data) -> tuple[Tensor, Tensor]:
    """Per-point cross-entropy ``(train losses [n], test losses [m])`` at the model's parameters."""
    with torch.no_grad():
        return (F.cross_entropy(model(data.X_train), data.y_train, reduction="none"),
                F.cross_entropy(model(data.X_test), data.y_test, reduction="none"))


def select_test_points(losses: Tensor, n_random: int, seed: int) -> list[tuple[str, int]]:
    """``[(role, index)]``: highest-loss, median-loss, then ``n_random`` distinct random test points."""
    order = torch.argsort(losses, descending=True)
    chosen = [("highest", int(order[0])), ("median", int(order[len(order) // 2]))]
    rng = np.random.default_rng(seed)
    rest = [i for i in range(len(losses)) if i not in {c[1] for c in chosen}]
    for i in rng.permutation(rest)[: max(0, min(n_random, len(rest)))]:
        chosen.append(("random", int(i)))
    return chosen


# --- influence -------------------------------------------------------------------------------------------------
def influence_params(model: nn.Module, s: dict[str, Any]) -> list[str] | None:
    """The parameters influence is computed over: None (all) or the last linear layer's names."""
    return None if s["params"] == "all" else last_layer_params(model)


def calculator(model: nn.Module, loss_fn, train, s: dict[str, Any], method: str, curvature: str = "hessian",
               params: list[str] | None = None) -> InfluenceCalculator:
    """The influence calculator of ``method`` with the setting's weight decay, damping and method options."""
    return InfluenceCalculator(model, loss_fn, train, weight_decay=s["weight_decay"], damping=s["damping"],
                               method=method, params=params, curvature=curvature,
                               **s["method_options"].get(method, {}))


def influence_scores(model: nn.Module, loss_fn, train, test, s: dict[str, Any], timings: dict[str, float],
                     curvature: str = "hessian", params: list[str] | None = None,
                     errors: tuple[type[BaseException], ...] = (SolverError,)):
    """Scores ``[T, n]`` of every method of ``s["methods"]``: ``(scores, infos, calculators)``.

    A method whose solver fails is recorded with its error in ``infos`` (not hidden, not fatal).
    """
    import time

    scores: dict[str, Tensor] = {}
    infos: dict[str, Any] = {}
    calcs: dict[str, InfluenceCalculator] = {}
    for m in s["methods"]:
        t = time.perf_counter()
        calc = calculator(model, loss_fn, train, s, m, curvature, params)
        try:
            scores[m] = calc.scores(test)
        except errors as e:
            infos[m] = {"error": str(e) if errors == (SolverError,) else f"{type(e).__name__}: {e}"}
            continue
        timings[f"influence_{m}"] = time.perf_counter() - t
        calcs[m] = calc
        infos[m] = {k: v for k, v in calc.last_info.items() if not isinstance(v, list)}
    return scores, infos, calcs


def lissa_truncated_scores(exact: InfluenceCalculator, train, test, s: dict[str, Any]) -> tuple[Tensor, dict]:
    """Scores ``[T, n]`` of full-batch LiSSA with the setting's lissa ``scale`` and ``depth``, in closed form from
    the exact calculator's eigendecomposition (its truncation error alone; no mini-batch noise), and the closed form's
    info (truncation factor, number of divergent eigendirections)."""
    from ..solvers import lissa_full_batch_limit

    opts = s["method_options"]["lissa"]
    exact.eigenvalues  # noqa: B018  (builds the eigendecomposition if the exact scores have not)
    G_test = exact.gradients(test, "test")  # [T, p]
    X, info = lissa_full_batch_limit(exact.solver, G_test.T, scale=float(opts["scale"]),
                                     depth=int(opts.get("depth", 1000)))
    G_train = exact.gradients(train, "train")  # [n, p]
    return (G_train @ X).T / exact.n_train, info


def spectrum(calcs: dict[str, InfluenceCalculator], primary: str, limit: int) -> dict[str, Any]:
    """Curvature summary: exact eigenvalues where the exact method ran, dense up to ``limit`` parameters, else
    Lanczos estimates of the extreme eigenvalues."""
    calc_p = calcs[primary]
    if "exact" in calcs:
        return eigenvalue_summary(calcs["exact"].eigenvalues)
    if calc_p.objective.p <= limit:
        return spectrum_summary(calc_p.operator.dense())
    lo, hi = extreme_eigenvalues(calc_p.operator, iters=min(60, calc_p.objective.p))
    return {"lambda_min": lo, "lambda_max": hi, "estimated_by": "lanczos-60"}


# --- ground truth ----------------------------------------------------------------------------------------------
def removal_set(pred: Tensor, s: dict[str, Any], n: int) -> Tensor:
    """Which training points to retrain without: all, or the pooled top-``k`` |predicted| of each test point."""
    if s["remove"] == "all":
        return torch.arange(n)
    pool: list[int] = []
    for row in pred:
        pool.extend(int(i) for i in top_k(row, min(s["k"], n)))
    return torch.tensor(sorted(set(pool)))


def loo(model: nn.Module, loss_fn, train, test, remove: Tensor, s: dict[str, Any], progress: bool = False):
    """Leave-one-out retraining of ``remove`` with the setting's ``loo_*`` protocol (a ``LOOResult``)."""
    return retrain_without(model, loss_fn, train, test, remove, weight_decay=s["weight_decay"],
                           optimizer=s["loo_optimizer"], lr=s["loo_lr"], steps=s["loo_steps"],
                           batch_size=s["loo_batch_size"], warm_start=s["loo_warm_start"], seed=s["seed"],
                           reference=s["loo_reference"], normalization=s["loo_normalization"],
                           chunk_size=s["loo_chunk_size"], progress=progress,
                           lr_schedule=s.get("loo_lr_schedule", "constant"))
