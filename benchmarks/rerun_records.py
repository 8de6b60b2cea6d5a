"""Rerun the cheapest committed record of every sweep and compare it with the committed one.

    python benchmarks/rerun_records.py [NAME ...]        (default: every sweep; prints one line per sweep)

A record reproduces when its removals agree (a pooled top-k removal up to the choice among tied values) and its
predicted and actual vectors agree to rtol 1e-6 after rounding to the committed precision (schema-1 records kept 8
significant digits): ``influence_lib.experiments.record.rerun_difference``. Writes nothing into results/.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from influence_lib import experiments as ex
from influence_lib.experiments import presets
from influence_lib.experiments.record import rerun_difference
from influence_lib.experiments.runners import run_any


def compare(name: str) -> str:
    folder = ex.book_root() / "results" / name
    recs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    recs = [r for r in recs if "error" not in r]
    rec = min(recs, key=lambda r: r["timings"]["total"])
    t = time.perf_counter()
    try:
        again = run_any(rec["setting"], presets.KINDS.get(name))
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return f"{name}: FAILED to rerun ({type(e).__name__}: {str(e)[:120]})"
    secs = time.perf_counter() - t
    worst, mismatches, vectors = rerun_difference(again, rec)
    if mismatches:
        return f"{name}: DIFFERS ({'; '.join(mismatches)})"
    status = "reproduces" if worst <= 1e-6 else "DIFFERS"
    return f"{name}: {status} (worst relative difference {worst:.2g}, {vectors} vectors, rerun {secs:.0f} s)"


if __name__ == "__main__":
    torch.set_num_threads(1)
    names = sys.argv[1:] or [n for n in presets.GRIDS if n != "convex-mnist"]
    for n in names:
        print(compare(n), flush=True)
