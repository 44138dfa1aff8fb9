"""Stage 6, verify: short training runs, FP32 against the policy, from identical weights and data.

Both runs start from copies of the same weights, see the same batches in the same order with the
same RNG seed per step (dropout masks agree), and use the same optimizer. The policy run uses its
GradScaler when it has FP16 layers. A policy passes when its losses stay finite, no run of
``max_skip_run`` or more scaler steps is skipped, and ``|loss_policy - loss_fp32| / |loss_fp32 at
step 0|`` stays within the bound at every step.

The default optimizer is Adam with ``eps=1e-30``: it is scale-invariant, so gradients that
underflow to zero (and stall a parameter) show in the curve however small the loss is.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .batch import LossFn, call_model, compute_loss
from .policy import Verification
from .regions import Regions
from .search import Decision

__all__ = ["OptimizerFactory", "VerifyResult", "default_optimizer", "train_curve", "compare", "verify"]

log = logging.getLogger("autoprec.verify")

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def default_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam(lr=1e-3, eps=1e-30): scale-invariant, so underflowed (zero) gradients show.

    Example:
        >>> type(default_optimizer(torch.nn.Linear(2, 2).parameters())).__name__
        'Adam'
    """
    return torch.optim.Adam(params, lr=1e-3, eps=1e-30)


def train_curve(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None, *, steps: int,
                assignment: Mapping[str, str] | None, units: Iterable[str], opaque: Iterable[str],
                device_type: str, emulate_fp16: bool, scaler: torch.amp.GradScaler | None,
                optimizer: OptimizerFactory, seed: int,
                on_step: Callable[[], None] | None = None) -> tuple[list[float], int, int]:
    """Train a private copy of ``model`` for ``steps`` steps; returns (losses, skipped, longest skip run).

    ``assignment=None`` trains in plain FP32. The loss recorded at a step is the one computed
    before that step's update. The run stops early at the first non-finite loss without a scaler.
    """
    model = copy.deepcopy(model)
    opt = optimizer([p for p in model.parameters() if p.requires_grad])
    regions = None
    if assignment:
        regions = Regions(model, assignment, units=units, opaque=opaque, device_type=device_type,
                          emulate_fp16=emulate_fp16).install()
    losses: list[float] = []
    skipped = run = longest = 0
    devices = [torch.cuda.current_device()] if device_type == "cuda" and torch.cuda.is_available() else []
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            opt.zero_grad(set_to_none=True)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed + step)
                loss = compute_loss(call_model(model, batch), batch, loss_fn)
            losses.append(float(loss.detach()))
            if scaler is not None:
                before = scaler.get_scale()
                scaler.scale(loss.float()).backward()
                scaler.step(opt)
                scaler.update()
                if scaler.get_scale() < before:
                    skipped += 1
                    run += 1
                    longest = max(longest, run)
                else:
                    run = 0
            else:
                if not math.isfinite(losses[-1]):
                    break
                loss.float().backward()
                opt.step()
            if on_step is not None:
                on_step()
    finally:
        if regions is not None:
            regions.remove()
    return losses, skipped, longest


def compare(fp32: Sequence[float], policy: Sequence[float]) -> float:
    """Largest ``|policy - fp32|`` over the steps, relative to the FP32 loss at step 0.

    Example:
        >>> compare([2.0, 1.0], [2.0, 1.1])
        0.05
    """
    if len(policy) < len(fp32) or not all(math.isfinite(x) for x in policy):
        return math.inf
    base = max(abs(fp32[0]), 1e-12)
    return round(max(abs(a - b) for a, b in zip(fp32, policy)) / base, 12)


@dataclass(frozen=True)
class VerifyResult:
    """The verified (possibly backed-off) decisions, the verdict, the loss scale and the passes used."""

    decisions: dict[str, Decision]
    verification: Verification
    scale: float
    passes: int


def verify(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None, decisions: Mapping[str, Decision],
           order: Sequence[str], *, steps: int, bound: float, scale: float, units: Iterable[str],
           opaque: Iterable[str], device_type: str, emulate_fp16: bool, optimizer: OptimizerFactory, seed: int,
           max_skip_run: int = 3, max_rounds: int = 8, on_step: Callable[[], None] | None = None) -> VerifyResult:
    """Train FP32 and the policy side by side; back off until the policy passes.

    A failing round moves the most sensitive quarter of the cast layers (the end of ``order``,
    which the search sorted least sensitive first) to FP32, and divides the loss scale by 16 when
    a run of skipped steps was the failure. With nothing left cast the policy is FP32 wherever it
    matters, and that round ends the loop.
    """
    units, opaque = list(units), list(opaque)
    decisions = dict(decisions)
    run = dict(units=units, opaque=opaque, device_type=device_type, emulate_fp16=emulate_fp16,
               optimizer=optimizer, seed=seed, on_step=on_step)
    fp32, _, _ = train_curve(model, batches, loss_fn, steps=steps, assignment=None, scaler=None, **run)
    passes = steps
    note = ""
    for rounds in range(1, max_rounds + 1):
        assignment = {key: d.precision for key, d in decisions.items()}
        fp16 = "fp16" in assignment.values()
        scaler = torch.amp.GradScaler(device_type, init_scale=scale) if fp16 else None
        losses, skipped, longest = train_curve(model, batches, loss_fn, steps=steps, assignment=assignment,
                                               scaler=scaler, **run)
        passes += steps
        gap = compare(fp32, losses)
        passed = gap <= bound and longest < max_skip_run
        verdict = Verification(passed=passed, steps=steps, fp32_losses=tuple(fp32), policy_losses=tuple(losses),
                               max_gap=gap, bound=bound, skipped_steps=skipped, longest_skip_run=longest,
                               rounds=rounds, note=note)
        cast = [key for key in order if decisions[key].reason == "cast"]
        if passed or not cast:
            break
        drop = cast[-max(1, len(cast) // 4):]
        for key in drop:
            d = decisions[key]
            decisions[key] = dataclasses.replace(
                d, precision="fp32", reason="verification back-off", excluded=True,
                detail=f"{d.detail}; moved to FP32 after verification round {rounds} "
                       f"(loss gap {gap:.3g}, longest skip run {longest})")
        if longest >= max_skip_run and fp16:
            scale = max(1.0, scale / 16)
        note = f"backed off {len(drop)} layer(s) after round {rounds}"
        log.info("verification round %d failed (gap %.3g, skip run %d): %s", rounds, gap, longest, note)
    return VerifyResult(decisions=decisions, verification=verdict, scale=scale, passes=passes)
