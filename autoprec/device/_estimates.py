"""Built-in profiles for a target that was not measured: only CUDA has one, a roofline of assumed figures.

A CPU is always there to calibrate (:mod:`autoprec.device._calibration`), so it has no estimate. A policy
priced with an estimate says so in its stats and report. Also here: the ops each target's autocast
computes in FP32 whatever the region's format (semantics, not speeds), which every CUDA or CPU
profile carries as ``full_width_ops``.
"""

from __future__ import annotations

from ..core._ops import CUDA_FP32_OPS, HAZARD_OPS  # CUDA_FP32_OPS: CUDA autocast's FP32 list, one source
from ._costs import ELEMENTWISE, KINDS, Curve, DeviceProfile

__all__ = ["CPU_FP32_OPS", "CUDA_FP32_OPS", "compute_bound", "estimate", "roofline"]

#: Assumptions, not measurements (no GPU was available to measure): an A100/H100-class GPU without
#: TF32, FP32 matmul FLOP/s and FP16/BF16 tensor cores at ``low_speedup`` times that, memory
#: bandwidth in bytes/s, and per-call host costs in seconds: a kernel launch, a 16-bit region.
_GPU = {"fp32_flops": 19.5e12, "low_speedup": 8.0, "bandwidth": 1.5e12, "launch": 5e-6, "region": 20e-6}
#: CPU autocast computes the losses (and prod, cdist) in FP32 whatever the region's format.
CPU_FP32_OPS = frozenset(op for op, h in HAZARD_OPS.items() if h == "loss") | {"prod", "cdist"}


def compute_bound(device: str = "GPU roofline without per-call costs") -> DeviceProfile:
    """The CUDA estimate without its per-call (launch, region) costs: every 16-bit matmul layer priced
    faster, however small. For benchmarks and tests that study numerical decisions on models so small
    that, with launch costs, the estimate keeps them FP32.

    Example:
        >>> p = compute_bound()
        >>> p.curves[0].at("fp32", 1e4) > p.curves[0].at("bf16", 1e4), p.origin
        (True, 'estimate')
    """
    return roofline(**{**_GPU, "launch": 0.0, "region": 0.0}, device=device)


def estimate(target: str) -> DeviceProfile:
    """The built-in profile for a target that was not calibrated: only CUDA has one (see ``_GPU``).

    A roofline from assumed figures, marked ``origin="estimate"``; a policy tuned with it says so.
    A CPU is always there to calibrate, so it has no estimate.

    Example:
        >>> estimate("cuda").origin
        'estimate'
    """
    if target != "cuda":
        raise ValueError(f"no built-in estimate for {target!r}: calibrate it (autoprec.calibrate)")
    return roofline(**_GPU)


def roofline(*, fp32_flops: float, low_speedup: float, bandwidth: float, launch: float, region: float,
             origin: str = "estimate", device: str = "CUDA GPU (assumed A100/H100 class)") -> DeviceProfile:
    """A CUDA profile from a roofline: matmul FLOP/s, memory bandwidth, per-call costs (see ``_GPU``).

    Example:
        >>> p = roofline(fp32_flops=1e12, low_speedup=4.0, bandwidth=1e11, launch=0.0, region=0.0)
        >>> p.curves[0].at("fp32", 1e9) / p.curves[0].at("bf16", 1e9)
        4.0
    """
    g = {"fp32_flops": fp32_flops, "low_speedup": low_speedup, "bandwidth": bandwidth, "launch": launch,
         "region": region}
    width = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0}
    low = g["fp32_flops"] * g["low_speedup"]
    rate = {"fp32": g["fp32_flops"], "fp16": low, "bf16": low}
    sizes = tuple(float(4 ** i) * 1e4 for i in range(9))  # 1e4 .. 6.6e8 forward FLOPs per call
    # forward and two backward kernels, each a launch plus its FLOPs at the format's rate
    curves = tuple(Curve(kind, sizes, {f: tuple(3 * (g["launch"] + s / rate[f]) for s in sizes) for f in width})
                   for kind in KINDS)
    # forward reads and writes an element, backward reads two and writes one: 5 element moves
    elementwise = {k: {f: (3 * g["launch"], 5 * width[f] / g["bandwidth"]) for f in width} for k in ELEMENTWISE}
    cast = {f: 2 * (4 + width[f]) / g["bandwidth"] for f in ("fp16", "bf16")}
    return DeviceProfile(target="cuda", device=device, capability="unknown", origin=origin, curves=curves,
                         elementwise=elementwise, cast=cast, region={f: g["region"] for f in ("fp16", "bf16")},
                         full_width_ops=CUDA_FP32_OPS)
