"""Where FP8 pays per nn.Linear on the built-in H100 estimate: ``autoprec.device.fp8_price`` (torchao's roofline,
``torchao/testing/training/roofline_utils.py``, with the estimate's figures: 989 TFLOP/s BF16, 1979 FP8, 3.35 TB/s,
5 us per kernel launch). A model, not a measurement; no GPU is used.

Tables:

- crossover: per recipe and number of tokens M, the smallest square Linear (K = N, a multiple of 64) whose step
  (three GEMMs and the casts) is faster in FP8 than in BF16;
- Llama 3 8B's Linears at M tokens (default 8192 = 8 x 1024): the modelled FP8 speedup per recipe, and
  whether torchao's shape filter for tensorwise (``_auto_filter_for_recipe``: stay BF16 when K <= 4096 and
  N <= 1024) keeps it, for comparison.

Run:  python benchmarks/fp8_cost.py [--tokens 8192] [--fused]
Writes benchmarks/results/fp8_cost.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from autoprec.device import FP8_COST_RECIPES, estimate, fp8_price
from autoprec.trace import Layer

TOKENS = (1024, 2048, 4096, 8192, 16384, 65536)
#: Llama 3 8B: width 4096, 32 heads of 128, 8 key/value heads, FFN 14336, vocabulary 128256
LLAMA3_8B = {"wq": (4096, 4096), "wk": (4096, 1024), "wv": (4096, 1024), "wo": (4096, 4096),
             "w1": (4096, 14336), "w3": (4096, 14336), "w2": (14336, 4096), "output": (4096, 128256)}


def linear(m: int, k: int, n: int) -> Layer:
    return Layer("fc", "module", "Linear", (), ("linear",), ((m, k),), ((m, n),), flops=2 * m * k * n,
                 in_numel=m * k, out_numel=m * n, work_numel=m * n, param_numel=k * n + n, calls=1)


def crossover(profile, recipe: str, m: int, fused: bool) -> int | None:
    """The smallest K = N (a multiple of 64, up to 32768) at which FP8 pays, or None."""
    for d in range(64, 32768 + 1, 64):
        if fp8_price(linear(m, d, d), profile, recipe, fused=fused).pays:
            return d
    return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="M of the Llama 3 8B table")
    ap.add_argument("--fused", action="store_true", help="torchao's enable_fusion_modeling")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fp8_cost.json"))
    args = ap.parse_args(argv)
    h100 = estimate("cuda", tf32=False)
    cross = {r: {m: crossover(h100, r, m, args.fused) for m in TOKENS} for r in FP8_COST_RECIPES}
    print(f"## Smallest square Linear (K = N) where FP8 pays, built-in H100 estimate{' (fused)' * args.fused}\n")
    print("| recipe | " + " | ".join(f"M={m}" for m in TOKENS) + " |")
    print("| --- |" + " ---: |" * len(TOKENS))
    for r, row in cross.items():
        print(f"| {r} | " + " | ".join(str(v) if v else "never" for v in row.values()) + " |")
    m = args.tokens
    llama = {}
    print(f"\n## Llama 3 8B Linears at M={m} tokens: modelled FP8 speedup over BF16 (step: 3 GEMMs + casts)\n")
    print("| Linear | K x N | " + " | ".join(FP8_COST_RECIPES) + " | torchao auto filter (tensorwise) |")
    print("| --- | --- |" + " ---: |" * len(FP8_COST_RECIPES) + " --- |")
    for name, (k, n) in LLAMA3_8B.items():
        prices = {r: fp8_price(linear(m, k, n), h100, r, fused=args.fused) for r in FP8_COST_RECIPES}
        keeps = k <= 4096 and n <= 1024
        llama[name] = {"k": k, "n": n, "keeps_bf16_torchao_auto": keeps,
                       **{r: {"speedup": round(p.speedup, 3), "pays": p.pays, "note": p.note} for r, p in prices.items()}}
        print(f"| {name} | {k} x {n} | " + " | ".join(f"{p.speedup:.2f}x" for p in prices.values())
              + f" | {'BF16' if keeps else 'FP8'} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    result = {"profile": h100.device, "fused": args.fused, "tokens": m,
              "crossover_square": {r: {str(k): v for k, v in row.items()} for r, row in cross.items()},
              "llama3_8b": llama}
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
