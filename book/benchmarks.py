# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Appendix: benchmarks
#
# How fast is `influence_lib`, and how does it compare with the libraries a reader might use instead? This
# page renders two machine-readable records written by two scripts in `benchmarks/`; nothing on it is typed
# by hand, and every number comes from one run of one script on one machine (the machine, the command and
# the time are printed below each heading).
#
# **`benchmarks/bench_core.py`** (`make bench`, main virtualenv) measures `influence_lib` against itself on
# the Iris data with float64 MLPs:
#
# - leave-one-out retraining of *every* training point: the batched `il.loo_retrain` (all models trained
#   at once, `torch.func.vmap` over stacked parameters) against the loop one writes by hand (copy the model,
#   `torch.optim.Adam`, the same number of full-batch steps without the point), with the largest difference
#   between the two results;
# - the cost of a Hessian-vector product (HVP) relative to a gradient;
# - the wall time of `il.influence` per inverse-HVP method, with the agreement of its scores with the exact
#   ones.
#
# **`benchmarks/compare.py`** (`make bench-compare`, a separate virtualenv with the anchor libraries of
# `benchmarks/requirements-bench.txt`) computes the same scores — every training point for every test
# point, `(1/n) g_test^T (H + damping I)^{-1} g_i` — with `influence_lib` and with
# [dattri](https://github.com/TRAIS-Lab/dattri), [curvlinops](https://github.com/f-dangel/curvlinops) and
# [kronfluence](https://github.com/pomonam/kronfluence) (torch-influence is not installable from a package
# index and is left out), on the same trained model, data, weight decay and damping. Each measurement runs in
# a fresh process (after an untimed warm-up on a few points, which absorbs one-off import costs), which reports
# the wall time of the whole call (the fastest of at least three calls and of as many more as fit in three seconds,
# at most 50, within 10 s, and never of fewer than two: the neighbours of a shared machine only ever add time, a call
# of a few milliseconds is then the fastest of dozens, and no library is timed by a first call alone, which can
# carry one-off costs: dattri's first CG call on a problem took several seconds against about one for the next) and
# its peak memory (growth of the process's maximum resident set). Settings
# are matched per method: the same LiSSA depth and scale, the same Arnoldi rank and number of Krylov steps,
# and the anchors' CG runs the number of steps that standard CG (one Krylov space per test point) needs to reach
# relative residual 1e-8 on the same system; `influence_lib` runs block CG (one Krylov space shared by all test
# points, see below) and stops on its own true residual 1e-8. Accuracy is the relative (Frobenius) error and the
# Pearson correlation of the scores against the exact float64 scores.
#
# Timings on a small shared machine are noisy; the *ratios* measured side by side in one run are the numbers
# to read. EK-FAC approximates the Gauss-Newton matrix (block-diagonal over layers, Kronecker eigenbasis), not the
# Hessian, so its error against the exact Hessian scores is the approximation's, not a solver tolerance; the
# libraries also differ in which Gauss-Newton/Fisher matrix they approximate (`influence_lib` uses the exact
# Gauss-Newton matrix of the mean loss, weight and bias of a layer in one block), so EK-FAC rows compare time at
# *different* accuracies: kronfluence samples its labels from the model, and dattri's EK-FAC estimates the
# *empirical* Fisher (outer products of the loss gradients) of the `nn.Linear` layers only (its default
# `module_name=None`), so on the CNNs it leaves the convolutions out of the scores altogether. `influence_lib` is
# run at four settings of its EK-FAC: the exact Gauss-Newton columns (`ekfac`, the default), one random-sign column
# per example (`ekfac-sampled`, `samples=1`, an unbiased estimate of the same factors), the empirical Fisher
# (`ekfac-empirical`, `fisher="empirical"`) and, like dattri's default, the `nn.Linear` layers only (`ekfac-linear`,
# `params=` their weights and biases, exact columns); every setting's scores are compared with the exact scores of
# all parameters, and the anchors' EK-FAC is set against the fastest setting that is at least as accurate. (On these
# small CNNs the last layer's block alone gives scores closer to the exact ones than all layers do: EK-FAC's
# block-diagonal Kronecker approximation of the convolutions adds more error than their terms remove.) If
# `influence_lib` has no EK-FAC row, the results file predates it. CG is also run, for `influence_lib` only, with
# float32 products beside float64 iterates and residual checks (`cg-1e-3-mixed`, `precision="mixed"`: the same
# float64 stopping rule, so the same guarantee), which enters "at equal accuracy" like any other setting.
#
# **Where the CNN timings come from.** For exact, CG and LiSSA on the CNNs almost all of the time is spent in
# Hessian-vector products through the convolutions (the profile at the end of this page), so the speed of these
# methods is the number of products times their cost. `influence_lib` cuts the number where the mathematics
# allows it without changing the answer: CG runs as block CG, and the dense Hessian is assembled *layer by layer*.
# With the parameters grouped by layer in the order the layers run, $S_1, \dots, S_m$, the columns of $S_g$ are
# needed only in the rows of $T_g = S_g \cup \dots \cup S_m$ (the rest follow from symmetry), and
# $H[T_g, S_g]$ is a block of the Hessian of the loss as a function of $T_g$ alone, the earlier layers held fixed:
# its products run on the part of the network downstream of layer $g$, for the later layers of a CNN a small part
# of the whole (the cost of each layer's columns is measured at the end of this page). Exact influence assembles
# it that way; LiSSA with full-batch products assembles it first when its known number of products costs more; CG
# switches to it when the products it still expects (from the rate at which its residual has fallen so far) cost
# more; any other solver after $p$ products. It lowers the cost of each product by
# multiplying blocks of vectors on a gradient graph built once. The last section lists what else was measured and
# why it was not adopted.

# %% tags=["parameters", "hide-input"]
results_dir = None  # default: benchmarks/results of the repository

# %% tags=["hide-input"]
import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display

from influence_lib import experiments as ex

ex.parameters(globals(), ['results_dir'])  # refuses unknown parameters, parses what papermill passes as text

RESULTS = Path(results_dir) if results_dir else ex.book_root() / "benchmarks" / "results"


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal control sequences in a captured progress bar


def load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


core, compare, probes = load("core.json"), load("compare.json"), load("probes.json")
# the probe's names of the library's way of assembling the dense Hessian and of the way before (speed_probes.py)
probe_layerwise = "layer by layer, blocks of 16 (influence_lib)"
probe_whole_graph = "reverse-over-reverse on the whole graph, blocks of 16"


def machine_text(rec):
    m = rec["machine"]
    end = m.get("loadavg_end")
    return (f"Measured on {m['time_utc']} on `{m['host']}` ({m['cpu_count']} CPU cores, {m['processor']}, "
            f"{m['platform']}), torch {m['torch']} with {m['torch_threads']} thread(s) per process; "
            f"load average {m['loadavg_1_5_15'][0]:.1f} at the start" + (f" and {end[0]:.1f} at the end" if end
                                                                         else "")
            + f" of the run (the machine is shared: a load above its {m['cpu_count']} cores means other "
            f"processes ran at the same time). Command: `{m['command']}`; total {rec['total_s'] / 60:.1f} min."
            + "".join(f" Re-measured later: {', '.join(r['parts'])} on {r['machine']['time_utc']} (load average "
                      f"{r['machine']['loadavg_1_5_15'][0]:.1f}, command `{r['machine']['command']}`)."
                      for r in rec.get("remeasured", [])))


# %% [markdown]
# ## `influence_lib` on its own (`bench_core.py`)

# %% tags=["hide-input"]
if core is None:
    display(Markdown("**`benchmarks/results/core.json` is missing**: run `make bench` to create it."))
else:
    display(Markdown(machine_text(core)))
    rows = []
    for e in core["models"]:
        lo = e["loo"]
        rows.append({"model": e["model"], "parameters": e["p"], "models trained": lo["models_trained"],
                     "Adam steps each": lo["steps"], "batched (s)": lo["batched_s"],
                     "sequential loop (s)": lo["sequential_s"], "speed-up": lo["speedup"],
                     "max |difference|": lo["max_abs_diff"]})
    loo_df = pd.DataFrame(rows)
    display(Markdown("**Leave-one-out retraining of every training point** (plus the full-data reference), "
                     "batched vs. a sequential `torch.optim` loop, median of repeats:"))
    display(loo_df.style.format({"batched (s)": "{:.2f}", "sequential loop (s)": "{:.2f}",
                                 "speed-up": "{:.1f}x", "max |difference|": "{:.1e}"}).hide(axis="index"))
    worst = loo_df["speed-up"].min()
    display(Markdown(f"The target of at least 10x is {'met' if worst >= 10 else '**not met**'}: the smallest "
                     f"speed-up is {worst:.1f}x, and both ways give the same numbers to "
                     f"{loo_df['max |difference|'].max():.0e}."))

# %% tags=["hide-input"]
if core is not None:
    hv = pd.DataFrame([{"model": e["model"], "parameters": e["p"], "gradient (ms)": 1e3 * e["hvp"]["gradient_s"],
                        "HVP, graph rebuilt": e["hvp"]["ratio_hvp_rebuilt_over_grad"],
                        "HVP, graph cached": e["hvp"]["ratio_hvp_cached_over_grad"],
                        f"per vector in a block of {e['hvp']['block']}":
                            e["hvp"]["ratio_hvp_per_vector_in_block_over_grad"]} for e in core["models"]])
    display(Markdown("**Cost of one Hessian-vector product in units of one full-batch gradient** (the solvers "
                     "keep the gradient graph and multiply blocks of vectors at once):"))
    display(hv.style.format({c: "{:.2f}x" for c in hv.columns[3:]} | {"gradient (ms)": "{:.2f}"})
            .hide(axis="index"))
    inf = pd.DataFrame([{"model": e["model"], "method": k, "time (s)": v["time_s"],
                         "time / exact": v["time_s"] / e["influence"]["methods"]["exact"]["time_s"],
                         "rel. error vs exact": v["rel_error_vs_exact"], "Pearson vs exact": v["pearson_vs_exact"],
                         "options": ", ".join(f"{a}={b}" for a, b in v["options"].items())}
                        for e in core["models"] for k, v in e["influence"]["methods"].items()])
    display(Markdown(f"**`il.influence` per method**: all {core['models'][0]['influence']['n_train']} training "
                     f"points x {core['models'][0]['influence']['n_test']} test points, damping "
                     f"{core['settings']['damping']}, weight decay {core['settings']['weight_decay']}:"))
    display(inf.style.format({"time (s)": "{:.3f}", "time / exact": "{:.2f}x", "rel. error vs exact": "{:.1e}",
                              "Pearson vs exact": "{:.6f}"}).hide(axis="index"))

# %% [markdown]
# ## Side by side with the anchor libraries (`compare.py`)

# %% tags=["hide-input"]
if compare is None:
    display(Markdown("**`benchmarks/results/compare.json` is missing**, so there is no comparison on this build. "
                     "It is produced by `make bench-compare` in the benchmark virtualenv (see "
                     "`benchmarks/requirements-bench.txt`)."))
else:
    display(Markdown(machine_text(compare)))
    libs = compare["libraries"]
    display(Markdown(
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in libs["versions"].items() if v)
        + (f"; not installed: {', '.join(libs['unavailable'])}" if libs["unavailable"] else "") + "."))
    probs = pd.DataFrame([{"problem": e["name"], "parameters": e["p"], "training points": e["n_train"],
                           "test points": e["n_test"], "damping": e["damping"],
                           "lambda_min(H)": e["lambda_min"], "lambda_max(H)": e["lambda_max"]}
                          for e in compare["problems"]])
    display(probs.style.format({"lambda_min(H)": "{:.3g}", "lambda_max(H)": "{:.3g}"}).hide(axis="index"))
    res = pd.DataFrame([{"problem": e["name"], **r} for e in compare["problems"] for r in e["results"]])
    res["status"] = res["status"].where(res["status"] == "ok", res.get("error", res["status"]).astype(str).str[:60])

# %% [markdown]
# The ratio columns are `influence_lib`'s time divided by the anchor's for the same method and problem
# (below 1: `influence_lib` is faster; 0.5 means twice as fast), next to both accuracies, since a ratio only
# means something at comparable accuracy.

# %% tags=["hide-input"]
if compare is not None:
    rat = pd.DataFrame(compare["ratios"])
    rat["ours / anchor"] = rat.get("time_ratio_ours_over_anchor")
    rat["anchor time (s)"] = rat["anchor_time_s"]
    rat.loc[rat["anchor_status"] != "ok", "anchor time (s)"] = None
    show = rat[["problem", "method", "anchor", "ours_time_s", "anchor time (s)", "ours / anchor",
                "ours_rel_error", "anchor_rel_error", "ours_peak_mb", "anchor_peak_mb", "anchor_status"]].rename(
        columns={"ours_time_s": "ours (s)", "ours_rel_error": "ours rel. error", "anchor_rel_error":
                 "anchor rel. error", "ours_peak_mb": "ours peak MB", "anchor_peak_mb": "anchor peak MB",
                 "anchor_status": "anchor status"})
    show.loc[rat.get("note", pd.Series(index=rat.index, dtype=object)).notna(), "anchor status"] = \
        "no counterpart in influence_lib"
    display(show.style.format({"ours (s)": "{:.3f}", "anchor time (s)": "{:.3f}", "ours / anchor": "{:.2f}",
                               "ours rel. error": "{:.1e}", "anchor rel. error": "{:.1e}",
                               "ours peak MB": "{:.0f}", "anchor peak MB": "{:.0f}"}, na_rep="-")
            .hide(axis="index"))
    ok = rat.dropna(subset=["ours / anchor"])
    fastest = ok.loc[ok.groupby(["problem", "method"])["anchor_time_s"].idxmin()]
    lines = [f"- {r.problem}, {r.method}: {1 / r['ours / anchor']:.2f}x the speed of the fastest anchor "
             f"({r.anchor})" for _, r in fastest.iterrows()]
    display(Markdown("Against the fastest anchor that has the method (at the matched settings above):\n\n"
                     + "\n".join(lines)))
    same_matrix = fastest[fastest["method"] != "ekfac"]
    short = same_matrix[same_matrix["ours / anchor"] > 0.5]
    display(Markdown(
        f"At equal accuracy (every method but EK-FAC, whose libraries approximate different matrices), "
        f"`influence_lib` is at least twice as fast as the fastest anchor in {len(same_matrix) - len(short)} of "
        f"{len(same_matrix)} cases" + (": short of that in " + "; ".join(
            f"{r.problem} {r.method} ({1 / r['ours / anchor']:.2f}x)" for _, r in short.iterrows())
            + ". Where it falls short, the time is that of Hessian-vector products on the whole network: block CG "
            "saves fewer steps at a loose tolerance than at 1e-8, a run too short to pay for the dense Hessian stays "
            "on products, and one product costs about as much in every library (it is bound by the model's own "
            "kernels, profile below; last table of this section). The Iris calls take a few milliseconds, mostly "
            "fixed costs. The ratios move by tens of percent between runs on this shared machine, at times by up to 2x for the calls of well under a second."
            if len(short) else ".")))
    ek = ok[(ok["method"] == "ekfac") & rat.loc[ok.index, "fastest_as_accurate"].apply(lambda f: isinstance(f, dict))]
    if len(ek):
        def ek_line(r) -> str:
            f = r["fastest_as_accurate"]
            return (f"- {r.problem}, {r.anchor} (rel. error {r.anchor_rel_error:.2g}, {r.anchor_time_s * 1e3:.0f} ms): "
                    f"our `{f['method']}` (rel. error {f['rel_error']:.2g}) in {f['time_s'] * 1e3:.0f} ms, "
                    f"{f['speedup']:.2f}x")
        display(Markdown("EK-FAC at equal accuracy: each anchor's EK-FAC against the fastest of our four EK-FAC "
                         "settings whose scores are at least as close to the exact ones:\n\n"
                         + "\n".join(ek_line(r) for _, r in ek.iterrows())))
    if len(short) and "fastest_as_accurate" in rat:
        def secs(t: float) -> str:
            return f"{t * 1e3:.1f} ms" if t < 0.1 else f"{t:.2f} s"

        def best_anchor(r) -> str:
            b = r.get("fastest_anchor_as_accurate") if "fastest_anchor_as_accurate" in rat else None
            if not isinstance(b, dict) or "speedup_best_vs_best" not in b:
                return ""
            return (f"; the fastest anchor call at that accuracy is {b['lib']} {b['method']} in {secs(b['time_s'])}, "
                    f"{b['speedup_best_vs_best']:.2f}x our time")
        alt = [f"{r.problem} {r.method} against {r.anchor}: {f['method']} in {secs(f['time_s'])} (rel. error "
               f"{f['rel_error']:.1e} against the anchor's {r.anchor_rel_error:.1e}), {f['speedup']:.2f}x"
               + best_anchor(r)
               for _, r in short.iterrows() for f in [r.get("fastest_as_accurate")] if isinstance(f, dict)]
        if alt:
            display(Markdown(
                "Where the matched method is short of 2x, the fastest method of `influence_lib` whose scores are "
                "at least as close to the exact ones as the anchor's (any method, not only the matched one; `cg-1e-3` "
                "is CG to a relative residual of $10^{-3}$, `cg` to $10^{-8}$), and, for the other side of \"equal "
                "accuracy\", the fastest call of any anchor library that is as accurate:\n\n"
                + "\n".join(f"- {a}" for a in alt)))

# %% tags=["hide-input"]
if compare is not None:
    plot = res[res["status"] == "ok"].copy()
    plot["rel. error (floor 1e-16)"] = plot["rel_error"].clip(lower=1e-16)
    g = sns.relplot(data=plot, x="time_s", y="rel. error (floor 1e-16)", hue="lib", style="method",
                    col="problem", kind="scatter", s=90, height=3.6, aspect=0.95,
                    facet_kws={"sharex": False, "sharey": True})
    g.set(xscale="log", yscale="log")
    g.set_axis_labels("wall time (s)", "relative error of the scores")
    g.figure.suptitle("Time vs. accuracy per method and library (lower left is better)", y=1.03)
    plt.show()

# %% [markdown]
# Leave-one-out retraining throughput on the Iris MLP (the same removed points and Adam steps; dattri's
# `retrain_loo` calls a user-written training function once per point and saves every model to disk), and the
# cost of one HVP relative to one gradient as each library computes it (a fresh operator per call):

# %% tags=["hide-input"]
if compare is not None:
    lo = compare["loo"]
    lo_df = pd.DataFrame([{"way": k, **v} for k, v in lo["results"].items()])
    display(Markdown(f"{lo['n_remove']} points removed, {lo['steps']} full-batch Adam steps each, "
                     f"lr {lo['lr']}:"))
    display(lo_df.style.format(na_rep="-", precision=3).hide(axis="index"))
    hc = pd.DataFrame([{"problem": e["name"], **{f"{k} HVP / gradient": v
                                                  for k, v in e["hvp_cost"]["hvp_over_grad"].items()}}
                       for e in compare["problems"]])
    display(hc.style.format(na_rep="-", precision=2).hide(axis="index"))

# %% [markdown]
# ## What the products cost, and what was tried (`speed_probes.py`)
#
# `benchmarks/speed_probes.py` (`make bench-probes`, main virtualenv) records, on the comparison's trained models
# and the small-MNIST MLP of the {doc}`mnist` chapter, (1) a profile of one block of 16 Hessian-vector products:
# the share of CPU time in convolution kernels and in the per-sample loop (`select`/`stack`/`cat`) that `vmap`
# falls back to for the double-backward of a convolution; (2) three ways to assemble the dense Hessian, timed
# interleaved in one process; (3) the number of CG steps to relative residual 1e-8 for the test gradients —
# standard CG, block CG, and CG preconditioned with EK-FAC; (4) `torch.compile` of the product.

# %% tags=["hide-input"]
if probes is None:
    display(Markdown("**`benchmarks/results/probes.json` is missing**: run `make bench-probes` to create it."))
else:
    display(Markdown(machine_text(probes)))
    prof_df = pd.DataFrame([{"problem": e["name"], "parameters": e["p"],
                             "ms per block of 16": e["profile"]["self_cpu_ms_per_block"],
                             "convolution kernels": e["profile"]["share_convolution_kernels"],
                             "vmap fallback loop": e["profile"]["share_vmap_fallback_ops"],
                             "other": e["profile"]["share_other"],
                             "largest op": e["profile"]["top_ops"][0]["op"]} for e in probes["problems"]])
    display(Markdown("**Profile of 16 products on the kept gradient graph** (share of self CPU time):"))
    display(prof_df.style.format({"ms per block of 16": "{:.1f}", "convolution kernels": "{:.0%}",
                                  "vmap fallback loop": "{:.0%}", "other": "{:.0%}"}).hide(axis="index"))
    dense_rows = []
    for e in probes["problems"]:
        base = e["dense_hessian"][probe_layerwise]["median_s"]
        for way, v in e["dense_hessian"].items():
            dense_rows.append({"problem": e["name"], "way": way, "time (s)": v["median_s"],
                               "time / influence_lib's way": v["median_s"] / base,
                               "max |difference|": v["max_abs_diff"]})
    dense_df = pd.DataFrame(dense_rows)
    display(Markdown("**Assembling the dense Hessian** (median of interleaved repeats):"))
    display(dense_df.style.format({"time (s)": "{:.3f}", "time / influence_lib's way": "{:.2f}",
                                   "max |difference|": "{:.0e}"}).hide(axis="index"))
    layer_rows = [{"problem": e["name"], "parameters": ", ".join(r["parameters"]), "size": r["size"],
                   "estimated cost": r["estimated_cost"], "measured cost": r["measured_cost"]}
                  for e in probes["problems"] for r in e.get("layer_columns", [])]
    if layer_rows:
        display(Markdown(
            "**The layers' columns in the layer-by-layer assembly**: the cost of a product on the graph downstream "
            "of each layer relative to one on the whole graph (16 columns, median of interleaved repeats), beside "
            "the library's estimate from the output sizes of the layers that run from it on (the estimate decides "
            "when an iterative solver switches to the dense matrix):"))
        display(pd.DataFrame(layer_rows).style.format({"estimated cost": "{:.3f}", "measured cost": "{:.3f}"})
                .hide(axis="index"))
    cg_df = pd.DataFrame([{"problem": e["name"], "right-hand sides": e["cg_steps"]["right_hand_sides"],
                           "damping": e["cg_steps"]["damping"],
                           "standard CG steps": e["cg_steps"]["standard"]["steps"],
                           "standard CG products": e["cg_steps"]["standard"]["products"],
                           "block CG steps": e["cg_steps"]["block"]["steps"],
                           "block CG products": e["cg_steps"]["block"]["products"],
                           "EK-FAC-preconditioned CG steps": e["cg_steps"]["ekfac_preconditioned"].get("steps")}
                          for e in probes["problems"]])
    display(Markdown("**CG steps to relative residual 1e-8** (products include the final true-residual checks):"))
    display(cg_df.style.format(na_rep="-").hide(axis="index"))
    comp = [e["compile"] | {"problem": e["name"]} for e in probes["problems"] if "compile" in e]
    if comp:
        c = comp[0]
        display(Markdown(
            f"**`torch.compile`** of the forward-over-reverse product ({c['problem']}, blocks of {c['block']}): "
            f"{c['compile_s']:.0f} s to compile, then {c['compiled_ms_per_product']:.2f} ms per product against "
            f"{c['eager_ms_per_product']:.2f} ms eager (max difference {c['max_abs_diff']:.0e})."))

# %% tags=["hide-input"]
if probes is not None:
    def ratio_of(name, way, base=probe_whole_graph):
        e = next(e for e in probes["problems"] if e["name"] == name)
        d = e["dense_hessian"]
        return d[way]["median_s"] / d[base]["median_s"]

    rep = "replicated parameters (8), reverse-over-reverse"
    fwd = "forward-over-reverse, vmap over 16"
    names = [e["name"] for e in probes["problems"]]
    cnn = [n for n in names if "cnn" in n]
    mlps = [n for n in names if "mlp" in n]
    cgs = {e["name"]: e["cg_steps"] for e in probes["problems"]}
    fewer = [cgs[n]["standard"]["steps"] / cgs[n]["block"]["steps"] for n in cnn]
    ek = [cgs[n]["ekfac_preconditioned"].get("steps", float("nan")) / cgs[n]["standard"]["steps"] for n in cnn]
    lines = [
        f"- **Block CG** needs {min(fewer):.1f}-{max(fewer):.1f}x fewer steps than standard CG on the CNNs, with the "
        "same number of products per step: it is `influence_lib`'s CG.",
        f"- **EK-FAC as a preconditioner** needs {min(ek):.2f}-{max(ek):.2f}x the steps of standard CG on the "
        "CNNs: it approximates the Gauss-Newton matrix, and on these small models it does not capture the part of "
        "the damped Hessian that slows CG down. Not adopted.",
        f"- **Replicated parameters** assemble the dense Hessian in {min(ratio_of(n, rep) for n in cnn):.2f}-"
        f"{max(ratio_of(n, rep) for n in cnn):.2f}x the time of reverse-over-reverse on the whole graph on the CNNs "
        f"and {min(ratio_of(n, rep) for n in mlps):.2f}-{max(ratio_of(n, rep) for n in mlps):.2f}x on the MLPs; "
        f"**forward-over-reverse**: {min(ratio_of(n, fwd) for n in cnn):.2f}-{max(ratio_of(n, fwd) for n in cnn):.2f}x"
        f" on the CNNs, {min(ratio_of(n, fwd) for n in mlps):.2f}-{max(ratio_of(n, fwd) for n in mlps):.2f}x on the "
        "MLPs. Neither is adopted.",
        f"- **Layer by layer** (the library's way) takes {min(ratio_of(n, probe_layerwise) for n in cnn):.2f}-"
        f"{max(ratio_of(n, probe_layerwise) for n in cnn):.2f}x the time of the whole graph on the CNNs and "
        f"{min(ratio_of(n, probe_layerwise) for n in mlps):.2f}-{max(ratio_of(n, probe_layerwise) for n in mlps):.2f}x"
        " on the MLPs: each product costs about as much as before, but the columns of a later layer are products on"
        " the part of the network downstream of it, and its rows against earlier layers come from their columns.",
    ]
    if comp:
        c = comp[0]
        saved_s = (c["eager_ms_per_product"] - c["compiled_ms_per_product"]) / 1e3
        pays = (f"it pays off after about {c['compile_s'] / saved_s:,.0f} products, far more than the dense Hessian "
                f"of this model needs ({next(e['p'] for e in probes['problems'] if e['name'] == c['problem'])})"
                if saved_s > 0 else "so it never pays off")
        lines.append(f"- **`torch.compile`** costs {c['compile_s']:.0f} s of (cold) compilation, more than an "
                     f"entire influence computation on these models; the compiled product then takes "
                     f"{c['compiled_ms_per_product'] / c['eager_ms_per_product']:.2f}x the eager time, so {pays}. "
                     "Not adopted on CPU.")
    display(Markdown("\n".join(lines)))

# %% [markdown]
# ## Why EK-FAC does not precondition CG on a trained CNN (`preconditioner_spectrum.py`)
#
# A preconditioner $M$ pays when $M^{-1/2} A M^{-1/2}$ has a more clustered spectrum than
# $A = G + (\lambda_{\mathrm{wd}} + \delta) I$. The spectra below are those of a LeNet of the same layout at a
# quarter of the channels (small enough for dense float64 matrices), trained as in `scale.py`, with the same
# Gauss-Newton curvature, weight decay and damping: $A$ itself, $A$ preconditioned with EK-FAC (exact columns, same
# shift), and $A$ preconditioned with its own exact layer-block diagonal $D$ — the best any preconditioner that
# treats the layers as independent can do. The steps are those of standard CG to relative residual $10^{-3}$ on three
# test gradients, in this run.

# %% tags=["hide-input"]
spec = load("preconditioner_spectrum.json")
if spec is None:
    display(Markdown("**`benchmarks/results/preconditioner_spectrum.json` is missing**: run `make bench-probes`."))
else:
    lenet = ((load("scale.json") or {}).get("problems") or {}).get("lenet", {}).get("methods", {})
    its = {k: (lenet.get(k, {}).get("info") or {}).get("iterations") for k in ("cg", "cg+ekfac")}
    if all(isinstance(v, list) and v for v in its.values()):
        display(Markdown(f"On the LeNet of the next section (`scale.py`, float32, tolerance $10^{{-3}}$), CG "
                         f"preconditioned with EK-FAC (column by column) took {min(its['cg+ekfac'])}-"
                         f"{max(its['cg+ekfac'])} steps against {min(its['cg'])}-{max(its['cg'])} for plain block "
                         "CG. On the small LeNet, both column by column:"))
    names = {"none": "A (no preconditioner)", "ekfac": "M^(-1/2) A M^(-1/2), M = EK-FAC",
             "block": "D^(-1/2) A D^(-1/2), D = exact layer blocks of A"}
    mats = spec["matrices"]
    display(pd.DataFrame([{"matrix": names[k], "smallest eigenvalue": m["min"], "largest": m["max"],
                           "condition number": m["condition"],
                           "median eigenvalue": m["quantiles"]["0.5"],
                           "1% and 90% quantiles": f"{m['quantiles']['0.01']:.3g}, {m['quantiles']['0.9']:.3g}",
                           "CG steps (3 test gradients)": ", ".join(map(str, m["cg_steps"]))}
                          for k, m in mats.items()]).style.format(
        {"smallest eigenvalue": "{:.3g}", "largest": "{:.3g}", "condition number": "{:.0f}",
         "median eigenvalue": "{:.3g}"}).hide(axis="index"))
    a, e, b = mats["none"], mats["ekfac"], mats["block"]
    pr = spec["problem"]
    steps = lambda m: (f"{min(m['cg_steps'])}-{max(m['cg_steps'])}" if min(m["cg_steps"]) < max(m["cg_steps"])  # noqa: E731
                       else str(m["cg_steps"][0]))
    same_tail = 0.5 < e["min"] / b["min"] < 2
    tail = ("The tail is the same with the exact blocks as with EK-FAC: it comes from the coupling between layers "
            "that any layer-block-diagonal preconditioner leaves out (in directions where the layers' contributions "
            "cancel, a block's own curvature is far above the whole matrix's, and the preconditioner divides by it), "
            "not from the Kronecker factorisation within each block, which widens the top "
            f"(largest eigenvalue {e['max']:.3g} against {b['max']:.3g})." if same_tail else
            f"The tail differs between the two (smallest eigenvalue {e['min']:.3g} with EK-FAC, {b['min']:.3g} with "
            "the exact blocks): here the Kronecker factorisation within each block matters as well as the coupling "
            "between layers.")
    display(Markdown(
        f"The damped Gauss-Newton matrix of the trained network ({pr['params']:,} parameters, {pr['n_train']:,} "
        f"MNIST digits) has almost all its eigenvalues at the shift: the median is {a['quantiles']['0.5']:.4g} "
        f"against a shift of {pr['shift']:.4g}, and 90% lie below {a['quantiles']['0.9']:.4g}; a few large "
        f"outliers (up to {a['max']:.3g}) set its condition number of {a['condition']:.0f}, and CG, which removes "
        f"a few outliers in about as many steps, needs {steps(a)}. Both layer-block-diagonal preconditioners turn "
        f"that bulk into a spread around 1 with a tail of small eigenvalues, down to {e['min']:.3g} with EK-FAC and "
        f"{b['min']:.3g} with the exact layer blocks (their 1% quantiles {e['quantiles']['0.01']:.2f} and "
        f"{b['quantiles']['0.01']:.2f}), and CG needs {steps(e)} and {steps(b)} steps: the condition number alone "
        f"({e['condition']:.0f} and {b['condition']:.0f}) does not tell, the clustering does. {tail} "
        f"Measured on {spec['machine']['cpu_count']} cores, {spec['machine']['time_utc'][:10]}, in "
        f"{spec['total_s'] / 60:.0f} minutes; `{spec['machine']['command']}`."))

# %% [markdown]
# ## At the scale users run it (`scale.py`)
#
# Two convolutional networks of the size users bring, each trained with Adam (batch 128, 5 epochs) on 4,000
# training images and scored against 100 test images in float32: a LeNet-style CNN (two 5x5 convolutions with 16 and
# 32 channels, max-pooling, Linear 512-64-10; 46,730 parameters) on the MNIST digits, and a ResNet-style CNN (a
# stride-2 stem and three stages of two residual blocks at 24, 48 and 100 channels; 519,334 parameters) on
# Fashion-MNIST. `benchmarks/scale.py` runs each method, ours and the anchors' (through the same adapters as above),
# in a fresh process and records its wall time, its peak resident memory and the same time in *training-epoch
# equivalents*: one epoch of Adam with batch 128 on the same model and data, timed in the same process (the CPU-time
# ratio is given too; it is the one to read when the machine was shared). The process times two epochs before the
# call and two after it; the epochs after ran up to 30% faster in these runs, so *epochs (faster epoch)* gives the
# same time against the faster of the two, the conservative figure. Accuracy is the Pearson correlation of
# the scores with our exact EK-FAC on the same rows (and with a float64 CG reference where one was computed). The
# second table of each problem sets every anchor against the method of ours it corresponds to (kronfluence's EK-FAC
# samples its labels, so it is set against our EK-FAC with sampled labels, `samples=1`): a ratio above 1 means
# `influence_lib` is faster. Its last two columns answer "how much faster at equal accuracy" without fixing the
# pairing in advance: the fastest method of ours, timed in the same run on the same test rows, whose Pearson distance
# $1 - r$ from the yardstick is at most 1.1 times the anchor's (the rule of the tables above, where the relative error
# is the measure; methods that sample their labels differ by a few thousandths in $r$ from the draw alone), and its
# ratio. The yardstick is the float64 reference where it ran; otherwise, for the
# anchors' EK-FAC and K-FAC (all approximations of the Gauss-Newton matrix), our exact EK-FAC, with only our EK-FAC
# methods as candidates. The machine, its load and the command are printed under each table.
#
# **Where the LeNet's CG time goes.** CG, Arnoldi and EK-FAC-preconditioned CG spend almost all their time in
# Gauss-Newton products $G v = \frac{1}{n}\sum_i J_i^\top H_{\mathrm{out},i} J_i v$ over the 4,000 images. Computed
# from scratch, each product runs the forward pass twice (once for the pullback $J^\top$, once inside forward-mode AD
# for $J v$): about 2.3 to 3.1 s per vector here, 2 to 2.5 training epochs. At fixed parameters the forward pass is
# the same for every product, so `GaussNewtonOperator` linearizes each 500-row chunk once, from its second product
# on (`torch.func.linearize`, about 80 MB kept per chunk, within a budget of 1 GiB), and every later product runs only
# the tangent pass $v \mapsto J v$ and its transpose $u \mapsto J^\top u$ (reverse mode through the same linear map):
# about 1.0 s per vector, measured on this machine in one process. The products agree with the recomputed ones to
# rounding error (`tests/test_gauss_newton_kept.py`, in float64, on a CNN and two MLPs).

# %% tags=["hide-input"]
def faster_epochs(m: dict) -> float | None:
    """A measurement's wall time in epochs of the faster of the epochs timed before and after it (the conservative
    epoch-equivalent: the epochs after the call ran up to 30% faster than those before in these runs)."""
    before, after = m.get("epoch_s"), m.get("epoch_after_s")
    if m.get("status") != "ok" or not before:
        return None
    return m["time_s"] / min(before, after or before)


def kept_text(kept) -> str:
    """What our exact EK-FAC's first pass kept (its info["kept"], recorded since 2026-12-04), in words."""
    if kept == "streamed":
        return " Our exact EK-FAC kept nothing of its first pass here (its passes streamed)."
    if not isinstance(kept, dict):
        return ""
    forms = kept["forms"]
    parts = [f"{forms.count(f)} {'layer' if forms.count(f) == 1 else 'layers'} {how}"
             for f, how in (("gradient", "as per-example gradients"), ("rows", "as columns with their inputs"))
             if forms.count(f)]
    again = forms.count("recompute")
    return (f" Our exact EK-FAC's first pass kept {' and '.join(parts)} ({kept['bytes'] / 2**20:.0f} MiB)"
            + (f" and recomputed the other {again} layers' columns by backward passes that stop at them" if again
               else "") + ", so that its columns were backpropagated through the whole network once.")


scale = load("scale.json")
if scale is None or "problems" not in scale:
    display(Markdown("**`benchmarks/results/scale.json` is missing**: run `make bench-compare` to create it."))
else:
    for pname, entry in scale["problems"].items():
        pr, mc = entry["problem"], entry.get("machine", scale["machine"])
        rows = []
        for kind, group in (("ours", entry["methods"]), ("anchor", entry.get("anchors", {}))):
            for name, m in group.items():
                rows.append({"method": name if kind == "ours" else f"{name} (anchor)",
                             "test points": m.get("n_test"), "status": m.get("status"), "time (s)": m.get("time_s"),
                             "epochs (wall)": m.get("epochs"), "epochs (CPU)": m.get("epochs_cpu"),
                             "epochs (faster epoch)": faster_epochs(m),
                             "peak RSS (MB)": m.get("peak_rss_mb"),
                             "Pearson vs reference": (m.get("accuracy") or {}).get("pearson"),
                             "Pearson vs exact EK-FAC": 1.0 if name == "ekfac" and m.get("status") == "ok" else
                             (m.get("vs_exact_ekfac") or {}).get("pearson")})
        display(Markdown(f"**{pname}**: {pr['params']:,} parameters, {pr['n_train']:,} training points "
                         f"({pr['dataset']}), test accuracy {pr['test_accuracy']:.2f} after {pr['train_epochs']} "
                         f"epochs, {pr['dtype']}, {pr['curvature']} curvature, damping {pr['damping']}, weight "
                         f"decay {pr['weight_decay']}."))
        display(pd.DataFrame(rows).style.format(
            {"test points": "{:.0f}", "time (s)": "{:.1f}", "epochs (wall)": "{:.1f}", "epochs (CPU)": "{:.1f}",
             "epochs (faster epoch)": "{:.1f}",
             "peak RSS (MB)": "{:.0f}", "Pearson vs reference": "{:.4f}", "Pearson vs exact EK-FAC": "{:.4f}"},
            na_rep="–").hide(axis="index"))
        ar, ms = entry.get("arithmetic"), entry["methods"]
        if ar and ms.get("ekfac", {}).get("status") == "ok" and ms.get("ekfac-sampled", {}).get("status") == "ok":
            share = 2 * ar["n_test"] * pr["params"] / ar["epoch_flops_per_row"]
            display(Markdown(
                f"*The arithmetic of EK-FAC at this model's shapes* (counted from its layers by `scale.arithmetic`: "
                f"the products only, no elementwise work): with the exact Gauss-Newton columns ({ar['columns']} per "
                f"row), EK-FAC's factors, backward columns, eigenvalue correction and scores make "
                f"{ar['ekfac_flops_per_row'] / 1e6:.0f} MFLOP per training row, a training epoch "
                f"{ar['epoch_flops_per_row'] / 1e6:.1f}: **{ar['ekfac_epochs_floor']:.1f} epochs** at the rate "
                f"training runs its own products (measured: {ms['ekfac']['epochs']:.1f}, or "
                f"{faster_epochs(ms['ekfac']):.1f} against the faster epoch); with one sampled column, "
                f"{ar['ekfac_sampled_epochs_floor']:.1f} (measured: {ms['ekfac-sampled']['epochs']:.1f}, or "
                f"{faster_epochs(ms['ekfac-sampled']):.1f}). Of these, "
                f"the scores' inner products with the {ar['n_test']} test gradients alone ($2 m p$ per row) are "
                f"{share:.1f} epochs. Each exact column is backpropagated and rotated for every row, so the exact "
                f"estimator costs several times the sampled one whatever the implementation. "
                + ("The measured figures are below the arithmetic: EK-FAC's large products ran faster than "
                   "training's batch-128 steps." if faster_epochs(ms["ekfac"]) < ar["ekfac_epochs_floor"] else
                   "The measured figure is about the arithmetic." if ms["ekfac"]["epochs"] < ar["ekfac_epochs_floor"]
                   else
                   "The measured figure is above the arithmetic, which counts neither elementwise work nor, where "
                   "the first pass is not kept, the second full backward pass of the exact columns.")
                + kept_text(ms["ekfac"].get("info", {}).get("kept"))))
        reasons: dict[str, list[str]] = {}  # one line per reason, with every method and anchor it applies to
        for group in (entry["methods"], entry.get("anchors", {})):
            for name, m in group.items():
                if m.get("status") != "ok":
                    reasons.setdefault(ANSI.sub("", str(m.get("error", m.get("status")))), []).append(f"`{name}`")
        if reasons:
            display(Markdown("Not measured: " + "; ".join(f"{', '.join(names)}: {why}"
                                                           for why, names in reasons.items()) + "."))
        comp = [c for c in entry.get("comparisons", []) if c.get("status") == "ok"]
        apart = [f"`{c['anchor']}` and `{c['ours']}` ({c['status']})" for c in entry.get("comparisons", [])
                 if str(c.get("status", "")).startswith("measured in different runs")]
        if comp:
            display(pd.DataFrame([{"anchor": c["anchor"], "ours": c["ours"], "anchor / ours (wall)": c["speedup"],
                                   "anchor / ours (CPU)": c["speedup_cpu"], "anchor Pearson": c["anchor_pearson"],
                                   "ours Pearson": c["ours_pearson"],
                                   "fastest of ours as accurate": (c.get("fastest_as_accurate") or {}).get("ours"),
                                   "its anchor / ours (wall)":
                                       (c.get("fastest_as_accurate") or {}).get("speedup")} for c in comp])
                    .style.format({"anchor / ours (wall)": "{:.1f}x", "anchor / ours (CPU)": "{:.1f}x",
                                   "anchor Pearson": "{:.4f}", "ours Pearson": "{:.4f}",
                                   "its anchor / ours (wall)": "{:.1f}x"}, na_rep="–")
                    .hide(axis="index"))
        if apart:
            display(Markdown("Not set against each other, since only measurements of one run are compared: "
                             + "; ".join(apart) + "."))
        ref = entry.get("reference", {})
        wrap = lambda cmd: cmd.replace(' --', ' ' + chr(92) + chr(10) + '    --')  # noqa: E731
        ref_text = f"The float64 reference: {ref.get('status', 'not run')}" + (
            f" ({ref['error']})" if ref.get("error") else
            f" ({ref['n_test']} test points, {ref['time_s']:.0f} s)" if ref.get("status") == "ok" else "") + "."
        kf = {n: (m.get("accuracy") or {}).get("pearson") for g in (entry["methods"], entry.get("anchors", {}))
              for n, m in g.items() if "kfac" in n and not n.startswith("cg")}  # cg+ekfac is a CG
        kr = {n: (m.get("accuracy") or {}).get("pearson") for n, m in entry["methods"].items() if n.startswith("cg")}
        kf, kr = {n: v for n, v in kf.items() if v is not None}, {n: v for n, v in kr.items() if v is not None}
        if kf and kr:
            best = max(kf, key=kf.get)
            ref_text += (f" Against it, on its {ref['n_test']} test points, the Kronecker-factored methods of every "
                         f"library (EK-FAC and K-FAC) reach a Pearson correlation of at most {kf[best]:.3f} "
                         f"(`{best}`), our CG (tolerance $10^{{-3}}$ or tighter) at least {min(kr.values()):.6f}: on this "
                         "network the Kronecker factorisation, not the solver's tolerance, limits the accuracy.")
        added = ref.get("added")
        if added:
            again = [f"`{n}`" for g in (entry["methods"], entry.get("anchors", {})) for n, m in g.items()
                     if (m.get("accuracy") or {}).get("rescored")]
            kept_rows = [f"`{n}`" for g in (entry["methods"], entry.get("anchors", {})) for n, m in g.items()
                         if m.get("accuracy") and not m["accuracy"].get("rescored")]
            how = "; ".join(
                ([f"{', '.join(kept_rows)}: the scores their timed runs kept on its rows"] if kept_rows else [])
                + ([f"{', '.join(again)}: run again on its rows for their scores (their timed runs kept none)"]
                   if again else []))
            ref_text += (f" It was added after the timed run ({added['machine']['time_utc'][:10]}; {how}), and the "
                         f"times above are those of the timed runs. The command that added it:"
                         f"\n\n```\n{wrap(added['machine']['command'])}\n```\n\nThe timed run's command:")
        else:
            ref_text += " The command:"
        later = "".join(
            f"\n\nMeasured in a later run ({run[:10]}, on the same kind of machine, every pair in it set against "
            f"each other only): " + ", ".join(f"`{n}`" for n in r.get("measured", [])) + f". Its command:"
            f"\n\n```\n{wrap(r['command'])}\n```" for run, r in entry.get("runs", {}).items())
        display(Markdown(f"Measured on {mc['cpu_count']} cores, {mc['torch_threads']} torch thread(s) per "
                         f"measurement (load average {mc['loadavg_1_5_15'][0]:.1f} at the start). {ref_text}"
                         f"\n\n```\n{wrap(mc['command'])}\n```" + later))

# %% [markdown]
# ## Newton-converged leave-one-out (`newton_loo.py`)
#
# Leave-one-out retraining of every Iris training point with the book's warm-start Adam protocol and with damped
# Newton to a relative gradient norm of $10^{-10}$ (`optimizer="newton"`), on the same model, in one run.

# %% tags=["hide-input"]
nl = load("newton_loo.json")
if nl is not None:
    display(pd.DataFrame([{"activation": c["activation"], "weight decay": c["weight_decay"], "depth": c["depth"],
                           "Adam LOO (s)": c["adam_loo"]["seconds"], "Newton LOO (s)": c["newton_loo"]["seconds"],
                           "speed-up": c["speedup_adam_over_newton"],
                           "converged": f"{c['newton_loo']['converged']} of {c['newton_loo']['of']}",
                           "Adam max grad norm": c["adam_loo"]["max_grad_norm"],
                           "Newton max grad norm": c["newton_loo"]["max_grad_norm"]} for c in nl["cases"]])
            .style.format({"Adam LOO (s)": "{:.1f}", "Newton LOO (s)": "{:.1f}", "speed-up": "{:.1f}x",
                           "Adam max grad norm": "{:.1e}", "Newton max grad norm": "{:.1e}"}).hide(axis="index"))
    display(Markdown("On ReLU networks the leave-one-out minimisers lie on kinks of the objective, where the gradient "
                     "never vanishes: Newton is reported as not converged there rather than returned as if it were "
                     "(the smooth `iris-newton` sweep of the Iris chapter uses tanh units for that reason)."))

# %% [markdown]
# ## Stacked training of the book's CNNs (`cnn_layout.py`)
#
# The CNN chapter's records train one model to $\theta^*$ (2,000 full-batch Adam steps) and 17 leave-one-out models
# together (8 removals for each of two test points, and the retrained reference). `fit_stacked` used to train such a
# stack with `torch.func.vmap` over channels-first models; it now trains the models one at a time with the weights
# of every convolution with more than one input channel in the channels-last memory format, which oneDNN runs
# faster for these few-channel convolutions (under `vmap` each convolution of a stack becomes a grouped one, slower
# still). Both ways are timed in one process on the chapter's nine architectures (width 4, float32, 100 images of
# 1x28x28, one thread), interleaved, the fastest of the rounds kept. The table gives milliseconds per training step
# of the single model (θ*) and of the stack of 17 (LOO), before and now, their ratios (above 1: now is faster), and
# the largest relative difference between the parameters the two ways reach (float32 rounding: the same
# optimisation).

# %% tags=["hide-input"]
cl = load("cnn_layout.json")
if cl is None:
    display(Markdown("**`benchmarks/results/cnn_layout.json` is missing**: run `python benchmarks/cnn_layout.py`."))
else:
    display(pd.DataFrame([{"model": c["model"], "depth": c["depth"], "parameters": c["p"],
                           "θ* before (ms)": c["theta*"]["ms_per_step_before"],
                           "θ* now (ms)": c["theta*"]["ms_per_step_now"],
                           "θ* ratio": c["theta*"]["speedup"],
                           "LOO before (ms)": c["loo"]["ms_per_step_before"],
                           "LOO now (ms)": c["loo"]["ms_per_step_now"],
                           "LOO ratio": c["loo"]["speedup"],
                           "rel. diff.": max(c["theta*"]["max_relative_param_difference"],
                                                                c["loo"]["max_relative_param_difference"])}
                          for c in cl["cases"]])
            .style.format({"θ* before (ms)": "{:.1f}", "θ* now (ms)": "{:.1f}",
                           "θ* ratio": "{:.2f}x", "LOO before (ms)": "{:.0f}",
                           "LOO now (ms)": "{:.0f}", "LOO ratio": "{:.2f}x",
                           "rel. diff.": "{:.1e}"}).hide(axis="index"))
    m = cl["machine"]
    display(Markdown(f"Measured on {cl['date']} ({m['processor']}, {m['cpus']} CPU cores, {m['platform']}, torch "
                     f"{m['torch']}, {m['threads']} thread), {cl['steps']} steps per way and round, "
                     f"{cl.get('rounds', 1)} rounds; load average {cl['loadavg_1_5_15_before'][0]:.1f} at the start "
                     f"and {cl['loadavg_1_5_15_after'][0]:.1f} at the end. Command: "
                     f"`python benchmarks/cnn_layout.py --steps {cl['steps']} --rounds {cl.get('rounds', 1)}`."))
