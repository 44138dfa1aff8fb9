"""The speed figures the cost model and the READMEs cite, measured on this machine.

Two parts, both forward+backward, one thread by default:

1. the device profile ``tune`` prices formats with (``autoprec.calibrate``, not cached): the
   runtime's overhead per 16-bit region, casts, elementwise rates, and the matmul/conv/attention
   ladders, each format against FP32;
2. named kernels the READMEs discuss, as medians of interleaved rounds: SDPA at (8, 4, 128, 64),
   LayerNorm(256) at 4096 rows, scatter_add of 20000 x 16 into 600 rows, index_add of the same, a
   1024^2 matmul, and a Linear(16, 16) on 32 rows as an FP32 layer and inside a BF16 region of the
   runtime.

Run:  python benchmarks/calibrate.py [--dtypes bf16 fp16] [--seconds 6] [--threads 1] [--rounds 15]
Writes benchmarks/results/calibrate.json (the profile, as ``autoprec calibrate --out`` writes it,
and the named kernels).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _measure import write_json  # noqa: E402

from autoprec.cli import profile_table  # noqa: E402
from autoprec.core import to_dtype  # noqa: E402
from autoprec.device import calibrate, machine, profile_to_dict
from autoprec.runtime import Runtime  # noqa: E402


def _step(fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for p in params:
            p.grad = None
        out = fn()
        out.backward(torch.ones_like(out))
    return run


def _kernels(fmt: str) -> dict[str, Any]:
    """The named forward+backward steps in ``fmt`` (inputs in it, under autocast as the runtime runs them)."""
    g = torch.Generator().manual_seed(0)
    dt = to_dtype(fmt)
    ac = (lambda: torch.autocast("cpu", dtype=dt)) if fmt != "fp32" else (lambda: torch.autocast("cpu", enabled=False))

    def x(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dt).requires_grad_(True)

    q, k, v = x(8, 4, 128, 64), x(8, 4, 128, 64), x(8, 4, 128, 64)
    h, w_ln = x(4096, 256), nn.Parameter(torch.ones(256))
    src, idx = x(20000, 16), torch.randint(0, 600, (20000,), generator=g)
    a, w = x(1024, 1024), nn.Parameter(torch.randn(1024, 1024, generator=g))
    out: dict[str, Any] = {}

    def under(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with ac():
                return fn()
        return call
    out["sdpa (8, 4, 128, 64)"] = _step(under(lambda: F.scaled_dot_product_attention(q, k, v)), [])
    out["layer_norm 4096 x 256"] = _step(under(lambda: F.layer_norm(h, (256,), w_ln.to(dt))), [w_ln])
    out["scatter_add 20000 x 16 -> 600"] = _step(under(lambda: torch.zeros(600, 16, dtype=dt).scatter_add(
        0, idx[:, None].expand(-1, 16), src)), [])
    out["index_add 20000 x 16 -> 600"] = _step(under(lambda: torch.zeros(600, 16, dtype=dt).index_add(0, idx, src)), [])
    out["matmul 1024^2"] = _step(under(lambda: F.linear(a, w)), [w])
    # the same small layer as an FP32 layer and inside one 16-bit region of the runtime (input FP32)
    lin = nn.Linear(16, 16)
    xin = torch.randn(32, 16, generator=g, requires_grad=True)
    out["Linear(16, 16) x 32 rows, in a region"] = _step(lambda: lin(xin), list(lin.parameters()))
    out["lin"] = lin  # type: ignore[assignment]  (the module the region goes on)
    return out


def named(formats: list[str], rounds: int) -> dict[str, dict[str, float]]:
    """Median milliseconds of each named kernel per format, interleaved rounds after one warm-up; the
    small Linear runs with the runtime installed (FP32 or the format) for the whole measurement."""
    steps = {f: _kernels(f) for f in formats}
    regions = [Runtime(steps[f]["lin"], {"": f}, units=[""], device_type="cpu").install() for f in formats]
    try:
        return _named(steps, formats, rounds)
    finally:
        for r in regions:
            r.remove()


def _named(steps: dict[str, dict[str, Any]], formats: list[str], rounds: int) -> dict[str, dict[str, float]]:
    steps = {f: {k: v for k, v in s.items() if k != "lin"} for f, s in steps.items()}
    times: dict[str, dict[str, list[float]]] = {name: {f: [] for f in formats} for name in steps[formats[0]]}
    for f in formats:
        for s in steps[f].values():
            s()
    for _ in range(rounds):
        for name in times:
            for f in formats:
                t = time.perf_counter()
                steps[f][name]()
                times[name][f].append(time.perf_counter() - t)
    return {name: {f: round(1e3 * statistics.median(v), 4) for f, v in per.items()} for name, per in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["bf16"], help="16-bit formats (bf16, fp16)")
    p.add_argument("--seconds", type=float, default=6.0, help="calibration budget")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1: repeatable on a shared machine)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the named kernels")
    p.add_argument("--out", default=os.path.join(HERE, "results", "calibrate.json"))
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        cpu, capability = machine(torch.device("cpu"))
        profile = calibrate("cpu", dtypes=args.dtypes, seconds=args.seconds, cache=False)
        formats = list(profile.formats)
        kernels = named(formats, args.rounds)
    finally:
        torch.set_num_threads(threads)
    print(f"# {cpu} ({capability}), torch {torch.__version__}, {args.threads} thread(s); "
          f"calibration {profile.seconds:.2f}s")
    print()
    print(profile_table(profile))
    print()
    print("| kernel, forward+backward, median ms | " + " | ".join(formats) + " |")
    print("| --- |" + " ---: |" * len(formats))
    for name, per in kernels.items():
        print(f"| {name} | " + " | ".join(f"{per[f]:.3g}" + ("" if f == "fp32" else f" ({per['fp32'] / per[f]:.2f}x)")
                                          for f in formats) + " |")
    result = {"meta": {"cpu": cpu, "capability": capability, "torch": torch.__version__, "threads": args.threads,
                       "calibration_seconds": round(profile.seconds, 3), "rounds": args.rounds},
              "profile": profile_to_dict(profile), "kernels_ms": kernels}
    return write_json(args.out, result)


if __name__ == "__main__":
    main()
