"""Chapters as programs: their parameters, their records, and running them with papermill.

Every chapter has a papermill ``parameters`` cell and, right after it, calls :func:`parameters`, which

* refuses a parameter the chapter does not have (papermill would silently define it and ignore it), naming the
  accepted ones;
* accepts what a user types on the command line: ``-p seeds 5`` (a count: seeds 0..4), ``-p seeds '[0, 2]'`` or
  ``-p seeds 0,2`` (papermill passes strings), ``-p overrides '{"loo_steps": 500}'`` (a JSON object),
  ``-p jobs 2``; a value that does not parse is refused before any record is computed.

:func:`chapter_records` then computes (or reads) the chapter's records: the book's own grid goes to the book's
records (``results/``), anything else (other seeds, overrides) to the user-run folder (``runs/``), so rerunning a
chapter never changes the committed book.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import presets, store
from .executor import run_grid
from .runners import setting_key

#: names IPython defines in every kernel namespace (not parameters)
_KERNEL_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def parse_seeds(value: Any) -> list[int] | None:
    """``None`` (the preset's seeds), a count ``N`` (seeds ``0..N-1``), a list, or the same typed as a string."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "None", "none", "null"):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = [int(x) for x in text.split(",")]
            except ValueError:
                raise ValueError(f"seeds must be a count (5), a list ([0, 1, 2] or 0,1,2) or None, got {text!r}") \
                    from None
    if isinstance(value, bool):
        raise ValueError(f"seeds must be a count, a list of integers or None, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"seeds: a count must be >= 1, got {value}")
        return list(range(value))
    if isinstance(value, Iterable):
        seeds = list(value)
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {value!r}")
        return seeds
    raise ValueError(f"seeds must be a count, a list of integers or None, got {value!r}")


def parse_overrides(value: Any) -> dict[str, Any]:
    """A dict of setting overrides, or the same as a JSON string."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"overrides must be a JSON object such as '{{\"loo_steps\": 500}}', got {value!r} "
                             f"({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"overrides must be a dict (or a JSON object), got {value!r}")
    return value


def _parse_scalar(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None if value in ("None", "none") else value
    return value


def parameters(namespace: dict[str, Any], accepted: Iterable[str]) -> dict[str, Any]:
    """Check and normalise a chapter's parameters in place in ``namespace`` (the notebook's ``globals()``).

    ``accepted``: the names of the chapter's ``parameters`` cell (lower case; upper-case names in the namespace are
    imported constants, not parameters). Raises ``ValueError`` for an unknown parameter or a value that does not
    parse; returns the normalised parameters.
    """
    accepted = list(accepted)
    given = {k for k, v in namespace.items()
             if not k.startswith("_") and not k.isupper() and k not in _KERNEL_NAMES and not callable(v)
             and type(v).__name__ != "module"}
    unknown = sorted(given - set(accepted))
    if unknown:
        raise ValueError(f"unknown chapter parameter(s) {unknown}; this chapter accepts {accepted}")
    out: dict[str, Any] = {}
    for k in accepted:
        v = namespace.get(k)
        if k == "seeds":
            v = parse_seeds(v)
        elif k == "overrides":
            v = parse_overrides(v)
        elif k == "profile":
            v = _parse_scalar(v)
            if v is not None and v not in store.PROFILES:
                raise ValueError(f"profile must be one of {list(store.PROFILES)} or None, got {v!r}")
        elif k == "jobs":
            v = _parse_scalar(v)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"jobs must be a positive integer or None, got {v!r}")
        else:
            v = _parse_scalar(v)
        namespace[k] = out[k] = v
    return out


def chapter_records(name: str, profile: str | None = None, overrides: dict[str, Any] | None = None,
                    seeds: list[int] | None = None, jobs: int | None = None, scheduler: str | None = None,
                    progress: bool = True, settings: list[dict[str, Any]] | None = None,
                    kind: str | None = None) -> tuple[list[dict[str, Any]], Path]:
    """The records of chapter grid ``name`` and the folder they are in.

    The book's own grid (exactly the preset's settings on this profile) is read from / computed into the book's
    records; any other grid (overrides, other seeds) into the user-run folder (:func:`store.runs_dir`).
    """
    prof = profile or store.profile()
    if settings is None:
        settings = presets.settings(name, prof, overrides, seeds)
    kind = kind or presets.KINDS.get(name)
    book = presets.settings(name, prof) if name in presets.GRIDS else []
    own = sorted(setting_key(s, kind) for s in settings) == sorted(setting_key(s, kind) for s in book)
    root = store.results_dir(prof) if own else store.runs_dir(prof)
    records = run_grid(name, settings, root=root, jobs=jobs, progress=progress, kind=kind,
                       scheduler=scheduler or os.environ.get("IL_SCHEDULER") or None)
    return records, root


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
        pm.execute_notebook(str(src), str(out), parameters=parameters, cwd=str(path.parent), kernel_name="python3",
                            log_output=True, progress_bar=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        src.unlink(missing_ok=True)
    return out
