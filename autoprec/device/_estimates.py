"""Built-in profiles for a target that was not measured: only CUDA has one, a roofline of assumed figures.

A CPU is always there to calibrate (:mod:`autoprec.device._calibration`), so it has no estimate. A policy
priced with an estimate says so in its stats and report. Also here: the ops each target's autocast
computes in FP32 whatever the region's format (semantics, not speeds), which every CUDA or CPU
profile carries as ``full_width_ops``.
"""

from __future__ import annotations

import torch

from ..core._ops import CUDA_FP32_OPS, HAZARD_OPS  # CUDA_FP32_OPS: CUDA autocast's FP32 list, one source
from ._costs import ELEMENTWISE, KINDS, Curve, DeviceProfile

__all__ = ["CPU_FP32_OPS", "CUDA_FP32_OPS", "H100", "compute_bound", "estimate", "roofline", "tf32_allowed"]

#: The built-in CUDA estimate: an H100 (SXM) from NVIDIA's public dense figures, not measured here: FP32
#: 67 TFLOP/s, TF32 tensor cores 495, BF16/FP16 989; HBM3 3.35 TB/s; and assumed per-call host costs in
#: seconds: a kernel launch 5 us, a 16-bit region (the runtime's casts and bookkeeping) 20 us. Which
#: FP32 the user runs decides the FP32 rate: strict unless TF32 is allowed (``_fp32_rate``). FP8 (e4m3/e5m2
#: tensor cores) 1979 TFLOP/s dense, 2x BF16: the figure torchao's roofline uses too
#: (``torchao/testing/training/roofline_utils.py``, ``fp8_peak_tops``); it prices FP8 GEMMs only
#: (:mod:`autoprec.device._fp8_costs`), not a format of the 16-bit regions.
H100 = {"fp32": 67e12, "tf32": 495e12, "low": 989e12, "fp8": 1979e12, "bandwidth": 3.35e12, "launch": 5e-6,
        "region": 20e-6}
#: The roofline the test suite and benchmarks price numerical decisions with (:func:`compute_bound`): an
#: A100/H100-class GPU without TF32, 16-bit at 8x FP32, FP8 GEMMs at 2x 16-bit; fixed, so that decisions
#: pinned to it never move.
_GPU = {"fp32_flops": 19.5e12, "low_speedup": 8.0, "fp8_speedup": 16.0, "bandwidth": 1.5e12, "launch": 5e-6,
        "region": 20e-6}
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


def tf32_allowed() -> bool:
    """Whether FP32 matmuls on CUDA run on TF32 tensor cores here (``torch.backends.cuda.matmul.allow_tf32``,
    set by ``torch.set_float32_matmul_precision("high")``); PyTorch's default is strict FP32.

    Example:
        >>> tf32_allowed()  # PyTorch's default
        False
    """
    return bool(torch.backends.cuda.matmul.allow_tf32)


def estimate(target: str, *, tf32: bool | None = None) -> DeviceProfile:
    """The built-in profile for a target that was not calibrated: only CUDA has one, an H100 from public
    figures (``H100``), FP32 strict or on TF32 (``tf32``; None: as this process runs FP32 matmuls,
    :func:`tf32_allowed`).

    A roofline from assumed figures, marked ``origin="estimate"`` and named so (its ``device`` says which
    FP32 it priced); a policy tuned with it says so in its stats and report. A CPU is always there to
    calibrate, so it has no estimate.

    Example:
        >>> p = estimate("cuda", tf32=False)
        >>> p.origin, p.device
        ('estimate', 'built-in H100 estimate (public figures; FP32 matmuls strict, 67 TFLOP/s)')
        >>> round(p.curves[0].at("fp32", 3.9e10) / p.curves[0].at("bf16", 3.9e10), 1)  # GPT-2 small c_fc at 8 x 1024
        13.1
    """
    if target != "cuda":
        raise ValueError(f"no built-in estimate for {target!r}: calibrate it (autoprec.calibrate)")
    tf32 = tf32_allowed() if tf32 is None else tf32
    fp32 = H100["tf32" if tf32 else "fp32"]
    kind = "on TF32, 495" if tf32 else "strict, 67"
    return roofline(fp32_flops=fp32, low_speedup=H100["low"] / fp32, fp8_speedup=H100["fp8"] / fp32,
                    bandwidth=H100["bandwidth"],
                    launch=H100["launch"], region=H100["region"],
                    device=f"built-in H100 estimate (public figures; FP32 matmuls {kind} TFLOP/s)")


def roofline(*, fp32_flops: float, low_speedup: float, bandwidth: float, launch: float, region: float,
             fp8_speedup: float = 0.0, origin: str = "estimate",
             device: str = "CUDA GPU (assumed A100/H100 class)") -> DeviceProfile:
    """A CUDA profile from a roofline: matmul FLOP/s, memory bandwidth, per-call costs (see ``_GPU``).

    ``fp8_speedup`` > 0: FP8 GEMMs at that multiple of the FP32 rate, as an ``"fp8"`` entry of the matmul
    curve only (three GEMMs per call, no casts: :func:`autoprec.device.fp8_price` adds those); 0: none.

    Example:
        >>> p = roofline(fp32_flops=1e12, low_speedup=4.0, bandwidth=1e11, launch=0.0, region=0.0, fp8_speedup=8.0)
        >>> gemm = p.curves[0]
        >>> gemm.at("fp32", 1e9) / gemm.at("bf16", 1e9), gemm.at("bf16", 1e9) / gemm.at("fp8", 1e9)
        (4.0, 2.0)
        >>> sorted(p.curves[0].seconds), sorted(p.curves[1].seconds), p.formats
        (['bf16', 'fp16', 'fp32', 'fp8'], ['bf16', 'fp16', 'fp32'], ('fp32', 'fp16', 'bf16'))
    """
    g = {"fp32_flops": fp32_flops, "low_speedup": low_speedup, "bandwidth": bandwidth, "launch": launch,
         "region": region}
    width = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0}
    low = g["fp32_flops"] * g["low_speedup"]
    rate = {"fp32": g["fp32_flops"], "fp16": low, "bf16": low}
    if fp8_speedup > 0:
        rate["fp8"] = g["fp32_flops"] * fp8_speedup
    sizes = tuple(float(4 ** i) * 1e4 for i in range(13))  # 1e4 .. 1.7e11 forward FLOPs per call: past large GEMMs

    # forward and two backward kernels, each a launch plus its FLOPs at the format's rate
    def gemms(kind: str) -> tuple[str, ...]:
        return tuple(width) + (("fp8",) if kind == "matmul" and "fp8" in rate else ())
    curves = tuple(Curve(kind, sizes, {f: tuple(3 * (g["launch"] + s / rate[f]) for s in sizes) for f in gemms(kind)})
                   for kind in KINDS)
    # forward reads and writes an element, backward reads two and writes one: 5 element moves
    elementwise = {k: {f: (3 * g["launch"], 5 * width[f] / g["bandwidth"]) for f in width} for k in ELEMENTWISE}
    cast = {f: 2 * (4 + width[f]) / g["bandwidth"] for f in ("fp16", "bf16")}
    return DeviceProfile(target="cuda", device=device, capability="unknown", origin=origin, curves=curves,
                         elementwise=elementwise, cast=cast, region={f: g["region"] for f in ("fp16", "bf16")},
                         full_width_ops=CUDA_FP32_OPS)
