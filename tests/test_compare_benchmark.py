"""The bookkeeping of ``benchmarks/compare.py``: the method names it measures and "faster at equal accuracy" on both
sides (our fastest call as accurate as an anchor's, and the anchors' fastest call at that accuracy). Pure functions
on records; nothing is timed here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
_spec = importlib.util.spec_from_file_location("compare_benchmark", _PATH)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def _r(lib: str, method: str, time_s: float, rel_error: float, status: str = "ok") -> dict:
    return {"lib": lib, "method": method, "time_s": time_s, "rel_error": rel_error, "status": status,
            "peak_delta_mb": 1.0}


def test_benchmark_method_names_map_to_library_methods():
    assert compare.base_method("cg-1e-3") == "cg"
    assert [compare.base_method(m) for m in compare.METHODS] == ["exact", "cg", "cg", "lissa", "arnoldi", "ekfac"]
    # settings of our EK-FAC and CG only
    assert {compare.base_method(m) for m in compare.OURS_ONLY} == {"ekfac", "cg"}
    assert compare.base_method("cg-1e-3-mixed") == "cg"


def test_fastest_as_accurate_on_both_sides_and_their_ratio():
    results = [_r("influence_lib", "lissa", 3.0, 0.6), _r("influence_lib", "cg-1e-3", 0.5, 1e-3),
               _r("influence_lib", "arnoldi", 0.2, 0.7),  # faster but less accurate than the LiSSA anchor: left out
               _r("curvlinops", "lissa", 2.0, 0.6), _r("curvlinops", "cg-1e-3", 1.2, 1e-3),
               _r("dattri", "cg", 0.9, 2.0),  # a fast anchor call that is not as accurate: left out
               _r("dattri", "exact", 0.1, 0.0, status="error")]
    record = {"problems": [{"name": "p", "results": results}]}
    rows = {(r["method"], r["anchor"]): r for r in compare.ratios(record)}
    lissa = rows[("lissa", "curvlinops")]
    assert lissa["speedup_ours"] == 2.0 / 3.0
    assert lissa["fastest_as_accurate"]["method"] == "cg-1e-3" and lissa["fastest_as_accurate"]["speedup"] == 4.0
    best = lissa["fastest_anchor_as_accurate"]
    assert (best["lib"], best["method"], best["time_s"]) == ("curvlinops", "cg-1e-3", 1.2)
    assert best["speedup_best_vs_best"] == 1.2 / 0.5
    # nothing of ours is within 1.1x of an error of 1e-4: no "as accurate" on either side's ratio
    assert compare.fastest_as_accurate(results, 1e-4, 1.0) is None
    assert compare.fastest_as_accurate(results, 1e-4, 1.0, anchors=True) is None
