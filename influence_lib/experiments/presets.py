"""Named base settings of the book's sweeps, and their grids per profile.

``PRESETS[name]`` is the base setting of sweep ``name`` (see :data:`influence_lib.experiments.settings.DEFAULTS`
for every key); ``GRIDS[name][profile]`` is ``(grid, seeds)``. Chapters and the command line share these, so
``python -m influence_lib.experiments.sweep NAME --grid ...`` computes records of the chapter's kind.
"""

from __future__ import annotations

from typing import Any

from .rules import SEEDS
from .runners import expand

IRIS_DEPTHS = [1, 2, 3, 4, 5, 6, 7, 8]
IRIS_WIDTHS = [5, 10, 20, 30, 40, 50]

PRESETS: dict[str, dict[str, Any]] = {
    # Iris MLPs (paper section "Iris"): exact Hessian, warm-start LOO of every training point. The default grid
    # examines all 30 test points (highest, median and the 28 others: the LOO retraining is shared by all of them)
    # for rules.SEEDS["iris"] = 10 seeds, fixed before these records were computed
    "iris": {
        "dataset": "iris", "model": "mlp", "activation": "relu", "dtype": "float64",
        "optimizer": "adam", "lr": 0.01, "steps": 10000,
        "methods": ["exact"], "damping": 0.001,
        "remove": "all", "k": 25, "n_random_test": 3,
        "loo_optimizer": "adam", "loo_lr": 0.001, "loo_steps": 3000,
        # the theta* of the 10 seeds of a setting trained in one stack (settings.OPTIONAL_DEFAULTS "theta_stack"):
        # 10 models cost 1.5-3x one, and on this grid each model came out bit for bit as trained alone
        "theta_stack": SEEDS["iris"],
    },
    # two ground truths on smooth Iris MLPs (issue "Exact ground truth"): tanh, so that the leave-one-out minimisers
    # are stationary points Newton can reach (with ReLU they sit on kinks, benchmarks/newton_loo.py); theta* polished
    # to stationarity by Newton after Adam; the paper's warm-start Adam LOO and the Newton-converged LOO of the same
    # removals, whose difference is the optimiser error of the warm-start ground truth
    "iris-newton": {
        "dataset": "iris", "model": "mlp", "activation": "tanh", "width": 5, "dtype": "float64",
        "weight_decay": 0.005, "optimizer": "adam", "lr": 0.01, "steps": 10000, "polish": True,
        "methods": ["exact"], "damping": 0.001,
        "remove": "all", "k": 25, "n_random_test": 28,
        "loo_optimizer": "adam", "loo_lr": 0.001, "loo_steps": 3000, "loo_newton": True,
    },
    # the public replication's Iris protocol (epifano2023, book/reference_values.json "iris_depth"): a 60,000-epoch
    # full-batch fit, warm-start LOO of 7,500 full-batch epochs, judged on the 25 highest-train-loss points of the
    # highest-loss test point; everything else as the "iris" preset (its optimiser and activation are not recorded in
    # our source, so Adam and ReLU as in the book's grid). Depth 1, width 5, with and without weight decay
    "iris-replication": {
        "dataset": "iris", "model": "mlp", "activation": "relu", "depth": 1, "width": 5, "dtype": "float64",
        "optimizer": "adam", "lr": 0.01, "steps": 60000,
        "methods": ["exact"], "damping": 0.001,
        "remove": "all", "k": 25, "n_random_test": 0,
        "loo_optimizer": "adam", "loo_lr": 0.001, "loo_steps": 7500,
    },
    # the convex baseline: L2-regularised multinomial logistic regression
    "convex-iris": {
        "dataset": "iris", "model": "linear", "dtype": "float64", "weight_decay": 0.01,
        "optimizer": "sgd", "lr": 1.0, "steps": 5000, "methods": ["exact", "cg", "lissa", "arnoldi"],
        "damping": 0.0, "remove": "all", "k": 25, "n_random_test": 3,
        "loo_optimizer": "sgd", "loo_lr": 1.0, "loo_steps": 3000, "loo_normalization": "full",
        "method_options": {"lissa": {"depth": 3000}, "arnoldi": {"rank": 10}},
    },
    "convex-mnist": {
        "dataset": "mnist-small", "n_train": 1000, "n_test": 200, "model": "linear", "dtype": "float64",
        # wd 0.1: with n = 1000 in 7,850 dimensions a weaker penalty lets single removals move the highest-loss
        # test point by several nats (wd 0.01 measured Pearson 0.09 there: the linearisation, not the code, fails).
        # theta* by damped Newton from the initialisation to the relative gradient-norm tolerance (a convex problem:
        # about a dozen iterations; lr and steps are not used), instead of 3,000 full-batch GD steps and a polish
        "weight_decay": 0.1, "optimizer": "newton", "methods": ["cg"],
        "method_options": {"cg": {"tol": 1e-10}},
        "damping": 0.0, "remove": "top", "k": 50, "n_random_test": 1,
        # the exact ground truth of a convex model: Newton-converged LOO (gradient norm <= 1e-10 relative), instead
        # of 1,000 warm-start SGD steps (61 minutes per record before)
        "loo_optimizer": "newton", "loo_normalization": "full", "loo_chunk_size": 50,
    },
    # small MNIST (paper section "small MNIST"): MLPs small enough for the exact Hessian; exact vs CG vs
    # LiSSA (stochastic, mini-batch HVPs) vs Arnoldi on the same models; "lissa-truncated" is the same LiSSA
    # (scale, depth) without mini-batches, in closed form, so that truncation and sampling error are separate
    "mnist": {
        "dataset": "mnist-small", "n_train": 300, "n_test": 100, "model": "mlp", "width": 4, "dtype": "float64",
        # theta* at a stationary point: a cosine-decayed learning rate (the constant rate left 8 of 30 models at
        # gradient norms 0.11-0.70, above rules.GRAD_NORM_LIMIT; decayed, the worst of them measured 0.01-0.05)
        "optimizer": "adam", "lr": 0.01, "steps": 1000, "lr_schedule": "cosine", "loo_lr_schedule": "cosine",
        "methods": ["exact", "cg", "lissa", "arnoldi"], "damping": 0.01,
        "method_options": {"lissa": {"depth": 300, "batch_size": 50, "scale": 50.0}, "arnoldi": {"rank": 30},
                           "cg": {"max_iter": 300}},
        "lissa_truncated": True,
        "remove": "top", "k": 15, "n_random_test": 1,
        "loo_optimizer": "adam", "loo_lr": 0.001, "loo_steps": 200,
    },
    # deeper CNNs (paper section "CIFAR-10"): CIFAR-10 when present, else the named Fashion-MNIST stand-in. theta*
    # is trained to a stationary point (issue "Verdicts a referee would sign"): 2,000 full-batch Adam steps with the
    # learning rate decayed to 0 (cosine), which measured gradient norms of 0.003-0.02 on the depth-3 models, against
    # 1-23 after the 300 constant-rate steps used before; models above rules.GRAD_NORM_LIMIT are excluded by the
    # verdict. The warm-start LOO retraining decays its rate the same way, so that it also settles
    "cnn": {
        "dataset": "cifar10", "fallback": "fashion-mnist", "n_train": 100, "n_test": 100, "dtype": "float32",
        "model": "small_cnn", "depth": 2, "width": 4, "weight_decay": 0.001,
        "optimizer": "adam", "lr": 0.01, "steps": 2000, "lr_schedule": "cosine",
        "methods": ["exact"], "damping": 0.01, "params": "last",
        "remove": "top", "k": 8, "n_random_test": 0,
        "loo_optimizer": "adam", "loo_lr": 0.001, "loo_steps": 100, "loo_lr_schedule": "cosine",
    },
    # test-point dependence: every test point of a small test set is examined, across seeds. The solver is MINRES:
    # with CG, one model in 10 (depth 3, seed 4) was refused (lambda_min < -damping, so the damped Hessian is
    # indefinite and CG meets negative curvature); MINRES solves the same non-singular system
    "test-points": {
        "dataset": "mnist-small", "n_train": 150, "n_test": 30, "model": "mlp", "width": 8, "dtype": "float64",
        "weight_decay": 0.001, "optimizer": "adam", "lr": 0.01, "steps": 2000, "lr_schedule": "cosine",
        "loo_lr_schedule": "cosine", "methods": ["minres"], "damping": 0.01,
        "method_options": {"minres": {"max_iter": 2000}},
        "remove": "all", "k": 25, "n_random_test": 28,
        "loo_optimizer": "adam", "loo_lr": 0.001, "loo_steps": 150,
    },
    # beyond the paper: the linear datamodeling score (influence_lib.lds; its own runner). The base is the Iris
    # setting of the "iris" sweep (same data, model, training and damping -> the same theta*), every inverse-HVP
    # method, 100 random half-size subsets retrained warm-started like the LOO ground truth, plus a LOO contrast.
    "lds": {
        "runner": "lds", "dataset": "iris", "model": "mlp", "activation": "relu", "width": 5, "dtype": "float64",
        "weight_decay": 0.005, "optimizer": "adam", "lr": 0.01, "steps": 10000,
        "methods": ["exact", "cg", "lissa", "arnoldi", "ekfac"], "damping": 0.001,
        "method_options": {"lissa": {"depth": 1000, "batch_size": 30}, "arnoldi": {"rank": 10}},
        "alphas": [0.5], "n_subsets": 100,
        "retrain_optimizer": "adam", "retrain_lr": 0.001, "retrain_steps": 2000,
        "loo_points": "all", "loo_k": 25,
    },
    # "beyond the paper": influence (exact Hessian and Gauss-Newton) against two ground truths, leave-one-out
    # retraining and the proximal Bregman response function (Bae et al. 2022), on the Iris MLPs. Shorter runs than
    # the "iris" preset (compute budget); damping 0.01 rather than 0.001 so that the PBRF, whose conditioning is
    # lambda_max / (wd + damping), can be solved with 1,000 heavy-ball steps
    "pbrf": {
        "dataset": "iris", "model": "mlp", "activation": "relu", "dtype": "float64", "width": 5,
        "optimizer": "adam", "lr": 0.01, "steps": 3000,
        "methods": ["exact"], "curvatures": ["hessian", "gauss-newton"], "damping": 0.01,
        "remove": "all", "k": 25, "n_random_test": 3,
        "loo_optimizer": "adam", "loo_lr": 0.001, "loo_steps": 1000,
        "pbrf": True, "pbrf_optimizer": "sgd", "pbrf_lr": "auto", "pbrf_momentum": 0.97, "pbrf_steps": 1000,
    },
}

# the LOO noise ceiling (issue "Verdicts a referee would sign"): models of the Iris, small-MNIST and CNN sweeps
# (the same settings, hence the same theta* and scores), whose top-k removals are retrained twice more: warm start
# for twice the steps (does the ground truth move when it trains longer?) and cold start from another initialisation
# (seed + 1000) for the full training length (the LOO under another seed). The agreement of the chapter's LOO with
# each replicate is how high any estimate's agreement with it could be. Only the examined highest- and median-loss
# test points and their pooled top-k removals are retrained (remove="top"), the exact method only
_CEILING_COLD_SEED = 1000


def _ceiling(base: str, k: int, replicate_k: int | None = None, primary_only: bool = False) -> dict[str, Any]:
    """The ceiling preset of sweep ``base``: its setting, the exact method (``primary_only``: the base's first method
    and its options, where the exact Hessian is too large), the pooled top-``k`` removals, two replicates."""
    b = PRESETS[base]
    cold = {"warm_start": False, "seed": _CEILING_COLD_SEED, "steps": b["steps"], "lr": b["lr"]}
    if b.get("lr_schedule", "constant") != "constant":
        cold["lr_schedule"] = b["lr_schedule"]
    methods = {"methods": b["methods"][:1], "method_options": b.get("method_options", {})} if primary_only else \
        {"methods": ["exact"], "method_options": {}}
    return {**b, **methods, "lissa_truncated": False, "remove": "top", "k": k,
            "n_random_test": 0, "loo_replicates": [{"steps": 2 * b["loo_steps"]}, cold],
            "loo_replicate_k": replicate_k}


# two ground truths on smooth small-MNIST MLPs, as "iris-newton" for Iris: the "mnist" setting with tanh units and a
# weight decay of 0.01 (with 0.001 the Newton polish of theta* stalled at gradient norms near 1e-3 after 100
# iterations on this non-convex objective; with 0.01 it converged in 10), the exact Hessian only; the warm-start Adam
# LOO and the Newton-converged LOO of the same removals
PRESETS["mnist-newton"] = {**{k: v for k, v in PRESETS["mnist"].items() if k != "lissa_truncated"},
                           "activation": "tanh", "weight_decay": 0.01, "polish": True, "loo_newton": True,
                           "methods": ["exact"], "method_options": {}}

PRESETS["iris-ceiling"] = _ceiling("iris", 25)
PRESETS["mnist-ceiling"] = _ceiling("mnist", 15)
PRESETS["cnn-ceiling"] = _ceiling("cnn", 8, replicate_k=4)
PRESETS["test-points-ceiling"] = _ceiling("test-points", 25, primary_only=True)

#: the small-MNIST model of the "mnist" sweep (depth 1, width 4, wd 0.001) inside the "lds" sweep
_LDS_MNIST = {"dataset": ["mnist-small"], "n_train": [300], "n_test": [100], "width": [4], "depth": [1],
              "weight_decay": [0.001], "steps": [1000], "damping": [0.01],
              "method_options": [{"lissa": {"depth": 300, "batch_size": 50, "scale": 50.0}, "arnoldi": {"rank": 30},
                                  "cg": {"max_iter": 300}}],
              "n_subsets": [64], "retrain_steps": [200], "loo_points": [64]}

_QUICK_IRIS = {"steps": 300, "loo_steps": 100}

# the ground-truth chapter (influence_lib.experiments.noise): per training-set size and seed one theta*, the same
# removals retrained under several protocols. Retraining lengths are fixed in epochs (passes over the data), so that
# every size gets the same amount of retraining (a fixed step count would give 67 epochs at n = 150 and 6.7 at
# n = 1500, and the noise would grow by design); four sizes, rules.SEEDS["ground-truth"] theta* seeds per size. The
# removals are chosen by Gauss-Newton influence (positive semi-definite: CG always converges; with the Hessian, one
# model in 20 had lambda_min < -damping and CG refused it)
NOISE_PRESET: dict[str, Any] = {
    "dataset": "mnist-small", "n_test": 200, "model": "mlp", "depth": 1, "width": 16, "dtype": "float64",
    "weight_decay": 0.001, "optimizer": "adam", "lr": 0.01, "steps": 1500, "method": "cg",
    "curvature": "gauss-newton", "damping": 0.01,
    "method_options": {"max_iter": 300}, "roles": ["highest", "median"], "k": 5,
    "runs": [{"epochs": 100, "batch_size": None, "seed": 0}, {"epochs": 200, "batch_size": None, "seed": 0},
             {"epochs": 20, "batch_size": 50, "seed": 0}, {"epochs": 20, "batch_size": 50, "seed": 1},
             {"epochs": 20, "batch_size": 50, "seed": 2}],
}
PRESETS["ground-truth"] = NOISE_PRESET
_QUICK_RUNS = [{"epochs": 20, "batch_size": None, "seed": 0}, {"epochs": 40, "batch_size": None, "seed": 0},
               {"epochs": 5, "batch_size": 20, "seed": 0}, {"epochs": 5, "batch_size": 20, "seed": 1}]
NOISE_SIZES: dict[str, list[int]] = {"default": [150, 300, 600, 1200], "quick": [60, 240]}
_NOISE_GRIDS: dict[str, list[dict[str, Any]]] = {
    "default": [{"n_train": NOISE_SIZES["default"]}],
    "quick": [{"n_train": NOISE_SIZES["quick"], "n_test": [40], "steps": [200], "runs": [_QUICK_RUNS], "k": [3]}],
}


GRIDS: dict[str, dict[str, tuple[list[dict[str, Any]], list[int]]]] = {
    # each grid is a list of partial grids (unioned), so that depth and width sweeps share depth=1,width=5
    "iris": {
        "default": ([{"depth": IRIS_DEPTHS, "width": [5], "weight_decay": [0.0, 0.005], "n_random_test": [28]},
                     {"depth": [1], "width": IRIS_WIDTHS[1:], "weight_decay": [0.0, 0.005], "n_random_test": [28]}],
                    list(range(SEEDS["iris"]))),
        "quick": ([{"depth": [1, 3], "width": [5], "weight_decay": [0.0, 0.005], **{k: [v] for k, v in
                                                                              _QUICK_IRIS.items()}},
                   {"depth": [1], "width": [10], "weight_decay": [0.0, 0.005], **{k: [v] for k, v in
                                                                             _QUICK_IRIS.items()}}], [0]),
    },
    "iris-newton": {"default": ([{"depth": [1, 2, 3, 4]}], list(range(SEEDS["iris-newton"]))),
                    "quick": ([{"depth": [1], "steps": [300], "loo_steps": [100], "n_random_test": [2]}], [0])},
    "iris-replication": {"default": ([{"weight_decay": [0.0, 0.005]}], list(range(SEEDS["iris-replication"]))),
                         "quick": ([{"weight_decay": [0.0, 0.005], "steps": [600], "loo_steps": [100]}], [0])},
    "convex-iris": {"default": ([{"loo_normalization": ["full", "remaining"]}], [0, 1, 2]),
                    "quick": ([{"steps": [500], "loo_steps": [300], "loo_normalization": ["full", "remaining"]}],
                              [0])},
    "convex-mnist": {"default": ([{}], [0, 1, 2]),
                     "quick": ([{"n_train": [200], "n_test": [50], "k": [10]}], [0])},
    "mnist": {"default": ([{"depth": [1, 2], "weight_decay": [0.0, 0.001]},
                           {"depth": [3], "weight_decay": [0.001]},
                           {"depth": [1], "width": [2], "weight_decay": [0.001]}],
                          list(range(SEEDS["mnist"]))),
              "quick": ([{"depth": [1], "width": [2], "weight_decay": [0.0, 0.001], "n_train": [100], "n_test": [40],
                          "steps": [200], "loo_steps": [50], "k": [6]}], [0])},
    # three families x three depths (conv layers, VGG stages, residual blocks) x with and without weight decay
    "cnn": {"default": ([{"model": ["small_cnn", "vgg", "resnet"], "depth": [1, 2, 3], "weight_decay": [0.0, 0.001]}],
                        list(range(SEEDS["cnn"]))),
            "quick": ([{"model": ["small_cnn", "vgg", "resnet"], "depth": [1], "n_train": [40], "n_test": [40],
                        "steps": [50], "loo_steps": [20], "k": [5]},
                       {"model": ["small_cnn"], "depth": [1], "n_train": [40], "n_test": [40], "params": ["all"],
                        "dtype": ["float64"], "steps": [50], "loo_steps": [20], "k": [5]}], [0])},
    "iris-ceiling": {"default": ([{"depth": [1, 4], "weight_decay": [0.005]}, {"depth": [1], "weight_decay": [0.0]}],
                                 list(range(SEEDS["ceiling"]))),
                     "quick": ([{"depth": [1], "weight_decay": [0.005], **{k: [v] for k, v in _QUICK_IRIS.items()},
                                 "loo_replicates": [[{"steps": 200}, {"warm_start": False, "seed": 1000, "steps": 300,
                                                                      "lr": 0.01}]]}], [0])},
    "mnist-newton": {"default": ([{"depth": [1, 2]}], list(range(SEEDS["mnist-newton"]))),
                     "quick": ([{"depth": [1], "n_train": [100], "n_test": [40], "steps": [200], "loo_steps": [50],
                                 "k": [6]}], [0])},
    "mnist-ceiling": {"default": ([{"depth": [1, 3], "weight_decay": [0.001]}], list(range(SEEDS["ceiling"]))),
                      "quick": ([{"depth": [1], "width": [2], "weight_decay": [0.001], "n_train": [100],
                                  "n_test": [40], "steps": [200], "loo_steps": [50], "k": [6],
                                  "loo_replicates": [[{"steps": 100}, {"warm_start": False, "seed": 1000,
                                                                       "steps": 200, "lr": 0.01}]]}], [0])},
    "cnn-ceiling": {"default": ([{"model": ["small_cnn"], "depth": [1, 3], "weight_decay": [0.001]}],
                                list(range(SEEDS["ceiling"]))),
                    "quick": ([{"model": ["small_cnn"], "depth": [1], "n_train": [40], "n_test": [40], "steps": [50],
                                "loo_steps": [20], "k": [5],
                                "loo_replicates": [[{"steps": 40}, {"warm_start": False, "seed": 1000, "steps": 50,
                                                                    "lr": 0.01, "lr_schedule": "cosine"}]]}], [0])},
    "test-points-ceiling": {"default": ([{"depth": [1, 3]}], list(range(SEEDS["ceiling"]))),
                            "quick": ([{"depth": [1], "n_train": [50], "n_test": [20], "steps": [200],
                                        "loo_steps": [40], "k": [10],
                                        "loo_replicates": [[{"steps": 80}, {"warm_start": False, "seed": 1000,
                                                                            "steps": 200, "lr": 0.01,
                                                                            "lr_schedule": "cosine"}]]}], [0])},
    "pbrf": {"default": ([{"depth": [1, 2, 4, 8], "weight_decay": [0.0, 0.005]}], list(range(SEEDS["pbrf"]))),
             "quick": ([{"depth": [1, 2], "weight_decay": [0.0, 0.005], "steps": [300], "loo_steps": [100],
                         "pbrf_steps": [100], "n_random_test": [1]}], [0])},
    "test-points": {"default": ([{"depth": [1, 3]}], list(range(SEEDS["test-points"]))),
                    "quick": ([{"depth": [1], "n_train": [50], "n_test": [20], "n_random_test": [18],
                                "steps": [200], "loo_steps": [40], "k": [10]}], [0, 1])},
    "ground-truth": {"default": (_NOISE_GRIDS["default"], list(range(SEEDS["ground-truth"]))),
                     "quick": (_NOISE_GRIDS["quick"], [0, 1])},
    "lds": {"default": ([{"depth": [1], "alphas": [[0.5, 0.9]]}, {"depth": [3]}, _LDS_MNIST],
                        list(range(SEEDS["lds"]))),
            "quick": ([{"depth": [1], "steps": [300], "retrain_steps": [100], "n_subsets": [20]},
                       {**_LDS_MNIST, "n_train": [100], "n_test": [40], "width": [2], "steps": [200],
                        "retrain_steps": [50], "n_subsets": [20], "loo_points": [20]}], [0])},
}


#: book grids whose committed records are knowingly incomplete (a recompute under way), with what is missing; the
#: chapter computes the missing records when it is built (tests/test_sweep.py keeps this list honest both ways)
INCOMPLETE: dict[str, str] = {
}

#: the runner of each sweep whose settings carry no "runner" key (default: "influence")
KINDS: dict[str, str] = {"ground-truth": "noise"}


def settings(name: str, profile: str, overrides: dict[str, Any] | None = None,
             seeds: list[int] | None = None) -> list[dict[str, Any]]:
    """The settings of sweep ``name`` on ``profile``, with ``overrides`` applied to every setting."""
    if name not in PRESETS:
        raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
    base = PRESETS[name]
    if profile not in GRIDS[name]:
        raise ValueError(f"profile must be one of {sorted(GRIDS[name])}, got {profile!r}")
    grids, default_seeds = GRIDS[name][profile]
    out: list[dict[str, Any]] = []
    seen = set()
    for grid in grids:
        for s in expand({**base, **(overrides or {})}, grid, default_seeds if seeds is None else seeds,
                        kind=KINDS.get(name)):
            key = repr(sorted(s.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out


#: the keys that make a setting small: on the quick profile, a grid of one's own starts from the quick sizes
_SIZE_KEYS = ("steps", "loo_steps", "n_train", "n_test", "k", "pbrf_steps", "retrain_steps", "n_subsets",
              "n_random_test", "runs", "loo_points")


def quick_base(name: str) -> dict[str, Any]:
    """The sizes of sweep ``name``'s quick grid (steps, data and subset sizes), to shrink any grid on that profile."""
    if name not in GRIDS:
        raise ValueError(f"name must be one of {sorted(GRIDS)}, got {name!r}")
    first = GRIDS[name]["quick"][0][0]
    return {k: v[0] for k, v in first.items() if k in _SIZE_KEYS and len(v) == 1}

