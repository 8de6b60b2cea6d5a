"""Resumable sweeps: run settings over a grid, one JSON record per setting, in parallel, atomically.

    python -m influence_lib.sweep iris --grid depth=1,2,4 weight_decay=0,0.005 --seeds 0,1,2 --jobs 2
    python -m influence_lib.sweep iris --set loo_steps=500 --grid depth=1,8      # any setting can be changed
    python -m influence_lib.sweep iris --profile default      # exactly the records the book's chapter reads
    python -m influence_lib.sweep --notebook book/iris.py -p seeds 3              # a whole chapter via papermill

Records live in ``<results>/<name>/<key>.json`` where ``key`` is a hash of the complete setting (defaults
filled in), so a rerun finds what is already computed and runs only what is missing; a setting that failed
is recorded with its error (and retried with ``--retry-failed``). Each record is written to a temporary
file and renamed into place: an interrupted sweep never leaves a half-written record.

A setting with a ``"runner"`` key is run by that runner instead of :func:`influence_lib.experiment.run_setting`
(see :data:`RUNNERS`; e.g. ``"lds"``: :func:`influence_lib.lds.run_lds_setting`); its key and checks come from the
runner's own normaliser. Settings without the key are unchanged (same keys, same records).

Environment: ``IL_PROFILE`` (``default`` or ``quick``) selects ``results/`` or ``results/quick/`` for the
book's chapters; ``IL_RECOMPUTE=1`` makes the chapters recompute their records; ``IL_JOBS`` the number of
worker processes (default: the number of CPU cores).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import itertools
import json
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .experiment import normalize_setting, run_setting

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Other kinds of records: ``setting["runner"]`` -> (module, normaliser, runner). The normaliser fills defaults and
#: validates (it must keep the ``"runner"`` key); the runner returns a record.
RUNNERS: dict[str, tuple[str, str, str]] = {
    "lds": ("influence_lib.lds", "normalize_lds_setting", "run_lds_setting"),
}


def _runner(setting: dict[str, Any]) -> tuple[Callable[[dict[str, Any]], dict[str, Any]],
                                              Callable[[dict[str, Any]], dict[str, Any]]]:
    """``(normalise, run)`` for ``setting``: experiment's unless the setting names another runner."""
    kind = setting.get("runner")
    if kind is None:
        return normalize_setting, run_setting  # looked up at call time (tests patch sweep.run_setting)
    if kind not in RUNNERS:
        raise ValueError(f"runner must be one of {sorted(RUNNERS)} (or absent), got {kind!r}")
    module, norm, run = RUNNERS[kind]
    mod = importlib.import_module(module)
    return getattr(mod, norm), getattr(mod, run)


def normalize_any(setting: dict[str, Any]) -> dict[str, Any]:
    """The normalised ``setting`` (defaults filled, values checked) for whichever runner it belongs to."""
    return _runner(setting)[0](setting)


def profile() -> str:
    """The book profile from ``IL_PROFILE``: ``"default"`` or ``"quick"``."""
    p = os.environ.get("IL_PROFILE", "default") or "default"
    if p not in ("default", "quick"):
        raise ValueError(f"IL_PROFILE must be 'default' or 'quick', got {p!r}")
    return p


def results_dir(prof: str | None = None) -> Path:
    """``results/`` for the default profile, ``results/quick/`` for the quick one (not committed)."""
    prof = profile() if prof is None else prof
    base = Path(os.environ.get("IL_RESULTS", REPO_ROOT / "results"))
    return base / "quick" if prof == "quick" else base


def setting_key(setting: dict[str, Any]) -> str:
    """Stable 16-hex-digit hash of the complete (normalised) setting."""
    blob = json.dumps(normalize_any(setting), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def record_path(name: str, setting: dict[str, Any], root: Path | str | None = None) -> Path:
    return Path(root or results_dir()) / name / f"{setting_key(setting)}.json"


def write_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, separators=(",", ":"), allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_finite(obj: Any) -> Any:
    """A copy of ``obj`` with non-finite floats replaced by ``None`` (JSON has no ``inf``/``nan``).

    Used for diagnostics that are legitimately unbounded (the condition number of a singular Hessian); metrics
    that must be finite are checked where they are computed (:func:`influence_lib.experiment._round` refuses them).
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_finite(v) for v in obj]
    return obj


def expand(base: dict[str, Any], grid: dict[str, Sequence[Any]] | None = None,
           seeds: Iterable[int] = (0,)) -> list[dict[str, Any]]:
    """All settings of the grid (cartesian product) for every seed, ``base`` filling the rest."""
    grid = grid or {}
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        for seed in seeds:
            s = {**base, **dict(zip(keys, values, strict=True)), "seed": seed}
            normalize_any(s)  # fail early on a bad key or value
            out.append(s)
    return out


def _work(name: str, setting: dict[str, Any], root: str, threads: int, recompute: bool = False,
          retry_failed: bool = False) -> tuple[str, bool]:
    import torch

    torch.set_num_threads(threads)
    path = record_path(name, setting, root)
    if not recompute and path.exists():  # another sweep over the same folder may have computed it meanwhile
        ok = "error" not in json.loads(path.read_text())
        if ok or not retry_failed:
            return str(path), ok
    try:
        record = json_finite(_runner(setting)[1](setting))
    except Exception as e:  # recorded so that the chapter can show it; retried with retry_failed
        record = {"setting": normalize_any(setting), "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(limit=5)}
    write_atomic(path, record)
    return str(path), "error" not in record


def run_grid(
    name: str,
    settings: Sequence[dict[str, Any]],
    *,
    root: Path | str | None = None,
    jobs: int | None = None,
    recompute: bool | None = None,
    retry_failed: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Compute the missing records of ``settings`` (in ``jobs`` processes) and return all of them, in order.

    ``recompute`` (default: ``IL_RECOMPUTE``) recomputes every setting even if its record exists.
    """
    root = Path(root or results_dir())
    recompute = os.environ.get("IL_RECOMPUTE", "") not in ("", "0") if recompute is None else recompute
    jobs = int(os.environ.get("IL_JOBS", os.cpu_count() or 1)) if jobs is None else jobs
    paths = [record_path(name, s, root) for s in settings]
    todo = []
    for s, p in zip(settings, paths, strict=True):
        if recompute or not p.exists():
            todo.append(s)
        elif retry_failed and "error" in json.loads(p.read_text()):
            todo.append(s)
    if todo:
        bar = tqdm(total=len(todo), desc=f"{name}: computing {len(todo)} of {len(settings)} settings",
                   disable=not progress)
        if jobs <= 1 or len(todo) == 1:
            for s in todo:
                _work(name, s, str(root), max(1, os.cpu_count() or 1) if jobs <= 1 else 1, recompute, retry_failed)
                bar.update(1)
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn")) as ex:
                futures = [ex.submit(_work, name, s, str(root), 1, recompute, retry_failed)
                           for s in todo]
                for f in as_completed(futures):
                    f.result()
                    bar.update(1)
        bar.close()
    return [json.loads(p.read_text()) for p in paths]


def load_records(name: str, root: Path | str | None = None) -> list[dict[str, Any]]:
    """Every record of sweep ``name`` (in file-name order)."""
    folder = Path(root or results_dir()) / name
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def split_failed(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ok = [r for r in records if "error" not in r]
    return ok, [r for r in records if "error" in r]


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


# --- notebooks -------------------------------------------------------------------------------------------
def run_notebook(path: str | Path, parameters: dict[str, Any], output: str | Path | None = None,
                 env: dict[str, str] | None = None) -> Path:
    """Execute a percent-format chapter with papermill (converted with jupytext), injecting ``parameters``."""
    import jupytext
    import papermill as pm

    path = Path(path)
    nb = jupytext.read(path)
    out = Path(output or path.with_suffix(".executed.ipynb"))
    src = out.with_suffix(".input.ipynb")
    jupytext.write(nb, src, fmt="ipynb")
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        pm.execute_notebook(str(src), str(out), parameters=parameters, cwd=str(path.parent), kernel_name="python3")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        src.unlink(missing_ok=True)
    return out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None if text in ("None", "none", "null") else text


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m influence_lib.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", help="sweep name (records go to <results>/<name>/); presets: "
                                            "see influence_lib.presets")
    ap.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2", help="values to sweep over")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="fixed settings")
    ap.add_argument("--seeds", dest="seeds_given", default=None,
                    help="a count N (seeds 0..N-1) or a comma-separated list (default 1)")
    ap.add_argument("--profile", choices=("default", "quick"), default=None,
                    help="without --grid/--set/--seeds: run the book's grid of this profile")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU cores)")
    ap.add_argument("--results", default=None, help="results folder (default: results/ or results/quick/)")
    ap.add_argument("--recompute", action="store_true", help="recompute settings that already have records")
    ap.add_argument("--retry-failed", action="store_true", help="recompute settings recorded as failed")
    ap.add_argument("--notebook", help="run this chapter (.py percent notebook) with papermill instead")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="papermill parameter for --notebook")
    ap.add_argument("-o", "--output", help="executed notebook path for --notebook")
    a = ap.parse_args(argv)
    if a.notebook:
        out = run_notebook(a.notebook, {k: _parse_value(v) for k, v in a.p}, a.output)
        print(f"executed {a.notebook} -> {out}")
        return 0
    if not a.name:
        ap.error("a sweep name is required (or --notebook)")
    from .presets import PRESETS

    base = dict(PRESETS.get(a.name, {}))
    for item in a.set:
        k, _, v = item.partition("=")
        base[k] = _parse_value(v)
    grid = {}
    for item in a.grid:
        k, _, v = item.partition("=")
        if not v:
            ap.error(f"--grid {item!r}: expected KEY=V1,V2")
        grid[k] = [_parse_value(x) for x in v.split(",")]
    seeds_text = a.seeds_given or "1"
    seeds = [int(x) for x in seeds_text.split(",")] if "," in seeds_text else list(range(int(seeds_text)))
    from .presets import GRIDS
    from .presets import settings as preset_settings

    if not grid and not a.set and a.name in GRIDS and a.seeds_given is None:
        settings = preset_settings(a.name, a.profile or profile())  # the chapter's own grid
    else:
        settings = expand(base, grid, seeds)
    records = run_grid(a.name, settings, root=a.results, jobs=a.jobs, recompute=a.recompute,
                       retry_failed=a.retry_failed)
    ok, failed = split_failed(records)
    if ok and ok[0]["setting"].get("runner") == "lds":
        from .lds import to_frame as lds_frame

        frame = lds_frame(ok)
        cols = ["dataset", "depth", "width", "seed", "alpha", "method", "lds", "loo_spearman"]
    else:
        frame = to_frame(ok)
        cols = ["depth", "width", "weight_decay", "seed", "role", "pearson_all", "spearman_all"]
    if len(frame):
        cols = [c for c in cols if c in frame]
        print(frame[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    for r in failed:
        print(f"FAILED {setting_key(r['setting'])}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
