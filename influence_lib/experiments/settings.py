"""Settings of the influence experiments: defaults, validation and canonical form.

A *setting* is a flat dict of JSON-serialisable values. :func:`normalize_setting` fills :data:`DEFAULTS`, checks
every key and value (before any long computation: a grid is refused in well under a second) and returns the
canonical form, whose hash is the record's key (:func:`influence_lib.experiments.runners.setting_key`):

* keys of :data:`OPTIONAL_DEFAULTS` (added after records existed) are listed only where they differ from their
  default, so the key of every record computed before them is unchanged;
* a number given as an integer where the default is a float (``weight_decay=0`` vs ``0.0``) is stored as the
  float: the two spellings are one setting and one key.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F

from ..influence import CURVATURES
from ..models import ACTIVATIONS, MODELS
from ..retrain import LR_SCHEDULES, OPTIMIZERS
from ..solvers import METHODS
from ..validation import check_choice, check_nonneg, check_positive, check_positive_int

DEFAULTS: dict[str, Any] = {
    # data
    "dataset": "iris",
    "fallback": None,  # dataset used when `dataset` is unavailable offline (named in the record)
    "data_seed": 0,
    "n_train": None,
    "n_test": None,
    "dtype": "float64",
    # model
    "model": "mlp",
    "depth": 1,
    "width": 5,
    "activation": "relu",
    "seed": 0,
    # training to theta*
    "weight_decay": 0.0,
    "optimizer": "adam",
    "lr": 0.01,
    "steps": 5000,
    "batch_size": None,
    # influence
    "methods": ["exact"],  # the first is the one compared with LOO; others are compared with it
    "damping": 0.001,
    "params": "all",  # "all" or "last" (last linear layer only)
    "method_options": {},  # {"lissa": {...}, "cg": {...}}
    "curvature_limit": 6000,  # dense Hessian spectrum only up to this many parameters
    # examined test points
    "n_random_test": 2,
    # leave-one-out
    "remove": "all",  # "all" or "top"
    "k": 25,  # top-k size for metrics (and for remove="top")
    "loo_optimizer": "adam",
    "loo_lr": 0.001,
    "loo_steps": 2000,
    "loo_batch_size": None,
    "loo_warm_start": True,
    "loo_reference": "retrained",
    "loo_normalization": "remaining",
    "loo_chunk_size": None,
    "loss": "cross_entropy",
}

#: Settings added after records existed. A normalised setting lists one of these only where it differs from this
#: default, so the key (hash) and the stored setting of every record computed without them are unchanged.
OPTIONAL_DEFAULTS: dict[str, Any] = {
    # curvatures of the influence scores, computed with the primary method; the first gives "predicted", the others
    # are recorded per test point under "curvatures"
    "curvatures": ["hessian"],
    # a second ground truth: the proximal Bregman response function (influence_lib.pbrf) of the removed points,
    # with the setting's damping and weight decay
    "pbrf": False,
    "pbrf_optimizer": "sgd",
    "pbrf_lr": "auto",  # a number, or "auto" (sgd only): 1 / lambda_max of G + damping I at theta*
    "pbrf_momentum": 0.9,
    "pbrf_steps": 1000,
    # theta* at stationarity: after the optimiser, damped Newton to the relative gradient-norm tolerance (raises if
    # it is not reached; the record keeps the gradient norm before and after)
    "polish": False,
    # a second leave-one-out ground truth beside the warm-start one: damped Newton from theta* to the stationary
    # point nearest it (influence_lib.newton), every model's convergence recorded; models that miss the tolerance
    # are flagged and left out of that ground truth's correlations
    "loo_newton": False,
    # LiSSA's truncation error alone: the full-batch LiSSA of the setting's "lissa" options (scale, depth) in closed
    # form from the exact eigendecomposition (influence_lib.solvers.lissa_full_batch_limit), recorded as the
    # estimator "lissa-truncated" beside the mini-batch "lissa"; needs methods "exact" and "lissa" and a lissa scale
    "lissa_truncated": False,
    # learning-rate schedule of theta*'s first-order training and of the warm-start LOO retraining
    # (influence_lib.retrain.LR_SCHEDULES): "cosine" decays lr towards 0 over the steps, so that Adam settles
    "lr_schedule": "constant",
    "loo_lr_schedule": "constant",
    # the leave-one-out noise ceiling: the same removals retrained again under other protocols, each a dict of
    # overrides of the LOO protocol among REPLICATE_KEYS, e.g. {"warm_start": False, "seed": 1000, "steps": 10000,
    # "lr": 0.01} (cold start from another initialisation) or {"steps": 6000} (warm start, twice as long); the
    # agreement of the setting's LOO with each replicate bounds how high any estimate's agreement can be.
    # "loo_replicate_k": the replicates retrain only the pooled top-k |predicted| removals of the highest- and
    # median-loss test points (None: every removed point)
    "loo_replicates": [],
    "loo_replicate_k": None,
    # theta* of T seeds trained at once (influence_lib.retrain.train_stack): the theta* of seed s is trained in one
    # stack with the seeds of its block of T consecutive seeds, T * (s // T) to T * (s // T) + T - 1, the setting
    # otherwise the same. Each model's objective and optimiser trajectory are those of training it alone; only the
    # floating-point rounding differs (and on a chaotic non-convex fit that can send Adam elsewhere), so the block
    # is part of the setting. Full batch only (stacked models share one mini-batch order)
    "theta_stack": 1,
}

#: what a LOO replicate may change, with the setting key it overrides
REPLICATE_KEYS = {"warm_start": "loo_warm_start", "seed": "seed", "steps": "loo_steps", "lr": "loo_lr",
                  "lr_schedule": "loo_lr_schedule", "batch_size": "loo_batch_size"}

LOSSES = {"cross_entropy": F.cross_entropy}
DTYPES = {"float64": torch.float64, "float32": torch.float32}

#: keys that must be integers >= 1 (or None where the default is None)
_POSITIVE_INTS = ("depth", "width", "steps", "loo_steps", "curvature_limit", "batch_size", "loo_batch_size",
                  "loo_chunk_size", "n_train", "n_test")
_NONNEG_INTS = ("seed", "data_seed", "n_random_test")
_POSITIVE_FLOATS = ("lr", "loo_lr")
_NONNEG_FLOATS = ("weight_decay", "damping")


def canonical_numbers(s: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``s`` with every integer given for a float-valued default turned into that float (one key per setting)."""
    out = dict(s)
    for key, default in defaults.items():
        v = out.get(key)
        if isinstance(default, float) and isinstance(v, numbers.Integral) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def check_int(key: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``value`` is an integer >= ``minimum`` (or None if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"setting {key!r} must be an integer >= {minimum}{extra}, got {value!r}")


def check_number(key: str, value: Any, *, positive: bool) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``value`` is a finite number > 0 (``positive``) or >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"setting {key!r} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def check_common(s: dict[str, Any]) -> None:
    """The checks every runner shares for the keys it has (data, model, training, influence)."""
    for key in _POSITIVE_INTS:
        if key in s:
            check_int(key, s[key], 1, allow_none=DEFAULTS.get(key, 0) is None)
    for key in _NONNEG_INTS:
        if key in s:
            check_int(key, s[key], 0)
    for key in _POSITIVE_FLOATS:
        if key in s:
            check_number(key, s[key], positive=True)
    for key in _NONNEG_FLOATS:
        if key in s:
            check_number(key, s[key], positive=False)
    if "model" in s:
        check_choice("model", s["model"], MODELS)
    if "activation" in s:
        check_choice("activation", s["activation"], ACTIVATIONS)
    if "dtype" in s:
        check_choice("dtype", s["dtype"], DTYPES)
    if "params" in s:
        check_choice("params", s["params"], ("all", "last"))
    for key in ("optimizer", "loo_optimizer"):
        if key in s:
            check_choice(key, s[key], OPTIMIZERS)
    if "method_options" in s and not isinstance(s["method_options"], dict):
        raise ValueError(f"setting 'method_options' must be a dict {{method: {{option: value}}}}, "
                         f"got {s['method_options']!r}")


def normalize_setting(setting: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults, reject unknown keys and values early (before any long computation): the canonical setting.

    Keys of :data:`OPTIONAL_DEFAULTS` are checked too but kept only where they differ from their default.
    """
    if not isinstance(setting, dict):
        raise ValueError(f"a setting must be a dict, got {type(setting).__name__}")
    unknown = sorted(set(setting) - set(DEFAULTS) - set(OPTIONAL_DEFAULTS))
    if unknown:
        raise ValueError(f"setting: unknown key(s) {unknown}; accepted: {sorted({*DEFAULTS, *OPTIONAL_DEFAULTS})}")
    s = canonical_numbers({**DEFAULTS, **setting}, {**DEFAULTS, **OPTIONAL_DEFAULTS})
    if isinstance(s.get("curvatures"), str):
        s["curvatures"] = [s["curvatures"]]
    for key, default in OPTIONAL_DEFAULTS.items():  # listed only where different from the default
        if key in s and s[key] == default:
            del s[key]
    o = {**OPTIONAL_DEFAULTS, **s}
    if not isinstance(o["curvatures"], list) or not o["curvatures"]:
        raise ValueError(f"curvatures must be a non-empty list of {list(CURVATURES)}, got {o['curvatures']!r}")
    for c in o["curvatures"]:
        check_choice("curvatures", c, CURVATURES)
    for key in ("pbrf", "polish", "loo_newton", "lissa_truncated"):
        if not isinstance(o[key], bool):
            raise ValueError(f"{key} must be True or False, got {o[key]!r}")
    check_choice("pbrf_optimizer", o["pbrf_optimizer"], OPTIMIZERS)
    if o["pbrf_lr"] == "auto":
        if o["pbrf_optimizer"] != "sgd":
            raise ValueError("pbrf_lr='auto' requires pbrf_optimizer='sgd'")
    else:
        check_positive("pbrf_lr", o["pbrf_lr"])
    check_nonneg("pbrf_momentum", o["pbrf_momentum"])
    check_positive_int("pbrf_steps", o["pbrf_steps"])
    for key in ("lr_schedule", "loo_lr_schedule"):
        check_choice(key, o[key], LR_SCHEDULES)
    if not isinstance(o["loo_replicates"], list) or any(
            not isinstance(r, dict) or not r or set(r) - set(REPLICATE_KEYS) for r in o["loo_replicates"]):
        raise ValueError(f"loo_replicates must be a list of non-empty dicts with keys among {sorted(REPLICATE_KEYS)}, "
                         f"got {o['loo_replicates']!r}")
    for r in o["loo_replicates"]:
        check_common({REPLICATE_KEYS[k]: v for k, v in r.items() if REPLICATE_KEYS[k] != "loo_lr_schedule"})
        if "warm_start" in r and not isinstance(r["warm_start"], bool):
            raise ValueError(f"a replicate's warm_start must be True or False, got {r['warm_start']!r}")
        if "lr_schedule" in r:
            check_choice("lr_schedule", r["lr_schedule"], LR_SCHEDULES)
    check_int("theta_stack", o["theta_stack"], 1)
    if o["theta_stack"] > 1 and s["batch_size"] is not None:
        raise ValueError(f"theta_stack > 1 trains full batch (stacked models share one mini-batch order); "
                         f"got batch_size={s['batch_size']}")
    if o["loo_replicate_k"] is not None:
        check_int("loo_replicate_k", o["loo_replicate_k"], 2)
    if isinstance(s["methods"], str):
        s["methods"] = [s["methods"]]
    if not isinstance(s["methods"], list) or not s["methods"]:
        raise ValueError(f"setting 'methods' must be a non-empty list of {list(METHODS)}, got {s['methods']!r}")
    for m in s["methods"]:
        check_choice("methods", m, METHODS)
    if o["lissa_truncated"] and not ({"exact", "lissa"} <= set(s["methods"])
                                     and s["method_options"].get("lissa", {}).get("scale") is not None):
        raise ValueError("lissa_truncated=True needs methods 'exact' and 'lissa' and method_options['lissa']['scale'] "
                         f"(the scale the closed form shares with the mini-batch run), got methods {s['methods']!r} "
                         f"and method_options {s['method_options']!r}")
    check_common(s)
    check_choice("remove", s["remove"], ("all", "top"))
    check_choice("loss", s["loss"], LOSSES)
    check_choice("loo_reference", s["loo_reference"], ("retrained", "original"))
    check_choice("loo_normalization", s["loo_normalization"], ("remaining", "full"))
    if not isinstance(s["loo_warm_start"], bool):
        raise ValueError(f"setting 'loo_warm_start' must be True or False, got {s['loo_warm_start']!r}")
    if not isinstance(s["k"], int) or isinstance(s["k"], bool) or s["k"] < 2:
        raise ValueError(f"k must be an integer >= 2, got {s['k']!r}")
    return s
