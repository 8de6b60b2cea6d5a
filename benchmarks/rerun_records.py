"""Rerun the cheapest committed record of every sweep and compare it with the committed one.

    python benchmarks/rerun_records.py [NAME ...]        (default: every sweep; prints one line per sweep)

A record reproduces when its removals are identical and its predicted and actual vectors agree to rtol 1e-6 after
rounding to the committed precision (schema-1 records kept 8 significant digits). Writes nothing into results/.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from influence_lib import experiments as ex
from influence_lib.experiments import presets
from influence_lib.experiments.runners import run_any


def _round8(values):
    return np.array([np.nan if v is None else float(f"{v:.8g}") for v in values], dtype=float)


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
    worst = 0.0
    pairs = []
    if "test_points" in rec:
        if again.get("removed") != rec.get("removed"):
            return f"{name}: removals differ"
        for a, b in zip(again["test_points"], rec["test_points"], strict=True):
            for field in ("predicted", "actual"):
                if field in b:
                    pairs.append((a[field], b[field]))
        for ra, rb in zip(again.get("runs", []), rec.get("runs", []), strict=True):
            pairs.extend(zip(ra["actual"], rb["actual"], strict=True))
    for e_a, e_b in zip(again.get("lds", []), rec.get("lds", []), strict=True):
        pairs.append((e_a["actual_mean"], e_b["actual_mean"]))
        for m in e_b["methods"]:
            pairs.append((e_a["methods"][m]["predicted_mean"], e_b["methods"][m]["predicted_mean"]))
    for a, b in pairs:
        a8, b8 = _round8(a), np.array([np.nan if v is None else v for v in b], dtype=float)
        scale = np.maximum(np.abs(b8), 1e-12)
        worst = max(worst, float(np.nanmax(np.abs(a8 - b8) / scale)) if len(b8) else 0.0)
    status = "reproduces" if worst <= 1e-6 else "DIFFERS"
    return f"{name}: {status} (worst relative difference {worst:.2g}, {len(pairs)} vectors, rerun {secs:.0f} s)"


if __name__ == "__main__":
    torch.set_num_threads(1)
    names = sys.argv[1:] or [n for n in presets.GRIDS if n != "convex-mnist"]
    for n in names:
        print(compare(n), flush=True)
