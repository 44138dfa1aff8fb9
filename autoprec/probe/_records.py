"""The probe's records: one layer's FP32 reference ranges, one layer's measured error in a format, and the whole
probe's result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._amplify import Reach
from ._reductions import HIST_LO

__all__ = ["Ranges", "Measurement", "Probe"]


@dataclass(frozen=True)
class Measurement:
    """The error one layer adds when it alone runs in ``precision``."""

    key: str
    precision: str
    loss_err: float          # |loss - ref| / |ref|
    grad_err: float          # ||g - g_ref|| / ||g_ref|| over all parameter gradients
    nonfinite: int           # Inf/NaN values in the layer's own output
    finite: bool             # loss and all gradients finite
    error: str | None = None  # the exception, when the layer cannot run in this format
    full_width: bool = False  # its output came out FP32 in the 16-bit region: it computes in FP32 itself
    group: str = ""          # the role whose one pass measured it with others (errors: a bound, not its own)
    members: int = 1         # the layers that pass cast at once (1: measured alone)
    amp: float = 0.0         # the largest error it can cause at an amplifying op it feeds (autoprec.probe._amplify)
    amp_at: str = ""         # that op's layer
    amp_in: float = 0.0      # the relative perturbation it put at that op's input

    def amplified(self) -> str:
        """The report's sentence for :attr:`amp` ("" where it reaches no amplifying op)."""
        return Reach(self.amp, self.amp_at, self.amp_in).describe() if self.amp_at else ""


@dataclass(frozen=True)
class Ranges:
    """FP32 reference ranges of one layer, over all batches."""

    out_absmax: float
    grad_absmax: float
    out_hist: tuple[int, ...]
    grad_hist: tuple[int, ...]
    nonfinite: int = 0       # Inf/NaN the FP32 reference itself emits on the first batch (log(0) = -inf ...)

    def below(self, limit: float, grads: bool = False, scale: float = 1.0) -> float:
        """Fraction of nonzero values whose magnitude (times ``scale``) is below ``limit``."""
        hist = self.grad_hist if grads else self.out_hist
        total = sum(hist)
        if total == 0:
            return 0.0
        cut = math.floor(math.log2(limit / scale)) - HIST_LO
        return sum(hist[: max(0, min(cut, len(hist)))]) / total


@dataclass(frozen=True)
class Probe:
    """What the probe measured."""

    ref_loss: float
    ranges: dict[str, Ranges]
    measurements: dict[tuple[str, str], Measurement]
    loss_scale: float                 # suggested initial FP16 loss scale (power of two)
    grad_absmax: float                # largest activation/parameter gradient seen in FP32
    param_grad_hist: tuple[int, ...]
    passes: int
    formats: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)   # layer -> why it was not probed
    reference: tuple = field(default=(), repr=False, compare=False)  # (loss, grads) of FP32 on batch 0

    def get(self, key: str, precision: str) -> Measurement | None:
        """The measurement of ``key`` in ``precision``, if probed."""
        return self.measurements.get((key, precision))
