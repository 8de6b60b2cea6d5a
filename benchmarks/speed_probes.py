"""Where the time of the HVP-based methods goes on the comparison's problems, and what was tried against it.

    python benchmarks/speed_probes.py [--no-compile] [--threads 1]       (make bench-probes; main virtualenv)

The comparison (``compare.py``) finds exact, CG and LiSSA on the CNNs bounded by Hessian-vector products. This
script records, side by side in one run on the same trained models (``compare.problem_specs``, plus the small
MNIST MLP of the book's chapter), the evidence behind the choices made in ``influence_lib``:

1. ``profile``: a ``torch.profiler`` breakdown of a block of 16 products on the kept gradient graph — the share
   of self CPU time in convolution kernels, in the per-sample loop that ``vmap`` falls back to for the
   convolution double-backward (``select``/``stack``/``cat``), and elsewhere.
2. ``dense_hessian``: four ways of assembling the dense Hessian from products, interleaved, median of 3:
   layer by layer (the library's way, ``Objective.hessian``: each layer's columns by reverse-over-reverse on the
   graph downstream of that layer, the rest by symmetry); reverse-over-reverse on one kept graph of the whole
   network, blocks of 16 columns (the library's way before); the same on a graph of 8 replicated parameter vectors
   (``vmap`` over the parameters turns convolutions into grouped convolutions, so the double-backward needs no
   per-sample loop); forward-over-reverse (``jvp`` of ``grad``), ``vmap`` over 16 columns. All agree to rounding
   (the largest difference from the whole-graph way is recorded).
3. ``layer_columns``: for each parameter group of the layer-by-layer assembly, the measured cost of its columns
   (products on the graph downstream of it) relative to products on the whole graph, beside the library's estimate.
4. ``cg_steps``: steps to relative residual 1e-8 for the comparison's test-gradient right-hand sides on the
   dense damped Hessian: standard CG (one Krylov space per column), block CG (``influence_lib``'s default),
   and CG preconditioned with EK-FAC (the Gauss-Newton approximation as preconditioner).
5. ``compile`` (skip with ``--no-compile``): ``torch.compile`` of the forward-over-reverse product on the small
   CNN — compilation time (cold: a fresh inductor cache) and time per product, compiled vs eager.

Writes ``benchmarks/results/probes.json`` atomically; the book's benchmark appendix renders it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_core import atomic_write_json, interleaved, machine_info  # noqa: E402
from compare import WD, build_problem, problem_specs  # noqa: E402
from torch.func import grad, jvp, vmap  # noqa: E402

import influence_lib as il  # noqa: E402
from influence_lib.data import load_dataset  # noqa: E402
from influence_lib.models import mlp  # noqa: E402
from influence_lib.objective import Objective, dense_from_products  # noqa: E402

CONV_OPS = ("aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::slow_conv_transpose2d",
            "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution")
FALLBACK_OPS = ("aten::select", "aten::stack", "aten::cat", "aten::as_strided")


def problems() -> list[tuple[str, Objective, tuple]]:
    out = []
    for spec in problem_specs(quick=False):
        model, train, test, _ = build_problem(spec)
        out.append((spec["name"], Objective(model, F.cross_entropy, *train, weight_decay=WD), test))
    ds = load_dataset("mnist-small", dtype=torch.float64, n_train=300, n_test=5)
    ds = dataclasses.replace(ds, X_train=ds.X_train.flatten(1), X_test=ds.X_test.flatten(1))
    model = mlp(ds.X_train.shape[1], ds.n_classes, depth=2, width=4, activation="tanh", seed=0, dtype=torch.float64)
    il.train_model(model, F.cross_entropy, (ds.X_train, ds.y_train), weight_decay=WD, optimizer="adam", lr=1e-2,
                   steps=300)
    out.append(("mnist-mlp", Objective(model, F.cross_entropy, ds.X_train, ds.y_train, weight_decay=WD),
                (ds.X_test, ds.y_test)))
    return out


# --- 1. profile -------------------------------------------------------------------------------------
def profile_block(obj: Objective) -> dict:
    from torch.profiler import ProfilerActivity, profile
    theta = obj.theta()
    apply = obj.hvp_operator(theta)
    V = torch.randn(obj.p, 16, generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
    apply(V)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            apply(V)
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    conv = sum(v for k, v in self_us.items() if k in CONV_OPS)
    fallback = sum(v for k, v in self_us.items() if k in FALLBACK_OPS)
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:6]
    return {"block": 16, "self_cpu_ms_per_block": total / 3e3, "share_convolution_kernels": conv / total,
            "share_vmap_fallback_ops": fallback / total, "share_other": 1 - (conv + fallback) / total,
            "top_ops": [{"op": k, "share": v / total} for k, v in top]}


# --- 2. dense Hessian variants ----------------------------------------------------------------------
def full_objective(obj: Objective):
    return lambda t: obj.loss_fn(obj.forward(t, obj.X), obj.y) + 0.5 * obj.weight_decay * (t * t).sum()


def hessian_replicated(obj: Objective, k: int = 8) -> torch.Tensor:
    theta, J = obj.theta(), full_objective(obj)
    with torch.enable_grad():
        Theta = theta.unsqueeze(0).repeat(k, 1).requires_grad_(True)
        (g,) = torch.autograd.grad(vmap(J)(Theta).sum(), Theta, create_graph=True)

    def apply(V: torch.Tensor) -> torch.Tensor:
        m = V.shape[1]
        if m > k:  # dense_from_products may hand over one block for a tiny model
            return torch.cat([apply(V[:, j:j + k]) for j in range(0, m, k)], dim=1)
        if m < k:
            V = torch.cat([V, V.new_zeros(V.shape[0], k - m)], dim=1)
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(g, Theta, V.T.contiguous(), retain_graph=True)
        return hv.T[:, :m]

    M = dense_from_products(apply, theta, obj.p, k)
    return (M + M.T) / 2


def hessian_fwd_over_rev(obj: Objective, k: int = 16) -> torch.Tensor:
    theta, J = obj.theta(), full_objective(obj)
    prod = vmap(lambda v: jvp(grad(J), (theta,), (v,))[1])
    M = dense_from_products(lambda V: prod(V.T.contiguous()).T, theta, obj.p, k)
    return (M + M.T) / 2


#: the ways of assembling the dense Hessian that the probe times: influence_lib's (``Objective.hessian``: each layer's
#: columns on the graph downstream of it) and every column by reverse-over-reverse on the whole graph (the way before)
LAYERWISE = "layer by layer, blocks of 16 (influence_lib)"
WHOLE_GRAPH = "reverse-over-reverse on the whole graph, blocks of 16"


def dense_variants(obj: Objective, repeats: int) -> dict:
    theta = obj.theta()
    fns = {LAYERWISE: lambda: obj.hessian(theta),
           WHOLE_GRAPH: lambda: dense_from_products(obj.hvp_operator(theta), theta, obj.p),
           "replicated parameters (8), reverse-over-reverse": lambda: hessian_replicated(obj),
           "forward-over-reverse, vmap over 16": lambda: hessian_fwd_over_rev(obj)}
    res = interleaved(fns, repeats)
    ref = res[WHOLE_GRAPH][2]
    return {k: {"median_s": t, "all_s": ts, "max_abs_diff": float((out - ref).abs().max())}
            for k, (t, ts, out) in res.items()}


def layer_columns(obj: Objective, repeats: int) -> list[dict]:
    """Per parameter group of the layer-by-layer assembly (``Objective.parameter_groups``): its size, the library's
    estimate of the cost of its columns relative to a product on the whole graph, and the measured ratio (16 columns
    on the group's downstream graph against 16 on the whole graph, interleaved, median of ``repeats``)."""
    theta = obj.theta()
    whole = obj.hvp_operator(theta)
    out = []
    for g, (names, est) in enumerate(obj.parameter_groups()):
        later = [m for grp, _ in obj.parameter_groups()[g:] for m in grp]
        sub = obj.hvp_operator(theta, params=later)
        k_sub = int(obj._subset(later)[0].numel())
        V, Vs = (torch.randn(n, 16, generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
                 for n in (obj.p, k_sub))
        res = interleaved({"whole": lambda V=V: whole(V), "downstream": lambda sub=sub, Vs=Vs: sub(Vs)}, repeats)
        size = int(obj._subset(list(names))[0].numel())
        out.append({"parameters": list(names), "size": size, "estimated_cost": est,
                    "measured_cost": res["downstream"][0] / res["whole"][0],
                    "ms_per_column_whole": res["whole"][0] / 16 * 1e3,
                    "ms_per_column_downstream": res["downstream"][0] / 16 * 1e3})
    return out


# --- 3. CG steps ------------------------------------------------------------------------------------
def pcg_steps(A: torch.Tensor, B: torch.Tensor, precond, tol: float = 1e-8, max_iter: int = 100_000) -> int:
    """Preconditioned CG per column on a dense SPD ``A``; steps until every relative residual <= tol."""
    X, R = torch.zeros_like(B), B.clone()
    Z = precond(R)
    P, rz, bn = Z.clone(), (R * Z).sum(0), B.norm(dim=0)
    for it in range(1, max_iter + 1):
        AP = A @ P
        alpha = rz / (P * AP).sum(0)
        X += alpha * P
        R -= alpha * AP
        if bool((R.norm(dim=0) <= tol * bn).all()):
            return it
        Z = precond(R)
        rz_new = (R * Z).sum(0)
        P = Z + (rz_new / rz) * P
        rz = rz_new
    return -1


def cg_steps(obj: Objective, test: tuple) -> dict:
    theta = obj.theta()
    H = obj.hessian(theta)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    damping = max(1e-2, round(-2 * lam_min, 4)) if lam_min < 0 else 1e-2  # as in compare.py
    A = H + damping * torch.eye(obj.p, dtype=H.dtype)
    tobj = Objective(obj.model, obj.loss_fn, *test)
    B = torch.cat([g for _, g in tobj.per_sample_grads(theta, *test)]).T.contiguous()
    _, std = il.ihvp_cg(il.DenseOperator(H), B, damping, tol=1e-8, block=False)
    _, blk = il.ihvp_cg(il.DenseOperator(H), B, damping, tol=1e-8)
    out = {"damping": damping, "right_hand_sides": B.shape[1],
           "standard": {"steps": max(std["iterations"]), "products": std["products"]},
           "block": {"steps": max(blk["iterations"]), "products": blk["products"]}}
    try:
        ek = il.EKFACSolver(obj, theta, damping)
        out["ekfac_preconditioned"] = {"steps": pcg_steps(A, B, ek.solve)}
    except ValueError as exc:  # layers EK-FAC does not support
        out["ekfac_preconditioned"] = {"error": str(exc)[:200]}
    return out


# --- 4. torch.compile -------------------------------------------------------------------------------
def compile_probe(obj: Objective, repeats: int) -> dict:
    """Cold compilation (a fresh inductor cache, as on first use) and the time per product afterwards."""
    import os
    import tempfile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-probe-")
    theta, J = obj.theta(), full_objective(obj)
    eager = vmap(lambda v: jvp(grad(J), (theta,), (v,))[1])
    V = torch.randn(16, obj.p, generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
    t0 = time.perf_counter()
    compiled = torch.compile(eager)
    out = compiled(V)
    compile_s = time.perf_counter() - t0
    res = interleaved({"eager": lambda: eager(V), "compiled": lambda: compiled(V)}, repeats)
    return {"block": 16, "compile_s": compile_s, "eager_ms_per_product": 1e3 * res["eager"][0] / 16,
            "compiled_ms_per_product": 1e3 * res["compiled"][0] / 16,
            "max_abs_diff": float((out - res["eager"][2]).abs().max())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "probes.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    record = {"machine": machine_info(args.threads), "problems": []}
    for name, obj, test in problems():
        print(f"[{name}] p={obj.p} n={obj.n}", flush=True)
        entry = {"name": name, "p": obj.p, "n_train": obj.n, "profile": profile_block(obj)}
        pr = entry["profile"]
        print(f"  profile: convolution kernels {pr['share_convolution_kernels']:.0%}, vmap fallback ops "
              f"{pr['share_vmap_fallback_ops']:.0%}", flush=True)
        entry["dense_hessian"] = dense_variants(obj, args.repeats)
        for k, v in entry["dense_hessian"].items():
            print(f"  dense Hessian, {k}: {v['median_s']:.3f} s (max diff {v['max_abs_diff']:.1e})", flush=True)
        entry["layer_columns"] = layer_columns(obj, args.repeats)
        for r in entry["layer_columns"]:
            print(f"  columns of {r['parameters']}: {r['measured_cost']:.3f} of a whole product "
                  f"(estimated {r['estimated_cost']:.3f})", flush=True)
        entry["cg_steps"] = cg_steps(obj, test)
        print(f"  CG steps: {entry['cg_steps']}", flush=True)
        if name == "mnist-cnn-small" and not args.no_compile:
            entry["compile"] = compile_probe(obj, args.repeats)
            print(f"  torch.compile: {entry['compile']}", flush=True)
        record["problems"].append(entry)
    record["total_s"] = time.perf_counter() - t_start
    record["machine"]["loadavg_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    bad = [k for e in record["problems"] for k, v in e["dense_hessian"].items()
           if not math.isfinite(v["max_abs_diff"]) or v["max_abs_diff"] > 1e-8]
    if bad:
        raise SystemExit(f"dense Hessian variants disagree: {bad}")
    atomic_write_json(args.out, record)
    print(f"written {args.out} ({record['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
