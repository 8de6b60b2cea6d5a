"""Core benchmarks of influence_lib, measured side by side in one run on this machine.

    .venv/bin/python benchmarks/bench_core.py [--quick] [--threads N] [--out benchmarks/results/core.json]

Three measurements, each on the Iris data (float64) and float64 MLPs (depth 1 and depth 4, width 5):

1. leave-one-out retraining of every training point (plus the full-data reference model): the batched
   ``il.retrain_without`` (all models at once, vmap over stacked parameters) against the loop a user writes
   by hand (deepcopy, ``torch.optim.Adam``, the same number of full-batch steps on the data without the
   point; as ``tests/test_retrain.py::sequential_loo``). Both give the same numbers: the maximal absolute
   difference of the loss changes is reported.
2. the cost of a Hessian-vector product relative to a gradient (full batch): rebuilt per call, with the
   gradient graph cached (``HessianOperator``), and per vector in a block of 16.
3. the wall time of ``il.influence`` (every training point for every test point) per method, with the
   agreement of the scores with the exact ones.

Timings are medians of repeats interleaved between the compared variants (A B A B ...), so that a change of
machine load hits both; ratios are the numbers to read. The results go to ``benchmarks/results/core.json``
(written atomically) and a table is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import influence_lib as il
from influence_lib.curvature import HessianOperator
from influence_lib.data import load_dataset
from influence_lib.models import count_params, mlp
from influence_lib.objective import Objective

ROOT = Path(__file__).resolve().parent
WD = 5e-3
DAMPING = 1e-2


def machine_info(threads: int) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    """Median wall time of ``repeats`` calls of ``fn`` (and its last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def interleaved(fns: dict, repeats: int) -> dict:
    """Time several functions A B C A B C ...; returns {name: (median, all times, last result)}."""
    times = {k: [] for k in fns}
    outs = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), v, outs[k]) for k, v in times.items()}


def atomic_write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# --- the problem ------------------------------------------------------------------------------------
def iris_problem(depth: int, width: int, seed: int = 0):
    ds = load_dataset("iris", dtype=torch.float64)
    model = mlp(ds.in_shape[0], ds.n_classes, depth=depth, width=width, activation="tanh", seed=seed,
                dtype=torch.float64)
    il.train_model(model, F.cross_entropy, (ds.X_train, ds.y_train), weight_decay=WD, optimizer="adam",
                   lr=1e-2, steps=3000)
    return model, (ds.X_train, ds.y_train), (ds.X_test, ds.y_test)


def adam_fit(model, X, y, *, wd, lr, steps):
    """A copy of ``model`` trained full-batch with ``torch.optim.Adam`` on mean cross-entropy + (wd/2)||theta||^2."""
    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(m(X), y) + 0.5 * wd * sum((p * p).sum() for p in m.parameters())
        loss.backward()
        opt.step()
    return m


def sequential_loo(model, X, y, Xt, yt, remove, *, wd, lr, steps):
    """What a user writes by hand: copy the model, drop the point, train with torch.optim.Adam, measure."""

    def fit(Xs, ys):
        m = adam_fit(model, Xs, ys, wd=wd, lr=lr, steps=steps)
        with torch.no_grad():
            return F.cross_entropy(m(Xt), yt, reduction="none")

    ref = fit(X, y)
    out = []
    for i in remove:
        keep = torch.arange(len(X)) != i
        out.append(fit(X[keep], y[keep]) - ref)
    return torch.stack(out)


def bench_loo(model, train, test, *, steps: int, repeats: int, lr: float = 1e-3) -> dict:
    X, y = train
    remove = list(range(len(X)))

    def batched():
        return il.loo_retrain(model, F.cross_entropy, train, test, remove, weight_decay=WD, optimizer="adam",
                              lr=lr, steps=steps, progress=False)

    def sequential():
        return sequential_loo(model, X, y, *test, remove, wd=WD, lr=lr, steps=steps)

    r = interleaved({"batched": batched, "sequential": sequential}, repeats)
    diff = float((r["batched"][2] - r["sequential"][2]).abs().max())
    scale = float(r["sequential"][2].abs().max())
    models = len(remove) + 1
    return {
        "n_train": len(X), "models_trained": models, "steps": steps, "lr": lr, "optimizer": "adam",
        "batched_s": r["batched"][0], "sequential_s": r["sequential"][0],
        "batched_all_s": r["batched"][1], "sequential_all_s": r["sequential"][1],
        "speedup": r["sequential"][0] / r["batched"][0],
        "batched_model_steps_per_s": models * steps / r["batched"][0],
        "sequential_model_steps_per_s": models * steps / r["sequential"][0],
        "max_abs_diff": diff, "max_abs_loss_change": scale,
    }


def bench_hvp(model, train, *, repeats: int, block: int = 16, inner: int = 20) -> dict:
    obj = Objective(model, F.cross_entropy, *train, weight_decay=WD)
    theta = obj.theta()
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(obj.p, generator=gen, dtype=theta.dtype)
    V = torch.randn(obj.p, block, generator=gen, dtype=theta.dtype)
    op = HessianOperator(obj, theta, densify=False)  # products by AD every time (no switch to a dense matrix)
    op.matmat(V)  # build the cached graph once (as every solver does)

    def loop(fn):
        def run():
            for _ in range(inner):
                out = fn()
            return out
        return run

    r = interleaved({
        "gradient": loop(lambda: obj.gradient(theta)),
        "hvp_rebuilt": loop(lambda: obj.hvp(theta, v)),
        "hvp_cached": loop(lambda: op.matvec(v)),
        "hvp_block": loop(lambda: op.matmat(V)),
    }, repeats)
    t = {k: val[0] / inner for k, val in r.items()}
    H = obj.hessian(theta)
    err = float((op.matmat(V) - H @ V).norm() / (H @ V).norm())
    return {
        "p": obj.p, "n": obj.n, "block": block,
        "gradient_s": t["gradient"], "hvp_rebuilt_s": t["hvp_rebuilt"], "hvp_cached_s": t["hvp_cached"],
        "hvp_block_s": t["hvp_block"],
        "ratio_hvp_rebuilt_over_grad": t["hvp_rebuilt"] / t["gradient"],
        "ratio_hvp_cached_over_grad": t["hvp_cached"] / t["gradient"],
        "ratio_hvp_per_vector_in_block_over_grad": t["hvp_block"] / block / t["gradient"],
        "hvp_rel_error_vs_dense": err,
    }


METHOD_OPTIONS = {
    "exact": {},
    "cg": {"tol": 1e-8},
    "lissa": {"depth": 500},
    "arnoldi": {"rank": 20},
}


def bench_influence(model, train, test, *, repeats: int) -> dict:
    fns = {m: (lambda m=m: il.influence(model, F.cross_entropy, train, test, weight_decay=WD, method=m,
                                        damping=DAMPING, **METHOD_OPTIONS[m]))
           for m in METHOD_OPTIONS}
    r = interleaved(fns, repeats)
    ref = r["exact"][2]
    out = {}
    for m, (med, all_t, s) in r.items():
        out[m] = {
            "time_s": med, "all_s": all_t, "options": METHOD_OPTIONS[m],
            "rel_error_vs_exact": float((s - ref).norm() / ref.norm()),
            "pearson_vs_exact": il.pearson(s.flatten(), ref.flatten()),
        }
    return {"n_train": len(train[0]), "n_test": len(test[0]), "damping": DAMPING, "methods": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps and repeats (well under a minute)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the models are tiny and the machine is shared)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/core.json (core_quick.json with --quick)")
    ap.add_argument("--parts", default="loo,hvp,influence",
                    help="comma-separated subset of loo,hvp,influence; a subset re-measures only those parts and "
                         "keeps the others from the existing output file (recorded under 'remeasured')")
    args = ap.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    if args.out is None:
        args.out = ROOT / "results" / ("core_quick.json" if args.quick else "core.json")
    torch.set_num_threads(args.threads)
    steps = 50 if args.quick else 200
    reps = 1 if args.quick else 2
    configs = [(1, 5), (4, 5)]
    t_start = time.perf_counter()
    record = {"machine": machine_info(args.threads), "quick": args.quick,
              "settings": {"dataset": "iris", "dtype": "float64", "weight_decay": WD, "damping": DAMPING,
                           "activation": "tanh", "loo_steps": steps, "repeats": reps},
              "models": []}
    old = None
    if set(parts) != {"loo", "hvp", "influence"}:
        old = json.loads(args.out.read_text())
        record = old
        record.setdefault("remeasured", []).append({"parts": parts, "machine": machine_info(args.threads)})
    for i, (depth, width) in enumerate(configs):
        model, train, test = iris_problem(depth, width)
        name = f"iris-mlp-d{depth}w{width}"
        print(f"[{name}] p={count_params(model)} n_train={len(train[0])} n_test={len(test[0])}", flush=True)
        entry = record["models"][i] if old else {"model": name, "depth": depth, "width": width,
                                                 "p": count_params(model)}
        if "loo" in parts:
            entry["loo"] = bench_loo(model, train, test, steps=steps, repeats=reps)
        if "hvp" in parts:
            entry["hvp"] = bench_hvp(model, train, repeats=max(3, reps))
        if "influence" in parts:
            entry["influence"] = bench_influence(model, train, test, repeats=max(3, reps))
        if not old:
            record["models"].append(entry)
    if old:
        record["remeasured"][-1]["total_s"] = time.perf_counter() - t_start
        record["remeasured"][-1]["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    else:
        record["total_s"] = time.perf_counter() - t_start
        record["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    atomic_write_json(args.out, record)
    print_tables(record)
    print(f"\nwritten {args.out} ({record['total_s']:.0f} s)")
    ok = all(m["loo"]["speedup"] >= 10 for m in record["models"])
    print("target batched LOO >= 10x the sequential loop:", "met" if ok else "NOT met")
    return 0


def print_tables(rec: dict) -> None:
    m = rec["machine"]
    print(f"\nmachine: {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} thread(s), "
          f"load {m['loadavg_1_5_15']} at start, {m.get('loadavg_end')} at end")
    print("\nLOO retraining, every training point removed (+ reference), Adam, full batch")
    print(f"{'model':<16}{'p':>5}{'models':>8}{'steps':>7}{'batched s':>11}{'loop s':>9}{'speedup':>9}"
          f"{'max|diff|':>11}")
    for e in rec["models"]:
        lo = e["loo"]
        print(f"{e['model']:<16}{e['p']:>5}{lo['models_trained']:>8}{lo['steps']:>7}{lo['batched_s']:>11.2f}"
              f"{lo['sequential_s']:>9.2f}{lo['speedup']:>8.1f}x{lo['max_abs_diff']:>11.1e}")
    print("\nHVP cost / gradient cost (full batch)")
    print(f"{'model':<16}{'grad ms':>9}{'HVP rebuilt':>13}{'HVP cached':>12}{'per vec in block':>18}")
    for e in rec["models"]:
        h = e["hvp"]
        print(f"{e['model']:<16}{1e3 * h['gradient_s']:>9.3f}{h['ratio_hvp_rebuilt_over_grad']:>12.2f}x"
              f"{h['ratio_hvp_cached_over_grad']:>11.2f}x{h['ratio_hvp_per_vector_in_block_over_grad']:>17.2f}x")
    print("\nil.influence, all training points x all test points")
    print(f"{'model':<16}{'method':<9}{'time s':>9}{'vs exact':>10}{'rel.err':>10}{'pearson':>10}")
    for e in rec["models"]:
        ms = e["influence"]["methods"]
        for k, v in ms.items():
            print(f"{e['model']:<16}{k:<9}{v['time_s']:>9.3f}{v['time_s'] / ms['exact']['time_s']:>9.2f}x"
                  f"{v['rel_error_vs_exact']:>10.1e}{v['pearson_vs_exact']:>10.6f}")


if __name__ == "__main__":
    sys.exit(main())
