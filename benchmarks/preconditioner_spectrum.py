"""Why EK-FAC-preconditioned CG takes more steps than plain CG on a trained CNN: the spectra, side by side.

    .venv/bin/python benchmarks/preconditioner_spectrum.py [--n-train 1000] [--out PATH]     (make bench-probes)

On the LeNet of ``benchmarks/scale.py`` CG preconditioned with EK-FAC took 78-93 steps to relative residual 1e-3
against 22-27 for plain block CG. Preconditioning pays when ``M^{-1/2} A M^{-1/2}`` has a more clustered spectrum
than ``A = G + (wd + damping) I``; this script measures both on a network small enough for dense float64 matrices:
a LeNet of the same layout at a quarter of the channels (Conv2d(1,4,5)-ReLU-MaxPool-Conv2d(4,8,5)-ReLU-MaxPool-
Linear(128,16)-ReLU-Linear(16,10), 3,146 parameters), trained as in ``scale.py`` (Adam, batch 128, 5 epochs) on the
first ``--n-train`` real MNIST digits (``mnist-small``), float64, the Gauss-Newton curvature, ``scale.py``'s weight
decay and damping. Three matrices:

* ``A`` itself (no preconditioner);
* ``P_ekfac = M^{-1/2} A M^{-1/2}`` with ``M`` the EK-FAC approximation (exact columns) plus the same shift;
* ``P_block = D^{-1/2} A D^{-1/2}`` with ``D`` the exact block diagonal of ``A`` (one block per layer): the best any
  layer-block-diagonal preconditioner can do, which separates what the block-diagonal structure costs from what the
  Kronecker factorisation inside each block costs.

For each: extreme eigenvalues and condition number, quantiles of the spectrum, and the steps of standard
(column-by-column) CG to relative residual 1e-3 on the test gradients of three test points as right-hand sides
(``ihvp_cg``, ``ihvp_pcg`` with ``block=False``; the counts are those of this run, not a property to assert).
Writes ``benchmarks/results/preconditioner_spectrum.json`` atomically (default), rendered in the book's appendix.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_core import atomic_write_json, machine_info  # noqa: E402
from scale import BATCH, DAMPING, LR, WD, train_epoch  # noqa: E402
from torch import nn  # noqa: E402

import influence_lib as il  # noqa: E402
from influence_lib.data import load_dataset  # noqa: E402
from influence_lib.ekfac import EKFACSolver  # noqa: E402
from influence_lib.layer_grads import layers_of  # noqa: E402

QUANTILES = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)
TOL = 1e-3


def small_lenet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 10)).double()


def spectrum(S: torch.Tensor) -> dict:
    ev = torch.linalg.eigvalsh((S + S.T) / 2)
    n = ev.numel()
    return {"min": float(ev[0]), "max": float(ev[-1]), "condition": float(ev[-1] / ev[0]),
            "quantiles": {str(q): float(ev[round(q * (n - 1))]) for q in QUANTILES}}


def sym_inv_sqrt(S: torch.Tensor) -> torch.Tensor:
    ev, Q = torch.linalg.eigh((S + S.T) / 2)
    return Q @ torch.diag(ev.rsqrt()) @ Q.T


class _BlockPreconditioner:
    """``D^{-1}`` and ``D^{-1/2}`` of the exact block diagonal ``D`` of ``A`` (for ``ihvp_pcg``)."""

    def __init__(self, A: torch.Tensor, blocks: list[slice]):
        self.blocks = blocks
        self.inv = [torch.linalg.inv(A[b, b]) for b in blocks]
        self.isq = [sym_inv_sqrt(A[b, b]) for b in blocks]

    def _apply(self, mats, V):
        out = torch.empty_like(V)
        for b, M in zip(self.blocks, mats, strict=True):
            out[b] = M @ V[b]
        return out

    def solve(self, V):
        return self._apply(self.inv, V)

    def inv_sqrt(self, V):
        return self._apply(self.isq, V)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "preconditioner_spectrum.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ds = load_dataset("mnist-small", n_train=args.n_train, n_test=3, dtype=torch.float64)
    model = small_lenet()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        train_epoch(model, ds.X_train, ds.y_train, opt, gen)
    model.eval()
    obj = il.Objective(model, F.cross_entropy, ds.X_train, ds.y_train, weight_decay=WD, chunk_size=100)
    p, shift = obj.p, WD + DAMPING
    print(f"{p} parameters, {args.n_train} training points; dense Gauss-Newton matrix ...", flush=True)
    G = il.GaussNewtonOperator(obj, keep=False)  # weight decay included
    eye = torch.eye(p, dtype=torch.float64)
    Gd = torch.cat([G.matmat(eye[:, j:j + 100]) for j in range(0, p, 100)], 1)
    A = (Gd + Gd.T) / 2 + DAMPING * eye
    ekfac = EKFACSolver(obj, damping=DAMPING, for_scores=False)
    Mi = ekfac.inv_sqrt(eye)
    layers = layers_of(obj, "preconditioner_spectrum")
    blocks = []
    for L in layers:  # a layer's weight and bias are contiguous in the flat vector: one block
        stop = L.b_slice.stop if L.b_slice is not None else L.w_slice.stop
        blocks.append(slice(L.w_slice.start, stop))
    block = _BlockPreconditioner(A, blocks)
    Bi = block.inv_sqrt(eye)
    calc = il.InfluenceCalculator(model, F.cross_entropy, (ds.X_train, ds.y_train), weight_decay=WD)
    rhs = calc.gradients((ds.X_test, ds.y_test), "test").T  # [p, 3]
    Aop = il.DenseOperator(A - DAMPING * eye)  # the solvers add the damping
    record = {"machine": machine_info(args.threads),
              "problem": {"model": "Conv2d(1,4,5)-ReLU-MaxPool2d(2)-Conv2d(4,8,5)-ReLU-MaxPool2d(2)-Linear(128,16)-"
                                   "ReLU-Linear(16,10)", "params": p, "n_train": args.n_train,
                          "dataset": ds.name, "dtype": "float64", "curvature": "gauss-newton",
                          "weight_decay": WD, "damping": DAMPING, "shift": shift, "train": f"Adam lr={LR}, batch "
                          f"{BATCH}, 5 epochs", "layers": [L.weight.removesuffix(".weight") for L in layers],
                          "tol": TOL, "rhs": "test gradients of 3 test points"},
              "matrices": {}}
    steps = {"none": il.ihvp_cg(Aop, rhs, DAMPING, tol=TOL, block=False)[1],
             "ekfac": il.ihvp_pcg(Aop, rhs, DAMPING, preconditioner=ekfac, tol=TOL, block=False)[1],
             "block": il.ihvp_pcg(Aop, rhs, DAMPING, preconditioner=block, tol=TOL, block=False)[1]}
    for name, S in (("none", A), ("ekfac", Mi.T @ A @ Mi), ("block", Bi.T @ A @ Bi)):
        print(f"  spectrum: {name} ...", flush=True)
        record["matrices"][name] = {**spectrum(S), "cg_steps": steps[name]["iterations"],
                                    "residual": steps[name]["residual"]}
        print("   ", {k: v for k, v in record["matrices"][name].items() if k != "quantiles"}, flush=True)
    record["total_s"] = time.perf_counter() - t0
    atomic_write_json(args.out, record)
    print(f"wrote {args.out} ({record['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
