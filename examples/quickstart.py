"""Tune a small transformer block, read the report, save the policy and train with it.

Run:  python examples/quickstart.py [--small]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import autoprec


class Block(nn.Module):
    """A pre-LN transformer block (LayerNorm, q/k/v Linears feeding SDPA, GELU MLP)."""

    def __init__(self, dim: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(att)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def main(small: bool = False) -> autoprec.Policy:
    torch.manual_seed(0)
    dim = 64 if small else 256
    model = nn.Sequential(Block(dim), Block(dim), nn.Linear(dim, 10))
    x = torch.randn(8, 64, dim)
    y = torch.randint(0, 10, (8, 64))

    def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.flatten(0, 1), y.flatten())

    # 1. tune: the policy is for this machine's CPU (BF16); pass target="cuda" for a GPU policy
    policy = autoprec.tune(model, x, loss_fn, verify_steps=5 if small else 20, progress=not small)
    print(policy.report())

    # 2. save and load: plain JSON keyed by the model's own layer names
    path = os.path.join(tempfile.mkdtemp(), "block.autoprec.json")
    policy.save(path)
    policy = autoprec.load(path)

    # 3. train with it: installed once for the loop, the tuned GradScaler if FP16 is used
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = policy.grad_scaler()
    handle = policy.apply(model)
    for step in range(3):
        opt.zero_grad()
        loss = loss_fn(model(x), x)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        print(f"step {step}: loss {loss.item():.4f}")
    handle.remove()
    return policy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="a reduced size that runs in seconds")
    main(parser.parse_args().small)
