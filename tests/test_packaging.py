"""The library as a user installs it: a wheel, imported outside the checkout, touches no repository path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROBE = r"""
import os, sys
repo, venv = sys.argv[1], sys.prefix
touched = []
def hook(event, args):
    if event == "open" and isinstance(args[0], str):
        p = os.path.abspath(args[0])
        if p.startswith(repo + os.sep) and not p.startswith(venv + os.sep):
            touched.append(p)
sys.addaudithook(hook)
import influence_lib as il
assert il.__file__.startswith(sys.argv[2]), il.__file__
assert not [m for m in sys.modules if m.startswith("influence_lib.experiments")]
assert not touched, touched
print("ok", il.__version__)
"""


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_imports_without_touching_it(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels)], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr[-300:]}")
    (wheel,) = wheels.glob("influence_lib-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("IL_BOOK_ROOT", "IL_RESULTS")}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO), str(target)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]
