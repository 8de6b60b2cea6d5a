# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Beyond the paper: the linear datamodeling score
#
# **The question.** Every chapter so far judges influence estimates the way {cite}`basu2021` do: by *single*
# removals. For one test point, the predicted loss changes of many training points are correlated with
# leave-one-out (LOO) retraining, one removed point at a time. With TRAK, {cite}`park2023` introduced a
# group-level yardstick that has since become a standard benchmark for data attribution: the **linear
# datamodeling score** (LDS). It asks whether the scores, *added up*, predict what happens when a large random
# part of the training set is removed at once. This chapter evaluates the project's five inverse-HVP methods
# (exact, CG, LiSSA, Arnoldi, EK-FAC) by LDS on the small models where that is affordable, and measures the
# paper's single-removal correlation on the very same models, scores and retraining protocol.
#
# **The score.** Let $\tau_{ti}$ be the influence score of training point $i$ for test point $t$: the
# predicted change of the test loss when $i$ is *removed*, $1/n$ included (positive: the point helped). Draw
# $K$ random subsets $S_1, \dots, S_K$, each keeping $m = \operatorname{round}(\alpha n)$ of the $n$ training
# points, and retrain a model $\theta_{S_k}$ on each. Training on $S_k$ removes its complement, and the
# additive (first-order) model predicts
#
# $$\hat\Delta_t(S_k) = \sum_{i \notin S_k} \tau_{ti} \;\approx\; \Delta_t(S_k) = L(z_t, \theta_{S_k}) - L(z_t, \theta_\text{ref}),$$
#
# where $\theta_\text{ref}$ is the full-data model retrained with the same protocol. The LDS of test point $t$
# is the rank correlation across the subsets,
#
# $$\text{LDS}_t = \rho_\text{Spearman}\Big(\big(\hat\Delta_t(S_k)\big)_{k=1}^{K},\ \big(\Delta_t(S_k)\big)_{k=1}^{K}\Big),$$
#
# averaged over the test points. Because every subset has the same size, $\sum_{i \notin S}\tau_{ti} =
# \text{const} - \sum_{i\in S}\tau_{ti}$; this is TRAK's definition (summed attributions of the *kept* points
# against the model output) with the model output taken to be the negative test loss. Ranks ignore the
# $1/n$, any per-test-point offset and any positive rescaling. A perfect additive attribution scores 1,
# scores of the wrong sign score $-1$, and scores unrelated to the outcome score 0 on average. A test point
# whose predicted or actual vector is constant across subsets has no LDS; such cases are counted and left out
# of the means, never averaged as zeros. (The implementation, `influence_lib.lds`, is tested against closed-form
# ridge refits and against a model built so that LDS must be exactly 1.)
#
# **Protocol.**
# * Models: the Iris MLPs of the Iris chapter (width 5, depth 1 and depth 3, ReLU, weight decay 0.005,
#   damping $\lambda = 0.001$, trained with the same settings), and the small-MNIST MLP of the MNIST chapter
#   (depth 1, width 4, 300 training digits, weight decay 0.001, $\lambda = 0.01$). Float64 throughout.
# * Scores: for *every* test point, from each method on the same $\theta^*$: the exact inverse of the damped
#   Hessian (float64 eigendecomposition), CG, LiSSA with mini-batch Hessian products (as in the paper),
#   a rank-limited Arnoldi inverse {cite}`schioppa2022` and EK-FAC (which approximates the Gauss-Newton
#   matrix rather than the Hessian). A method that fails on a model (CG meets negative curvature when
#   $\lambda_{\min} + \lambda < 0$) is reported as a failure, not dropped silently.
# * Subsets: half-size random subsets ($\alpha = 0.5$); on the shallow Iris model also $\alpha = 0.9$
#   (removing a tenth of the data). A new set of subsets per seed.
# * Retraining: warm-started from $\theta^*$ with Adam, the reference model retrained identically so that
#   optimiser drift cancels, ordinary training on the kept points (mean loss over them plus weight decay).
#   This is the protocol of the LOO ground truth of the other chapters, and the response that influence
#   functions linearise. TRAK retrains from scratch and averages over several models per subset, which
#   measures the behaviour of the whole training procedure; that is one `overrides` entry away
#   (`{"retrain_warm_start": False, "retrain_steps": 10000}`), at many times the cost.
# * The paper's metric on the same models: LOO retraining (same optimiser, steps and reference) of every
#   training point on Iris and of a random sample on MNIST, and the Spearman correlation over the removed
#   points for every test point, as in the other chapters.
# * **The LOO oracle.** Where every training point was retrained without (Iris), the *actual* LOO effects are
#   themselves an attribution: what a perfect single-removal estimator would produce. Its LDS measures how well
#   true single-point effects, added up, predict group outcomes, i.e. how additive the model is around
#   $\theta^*$. It is a reference rather than a strict ceiling: the measured LOO effects are small and carry
#   retraining noise, and an attribution that is *not* the LOO effect can predict groups better.
#
# Everything below is read from the records in `results/lds/` (quick profile: `results/quick/lds/`).

# %% tags=["parameters", "hide-input"]
profile = None  # None: the IL_PROFILE environment variable ("default" or "quick")
seeds = None  # None: the preset's seeds
overrides = {}  # any key of influence_lib.experiments.run_lds.LDS_DEFAULTS, e.g. {"n_subsets": 200} or {"alphas": [0.5, 0.9]}
jobs = None  # worker processes for missing records (None: IL_JOBS or the number of CPU cores)
scheduler = None  # address of a dask.distributed scheduler for missing records (None: IL_SCHEDULER, else local processes)

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from scipy import stats

from influence_lib import experiments as ex
from influence_lib.experiments import presets, report
from influence_lib.experiments.frames import lds_frame

ex.parameters(globals(), ['profile', 'seeds', 'overrides', 'jobs', 'scheduler'])  # refuses unknown parameters, parses what papermill passes as text

sns.set_theme(style="whitegrid", context="notebook")
prof = profile or ex.profile()
settings = presets.settings("lds", prof, overrides, seeds)
records = ex.chapter_records("lds", prof, settings=settings, jobs=jobs, scheduler=scheduler)[0]
ok, failed = ex.split_failed(records)
display(Markdown("> **Which data produced these numbers.** " + report.provenance(records)))
display(Markdown("> **Compute.** " + report.runtime_summary(records) + f" Profile: `{prof}`."))
for r in failed:
    print("FAILED setting:", {k: r["setting"][k] for k in ("dataset", "depth", "width", "seed")}, r["error"])

NAMES = {"iris": "Iris", "mnist-small": "small MNIST"}
METHODS = ["exact", "cg", "lissa", "arnoldi", "ekfac"]
LABELS = {"exact": "exact", "cg": "CG", "lissa": "LiSSA", "arnoldi": "Arnoldi", "ekfac": "EK-FAC",
          "loo_oracle": "LOO oracle"}


def model_label(dataset, depth, width):
    return f"{NAMES.get(dataset, dataset)}, depth {depth}, width {width}"


frame = lds_frame(ok)
frame["model"] = [model_label(*v) for v in zip(frame.dataset_used, frame.depth, frame.width, strict=True)]
per_test = lds_frame(ok, per_test=True)
per_test["model"] = [model_label(*v) for v in zip(per_test.dataset_used, per_test.depth, per_test.width, strict=True)]
models = list(dict.fromkeys(frame.sort_values(["dataset_used", "depth"], ascending=[True, True]).model))
n_seeds = frame.groupby("model").seed.nunique().to_dict()


def rec_label(r):
    s = r["setting"]
    return model_label(r["dataset"]["name"], s["depth"], s["width"])


def clip_ci(row, m, digits=2):
    """'mean [lo, hi]' of a correlation over seeds, the Student-t interval clipped to [-1, 1]."""
    return report.fmt_ci(row[f"{m}_mean"], row[f"{m}_lo"], row[f"{m}_hi"], digits, bounds=(-1.0, 1.0))


# %% [markdown]
# ## Settings
# One row per model, read from the records. "grad norm" is $\lVert\nabla J(\theta^*)\rVert$ after training
# (the influence approximation assumes a stationary point); "retrain grad norm" is the median over the subset
# models of the gradient norm of each one's own objective at the end of retraining.

# %% tags=["hide-input"]
rows = []
for lab in models:
    rs = [r for r in ok if rec_label(r) == lab]
    s = rs[0]["setting"]
    e0 = rs[0]["lds"][0]
    rows.append({
        "model": lab, "n_train": rs[0]["dataset"]["n_train"], "n_test": rs[0]["dataset"]["n_test"],
        "params": rs[0]["model"]["n_params"], "weight decay": f"{s['weight_decay']:g}", "damping": f"{s['damping']:g}",
        "training": f"{s['optimizer']} lr {s['lr']:g} x {s['steps']}",
        "retraining": f"{s['retrain_optimizer']} lr {s['retrain_lr']:g} x {s['retrain_steps']}, "
                      + ("warm start" if s["retrain_warm_start"] else "from scratch"),
        "alphas": ", ".join(f"{a:g}" for a in s["alphas"]), "subsets": s["n_subsets"],
        "subset size": e0["subset_size"], "LOO points": len(rs[0]["loo"]["removed"]) if rs[0]["loo"] else 0,
        "seeds": ", ".join(str(r["setting"]["seed"]) for r in rs),
        "test acc.": f"{np.mean([r['training']['test_accuracy'] for r in rs]):.2f}",
        "grad norm": f"{np.mean([r['training']['grad_norm'] for r in rs]):.1e}",
        "retrain grad norm": f"{np.median([e['retrain']['grad_norm_median'] for r in rs for e in r['lds']]):.1e}",
    })
display(pd.DataFrame(rows).style.hide(axis="index"))

# %% [markdown]
# ## Result 1: LDS of each inverse-HVP method
#
# Mean LDS over all test points of a model, then mean over seeds with a 95 % Student-t interval over the seeds
# ($\alpha = 0.5$). "$k$ of $N$ seeds" marks a method that failed on some seeds (the failures are listed below the
# table). The LOO oracle column exists where every training point was retrained without (Iris).

# %% tags=["hide-input"]
half = frame[frame.alpha == 0.5]
agg = report.aggregate(half, ["model", "method"], ["lds", "loo_spearman", "loo_spearman_top"])
agg = agg.set_index(["model", "method"])
cols = [m for m in [*METHODS, "loo_oracle"] if m in set(half.method)]
table = pd.DataFrame(index=models, columns=[LABELS[m] for m in cols], dtype=object)
for lab in models:
    for m in cols:
        if (lab, m) not in agg.index:
            table.loc[lab, LABELS[m]] = "n/a"
            continue
        row = agg.loc[(lab, m)]
        k = int(row["lds_n"])
        cell = clip_ci(row, "lds") if k else "failed"
        if 0 < k < n_seeds[lab]:
            cell += f" ({k} of {n_seeds[lab]} seeds)"
        table.loc[lab, LABELS[m]] = cell
display(table.style.set_caption("LDS at alpha = 0.5: mean [95% interval over seeds]"))
undefined = int(half.lds_n_undefined.fillna(0).sum())
defined = int(half.lds_n_defined.fillna(0).sum())
display(Markdown(f"Undefined LDS values (a constant vector across subsets), left out of the means: "
                 f"**{undefined}** of {undefined + defined} (test point, method, seed) values."))
errs = frame[frame.error.notna()].drop_duplicates(["model", "seed", "method"])
for r in errs.itertuples():
    print(f"{r.model}, seed {r.seed}: {LABELS[r.method]} failed: {r.error[:150]}")

# %% tags=["hide-input"]
fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
offsets = np.linspace(-0.2, 0.2, len(models))
panels = [("lds", "LDS (groups, alpha = 0.5)"), ("loo_spearman", "Spearman vs LOO (single removals)")]
for ax, (metric, title) in zip(axes, panels, strict=True):
    for i, lab in enumerate(models):
        xs, ms, err = [], [], [[], []]
        for j, m in enumerate(cols):
            if (lab, m) not in agg.index or not np.isfinite(agg.loc[(lab, m)][f"{metric}_mean"]):
                continue
            row = agg.loc[(lab, m)]
            mean = row[f"{metric}_mean"]
            lo = max(row[f"{metric}_lo"], -1) if np.isfinite(row[f"{metric}_lo"]) else mean
            hi = min(row[f"{metric}_hi"], 1) if np.isfinite(row[f"{metric}_hi"]) else mean
            xs.append(j + offsets[i])
            ms.append(mean)
            err[0].append(mean - lo)
            err[1].append(hi - mean)
        ax.errorbar(xs, ms, yerr=err, fmt="o", capsize=3, color=f"C{i}", label=lab)
        pts = half[(half.model == lab) & half[metric].notna()]
        ax.scatter([cols.index(m) + offsets[i] for m in pts.method], pts[metric], s=10, color=f"C{i}", alpha=0.35)
    ax.set_xticks(range(len(cols)), [LABELS[m] for m in cols])
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(title=title, ylim=(-0.2, 1.0))
axes[0].set_ylabel("correlation (mean over test points)")
axes[0].legend(fontsize=8, loc="lower left")
fig.suptitle("Mean over seeds with 95% interval; small dots: single seeds")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Result 2: the same scores judged by single removals
#
# The paper's metric on the same models and scores: Spearman correlation between predicted and actual LOO
# changes over the removed training points (all of them, and the top-$k$ by |predicted| as in the other
# chapters), averaged over all test points, then over seeds. The relative error is that of each method's score
# matrix against the exact one (median over seeds). The ranks order the methods within a model by each metric.

# %% tags=["hide-input"]
rows = []
for lab in models:
    sub = agg.loc[lab] if lab in agg.index.get_level_values(0) else None
    if sub is None:
        continue
    methods_here = [m for m in METHODS if m in sub.index and sub.loc[m, "lds_n"] > 0]
    lds_rank = pd.Series({m: sub.loc[m, "lds_mean"] for m in methods_here}).rank(ascending=False, method="min")
    loo_rank = pd.Series({m: sub.loc[m, "loo_spearman_mean"] for m in methods_here}).rank(ascending=False,
                                                                                          method="min")
    for m in methods_here:
        relerr = half[(half.model == lab) & (half.method == m)].relative_error.median()
        k = half[(half.model == lab)].loo_k.dropna()
        rows.append({"model": lab, "method": LABELS[m], "seeds": int(sub.loc[m, "lds_n"]),
                     "LDS": clip_ci(sub.loc[m], "lds"),
                     "LOO Spearman (all removed)": clip_ci(sub.loc[m], "loo_spearman"),
                     f"LOO Spearman (top-{int(k.iloc[0]) if len(k) else '?'})": clip_ci(sub.loc[m], "loo_spearman_top"),
                     "rel. error vs exact": f"{relerr:.1e}", "rank by LDS": int(lds_rank[m]),
                     "rank by LOO": int(loo_rank[m])})
contrast = pd.DataFrame(rows)
display(contrast.style.hide(axis="index"))


# %% tags=["hide-input"]
def welch(a, b):
    """Difference of means b - a with a Welch 95% interval (NaN interval with fewer than two values each)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return (b.mean() - a.mean() if len(a) and len(b) else np.nan), np.nan, np.nan
    ci = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    return b.mean() - a.mean(), ci.low, ci.high


lines = []
for lab in models:
    sub = half[(half.model == lab) & half.lds.notna() & half.method.isin(METHODS)]
    gap = sub.groupby("seed").apply(lambda g: (g.lds - g.loo_spearman).mean(), include_groups=False)
    mean, lo, hi = report.mean_ci(gap.to_numpy()) if len(gap) else (np.nan, np.nan, np.nan)
    side = "the interval excludes 0" if np.isfinite(lo) and (lo > 0 or hi < 0) else "the interval contains 0"
    lines.append(f"* **{lab}**: LDS minus LOO Spearman, averaged over the methods: {report.fmt_ci(mean, lo, hi)}"
                 + (f" (95% interval over {len(gap)} seeds; {side})." if np.isfinite(lo) else "."))
iris_models = [m for m in models if m.startswith("Iris")]
if len(iris_models) >= 2:
    shallow, deep = iris_models[0], iris_models[-1]
    for metric, name in (("lds", "LDS"), ("loo_spearman", "LOO Spearman")):
        a = half[(half.model == shallow) & (half.method == "exact")][metric]
        b = half[(half.model == deep) & (half.method == "exact")][metric]
        d, lo, hi = welch(a, b)
        lines.append(f"* Exact influence, {name} from *{shallow}* to *{deep}*: change {report.fmt_ci(d, lo, hi)}"
                     + (f" (Welch 95% interval over seeds; against the paper's 'deeper is worse': "
                        f"{report.verdict(d, lo, hi, -1)})." if np.isfinite(lo) else "."))
display(Markdown("\n".join(lines)))

# %% [markdown]
# The same comparison test point by test point: each dot is one (seed, test point) of the exact influence (colour:
# seed), its LDS against its LOO Spearman correlation. Points above the diagonal are test points whose scores predict
# group outcomes better than they rank single removals.

# %% tags=["hide-input"]
example = per_test[(per_test.method == "exact") & (per_test.alpha == 0.5)].dropna(subset=["lds", "loo_spearman"])
fig, axes = plt.subplots(1, len(models), figsize=(min(10, 4.2 * len(models)), 4), squeeze=False)
for ax, lab in zip(axes[0], models, strict=True):
    g = example[example.model == lab]
    ax.plot([-1, 1], [-1, 1], color="grey", lw=0.8, ls="--")
    if len(g):
        sns.scatterplot(data=g, x="loo_spearman", y="lds", hue="seed", palette="deep", s=22, ax=ax,
                        legend="full" if ax is axes[0][-1] else False)
        r = np.corrcoef(g.loo_spearman, g.lds)[0, 1] if len(g) > 2 and g.lds.std() > 0 else np.nan
        ax.set_title(f"{lab}\nabove diagonal {np.mean(g.lds > g.loo_spearman):.0%}, Pearson {r:.2f}", fontsize=10)
    ax.set(xlabel="Spearman vs LOO (single removals)", ylabel="LDS (alpha = 0.5)", xlim=(-0.6, 1), ylim=(-0.6, 1))
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Result 3: when the most accurate inverse is the worst attribution
#
# The exact method inverts $H + \lambda I$ in every direction, including directions where $\lambda_k + \lambda$ is
# close to zero (small or negative curvature left after the damping). One such direction can dominate the
# scores. Per model and seed: the smallest $|\lambda_k + \lambda|$, the number of negative $\lambda_k + \lambda$, and
# the share $\lVert S_k\rVert_F / \lVert S\rVert_F$ of the exact score matrix $S$ contributed by that single
# eigendirection, next to the LDS of the exact scores and of the two approximations that do not invert it
# (Arnoldi keeps the largest eigenvalues only; LiSSA's truncated series damps the smallest).

# %% tags=["hide-input"]
rows = []
for r in ok:
    sp = r.get("spectrum") or {}
    e = next(x for x in r["lds"] if x["alpha"] == 0.5)
    row = {"model": rec_label(r), "seed": r["setting"]["seed"], "lambda_min": sp.get("lambda_min", np.nan),
           "damping": r["setting"]["damping"], "min |lambda + damping|": sp.get("damped_min_abs", np.nan),
           "negative after damping": sp.get("damped_n_negative", np.nan),
           "share of that direction": sp.get("near_singular_share", np.nan)}
    for m in ("exact", "arnoldi", "lissa"):
        me = e["methods"].get(m)
        row[f"LDS {LABELS[m]}"] = np.nan if me is None or me["mean"] is None else me["mean"]
    rows.append(row)
sing = pd.DataFrame(rows).sort_values(["model", "seed"])
display(sing.style.format({"lambda_min": "{:.1e}", "damping": "{:g}", "min |lambda + damping|": "{:.1e}",
                           "share of that direction": "{:.2f}", "LDS exact": "{:.2f}", "LDS Arnoldi": "{:.2f}",
                           "LDS LiSSA": "{:.2f}"}).hide(axis="index"))
worst = sing.loc[sing["LDS exact"].idxmin()] if sing["LDS exact"].notna().any() else None
if worst is not None and len(sing) > 2:
    rho = stats.spearmanr(sing["share of that direction"], sing["LDS exact"], nan_policy="omit")[0]
    display(Markdown(
        f"The lowest exact-influence LDS is on *{worst.model}*, seed {int(worst.seed)}: "
        f"{worst['LDS exact']:.2f}, where one eigendirection with $|\\lambda_k + \\lambda|$ = "
        f"{worst['min |lambda + damping|']:.1e} contributes {worst['share of that direction']:.2f} of the score "
        f"matrix's norm; Arnoldi reaches {worst['LDS Arnoldi']:.2f} and LiSSA {worst['LDS LiSSA']:.2f} on the same "
        f"model. Across all {len(sing)} models and seeds, the Spearman correlation between that share and the "
        f"exact LDS is {rho:.2f}."))

# %% [markdown]
# ## Result 4: ranks right, scale wrong
#
# LDS is a rank correlation, so it cannot see whether the summed scores have the right *size*. The panels show
# the highest-loss test point of one seed per model: predicted against actual group effect across the subsets,
# for the exact scores and, where available, the LOO oracle. The table gives, per model and method, the ratio
# of the spread (standard deviation across subsets) of the predicted to that of the actual group effect,
# averaged over test points and seeds; 1 would be the right scale.

# %% tags=["hide-input"]
first = {}
for r in ok:
    first.setdefault(rec_label(r), r)
fig, axes = plt.subplots(1, len(models), figsize=(min(10, 4.2 * len(models)), 4), squeeze=False)
for ax, lab in zip(axes[0], models, strict=True):
    r = first[lab]
    e = next(x for x in r["lds"] if x["alpha"] == 0.5)
    act = np.array(e["example"]["actual"])
    for m, style in (("exact", "o"), ("loo_oracle", "^")):
        if m in e["example"]["predicted"]:
            pred = np.array(e["example"]["predicted"][m])
            rho = stats.spearmanr(pred, act)[0]
            ax.scatter(act, pred, s=14, marker=style, alpha=0.7, label=f"{LABELS[m]} (Spearman {rho:.2f})")
    lim = [min(act.min(), 0), max(act.max(), 0)]
    ax.plot(lim, lim, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="actual change of the test loss", ylabel="predicted (sum over removed points)",
           title=f"{lab}, seed {r['setting']['seed']}\nhighest-loss test point {e['example']['test_index']}")
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

scale = half.groupby(["model", "method"]).scale_ratio.mean().unstack("method")
scale = scale[[m for m in cols if m in scale.columns]].rename(columns=LABELS)
display(scale.style.format("{:.2f}", na_rep="n/a").set_caption("std(predicted) / std(actual) across subsets"))
ex_scale = half[half.method == "exact"].scale_ratio
if len(ex_scale.dropna()):
    display(Markdown(f"For the exact scores the predicted spread is {ex_scale.min():.2f} to {ex_scale.max():.2f} "
                     "times the actual one (over models and seeds)."))

# %% [markdown]
# ## Result 5: smaller groups ($\alpha = 0.9$)
#
# Removing a tenth of the data instead of half keeps the retrained models closer to $\theta^*$, where a
# first-order model should do better. Shown where the records have both fractions.

# %% tags=["hide-input"]
both = frame[frame.model.isin(frame[frame.alpha == 0.9].model.unique())]
if len(both) and both.alpha.nunique() > 1:
    agg_a = report.aggregate(both, ["model", "alpha", "method"], ["lds", "scale_ratio"])
    agg_a["LDS"] = [clip_ci(r, "lds") for _, r in agg_a.iterrows()]
    agg_a["method"] = agg_a.method.map(LABELS)
    piv = agg_a.pivot_table(index=["model", "method"], columns="alpha", values="LDS", aggfunc="first")
    piv.columns = [f"LDS, alpha = {a:g}" for a in piv.columns]
    sc = agg_a.pivot_table(index=["model", "method"], columns="alpha", values="scale_ratio_mean")
    sc.columns = [f"scale ratio, alpha = {a:g}" for a in sc.columns]
    display(piv.join(sc).style.format({c: "{:.2f}" for c in sc.columns}))
else:
    print("No records with alpha = 0.9 in this profile.")

# %% [markdown]
# ## What it means
#
# The summary below is generated from the records above.

# %% tags=["hide-input"]
summary = []
for lab in models:
    sub = agg.loc[lab] if lab in agg.index.get_level_values(0) else None
    if sub is None:
        continue
    good = [m for m in METHODS if m in sub.index and sub.loc[m, "lds_n"] == n_seeds[lab]]  # no failed seed
    partial = [LABELS[m] for m in METHODS if m in sub.index and 0 <= sub.loc[m, "lds_n"] < n_seeds[lab]]
    line = (f"* **{lab}**: LDS of the exact scores {clip_ci(sub.loc['exact'], 'lds')} against a LOO Spearman of "
            f"{clip_ci(sub.loc['exact'], 'loo_spearman')}.")
    if good:
        best = max(good, key=lambda m: sub.loc[m, "lds_mean"])
        worst_m = min(good, key=lambda m: sub.loc[m, "lds_mean"])
        line += (f" Among the methods that ran on every seed, the highest mean LDS is {LABELS[best]}'s "
                 f"({sub.loc[best, 'lds_mean']:.2f}), the lowest {LABELS[worst_m]}'s "
                 f"({sub.loc[worst_m, 'lds_mean']:.2f}).")
    if partial:
        line += f" Failed on some seeds (not ranked): {', '.join(partial)}."
    if "loo_oracle" in sub.index and np.isfinite(sub.loc["loo_oracle", "lds_mean"]):
        oracle = sub.loc["loo_oracle", "lds_mean"]
        line += f" The LOO oracle reaches {clip_ci(sub.loc['loo_oracle'], 'lds')}"
        line += (": even the true single-removal effects do not add up to the group effects exactly."
                 if oracle < 0.95 else ".")
        above = [LABELS[m] for m in good if sub.loc[m, "lds_mean"] > oracle]
        if above:
            line += f" Above the oracle on average: {', '.join(above)}."
    summary.append(line)
display(Markdown("\n".join(summary)))

# %% [markdown]
# How to read this against the paper:
#
# * The two metrics ask different questions of the same scores. LOO correlation asks whether the scores rank
#   the (often tiny, noisy) effects of single points; LDS asks whether their sums rank the much larger effects
#   of removing many points at once. The tables above show where the answers agree and where they part.
# * A low LOO correlation is not by itself evidence that influence scores are useless for group questions,
#   nor is a high LDS evidence that single-point effects are right: Result 4 shows the additive prediction
#   can order the subsets well while getting the size of the effect wrong, which a rank metric does not see.
# * The LOO oracle indicates how much of the distance to an LDS of 1 comes from the model rather than from the
#   estimator: where even the summed true single-removal effects rank the subsets imperfectly, the group
#   effects are not additive, and no attribution that assigns one number per training point and adds them up
#   can be perfect. A method scoring *above* the oracle is not more correct about single points; its scores
#   simply happen to add up better (the oracle's LOO effects include retraining noise).
# * The inverse-HVP method matters: a more exact inverse is not automatically a better attribution. Where the
#   damped Hessian is nearly singular (Result 3) the exact inverse can amplify one eigendirection, while
#   approximations that leave out small curvature (Arnoldi, truncated LiSSA) act as a further regulariser.
#   EK-FAC approximates the Gauss-Newton matrix, a different curvature, so its distance from the exact scores
#   (Result 2's relative errors) is not an estimator error in the same sense; its LDS measures what that choice
#   costs or gains.
# * Limits: small MLPs only (the exact Hessian and hundreds of retrainings per seed must fit the budget), a few
#   seeds, warm-start retraining rather than TRAK's from-scratch ensembles, the test loss rather than TRAK's
#   margin as the model output, and subsets drawn once per seed. The subset count, $\alpha$, the retraining
#   protocol and the models are all parameters.
