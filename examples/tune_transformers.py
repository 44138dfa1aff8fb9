"""Tune a Hugging Face transformers model (random weights from a small config) and save its policy.

Nothing is downloaded: the model is built from a config. The batch is the dict the model takes
(``input_ids`` and ``labels``), and since the model returns its own loss, no ``loss_fn`` is needed.
The saved policy is plain JSON keyed by the model's own module names
(``model.layers.0.self_attn.q_proj``), so it can be read, diffed and edited, and loaded onto the
same architecture later with ``autoprec.load``.

Run:  python examples/tune_transformers.py [--small] [--out llama.autoprec.json]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import autoprec


def make_model(small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64 if small else 256, intermediate_size=128 if small else 688,
        num_hidden_layers=1 if small else 4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256 if small else 1024, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def main(small: bool = False, out: str | None = None) -> autoprec.Policy:
    model = make_model(small)
    batch_size, seq = (2, 16) if small else (4, 64)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq))
    batch = {"input_ids": ids, "labels": ids}  # causal LM: the model shifts the labels itself

    # target="cuda": a policy for a GPU (FP16 and BF16 allowed, GradScaler tuned). It is tuned here on
    # the CPU, where FP16 matmuls are emulated as tensor cores run them. Leave target out for a CPU policy.
    policy = autoprec.tune(model, batch, target="cuda", verify_steps=5 if small else 20, progress=not small)

    counts = {p: list(policy.assignment.values()).count(p) for p in ("fp32", "fp16", "bf16")}
    print(f"{len(policy.layers)} layers: {counts}; "
          f"{100 * policy.low_precision_fraction():.0f}% of matmul FLOPs in 16-bit")
    for name, entry in policy.excluded().items():
        print(f"kept in FP32: {name} ({entry.reason}): {entry.detail}")
    scaler = policy.grad_scaler()
    print("GradScaler:", None if scaler is None else f"init_scale {scaler.get_scale():g}")

    path = out or os.path.join(tempfile.mkdtemp(), "llama.autoprec.json")
    policy.save(path)
    print(f"saved {path}")
    assert autoprec.load(path) == policy  # the file round-trips exactly
    return policy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="a reduced size that runs in seconds")
    parser.add_argument("--out", default=None, help="where to save the policy (default: a temporary folder)")
    args = parser.parse_args()
    main(args.small, args.out)
