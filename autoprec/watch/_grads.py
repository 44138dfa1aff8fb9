"""The guard's gradient and scaler watch: what flows back into each 16-bit layer, and what the GradScaler did.

Gradients: when a watched layer's raw FP16 output requires grad, the watch registers a tensor hook on
it (:func:`hook_grad`): in backward the hook folds the gradient w.r.t. that output (in the layer's 16-bit
format, as autograd hands it over; scaled by the GradScaler when one is used) into the layer's row of the
watch's device table: the largest ``|grad|`` of the backward passes whose gradient was finite, and the
number of backward passes whose gradient held inf or NaN. One ``aminmax`` per pass (eager: folded at the
read with the forward passes; traced: and a few 0-dim ops), no host sync; the read copies them with the
forward figures. Activation checkpointing: the hook sits on the output that
backward flows through (non-reentrant: the original; reentrant: the recomputed one), so each backward
pass counts once. ``torch.compile(fullgraph=True)``: the hook traces without a graph break
(``tests/watch/test_guard_grads.py``).

Scaler: the scale is read at each read, in the same host copy as the table (the scaler's ``_scale``
tensor); the steps it skipped since the last read are counted from the scale's fall, as
``log(old / new) / log(1 / backoff_factor)`` (rounded). That costs nothing per step, but a growth of the
scale (after ``growth_interval`` clean steps) within the same window hides one halving each: a lower
bound, exact when the scale did not grow in between.

The figures are judged by :func:`grad_misfit`: the scaled gradient maximum is divided by the scale at the
read, which is at most the scale it was taken at (the scale only falls between two reads, but for a
growth): an upper bound of the unscaled gradient, on the safe side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..core._formats import info

__all__ = ["ScalerReading", "grad_misfit", "hook_grad", "num", "scale_of"]


def num(x: float) -> str:
    """``9.1e3`` for 9100: three significant digits, a short exponent.

    Example:
        >>> num(31234.0), num(0.125), num(float("inf"))
        ('3.12e4', '0.125', 'inf')
    """
    mantissa, _, exp = f"{x:.3g}".partition("e")
    return mantissa + (f"e{int(exp)}" if exp else "")


def hook_grad(t: torch.Tensor, gmax: torch.Tensor, gbad: torch.Tensor,
              pending: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
    """Fold the gradient that backward hands ``t`` into ``gmax`` (largest finite ``|grad|``) and ``gbad``
    (backward passes with a non-finite gradient), on the device. With ``pending`` (eager: the watch's
    deferred fold, :class:`~autoprec.watch._watch.Watch`) the hook only reduces the gradient to its
    ``(min, max)`` and hands them over; the fold happens at the watch's read.

    Example:
        >>> row = torch.zeros(2); x = torch.tensor([1.0, -2.0], requires_grad=True); y = x * 3
        >>> hook_grad(y, row[0], row[1]); (y * torch.tensor([4.0, -5.0])).sum().backward(); row.tolist()
        [5.0, 0.0]
    """
    def hook(g: torch.Tensor) -> None:
        lo, hi = torch.aminmax(g.detach())
        if pending is not None and not torch.compiler.is_compiling():
            pending(lo, hi)
            return
        m = torch.fmax(hi, lo.neg())  # max |g|; NaN only when g holds NaN
        finite = m.nan_to_num(0.0, 0.0, 0.0)  # inf and NaN -> 0: what the largest finite |grad| may take
        torch.fmax(gmax, finite, out=gmax)
        gbad.add_(finite.ne(m))  # differs exactly where m is inf or NaN
    t.register_hook(hook)


def scale_of(scaler: Any) -> torch.Tensor | float | None:
    """The scaler's current scale: its device tensor (read with the watch's table, no sync of its own),
    its initial scale before its first ``scale()``, or None without an enabled scaler.

    Example:
        >>> scale_of(None) is None, scale_of(torch.amp.GradScaler("cpu", init_scale=128.0))
        (True, 128.0)
    """
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else float(scaler.get_scale())


@dataclass(frozen=True)
class ScalerReading:
    """The scaler at a read: its ``scale``, and the steps it ``skipped`` of the ``steps`` since the last read.

    Example:
        >>> r = ScalerReading.between(1024.0, 128.0, 0.5, 50); r.skipped, r.collapsed, r.describe()
        (3, False, 'scaler skipped 3 of 50 steps, scale 128')
        >>> ScalerReading(0.5, 1, 50).collapsed
        True
    """

    scale: float
    skipped: int
    steps: int

    @classmethod
    def between(cls, old: float, new: float, backoff: float, steps: int) -> "ScalerReading":
        """The reading for a scale that went from ``old`` to ``new`` over ``steps`` (halvings counted)."""
        fell = new < old and 0 < backoff < 1 and new > 0
        skipped = round(math.log(old / new) / math.log(1 / backoff)) if fell else 0
        return cls(new, min(skipped, steps), steps)

    @property
    def collapsed(self) -> bool:
        """The scale fell below 1, or more than half the steps since the last read were skipped."""
        return self.scale < 1 or 2 * self.skipped > self.steps

    def describe(self) -> str:
        return f"scaler skipped {self.skipped} of {self.steps} steps, scale {num(self.scale)}"


def grad_misfit(precision: str, gmax: float, gbad: int, headroom: float, scaler: ScalerReading | None) -> str | None:
    """Why a layer's gradients no longer fit ``precision`` (FP16 only), or None when they fit.

    ``gmax`` is the largest finite scaled ``|grad|``; it is unscaled by the scale at the read. Non-finite
    gradients count only without a scaler or when the scaler collapsed: otherwise skipping them and
    lowering the scale is the scaler's ordinary work.

    Example:
        >>> r = ScalerReading(0.125, 12, 50)
        >>> grad_misfit("fp16", 3.9e3, 3, 8.0, r)
        'non-finite gradient in 3 backward passes (scaler skipped 12 of 50 steps, scale 0.125)'
        >>> grad_misfit("fp16", 3.9e3, 0, 8.0, r)
        '|grad| max 3.12e4 x headroom 8 > 65504 (unscaled; scaler skipped 12 of 50 steps, scale 0.125)'
        >>> grad_misfit("fp16", 3.9e3, 3, 8.0, ScalerReading(1024.0, 1, 50)) is None
        True
    """
    if precision != "fp16":
        return None
    top, note = info(precision).max, "" if scaler is None else scaler.describe()
    if gbad and (scaler is None or scaler.collapsed):
        passes = f"{gbad} backward pass{'es' if gbad > 1 else ''}"
        return f"non-finite gradient in {passes}" + (f" ({note})" if note else "")
    unscaled = gmax / (scaler.scale if scaler is not None and scaler.scale > 0 else 1.0)
    if unscaled * headroom > top:
        return f"|grad| max {num(unscaled)} x headroom {headroom:g} > {top:g} (unscaled{'; ' + note if note else ''})"
    return None


def scaler_reset(step: int, reading: ScalerReading | None, init: float, promoted: list[str],
                 fp16_left: bool) -> str | None:
    """The evidence for resetting the scaler to its tuned ``init`` scale, or None when it stays: it resets
    when layers were just promoted on their gradients (``promoted``: they drove the scale down) and the
    scale is below ``init``, or when it collapsed and no FP16 layer is left (nothing it scales can
    overflow any more).

    Example:
        >>> scaler_reset(190, ScalerReading(0.125, 12, 50), 65536.0, ["mid"], True)
        'step 190: scaler scale 0.125 -> 65536 (the tuned init scale): scaler skipped 12 of 50 steps, scale 0.125; promoted mid'
        >>> scaler_reset(190, ScalerReading(0.125, 12, 50), 65536.0, [], True) is None
        True
        >>> scaler_reset(60, ScalerReading(0.5, 3, 50), 1024.0, [], False).split("; ")[-1]
        'no FP16 layer left'
    """
    if reading is None or not (promoted and reading.scale < init or reading.collapsed and not fp16_left):
        return None
    why = f"promoted {', '.join(promoted)}" if promoted else "no FP16 layer left"
    return f"step {step}: scaler scale {num(reading.scale)} -> {init:g} (the tuned init scale): {reading.describe()}; {why}"
