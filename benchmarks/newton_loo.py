"""Newton-converged leave-one-out of every Iris training point against the book's warm-start Adam LOO.

    .venv/bin/python benchmarks/newton_loo.py [--cases relu:0.0,relu:0.005,tanh:0.0,tanh:0.005] [--threads 1]

The setting is the "iris" preset of the book (``influence_lib/experiments/presets.py``, written out below so that
this script does not depend on the apparatus): Iris (120 training, 30 test points, data seed 0), a float64 MLP of
depth 1 and width 5 trained to ``theta*`` by full-batch Adam (lr 0.01, 10,000 steps); then leave-one-out of all
120 training points with the full-data reference retrained the same way (``reference="retrained"``):

1. ``adam``: the preset's ground truth, warm-start Adam, lr 0.001, 3,000 full-batch steps per model;
2. ``newton``: ``optimizer="newton"`` (:mod:`influence_lib.newton`), warm start, to the default relative
   gradient-norm tolerance (1e-10 in float64), ``on_failure="flag"`` so that every case reports.

Cases: the preset's ReLU and, as the smooth counterpart, tanh, each at the two weight decays of the iris grid
(0 and 0.005). With ReLU the minimiser of a retrained model can lie on a kink (a training point exactly at a
hidden unit's hinge), where the gradient does not vanish: Newton then stalls and the model is flagged (the smallest
first-layer pre-activation at ``theta*`` is recorded as the evidence). Without weight decay a network that fits every
training point has no finite minimiser: the tolerance is met far out (``max_param_change_from_reference``,
``reference_moved_from_theta_star``), and such a "ground truth" is not one.

Both are timed in the same run (one after the other, same process and thread count) and the ratio printed, with
the largest final gradient norm of each (every model, the reference included), Newton's iterations, and the
difference between the two ground truths (the optimiser error of the Adam one). Writes
``benchmarks/results/newton_loo.json`` atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import influence_lib as il  # noqa: E402
from influence_lib.data import load_dataset  # noqa: E402
from influence_lib.models import build_model  # noqa: E402

#: the "iris" preset (training to theta* and the LOO ground truth)
PRESET = {"dataset": "iris", "data_seed": 0, "model": "mlp", "activation": "relu", "dtype": "float64",
          "optimizer": "adam", "lr": 0.01, "steps": 10000,
          "loo_optimizer": "adam", "loo_lr": 0.001, "loo_steps": 3000, "loo_reference": "retrained",
          "loo_normalization": "remaining"}  # activation and weight decay: per case


def finite_or_none(obj):
    """The same structure with every non-finite float replaced by None (valid JSON: no NaN)."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(finite_or_none(obj), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def run_case(activation: str, weight_decay: float, depth: int, width: int, seed: int) -> dict:
    """theta*, then the Adam and the Newton LOO of every training point, timed one after the other."""
    s = PRESET
    load_before = [round(x, 2) for x in os.getloadavg()]
    ds = load_dataset(s["dataset"], seed=s["data_seed"], dtype=torch.float64, flatten=True)
    model = build_model(s["model"], in_shape=tuple(ds.X_train.shape[1:]), n_classes=ds.n_classes, seed=seed,
                        dtype=torch.float64, depth=depth, width=width, activation=activation)
    train, test = (ds.X_train, ds.y_train), (ds.X_test, ds.y_test)
    n = len(ds.y_train)
    t0 = time.perf_counter()
    fit = il.train_model(model, F.cross_entropy, train, weight_decay=weight_decay, optimizer=s["optimizer"],
                         lr=s["lr"], steps=s["steps"], seed=seed)
    t_train = time.perf_counter() - t0
    theta_star = il.flat_params(model)
    common = dict(weight_decay=weight_decay, reference=s["loo_reference"], normalization=s["loo_normalization"],
                  progress=False)
    remove = list(range(n))
    t0 = time.perf_counter()
    adam = il.retrain_without(model, F.cross_entropy, train, test, remove, optimizer=s["loo_optimizer"],
                              lr=s["loo_lr"], steps=s["loo_steps"], **common)
    t_adam = time.perf_counter() - t0
    t0 = time.perf_counter()
    newton = il.retrain_without(model, F.cross_entropy, train, test, remove, optimizer="newton", on_failure="flag",
                                **common)
    t_newton = time.perf_counter() - t0
    ok = torch.cat([newton.converged, torch.tensor([bool(newton.ref_converged)])])
    gn = torch.cat([newton.grad_norm, torch.tensor([newton.ref_grad_norm], dtype=newton.grad_norm.dtype)])
    its = torch.cat([newton.iterations, torch.tensor([newton.ref_iterations])])
    case = {
        "activation": activation, "weight_decay": weight_decay, "depth": depth, "width": width, "seed": seed,
        "p": sum(p.numel() for p in model.parameters()), "models_retrained": n + 1,
        "theta_star": {"train_seconds": t_train, "loss": fit["loss"], "grad_norm": fit["grad_norm"]},
        "adam_loo": {"seconds": t_adam, "max_grad_norm": max(float(adam.grad_norm.max()), adam.ref_grad_norm),
                     "median_grad_norm": float(adam.grad_norm.median()),
                     "max_param_change_from_reference": float(adam.param_change.norm(dim=1).max())},
        "newton_loo": {"seconds": t_newton, "converged": int(ok.sum()), "of": ok.numel(),
                       "max_grad_norm": float(gn.max()), "median_grad_norm": float(gn.median()),
                       "iterations_max": int(its.max()), "iterations_median": float(its.double().median()),
                       # ||theta_-i - theta_ref|| of the converged models: large where no finite minimiser exists
                       "max_param_change_from_reference": float(newton.param_change[newton.converged].norm(dim=1).max())
                       if bool(newton.converged.any()) else None,
                       "reference_moved_from_theta_star": float((newton.theta_ref - theta_star).norm())},
        "speedup_adam_over_newton": t_adam / t_newton,
        "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "target_met": bool(ok.all()) and float(gn.max()) <= 1e-8 and t_adam / t_newton >= 10,
    }
    if bool(ok.all()):  # the optimiser error of the Adam ground truth (Newton as the reference)
        diff = (adam.loss_change - newton.loss_change).abs()
        case["ground_truth_difference"] = {
            "max_abs": float(diff.max()), "median_abs": float(diff.median()),
            "median_abs_newton_change": float(newton.loss_change.abs().median()),
            "pearson_adam_vs_newton": il.pearson(adam.loss_change.flatten(), newton.loss_change.flatten())}
    else:  # piecewise-linear activations: where the minimiser lies on a kink the gradient does not vanish
        X = ds.X_train
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        with torch.no_grad():
            case["smallest_abs_first_layer_preactivation_at_theta_star"] = float(first(X).abs().min())
    return case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="relu:0.0,relu:0.005,tanh:0.0,tanh:0.005",
                    help="activation:weight_decay pairs (the iris grid's weight decays are 0 and 0.005)")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--width", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "newton_loo.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = []
    for item in args.cases.split(","):
        act, wd = item.split(":")
        case = run_case(act, float(wd), args.depth, args.width, args.seed)
        cases.append(case)
        a, nt = case["adam_loo"], case["newton_loo"]
        print(f"{act:>5} wd {float(wd):<6g} p={case['p']}: theta* grad {case['theta_star']['grad_norm']:.1e} | "
              f"Adam LOO {a['seconds']:6.1f} s (max grad {a['max_grad_norm']:.1e}) | "
              f"Newton LOO {nt['seconds']:6.1f} s, "
              f"{nt['converged']}/{nt['of']} converged, max grad {nt['max_grad_norm']:.1e}, "
              f"<= {nt['iterations_max']} iterations | speed-up {case['speedup_adam_over_newton']:.1f}x | "
              f"target {'met' if case['target_met'] else 'NOT met'}", flush=True)
    out = {
        "setting": {**PRESET, "n_train": 120, "n_test": 30, "tol": il.newton.default_tol(torch.float64)},
        "machine": {"time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
                    "cpu_count": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__,
                    "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
                    "command": " ".join([Path(sys.executable).name, *sys.argv])},
        "cases": cases,
    }
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
