"""Counting matmul-class FLOPs by operand dtype as a model runs (a dispatch mode), not from a policy.

Each ATen op that torch's flop registry (with the formulas :mod:`autoprec.trace._flops` adds) prices is
counted under the dtype of its first floating operand, after autocast and autoprec's regions have
cast it: what the kernel really ran in. A GPU policy's 16-bit matmuls run on a CPU as FP32 kernels on
operands rounded to FP16/BF16 (what tensor cores compute, :func:`autoprec.runtime._casts.emulated`):
with ``emulated=True`` they count as the format they stand for, as on the GPU.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from autoprec.runtime._casts import emulating
from autoprec.trace import dispatch_flops

LOW = {torch.float16, torch.bfloat16}


class DtypeFlops(TorchDispatchMode):
    """``with DtypeFlops() as c: model(x)``; then ``c.flops`` is ``{dtype: FLOPs}``."""

    def __init__(self, emulated: bool = True) -> None:
        super().__init__()
        self.flops: Counter = Counter()
        self.emulated = emulated

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        n = dispatch_flops(func, args, kwargs, out)
        if n:
            dtype = next((t.dtype for t in pytree.tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
            if self.emulated and dtype == torch.float32 and emulating() is not None:
                dtype = emulating()
            self.flops[dtype] += n
        return out

    def low_fraction(self) -> float:
        """Share of the counted FLOPs whose operands were FP16 or BF16."""
        total = sum(self.flops.values())
        return sum(v for k, v in self.flops.items() if k in LOW) / total if total else 0.0


def measured_fraction(policy: Any, model: torch.nn.Module, run: Callable[[], Any]) -> float:
    """The 16-bit share of the forward matmul-class FLOPs of ``run()`` with ``policy`` on ``model``."""
    with torch.enable_grad(), policy.autocast(model), DtypeFlops() as counter:  # as in training
        run()
    return counter.low_fraction()
