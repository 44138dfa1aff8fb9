"""Load a saved policy and train with it: per-layer precision installed once, the tuned GradScaler.

A training script does not need autoprec's search: it loads the policy file that ``autoprec.tune``
wrote (here or on another machine) and installs it with ``policy.apply(model)`` before the loop, so
that backward (and any activation checkpointing's recomputation) runs under it too; the model may
then be compiled (``--compile``: ``torch.compile`` traces the policy's regions with no graph break).
``autoprec.load`` checks nothing about the model; ``policy.apply(model)`` does, and raises
``autoprec.PolicyError`` if the policy was tuned on a different model.

Without ``--policy`` this script first tunes a GPU policy for its model and saves it, so that it
runs on its own. A GPU policy uses FP16, so it comes with GradScaler settings; on a CPU its FP16
layers are emulated (FP16-rounded operands, FP32 accumulation), as GPU tensor cores compute.

Run:  python examples/train_with_policy.py [--small] [--compile] [--policy model.autoprec.json]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import autoprec


def make_model(dim: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 4 * dim),
                         nn.GELU(), nn.Linear(4 * dim, 10))


def batches(dim: int, n: int, size: int):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(dim, 10, generator=g)
    for _ in range(n):
        x = torch.randn(size, dim, generator=g)
        yield x, (x @ w).argmax(1)  # a learnable rule, so the loss goes down


def main(small: bool = False, policy_path: str | None = None, compile: bool = False) -> list[float]:
    dim, steps, size = (32, 30, 64) if small else (128, 300, 256)
    model = make_model(dim)

    if policy_path is None:  # make one: tune for a GPU on the first batch and save it
        x, y = next(batches(dim, 1, size))
        tuned = autoprec.tune(model, x, lambda out, b: F.cross_entropy(out, y), target="cuda",
                              verify_steps=5 if small else 20, progress=False)
        policy_path = os.path.join(tempfile.mkdtemp(), "mlp.autoprec.json")
        tuned.save(policy_path)

    # --- a training script starts here -------------------------------------------------------
    policy = autoprec.load(policy_path)
    scaler = policy.grad_scaler()  # torch.amp.GradScaler with the tuned settings, or None (no FP16 layer)
    setting = f"init_scale {scaler.get_scale():g}" if scaler is not None else "not needed"
    print(f"policy: {100 * policy.low_precision_fraction():.0f}% of matmul FLOPs in 16-bit, GradScaler {setting}")

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    handle = policy.apply(model)               # installed for the whole loop; handle.remove() takes it off
    step_model = torch.compile(model) if compile else model
    losses = []
    for step, (x, y) in enumerate(batches(dim, steps, size)):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(step_model(x), y)
        if scaler is not None:                 # the usual AMP recipe, with the tuned scale
            scaler.scale(loss).backward()
            scaler.step(opt)                   # skipped if the gradients overflowed
            scaler.update()
        else:
            loss.backward()
            opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:4d}: loss {loss.item():.4f}")
    handle.remove()
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="a reduced size that runs in seconds")
    parser.add_argument("--policy", default=None, help="a policy file saved by autoprec.tune for this model")
    parser.add_argument("--compile", action="store_true", help="train the model compiled by torch.compile")
    args = parser.parse_args()
    main(args.small, args.policy, args.compile)
