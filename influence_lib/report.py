"""Helpers for the book's pages: reference values, seed-aggregated tables, provenance sentences."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import mean_ci

REFERENCE_FILE = Path(__file__).resolve().parent.parent / "book" / "reference_values.json"


def reference_values() -> dict[str, Any]:
    """The paper's (and its replication's) reference numbers: ``book/reference_values.json``."""
    return json.loads(REFERENCE_FILE.read_text())


def aggregate(frame, by: Sequence[str], metrics: Sequence[str], level: float = 0.95):
    """Mean, Student-t interval and count over the rows of each group (e.g. over seeds).

    Returns a frame with columns ``by + [f"{m}_mean", f"{m}_lo", f"{m}_hi", f"{m}_n"]``; rows whose metric
    is missing (undefined correlation) are left out of that metric's count, never silently averaged.
    """
    import pandas as pd

    rows = []
    for key, g in frame.groupby(list(by), sort=True, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        for m in metrics:
            v = g[m].dropna().to_numpy(dtype=float)
            if v.size == 0:
                row.update({f"{m}_mean": np.nan, f"{m}_lo": np.nan, f"{m}_hi": np.nan, f"{m}_n": 0})
                continue
            mean, lo, hi = mean_ci(v, level)
            row.update({f"{m}_mean": mean, f"{m}_lo": lo, f"{m}_hi": hi, f"{m}_n": int(v.size)})
        rows.append(row)
    return pd.DataFrame(rows)


def provenance(records: Sequence[dict[str, Any]]) -> str:
    """One sentence naming the data that produced the records (and any substitution)."""
    ok = [r for r in records if "error" not in r]
    if not ok:
        return "No successful records."
    names = sorted({(r["dataset"]["requested"], r["dataset"]["name"], r["dataset"]["source"]) for r in ok})
    parts = []
    for requested, used, source in names:
        if requested != used:
            parts.append(f"**{requested} was not available: these numbers come from {used}** ({source})")
        else:
            parts.append(f"{used}: {source}")
    versions = ok[0]["versions"]
    return ("Data: " + "; ".join(parts) + f". Computed with influence_lib {versions['influence_lib']}, "
            f"torch {versions['torch']}, on {versions['machine']}.")


def runtime_summary(records: Sequence[dict[str, Any]]) -> str:
    """Total and per-record compute time of the records, as a sentence."""
    ok = [r for r in records if "error" not in r]
    if not ok:
        return ""
    t = np.array([r["timings"]["total"] for r in ok])
    return (f"{len(ok)} records, {t.sum() / 60:.1f} CPU-minutes in total "
            f"(median {np.median(t):.1f} s per record, single-threaded).")
