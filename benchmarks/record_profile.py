"""Where the book's recompute time goes: the recorded timings of every committed record, by sweep and by stage.

    .venv/bin/python benchmarks/record_profile.py [--quiet-sample] [--wall-log LOG ...]

Reads the committed records of the default profile (``results/<sweep>/*.json``; failed records are left out),
groups each record's timings (theta* training, leave-one-out retraining, influence of all methods, LDS subset
retraining, PBRF, other) with :func:`influence_lib.experiments.report.stage_profile`, and writes
``benchmarks/results/record_profile.json`` atomically: per sweep the number of records, the recorded CPU-minutes,
the minutes per stage group and the median and longest record, plus the total and the wall time it implies on a
2-core machine (total / 2) against the target of issue "Exact ground truth, fast" (60 minutes on 2 cores).
Timings are what each record measured when it was computed (single-threaded, possibly on a loaded machine), so
they are upper bounds for a quiet one. ``--quiet-sample`` also recomputes a few settings here, one after the other in
this process with one thread (nothing is written to a store): the convex-MNIST baseline and the Iris models of depth
1, 4 and 8 (seed 0), and records their stage timings with the load average at the start, so that the recorded totals
can be set against what a quiet machine takes. ``--wall-log LOG`` (repeatable) adds the wall clock of a recompute
as its log printed it: lines ``== <sweep> start HH:MM:SS`` and ``== <sweep> end HH:MM:SS`` (what the recompute
scripts of a session print around each ``python -m influence_lib.experiments.sweep <sweep> --book --recompute
--jobs 2``), summed over the sweeps, so that the recorded total can be set against the clock on the wall.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from influence_lib.experiments import presets, report, store  # noqa: E402

TARGET_WALL_MINUTES_2_CORES = 60.0


def quiet_sample() -> dict:
    """Recompute a few default settings in this process (one thread, no store) and return their timings."""
    import time

    import torch

    from influence_lib.experiments import run_influence

    torch.set_num_threads(1)
    out = {"loadavg_at_start": list(os.getloadavg()), "threads": 1, "records": {}}
    iris = presets.settings("iris", "default")
    picks = [("convex-mnist", presets.settings("convex-mnist", "default")[0])]
    for d, wd in ((1, 0.005), (4, 0.005), (8, 0.0)):
        picks.append((f"iris depth {d} wd {wd:g}", next(x for x in iris if (x["depth"], x["width"], x["weight_decay"],
                                                                         x["seed"]) == (d, 5, wd, 0))))
    for label, s in picks:
        t = time.perf_counter()
        rec = run_influence.run_setting(s)
        out["records"][label] = {"seconds": time.perf_counter() - t, "timings": rec["timings"]}
        print(f"quiet sample: {label}: {out['records'][label]['seconds']:.1f} s", flush=True)
    return out


def wall_from_logs(paths: list[str]) -> dict:
    """Per sweep the wall-clock minutes between its ``start`` and ``end`` lines in the recompute logs ``paths``."""
    import re
    from datetime import datetime, timedelta

    marks: dict[str, dict[str, datetime]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            m = re.fullmatch(r"== (\S+) (start|end) (\d\d:\d\d:\d\d)", line.strip())
            if m:
                marks.setdefault(m[1], {})[m[2]] = datetime.strptime(m[3], "%H:%M:%S")
    sweeps = {}
    for name, t in marks.items():
        if "start" in t and "end" in t:
            d = t["end"] - t["start"]
            sweeps[name] = (d if d >= timedelta(0) else d + timedelta(days=1)).total_seconds() / 60
    return {"logs": [Path(p).name for p in paths], "minutes_by_sweep": sweeps, "total_minutes": sum(sweeps.values())}


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels use here (``AVX512``, ``AVX2``, ...): kernels differ by it."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def main(argv: list[str] | None = None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quiet-sample", action="store_true", help="also recompute a few settings and time them")
    ap.add_argument("--wall-log", action="append", default=[],
                    help="a recompute log with '== <sweep> start/end HH:MM:SS' lines (repeatable)")
    args = ap.parse_args(argv)
    root = store.results_dir("default")
    sweeps = {}
    for name in presets.GRIDS:
        recs = [json.loads(p.read_text()) for p in sorted((root / name).glob("*.json"))]
        ok = [r for r in recs if "error" not in r]
        if not ok:
            continue
        prof = report.stage_profile(ok)
        t = np.array([r["timings"]["total"] for r in ok])
        sweeps[name] = {"records": prof["records"], "grid_settings": len(presets.settings(name, "default")),
                        "cpu_minutes": prof["seconds"] / 60,
                        "minutes_by_stage": {k: v / 60 for k, v in prof["groups"].items()},
                        "median_record_s": float(np.median(t)), "longest_record_s": float(t.max())}
    total = sum(s["cpu_minutes"] for s in sweeps.values())
    out = {"machine": platform.machine(), "cpu": _cpu_model(), "cpu_capability": _cpu_capability(),
           "cpus_here": os.cpu_count(), "sweeps": sweeps,
           "total_cpu_minutes": total, "wall_minutes_on_2_cores": total / 2,
           "target_wall_minutes_on_2_cores": TARGET_WALL_MINUTES_2_CORES,
           "note": "recorded timings of the committed records (single-threaded; machine load at the time not "
                   "controlled): upper bounds"}
    dest = HERE / "results" / "record_profile.json"
    if args.wall_log:
        out["recompute_wall"] = wall_from_logs(args.wall_log)
    elif dest.exists() and "recompute_wall" in (old := json.loads(dest.read_text())):
        out["recompute_wall"] = {**old["recompute_wall"], "carried_over": True}
    if args.quiet_sample:
        out["quiet_sample"] = quiet_sample()
    elif dest.exists() and "quiet_sample" in (old := json.loads(dest.read_text())):
        # the quiet sample is not recomputed by a plain run: the last one is kept, marked as such
        out["quiet_sample"] = {**old["quiet_sample"], "carried_over": True}
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(out, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    for name, s in sweeps.items():
        top = ", ".join(f"{k} {v:.0f}" for k, v in list(s["minutes_by_stage"].items())[:3])
        print(f"{name:14s} {s['records']:4d}/{s['grid_settings']:<4d} records {s['cpu_minutes']:7.1f} CPU-min  ({top})")
    print(f"total {total:.0f} CPU-minutes = {total / 2:.0f} min on 2 cores (target {TARGET_WALL_MINUTES_2_CORES:.0f})")
    if "recompute_wall" in out:
        print(f"wall clock of the recompute (logs): {out['recompute_wall']['total_minutes']:.0f} min")
    return out


if __name__ == "__main__":
    main()
