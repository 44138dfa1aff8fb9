"""The modelled step cost of a layer in each format, for one target device.

A model, not a timing: it ranks assignments. Per layer and step, forward+backward is taken as
three times the forward cost: matmul/conv FLOPs at the format's throughput plus the memory
traffic of its inputs, parameters and the elements its ops write (from the FX graph) at the
format's width; a 16-bit region adds the traffic of its casts (floating inputs cast down and
outputs cast back, forward and backward; weights cast down) and a fixed cost per call (the hooks
and the cast kernels themselves, which dominate small layers). Throughputs are relative to FP32 on
the same device; traffic is counted in FP32-FLOP equivalents through ``flops_per_byte``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .ops import CUDA_FP32_OPS, HAZARD_OPS
from .trace import Layer

__all__ = ["DeviceProfile", "PROFILES", "layer_cost"]


@dataclass(frozen=True)
class DeviceProfile:
    """Relative speeds of a target device."""

    name: str
    speed: dict[str, float]       # matmul throughput relative to FP32
    width: dict[str, float]       # bytes per element moved by elementwise work
    flops_per_byte: float         # FP32 FLOPs that take as long as moving one byte
    op_speed: dict[str, dict[str, float]] = field(default_factory=dict)  # per-op exceptions to ``speed``
    call_cost: float = 0.0        # fixed cost of one call of a 16-bit region, forward+backward, in FP32 FLOPs
    cast_share: float = 1.0       # the share of the modelled cast traffic that shows in step time
    full_width_ops: frozenset[str] = frozenset()  # ops whose 16-bit runs move FP32 bytes here: a layer with one
                                                  # gains no bandwidth in 16-bit

    def fast(self, precision: str) -> bool:
        """Whether ``precision`` runs matmuls faster than FP32 here."""
        return self.speed[precision] > 1.0


PROFILES = {
    # this CPU class: BF16 1.5-2.3x FP32 (AVX-512 BF16), FP16 20-450x slower (no FP16 kernels).
    # Measured here, one thread, forward+backward: SDPA at (8, 4, 128, 64) 14-15 ms in BF16 against 9 ms
    # in FP32; a BF16 region around a Linear(16, 16) adds 200 us (hooks, casts, autocast's weight casts),
    # the time of 19 MFLOP at the 92 GFLOP/s of an FP32 matmul. With these figures and BF16 operands at
    # 2 bytes and no separate cast traffic (the casts are inside those measured times) the model predicts
    # Linear(128, 128) and (256, 256) steps at 1024 and 4096 rows within 11% of the measured FP32 and
    # BF16-region times (BF16 region 0.67x FP32 at 1024 x 128); LayerNorm(128) at 1024 rows: BF16
    # region 390 us modelled, 434 us measured, FP32 344 us modelled, 223 us measured.
    "cpu": DeviceProfile("cpu", {"fp32": 1.0, "bf16": 2.0, "fp16": 0.02}, {"fp32": 4.0, "bf16": 2.0, "fp16": 4.0},
                         flops_per_byte=10.0, op_speed={"scaled_dot_product_attention": {"bf16": 0.6}},
                         call_cost=2e7, cast_share=0.0,
                         # scatter_add forward+backward at 20000 x 16 into 600 rows: 1.20 ms in BF16 against
                         # 1.02 ms in FP32 (index_add 1.43 against 1.56): accumulations gain no bandwidth;
                         # CPU autocast computes the losses (and prod, cdist, fft, linalg) in FP32 whatever
                         # the region's format, so a 16-bit region there only adds its casts
                         full_width_ops=frozenset(op for op, h in HAZARD_OPS.items() if h in ("accumulation", "loss"))
                         | {"prod", "cdist"}),
    # tensor-core GPUs (A100/H100 class): FP16 and BF16 alike, ~8x FP32 without TF32. No call cost: it
    # has not been measured on a GPU (none was available), and launches overlap GPU work there
    # CUDA autocast computes its FP32-list ops in FP32 whatever the region's format (the region's
    # casts then only cost): a layer that runs one gains no bandwidth in 16-bit
    "cuda": DeviceProfile("cuda", {"fp32": 1.0, "bf16": 8.0, "fp16": 8.0}, {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0},
                          flops_per_byte=20.0, full_width_ops=CUDA_FP32_OPS),
}


def layer_cost(layer: Layer, precision: str, profile: DeviceProfile, *, casts: bool = True) -> float:
    """Modelled cost of one training step of ``layer`` in ``precision`` (in FP32-FLOP units).

    ``casts=False``: without the cast traffic, for a layer whose inputs arrive in its format and
    whose output goes on uncast (see the runtime's handoff).

    Example:
        >>> from autoprec.trace import Layer
        >>> lin = Layer("fc", "module", "Linear", (), ("linear",), ((64, 512),), ((64, 512),),
        ...             flops=2 * 64 * 512 * 512, in_numel=32768, out_numel=32768, work_numel=32768,
        ...             param_numel=262656, calls=1)
        >>> layer_cost(lin, "bf16", PROFILES["cpu"]) < layer_cost(lin, "fp32", PROFILES["cpu"])
        True
    """
    speed = profile.op_speed.get(layer.op, profile.speed).get(precision, profile.speed[precision])
    width = profile.width[precision]
    if precision != "fp32" and any(o.strip("_") in profile.full_width_ops for o in layer.ops):  # __pow__, index_add_
        width = profile.width["fp32"]
    traffic = width * (layer.in_numel + layer.work_numel + layer.param_numel)
    compute = 3.0 * (layer.flops / speed + traffic * profile.flops_per_byte)
    if precision == "fp32":
        return compute
    # cast traffic: read 4 + write 2 bytes down, read 2 + write 4 bytes back, forward and backward
    cast_bytes = 2 * 6 * (layer.in_numel + layer.out_numel) + 6 * layer.param_numel
    cast_cost = profile.cast_share * cast_bytes * profile.flops_per_byte if casts else 0.0
    return compute + cast_cost + layer.calls * profile.call_cost
