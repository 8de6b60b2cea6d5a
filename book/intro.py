# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Influence functions in deep learning are fragile: a re-runnable reproduction
#
# Influence functions {cite}`koh2017` predict how the loss of a test prediction changes when one training
# point is removed, using only gradients and the inverse Hessian at the trained parameters $\theta^*$:
#
# $$
# L(z, \theta^*_{-i}) - L(z, \theta^*) \;\approx\; \frac{1}{n}\,\nabla_\theta L(z,\theta^*)^\top
# (H + \lambda I)^{-1} \nabla_\theta L(z_i, \theta^*),
# $$
#
# where $H$ is the Hessian of the full training objective (mean loss plus weight decay) and $\lambda$ a small
# damping. For convex models the approximation is accurate. {cite}`basu2021` asked how accurate it is for
# neural networks, and found that
#
# 1. estimates are fairly accurate for shallow networks and often wrong for deeper ones;
# 2. for some architectures and data sets, weight decay is needed for good estimates;
# 3. the accuracy varies strongly with the test point examined;
#
# and, further, that width matters, that stochastic inverse-Hessian estimation (LiSSA) adds error, and that at
# ImageNet scale the leave-one-out (LOO) ground truth itself becomes unreliable.
#
# This book repeats each experiment, chapter by chapter, on this machine, with several seeds and confidence
# intervals, using `influence_lib` (the small library in this repository). Every number and figure is computed by
# the chapter from recorded results; nothing is typed in by hand. The paper's own reference numbers (and those
# of a public replication {cite}`epifano2023`) live in one data file, `book/reference_values.json`, cited where
# they are used.
#
# **Conventions.** A score is the predicted change of the test loss when the training point is *removed*
# (positive: the point helped that prediction), with the $1/n$ of the mean loss. $H$ includes the weight decay,
# and the damping $\lambda$ is added to it. Accuracy is the Pearson or Spearman correlation between predicted
# and actual (LOO-retrained) loss changes over a set of removed training points, for one test point.

# %% tags=["parameters", "hide-input"]
profile = None  # None: the IL_PROFILE environment variable (default | quick)
jobs = None  # worker processes for records that are missing (None: IL_JOBS or the number of CPU cores)
scheduler = None  # address of a dask.distributed scheduler for missing records (None: IL_SCHEDULER, else local processes)

# %% tags=["hide-input"]
from IPython.display import Markdown, display

from influence_lib import experiments as ex
from influence_lib.experiments import claims, report, rules

ex.parameters(globals(), ['profile', 'jobs', 'scheduler'])  # refuses unknown parameters, parses what papermill passes as text

prof = profile or ex.profile()
root = ex.results_dir(prof)


def records(name):
    """The records of a chapter's default grid (computing any that are missing, like the chapter would)."""
    return ex.chapter_records(name, prof, jobs=jobs, scheduler=scheduler)[0]


ref = report.reference_values()
table = claims.claim_table(records("iris"), records("mnist"), records("cnn"), records("test-points"),
                           ex.chapter_records("ground-truth", prof, jobs=1, scheduler=scheduler)[0],
                           ref["findings"], ref["hessian_top_eigenvalue"]["claim"])

# %% [markdown]
# ## The claims at a glance
#
# Each claim's effect on the healthy models with its 95% interval, in units of the claim's equivalence margin (the
# shaded band is ±margin, so "absent" needs the whole bar inside it), coloured by the verdict; the right margin gives
# the paper's direction.

# %% tags=["hide-input"]
# %matplotlib inline
import matplotlib.pyplot as plt  # noqa: E402

claims.effect_figure(table)
plt.show()

# %% [markdown]
# ## The claims and what this book measures
#
# One row per claim of the paper. The middle column is computed from the records of the chapter it links to. The
# rules are fixed in `influence_lib/experiments/rules.py` (direction, statistic, equivalence margin, seeds) and the
# statistics in `influence_lib/experiments/stats.py`: the trained model is the unit (its test points summarised by a
# Fisher-z mean), verdicts use healthy models only (collapsed, constant or non-stationary models are excluded and
# counted; the same statistic on all models is shown beside), and the p-values of the whole table are
# Holm-corrected together. The verdict is "reproduced" when the effect is shown to differ from zero in the paper's
# direction, "opposite" when shown the other way, "absent" when its 95% interval lies inside the equivalence margin,
# and "not resolved" when our seeds show neither; "provisional" marks a sweep with fewer seeds than the rules
# require (see each chapter for the protocol and its caveats).

# %% tags=["hide-input"]
TITLES = {"iris": "Iris", "hessian": "Hessian spectrum", "mnist": "Small MNIST", "cnn": "Deeper CNNs",
          "test_points": "Test points", "ground_truth": "Ground truth at scale"}
# the LOO noise ceiling of each sweep whose claims are about agreement with LOO (claims.CEILING_OF), on the points
# the claim's own procedure validates on
CEILING_PROCEDURE = {"iris": rules.PAPER_IRIS, "mnist": rules.PAPER_TOPK, "cnn": rules.PAPER_TOPK,
                     "test_points": rules.PAPER_TOPK}
ceilings = {chapter: claims.noise_ceiling(records(sweep), CEILING_PROCEDURE[chapter])
            for chapter, sweep in claims.CEILING_OF.items()}
# claims whose statistic is not an agreement with LOO on the top-k points the ceiling sweeps retrain
NOT_A_CORRELATION = {"hessian", "scale", "iris depth (all points)"}


def ceiling_cell(c):
    cl = ceilings.get(c.chapter) if c.key not in NOT_A_CORRELATION else None
    if not cl:
        return "—"
    return " / ".join(f"{v:.2f}" for v in claims.ceiling_summary(cl).values())


lines = ["| finding | claim in the paper | healthy models | verdict | LOO vs LOO (warm ×2 / cold) | chapter |",
         "| --- | --- | --- | --- | --- | --- |"]
for c in table:
    note = f" ({c.note})" if c.note else ""
    lines.append(f"| {c.finding} | {c.paper} | {c.n_models} of {c.n_total} | **{c.verdict}**{note} "
                 f"| {ceiling_cell(c)} | {{doc}}`{TITLES[c.chapter]} <{c.chapter}>` |")
display(Markdown("\n".join(lines)))
details = [f"- **{c.finding}** ({TITLES[c.chapter]}): {c.measured}"
           + "".join(f"; {x}" for x in (c.excluded, c.sensitivity) if x) for c in table]
display(Markdown("```{dropdown} What each row measures, the excluded models and the all-models sensitivity\n"
                 + "\n".join(details) + "\n```"))
display(Markdown(f"Profile `{prof}`: records under `{root.relative_to(ex.book_root())}/`. "
                 + report.provenance(records("iris"))))

# %% [markdown]
# ## How high could the agreement be? The leave-one-out noise ceiling
#
# A correlation with leave-one-out retraining is only as meaningful as leave-one-out is reproducible. On models of
# the Iris, small-MNIST, CNN and test-point sweeps (the same settings, hence the same $\theta^*$ and the same influence scores),
# the removals the claims are validated on were retrained twice more: warm-started for twice as many steps (does the
# ground truth move when it trains longer?) and cold-started from another initialisation for the full training
# length (the leave-one-out under another seed). The table gives the Spearman correlation of the chapter's LOO with
# each replicate on the points of the claim's own procedure, next to that of the exact influence with the same LOO;
# the column "LOO vs LOO" in the table above gives the two ceilings (Fisher-z mean over the sweep's settings). Where
# the influence estimate agrees with the warm-start LOO better than a cold-started LOO does, what the verdicts measure
# is the response of the trained model near $\theta^*$ (the quantity influence functions linearise, see the PBRF
# chapter), not a property of retraining from scratch.

# %% tags=["hide-input"]
import pandas as pd  # noqa: E402

rows_c = []
for chapter, cl in ceilings.items():
    for x in cl:
        rows_c.append({"sweep": TITLES[chapter], "models of": claims.setting_label(x["setting"]),
                       "replicate": x["label"], "models": x["n"],
                       "LOO vs replicate LOO": report.fmt_ci(x["mean"], x["lo"], x["hi"], bounds=(-1.0, 1.0)),
                       "influence vs LOO (same points)": report.fmt_ci(x["influence"]["mean"], x["influence"]["lo"],
                                                                       x["influence"]["hi"], bounds=(-1.0, 1.0))})
if rows_c:
    display(pd.DataFrame(rows_c).style.hide(axis="index"))
missing = [TITLES[c] for c, cl in ceilings.items() if not cl]
if missing:
    display(Markdown(f"No ceiling records for: {', '.join(missing)}."))


# %% [markdown]
# ## Beyond the paper
#
# Three later papers changed what "accurate influence" means, and the last part of the book measures them on the
# same kind of models. {cite}`epifano2023` trace part of the reported fragility to how accuracy is validated;
# {cite}`bae2022` argue that influence functions in deep learning do not estimate
# leave-one-out retraining at all but a different, well-defined quantity, the proximal Bregman response function
# (PBRF); {cite}`park2023` judge attributions by how well their *sums* predict retraining on random subsets (the
# linear datamodeling score, LDS), not by single removals.

# %% tags=["hide-input"]
beyond = ref["beyond"]
rows = [claims.validation_procedure(records("iris"), beyond["validation"]),
        claims.pbrf_question(records("pbrf"), beyond["pbrf"]), claims.lds_summary(records("lds"), beyond["lds"])]
TITLES |= {"validation": "Validation procedure", "pbrf": "PBRF", "lds": "LDS"}
lines = ["| question | claim or definition | what this book measures | verdict | chapter |",
         "| --- | --- | --- | --- | --- |"]
lines += [f"| {c.finding} | {c.paper} | {c.measured}{f' ({c.excluded})' if c.excluded else ''} | **{c.verdict}**"
          f"{f' ({c.note})' if c.note else ''} | {{doc}}`{TITLES[c.chapter]} <{c.chapter}>` |" for c in rows]
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## Reading guide
#
# - {doc}`convex` is the control: L2-regularised logistic regression, where influence functions should match
#   LOO almost exactly. If they did not, nothing else here could be trusted.
# - {doc}`iris` carries findings 1 and 2 (depth, width, weight decay) with the exact Hessian and LOO for every
#   training point; {doc}`hessian` relates them to the curvature.
# - {doc}`mnist` separates the error of the inverse-Hessian estimator (CG, LiSSA, Arnoldi against the exact
#   solve) from the error of the influence function itself (exact solve against LOO).
# - {doc}`cnn` asks the depth question for convolutional networks, {doc}`test_points` the test-point question,
#   and {doc}`ground_truth` whether LOO is a usable ground truth as the data grow.
# - {doc}`validation`, {doc}`pbrf` and {doc}`lds` go beyond the paper: how much of the measured fragility depends on
#   the validation procedure {cite}`epifano2023`, which ground truth influence functions approximate, and how the
#   inverse-HVP methods fare when judged on groups of removed points.
# - The appendix compares `influence_lib` with other libraries ({doc}`benchmarks`) and says how to reproduce
#   every page ({doc}`reproduce`).
#
# ## Rerunning a chapter
#
# Each chapter is a Jupytext percent-format notebook in `book/` with a papermill `parameters` cell. To rerun one
# under other settings (records of new settings are computed and stored; existing ones are reused):
#
# ```
# .venv/bin/jupytext --to ipynb book/iris.py -o iris.ipynb
# .venv/bin/papermill iris.ipynb out.ipynb --log-output -p overrides '{"loo_steps": 500}' -p seeds '[0, 1, 2]'
# ```
#
# or compute a grid directly, resumably and in parallel:
#
# ```
# .venv/bin/python -m influence_lib.experiments.sweep iris --grid depth=1,2,4 weight_decay=0,0.005 --seeds 3
# ```
