"""Stage 5, apply: run a policy on a model, installed once or as a context.

Each layer of the policy becomes a precision region (see :mod:`autoprec.runtime`): a unit module's
class is swapped for a subclass whose ``forward`` runs in the region; a functional op in a module's
own code gets its region from a ``TorchFunctionMode`` that module enters for its own call. Removing
the policy (``handle.remove()``, or leaving the context) restores every class, also after an
exception. ``torch.compile`` traces the regions with no graph break and recompiles when a policy
is applied or removed; activation checkpointing recomputes in the same precision as the forward
ran (install the policy for the whole training loop: backward must run while it is installed).

The model may be wrapped (``torch.compile``, DDP, FSDP1/FSDP2, activation-checkpoint wrappers):
policy keys are matched against the canonical names (see :mod:`autoprec.core._modules`).

Inside a caller's own ``torch.autocast``, the policy's layers run in the policy's precision (its
FP32 decisions are explicit, not left to either autocast op list); code outside those layers
follows the caller's autocast.

A policy with FP16 layers applied to a model on a CPU runs them emulated (FP16-rounded operands,
FP32 accumulation, FP16-rounded results), as GPU tensor cores compute; the CPU has no fast FP16
kernels. A policy for CUDA applied on a CPU runs its 16-bit layers as CUDA autocast would (its FP32
ops in FP32, FFTs as cuFFT: see :mod:`autoprec.runtime._emulation`), the way it was tuned and verified there.

Installing is O(modules) the first time a policy meets a model; after that the plan is cached
(per model, per policy), so entering and leaving ``policy.autocast(model)`` every step costs a
class swap per patched module.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..core._formats import cuda_bf16_native
from ..core._modules import canonical_modules, leaves
from ..errors import FormatError, PolicyError
from ..policy._policy import Policy, check_modules
from ._runtime import Patches, Runtime

__all__ = ["Handle", "apply", "autocast", "watched"]


class Handle:
    """An installed policy; ``remove()`` takes it off the model (idempotent)."""

    def __init__(self, patches: Patches) -> None:
        self._patches: Patches | None = patches

    def remove(self) -> None:
        """Take the policy off the model: every swapped class back to its own."""
        if self._patches is not None:
            self._patches.remove()
            self._patches = None

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass(eq=False)
class _Cached:
    policy: Policy
    device: str
    plan: list
    links: list[tuple[Any, str, nn.Module]]


_PLANS: "weakref.WeakKeyDictionary[nn.Module, _Cached]" = weakref.WeakKeyDictionary()


def _device_type(model: nn.Module) -> str:
    for t in model.parameters():
        return t.device.type
    for t in model.buffers():
        return t.device.type
    return "cpu"


def _still_in_place(cached: _Cached) -> bool:
    return all(holder is None or holder._modules.get(name) is child for holder, name, child in cached.links)


def _plan(policy: Policy, model: nn.Module, device: str) -> list:
    cached = _PLANS.get(model)
    if cached is not None and cached.policy is policy and cached.device == device and _still_in_place(cached):
        return cached.plan
    links: dict[str, tuple[Any, str, nn.Module]] = {}
    modules = canonical_modules(model, links)  # the one walk of the model
    check_modules(policy, modules)
    runtime = Runtime(model, policy.assignment, units=leaves(modules), opaque=policy.opaque, device_type=device,
                      emulate_fp16=device == "cpu", emulate_cuda=device == "cpu" and policy.target == "cuda",
                      handoff=policy.handoff, modules=modules, recipes=policy.recipes)
    plan = runtime.plan()
    paths = [spec.path for _, spec in plan]
    _PLANS[model] = _Cached(policy, device, plan, [links[p] for p in paths])
    return plan


def apply(policy: Policy, model: nn.Module) -> Handle:
    """Install ``policy`` on ``model`` until ``handle.remove()``; returns a :class:`Handle`.

    This is the way to train: install once before the loop, so that backward (and the
    recomputation of activation checkpointing) runs while the policy is installed.

    Example:
        >>> import torch, autoprec
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> p = autoprec.Policy(layers={"0": autoprec.LayerEntry("bf16")})
        >>> h = apply(p, m)
        >>> m(torch.ones(1, 4)).dtype, type(m[0]).__name__
        (torch.float32, 'Linear')
        >>> h.remove()
    """
    return Handle(Patches(_plan(policy, model, _checked(policy, model))))


def watched(policy: Policy, model: nn.Module, observers: Mapping[str, Callable[[Any], None]]) -> Handle:
    """:func:`apply`, with ``observers[layer]`` told of each listed layer's raw 16-bit output: a unit's
    (``module.path``) at the end of its region, an op entry's (``module.path::op``) as its region
    returns, once per call (the hook of :mod:`autoprec.watch`; the other layers run as :func:`apply` runs them).

    Example:
        >>> import torch, autoprec
        >>> m, seen = torch.nn.Sequential(torch.nn.Linear(4, 4)), []
        >>> p = autoprec.Policy(layers={"0": autoprec.LayerEntry("bf16")})
        >>> h = watched(p, m, {"0": lambda out: seen.append(out.dtype)})
        >>> _ = m(torch.ones(1, 4)); h.remove(); seen
        [torch.bfloat16]
    """
    plan = _plan(policy, model, _checked(policy, model))
    return Handle(Patches([(mod, _observed(spec, observers)) for mod, spec in plan]))


def _observed(spec: Any, observers: Mapping[str, Callable[[Any], None]]) -> Any:
    """``spec`` with the observers of its unit, or of the op entries in its own code."""
    if spec.unit and spec.path in observers:
        return replace(spec, observe=observers[spec.path])
    ops = {k: observers[k] for k in spec.entries or () if k in observers}
    return replace(spec, op_observe=ops) if ops else spec


def _checked(policy: Policy, model: nn.Module) -> str:
    """The device type a policy will run on, once the policy, the model and the device are checked."""
    if not isinstance(policy, Policy):
        raise PolicyError(f"apply takes an autoprec.Policy, got {type(policy).__name__}: "
                          "use autoprec.load('policy.json') or autoprec.tune(...)")
    if not isinstance(model, nn.Module):
        raise PolicyError(f"a policy applies to a torch.nn.Module, got {type(model).__name__}")
    device = _device_type(model)
    if device not in ("cpu", "cuda"):
        raise FormatError(f"autoprec runs policies on 'cpu' and 'cuda' devices, not {device!r}: "
                          "move the model to one of them first")
    on = next((t.device for t in model.parameters()), None)  # the model's CUDA device, not the current one
    if device == "cuda" and "bf16" in policy.assignment.values() and not cuda_bf16_native(on):
        raise FormatError(f"this CUDA device ({torch.cuda.get_device_name(on)}) cannot run bf16, which the policy "
                          "assigns: tune again with dtypes=['fp16']")
    return device


@contextmanager
def autocast(policy: Policy, model: nn.Module) -> Iterator[Handle]:
    """Context manager form of :func:`apply`: the policy runs inside the block only.

    Backward run after the block runs without the policy; with activation checkpointing its
    recomputation would too, so train with :func:`apply` (or run backward inside the block).

    Example:
        >>> import torch, autoprec
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> with autocast(autoprec.Policy(layers={"0": autoprec.LayerEntry("bf16")}), m):
        ...     m(torch.ones(1, 4)).dtype
        torch.float32
    """
    handle = apply(policy, model)
    try:
        yield handle
    finally:
        handle.remove()

