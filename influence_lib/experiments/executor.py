"""Computing the missing records of a grid: :func:`run_grid` over a pluggable executor.

``run_grid(name, settings, root=...)`` validates every setting first (a bad grid is refused before any work),
skips settings whose record exists, claims each remaining setting in the store before computing it (two sweeps of
one grid never compute a setting twice), computes the rest in ``jobs`` worker processes, writes each record
atomically as it lands, and returns all records in the order of ``settings``. A failed setting is recorded with its
error and is computed again on the next run (its cause may be gone), never served from the store.

Every setting is computed with a fixed number of threads (``IL_THREADS``, default 1, recorded in the record's
``versions``), whatever ``jobs`` is, so a record does not depend on how many settings ran beside it.
Worker processes watch their parent: a killed sweep leaves no worker computing and writing behind it.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import store
from .record import error_record, json_finite
from .runners import normalize_any, run_any, setting_key, validate_all


def threads_per_setting() -> int:
    n = os.environ.get("IL_THREADS", "1")
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"IL_THREADS must be a positive integer, got {n!r}")
    return int(n)


def record_path(name: str, setting: dict[str, Any], root: Path | str, kind: str | None = None) -> Path:
    return Path(root) / name / f"{setting_key(setting, kind)}.json"


def compute_record(setting: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
    """The record of ``setting`` (its error record if it fails), computed in this process."""
    import torch

    torch.set_num_threads(threads_per_setting())
    try:
        return json_finite(run_any(setting, kind))
    except Exception as e:  # recorded so that the chapter can show it; computed again on the next run
        return error_record(normalize_any(setting, kind), e, traceback.format_exc(limit=5), "")


def work(name: str, setting: dict[str, Any], root: str, kind: str | None = None,
         recompute: bool = False) -> tuple[str, bool]:
    """Compute and store the record of one setting unless it exists (or another process holds its claim)."""
    path = record_path(name, setting, root, kind)
    if not recompute:
        rec = store.read_record(path)
        if rec is not None and not store.is_failed(rec):  # another sweep may have computed it meanwhile
            return str(path), True
    if not store.claim(path):
        return str(path), False  # another live process computes it; the caller waits for it
    try:
        record = compute_record(setting, kind)
        store.write_atomic(path, record)
    finally:
        store.release(path)
    return str(path), "error" not in record


def _watch_parent(parent: int) -> None:
    def loop() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=loop, daemon=True).start()


def _wait_for(paths: Sequence[Path], poll: float = 0.5) -> list[Path]:
    """Wait until no claim is held on ``paths``; the paths that still have no successful record."""
    pending = list(paths)
    while any(store.claimed(p) for p in pending):
        time.sleep(poll)
        for p in pending:
            if store.claimed(p):
                store.claim(p) and store.release(p)  # take over a claim whose process died
    return [p for p in pending if store.read_record(p) is None or store.is_failed(store.read_record(p))]


def run_grid(
    name: str,
    settings: Sequence[dict[str, Any]],
    *,
    root: Path | str | None = None,
    jobs: int | None = None,
    recompute: bool | None = None,
    progress: bool = True,
    kind: str | None = None,
    scheduler: str | None = None,
) -> list[dict[str, Any]]:
    """Compute the missing records of ``settings`` and return all of them, in order.

    ``root``: the store (default: the book's :func:`store.results_dir`); ``jobs``: worker processes (default:
    ``IL_JOBS`` or the number of CPU cores); ``recompute`` (default: ``IL_RECOMPUTE``) recomputes every setting even
    if its record exists; ``kind``: the runner of settings without a ``"runner"`` key; ``scheduler``: the address of
    an existing ``dask.distributed`` scheduler (default ``IL_SCHEDULER``; None: local processes).
    """
    validate_all(settings, kind)  # a bad grid is refused before any work
    root = Path(root or store.results_dir())
    recompute = os.environ.get("IL_RECOMPUTE", "") not in ("", "0") if recompute is None else recompute
    jobs = int(os.environ.get("IL_JOBS", os.cpu_count() or 1)) if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    scheduler = scheduler or os.environ.get("IL_SCHEDULER") or None
    paths = [record_path(name, s, root, kind) for s in settings]
    todo = []
    for s, p in zip(settings, paths, strict=True):
        rec = None if recompute else store.read_record(p)
        if rec is None or store.is_failed(rec):
            todo.append(s)
    # seed by seed: an interrupted sweep leaves whole seeds of the grid, not a scatter of settings
    todo.sort(key=lambda s: (s.get("seed", 0) if isinstance(s.get("seed", 0), int) else 0))
    if todo:
        bar = tqdm(total=len(todo), desc=f"{name}: computing {len(todo)} of {len(settings)} settings",
                   disable=not progress)
        if scheduler:
            from .dask_executor import run_on_dask

            run_on_dask(scheduler, name, todo, str(root), kind, recompute, bar)
        elif jobs == 1 or len(todo) == 1:
            for s in todo:
                work(name, s, str(root), kind, recompute)
                bar.update(1)
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn"),
                                     initializer=_watch_parent, initargs=(os.getpid(),)) as ex:
                futures = [ex.submit(work, name, s, str(root), kind, recompute) for s in todo]
                for f in as_completed(futures):
                    f.result()
                    bar.update(1)
        bar.close()
        for p in _wait_for([record_path(name, s, root, kind) for s in todo]):
            # its claim was released without a record (the other process failed or died): compute it here
            s = todo[[record_path(name, t, root, kind) for t in todo].index(p)]
            if store.read_record(p) is None:
                work(name, s, str(root), kind, recompute=False)
    out = []
    for s, p in zip(settings, paths, strict=True):
        rec = store.read_record(p)
        if rec is None:  # could not be written (e.g. read-only store): the error says so
            rec = error_record(normalize_any(s, kind), RuntimeError(f"no record at {p}"), "", "")
        out.append(rec)
    return out
