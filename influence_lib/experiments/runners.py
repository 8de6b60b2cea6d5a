"""The Runner protocol and the registry of experiment kinds.

A runner is a pair of functions: ``normalize(setting) -> canonical setting`` (fills defaults, validates every key
and value before any work) and ``run(setting) -> record`` (see :mod:`.record`). Each kind is composed from the
shared stages of :mod:`.stages`:

    ========== ====================================== ===========================================================
    kind       module                                 what a record holds
    ========== ====================================== ===========================================================
    influence  :mod:`.run_influence`                  influence vs LOO (and PBRF) per test point; the convex,
                                                      Iris, small-MNIST, CNN, test-point and PBRF sweeps
    lds        :mod:`.run_lds`                        linear datamodeling score of every method, LOO contrast
    noise      :mod:`.noise`                          the same removals retrained under several protocols
    ========== ====================================== ===========================================================

A setting names its kind with a ``"runner"`` key (``{"runner": "lds", ...}``) or gets it from the grid
(``run_grid(..., kind="noise")``); without either it is an influence setting. The key of a record is the hash of
its canonical setting (:func:`setting_key`), so a rerun finds what is already computed.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class Normalizer(Protocol):
    def __call__(self, setting: dict[str, Any]) -> dict[str, Any]: ...


class RunFunction(Protocol):
    def __call__(self, setting: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Runner:
    """One experiment kind: where its normaliser and its run function live (imported on first use)."""

    kind: str
    module: str
    normalizer: str
    function: str

    def normalize(self, setting: dict[str, Any]) -> dict[str, Any]:
        return getattr(importlib.import_module(self.module), self.normalizer)(setting)

    def run(self, setting: dict[str, Any]) -> dict[str, Any]:
        return getattr(importlib.import_module(self.module), self.function)(setting)


RUNNERS: dict[str, Runner] = {}


def register(kind: str, module: str, normalizer: str, function: str) -> Runner:
    """Add (or replace) the runner of ``kind``."""
    RUNNERS[kind] = Runner(kind, module, normalizer, function)
    return RUNNERS[kind]


register("influence", "influence_lib.experiments.run_influence", "normalize_setting", "run_setting")
register("lds", "influence_lib.experiments.run_lds", "normalize_lds_setting", "run_lds_setting")
register("noise", "influence_lib.experiments.noise", "normalize_noise_setting", "run_noise_setting")


def kind_of(setting: dict[str, Any], kind: str | None = None) -> str:
    """The kind of ``setting``: its ``"runner"`` key, else ``kind``, else ``"influence"``."""
    if not isinstance(setting, dict):
        raise ValueError(f"a setting must be a dict, got {type(setting).__name__}")
    k = setting.get("runner", kind or "influence")
    if k not in RUNNERS:
        raise ValueError(f"runner must be one of {sorted(RUNNERS)} (or absent), got {k!r}")
    return k


def runner_for(setting: dict[str, Any], kind: str | None = None) -> Runner:
    return RUNNERS[kind_of(setting, kind)]


def normalize_any(setting: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
    """The canonical ``setting`` (defaults filled, values checked) for whichever runner it belongs to."""
    return runner_for(setting, kind).normalize(setting)


def setting_key(setting: dict[str, Any], kind: str | None = None) -> str:
    """Stable 16-hex-digit hash of the canonical setting."""
    blob = json.dumps(normalize_any(setting, kind), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def run_any(setting: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
    """Run ``setting`` with its runner: the record."""
    return runner_for(setting, kind).run(setting)


def expand(base: dict[str, Any], grid: dict[str, Sequence[Any]] | None = None, seeds: Iterable[int] = (0,),
           kind: str | None = None) -> list[dict[str, Any]]:
    """All settings of the grid (cartesian product) for every seed, ``base`` filling the rest.

    Every setting is normalised on the way, so a bad key or value fails here, before any work.
    """
    grid = grid or {}
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        for seed in seeds:
            s = {**base, **dict(zip(keys, values, strict=True)), "seed": seed}
            normalize_any(s, kind)  # fail early on a bad key or value
            out.append(s)
    return out


def validate_all(settings: Sequence[dict[str, Any]], kind: str | None = None,
                 normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Normalise every setting (raising on the first bad one, naming its position): the canonical settings."""
    out = []
    for i, s in enumerate(settings):
        try:
            out.append(normalize(s) if normalize else normalize_any(s, kind))
        except ValueError as e:
            raise ValueError(f"setting {i} of the grid: {e}") from None
    return out
