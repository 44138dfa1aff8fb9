"""Baseline: the segment bisection of onnxconverter-common's ``auto_convert_mixed_precision``.

Re-implemented here for PyTorch leaf modules on top of autoprec's per-layer policy objects (it is
not a copy of that code). The algorithm:

1. all leaf modules, in ``named_modules()`` order, form one segment;
2. repeatedly take the largest segment that is neither *good* nor *bad* and validate the model
   with that segment plus every good segment in 16-bit, all else FP32;
3. if it validates, the segment is good; if not, a single-layer segment is bad (stays FP32) and a
   longer one is split in half (first half ``size // 2``);
4. stop when no segment is left open; the good segments run in 16-bit.

Validation is one forward+backward on the tuning batch, compared with an FP32 reference on the same
batch: relative loss error and relative L2 gradient error within autoprec's own bounds (by default
``tolerance=0.01``, ``grad_tolerance=0.05``), with finite loss and gradients. An FP16 attempt
computes its gradients at a default ``GradScaler``'s initial scale (2^16), as it would be trained.

Differences from the ONNX tool, on purpose: the unit is a leaf ``nn.Module`` (an ONNX node is
finer: functional ops between modules, such as an attention ``q @ k^T`` written in a module's own
code, are not leaves and stay in whatever dtype reaches them, which is FP32 between policy
regions); the validation compares losses and gradients, not outputs; the FP32 reference is
validated too (a sanity check the ONNX tool has commented out).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from _measure import Sample, Variant, forward_loss, grads_of, policy_variant, rel
from torch import nn

import autoprec

__all__ = ["BisectionResult", "bisect", "leaf_modules", "policy_for"]


def leaf_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules without children, in ``named_modules()`` order."""
    return [name for name, mod in model.named_modules() if name and next(mod.children(), None) is None]


def policy_for(leaves: list[str], low: set[str], dtype: str, target: str = "cuda") -> autoprec.Policy:
    """A bare policy (no ``modules=``: the model check is skipped): ``low`` in ``dtype``, the rest FP32."""
    return autoprec.Policy(layers={k: autoprec.LayerEntry(dtype if k in low else "fp32") for k in leaves},
                           target=target)


@dataclass
class _Segment:
    start: int
    size: int
    good: bool = False
    bad: bool = False


@dataclass
class BisectionResult:
    policy: autoprec.Policy
    validations: int              # forward+backward passes spent validating (the FP32 reference not counted)
    seconds: float
    fp32_layers: list[str]
    passed_final: bool
    log: list[tuple[int, int, bool]] = field(default_factory=list)   # (segment start, size, passed)


def _run(model: nn.Module, sample: Sample, variant: Variant, scale: float) -> tuple[float, torch.Tensor]:
    m = copy.deepcopy(model)
    loss = forward_loss(m, sample, variant)
    (loss.float() * scale).backward()
    return float(loss.detach().float()), grads_of(m, scale)


def bisect(model: nn.Module, sample: Sample, *, dtype: str = "fp16", tolerance: float = 0.01,
           grad_tolerance: float = 0.05, target: str = "cuda", max_validations: Optional[int] = None
           ) -> BisectionResult:
    """Run the segment bisection on ``model``'s leaf modules; returns the policy and its cost."""
    started = time.perf_counter()
    leaves = leaf_modules(model)
    fp32 = Variant("fp32")
    ref_loss, ref_grads = _run(model, sample, fp32, 1.0)
    ref_norm = float(ref_grads.norm()) or 1e-30
    scale = 2.0 ** 16 if dtype == "fp16" else 1.0
    validations = 0
    log: list[tuple[int, int, bool]] = []

    def validate(low: set[str]) -> bool:
        nonlocal validations
        validations += 1
        policy = policy_for(leaves, low, dtype, target)
        loss, grads = _run(model, sample, policy_variant("try", policy), scale if low else 1.0)
        if not math.isfinite(loss) or not bool(torch.isfinite(grads).all()):
            return False
        gerr = float((grads - ref_grads).norm()) / ref_norm
        return rel(loss, ref_loss) <= tolerance and gerr <= grad_tolerance

    segments = [_Segment(0, len(leaves))]

    def names(segs: list[_Segment]) -> set[str]:
        return {leaves[i] for s in segs for i in range(s.start, s.start + s.size)}

    while True:
        open_ = [s for s in segments if not s.good and not s.bad]
        if not open_ or (max_validations is not None and validations >= max_validations):
            break
        seg = max(open_, key=lambda s: s.size)  # the first of the largest, as the ONNX tool picks
        ok = validate(names([s for s in segments if s.good] + [seg]))
        log.append((seg.start, seg.size, ok))
        if ok:
            seg.good = True
        elif seg.size == 1:
            seg.bad = True
        else:
            half = seg.size // 2
            i = segments.index(seg)
            segments[i:i + 1] = [_Segment(seg.start, half), _Segment(seg.start + half, seg.size - half)]
    low = names([s for s in segments if s.good])
    final_ok = validate(low) if low else True
    policy = policy_for(leaves, low, dtype, target)
    return BisectionResult(policy, validations, time.perf_counter() - started,
                           [k for k in leaves if k not in low], final_ok, log)
