"""The pieces of ``benchmarks/preconditioner_spectrum.py`` that its numbers rest on, against dense answers:
the exact block-diagonal preconditioner and the spectrum summary. Nothing is timed here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_DIR))
_spec = importlib.util.spec_from_file_location("preconditioner_spectrum", _DIR / "preconditioner_spectrum.py")
ps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ps)


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    return B @ B.T + 0.5 * torch.eye(n, dtype=torch.float64)


def test_block_preconditioner_is_the_exact_block_diagonal():
    A = _spd(9, 0)
    blocks = [slice(0, 4), slice(4, 9)]
    D = torch.zeros_like(A)
    for b in blocks:
        D[b, b] = A[b, b]
    pre = ps._BlockPreconditioner(A, blocks)
    V = torch.randn(9, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(pre.solve(V), torch.linalg.solve(D, V), rtol=1e-10, atol=1e-12)
    S = pre.inv_sqrt(torch.eye(9, dtype=torch.float64))  # D^{-1/2}: symmetric, and S D S = I
    torch.testing.assert_close(S, S.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(S @ D @ S, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-10)


def test_spectrum_summary_of_a_known_diagonal():
    ev = torch.arange(1, 101, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(100, 100, generator=torch.Generator().manual_seed(2), dtype=torch.float64))[0]
    s = ps.spectrum(Q @ torch.diag(ev) @ Q.T)
    assert abs(s["min"] - 1) < 1e-9 and abs(s["max"] - 100) < 1e-9 and abs(s["condition"] - 100) < 1e-7
    assert abs(s["quantiles"]["0.5"] - ev[round(0.5 * 99)]) < 1e-9
