"""The record store: one JSON file per setting, ``<root>/<name>/<key>.json``, written atomically.

Where records live (nothing here points into the installed package):

* the **book's records** (the ones the pages render): ``results/`` of the book checkout (``results/quick/`` for the
  quick profile), see :func:`results_dir`; the checkout is found from ``IL_BOOK_ROOT`` or by walking up from the
  current directory to the folder holding ``_toc.yml``; ``IL_RESULTS`` overrides the folder;
* **user runs** (a grid of one's own, a chapter rerun with other parameters): ``runs/`` of the checkout
  (``IL_RUNS`` overrides; outside a checkout ``./runs``), see :func:`runs_dir`, so that an experiment never
  changes what the book shows.

Guarantees: a record is written to a temporary file in the same folder and renamed into place (never half-written),
with mode 0644; a corrupt or truncated record is named, moved aside to ``<key>.json.corrupt`` and computed again; a
setting is *claimed* (``<key>.lock``, created exclusively) before it is computed, so two sweeps over one folder do
not compute it twice, and the claim is released on failure; a claim whose process is gone is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROFILES = ("default", "quick")


class CorruptRecordWarning(UserWarning):
    """A record file could not be read; it was moved aside and its setting will be computed again."""


def profile() -> str:
    """The book profile from ``IL_PROFILE``: ``"default"`` or ``"quick"``."""
    p = os.environ.get("IL_PROFILE", "default") or "default"
    if p not in PROFILES:
        raise ValueError(f"IL_PROFILE must be 'default' or 'quick', got {p!r}")
    return p


def book_root(start: Path | str | None = None) -> Path | None:
    """The book checkout: ``IL_BOOK_ROOT``, else the nearest folder at or above ``start`` (default: the current
    directory) that holds ``_toc.yml``; None outside a checkout."""
    env = os.environ.get("IL_BOOK_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file() and (folder / "book").is_dir():
            return folder
    return None


def results_dir(prof: str | None = None) -> Path:
    """The book's records: ``<checkout>/results/`` (default profile) or ``<checkout>/results/quick/``."""
    prof = profile() if prof is None else prof
    if prof not in PROFILES:
        raise ValueError(f"profile must be one of {list(PROFILES)}, got {prof!r}")
    env = os.environ.get("IL_RESULTS")
    if env:
        base = Path(env)
    else:
        root = book_root()
        if root is None:
            raise FileNotFoundError("no book checkout found (no _toc.yml in the current folder or above): run from "
                                    "the checkout, set IL_BOOK_ROOT, or pass a results folder explicitly (IL_RESULTS)")
        base = root / "results"
    return base / "quick" if prof == "quick" else base


def runs_dir(prof: str | None = None) -> Path:
    """Where user runs go: ``IL_RUNS``, else ``<checkout>/runs/`` (``./runs`` outside a checkout); per profile."""
    prof = profile() if prof is None else prof
    env = os.environ.get("IL_RUNS")
    root = book_root()
    base = Path(env) if env else (root / "runs" if root is not None else Path("runs"))
    return base / "quick" if prof == "quick" else base


def reference_file() -> Path:
    """The paper's reference numbers: ``book/reference_values.json`` of the checkout (``IL_REFERENCE_FILE``)."""
    env = os.environ.get("IL_REFERENCE_FILE")
    if env:
        return Path(env)
    root = book_root()
    if root is None:
        raise FileNotFoundError("no book checkout found for book/reference_values.json: set IL_BOOK_ROOT")
    return root / "book" / "reference_values.json"


# --- files -----------------------------------------------------------------------------------------------------
def write_atomic(path: Path | str, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file in the same folder and an atomic rename (mode 0644).

    Raises ``ValueError`` (before anything is renamed into place) if ``obj`` holds a non-finite float.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, separators=(",", ":"), allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_record(path: Path | str) -> dict[str, Any] | None:
    """The record at ``path``; None if there is none. A file that is not a JSON object is moved aside to
    ``<name>.corrupt`` with a :class:`CorruptRecordWarning` naming it, and None is returned (compute it again)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        rec = json.loads(text)
        if not isinstance(rec, dict) or "setting" not in rec:
            raise ValueError("not a record (a JSON object with a 'setting')")
        return rec
    except ValueError as e:
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            pass
        warnings.warn(f"record {path} is corrupt ({e}); moved to {aside.name}, it will be computed again",
                      CorruptRecordWarning, stacklevel=2)
        return None


def is_failed(record: dict[str, Any] | None) -> bool:
    return record is not None and "error" in record


# --- claims ------------------------------------------------------------------------------------------------------
def _lock_path(path: Path) -> Path:
    return path.with_suffix(".lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(path: Path | str, stale_after: float | None = None) -> bool:
    """Claim the setting of record ``path`` for this process: True if claimed, False if another live process
    holds it. A claim of a process that no longer runs (same host), or older than ``stale_after`` seconds
    (``IL_CLAIM_TIMEOUT``, default 24 h; claims from other hosts), is taken over."""
    path = Path(path)
    lock = _lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    stale_after = float(os.environ.get("IL_CLAIM_TIMEOUT", 86400)) if stale_after is None else stale_after
    me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                other = {}
            same_host = other.get("host") == me["host"]
            dead = same_host and not _alive(int(other.get("pid", -1)))
            old = time.time() - float(other.get("time", 0)) > stale_after
            if not (dead or old or not other):
                return False
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def release(path: Path | str) -> None:
    """Drop this process's claim on the setting of record ``path`` (if any)."""
    try:
        _lock_path(Path(path)).unlink()
    except FileNotFoundError:
        pass


def claimed(path: Path | str) -> bool:
    return _lock_path(Path(path)).exists()


# --- reading a sweep ----------------------------------------------------------------------------------------------
def load_records(name: str, root: Path | str | None = None) -> list[dict[str, Any]]:
    """Every readable record of sweep ``name`` under ``root`` (in file-name order)."""
    folder = Path(root or results_dir()) / name
    out = []
    for p in sorted(folder.glob("*.json")):
        r = read_record(p)
        if r is not None:
            out.append(r)
    return out


def split_failed(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(succeeded, failed)`` records."""
    ok = [r for r in records if "error" not in r]
    return ok, [r for r in records if "error" in r]
