"""Run every command shown in README.md and on the book's pages, on the quick profile.

A documented command is a line of a fenced code block (```) in README.md or in a markdown cell of book/*.py that
calls papermill, jupytext or ``python -m influence_lib...`` (continuation lines ending in ``\\`` are joined).
Commands for a cluster (an address ``tcp://host...``) are documentation only and are listed as skipped.
Each command runs from the repository root with ``IL_PROFILE=quick`` and ``IL_RUNS`` pointing into a temporary
folder, so nothing lands in ``results/``. Exit status 1 if any command fails.

    .venv/bin/python .ci/check_commands.py [--list]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WANTED = re.compile(r"(papermill|jupytext|python -m influence_lib)")
SKIP = re.compile(r"tcp://host|SLURMCluster")


def blocks(text: str, comment: str = "") -> list[str]:
    """The lines inside fenced code blocks of ``text`` (``comment``: a prefix such as ``# `` to strip first)."""
    out, inside = [], False
    for raw in text.splitlines():
        line = raw[len(comment):] if comment and raw.startswith(comment) else (raw if not comment else None)
        if line is None:
            if raw.strip() == comment.strip():
                line = ""
            else:
                inside = False
                continue
        if line.strip().startswith("```"):
            inside = not inside
            continue
        if inside:
            out.append(line)
    return out


def commands() -> list[tuple[str, str]]:
    """``(source, command)`` of every documented command."""
    found = []
    sources = [(ROOT / "README.md", "")] + [(p, "# ") for p in sorted((ROOT / "book").glob("*.py"))]
    for path, comment in sources:
        lines = blocks(path.read_text(), comment)
        joined, buf = [], ""
        for line in lines:
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            joined.append((buf + line).strip())
            buf = ""
        for cmd in joined:
            cmd = cmd.split("  #")[0].strip()  # a trailing comment
            if WANTED.search(cmd) and not cmd.startswith("#"):
                found.append((str(path.relative_to(ROOT)), cmd))
    return found


def main() -> int:
    found = commands()
    if "--list" in sys.argv:
        for src, cmd in found:
            print(f"{src}: {cmd}")
        return 0
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "IL_PROFILE": "quick", "IL_RUNS": str(Path(tmp) / "runs"), "MPLBACKEND": "Agg"}
        work = Path(tmp) / "work"
        work.mkdir()
        for src, cmd in found:
            if SKIP.search(cmd):
                print(f"skipped (cluster, documentation only) {src}: {cmd}", flush=True)
                continue
            t = time.perf_counter()
            res = subprocess.run(cmd, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
            ok = res.returncode == 0
            failed += not ok
            print(f"{'ok' if ok else 'FAILED'} ({time.perf_counter() - t:.0f} s) {src}: {cmd}", flush=True)
            if not ok:
                print((res.stdout + res.stderr)[-3000:], flush=True)
        for name in ("out.ipynb", "iris.ipynb", "mnist.ipynb"):
            (ROOT / name).unlink(missing_ok=True)
        for p in (ROOT / "book").glob("*.executed.ipynb"):
            p.unlink()
    print(f"{len(found)} documented commands, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
