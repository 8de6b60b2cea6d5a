"""The sweep command line: run a grid of settings, one record per setting, resumably, in parallel.

    python -m influence_lib.experiments.sweep iris --grid depth=1,2,4 weight_decay=0,0.005 --seeds 3
    python -m influence_lib.experiments.sweep iris --set loo_steps=500 --grid depth=1,8   # any setting can change
    python -m influence_lib.experiments.sweep iris --book      # exactly the records the book's chapter reads
    python -m influence_lib.experiments.sweep --notebook book/iris.py -p seeds 3      # a whole chapter, papermill

``NAME`` is one of the book's sweeps (:data:`influence_lib.experiments.presets.PRESETS`); its preset fills every
setting not given (on the quick profile, with the sizes of the quick grid: fewer steps, smaller data). Records go
to ``<results>/<NAME>/<key>.json``: by default the user-run folder (``runs/`` of the checkout, ``IL_RUNS``), with
``--book`` the book's own records (``results/``, the preset's grid), or ``--results DIR``. Every setting of the
grid is checked before any work starts; a bad key or value is refused with a message naming it.
``--scheduler ADDRESS`` (or ``IL_SCHEDULER``) sends the settings to an existing ``dask.distributed`` cluster
instead of local processes.

Environment: ``IL_PROFILE`` (``default`` or ``quick``), ``IL_RECOMPUTE=1`` (recompute existing records), ``IL_JOBS``
(worker processes), ``IL_THREADS`` (threads per setting, default 1), ``IL_RESULTS`` / ``IL_RUNS`` (folders).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import store
from .executor import run_grid
from .frames import lds_frame, to_frame
from .notebook import parse_seeds, run_notebook
from .presets import GRIDS, KINDS, PRESETS, quick_base
from .presets import settings as preset_settings
from .runners import expand, setting_key


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None if text in ("None", "none", "null") else text


def build_settings(name: str, grid_items: Sequence[str], set_items: Sequence[str], seeds_text: str | None,
                   book: bool, profile: str) -> list[dict[str, Any]]:
    """The settings the command line asks for, every one validated (raises ``ValueError`` naming the problem)."""
    if name not in PRESETS:
        raise ValueError(f"sweep name must be one of {sorted(PRESETS)}, got {name!r}")
    if book:
        if grid_items or set_items or seeds_text is not None:
            raise ValueError("--book runs the book's own grid: it takes no --grid, --set or --seeds")
        return preset_settings(name, profile)
    base = {**PRESETS[name], **(quick_base(name) if profile == "quick" else {})}
    for item in set_items:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        base[k] = _parse_value(v)
    grid: dict[str, list[Any]] = {}
    for item in grid_items:
        k, eq, v = item.partition("=")
        if not eq or not k or not v:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2")
        grid[k] = [_parse_value(x) for x in v.split(",")]
    seeds = parse_seeds(seeds_text if seeds_text is not None else "1")
    return expand(base, grid, seeds, kind=KINDS.get(name))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m influence_lib.experiments.sweep",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", help=f"sweep name, one of {sorted(PRESETS)}")
    ap.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2", help="values to sweep over")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="fixed settings")
    ap.add_argument("--seeds", dest="seeds_given", default=None,
                    help="a count N (seeds 0..N-1) or a comma-separated list (default 1)")
    ap.add_argument("--book", action="store_true", help="the book's own grid of this sweep, into the book's records")
    ap.add_argument("--profile", choices=store.PROFILES, default=None, help="book profile (default: IL_PROFILE)")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU cores)")
    ap.add_argument("--results", default=None, help="records folder (default: runs/, or results/ with --book)")
    ap.add_argument("--recompute", action="store_true", help="recompute settings that already have records")
    ap.add_argument("--scheduler", default=None, help="address of a dask.distributed scheduler (IL_SCHEDULER)")
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
    if a.jobs is not None and a.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {a.jobs}")
    prof = a.profile or store.profile()
    try:
        settings = build_settings(a.name, a.grid, a.set, a.seeds_given, a.book, prof)
    except ValueError as e:
        ap.error(str(e))
    if a.name in GRIDS and a.book:
        root = a.results or store.results_dir(prof)
    else:
        root = a.results or store.runs_dir(prof)
    print(f"{a.name}: {len(settings)} settings -> {root}", file=sys.stderr)
    records = run_grid(a.name, settings, root=root, jobs=a.jobs, recompute=a.recompute, kind=KINDS.get(a.name),
                       scheduler=a.scheduler)
    ok, failed = store.split_failed(records)
    if ok and ok[0]["setting"].get("runner") == "lds":
        frame = lds_frame(ok)
        cols = ["dataset", "depth", "width", "seed", "alpha", "method", "lds", "loo_spearman"]
    elif ok and KINDS.get(a.name) == "noise":
        frame, cols = None, []
    else:
        frame = to_frame(ok)
        cols = ["depth", "width", "weight_decay", "seed", "role", "pearson_all", "spearman_all"]
    if frame is not None and len(frame):
        cols = [c for c in cols if c in frame]
        print(frame[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    for r in failed:
        print(f"FAILED {setting_key(r['setting'], KINDS.get(a.name))}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
