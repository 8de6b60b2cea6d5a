"""Self-check of the anchor adapters against a dense float64 reference.

Run (from the repository root, with the benchmark virtualenv):

    /work/benchvenv/bin/python -m benchmarks.anchors.selfcheck [--only dattri,curvlinops] [--loo]

Builds a tiny float64 MLP (4 -> 5 -> 3, tanh), trains it with full-batch Adam
(cross-entropy + weight decay) to near a stationary point, builds the reference
scores (1/n) g_test^T (H + λI)^{-1} g_i from a dense torch.func Hessian of
mean-loss + wd/2||θ||², and prints, for every adapter and method, the Pearson
correlation, max relative error (max |s - s_ref| / max |s_ref|) and wall time.
Also checks each adapter's ``hvp`` against the dense Hessian, and (with --loo)
dattri's leave-one-out retraining on a few points.
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import sys
import time
import warnings
from functools import partialmethod

import torch
import torch.nn.functional as F
import tqdm as _tqdm
from torch import nn

# silence the libraries' progress bars (dattri creates them without a disable switch)
_tqdm.tqdm.__init__ = partialmethod(_tqdm.tqdm.__init__, disable=True)

from benchmarks.anchors import ADAPTERS  # noqa: E402
from benchmarks.anchors import _common as C  # noqa: E402

EXACT_LIKE = {"exact", "cg"}


def build_problem(seed: int = 0, n_train: int = 60, n_test: int = 5, wd: float = 0.01,
                  steps: int = 2000):
    torch.manual_seed(seed)
    dt = torch.float64
    Xtr = torch.randn(n_train, 4, dtype=dt)
    W = torch.randn(4, 3, dtype=dt)
    ytr = (Xtr @ W + 0.5 * torch.randn(n_train, 3, dtype=dt)).argmax(1)
    Xte = torch.randn(n_test, 4, dtype=dt)
    yte = (Xte @ W + 0.5 * torch.randn(n_test, 3, dtype=dt)).argmax(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dt)
    train_model(model, (Xtr, ytr), wd, steps)
    return model, (Xtr, ytr), (Xte, yte)


def train_model(model, train, wd, steps=2000, lr=0.02):
    x, y = train
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        theta = torch.cat([p.reshape(-1) for p in model.parameters()])
        loss = F.cross_entropy(model(x), y) + 0.5 * wd * (theta * theta).sum()
        loss.backward()
        opt.step()
    return model


def pearson(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--damping", type=float, default=0.001)
    ap.add_argument("--loo", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    wd, lam = 0.01, args.damping
    model, train, test = build_problem(wd=wd)
    # stationarity check
    f = C.objective_flat(model, F.cross_entropy, train, wd)
    th = C.flat_params(model).requires_grad_()
    gnorm = torch.autograd.grad(f(th), th)[0].norm().item()
    t0 = time.perf_counter()
    ref = C.reference_scores(model, F.cross_entropy, train, test, damping=lam, weight_decay=wd)
    t_ref = time.perf_counter() - t0
    H = C.dense_hessian(model, F.cross_entropy, train, wd)
    ev = torch.linalg.eigvalsh(H)
    print(f"problem: p={th.numel()} n_train={train[0].shape[0]} n_test={test[0].shape[0]} "
          f"wd={wd} damping={lam} |grad|={gnorm:.2e} eig(H) in [{ev[0]:.3e}, {ev[-1]:.3e}] "
          f"ref time {t_ref:.3f}s")
    print(f"{'library':<16}{'method':<9}{'pearson':>10}{'max_rel_err':>13}{'time_s':>9}  note")
    only = [s for s in args.only.split(",") if s]
    failures = []
    v = torch.randn(th.numel(), dtype=torch.float64)
    for name, mod in ADAPTERS.items():
        if only and name not in only:
            continue
        if not mod.AVAILABLE:
            print(f"{name:<16}{'-':<9}{'':>10}{'':>13}{'':>9}  not installed")
            continue
        if hasattr(mod, "hvp"):
            t0 = time.perf_counter()
            hv = mod.hvp(model, F.cross_entropy, train, v, weight_decay=wd)
            dt_ = time.perf_counter() - t0
            err = float((hv - H @ v).norm() / (H @ v).norm())
            print(f"{name:<16}{'hvp':<9}{'':>10}{err:>13.2e}{dt_:>9.3f}  rel. error of H v")
            if err > 1e-8:
                failures.append((name, "hvp", err))
        for method in mod.methods():
            opts = dict(lissa_depth=1000, lissa_scale=10.0, lissa_repeats=1,
                        cg_iters=200, cg_tol=1e-12, arnoldi_rank=20, arnoldi_iters=60)
            t0 = time.perf_counter()
            try:
                s = mod.scores(method, model, F.cross_entropy, train, test,
                               damping=lam, weight_decay=wd, **opts)
            except Exception as e:  # report, keep going
                print(f"{name:<16}{method:<9}{'ERROR':>10}{'':>13}{time.perf_counter()-t0:>9.3f}  "
                      f"{type(e).__name__}: {str(e)[:90]}")
                failures.append((name, method, "error"))
                continue
            dt_ = time.perf_counter() - t0
            s = s.to(torch.float64)
            assert s.shape == ref.shape, (name, method, s.shape)
            r = pearson(s, ref)
            rel = float((s - ref).abs().max() / ref.abs().max())
            note = "exact-like" if method in EXACT_LIKE else "approximate"
            print(f"{name:<16}{method:<9}{r:>10.6f}{rel:>13.2e}{dt_:>9.3f}  {note}")
            if method in EXACT_LIKE and not (r > 0.999 and rel < 1e-3):
                failures.append((name, method, r))
    # curvlinops on the Gauss-Newton matrix (scale.py's curvature): CG in mini-batches against our exact GGN scores
    cl = ADAPTERS.get("curvlinops")
    if cl is not None and cl.AVAILABLE and (not only or "curvlinops" in only):
        import influence_lib as il

        ggn_ref = il.influence(model, F.cross_entropy, train, test, method="exact", curvature="gauss-newton",
                               damping=lam, weight_decay=wd)
        s = cl.scores("cg", model, F.cross_entropy, train, test, damping=lam, weight_decay=wd, cg_iters=500,
                      cg_tol=1e-12, curvature="ggn", batch_size=17)
        r, rel = pearson(s, ggn_ref), float((s - ggn_ref).abs().max() / ggn_ref.abs().max())
        print(f"{'curvlinops':<16}{'cg (GGN)':<9}{r:>10.6f}{rel:>13.2e}  vs influence_lib's exact Gauss-Newton")
        if not (r > 0.999 and rel < 1e-6):
            failures.append(("curvlinops", "cg-ggn", r))
    # EK-FAC cross-check: the same approximation (empirical Fisher, weight & bias in
    # one Kronecker block) from different libraries should agree to round-off.
    ek = {}
    for name, kw in [("kronfluence", dict(fisher="empirical")),
                     ("curvlinops", dict(fisher_type="empirical", separate_weight_and_bias=False)),
                     ("dattri", {})]:
        mod = ADAPTERS[name]
        if (not only or name in only) and mod.AVAILABLE and "ekfac" in mod.methods():
            ek[name] = mod.scores("ekfac", model, F.cross_entropy, train, test,
                                  damping=lam, weight_decay=wd, **kw)
    names = list(ek)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = ek[names[i]], ek[names[j]]
            print(f"EK-FAC (empirical Fisher) {names[i]} vs {names[j]}: pearson "
                  f"{pearson(a, b):.6f}, max rel diff {float((a-b).abs().max()/b.abs().max()):.2e}")
    if args.loo and "dattri" in ADAPTERS and ADAPTERS["dattri"].AVAILABLE:
        from torch.utils.data import DataLoader  # noqa: F401

        from benchmarks.anchors import dattri_adapter as D

        init = {k: v.clone() for k, v in model.state_dict().items()}

        def train_func(loader, seed=None):
            m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.float64)
            m.load_state_dict(init)  # warm start at the optimum: removal = small perturbation
            x = torch.cat([b[0] for b in loader])
            y = torch.cat([b[1] for b in loader])
            return train_model(m, (x, y), wd, steps=3000, lr=0.002)

        idx = [0, 1, 2, 3, 4, 5]
        t0 = time.perf_counter()
        loo = D.loo_retrain(train_func, F.cross_entropy, train, test, model, indices=idx)
        print(f"dattri loo_retrain on {len(idx)} points: pearson(actual, ref)="
              f"{pearson(loo, ref[:, idx]):.4f}  time {time.perf_counter()-t0:.1f}s")
    if failures:
        print("FAILURES:", failures)
        return 1
    print("all exact-like methods agree with the dense reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
