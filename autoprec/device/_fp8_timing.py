"""Timing FP8 GEMMs for :func:`autoprec.device.calibrate`: the ``"fp8"`` entry of a CUDA profile's matmul curve.

Where the device has FP8 tensor cores (CUDA compute capability 8.9 and up: Ada, Hopper, Blackwell), the
calibration times ``torch._scaled_mm`` along the sizes its matmul curve reached: per size ``n``, the three
``n x n x n`` GEMMs of a Linear's training step as torchao's ``Float8Linear`` runs them, e4m3 operands with
tensorwise float32 scales, the second operand column-major (cuBLAS's layout for FP8), BF16 output, fast
accumulation in the forward GEMM only (torchao's ``Float8LinearConfig`` defaults). No casts: those are priced by
:mod:`autoprec.device._fp8_costs`. ``torch._scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None,
out_dtype=None, use_fast_accum=False)`` has this signature and returns one tensor from torch 2.4 on. Elsewhere
(a CPU, an older GPU) nothing is timed and the profile has no FP8 entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ._costs import Curve, DeviceProfile
from ._timing import Clock, monotone

__all__ = ["fp8_capable", "fp8_gemms", "with_fp8"]


def fp8_capable(device: torch.device) -> bool:
    """Whether ``device`` runs FP8 GEMMs in hardware: a CUDA device of compute capability 8.9 or more, with a
    torch that has ``torch._scaled_mm`` and ``float8_e4m3fn``.

    Example:
        >>> fp8_capable(torch.device("cpu"))
        False
    """
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 9)


def fp8_gemms(n: int, device: torch.device, gen: torch.Generator) -> Callable[[], None]:
    """The three FP8 GEMMs of one training step of an ``n x n`` Linear on ``n`` rows (forward, grad-input,
    grad-weight), as one closure. ``n`` a multiple of 16 on CUDA. A CPU runs it emulated (not a figure).

    Example:
        >>> step = fp8_gemms(16, torch.device("cpu"), torch.Generator().manual_seed(0))
        >>> step() is None
        True
    """
    e4m3 = torch.float8_e4m3fn
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=e4m3)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=e4m3).t()  # column-major
    scale = torch.ones((), device=device, dtype=torch.float32)

    def run() -> None:
        torch._scaled_mm(a, b, scale, scale, out_dtype=torch.bfloat16, use_fast_accum=True)  # forward
        torch._scaled_mm(a, b, scale, scale, out_dtype=torch.bfloat16)  # grad-input
        torch._scaled_mm(a, b, scale, scale, out_dtype=torch.bfloat16)  # grad-weight
    return run


def with_fp8(profile: DeviceProfile, clock: Clock, device: torch.device, gen: torch.Generator) -> DeviceProfile:
    """``profile`` with an ``"fp8"`` entry in its matmul curve: the FP8 GEMMs timed at each of the curve's sizes
    (square GEMMs of ``2 n^3`` FLOPs, as the calibration's ladder), made non-decreasing. Each size gets one round
    at least, more while ``clock`` allows. The caller decides where FP8 is timed (:func:`fp8_capable`).

    Example:
        >>> import time
        >>> from autoprec.device import estimate
        >>> cpu = torch.device("cpu")
        >>> ladder = Curve("matmul", (2.0 * 16 ** 3, 2.0 * 32 ** 3), {"fp32": (1e-5, 2e-5), "bf16": (1e-5, 1e-5)})
        >>> base = dataclasses.replace(estimate("cuda"), curves=(ladder,))
        >>> p = with_fp8(base, Clock(cpu, time.perf_counter() + 0.2), cpu, torch.Generator())
        >>> p.fp8, len(p.curves[0].seconds["fp8"]), sorted(p.curves[0].seconds)
        (True, 2, ['bf16', 'fp32', 'fp8'])
    """
    curves = []
    for c in profile.curves:
        if c.kind == "matmul":
            sides = [round((f / 2) ** (1 / 3)) for f in c.flops]
            times = [clock.fastest({"fp8": fp8_gemms(n, device, gen)}, slice_s=0.05)["fp8"] for n in sides]
            c = Curve(c.kind, c.flops, {**c.seconds, "fp8": monotone(times)})
        curves.append(c)
    return dataclasses.replace(profile, curves=tuple(curves))
