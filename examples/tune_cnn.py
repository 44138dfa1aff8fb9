"""Tune a small convolutional network for this machine's CPU and read what autoprec decided.

The default target here is the CPU, and its 16-bit candidate is BF16: ``tune`` calibrates this
CPU and gives a layer BF16 only where it measures faster than FP32, casts included (on a CPU
without fast BF16 every layer stays FP32, and the report says why). Pass
``target="cuda"`` to ``autoprec.tune`` for a GPU policy (FP16 and BF16, with a tuned GradScaler).

Run:  python examples/tune_cnn.py [--small]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import autoprec


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages with a residual block, global average pooling and a classifier."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, width)
        self.down1 = conv_bn(width, 2 * width, stride=2)
        self.res = nn.Sequential(conv_bn(2 * width, 2 * width), conv_bn(2 * width, 2 * width))
        self.down2 = conv_bn(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down1(self.stem(x))
        x = x + self.res(x)
        x = self.down2(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def main(small: bool = False) -> autoprec.Policy:
    torch.manual_seed(0)
    width, px, batch = (16, 32, 16) if small else (32, 64, 32)
    model = SmallCNN(width)
    images = torch.randn(batch, 3, px, px)
    labels = torch.randint(0, 10, (batch,))

    def loss_fn(logits: torch.Tensor, batch) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    # tune on one batch; autoprec works on a private copy, the model is left as it was
    policy = autoprec.tune(model, images, loss_fn, verify_steps=5 if small else 20, progress=not small)

    # what ran where, and why: the Markdown report names every layer kept in FP32 with its evidence
    print(policy.report())
    for name, entry in policy.layers.items():
        if entry.flops:
            print(f"{name:>12}: {entry.precision:<5} {entry.reason}")
    print(f"matmul/conv FLOPs in 16-bit: {100 * policy.low_precision_fraction():.0f}%")

    # train a few steps with it: the policy is installed on the model until handle.remove()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with policy.apply(model):  # a Handle is a context manager too
        for step in range(3):
            opt.zero_grad()
            loss = loss_fn(model(images), images)
            loss.backward()  # no GradScaler: a CPU policy uses BF16, which needs none
            opt.step()
            print(f"step {step}: loss {loss.item():.4f}")
    return policy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="a reduced size that runs in seconds")
    main(parser.parse_args().small)
