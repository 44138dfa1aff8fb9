"""Seeing which precision a Linear layer really ran in, from outside it (a forward hook).

With the policy's region inside the module's ``forward``, a hook sees the input before the cast and
the output handed back (FP32): the precision shows in the values. Each candidate is recomputed from
the hook's own input and weights; the one that reproduces the output bit for bit is the answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _affine(module: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, w, b)
    # transformers' Conv1D (GPT-2): weight (in, out), out = x @ w + b
    y = torch.addmm(b, x.reshape(-1, x.shape[-1]), w)
    return y.view(*x.shape[:-1], w.shape[-1])


def _fp16_emulated(module: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    r = lambda t: None if t is None else t.half().float()  # noqa: E731
    return _affine(module, r(x), r(w), r(b)).half().float()


def linear_precision(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` (emulated on the CPU): the precision that reproduces ``out``.

    ``module`` is an ``nn.Linear`` or a transformers ``Conv1D``.
    """
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        x, w, b = x.detach().float(), module.weight.detach().float(), module.bias
        b = None if b is None else b.detach().float()
        low = lambda t: None if t is None else t.bfloat16()  # noqa: E731
        candidates = {
            "fp32": lambda: _affine(module, x, w, b),
            "bf16": lambda: _affine(module, low(x), low(w), low(b)).float(),
            "fp16": lambda: _fp16_emulated(module, x, w, b),
        }
        found = [name for name, fn in candidates.items() if torch.equal(fn(), out.detach().float())]
    return found[0] if found else "unknown"


def record_precision(module: nn.Module) -> list[str]:
    """Register a hook on ``module``; the returned list gets the precision of each call."""
    seen: list[str] = []
    module.register_forward_hook(lambda m, a, o: seen.append(linear_precision(m, a[0], o)))
    return seen
