"""GPU training-step speed at production sizes: FP32, blanket BF16, blanket FP16 + GradScaler, autoprec.

The issue's GPU question: on models where blanket autocast is safe, is the tuned policy within 5%
of autocast's step time, and at least 1.5x faster than FP32? Two models, random weights from
transformers configs (nothing downloaded):

* ``gpt2``: GPT-2 small (12 layers, width 768, 12 heads, vocab 50257), 8 x 1024 tokens, LM loss;
* ``resnet50``: ResNet-50 (bottleneck blocks [3, 4, 6, 3], widths 256..2048), 64 x 224 px, 1000 classes.

For each: tune a policy on the GPU (``autoprec.tune(model, batch)``, target = the model's device),
then time full training steps (forward, backward, GradScaler where FP16 is used, AdamW) of the four
variants, each on its own copy, interleaved (order rotated every round), synchronised around each
step, medians; plus each variant's peak memory and the bytes its dtype casts move per step (the
memory-bound work a per-layer policy can add over blanket autocast; the same on any device). FP32 runs with
torch's defaults, which are reported: matmuls without TF32, cuDNN convolutions with TF32.

Run:  python benchmarks/gpu_speed.py [--models gpt2 resnet50] [--rounds 20]
      python benchmarks/gpu_speed.py --device cpu --size tiny     # the same code path, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from contextlib import nullcontext

import torch

from _measure import amp_variant, cast_traffic, fp32_variant, median, policy_variant, step_times
from compare import machine

import autoprec
from autoprec.batch import batch_to

MODELS = ("gpt2", "resnet50")
VARIANTS = ("fp32", "amp-bf16", "amp-fp16", "autoprec")


def build(name: str, size: str, device: str, n_batches: int = 3) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """The model (FP32, train mode, dropout off) on ``device`` and ``n_batches`` batches for it."""
    import transformers as tf

    tiny = size == "tiny"
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "gpt2":
            layers, width, heads, vocab, (batch, seq) = (2, 64, 4, 256, (2, 32)) if tiny else \
                (12, 768, 12, 50257, (8, 1024))
            model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab,
                                                     n_positions=seq, resid_pdrop=0.0, embd_pdrop=0.0,
                                                     attn_pdrop=0.0, bos_token_id=vocab - 1,
                                                     eos_token_id=vocab - 1, loss_type="ForCausalLM",
                                                     use_cache=False))  # a training run keeps no KV cache
            batches = []
            for _ in range(n_batches):
                ids = torch.randint(0, vocab, (batch, seq), generator=g)
                batches.append({"input_ids": ids, "labels": ids.clone()})
        elif name == "resnet50":
            widths, depths, stem, (batch, px), labels = ([16, 32, 64, 128], [1, 1, 1, 1], 16, (4, 32), 10) if tiny \
                else ([256, 512, 1024, 2048], [3, 4, 6, 3], 64, (64, 224), 1000)
            model = tf.ResNetForImageClassification(tf.ResNetConfig(
                embedding_size=stem, hidden_sizes=widths, depths=depths, layer_type="bottleneck", num_labels=labels))
            batches = [{"pixel_values": torch.randn(batch, 3, px, px, generator=g),
                        "labels": torch.randint(0, labels, (batch,), generator=g)} for _ in range(n_batches)]
        else:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return model.float().train().to(device), [batch_to(b, torch.device(device)) for b in batches]


def peak_memory(model: torch.nn.Module, batch: Any, variant: Any) -> float | None:
    """GPU memory (MiB) one training step of ``variant`` (forward, backward, AdamW step, on a fresh copy)
    adds at its peak over what was allocated before it (the copy's weights included), or None on a CPU."""
    if not next(model.parameters()).is_cuda:
        return None
    m = copy.deepcopy(model)
    handle = variant.install(m) if variant.install is not None else None
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with (variant.context(m) if handle is None else nullcontext()):
            loss = m(**batch).loss
        loss.float().backward()
        opt.step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    finally:
        if handle is not None:
            handle.remove()
        del m, opt
        torch.cuda.empty_cache()


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model, batches = build(name, args.size, args.device)
    device_type = torch.device(args.device).type
    t0 = time.perf_counter()
    policy = autoprec.tune(model, batches[0], target="cuda", progress=False)
    tune_s = time.perf_counter() - t0
    variants = {"fp32": fp32_variant(), "amp-bf16": amp_variant("bf16", device_type),
                "amp-fp16": amp_variant("fp16", device_type),
                "autoprec": policy_variant("autoprec", policy, device=device_type)}
    samples = [(b, None) for b in batches]
    optimizer = lambda p: torch.optim.AdamW(p, lr=1e-4)  # noqa: E731
    times = step_times(model, samples, list(variants.values()), rounds=args.rounds, warmup=args.warmup,
                       optimizer=optimizer)
    base = median(times["fp32"])
    counts = {p: list(policy.assignment.values()).count(p) for p in ("fp32", "fp16", "bf16")}
    row: dict[str, Any] = {
        "model": name, "size": args.size, "params": sum(p.numel() for p in model.parameters()),
        "batch": {k: list(v.shape) for k, v in batches[0].items()},
        "timing": {n: {"median_s": median(t), "ratio": median(t) / base, "n": len(t)} for n, t in times.items()},
        "peak_mib": {n: peak_memory(model, batches[0], v) for n, v in variants.items()},
        "cast_mib": {n: cast_traffic(model, samples[0], v)[1] / 2**20 for n, v in variants.items()},
        "policy": {"tune_s": round(tune_s, 1), "low_fraction": round(policy.low_precision_fraction(), 4),
                   "counts": counts, "excluded": sorted(policy.excluded()),
                   "scaler": None if policy.scaler is None else policy.scaler.init_scale,
                   "verified": None if policy.verification is None else policy.verification.passed,
                   "passes": int(sum(policy.stats.get(k, 0) for k in ("probe_passes", "search_passes",
                                                                          "verify_passes")))},
    }
    t = {n: row["timing"][n]["median_s"] for n in VARIANTS}
    best_amp = min(t["amp-bf16"], t["amp-fp16"])
    row["policy_vs_autocast"] = t["autoprec"] / best_amp
    row["speedup_vs_fp32"] = t["fp32"] / t["autoprec"]
    row["meets_target"] = row["policy_vs_autocast"] <= 1.05 and row["speedup_vs_fp32"] >= 1.5
    return row


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"device: {meta['device']}; TF32 matmul {meta['tf32_matmul']}, cuDNN TF32 {meta['tf32_cudnn']}", "",
           "| model | params | FP32 ms/step | amp-bf16 | amp-fp16 | autoprec | policy / best autocast | "
           "FP32 / policy | target met | 16-bit FLOPs (policy) | cast MiB/step: autocast bf16 / policy | tune s |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: |"]
    for r in rows:
        tm = r["timing"]
        out.append(f"| {r['model']} | {r['params']:,} | {1e3 * tm['fp32']['median_s']:.1f} | "
                   f"{tm['amp-bf16']['ratio']:.2f} | {tm['amp-fp16']['ratio']:.2f} | {tm['autoprec']['ratio']:.2f} | "
                   f"{r['policy_vs_autocast']:.3f} | {r['speedup_vs_fp32']:.2f}x | "
                   f"{'yes' if r['meets_target'] else 'no'} | {100 * r['policy']['low_fraction']:.0f}% | "
                   f"{r['cast_mib']['amp-bf16']:.0f} / {r['cast_mib']['autoprec']:.0f} | {r['policy']['tune_s']} |")
    if any(v is not None for r in rows for v in r["peak_mib"].values()):
        out += ["", "| model | " + " | ".join(f"{v} peak MiB" for v in VARIANTS) + " |",
                "| --- |" + " ---: |" * len(VARIANTS)]
        for r in rows:
            out.append(f"| {r['model']} | " + " | ".join(f"{r['peak_mib'][v]:.0f}" for v in VARIANTS) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "gpu_speed.json"))
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this benchmark is for a GPU (use --device cpu --size tiny to check "
                         "that it runs)")
    warnings.filterwarnings("ignore")
    logging.getLogger("autoprec").setLevel(logging.WARNING)
    meta = {**machine(), "device": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda"
            else "cpu", "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32, "args": vars(args)}
    rows = []
    for name in args.models:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        rows.append(run_model(name, args))
    print(table(rows, meta))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
