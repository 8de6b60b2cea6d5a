# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # The Hessian spectrum
#
# **Question.** {cite}`basu2021` relate the loss of accuracy with depth to the curvature of the training
# objective: they report that the top eigenvalue of the Hessian grows with depth while the quality of the
# influence estimates falls. Here we measure the whole spectrum of the Hessian for every Iris model of
# [the Iris chapter](iris.py), and ask whether its extreme eigenvalues, its negative part and its condition
# number track the accuracy of the estimates.
#
# **Why curvature matters.** With the eigendecomposition $H = \sum_k \lambda_k u_k u_k^\top$ of the Hessian of the
# full training objective (weight decay included) at $\theta^*$, the influence score is
#
# $$
# \mathcal{I}(z_i, z) = \frac{1}{n}\, g_z^\top (H + \lambda I)^{-1} g_i
# = \frac{1}{n} \sum_k \frac{(u_k^\top g_z)\,(u_k^\top g_i)}{\lambda_k + \lambda},
# $$
#
# where $g_z, g_i$ are the gradients of the test and training losses and $\lambda$ is the damping. Two things can
# go wrong. (i) The expansion behind this formula is a second-order Taylor expansion of the objective around a
# *minimum*: removing $z_i$ moves the optimum by $-(H)^{-1}$ times the change of the gradient, which is the
# response of the model only if $H$ is positive definite, i.e. $\theta^*$ is a strict local minimum. A negative
# eigenvalue means $\theta^*$ is a saddle (or not converged) along $u_k$; the formula then predicts a response in
# the *wrong direction* along $u_k$, while the retrained model moves away downhill. (ii) Directions with small
# $|\lambda_k + \lambda|$ are amplified by $1/|\lambda_k + \lambda|$: flat or near-singular directions (dead ReLU
# units, redundant weights) dominate the score although retraining for a finite number of steps barely moves along
# them, and a $\lambda_k$ close to $-\lambda$ makes the damped inverse blow up. A large condition number
# $\max_k|\lambda_k| / \min_k|\lambda_k|$ signals both: a linear system that amplifies small errors, and a
# quadratic model that is accurate only in a tiny neighbourhood of $\theta^*$. A large top eigenvalue on its own
# says the loss surface is sharply curved, so the quadratic approximation is accurate over a smaller distance.

# %% tags=["parameters", "hide-input"]
profile = None  # None: IL_PROFILE env var (default|quick)
seeds = None  # None: the preset's seeds
overrides = {}  # any setting of influence_lib.experiments.settings.DEFAULTS, applied to every record
jobs = None  # worker processes for missing records (None: IL_JOBS or the number of CPU cores)
scheduler = None  # address of a dask.distributed scheduler for missing records (None: IL_SCHEDULER, else local processes)

# %% tags=["hide-input"]
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from matplotlib.ticker import NullFormatter
from myst_nb import glue
from scipy import stats

from influence_lib import experiments as ex
from influence_lib.experiments import report
from influence_lib.experiments import stats as verdict_stats
from influence_lib.experiments.report import fmt_ci, line_ci, slope_ci

ex.parameters(globals(), ['profile', 'seeds', 'overrides', 'jobs', 'scheduler'])  # refuses unknown parameters, parses what papermill passes as text

prof = profile or ex.profile()
sns.set_theme(style="whitegrid", context="notebook", palette="colorblind")
plt.rcParams.update({"figure.dpi": 100, "font.size": 11, "axes.titlesize": "medium"})
records = ex.chapter_records("iris", prof, overrides, seeds, jobs, scheduler=scheduler)[0]
ok, failed = ex.split_failed(records)
print(f"profile {prof!r}: {len(records)} records (the Iris chapter's), {len(ok)} succeeded, {len(failed)} failed")
if failed:
    display(pd.DataFrame([{**{k: r["setting"][k] for k in ("depth", "width", "weight_decay", "seed")},
                           "error": r["error"]} for r in failed]))
healthy, excluded = verdict_stats.split_healthy(ok)
display(Markdown(f"**Model health:** {verdict_stats.exclusion_summary(excluded, len(ok))}. Collapsed models (a constant "
                 "predictor: only the output biases alive) have a degenerate Hessian that says nothing about depth; "
                 "they are left out of everything below (the intro's claim table gives the all-models value as a "
                 "sensitivity row)."))
ok = healthy

# %% [markdown]
# ## Measurement
#
# For each model the record holds a summary of the eigenvalues of the exact Hessian of the full objective
# (mean cross-entropy plus $\tfrac{w}{2}\|\theta\|^2$) at $\theta^*$, **before damping**: the largest and smallest
# eigenvalue, the number of negative eigenvalues and their share of $\sum_k|\lambda_k|$ ("negative mass"), the
# trace and the condition number $\max|\lambda_k|/\min|\lambda_k|$. The accuracy of a model is the Spearman
# correlation between predicted and actual loss changes over all removed training points, for the highest-loss
# test point and averaged over all examined test points (as in the Iris chapter). Without weight decay many
# eigenvalues are zero up to round-off and incomplete convergence (flat directions of a ReLU network), so the
# *count* of negative eigenvalues includes tiny ones; the negative mass weights them by their size, and
# $\lambda_{\min}$ compared with $-\lambda$ tells whether the damping removes them.

# %% tags=["hide-input"]
KEYS = ["depth", "width", "weight_decay", "seed"]
frame = ex.to_frame(ok)
frame["spearman_all"] = pd.to_numeric(frame["spearman_all"], errors="coerce")
acc = frame.groupby(KEYS).spearman_all.mean().rename("spearman_mean_points")
acc_hi = frame[frame.role == "highest"].set_index(KEYS).spearman_all.rename("spearman_highest")
spec = pd.DataFrame([{**{c: r["setting"][c] for c in KEYS}, "params": r["model"]["n_params"],
                      "damping": r["setting"]["damping"], "grad_norm": r["training"]["grad_norm"],
                      **{k: v for k, v in r["spectrum"].items() if isinstance(v, (int, float))}} for r in ok])
spec = spec.join(acc, on=KEYS).join(acc_hi, on=KEYS)
spec["condition_abs"] = spec["condition_abs"].replace(np.inf, np.nan)
FLOOR = 1e-16  # log10 of a zero (no negative eigenvalue) is shown at this floor
spec["neg_fraction"] = spec.n_negative / spec.params
for c in ("lambda_max", "negative_mass", "condition_abs"):
    spec[f"log10_{c}"] = np.log10(spec[c].clip(lower=FLOOR))
# the condition number that matters for a solver: that of the damped H + lambda I, (lambda_max + lambda) /
# (lambda_min + lambda), defined where the damped matrix is positive definite (NaN, and left out, where it is not)
spec["damped_pd"] = spec.lambda_min + spec.damping > 0
spec["log10_condition_damped"] = np.where(spec.damped_pd, np.log10((spec.lambda_max + spec.damping)
                                                                   / (spec.lambda_min + spec.damping).clip(lower=1e-300)),
                                          np.nan)
D0, W0 = int(spec.depth.min()), int(spec.width.min())
WDS = sorted(spec.weight_decay.unique())
WD0, WD1 = WDS[0], WDS[-1]
damping = float(spec.damping.iloc[0])
n_seeds = spec.seed.nunique()
sweeps = {"depth": spec[spec.width == W0], "width": spec[spec.depth == D0]}
glue("hess_damping", float(damping), display=False)
glue("hess_n_records", int(len(spec)), display=False)
print(f"{len(spec)} models; depth sweep at width {W0}, width sweep at depth {D0}; {n_seeds} seed(s) per setting; "
      f"damping {damping:g}")


# %% [markdown]
# ## The spectrum versus depth and width
#
# Mean over seeds with a 95% interval over seeds (bars) (logarithms are averaged, i.e. geometric means; a zero is shown at
# $10^{-16}$). In the $\lambda_{\min}$ panels the dotted line is $-\lambda$ (minus the damping): below it the
# *damped* matrix $H + \lambda I$ is still indefinite. The last row is the condition number of the damped matrix,
# $(\lambda_{\max}+\lambda)/(\lambda_{\min}+\lambda)$, which governs iterative solvers; it is averaged over the
# models whose damped matrix is positive definite only (the undamped $\max|\lambda_k|/\min|\lambda_k|$ is
# dominated by eigenvalues that are zero up to round-off, and is in the table below).

# %% tags=["hide-input"]
PANELS = [("log10_lambda_max", "log10 λ_max"), ("lambda_min", "λ_min (symlog)"),
          ("neg_fraction", "negative eigenvalues / parameters"), ("log10_negative_mass", "log10 negative mass"),
          ("log10_condition_damped", "log10 cond(H + λI), if PD")]
# one row per diagnostic, the depth sweep left and the width sweep right (five panels side by side are illegible at
# page width); axes[sweep, diagnostic]
fig, axes_t = plt.subplots(len(PANELS), 2, figsize=(8, 2.6 * len(PANELS)))
axes = axes_t.T
for row, (x, part) in enumerate(sweeps.items()):
    agg = report.aggregate(part, ["weight_decay", x], [m for m, _ in PANELS])
    for col, (m, label) in enumerate(PANELS):
        ax = axes[row, col]
        line_ci(ax, agg, x, m)
        ax.set(xlabel=x if x == "depth" else f"width (depth {D0})", ylabel=label)
        ax.set_xticks(sorted(part[x].unique()))
        if m == "lambda_min":
            ax.set_yscale("symlog", linthresh=damping / 10)
            ax.axhline(-damping, color="k", ls=":", lw=1)
axes[0, 0].legend(fontsize="small")
fig.tight_layout()
plt.show()

# %% [markdown]
# The same numbers per setting (mean over seeds; $\lambda_{\min} + \lambda < 0$ counts the models whose damped
# Hessian is still indefinite):

# %% tags=["hide-input"]
spec["damped_indefinite"] = spec.lambda_min + spec.damping < 0
tab = spec.groupby(["depth", "width", "weight_decay"]).agg(
    seeds=("seed", "count"), params=("params", "first"), lambda_max=("lambda_max", "mean"),
    lambda_min=("lambda_min", "mean"), n_negative=("n_negative", "mean"), negative_mass=("negative_mass", "mean"),
    log10_condition=("log10_condition_abs", "mean"), damped_indefinite=("damped_indefinite", "sum")).reset_index()
tab["weight_decay"] = tab.weight_decay.map("{:g}".format)
names = {"weight_decay": "wd", "lambda_max": "λ_max", "lambda_min": "λ_min", "n_negative": "# negative",
         "negative_mass": "neg. mass", "log10_condition": "log10 cond (undamped)",
         "damped_indefinite": "damped indefinite"}
display(tab.rename(columns=names).style.format({"λ_max": "{:.3g}", "λ_min": "{:.2e}", "# negative": "{:.1f}",
                                                "neg. mass": "{:.1e}", "log10 cond (undamped)": "{:.1f}"})
        .hide(axis="index"))
n_ind = int(spec.damped_indefinite.sum())
glue("hess_n_indefinite", n_ind, display=False)
print(f"{n_ind} of {len(spec)} models have λ_min < −damping (damped Hessian indefinite); "
      f"{int((spec.n_negative > 0).sum())} have at least one negative eigenvalue")

# %% [markdown]
# ## The paper's claim beside our measurement
#
# The claim (from `book/reference_values.json`) is qualitative. We measure the least-squares slope of
# $\log_{10}\lambda_{\max}$ against depth (per layer) and width (per unit) over all models of each sweep, with a 95%
# interval, the ratio of the mean top eigenvalue of the largest to that of the smallest model, and beside it the
# slope of the accuracy (Spearman correlation, highest-loss test point) over the same models.

# %% tags=["hide-input"]
claim = report.reference_values()["hessian_top_eigenvalue"]
rows = []
for x, part in sweeps.items():
    for wd in WDS:
        p = part[np.isclose(part.weight_decay, wd)]
        est, lo, hi = slope_ci(p[x], p.log10_lambda_max)
        sp_est, sp_lo, sp_hi = slope_ci(p[x], p.spearman_highest)
        xmin, xmax = p[x].min(), p[x].max()
        ratio = p[p[x] == xmax].lambda_max.mean() / p[p[x] == xmin].lambda_max.mean()
        grows = ("yes" if lo > 0 else "no: decreases" if hi < 0 else "not resolved") if np.isfinite(lo) else "no interval"
        rows.append({"sweep": x, "weight decay": f"{wd:g}", "slope of log10 λ_max": fmt_ci(est, lo, hi, 3),
                     "λ_max ratio largest / smallest": f"{ratio:.2f} ({x} {xmax} / {xmin})",
                     "λ_max grows?": grows, "slope of Spearman (highest)": fmt_ci(sp_est, sp_lo, sp_hi, 3)})
display(pd.DataFrame(rows).style.hide(axis="index"))
print(f"claim ({claim['source']}): {claim['claim']}")

# %% tags=["hide-input"]
from influence_lib.experiments import claims  # noqa: E402

display(Markdown(claims.claim_box(
    claims.hessian_top_eigenvalue(records, claim["claim"]),
    paper_protocol="the Hessian's top eigenvalue on the Iris networks as depth and width grow, with and without "
                   "weight decay (qualitative: larger curvature in deeper and wider networks).",
    our_protocol="exact Hessians of every Iris model of the depth sweep (width 5) at the largest weight decay; "
                 "the slope of log10 lambda_max per layer over the healthy models (rule \"hessian\").",
    divergences="none in the model family; the paper gives no number, so the equivalence margin is ours (its "
                "rationale is stated in influence_lib/experiments/rules.py).")))

# %% [markdown]
# The top eigenvalue is also small for degenerate models: a network that memorises the training set (saturated
# softmax, training loss near zero) or collapses to a constant predictor has almost no curvature left, whatever
# its depth (see the training diagnostics of the Iris chapter). Such models flatten or reverse a fitted slope, which
# is why the collapsed ones are left out here (the saturated ones, legitimate optima, are kept).
#
# ## Does curvature predict the accuracy of the estimates?
#
# Across all healthy models (both sweeps, all seeds, with and without weight decay): the Spearman correlation of the
# highest-loss test point against the top eigenvalue, the negative mass and the final gradient norm. The rank
# correlation of each diagnostic with the accuracy is printed below the figure, over all models and within each
# weight-decay value (weight decay changes both the spectrum and the accuracy, so the pooled correlation can be
# driven by that alone).

# %% tags=["hide-input"]
DIAG = [("lambda_max", "top eigenvalue λ_max"), ("negative_mass", "negative mass"),
        ("grad_norm", "final gradient norm"), ("condition_damped", "condition number of H + λI")]
spec["condition_damped"] = 10.0 ** spec.log10_condition_damped  # NaN where H + λI is not positive definite
spec["sweep"] = np.where(spec.depth > D0, "depth sweep", np.where(spec.width > W0, "width sweep", "base model"))
fig, axes = plt.subplots(2, 2, figsize=(10, 7.6), sharey=True)
axes = axes.ravel()
for ax, (c, label) in zip(axes, DIAG, strict=True):
    # the damped condition number is undefined where H + λI is indefinite: such models are left out of that panel
    # (not plotted at an axis end), and the count is given in its title
    x = spec[c].replace([np.inf, -np.inf], np.nan).clip(lower=FLOOR)
    n_out = int(len(spec) - x.notna().sum())
    sns.scatterplot(data=spec.assign(x=x), x="x", y="spearman_highest", hue="weight_decay", style="sweep",
                    palette="colorblind", ax=ax, legend=ax is axes[0])
    ax.set(xscale="log", xlabel=label, ylabel="Spearman (highest-loss test point)",
           title=f"{label}" + (f" ({n_out} models without it left out)" if n_out else ""))
    ax.xaxis.set_minor_formatter(NullFormatter())
axes[0].legend(fontsize=9, loc="lower left", ncol=2)
fig.tight_layout()
plt.show()

rows = []
for c, label in DIAG:
    for name, sub in [("all models", spec)] + [(f"wd {wd:g}", spec[np.isclose(spec.weight_decay, wd)]) for wd in WDS]:
        for target in ("spearman_highest", "spearman_mean_points"):
            s = sub[[c, target]].dropna()
            r, pval = stats.spearmanr(s[c], s[target]) if len(s) > 2 and s[c].nunique() > 1 else (np.nan, np.nan)
            rows.append({"diagnostic": label, "models": name, "accuracy": target.replace("spearman_", ""),
                         "n": len(s), "rank corr.": r, "p": pval})
links = pd.DataFrame(rows).pivot_table(index=["diagnostic", "models"], columns="accuracy",
                                       values=["rank corr.", "p", "n"], sort=False)
display(links.style.format("{:.2f}", subset=["rank corr."]).format("{:.3f}", subset=["p"])
        .format("{:.0f}", subset=["n"]))

# %% tags=["hide-input"]
r_lmax = links.loc[("top eigenvalue λ_max", "all models"), ("rank corr.", "highest")]
r_neg = links.loc[("negative mass", "all models"), ("rank corr.", "highest")]
r_grad = links.loc[("final gradient norm", "all models"), ("rank corr.", "highest")]
glue("hess_r_lmax", float(r_lmax), display=False)
glue("hess_r_neg", float(r_neg), display=False)
glue("hess_r_grad", float(r_grad), display=False)
print(f"rank correlation with the accuracy of the highest-loss point, over all models: λ_max {r_lmax:.2f}, "
      f"negative mass {r_neg:.2f}, gradient norm {r_grad:.2f}")

# %% [markdown]
# ## What it means
#
# Over all models, the rank correlation between accuracy and the top eigenvalue is {glue:text}`hess_r_lmax:.2f`,
# with the negative mass {glue:text}`hess_r_neg:.2f` and with the final gradient norm {glue:text}`hess_r_grad:.2f`
# (negative: more of the diagnostic goes with worse estimates). The table above splits these by weight decay:
# weight decay adds $w$ to every eigenvalue, which removes small negative eigenvalues and bounds the condition
# number, so part of any pooled correlation is the weight-decay effect itself. Of the
# {glue:text}`hess_n_records` models, {glue:text}`hess_n_indefinite` have a smallest eigenvalue below
# $-\lambda$ = −{glue:text}`hess_damping`, i.e. a damped Hessian that is still indefinite. These are correlations
# across a small set of architectures, not causes: depth changes the spectrum, the parameter count and the
# optimisation at once. Two measurement caveats: the ReLU networks have exactly flat directions (dead units), which
# make the undamped condition number essentially infinite, so its scale says more about dead units than about
# sharpness; and the spectrum is that of the exact Hessian at the end of training, whereas LOO retraining
# explores a finite neighbourhood of $\theta^*$ where the curvature can differ.
#
# ## Provenance and compute

# %% tags=["hide-input"]
print(report.runtime_summary(ok))
display(Markdown(report.provenance(records)))
