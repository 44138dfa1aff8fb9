"""What ``autoprec.guard`` costs per training step, next to the same policy installed by ``apply``.

A stack of ``Linear(width, width)`` + GELU blocks with every Linear in BF16 (a CPU policy), trained
with SGD; per width, one thread, medians of interleaved rounds:

* ``apply ms``: a training step with the policy installed by ``policy.apply(model)``;
* ``guard ms``: the same step with ``autoprec.guard(model, policy, every=50)`` watching it, and
  ``guard.step`` called after the optimizer step;
* ``overhead %``: guard over apply; ``watch us/layer``: the difference per 16-bit layer and step;
* ``syncs/50 steps``: the guard's host reads over 50 steps (``autoprec.guard._watch._host`` counted).

The watch's work per 16-bit layer and forward is fixed (one ``aminmax`` over the output, a few
0-dim ops: ``tests/test_guard.py`` counts them), so the overhead is largest at small widths.

Run: ``python benchmarks/guard_overhead.py [--widths 256 1024] [--rounds 7]``; writes
``benchmarks/results/guard_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import autoprec  # noqa: E402
from autoprec import LayerEntry, Policy  # noqa: E402
from autoprec.watch import _watch  # noqa: E402
from runtime_overhead import _cpu_name  # noqa: E402


def _model(width: int, depth: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)])


def _steps(model, x, opt, n: int, guard=None) -> float:
    """Seconds per training step over ``n`` steps."""
    t = time.perf_counter()
    for _ in range(n):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if guard is not None:
            guard.step(loss, x)
    return (time.perf_counter() - t) / n


def measure(width: int, depth: int, batch: int, rounds: int, steps: int) -> dict:
    """One row: apply and guard step times for a model of ``depth`` layers of ``width``."""
    torch.manual_seed(0)
    model, x = _model(width, depth), torch.randn(batch, width)
    policy = Policy(layers={f"{i}.0": LayerEntry("bf16") for i in range(depth)}, target="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {"apply": [], "guard": []}
    reads = []
    host = _watch._host
    _watch._host = lambda table: reads.append(1) or host(table)
    try:
        for _ in range(rounds):  # interleaved: a busy moment slows both
            with policy.apply(model):
                _steps(model, x, opt, 3)
                times["apply"].append(_steps(model, x, opt, steps))
            with autoprec.guard(model, policy, every=50) as guard:
                _steps(model, x, opt, 3, guard)
                reads.clear()
                times["guard"].append(_steps(model, x, opt, steps, guard))
                syncs = len(reads) * 50 / steps
    finally:
        _watch._host = host
    a, g = statistics.median(times["apply"]), statistics.median(times["guard"])
    return {"width": width, "layers": depth, "batch": batch, "apply_ms": round(1e3 * a, 3),
            "guard_ms": round(1e3 * g, 3), "overhead_pct": round(100 * (g / a - 1), 1),
            "watch_us_per_layer": round(1e6 * (g - a) / depth, 1), "syncs_per_50_steps": syncs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "guard_overhead.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(w, args.depth, args.batch, args.rounds, args.steps) for w in args.widths]
    header = ("width", "layers", "batch", "apply_ms", "guard_ms", "overhead_pct", "watch_us_per_layer",
              "syncs_per_50_steps")
    print(f"# guard overhead, {_cpu_name()}, torch {torch.__version__}, 1 thread, every=50")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    result = {"cpu": _cpu_name(), "torch": torch.__version__, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
