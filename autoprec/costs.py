"""The modelled step cost of a layer in each format, for one target device.

A model, not a timing: it ranks assignments. Per layer and step, forward+backward is taken as
three times the forward cost: matmul/conv FLOPs at the format's throughput plus the memory
traffic of its inputs, parameters and the elements its ops write (from the FX graph) at the
format's width; a 16-bit region adds the traffic of its casts (floating inputs cast down and
outputs cast back, forward and backward; weights cast down). Throughputs are relative to FP32 on
the same device; traffic is counted in FP32-FLOP equivalents through ``flops_per_byte``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def fast(self, precision: str) -> bool:
        """Whether ``precision`` runs matmuls faster than FP32 here."""
        return self.speed[precision] > 1.0


PROFILES = {
    # this CPU class: BF16 1.5-2.3x FP32 (AVX-512 BF16), FP16 20-450x slower (no FP16 kernels)
    # elementwise BF16 on a CPU converts to FP32 inside the kernels: no bandwidth gain is assumed
    # measured here: SDPA forward+backward at (8, 4, 128, 64) is 14-15 ms in BF16 against 9 ms in FP32
    "cpu": DeviceProfile("cpu", {"fp32": 1.0, "bf16": 2.0, "fp16": 0.02}, {"fp32": 4.0, "bf16": 4.0, "fp16": 4.0},
                         flops_per_byte=10.0, op_speed={"scaled_dot_product_attention": {"bf16": 0.6}}),
    # tensor-core GPUs (A100/H100 class): FP16 and BF16 alike, ~8x FP32 without TF32
    "cuda": DeviceProfile("cuda", {"fp32": 1.0, "bf16": 8.0, "fp16": 8.0}, {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0},
                          flops_per_byte=20.0),
}


def layer_cost(layer: Layer, precision: str, profile: DeviceProfile) -> float:
    """Modelled cost of one training step of ``layer`` in ``precision`` (in FP32-FLOP units).

    Example:
        >>> from autoprec.trace import Layer
        >>> lin = Layer("fc", "module", "Linear", (), ("linear",), ((64, 512),), ((64, 512),),
        ...             flops=2 * 64 * 512 * 512, in_numel=32768, out_numel=32768, work_numel=32768,
        ...             param_numel=262656, calls=1)
        >>> layer_cost(lin, "bf16", PROFILES["cpu"]) < layer_cost(lin, "fp32", PROFILES["cpu"])
        True
    """
    speed = profile.op_speed.get(layer.op, profile.speed).get(precision, profile.speed[precision])
    traffic = profile.width[precision] * (layer.in_numel + layer.work_numel + layer.param_numel)
    compute = 3.0 * (layer.flops / speed + traffic * profile.flops_per_byte)
    if precision == "fp32":
        return compute
    # cast traffic: read 4 + write 2 bytes down, read 2 + write 4 bytes back, forward and backward
    cast_bytes = 2 * 6 * (layer.in_numel + layer.out_numel) + 6 * layer.param_numel
    return compute + cast_bytes * profile.flops_per_byte
