# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # The convex baseline: where the theory holds
#
# Before asking where influence functions break, we check the case in which they should not: an
# L2-regularised multinomial logistic regression. Its training objective
#
# $$J(\theta) = \frac{1}{n}\sum_{i=1}^{n} L(z_i, \theta) + \frac{\text{wd}}{2}\lVert\theta\rVert^2$$
#
# is strictly convex, so $\theta^*$ is unique, the Hessian $H$ is positive definite, and the first-order
# influence score
#
# $$\mathcal{I}(z_i, z_t) = \frac{1}{n}\, \nabla_\theta L(z_t, \theta^*)^\top (H + \lambda I)^{-1} \nabla_\theta L(z_i, \theta^*)$$
#
# predicts the change of the test loss $L(z_t, \theta^*_{-i}) - L(z_t, \theta^*)$ when $z_i$ is removed
# (positive: the point helped the test prediction) {cite}`koh2017`. Here $\lambda = 0$: no damping is needed.
# The ground truth is leave-one-out retraining, warm-started at $\theta^*$ and run to convergence: with
# full-batch gradient descent on Iris (every training point), and with damped Newton to a relative gradient norm
# of $10^{-10}$ on MNIST (the removed points with the largest predicted influence), where $\theta^*$ itself is
# found by damped Newton, so that both ends of the comparison are stationary points (the settings table gives the
# final gradient norms).
#
# **A subtlety worth stating.** With weight decay, "retraining without $z_i$" can mean two objectives.
# Ordinary retraining minimises the *mean* over the $n-1$ remaining points plus the penalty, which
# strengthens the data term relative to the penalty by $n/(n-1)$. Influence functions linearise a
# different perturbation: the weight of $z_i$ in $J$ goes from $1/n$ to $0$ and nothing else changes
# (`loo_normalization="full"` in `influence_lib`). To first order the two differ by
# $-\frac{1}{n-1}\sum_{j\neq i}\mathcal{I}(z_j, z_t)$, a shift of the same size as the scores themselves.
# It hardly changes a correlation, but it changes signs, so we show both.

# %% tags=["parameters", "hide-input"]
profile = None  # None: the IL_PROFILE environment variable ("default" or "quick")
seeds = None  # None: the preset's seeds
overrides = {}  # any key of influence_lib.experiments.settings.DEFAULTS, applied to every setting
jobs = None  # worker processes for missing records (None: IL_JOBS or all cores)
scheduler = None  # address of a dask.distributed scheduler for missing records (None: IL_SCHEDULER, else local processes)

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display

from influence_lib import experiments as ex
from influence_lib.experiments import report

ex.parameters(globals(), ['profile', 'seeds', 'overrides', 'jobs', 'scheduler'])  # refuses unknown parameters, parses what papermill passes as text

sns.set_theme(style="whitegrid", context="notebook")
prof = profile or ex.profile()
root = ex.results_dir(prof)
iris = ex.chapter_records("convex-iris", prof, overrides, seeds, jobs, scheduler=scheduler)[0]
mnist = ex.chapter_records("convex-mnist", prof, overrides, seeds, jobs, scheduler=scheduler)[0]
records = iris + mnist
ok, failed = ex.split_failed(records)
display(Markdown(report.provenance(ok)))
if failed:
    display(Markdown("**Failed settings:** " + "; ".join(f"`{r['error']}`" for r in failed)))

# %% [markdown]
# ## Settings
# The settings below are read from the records (profile shown in the first column).

# %% tags=["hide-input"]
cols = ["dataset", "model", "weight_decay", "damping", "optimizer", "lr", "steps", "loo_optimizer", "loo_lr",
        "loo_steps", "loo_normalization", "remove", "k", "seed"]
settings = pd.DataFrame([{"profile": prof, **{c: r["setting"][c] for c in cols},
                          "lr": "–" if r["setting"]["optimizer"] == "newton" else r["setting"]["lr"],
                          "steps": "–" if r["setting"]["optimizer"] == "newton" else r["setting"]["steps"],
                          "loo_steps": "–" if r["setting"]["loo_optimizer"] == "newton" else r["setting"]["loo_steps"],
                          "loo_lr": "–" if r["setting"]["loo_optimizer"] == "newton" else r["setting"]["loo_lr"],
                          "n_train": r["dataset"]["n_train"], "grad_norm": r["training"]["grad_norm"],
                          "LOO max grad norm": (r.get("loo") or {}).get("grad_norm_max", float("nan")),
                          "test_acc": r["training"]["test_accuracy"]} for r in ok])
display(settings)

# %% [markdown]
# ## Predicted vs actual
# Each panel shows, for one examined test point, the influence score of every removed training point
# against the actual change of the test loss after retraining without it.

# %% tags=["hide-input"]
frame = ex.to_frame(ok)
frame["data"] = frame["dataset_used"] + " / " + frame["loo_normalization"]


def scatter_panel(ax, rec, j, title):
    tp = rec["test_points"][j]
    p, a = np.array(tp["predicted"]), np.array(tp["actual"])
    ax.scatter(a, p, s=12, alpha=0.7)
    lim = [min(a.min(), p.min()), max(a.max(), p.max())]
    ax.plot(lim, lim, color="grey", lw=1, ls="--")
    ax.set(xlabel="actual loss change (LOO)", ylabel="predicted (influence)",
           title=f"{title}\nPearson {tp['all']['pearson']:.3f}, Spearman {tp['all']['spearman']:.3f}")


shown = [r for r in ok if r["setting"]["seed"] == min(x["setting"]["seed"] for x in ok)]
fig, axes = plt.subplots(1, len(shown), figsize=(min(10, 4.2 * len(shown)), 4), squeeze=False)
for ax, rec in zip(axes[0], shown, strict=True):
    scatter_panel(ax, rec, 0, f"{rec['dataset']['name']}, normalisation '{rec['setting']['loo_normalization']}'"
                              f"\n(highest-loss test point)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Correlation over all examined test points and seeds
# Mean and 95% interval (Student t over the examined test points and seeds) of the correlation between
# predicted and actual changes, over all removed points and over the top-$k$ by $|$influence$|$.

# %% tags=["hide-input"]
metrics = [c for c in frame.columns if c.startswith(("pearson_", "spearman_")) and "_vs_" not in c]
agg = report.aggregate(frame, ["data"], metrics)
table = agg[["data"] + [f"{m}_mean" for m in metrics]].rename(columns=lambda c: c.replace("_mean", ""))
table.style.format(precision=3, na_rep="n/a")

# %% tags=["hide-input"]
sign = []
for r in ok:
    for tp in r["test_points"]:
        p, a = np.array(tp["predicted"]), np.array(tp["actual"])
        big = np.abs(a) > 0.1 * np.abs(a).max()
        sign.append({"data": f"{r['dataset']['name']} / {r['setting']['loo_normalization']}",
                     "sign agreement (|actual| > 10% of max)": float((np.sign(p[big]) == np.sign(a[big])).mean())})
pd.DataFrame(sign).groupby("data").mean().style.format(precision=3)

# %% [markdown]
# ## Inverse-HVP solvers on a convex problem
# On the Iris records every solver was run on the same model; the table shows the relative error of
# its scores against the exact (float64 eigendecomposition) scores. For this positive definite Hessian CG and
# LiSSA should agree with the exact answer to solver tolerance. Arnoldi keeps only the top 10 eigenpairs of the
# 15-parameter model; the 5 it drops are the directions that move all three class scores together (the same vector
# added to every row of the weights, the same constant to every bias). No gradient of a softmax loss has a
# component there, and the Hessian's data term vanishes on them, so here a rank-10 inverse loses nothing.

# %% tags=["hide-input"]
est_cols = [c for c in frame.columns if c.startswith("relerr_")]
if est_cols:
    est = frame[frame["dataset_used"] == "iris"][est_cols].agg(["median", "max"]).T
    est.index = [c.removeprefix("relerr_") for c in est.index]
    display(est.style.format("{:.2e}"))

# %% [markdown]
# ## What it means
# On a strictly convex objective trained to a stationary point, the first-order influence score tracks
# exact leave-one-out retraining closely. The values above are what "accurate" looks like in this book: the
# chapters that follow ask how far deep networks fall from them. A correlation below this baseline in a
# later chapter is a property of the model, not of the code.

# %% tags=["hide-input"]
full = frame[frame["loo_normalization"] == "full"]
print(f"Convex baseline, exact-perturbation LOO: median Pearson {full['pearson_all'].median():.3f}, "
      f"median Spearman {full['spearman_all'].median():.3f} over {len(full)} (record, test point) pairs.")
print(report.runtime_summary(ok))
