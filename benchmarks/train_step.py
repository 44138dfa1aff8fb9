"""What pricing the real training step changes: GPT-2 tuned for CUDA on this CPU, at the tuning batch's shapes and
with ``train_batch_size``.

GPT-2 from a transformers config (``--shape blocks x width``, default 12 x 768: GPT-2 small; random init, dropout
off; ``--vocab`` tokens, GPT-2's 50257 by default), a tuning batch of 2 sequences of 128 tokens, ``target="cuda"`` priced by the built-in H100 estimate (strict
FP32 unless TF32 is allowed), BF16 (``--dtypes``), held-out check off, ``--verify-steps`` steps. Tuned twice:

* ``as given``: the layers priced at 2 x 128 tokens;
* ``train_batch_size=N`` (``--train-rows``, default 64): priced at 64 x 128 = 8192 tokens, the GEMM shapes of an
  8 x 1024-token step (autoprec scales the batch dimension only; attention's own FLOPs grow with the sequence
  too, which this leaves out).

Per run: the 16-bit share of matmul FLOPs, the layers in BF16 and kept for no gain, the modelled step ratio
(policy / FP32, at the priced shapes), tuning seconds, and whether tune warned that the tuning shapes are
launch-bound. Writes ``benchmarks/results/train_step.json``.

Run: ``python benchmarks/train_step.py [--shape 12x768] [--train-rows 64] [--verify-steps 2]`` (about 35 min on 2 cores
here, with the test suite beside it, for GPT-2 small); ``--shape 2x64 --verify-steps 0`` for a quick look.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import write_json  # noqa: E402
from scaling import gpt2  # noqa: E402  (the GPT-2 of scaling.py --gpt2: random init, 2 x 128 tokens)

import autoprec  # noqa: E402
from autoprec.errors import DeviceWarning  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def run(model: torch.nn.Module, batch: Any, train_rows: int | None, dtypes: str, verify_steps: int) -> dict[str, Any]:
    """One tune: its figures."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        policy = autoprec.tune(model, batch, target="cuda", dtypes=dtypes, progress=False, held_out=0,
                               verify_steps=verify_steps, train_batch_size=train_rows)
    heavy = [e for e in policy.layers.values() if e.flops > 0]
    return {"train_batch_size": train_rows, "low_fraction": policy.low_precision_fraction(),
            "matmul_layers": len(heavy), "cast": sum(e.precision != "fp32" for e in heavy),
            "no_gain": sum(e.reason == "no gain" for e in heavy),
            "modelled_cost_ratio": policy.stats["modelled_cost_ratio"], "device": policy.stats["device"],
            "tune_s": round(time.perf_counter() - t0, 1),
            "warned": [str(w.message) for w in seen if issubclass(w.category, DeviceWarning)]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="12x768")
    ap.add_argument("--train-rows", type=int, default=64)
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--vocab", type=int, default=50257, help="vocabulary size (GPT-2's by default; small for tests)")
    ap.add_argument("--verify-steps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "train_step.json"))
    args = ap.parse_args(argv)
    pinned = os.environ.pop("AUTOPREC_PROFILE", None)  # the default path: the built-in estimate for CUDA
    try:
        model, batch = gpt2(args.shape, args.vocab)
        rows = [run(model, batch, None, args.dtypes, args.verify_steps),
                run(model, batch, args.train_rows, args.dtypes, args.verify_steps)]
    finally:
        if pinned is not None:
            os.environ["AUTOPREC_PROFILE"] = pinned
    print(f"GPT-2 {args.shape}, tuned for CUDA on this CPU ({rows[0]['device']}), tuning batch 2 x 128 tokens\n")
    print("| priced at | matmul FLOPs in 16-bit | matmul layers cast | kept FP32, no gain | modelled step / FP32 | "
          "tune s | warned |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        at = "2 x 128 tokens (as given)" if r["train_batch_size"] is None else \
            f"train_batch_size={r['train_batch_size']} ({128 * r['train_batch_size']} tokens)"
        print(f"| {at} | {100 * r['low_fraction']:.1f}% | {r['cast']} of {r['matmul_layers']} | {r['no_gain']} | "
              f"{r['modelled_cost_ratio']:.3f} | {r['tune_s']} | {'yes' if r['warned'] else 'no'} |")
    result = {"shape": args.shape, "vocab": args.vocab, "dtypes": args.dtypes, "verify_steps": args.verify_steps, "rows": rows,
              "torch": torch.__version__, "cores": os.cpu_count()}
    return write_json(args.out, result)


if __name__ == "__main__":
    main()
