"""A one-minute tour of the public contract: ``python -m influence_lib.experiments.demo``.

1. Convex case (L2-regularised logistic regression on Iris): influence scores against exact leave-one-out
   retraining of every training point, trained to convergence; the two should agree almost perfectly.
2. Non-convex case (a small tanh MLP on Iris): CG, LiSSA and Arnoldi against the exact solve on the same
   model, and the exact influence against warm-start LOO.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import influence_lib as il
from influence_lib.data import load_dataset
from influence_lib.models import mlp


def main() -> None:
    torch.set_num_threads(1)
    ds = load_dataset("iris", dtype=torch.float64)
    train, test = (ds.X_train, ds.y_train), (ds.X_test[:3], ds.y_test[:3])
    n = len(ds.y_train)

    print(f"1. Logistic regression, weight decay 0.01, {n} Iris training points, {len(test[1])} test points")
    model = nn.Linear(4, 3).double()
    il.train_model(model, F.cross_entropy, train, weight_decay=0.01, optimizer="sgd", lr=1.0, steps=3000)
    t = time.perf_counter()
    scores = il.influence(model, F.cross_entropy, train, test, weight_decay=0.01)  # [3, n]
    t_inf = time.perf_counter() - t
    t = time.perf_counter()
    actual = il.loo_retrain(model, F.cross_entropy, train, test, range(n), weight_decay=0.01, optimizer="sgd",
                            lr=1.0, steps=2000, normalization="full")  # [n, 3]
    t_loo = time.perf_counter() - t
    for j in range(len(test[1])):
        print(f"   test point {j}: Pearson {il.pearson(scores[j], actual[:, j]):.4f}, "
              f"Spearman {il.spearman(scores[j], actual[:, j]):.4f}")
    print(f"   influence {t_inf:.2f} s; {n} leave-one-out retrainings (batched) {t_loo:.1f} s")

    print("\n2. MLP (depth 2, width 8, tanh), weight decay 0.005, damping 0.01")
    net = mlp(4, 3, depth=2, width=8, activation="tanh", seed=0, dtype=torch.float64)
    il.train_model(net, F.cross_entropy, train, weight_decay=0.005, lr=0.01, steps=3000)
    H = il.hessian(net, F.cross_entropy, train, weight_decay=0.005)
    ev = torch.linalg.eigvalsh(H)
    print(f"   {H.shape[0]} parameters; Hessian eigenvalues from {ev[0]:.2e} to {ev[-1]:.2e}")
    exact = il.influence(net, F.cross_entropy, train, test, weight_decay=0.005, damping=0.01)
    for method, opts in (("cg", {}), ("lissa", {"depth": 2000}), ("arnoldi", {"rank": 30})):
        t = time.perf_counter()
        s = il.influence(net, F.cross_entropy, train, test, weight_decay=0.005, damping=0.01, method=method, **opts)
        err = float((s - exact).norm() / exact.norm())
        print(f"   {method:8s} relative error vs exact {err:.1e}, {time.perf_counter() - t:.2f} s")
    actual = il.loo_retrain(net, F.cross_entropy, train, test, range(n), weight_decay=0.005, lr=1e-3, steps=1000)
    print("   exact influence vs warm-start LOO, Spearman per test point: "
          + ", ".join(f"{il.spearman(exact[j], actual[:, j]):.2f}" for j in range(len(test[1]))))


if __name__ == "__main__":
    main()
