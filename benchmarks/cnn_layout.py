"""Stacked training of the book's CNNs: channels-last, one model at a time, against vmap over channels-first models.

    .venv/bin/python benchmarks/cnn_layout.py [--steps 10] [--rounds 3] [--threads 1]

The models are those of the "cnn" sweep (``influence_lib/experiments/presets.py``): ``small_cnn``, ``vgg`` and
``resnet`` at depths 1-3, width 4, float32, on 100 images of 1x28x28 (random pixels of the data's shape: the
speed of a convolution does not depend on the values), 10 classes, weight decay 0.001. Two stacks, as in a record:

1. ``theta*``: one model on all its data (the record's 2,000 full-batch Adam steps);
2. ``loo``: 17 models (8 removals for each of 2 test points and the retrained reference), full batch.

Each is trained for ``--steps`` Adam steps in two ways, in the same process, interleaved ``--rounds`` times (the
fastest round of each is kept):

* ``before``: what :func:`influence_lib.retrain.fit_stacked` did until 2026-12: ``torch.func.vmap`` over the
  models of ``functional_call`` with the weights channels-first (a single model: the plain batch mean);
* ``now``: ``fit_stacked`` itself: one model at a time, the weights of every convolution with more than one input
  channel channels-last (``Objective.forward(..., channels_last=True)``).

Printed and written (atomically) to ``benchmarks/results/cnn_layout.json``: milliseconds per step of each, their
ratio, and the largest relative difference between the two final parameter stacks (the same optimisation, rounded
differently: float32 rounding, not a different answer).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_core import atomic_write_json  # noqa: E402
from torch.func import vmap  # noqa: E402

from influence_lib.models import build_model  # noqa: E402
from influence_lib.objective import Objective  # noqa: E402
from influence_lib.retrain import TrainConfig, _batch_objective, fit_stacked, minimize_stacked  # noqa: E402

DEPTH_KEY = {"small_cnn": "depth", "vgg": "stages", "resnet": "blocks"}
N, N_LOO_MODELS, WEIGHT_DECAY = 100, 17, 0.001


def fit_before(obj: Objective, theta0: torch.Tensor, weights: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The previous stacked training of a CNN: vmap over channels-first models (one model: the batch mean)."""
    def per_model(theta, w, xb, yb):
        losses = vmap(lambda o, t: F.cross_entropy(o.unsqueeze(0), t.unsqueeze(0)))(obj.forward(theta, xb), yb)
        return (w * losses).sum() / w.sum()

    if theta0.shape[0] == 1:
        def batched(th, w, xb, yb):
            return F.cross_entropy(obj.forward(th[0], xb), yb).unsqueeze(0)
    else:
        batched = vmap(per_model, in_dims=(0, 0, None, None))
    return minimize_stacked(lambda th, rows: _batch_objective(batched, th, weights, obj.X, obj.y), theta0, obj.n,
                            cfg, l2=obj.weight_decay)


def time_case(name: str, depth: int, steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    X, y = torch.randn(N, 1, 28, 28), torch.randint(0, 10, (N,))
    model = build_model(name, in_shape=(1, 28, 28), n_classes=10, seed=0, width=4, **{DEPTH_KEY[name]: depth})
    obj = Objective(model, F.cross_entropy, X, y, weight_decay=WEIGHT_DECAY)
    cfg = TrainConfig(optimizer="adam", lr=0.001, steps=steps)
    theta = obj.theta()
    out = {"model": name, "depth": depth, "p": obj.p}
    for stack, B in (("theta*", 1), ("loo", N_LOO_MODELS)):
        theta0 = theta.expand(B, -1).clone()
        W = torch.ones(B, N)
        for b in range(1, B):
            W[b, b - 1] = 0  # model b leaves out point b - 1; model 0 is the reference
        timings: dict[str, float] = {}
        finals = {}
        for _ in range(rounds):  # interleaved, the fastest round of each: less sensitive to other load
            for way, run in (("before", fit_before), ("now", fit_stacked)):
                t0 = time.perf_counter()
                finals[way] = run(obj, theta0, W, cfg)
                timings[way] = min(timings.get(way, math.inf), (time.perf_counter() - t0) / steps * 1e3)
        diff = float(((finals["now"] - finals["before"]).norm(dim=1) / finals["before"].norm(dim=1)).max())
        out[stack] = {"models": B, "ms_per_step_before": timings["before"], "ms_per_step_now": timings["now"],
                      "speedup": timings["before"] / timings["now"], "max_relative_param_difference": diff}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the fastest of each is kept")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cnn_layout.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    cases = []
    for name in ("small_cnn", "vgg", "resnet"):
        for depth in (1, 2, 3):
            c = time_case(name, depth, args.steps, args.rounds)
            cases.append(c)
            print(f"{name:9s} depth {depth} (p={c['p']:5d}): theta* {c['theta*']['ms_per_step_before']:6.1f} -> "
                  f"{c['theta*']['ms_per_step_now']:6.1f} ms/step ({c['theta*']['speedup']:.2f}x), LOO x{N_LOO_MODELS} "
                  f"{c['loo']['ms_per_step_before']:6.0f} -> {c['loo']['ms_per_step_now']:6.0f} ms/step "
                  f"({c['loo']['speedup']:.2f}x); params differ by <= "
                  f"{max(c['theta*']['max_relative_param_difference'], c['loo']['max_relative_param_difference']):.1e}",
                  flush=True)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
              "steps": args.steps, "rounds": args.rounds, "loadavg_1_5_15_before": load_before,
              "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()], "cases": cases}
    atomic_write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
