"""Short training runs: the FP32 reference trajectory and policy runs.

Every run starts from the same weights (a snapshot restored after each run, or a private copy), sees the same batches in the same order with
the same RNG seed per step (dropout masks agree), and uses a fresh optimizer from the same
factory. The default optimizer is torch's ``Adam(lr=1e-3)`` as most training scripts use it.
(Gradients that underflow in 16-bit are the probe's business: it compares every parameter's
gradient with FP32's, however small.)
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..core._batch import LossFn, call_model, compute_loss, seed_rng
from ..policy._policy import Policy
from ..runtime._apply import apply
from ..trace._flops import DtypeFlops
from ._snapshot import Snapshot

__all__ = ["Trajectory", "OptimizerFactory", "default_optimizer", "train_curve"]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def default_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``Adam(lr=1e-3)`` with torch's other defaults: the optimizer of verification unless tune is given one.

    Example:
        >>> type(default_optimizer(torch.nn.Linear(2, 2).parameters())).__name__
        'Adam'
    """
    return torch.optim.Adam(params, lr=1e-3)


@dataclass(frozen=True)
class Trajectory:
    """One training run: the loss before each step's update, and the largest parameter gradient."""

    losses: tuple[float, ...]
    grad_absmax: tuple[float, ...]     # per step, unscaled (0 for a skipped step)
    skipped: int = 0
    longest_skip_run: int = 0


def train_curve(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None, *, steps: int,
                policy: Policy | None, device_type: str, scaler: torch.amp.GradScaler | None,
                optimizer: OptimizerFactory, seed: int, on_step: Callable[[], None] | None = None,
                compile_backend: str | None = None, snapshot: Snapshot | None = None,
                count: DtypeFlops | None = None) -> Trajectory:
    """Train ``model`` for ``steps`` steps (``policy=None``: plain FP32); it ends as it started.

    With a :class:`~autoprec.probe._snapshot.Snapshot` of its trainable parameters and buffers, the model
    itself is trained and the snapshot restored at the end, however the run ends: no copy of the
    weights. Without one, a private copy is trained.

    The policy runs exactly as a user runs it: installed with :func:`autoprec.runtime._apply.apply` (and,
    with ``compile_backend``, the model compiled by ``torch.compile`` with that backend). The run
    stops early at the first non-finite loss without a scaler. With ``count``, the model's forward
    in the first step runs under that :class:`~autoprec.trace._flops.DtypeFlops` (the loss function outside
    it): the FLOPs by dtype that the run really computed, at the cost of one counted forward.

    Example:
        >>> m = torch.nn.Linear(4, 1)
        >>> c = train_curve(m, [torch.randn(8, 4)], None, steps=3, policy=None, device_type="cpu", scaler=None,
        ...                 optimizer=default_optimizer, seed=0)
        >>> len(c.losses), c.losses[2] < c.losses[0]
        (3, True)
    """
    if snapshot is None:
        model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params)
    handle = apply(policy, model) if policy is not None else None
    step_model = torch.compile(model, backend=compile_backend) if compile_backend else model
    losses: list[float] = []
    gmax: list[float] = []
    skipped = run = longest = 0
    devices = [torch.cuda.current_device()] if device_type == "cuda" and torch.cuda.is_available() else []
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            opt.zero_grad(set_to_none=True)
            with torch.random.fork_rng(devices=devices):
                seed_rng(seed + step, device_type)
                with count if count is not None and step == 0 else nullcontext():
                    out = call_model(step_model, batch)
                loss = compute_loss(out, batch, loss_fn)
                del out
            losses.append(float(loss.detach()))
            if scaler is not None:
                before = scaler.get_scale()
                scaler.scale(loss.float()).backward()
                scaler.unscale_(opt)
                gmax.append(_absmax(params))
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
                gmax.append(_absmax(params))
                opt.step()
            if on_step is not None:
                on_step()
    finally:
        if handle is not None:
            handle.remove()
        for p in params:  # the run's gradients and optimizer state go before the next run makes its own
            p.grad = None
        del opt
        if snapshot is not None:
            snapshot.restore()
    return Trajectory(tuple(losses), tuple(gmax), skipped, longest)


def _absmax(params: Sequence[torch.Tensor]) -> float:
    """Largest |gradient| (0 when none or not finite): fused max-norms, no ``abs()`` copy of a gradient."""
    grads = [p.grad.detach() for p in params if p.grad is not None and p.grad.numel()]
    if not grads:
        return 0.0
    m = float(torch.stack([n.float() for n in torch._foreach_norm(grads, math.inf)]).max())
    return m if math.isfinite(m) else 0.0
