"""Measured against modelled: the training step of the tuned policy over FP32's, as ``tune`` reports it.

For each model, ``autoprec.tune`` (CPU target, timing on) times real training steps on the tuning
batch: FP32, blanket BF16 autocast and the policy, interleaved, medians (``policy.speed``); beside
it stands the device profile's modelled ratio for the same policy. The table shows both, so the
profile's error on each model is visible, with what the step race chose and the blanket verdict.

Models: ``bert-128`` (BertForMaskedLM, hidden 128, 2 layers, 2 heads, intermediate 512, vocab 1000,
batch 8 x 64 tokens), ``gpt2-4l`` (GPT2LMHeadModel, 4 layers, width 256, 4 heads, the full 50257-token
vocabulary, batch 4 x 64), and any of ``_zoo``'s transformers models (``gpt2``, ``bert``, ... at its
``large`` size).

Run:  python benchmarks/step_ratio.py [--models bert-128 gpt2-4l] [--verify-steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _zoo
from _measure import write_json

import autoprec
from autoprec.report import speed_lines

HERE = os.path.dirname(os.path.abspath(__file__))


def _lm(name: str) -> tuple[Any, Any]:
    """The issue's small BERT and 4-layer GPT-2, with random weights and a token batch that carries labels."""
    import torch
    import transformers as tf

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "bert-128":
            cfg = tf.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                                vocab_size=1000, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            model, shape = tf.BertForMaskedLM(cfg), (8, 64)
        else:
            cfg = tf.GPT2Config(n_layer=4, n_embd=256, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            model, shape = tf.GPT2LMHeadModel(cfg), (4, 64)
    ids = torch.randint(0, cfg.vocab_size, shape, generator=gen)
    return model.float().train(), {"input_ids": ids, "labels": ids}


def run(name: str, verify_steps: int) -> dict[str, Any]:
    if name in ("bert-128", "gpt2-4l"):
        model, batch, loss_fn = *_lm(name), None
    else:
        spec = _zoo.build(name, "large", heldout=0, train=1)
        model, (batch, loss_fn) = spec.model, spec.tune
    t0 = time.perf_counter()
    policy = autoprec.tune(model, batch, loss_fn, target="cpu", progress=False, verify_steps=verify_steps,
                           measure_speed=True)
    s = policy.speed
    ms = {k: round(1e3 * s.median(k), 2) for k in s.seconds}
    return {"model": name, "tune_seconds": round(time.perf_counter() - t0, 1), "step_ms": ms,
            "spread_ms": {k: round(1e3 * s.spread(k), 2) for k in s.seconds},
            "rounds": len(s.seconds.get("policy", ())),
            "measured_ratio": round(s.ratio("policy", "fp32"), 3) if "policy" in s.seconds else None,
            "modelled_ratio": round(s.modelled, 3), "profile": policy.stats.get("profile"), "chosen": s.chosen,
            "blanket": dict(s.blanket), "low_precision_fraction": round(policy.low_precision_fraction(), 3),
            "speed_lines": speed_lines(policy)}


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| model | FP32 ms | policy ms | autocast bf16 ms | policy/FP32 measured | modelled | race chose | "
           "16-bit FLOPs | blanket bf16 |",
           "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for r in rows:
        ms = r["step_ms"]
        out.append(f"| {r['model']} | {ms.get('fp32', '-')} | {ms.get('policy', '-')} | "
                   f"{ms.get('autocast bf16', '-')} | "
                   f"{r['measured_ratio']} | {r['modelled_ratio']} | {r['chosen']} | "
                   f"{100 * r['low_precision_fraction']:.0f}% | {r['blanket'].get('bf16') or 'safe'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["bert-128", "gpt2-4l"])
    p.add_argument("--verify-steps", type=int, default=4, help="verification steps per run (tune's default is 20)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tuning and timing)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "step_ratio.json"))
    args = p.parse_args(argv)
    logging.getLogger("autoprec").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    from compare import machine

    from autoprec.device import machine as device_of

    cpu, capability = device_of(torch.device("cpu"))
    rows = []
    for name in args.models:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        rows.append(run(name, args.verify_steps))
        write_json(args.out, {"meta": {**machine(), "capability": capability, "threads": args.threads},
                              "results": rows})
    print(f"CPU: {cpu} ({capability}), {args.threads} thread(s)")
    print(table(rows))
    for r in rows:
        print(f"{r['model']}: {r['speed_lines'][0]}")
    return rows


if __name__ == "__main__":
    main()
