"""The book's apparatus: how the chapters run experiments on top of the library (``influence_lib``).

Layers (imports point down only)::

    book/*.py                      the chapters: prose, thin cells that load records and call report helpers
        |
    influence_lib.experiments      this package: settings, presets, runners, stages, records, store, executor,
        |                          sweep command line, statistics for verdicts, claims, report helpers
    influence_lib                  the library: objective, curvature, solvers, ekfac, influence, retrain, stacked,
                                   newton, pbrf, lds (metric and subset retraining), metrics, validation, models,
                                   data

One file per concern:

    settings.py     defaults, validation and canonical form of an influence setting
    presets.py      the book's named sweeps and their grids per profile (default / quick)
    runners.py      the Runner protocol, the registry of kinds, setting keys, grid expansion
    stages.py       the shared stages: data -> model -> theta* -> health -> scores -> ground truth
    run_influence.py, run_lds.py, noise.py     the three runners, composed from the stages
    record.py       the one record schema and its lossless encoders
    store.py        where records live, atomic writes, corrupt files, claims
    executor.py     computing the missing records of a grid (local processes or a Dask cluster)
    dask_executor.py the Dask distributed back end of the executor
    sweep.py        the command line (python -m influence_lib.experiments.sweep)
    notebook.py     chapter parameters, chapter records, papermill
    stats.py, rules.py   the statistics behind verdicts; the decision rules, fixed before the records
    frames.py, report.py, claims.py, procedures.py   tables, page helpers, the intro's claims

Nothing in the library imports this package; nothing here imports the book.
"""

from .executor import record_path, run_grid
from .frames import to_frame
from .notebook import chapter_records, parameters
from .record import json_finite
from .runners import expand, normalize_any, setting_key
from .store import book_root, load_records, profile, results_dir, runs_dir, split_failed, write_atomic

__all__ = ["book_root", "chapter_records", "expand", "json_finite", "load_records", "normalize_any", "parameters",
           "profile", "record_path", "results_dir", "run_grid", "runs_dir", "setting_key", "split_failed", "to_frame",
           "write_atomic"]
