"""Models and settings for the FP8 tests: a stack with one Linear behind massive activations, a roofline whose FP8
casts cost next to nothing (FP8 pays everywhere, so only the error decides), and tune with FP8 on them."""

from __future__ import annotations

import torch
from torch import nn

import autoprec
from autoprec.device._estimates import roofline

GAIN = 2.0 ** 16  # a power of two: exact in BF16, so only FP8's scaling differs between BF16 and FP8 passes
WIDTH = 256


class Massive(nn.Module):
    """Two channels near ``GAIN`` in every row, as LLMs' massive activations are."""

    def __init__(self, width: int) -> None:
        super().__init__()
        offset = torch.zeros(width)
        offset[[3, 17]] = GAIN
        self.register_buffer("offset", offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


def outlier_mlp() -> nn.Sequential:
    """``5`` reads the massive channels through weights ``1/GAIN`` as small: an FP8 scale sized for them leaves its
    other channels a few FP8 steps (the probe's test model, wider). ``5`` is frozen: trained, a step of those tiny
    weights would move its output by ``GAIN`` times the step, in FP32 as much as in any policy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU(), Massive(WIDTH),
                          nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, 64))
    with torch.no_grad():
        model[5].weight[:, [3, 17]] /= GAIN
    model[5].requires_grad_(False)
    return model


def fp8_loss(out, batch):
    return (out.float() - batch).square().mean()


def cheap_casts():
    """A GPU roofline whose FP8 casts cost next to nothing: FP8 pays at every shape, so only the error decides."""
    return roofline(fp32_flops=19.5e12, low_speedup=8.0, fp8_speedup=16.0, bandwidth=1e18, launch=0.0, region=0.0,
                    device="roofline with free casts")


def tune_fp8(model, profile, batch=None, loss_fn=fp8_loss, **kw):
    """tune with FP8 on a 64 x 64 batch, nothing held out unless ``held_out`` says, 3 verification steps."""
    kw = {"held_out": 0, "verify_steps": 3, **kw}
    batch = torch.randn(64, 64) if batch is None else batch
    return autoprec.tune(model, batch, loss_fn, dtypes=["bf16", "fp8"], target="cuda", profile=profile,
                         progress=False, n_trials=4, **kw)
