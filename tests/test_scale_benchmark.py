"""The bookkeeping of ``benchmarks/scale.py``: which measurements are set against each other, what counts as "as
accurate", and the kept float64 reference. Pure functions on records; nothing is timed here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
_spec = importlib.util.spec_from_file_location("scale_benchmark", _PATH)
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)


def _m(time_s: float, pearson: float, n_test: int = 100, run: str | None = None) -> dict:
    m = {"status": "ok", "time_s": time_s, "cpu_s": time_s, "n_test": n_test, "accuracy": {"pearson": pearson}}
    if run is not None:
        m["run"] = run
    return m


def _entry(methods: dict, anchors: dict) -> dict:
    return {"machine": {"time_utc": "run-1"}, "methods": methods, "anchors": anchors}


def test_fastest_as_accurate_takes_the_fastest_within_the_factor_of_the_anchors_distance():
    anchor = _m(10.0, 0.60)  # distance 0.40: "as accurate" means a distance of at most 0.44
    entry = _entry({"ekfac": _m(4.0, 0.57),  # 0.43: as accurate
                    "ekfac-sampled": _m(2.0, 0.55),  # 0.45: not
                    "arnoldi": _m(30.0, 0.90),  # as accurate, slower
                    "cg": _m(1.0, 0.999, n_test=3)}, {})  # other test rows: never a candidate
    best = scale.fastest_as_accurate(entry, anchor, "accuracy")
    assert best["ours"] == "ekfac" and best["speedup"] == pytest.approx(2.5)
    assert scale.fastest_as_accurate(_entry({"ekfac-sampled": _m(2.0, 0.55)}, {}), anchor, "accuracy") is None


def test_measurements_of_different_runs_are_not_set_against_each_other():
    entry = _entry({"cg": _m(100.0, 0.999, n_test=3), "ekfac": _m(5.0, 0.5)},
                   {"curvlinops-cg": _m(300.0, 0.999, n_test=3, run="run-2")})
    (row,) = scale.comparisons(entry)
    assert row["status"].startswith("measured in different runs")
    entry["methods"]["cg"]["run"] = "run-2"  # both measured in the later run: compared, and only with each other
    (row,) = scale.comparisons(entry)
    assert row["status"] == "ok" and row["speedup"] == pytest.approx(3.0)
    assert row["fastest_as_accurate"]["ours"] == "cg"


def test_the_kept_reference_is_used_only_for_the_problem_it_was_solved_on(tmp_path):
    out = tmp_path / "scale.json"
    problem = {"params": 10, "n_train": 4, "test_accuracy": 0.5, "dataset": "d"}
    S = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    scale.save_reference(out, "lenet", S, problem)
    assert torch.equal(scale.load_reference(out, "lenet", problem), S)
    assert scale.load_reference(out, "lenet", problem | {"test_accuracy": 0.75}) is None
    assert scale.load_reference(out, "resnet", problem) is None
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temporary file left


def test_kept_scores_are_kept_per_measurement_and_problem(tmp_path):
    out = tmp_path / "scale.json"
    problem = {"params": 10, "n_train": 4, "test_accuracy": 0.5, "dataset": "d"}
    S = torch.arange(20, dtype=torch.float32).reshape(5, 4)
    scale.keep_scores(out, "resnet", problem, "cg", "run-1", S, rows=3)
    scale.keep_scores(out, "resnet", problem, "curvlinops-cg", "run-1", 2 * S, rows=3)
    scale.keep_scores(out, "resnet", problem, "cg", "run-2", -S, rows=3)  # a later run replaces the earlier one
    kept = scale.kept_scores(out, "resnet", problem)
    assert set(kept) == {"cg", "curvlinops-cg"} and kept["cg"]["run"] == "run-2"
    assert torch.equal(kept["cg"]["scores"], -S[:3]) and torch.equal(kept["curvlinops-cg"]["scores"], 2 * S[:3])
    assert scale.kept_scores(out, "resnet", problem | {"test_accuracy": 0.75}) == {}
    assert scale.kept_scores(out, "lenet", problem) == {}
    # another problem's scores under the same name start the file afresh
    scale.keep_scores(out, "resnet", problem | {"params": 11}, "cg", "run-3", S, rows=2)
    assert scale.kept_scores(out, "resnet", problem) == {}
    assert not list(tmp_path.glob("*.tmp"))


def test_the_kept_reference_keeps_its_record_entry(tmp_path):
    out = tmp_path / "scale.json"
    problem = {"params": 10, "n_train": 4, "test_accuracy": 0.5, "dataset": "d"}
    info = {"status": "ok", "time_s": 12.5, "info": {"iterations": [40, 41]}}
    scale.save_reference(out, "resnet", torch.zeros(2, 4), problem, info)
    assert scale.load_reference_entry(out, "resnet", problem)["info"] == info
    assert scale.load_reference_entry(out, "resnet", problem | {"dataset": "e"}) is None


def test_adding_to_a_record_refuses_a_different_problem():
    entry = {"problem": {"params": 10, "n_train": 4, "n_test": 2, "test_accuracy": 0.5, "dataset": "d"}}
    prob = {"info": dict(entry["problem"])}
    scale.same_problem("lenet", entry, prob, "--merge")  # the same: no error
    prob["info"]["test_accuracy"] = 0.75
    with pytest.raises(SystemExit, match="differs from the recorded one"):
        scale.same_problem("lenet", entry, prob, "--merge")


def test_a_later_merge_run_supersedes_what_it_measures_again():
    entry = {"runs": {"r1": {"time_utc": "r1", "measured": ["cg", "curvlinops-cg"]},
                      "r2": {"time_utc": "r2", "measured": ["arnoldi", "lissa"]}}}
    scale.start_run(entry, "r3", {"time_utc": "r3"}, ["cg", "curvlinops-cg", "arnoldi"])
    assert list(entry["runs"]) == ["r2", "r3"]  # r1 measured nothing that still stands
    assert entry["runs"]["r2"]["measured"] == ["lissa"]
    assert entry["runs"]["r3"] == {"time_utc": "r3", "measured": ["cg", "curvlinops-cg", "arnoldi"]}
    fresh: dict = {}
    scale.start_run(fresh, "r4", {"time_utc": "r4"}, ["cg"])
    assert fresh["runs"] == {"r4": {"time_utc": "r4", "measured": ["cg"]}}
