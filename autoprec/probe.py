"""Stage 2, probe: measured ranges and per-layer, per-format error.

One FP32 reference forward+backward per batch records every layer's output range and the range
of the gradient flowing into it (log2 histograms, so underflow at any loss scale can be read off).
Then each candidate layer is run alone in each 16-bit format, the rest in FP32, on the first
batch, and the error it adds at the loss and at the parameter gradients is measured, with the
non-finite values it produced. Cost: ``len(batches) + candidates * formats`` forward+backward
passes, linear in the number of layers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .batch import LossFn, call_model, compute_loss, seed_rng
from .errors import ModelError
from .formats import info
from .modules import canonical_modules
from .runtime import Runtime
from .trace import Trace

__all__ = ["Ranges", "Measurement", "Probe", "Runner", "probe", "errors", "evidence", "suggest_scale", "HIST_LO", "HIST_HI"]

log = logging.getLogger("autoprec.probe")

#: log2 histogram bounds: bucket i counts values with floor(log2|x|) == HIST_LO + i
HIST_LO, HIST_HI = -160, 130


def _hist(t: torch.Tensor) -> list[int]:
    x = t.detach().float().abs().flatten()
    x = x[(x > 0) & torch.isfinite(x)]
    if x.numel() == 0:
        return [0] * (HIST_HI - HIST_LO)
    e = torch.frexp(x).exponent.to(torch.int64) - 1  # floor(log2|x|)
    e = e.clamp(HIST_LO, HIST_HI - 1) - HIST_LO
    return torch.bincount(e, minlength=HIST_HI - HIST_LO).tolist()


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


class _RangeWatcher:
    def __init__(self) -> None:
        self.out: dict[str, list] = {}
        self.grad: dict[str, list] = {}
        self.nonfinite: dict[str, int] = {}

    def enter(self, key: str, kind: str, inputs: tuple) -> None:
        pass

    def exit(self, key: str, kind: str, raw: Any, final: Any) -> None:
        for t in pytree.tree_leaves(raw):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                _merge(self.out, key, t)
                self.nonfinite[key] = self.nonfinite.get(key, 0) + int((~torch.isfinite(t)).sum())
        for t in pytree.tree_leaves(final):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
                t.register_hook(lambda g, key=key: _merge(self.grad, key, g))


def _merge(store: dict[str, list], key: str, t: torch.Tensor) -> None:
    finite = t.detach()[torch.isfinite(t.detach())]
    amax = float(finite.abs().max()) if finite.numel() else 0.0
    hist = _hist(t)
    if key in store:
        old = store[key]
        store[key] = [max(old[0], amax), [a + b for a, b in zip(old[1], hist)]]
    else:
        store[key] = [amax, hist]


class _CountWatcher:
    """Counts the non-finite values one layer emits in a measurement run."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.nonfinite = 0
        self.dtypes: set[torch.dtype] = set()   # floating dtypes of the layer's own output

    def enter(self, key: str, kind: str, inputs: tuple) -> None:
        pass

    def exit(self, key: str, kind: str, raw: Any, final: Any) -> None:
        if key != self.key:
            return
        for t in pytree.tree_leaves(raw):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.nonfinite += int((~torch.isfinite(t)).sum())
                self.dtypes.add(t.dtype)


class Runner:
    """Runs one forward+backward of a (private) model under a precision assignment.

    The same seed is set before every pass, so dropout masks agree between passes; the global RNG
    is forked, never advanced.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, trace: Trace, *, device_type: str,
                 emulate_fp16: bool, seed: int, emulate_cuda: bool = False) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.trace = trace
        self.device_type = device_type
        self.emulate_fp16 = emulate_fp16
        self.emulate_cuda = emulate_cuda  # a policy for CUDA measured on a CPU: CUDA autocast's rules
        self.seed = seed
        self.passes = 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.modules = canonical_modules(model)  # walked once, not once per pass

    def run(self, batch: Any, assignment: dict[str, str], *, scale: float = 1.0,
            watcher: Any = None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Loss (detached) and parameter gradients (unscaled) of one pass."""
        runtime = Runtime(self.model, assignment, units=self.trace.units, opaque=self.trace.opaque,
                          device_type=self.device_type, emulate_fp16=self.emulate_fp16,
                          emulate_cuda=self.emulate_cuda, watcher=watcher,
                          handoff=self.trace.handoff, modules=self.modules)
        for p in self.params:
            p.grad = None
        devices = [torch.cuda.current_device()] if self.device_type == "cuda" and torch.cuda.is_available() else []
        self.passes += 1
        runtime.install()
        try:
            with torch.random.fork_rng(devices=devices):
                seed_rng(self.seed, self.device_type)
                loss = compute_loss(call_model(self.model, batch), batch, self.loss_fn)
                (loss.float() * scale).backward()
        finally:
            runtime.remove()
        grads = [None if p.grad is None else p.grad.detach().float() / scale for p in self.params]
        for p in self.params:
            p.grad = None
        return loss.detach().float(), grads


def errors(loss: torch.Tensor, grads: Sequence[torch.Tensor | None], ref_loss: torch.Tensor,
           ref_grads: Sequence[torch.Tensor | None]) -> tuple[float, float, bool]:
    """(loss relative error, gradient relative L2 error, all finite) against a reference."""
    finite = bool(torch.isfinite(loss)) and all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    if not finite:
        return math.inf, math.inf, False
    loss_err = float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12))
    num = den = 0.0
    for g, r in zip(grads, ref_grads):
        if r is None:
            continue
        g = torch.zeros_like(r) if g is None else g
        num += float(((g - r).double() ** 2).sum())
        den += float((r.double() ** 2).sum())
    grad_err = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    return loss_err, grad_err, True


def probe(runner: Runner, batches: Sequence[Any], candidates: Iterable[str], formats: Sequence[str], *,
          headroom: float = 8.0, progress: Callable[[str], None] | None = None,
          skipped: dict[str, str] | None = None) -> Probe:
    """Measure ranges on every batch and the error of each candidate layer in each format.

    Example:
        >>> from autoprec.trace import trace
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x = torch.randn(4, 8)
        >>> t = trace(m, x, device_type="cpu")
        >>> r = Runner(m, None, t, device_type="cpu", emulate_fp16=True, seed=0)
        >>> p = probe(r, [x], ["0", "2"], ["bf16"])
        >>> p.get("0", "bf16").finite
        True
    """
    watcher = _RangeWatcher()
    ref_loss, ref_grads = None, None
    param_hist = [0] * (HIST_HI - HIST_LO)
    for i, batch in enumerate(batches):
        loss, grads = runner.run(batch, {}, watcher=watcher)
        if not bool(torch.isfinite(loss)) or any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
            raise ModelError(f"the model's FP32 loss or gradients are not finite on batch {i} "
                             f"(loss={float(loss)}): autoprec cannot tune a model that is broken in FP32; "
                             "fix the model or the batch first")
        for g in grads:
            if g is not None:
                param_hist = [a + b for a, b in zip(param_hist, _hist(g))]
        if i == 0:
            ref_loss, ref_grads = loss, grads
            ref_nonfinite = dict(watcher.nonfinite)  # what FP32 itself emits on the measured batch
    ranges = {k: Ranges(out_absmax=watcher.out[k][0], out_hist=tuple(watcher.out[k][1]),
                        grad_absmax=watcher.grad.get(k, [0.0])[0],
                        grad_hist=tuple(watcher.grad.get(k, [0, [0] * (HIST_HI - HIST_LO)])[1]),
                        nonfinite=ref_nonfinite.get(k, 0))
              for k in watcher.out}
    grad_absmax = max([r.grad_absmax for r in ranges.values()] +
                      [float(g.abs().max()) for g in ref_grads if g is not None and g.numel()] + [0.0])
    scale = suggest_scale(grad_absmax, headroom)
    measurements: dict[tuple[str, str], Measurement] = {}
    candidates = list(candidates)
    for key in candidates:
        if progress is not None:
            progress(key)
        for fmt in formats:
            counter = _CountWatcher(key)
            try:
                loss, grads = runner.run(batches[0], {key: fmt}, scale=scale if fmt == "fp16" else 1.0,
                                         watcher=counter)
            except Exception as exc:  # noqa: BLE001 - a format a layer cannot run is a measurement
                measurements[(key, fmt)] = Measurement(key, fmt, math.inf, math.inf, 0, False,
                                                       error=f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            loss_err, grad_err, finite = errors(loss, grads, ref_loss, ref_grads)
            full = bool(counter.dtypes) and counter.dtypes <= {torch.float32, torch.float64}
            measurements[(key, fmt)] = Measurement(key, fmt, loss_err, grad_err, counter.nonfinite, finite,
                                                   full_width=full)
    log.info("probed %d layers x %d formats in %d passes", len(candidates), len(formats), runner.passes)
    return Probe(ref_loss=float(ref_loss), ranges=ranges, measurements=measurements, loss_scale=scale,
                 grad_absmax=grad_absmax, param_grad_hist=tuple(param_hist), passes=runner.passes,
                 formats=tuple(formats), skipped=dict(skipped or {}), reference=(ref_loss, ref_grads))


def evidence(result: Probe, key: str) -> dict[str, dict[str, float]]:
    """The probe's figures for one layer, per format: errors, non-finite values, underflow.

    ``underflow`` is the fraction of the layer's nonzero FP32 outputs that flush to zero in the
    format; ``grad_underflow`` the same for the gradients reaching its output, at the loss scale
    the format runs with (the suggested scale for FP16, none for BF16).

    Example:
        >>> evidence(Probe(0.0, {}, {}, 1.0, 0.0, (), 0, ()), "fc")
        {}
    """
    out: dict[str, dict[str, float]] = {}
    rng = result.ranges.get(key)
    for fmt in result.formats:
        m = result.get(key, fmt)
        if m is None:
            continue
        row = {"loss_err": m.loss_err, "grad_err": m.grad_err, "nonfinite": float(m.nonfinite)}
        if rng is not None:
            half_sub = info(fmt).subnormal / 2
            scale = result.loss_scale if fmt == "fp16" else 1.0
            row["underflow"] = round(rng.below(half_sub), 6)
            row["grad_underflow"] = round(rng.below(half_sub, grads=True, scale=scale), 6)
        out[fmt] = row
    return out


def suggest_scale(grad_absmax: float, headroom: float) -> float:
    """The largest power-of-two loss scale that keeps ``grad_absmax * headroom`` inside FP16.

    Example:
        >>> suggest_scale(1e-3, 8.0)
        4194304.0
    """
    if grad_absmax <= 0 or not math.isfinite(grad_absmax):
        return 2.0 ** 16
    exp = math.floor(math.log2(info("fp16").max / (grad_absmax * headroom)))
    return 2.0 ** max(0, min(exp, 48))
