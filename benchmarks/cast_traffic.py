"""Bytes moved by dtype casts in one training step: blanket BF16 autocast against the tuned policy.

Casts are memory-bound kernels: on a GPU their bytes are what a per-layer policy can cost over
blanket autocast. For each model (``_zoo.build(name, "large")``: width 256, 4 layers) this tunes a
policy (``--target cpu`` by default, the BF16 policy of this CPU; ``--target cuda`` tunes a BF16
GPU policy) and counts the casts between floating formats (``aten._to_copy``) of one forward and
backward, with :func:`_measure.cast_traffic`. It also lists, per model, the policy's FP32 layers fed
by a 16-bit layer (each one is a cast the decisions ask for, not the runtime). Counts, not times:
the same on any machine and under any load.

Run:  python benchmarks/cast_traffic.py [--models gpt2 llama vit] [--target cpu]
Writes benchmarks/results/cast_traffic.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _zoo  # noqa: E402
import torch  # noqa: E402
from _measure import amp_variant, cast_traffic, policy_variant  # noqa: E402

import autoprec  # noqa: E402


def measure(name: str, target: str, size: str) -> dict:
    """One row: the casts of blanket BF16 autocast and of the tuned policy on ``name``."""
    spec = _zoo.build(name, size)
    kw = {"target": "cpu"} if target == "cpu" else {"target": "cuda", "dtypes": ["bf16"]}
    policy = autoprec.tune(spec.model, spec.tune[0], spec.tune[1], progress=False, verify_steps=5, **kw)
    amp = cast_traffic(spec.model, spec.train[0], amp_variant("bf16"))
    tuned = cast_traffic(spec.model, spec.train[0], policy_variant("policy", policy))
    fed = sorted({c for k, consumers in policy.handoff.items() if policy.layers[k].precision != "fp32"
                  for c in consumers if policy.layers[c].precision == "fp32"})
    return {"model": name, "target": target, "low_fraction": round(policy.low_precision_fraction(), 4),
            "amp_bf16": {"casts": amp[0], "mib": round(amp[1] / 2**20, 1)},
            "policy": {"casts": tuned[0], "mib": round(tuned[1] / 2**20, 1)},
            "ratio": round(tuned[1] / amp[1], 3) if amp[1] else None,
            "fp32_layers_fed_16bit": fed}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama", "vit"])
    parser.add_argument("--target", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", default="large")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cast_traffic.json"))
    args = parser.parse_args(argv)
    logging.getLogger("autoprec").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = [measure(name, args.target, args.size) for name in _zoo.expand(args.models)]
    print(f"# cast traffic per training step (forward + backward), {args.target} policies, size {args.size}")
    print("| model | 16-bit FLOPs | amp-bf16 casts / MiB | policy casts / MiB | policy / amp | FP32 layers fed 16-bit |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fed = ", ".join(sorted({k.split(".")[-1] for k in r["fp32_layers_fed_16bit"]})) or "-"
        print(f"| {r['model']} | {r['low_fraction']:.2f} | {r['amp_bf16']['casts']} / {r['amp_bf16']['mib']} | "
              f"{r['policy']['casts']} / {r['policy']['mib']} | {r['ratio']} | {fed} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"rows": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
