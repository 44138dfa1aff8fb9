"""Stage 5, apply: run a policy on a model, as a context or an installed handle.

Each layer of the policy becomes a precision region (see :mod:`autoprec.regions`): a unit module
through forward hooks, a functional op in a module's own code through a ``TorchFunctionMode``
active only while the model runs. Leaving the context or calling ``handle.remove()`` restores the
model exactly (no hook, no mode, no autocast state left behind), also after an exception.

Inside a caller's own ``torch.autocast``, the policy's layers run in the policy's precision (its
FP32 decisions are explicit, not left to either autocast op list); code outside those layers
follows the caller's autocast.

A policy with FP16 layers applied to a model on a CPU runs them emulated (FP16-rounded operands,
FP32 accumulation, FP16-rounded results), as GPU tensor cores compute; the CPU has no fast FP16
kernels.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .errors import FormatError
from .formats import cuda_bf16_native
from .policy import Policy
from .regions import Regions, unit_modules

__all__ = ["Handle", "apply", "autocast"]


class Handle:
    """An installed policy; ``remove()`` takes it off the model (idempotent)."""

    def __init__(self, regions: Regions) -> None:
        self._regions: Regions | None = regions

    def remove(self) -> None:
        """Remove every hook the policy installed."""
        if self._regions is not None:
            self._regions.remove()
            self._regions = None

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _device_type(model: nn.Module) -> str:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device.type
    return "cpu"


def apply(policy: Policy, model: nn.Module) -> Handle:
    """Install ``policy`` on ``model``; returns a :class:`Handle`.

    Example:
        >>> import torch, autoprec
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> p = autoprec.Policy(layers={"0": autoprec.LayerEntry("bf16")})
        >>> h = apply(p, m); _ = m(torch.ones(1, 4)); h.remove()
    """
    policy.check(model)
    device = _device_type(model)
    assignment = policy.assignment
    if device == "cuda" and "bf16" in assignment.values() and not cuda_bf16_native():
        raise FormatError("this CUDA device cannot run bf16, which the policy assigns: "
                          "tune again with dtypes=['fp16']")
    if device not in ("cpu", "cuda"):
        raise FormatError(f"autoprec runs policies on 'cpu' and 'cuda' devices, not {device!r}")
    regions = Regions(model, assignment, units=unit_modules(model), opaque=policy.opaque, device_type=device,
                      emulate_fp16=device == "cpu", handoff=policy.handoff)
    return Handle(regions.install())


@contextmanager
def autocast(policy: Policy, model: nn.Module) -> Iterator[Handle]:
    """Context manager form of :func:`apply`.

    Example:
        >>> import torch, autoprec
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> with autocast(autoprec.Policy(layers={"0": autoprec.LayerEntry("fp32")}), m):
        ...     m(torch.ones(1, 4)).dtype
        torch.float32
    """
    handle = apply(policy, model)
    try:
        yield handle
    finally:
        handle.remove()
