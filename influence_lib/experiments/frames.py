"""Records as tables (pandas data frames) for the book's pages and the command line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .run_lds import to_frame as lds_frame  # noqa: F401  (the LDS runner's own table)


def to_frame(records: Sequence[dict[str, Any]], keys: Sequence[str] | None = None):
    """One row per (record, examined test point): setting columns plus correlations and diagnostics."""
    import pandas as pd

    rows = []
    for r in records:
        if "error" in r:
            continue
        s = r["setting"]
        base = {k: s[k] for k in (keys or s) if not isinstance(s[k], (dict, list))}
        base.update({"n_params": r["model"]["n_params"], "train_loss": r["training"]["loss"],
                     "grad_norm": r["training"]["grad_norm"], "test_accuracy": r["training"]["test_accuracy"],
                     "dataset_used": r["dataset"]["name"]})
        base.update({f"spec_{k}": v for k, v in (r.get("spectrum") or {}).items() if isinstance(v, (int, float))})
        for j, tp in enumerate(r["test_points"]):
            row = {**base, "role": tp["role"], "test_index": tp["index"], "point": j, "test_loss": tp["test_loss"]}
            for subset, val in tp.items():
                if isinstance(val, dict) and {"pearson", "spearman"} <= set(val):
                    row[f"pearson_{subset}"] = val["pearson"]
                    row[f"spearman_{subset}"] = val["spearman"]
            for m, e in tp.get("estimators", {}).items():
                row[f"relerr_{m}"] = e["relative_error"]
                row[f"spearman_{m}_vs_loo"] = e["vs_loo"]["spearman"]
                row[f"pearson_{m}_vs_loo"] = e["vs_loo"]["pearson"]
            rows.append(row)
    return pd.DataFrame(rows)
