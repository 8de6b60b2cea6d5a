"""Side-by-side comparison of influence_lib with the anchor libraries (dattri, curvlinops, kronfluence,
torch-influence where installed), in one run on this machine.

    PYTHONPATH=. /work/benchvenv/bin/python benchmarks/compare.py [--quick] [--threads 1]

For each problem (an Iris MLP, a small CNN on small MNIST, a larger CNN on small MNIST; float64, the same
trained model, data, weight decay and damping for every library) and each inverse-HVP method that a library
offers (exact, cg to 1e-8 and to 1e-3, lissa, arnoldi, ekfac; and three more settings of influence_lib's EK-FAC,
``OURS_ONLY``), the scores of every training point for every test point are computed in a fresh subprocess, which
reports

* wall time of the whole call (gradients + curvature + solve + scores): the fastest of at least 3 calls and of
  as many more as fit in three seconds (at most 50), within 10 s, and never of fewer than 2 (the machine is a shared
  VM whose neighbours only ever add time, and a first call can carry one-off costs; each call's time is recorded),
* peak memory: ``ru_maxrss`` of the subprocess after the call minus before it (the model, data and all
  imports are loaded before the ``before`` reading),

and the parent compares the scores with the exact ones (influence_lib's float64 eigendecomposition of the
dense Hessian): relative Frobenius error and Pearson correlation. Settings are matched per method: the same
LiSSA depth and scale (full-batch recursion everywhere), the same Arnoldi rank and Krylov iterations, and for
CG the anchors get the number of steps that standard CG (one Krylov space per column) needs to reach relative
residual 1e-8 on the same system (dattri's CG has no stopping rule: it always runs ``max_iter`` steps);
influence_lib runs block CG, which stops on its own true residual after fewer steps. Also measured: leave-one-out
retraining throughput (influence_lib batched vs dattri's ``retrain_loo`` vs a plain loop) and HVP cost / gradient
cost per library.

Writes ``benchmarks/results/compare.json`` (atomically) and prints the table with ratios ours / anchor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # influence_lib and the benchmarks package

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import influence_lib as il  # noqa: E402
from influence_lib.data import load_dataset  # noqa: E402
from influence_lib.models import count_params, mlp, small_cnn  # noqa: E402

sys.path.insert(0, str(HERE))
from bench_core import adam_fit, atomic_write_json, machine_info, sequential_loo  # noqa: E402

WD = 5e-3
#: "cg-1e-3": CG to relative residual 1e-3, the tolerance of benchmarks/scale.py and of most practical use, where
#: "cg" solves to 1e-8; both are the library's method "cg"
METHODS = ("exact", "cg", "cg-1e-3", "lissa", "arnoldi", "ekfac")
#: Every measurement is the fastest of at least ``max_repeats`` calls (3) and of as many more as fit in
#: ``MIN_TOTAL_S`` seconds of calls (at most ``MAX_CALLS``), within the job's budget (10 s), and of at least two calls
#: whatever the budget: a call of a few milliseconds is then the fastest of dozens, a burst of load from a neighbour
#: on the shared machine (which only ever adds time) does not decide it, and no library is timed by a first call
#: alone (dattri's first CG call on a problem took 3.5-6.6 s against 0.3-1.1 s for the next ones, after the warm-up
#: on a few rows); the same rule for every library.
MIN_TOTAL_S, MAX_CALLS = 3.0, 50
#: Settings of influence_lib's EK-FAC measured besides its default (the exact Gauss-Newton columns), for "faster at
#: equal accuracy" against the anchors' EK-FAC, which estimate other matrices (kronfluence: sampled labels; dattri:
#: the empirical Fisher, of its nn.Linear layers only unless told otherwise): run for influence_lib only.
#: ``layers="linear"``: the parameters of the nn.Linear layers only (``params=``), the layers dattri's EK-FAC takes by
#: default; the scores are still compared with the exact ones of all parameters.
#: ``cg-1e-3-mixed``: CG to 1e-3 with float32 products and float64 iterates and residual checks (``precision="mixed"``,
#: the same float64 stopping rule), for "faster at equal accuracy" against the anchors' CG.
OURS_ONLY = {"ekfac-sampled": {"samples": 1}, "ekfac-empirical": {"fisher": "empirical"},
             "ekfac-linear": {"layers": "linear"}, "cg-1e-3-mixed": {"tol": 1e-3, "precision": "mixed"}}
LIBS = ("influence_lib", "dattri", "curvlinops", "kronfluence", "torch-influence")


def base_method(method: str) -> str:
    """The library method behind a benchmark method name (``"cg-1e-3"`` -> ``"cg"``)."""
    return method.split("-")[0]


# --- problems ---------------------------------------------------------------------------------------
def problem_specs(quick: bool) -> list[dict]:
    """The three problems. CNN inputs are the 28x28 small-MNIST digits average-pooled to 14x14 (``pool``)
    so that a float64 Hessian of every library fits the time budget of a 2-core machine."""
    iris = {"name": "iris-mlp", "kind": "mlp", "depth": 1, "width": 5, "n_train": 120, "n_test": 30}
    small = {"name": "mnist-cnn-small", "kind": "cnn", "depth": 1, "width": 4, "pool": 2, "n_train": 200,
             "n_test": 5}
    large = {"name": "mnist-cnn-large", "kind": "cnn", "depth": 2, "width": 6, "pool": 2, "n_train": 100,
             "n_test": 5}
    if quick:
        return [iris | {"n_test": 10}, small | {"n_train": 100}]
    return [iris, small, large]


def build_problem(spec: dict):
    dt = torch.float64
    if spec["kind"] == "mlp":
        ds = load_dataset("iris", dtype=dt, n_test=spec["n_test"])
        model = mlp(ds.in_shape[0], ds.n_classes, depth=spec["depth"], width=spec["width"], activation="tanh",
                    seed=0, dtype=dt)
        train_kw = {"lr": 1e-2, "steps": 3000}
    else:
        ds = load_dataset("mnist-small", dtype=dt, n_train=spec["n_train"], n_test=spec["n_test"])
        if spec.get("pool", 1) > 1:
            ds = dataclasses.replace(ds, X_train=F.avg_pool2d(ds.X_train, spec["pool"]),
                                     X_test=F.avg_pool2d(ds.X_test, spec["pool"]),
                                     in_shape=(ds.in_shape[0], *F.avg_pool2d(ds.X_test[:1], spec["pool"]).shape[2:]))
        model = small_cnn(ds.in_shape[0], ds.n_classes, image_size=ds.in_shape[-1], depth=spec["depth"],
                          width=spec["width"], activation="tanh", seed=0, dtype=dt)
        train_kw = {"lr": 1e-2, "steps": 300}
    train, test = (ds.X_train, ds.y_train), (ds.X_test, ds.y_test)
    info = il.train_model(model, F.cross_entropy, train, weight_decay=WD, optimizer="adam", **train_kw)
    return model, train, test, {"dataset": ds.name, "source": ds.source, "train": train_kw, **info}


# --- the worker: one measurement in a fresh process -------------------------------------------------
def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(job_path: str) -> None:
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    from functools import partialmethod

    import tqdm as _tqdm
    _tqdm.tqdm.__init__ = partialmethod(_tqdm.tqdm.__init__, disable=True)
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    prob = torch.load(job["problem"], weights_only=False)
    model, train, test = prob["model"], prob["train"], prob["test"]
    lib, method, kind = job["lib"], job["method"], job["kind"]
    out: dict = {"lib": lib, "method": method, "kind": kind}
    if lib not in ("influence_lib", "plain-loop"):
        adapter = load_adapter(lib)
    make = {"scores": scores_run, "hvp": hvp_run, "grad": grad_run, "loo": loo_run}[kind]
    # warm-up on a tiny slice of the data: the first torch.func call of a process imports torch._dynamo
    # (seconds); every library pays it once, so it is excluded from the timings
    small = {"n_remove": 1, "steps": 2} if kind == "loo" else {}
    warm = job | small
    if kind == "scores":  # a well-conditioned, short version of the same call (the Hessian of 8 points is not
        # that of the data set: the damping of the real call may not make it positive definite)
        short = {"depth": 5, "lissa_depth": 5, "cg_iters": 3}
        warm = warm | {"damping": max(job["damping"], 1.0),
                       "options": {k: short.get(k, v) for k, v in job["options"].items()}}
    try:
        make(warm, lib, model, (train[0][:8], train[1][:8]), (test[0][:2], test[1][:2]),
             adapter if lib not in ("influence_lib", "plain-loop") else None, {})()
    except Exception as exc:  # the warm-up only absorbs one-off costs; the real call reports errors
        out["warmup_error"] = f"{type(exc).__name__}: {exc}"[:200]
    run = make(job, lib, model, train, test, adapter if lib not in ("influence_lib", "plain-loop") else None, out)
    torch.manual_seed(0)
    before = maxrss_mb()
    times = []
    t_start = time.perf_counter()
    t_end = t_start + job.get("budget_s", 10.0)
    while True:  # at least max_repeats calls, more up to MIN_TOTAL_S of calls (at most MAX_CALLS), within budget_s
        t0 = time.perf_counter()
        res = run()
        times.append(time.perf_counter() - t0)
        now = time.perf_counter()
        if len(times) >= 2 and (len(times) >= MAX_CALLS or now + times[-1] > t_end):
            break
        if len(times) >= job.get("max_repeats", 3) and now - t_start >= MIN_TOTAL_S:
            break
    out.update({"time_s": min(times), "all_s": times, "rss_before_mb": before,
                "rss_peak_mb": maxrss_mb(), "peak_delta_mb": maxrss_mb() - before,
                "loadavg": list(os.getloadavg())})
    torch.save(res.detach().to(torch.float64), job["result"])
    Path(job["out"]).write_text(json.dumps(out))


def load_adapter(lib: str):
    """Import one adapter module without the package __init__ (which imports every anchor library)."""
    import importlib
    import types
    if "benchmarks.anchors" not in sys.modules:
        for name, path in [("benchmarks", HERE), ("benchmarks.anchors", HERE / "anchors")]:
            if name not in sys.modules:
                mod = types.ModuleType(name)
                mod.__path__ = [str(path)]
                sys.modules[name] = mod
    return importlib.import_module(f"benchmarks.anchors.{lib.replace('-', '_')}_adapter")


def scores_run(job, lib, model, train, test, adapter, out):
    opts = job["options"]
    method = base_method(job["method"])
    if lib == "influence_lib":
        def run():
            kw = dict(opts)
            calc_kw = {k: kw.pop(k) for k in ("chunk_size",) if k in kw}
            if kw.pop("layers", None) == "linear":
                calc_kw["params"] = [f"{name}.{p}" for name, m in model.named_modules()
                                     if isinstance(m, torch.nn.Linear)
                                     for p in ("weight", "bias") if getattr(m, p, None) is not None]
            calc = il.InfluenceCalculator(model, F.cross_entropy, train, weight_decay=WD, damping=job["damping"],
                                          method=method, **calc_kw, **kw)
            s = calc.scores(test)
            out["info"] = {k: v for k, v in calc.last_info.items() if k in ("iterations", "products", "rank",
                                                                           "iters", "scale", "depth", "mixed")}
            return s
        return run
    return lambda: adapter.scores(method, model, F.cross_entropy, train, test, damping=job["damping"],
                                  weight_decay=WD, **opts)


def hvp_run(job, lib, model, train, test, adapter, out):
    v = torch.randn(count_params(model), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if lib == "influence_lib":
        return lambda: il.curvature.hvp(model, F.cross_entropy, train, v, weight_decay=WD)
    return lambda: adapter.hvp(model, F.cross_entropy, train, v, weight_decay=WD)


def grad_run(job, lib, model, train, test, adapter, out):
    def run():
        obj = il.objective.Objective(model, F.cross_entropy, *train, weight_decay=WD)
        return obj.gradient(obj.theta())
    return run


def loo_run(job, lib, model, train, test, adapter, out):
    idx = list(range(job["n_remove"]))
    steps, lr = job["steps"], job["lr"]
    if lib == "influence_lib":
        return lambda: il.loo_retrain(model, F.cross_entropy, train, test, idx, weight_decay=WD, lr=lr, steps=steps,
                                      progress=False)
    if lib == "plain-loop":
        return lambda: sequential_loo(model, *train, *test, idx, wd=WD, lr=lr, steps=steps)

    def train_func(loader, seed=None):
        x = torch.cat([b[0] for b in loader])
        y = torch.cat([b[1] for b in loader])
        return adam_fit(model, x, y, wd=WD, lr=lr, steps=steps)

    return lambda: adapter.loo_retrain(train_func, F.cross_entropy, train, test, model, indices=idx).T


# --- the parent -------------------------------------------------------------------------------------
def run_job(job: dict, tmp: Path, timeout: float, mem_limit_gb: float) -> dict:
    key = f"{job['problem_name']}_{job['lib']}_{job['method']}_{job['kind']}"
    job = {**job, "out": str(tmp / f"{key}.json"), "result": str(tmp / f"{key}.pt")}
    jp = tmp / f"{key}.job.json"
    jp.write_text(json.dumps(job))

    def limit():
        lim = int(mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(job["threads"]), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(jp)], env=env,
                              capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout:.0f} s", "wall_s": timeout}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not Path(job["out"]).exists():
        err = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        if "MemoryError" in proc.stderr or "can't allocate" in proc.stderr or "std::bad_alloc" in proc.stderr:
            err = f"out of memory (limit {mem_limit_gb:g} GB): {err}"
        return {"status": "error", "error": err, "wall_s": wall}
    res = json.loads(Path(job["out"]).read_text())
    res.update({"status": "ok", "wall_s": wall, "value": torch.load(job["result"])})
    return res


def agreement(s: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"rel_error": float((s - ref).norm() / ref.norm()), "pearson": il.pearson(s.flatten(), ref.flatten())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="two small problems, fewer settings (about 3 minutes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every measurement (default 1)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement before giving up")
    ap.add_argument("--mem-limit-gb", type=float, default=8.0, help="address-space limit per measurement")
    ap.add_argument("--recompare", action="store_true",
                    help="measure nothing: recompute the ratios of the recorded results and rewrite the file")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/compare.json (compare_quick.json with --quick)")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.out is None:
        args.out = HERE / "results" / ("compare_quick.json" if args.quick else "compare.json")
    if args.recompare:
        record = json.loads(args.out.read_text())
        record["ratios"] = ratios(record)
        atomic_write_json(args.out, record)
        print(f"rewrote the ratios of {args.out}")
        return 0
    torch.set_num_threads(args.threads)
    from benchmarks.anchors import ADAPTERS
    available = {name: mod.methods() for name, mod in ADAPTERS.items() if mod.AVAILABLE}
    versions = {}
    for name, modname in [("dattri", "dattri"), ("curvlinops", "curvlinops"), ("kronfluence", "kronfluence")]:
        try:
            from importlib.metadata import version
            versions[name] = version({"curvlinops": "curvlinops-for-pytorch"}.get(modname, modname))
        except Exception:
            versions[name] = None
    t_start = time.perf_counter()
    record: dict = {"machine": machine_info(args.threads), "quick": args.quick, "weight_decay": WD,
                    "libraries": {"available": available, "versions": versions,
                                  "unavailable": [n for n, m in ADAPTERS.items() if not m.AVAILABLE]},
                    "problems": []}
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(tmp_dir.name)
    for spec in problem_specs(args.quick):
        t_prob = time.perf_counter()
        model, train, test, train_info = build_problem(spec)
        p = count_params(model)
        # reference: exact scores (float64 eigendecomposition); damping chosen so that H + damping I is PD
        calc = il.InfluenceCalculator(model, F.cross_entropy, train, weight_decay=WD, damping=0.0, method="exact")
        ev = calc.eigenvalues
        lam_min, lam_max = float(ev[0]), float(ev[-1])
        damping = max(1e-2, round(-2 * lam_min, 4)) if lam_min < 0 else 1e-2
        calc.damping = damping
        calc._solver = None
        ref = calc.scores(test)
        # the anchors' CG runs a fixed number of steps: give them what standard (column-by-column) CG needs for
        # tol 1e-8 on this system; influence_lib's block CG stops on its own true residual (usually earlier)
        dense_op, rhs = il.DenseOperator(calc.operator.dense()), calc.gradients(test).T
        cg_iters, cg_iters3 = (max(il.ihvp_cg(dense_op, rhs, damping, tol=tol, block=False)[1]["iterations"])
                               for tol in (1e-8, 1e-3))
        scale = 1.5 * (lam_max + damping)  # LiSSA scale shared by all libraries
        depth = (300 if args.quick else 1000) if spec["kind"] == "mlp" else 100
        prob_path = tmp / f"{spec['name']}.pt"
        torch.save({"model": model, "train": train, "test": test}, prob_path)
        print(f"\n[{spec['name']}] p={p} n_train={len(train[0])} n_test={len(test[0])} lambda in "
              f"[{lam_min:.3g}, {lam_max:.3g}] damping={damping:g}", flush=True)
        base = {"problem": str(prob_path), "problem_name": spec["name"], "threads": args.threads,
                "damping": damping}
        chunk: dict = {}
        entry = {**spec, "p": p, "damping": damping, "lambda_min": lam_min, "lambda_max": lam_max,
                 "training": train_info, "cg_iters_standard": cg_iters,
                 "cg_iters_standard_1e-3": cg_iters3, "results": []}
        for method in METHODS + tuple(OURS_ONLY):
            libs = ["influence_lib"] + [n for n in available if base_method(method) in available[n]
                                        and method not in OURS_ONLY]
            for lib in libs:
                if lib == "influence_lib":
                    opts = ({"exact": {}, "cg": {"tol": 1e-8}, "cg-1e-3": {"tol": 1e-3},
                             "lissa": {"depth": depth, "scale": scale},
                             "arnoldi": {"rank": 20, "iters": 60}, "ekfac": {}} | OURS_ONLY)[method] | chunk
                else:
                    opts = {"exact": {}, "cg": {"cg_iters": cg_iters, "cg_tol": 1e-8},
                            "cg-1e-3": {"cg_iters": cg_iters3, "cg_tol": 1e-3},
                            "lissa": {"lissa_depth": depth, "lissa_scale": scale, "lissa_repeats": 1},
                            "arnoldi": {"arnoldi_rank": 20, "arnoldi_iters": 60},
                            "ekfac": {}}[method]
                r = run_job({**base, "lib": lib, "method": method, "kind": "scores", "options": opts}, tmp,
                            args.timeout, args.mem_limit_gb)
                row = {"lib": lib, "method": method, "options": opts, "status": r["status"]}
                if r["status"] == "ok":
                    row.update({k: r[k] for k in ("time_s", "all_s", "peak_delta_mb", "rss_peak_mb", "loadavg")
                                if k in r})
                    row.update(r.get("info") and {"info": r["info"]} or {})
                    row.update(agreement(r["value"], ref))
                    msg = (f"{row['time_s']:8.3f} s  {row['peak_delta_mb']:7.1f} MB  rel.err {row['rel_error']:.2e}"
                           f"  pearson {row['pearson']:.6f}")
                else:
                    row["error"] = r["error"]
                    msg = f"{r['status']}: {r['error'][:120]}"
                print(f"  {method:<16}{lib:<15}{msg}", flush=True)
                entry["results"].append(row)
        # HVP and gradient cost
        costs = {}
        for lib, kind in [("influence_lib", "grad"), ("influence_lib", "hvp")] + [
                (n, "hvp") for n in available if hasattr(ADAPTERS[n], "hvp")]:
            r = run_job({**base, "lib": lib, "method": "-", "kind": kind, "max_repeats": 20, "budget_s": 3.0}, tmp,
                        args.timeout, args.mem_limit_gb)
            costs[f"{lib}:{kind}"] = r.get("time_s") if r["status"] == "ok" else None
        g = costs.get("influence_lib:grad")
        entry["hvp_cost"] = {"gradient_s": g, "hvp_s": {k.split(":")[0]: v for k, v in costs.items()
                                                       if k.endswith(":hvp")}}
        entry["hvp_cost"]["hvp_over_grad"] = {k: (v / g if v and g else None)
                                              for k, v in entry["hvp_cost"]["hvp_s"].items()}
        print("  HVP / gradient cost: " + ", ".join(f"{k} {v:.2f}x" for k, v in
                                                   entry["hvp_cost"]["hvp_over_grad"].items() if v), flush=True)
        entry["wall_s"] = time.perf_counter() - t_prob
        record["problems"].append(entry)
    # LOO retraining throughput on the Iris MLP
    iris = record["problems"][0]
    n_remove, steps = (10, 100) if args.quick else (30, 300)
    base = {"problem": str(tmp / "iris-mlp.pt"), "problem_name": "iris-mlp", "threads": args.threads,
            "n_remove": n_remove, "steps": steps, "lr": 1e-3, "max_repeats": 1}
    loo = {"problem": iris["name"], "n_remove": n_remove, "steps": steps, "optimizer": "adam", "lr": 1e-3,
           "results": {}}
    values = {}
    for lib in ["influence_lib", "plain-loop"] + (["dattri"] if "dattri" in available else []):
        r = run_job({**base, "lib": lib, "method": "-", "kind": "loo"}, tmp, args.timeout * 2, args.mem_limit_gb)
        if r["status"] == "ok":
            values[lib] = r["value"]
            loo["results"][lib] = {"time_s": r["time_s"], "model_steps_per_s": n_remove * steps / r["time_s"],
                                   "peak_delta_mb": r["peak_delta_mb"]}
        else:
            loo["results"][lib] = {"error": r["error"]}
        print(f"  LOO {lib:<15}" + (f"{r['time_s']:.2f} s" if r["status"] == "ok" else r["error"]), flush=True)
    for lib, v in values.items():
        if lib != "plain-loop" and "plain-loop" in values:
            loo["results"][lib]["max_abs_diff_vs_plain_loop"] = float((v - values["plain-loop"]).abs().max())
    record["loo"] = loo
    record["total_s"] = time.perf_counter() - t_start
    record["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    record["ratios"] = ratios(record)
    atomic_write_json(args.out, record)
    tmp_dir.cleanup()
    print_summary(record)
    print(f"\nwritten {args.out} ({record['total_s']:.0f} s)")
    return 0


def ratios(record: dict) -> list[dict]:
    """time(influence_lib) / time(anchor) per problem, method and anchor, with both accuracies."""
    out = []
    for e in record["problems"]:
        rows = {(r["lib"], r["method"]): r for r in e["results"]}
        for (lib, method), r in rows.items():
            if lib == "influence_lib":
                continue
            ours = rows.get(("influence_lib", method))
            item = {"problem": e["name"], "method": method, "anchor": lib, "anchor_status": r["status"],
                    "anchor_time_s": r.get("time_s"), "anchor_rel_error": r.get("rel_error"),
                    "anchor_peak_mb": r.get("peak_delta_mb")}
            if ours is None:
                item["note"] = "no counterpart in influence_lib"
            elif ours["status"] == "ok":
                item.update({"ours_time_s": ours["time_s"], "ours_rel_error": ours["rel_error"],
                             "ours_peak_mb": ours["peak_delta_mb"]})
                if r["status"] == "ok":
                    item["time_ratio_ours_over_anchor"] = ours["time_s"] / r["time_s"]
                    item["speedup_ours"] = r["time_s"] / ours["time_s"]
            if r["status"] == "ok" and r.get("rel_error") is not None:
                item["fastest_as_accurate"] = fastest_as_accurate(e["results"], r["rel_error"], r["time_s"])
                # the other side of "at equal accuracy": the fastest anchor call (any library, any method) that is
                # as accurate as this one; the anchor's best against ours at this accuracy
                best_anchor = fastest_as_accurate(e["results"], r["rel_error"], r["time_s"], anchors=True)
                if best_anchor is not None and item["fastest_as_accurate"] is not None:
                    best_anchor["speedup_best_vs_best"] = best_anchor["time_s"] / item["fastest_as_accurate"]["time_s"]
                item["fastest_anchor_as_accurate"] = best_anchor
            out.append(item)
    return out


#: "as accurate" in fastest_as_accurate: a relative error of the scores at most this factor times the anchor's, or
#: below EQUAL_FLOOR (both converged: solvers stopped at a residual of 1e-8 differ in the second digit of an error
#: of about 1e-8, which is not a difference in accuracy)
EQUAL_FACTOR, EQUAL_FLOOR = 1.1, 1e-6


def fastest_as_accurate(results: list[dict], rel_error: float, anchor_time_s: float, *,
                        anchors: bool = False) -> dict | None:
    """Our fastest method on a problem whose scores are as close to the exact ones as the anchor's (``rel_error``;
    within ``EQUAL_FACTOR``, or both below ``EQUAL_FLOOR``) and its speed-up over the anchor: "faster at equal
    accuracy" without fixing the method in advance. None where no method of ours is that accurate.
    ``anchors=True``: the same over the anchors' calls (every library but ours), with its library."""
    bound = max(EQUAL_FACTOR * rel_error, EQUAL_FLOOR)
    fits = [r for r in results if (r["lib"] != "influence_lib") == anchors and r["status"] == "ok"
            and r.get("rel_error") is not None and r["rel_error"] <= bound]
    if not fits:
        return None
    best = min(fits, key=lambda r: r["time_s"])
    return {"method": best["method"], "time_s": best["time_s"], "rel_error": best["rel_error"],
            "speedup": anchor_time_s / best["time_s"]} | ({"lib": best["lib"]} if anchors else {})


def print_summary(record: dict) -> None:
    m = record["machine"]
    print(f"\nmachine: {m['cpu_count']} CPUs, {m['torch_threads']} torch thread(s) per measurement, load "
          f"{m['loadavg_1_5_15']} at start, {m['loadavg_end']} at end")
    print(f"\n{'problem':<17}{'method':<9}{'anchor':<13}{'ours s':>9}{'anchor s':>10}{'ours/anchor':>12}"
          f"{'ours err':>10}{'anchor err':>11}")
    for r in record["ratios"]:
        ours = f"{r['ours_time_s']:.3f}" if r.get("ours_time_s") is not None else "-"
        anc = f"{r['anchor_time_s']:.3f}" if r.get("anchor_time_s") is not None else r["anchor_status"]
        rat = f"{r['time_ratio_ours_over_anchor']:.3f}" if "time_ratio_ours_over_anchor" in r else (
            "no counterpart" if "note" in r else "-")
        oe = f"{r['ours_rel_error']:.1e}" if r.get("ours_rel_error") is not None else "-"
        ae = f"{r['anchor_rel_error']:.1e}" if r.get("anchor_rel_error") is not None else "-"
        print(f"{r['problem']:<17}{r['method']:<9}{r['anchor']:<13}{ours:>9}{anc:>10}{rat:>12}{oe:>10}{ae:>11}")
    lo = record["loo"]
    print(f"\nLOO retraining ({lo['problem']}, {lo['n_remove']} points removed, {lo['steps']} Adam steps each)")
    for lib, r in lo["results"].items():
        if "time_s" in r:
            print(f"  {lib:<15}{r['time_s']:8.2f} s  {r['model_steps_per_s']:10.0f} model-steps/s"
                  + (f"  max|diff| vs loop {r['max_abs_diff_vs_plain_loop']:.1e}"
                     if "max_abs_diff_vs_plain_loop" in r else ""))
        else:
            print(f"  {lib:<15}{r['error']}")
    print("\nHVP cost / gradient cost")
    for e in record["problems"]:
        print(f"  {e['name']:<17}" + ", ".join(f"{k} {v:.2f}x" for k, v in e["hvp_cost"]["hvp_over_grad"].items()
                                                if v))


if __name__ == "__main__":
    sys.exit(main())
