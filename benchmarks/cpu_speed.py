"""CPU training-step speed at sizes where BF16 can pay off: FP32, blanket BF16 autocast, autoprec's CPU policy.

``compare.py`` runs small models (so that real FP16 on this CPU stays affordable); at those sizes
the casts cost more than BF16 saves, so its timing table mostly measures overhead. This script
takes the transformers models at a larger config (width 256, 4 layers, 8 x 128 tokens or 64-px
images, see ``_zoo.build(size="large")``), tunes a CPU-target policy (BF16) for each, and times a
full training step (forward, backward, Adam) of the three variants, one thread, interleaved,
medians. It also reports the measured 16-bit FLOP share and the held-out loss/gradient error vs
FP64, so that speed is never shown without the accuracy it costs, and the CPU's capability (AVX512-BF16,
AMX) with the device profile that priced the policy (calibrated here unless ``AUTOPREC_PROFILE`` names one).

Run:  python benchmarks/cpu_speed.py [--models gpt2 llama ...] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _zoo
from _measure import (
    amp_variant,
    cast_traffic,
    fidelity,
    fp32_variant,
    measure_flops,
    median,
    policy_variant,
    reference64,
    step_times,
)
from compare import machine

import autoprec

HERE = os.path.dirname(os.path.abspath(__file__))


def run(name: str, rounds: int) -> dict[str, Any]:
    spec = _zoo.build(name, "large", heldout=1, train=2)
    t0 = time.perf_counter()
    policy = autoprec.tune(spec.model, spec.tune[0], spec.tune[1], target="cpu", progress=False)
    tune_s = time.perf_counter() - t0
    variants = [fp32_variant(), amp_variant("bf16"), policy_variant("autoprec-cpu", policy)]
    ref = reference64(spec.model, spec.heldout[0])
    row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in spec.model.parameters()),
                           "tune_seconds": round(tune_s, 1), "variants": {},
                           "profile": policy.stats.get("profile"), "calibration_seconds": policy.stats.get("calibration_seconds"),
                           "format_speed": policy.stats.get("format_speed"),
                           # what each layer kept FP32 for speed would cost in each format, and where from
                           "kept_fp32_for_speed": {k: e.detail for k, e in policy.layers.items()
                                                   if e.reason == "no gain" and e.precision == "fp32"}}
    for v in variants:
        f = fidelity(spec.model, spec.heldout[0], v, ref)
        row["variants"][v.name] = {"loss_err": f.loss_err, "grad_err": f.grad_err, "nonfinite": f.nonfinite,
                                   "flops": measure_flops(spec.model, spec.heldout[0], v),
                                   "cast_mib": cast_traffic(spec.model, spec.train[0], v)[1] / 2**20}
    times = step_times(spec.model, spec.train, variants, rounds=rounds)
    base = median(times["fp32"])
    for n, t in times.items():
        row["variants"][n]["median_s"] = median(t)
        row["variants"][n]["ratio"] = median(t) / base
    return row


def table(rows: list[dict[str, Any]]) -> str:
    out = [("| model | params | FP32 ms/step | amp-bf16: time x / BF16 FLOPs / grad err | "
            "autoprec-cpu: time x / BF16 FLOPs / grad err | FP32 grad err | cast MiB/step: amp-bf16 / autoprec | "
            "tune s |"),
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        v = r["variants"]

        def cell(n: str, v: dict[str, Any] = v) -> str:
            x = v[n]
            return f"{x['ratio']:.2f} / {100 * x['flops']['bf16']:.0f}% / {x['grad_err']:.1e}"

        out.append(f"| {r['model']} | {r['params']:,} | {1e3 * v['fp32']['median_s']:.0f} | {cell('amp-bf16')} | "
                   f"{cell('autoprec-cpu')} | {v['fp32']['grad_err']:.1e} | "
                   f"{v['amp-bf16']['cast_mib']:.0f} / {v['autoprec-cpu']['cast_mib']:.0f} | {r['tune_seconds']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2", "llama", "vit", "resnet"],
                   help=f"transformers models: {', '.join(_zoo.HF_MODELS)}")
    p.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu_speed.json"))
    args = p.parse_args(argv)
    logging.getLogger("autoprec").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(1)  # tuning too: repeatable on a shared machine
    import transformers
    transformers.logging.set_verbosity_error()
    from autoprec.device import machine as device_of
    cpu, capability = device_of(torch.device("cpu"))
    print(f"CPU: {cpu} ({capability})", file=sys.stderr, flush=True)
    rows = []
    for name in args.models:
        if name not in _zoo.HF_MODELS:
            raise SystemExit(f"{name!r}: cpu_speed.py takes the transformers models {', '.join(_zoo.HF_MODELS)}")
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        rows.append(run(name, args.rounds))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"meta": {**machine(), "capability": capability, "rounds": args.rounds}, "results": rows}, fh,
                      indent=1, default=float)
    print(f"CPU: {cpu} ({capability})")
    print(table(rows))
    for r in rows:
        fastest = min(r["variants"][v]["median_s"] for v in ("fp32", "amp-bf16"))
        print(f"{r['model']}: autoprec-cpu {r['variants']['autoprec-cpu']['median_s'] / fastest:.3f}x the faster of FP32 "
              f"and blanket BF16; priced with {r['profile']} (calibration {r['calibration_seconds']}s)")
        for key, why in r["kept_fp32_for_speed"].items():
            print(f"  kept FP32 for speed: {key}: {why.split('; calibrated here')[0]}")
    return rows


if __name__ == "__main__":
    main()
