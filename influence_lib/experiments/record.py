"""The one record schema every runner writes, and the encoders that fill it.

A record is a JSON object; every runner returns one through :func:`finish_record`, which adds the parts all
records share:

    {
      "schema": 2,                       # 2: vectors stored losslessly (1, before: 8 significant digits)
      "kind": "influence" | "lds" | "noise",
      "setting": {...},                  # the canonical setting (its hash is the file name)
      "dataset": {"requested", "name", "source", "n_train", "n_test", "substitute"},
      "model": {"n_params", ...},
      "training": {"loss", "grad_norm", "train_accuracy", "test_accuracy", ...},
      "health": {"healthy", "reasons", "train_accuracy", "chance_accuracy", "constant_predictor",
                 "dead_unit_fraction", "grad_norm", ...},          # see stages.model_health
      "spectrum": {...} | null,          # curvature summary
      "timings": {"<stage>": seconds, ..., "total": seconds},
      "versions": {"influence_lib", "torch", "numpy", "scipy", "python", "machine", "threads"},
      ...                                # the kind's own results: vectors via :func:`vector`
    }

Vectors (predicted and actual loss changes, parameter-change norms) are stored with :func:`vector`: float64
values written as Python's shortest round-trip representation (up to 17 significant digits), so every metric can
be recomputed from the stored vectors exactly. Non-finite values are refused (:func:`vector`) or, where a missing
answer is legitimate (a diverged PBRF), stored as ``null`` (:func:`vector_or_none`); nothing non-finite is written
silently (:func:`json_finite` turns the legitimately unbounded diagnostics, such as the condition number of a
singular Hessian, into ``null``).
"""

from __future__ import annotations

import math
import platform
from typing import Any

import numpy as np
import torch

from ..metrics import pearson, spearman

SCHEMA = 2

#: |value| above this in a loss change or score means the computation blew up (a loss change of e^1000 nats is
#: not a measurement): refused like a non-finite value
ABSURD = 1e100


def versions() -> dict[str, str]:
    """Library and runtime versions, the machine and the thread count the record was computed with."""
    import scipy

    from .. import __version__

    return {"influence_lib": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": str(torch.get_num_threads())}


def _as_array(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64).ravel()


def vector(x: Any, what: str = "values") -> list[float]:
    """``x`` (tensor or array, any shape) as a flat list of float64 values, losslessly.

    Raises ``FloatingPointError`` for a non-finite or absurdly large (> :data:`ABSURD`) entry.
    """
    a = _as_array(x)
    if not np.isfinite(a).all():
        raise FloatingPointError(f"refusing to record non-finite {what}")
    if a.size and float(np.abs(a).max()) > ABSURD:
        raise FloatingPointError(f"refusing to record blown-up {what} (|value| up to {float(np.abs(a).max()):.3g})")
    return [float(v) for v in a]


def vector_or_none(x: Any) -> list[float | None]:
    """Like :func:`vector`, with ``None`` for each non-finite value (no answer, e.g. from a diverged PBRF)."""
    return [float(v) if np.isfinite(v) and abs(v) <= ABSURD else None for v in _as_array(x)]


def corr(pred: Any, actual: Any) -> dict[str, float | None]:
    """Pearson and Spearman of two vectors; None (never NaN) where undefined (constant input)."""
    out: dict[str, float | None] = {}
    for name, fn in (("pearson", pearson), ("spearman", spearman)):
        try:
            out[name] = fn(np.asarray(pred, dtype=np.float64), np.asarray(actual, dtype=np.float64))
        except ValueError:
            out[name] = None
    return out


def json_finite(obj: Any) -> Any:
    """A copy of ``obj`` with non-finite floats replaced by ``None`` (JSON has no ``inf``/``nan``).

    Used for diagnostics that are legitimately unbounded (the condition number of a singular Hessian); vectors
    that must be finite are checked where they are encoded (:func:`vector` refuses them).
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_finite(v) for v in obj]
    return obj


def dataset_block(data: Any) -> dict[str, Any]:
    """The record's ``dataset`` part: what was asked for, what was used (offline stand-ins are named)."""
    return {"requested": data.requested, "name": data.name, "source": data.source, "n_train": len(data.y_train),
            "n_test": len(data.y_test), "substitute": data.is_substitute}


def finish_record(kind: str, setting: dict[str, Any], body: dict[str, Any],
                  timings: dict[str, float]) -> dict[str, Any]:
    """The complete record of ``kind``: ``setting`` first, then ``body``, the timings, versions and schema."""
    return {"schema": SCHEMA, "kind": kind, "setting": setting, **body, "timings": timings, "versions": versions()}


def error_record(setting: dict[str, Any], error: BaseException, traceback_text: str,
                 fingerprint: str) -> dict[str, Any]:
    """The record of a failed setting: its error, where it came from, and the environment it failed in.

    ``fingerprint`` identifies the environment (versions and available data sets): a failure recorded under
    another fingerprint is computed again rather than shown (its cause may be gone).
    """
    return {"schema": SCHEMA, "setting": setting, "error": f"{type(error).__name__}: {error}",
            "traceback": traceback_text, "fingerprint": fingerprint, "versions": versions()}


def _rounded8(values: Any) -> np.ndarray:
    return np.array([np.nan if v is None else float(f"{v:.8g}") for v in values], dtype=float)


def rerun_difference(again: dict[str, Any], rec: dict[str, Any]) -> tuple[float, list[str], int]:
    """How a rerun ``again`` of a committed record's setting differs from the record ``rec``:
    ``(worst, mismatches, vectors)``.

    ``worst`` is the largest relative difference ``|a - b| / max(|b|, 1e-12)`` over the vectors both hold, the rerun
    rounded to 8 significant digits (what schema-1 records kept): each test point's predicted and actual loss changes
    at the removed points the two have in common, the actual loss changes of the noise runs, and the LDS means.
    ``mismatches`` names what cannot agree at all: another test point, or, for a pooled top-``k`` removal, another
    set of each test point's ``k`` largest ``|predicted|`` values (rtol 1e-6). Which of several training points with
    the *same* value enter the pool is decided by last-bit rounding (a partly dead model gives many exact ties), so
    the pool itself may differ by tied points; with ``remove="all"`` the removals must be identical."""
    mismatches: list[str] = []
    pairs: list[tuple[Any, Any]] = []
    if "test_points" in rec:
        top_k_pool = rec["setting"].get("remove", "all") != "all"
        if not top_k_pool and again.get("removed") != rec.get("removed"):
            mismatches.append("removals differ")
        ours = {i: pos for pos, i in enumerate(again.get("removed", []))}
        common = [(ours[i], pos) for pos, i in enumerate(rec.get("removed", [])) if i in ours]
        for a, b in zip(again["test_points"], rec["test_points"], strict=True):
            if a.get("index") != b.get("index") or a.get("role") != b.get("role"):
                mismatches.append(f"test point {b.get('role')} {b.get('index')} differs")
                continue
            if top_k_pool:
                k = min(rec["setting"]["k"], len(rec["removed"]))
                top = [sorted((abs(v) for v in x["predicted"]), reverse=True)[:k] for x in (a, b)]
                if not np.allclose(_rounded8(top[0]), top[1], rtol=1e-6, atol=1e-12):
                    mismatches.append(f"the top-{k} predicted values of test point {b.get('index')} differ")
            for field in ("predicted", "actual"):
                if field in b:
                    pairs.append(([a[field][i] for i, _ in common], [b[field][j] for _, j in common]))
        for ra, rb in zip(again.get("runs", []), rec.get("runs", []), strict=True):
            pairs.extend(zip(ra["actual"], rb["actual"], strict=True))
    for e_a, e_b in zip(again.get("lds", []), rec.get("lds", []), strict=True):
        pairs.append((e_a["actual_mean"], e_b["actual_mean"]))
        for m in e_b["methods"]:
            pairs.append((e_a["methods"][m]["predicted_mean"], e_b["methods"][m]["predicted_mean"]))
    worst = 0.0
    for a, b in pairs:
        a8, b8 = _rounded8(a), np.array([np.nan if v is None else v for v in b], dtype=float)
        if len(b8):
            worst = max(worst, float(np.nanmax(np.abs(a8 - b8) / np.maximum(np.abs(b8), 1e-12))))
    return worst, mismatches, len(pairs)
