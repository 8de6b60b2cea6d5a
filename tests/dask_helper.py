"""A test-only runner for tests/test_dask.py, loaded into every Dask worker of its cluster (``preload``).

A ``sleepy`` setting announces that it started (an empty file ``started-<pid>`` in its ``flags`` folder, so that
the test can kill the worker computing it), sleeps ``seconds`` and returns a small record naming the process
that computed it.
"""

import os
import time
from pathlib import Path

from influence_lib.experiments import runners
from influence_lib.experiments.record import finish_record

KEYS = {"runner": "sleepy", "seconds": 0.0, "flags": "", "tag": 0}


def normalize(setting):
    unknown = sorted(set(setting) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} of a sleepy setting")
    s = {**KEYS, **setting}
    return {"runner": "sleepy", "seconds": float(s["seconds"]), "flags": str(s["flags"]), "tag": int(s["tag"])}


def run(setting):
    s = normalize(setting)
    if s["flags"]:
        Path(s["flags"], f"started-{os.getpid()}").write_text("")
    time.sleep(s["seconds"])
    return finish_record("sleepy", s, {"pid": os.getpid(), "value": s["tag"] / 7}, {"total": s["seconds"]})


runners.register("sleepy", "dask_helper", "normalize", "run")
