"""How autoprec's tuning cost grows with model depth.

Tunes a stack of ``depth`` pre-LN residual MLP blocks (LayerNorm -> Linear -> GELU -> Linear, plus
the residual add) for depths 4 -> 64 and prints, per depth, the layers, the forward+backward passes
(probe, search, verification), the Optuna trials, the wall time, and the time per pass; then fits
``y = c * depth^k`` by least squares in log-log space and prints the exponent ``k`` for passes and
for wall time.

Passes are what autoprec's algorithm controls: the probe runs each candidate layer alone in each
format, so passes should grow linearly (k ~ 1). Each pass runs the whole model, whose cost also
grows linearly with depth, so wall time is expected to grow as passes x time per pass (k ~ 2).

Run:  python benchmarks/scaling.py [--quick] [--depths 4 8 16 32 64] [--target cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autoprec  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def make(depth: int, dim: int, batch: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, Any]:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(*[Block(dim) for _ in range(depth)], nn.LayerNorm(dim), nn.Linear(dim, 10))
    x = torch.randn(batch, dim, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y)

    return model, x, loss_fn


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else math.nan


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=None, help="block counts (default 4 8 16 32 64)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--target", default="cpu", choices=["cpu", "cuda"],
                   help="policy target (cuda: FP16+BF16 candidates, FP16 emulated on this CPU)")
    p.add_argument("--verify-steps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="depths 2 4 8 16")
    p.add_argument("--out", default=os.path.join(HERE, "results", "scaling.json"))
    args = p.parse_args(argv)
    depths = args.depths or ([2, 4, 8, 16] if args.quick else [4, 8, 16, 32, 64])
    logging.getLogger("autoprec").setLevel(logging.WARNING)

    rows = []
    print(f"| blocks | layers | passes (probe+search+verify) | trials | seconds | ms/pass | 16-bit FLOPs |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for depth in depths:
        model, x, loss_fn = make(depth, args.dim, args.batch)
        t0 = time.perf_counter()
        policy = autoprec.tune(model, x, loss_fn, target=args.target, verify_steps=args.verify_steps, progress=False)
        secs = time.perf_counter() - t0
        st = policy.stats
        passes = st["probe_passes"] + st["search_passes"] + st["verify_passes"]
        row = {"blocks": depth, "layers": len(policy.layers), "passes": passes, "probe_passes": st["probe_passes"],
               "search_passes": st["search_passes"], "verify_passes": st["verify_passes"], "trials": st["trials"],
               "seconds": secs, "ms_per_pass": 1e3 * secs / max(passes, 1),
               "low_fraction": policy.low_precision_fraction()}
        rows.append(row)
        print(f"| {depth} | {row['layers']} | {passes} ({st['probe_passes']}+{st['search_passes']}+"
              f"{st['verify_passes']}) | {st['trials']} | {secs:.1f} | {row['ms_per_pass']:.1f} | "
              f"{100 * row['low_fraction']:.0f}% |", flush=True)
    xs = [r["blocks"] for r in rows]
    k_passes = fit_exponent(xs, [r["passes"] for r in rows])
    k_probe = fit_exponent(xs, [r["probe_passes"] for r in rows])
    k_time = fit_exponent(xs, [r["seconds"] for r in rows])
    k_pass_time = fit_exponent(xs, [r["ms_per_pass"] for r in rows])
    print()
    print(f"fitted exponent (y ~ blocks^k): passes k = {k_passes:.2f}, probe passes k = {k_probe:.2f}, "
          f"wall time k = {k_time:.2f}, time per pass k = {k_pass_time:.2f}")
    result = {"target": args.target, "dim": args.dim, "batch": args.batch, "verify_steps": args.verify_steps,
              "rows": rows, "exponents": {"passes": k_passes, "probe_passes": k_probe, "seconds": k_time,
                                          "ms_per_pass": k_pass_time},
              "torch": torch.__version__, "cores": os.cpu_count()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
