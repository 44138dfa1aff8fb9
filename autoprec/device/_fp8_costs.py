"""What FP8 saves or costs per ``nn.Linear``: its three GEMMs in FP8 plus the casts, against the same GEMMs in BF16.

FP8 pays only where the GEMM time saved exceeds the cast, amax and scale overhead: small K or N lose. This
module mirrors torchao's own roofline model, ``torchao/testing/training/roofline_utils.py`` (pytorch/ao,
``get_gemm_time_sympy``, ``get_float8_mem_sympy``, ``get_tensor_memory_traffic_ovhd_s``; read at commit
36027d82), with this profile's figures in place of its GPU table:

* **GEMMs.** A Linear of ``M`` rows (tokens), ``K`` inputs and ``N`` outputs runs three GEMMs per step of
  ``2 M K N`` FLOPs each: forward ``M x K @ K x N``, grad-input ``M x N @ N x K``, grad-weight
  ``K x M @ M x N``. Each is priced as torchao does, ``max(compute, memory)``: compute from the profile's
  matmul curve (a third of its forward+backward seconds at ``2 M K N``; ``"fp8"`` for FP8, ``"bf16"`` for
  BF16; the curve's launch cost is torchao's launch floor), memory as the bytes the GEMM reads and writes
  (operands 1 byte in FP8, 2 in BF16; the output BF16 in both) at the profile's bandwidth.
  ``rowwise_with_gw_hp`` keeps the grad-weight GEMM in BF16.
* **Casts.** Per tensor (input ``M x K``, weight ``K x N``, grad_output ``M x N``), the kernels torchao models
  with their bytes read and written, each ``max(bytes / bandwidth, one launch)``. Casts are assumed compiled
  (``torch.compile`` fuses amax and scaling into these kernels, as torchao assumes):

  - ``tensorwise``: an amax pass (reads 2 bytes per element), a second amax stage (launch only), and one
    cast writing both layouts (reads 2, writes 1 + 1); the weight writes its two layouts in two kernels
    (forward, backward), 10 kernels in all.
  - ``rowwise``: input and grad_output, a cast writing FP8 and a BF16 transpose (2 + 1 + 2), then the
    transpose's cast (2 + 1); the weight, its cast (2 + 1), a transpose (2 + 2) and its cast (2 + 1).
    Per-row scales (4 bytes a row) are not counted, as torchao's training model leaves them out.
  - ``rowwise_with_gw_hp``: input and grad_output one cast each (2 + 1; the grad-weight GEMM reads them in
    BF16), the weight a rowwise cast, a scale reduction (launch only) and a tensorwise cast (2 + 1 each).

  ``fused=True`` is torchao's ``enable_fusion_modeling``: the first read of the input and grad_output is
  fused into the op before (a norm, an activation); by default, as in torchao's ``float8_roofline.py``, not.

Where the figures come from: the profile's (see :mod:`autoprec.device._estimates` for the built-in H100:
989 TFLOP/s BF16, 1979 FP8, 3.35 TB/s, 5 us per kernel launch; a calibrated profile measured them). The
bandwidth and the launch cost are read from the profile's BF16 pointwise rate, a kernel that moves 5 BF16
elements per element forward and backward over 3 launches. torchao's own table differs for the H100: it
derates its peaks (78% of the GEMM rate, 92% of a 2.4 TB/s bandwidth) and takes 2 us per launch; the
built-in estimate takes the public peaks and 5 us, so it puts the crossover at somewhat larger shapes.

Both prices leave out what BF16 and FP8 share: the layer's 16-bit region, the casts of its handoff, its bias.
A target without FP8 GEMMs (a CPU; a GPU below sm_89; a profile calibrated without FP8), or a Linear whose K or N
is not a multiple of 16, is a result, not an error: FP8 there costs ``inf`` and never pays.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import OptionError
from ..trace._trace import Layer
from ._costs import Curve, DeviceProfile

__all__ = ["FP8_COST_RECIPES", "Fp8Price", "fp8_price", "gemm_dims"]

#: The torchao training recipes priced here (``Float8LinearConfig.from_recipe_name``).
FP8_COST_RECIPES: tuple[str, ...] = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
_FP8, _BF16 = 1, 2  # bytes per element (torchao's BYTES_PER_EL_FLOAT8, BYTES_PER_EL_BF16)


@dataclass(frozen=True)
class Fp8Price:
    """Modelled seconds of one training step of an ``nn.Linear``'s three GEMMs: in BF16, and in FP8 with its casts.

    ``fp8`` is ``gemms + casts``; ``inf`` where the profile has no FP8 GEMMs. ``note`` says why it pays or not.

    Example:
        >>> p = Fp8Price(bf16=3e-3, fp8=2e-3, gemms=1.6e-3, casts=0.4e-3, recipe="tensorwise", note="")
        >>> p.pays, p.speedup, round(p.saving, 6)
        (True, 1.5, 0.001)
    """

    bf16: float     # the three GEMMs in BF16
    fp8: float      # the three GEMMs in FP8 (grad-weight in BF16 for rowwise_with_gw_hp), and the casts
    gemms: float    # the GEMM part of ``fp8``
    casts: float    # the cast, amax and scale part of ``fp8``
    recipe: str
    note: str

    @property
    def pays(self) -> bool:
        """Whether FP8 is faster than BF16 for this Linear (strictly)."""
        return self.fp8 < self.bf16

    @property
    def speedup(self) -> float:
        """BF16 seconds over FP8 seconds: above 1, FP8 is faster; 0 where there is no FP8."""
        return self.bf16 / self.fp8

    @property
    def saving(self) -> float:
        """Seconds per step FP8 saves over BF16 (negative: it loses; ``-inf``: no FP8 on the target)."""
        return self.bf16 - self.fp8


def gemm_dims(layer: Layer) -> tuple[int, int, int]:
    """``(M, K, N)`` of one call of a Linear: its rows (tokens), inputs and outputs. ``K`` and ``N`` are the last
    sizes of its input and output; ``M`` comes from its FLOPs per call (``2 M K N``), so that a trace rescaled
    to the training batch (:func:`autoprec.trace._rescale.rescaled`) gives the training step's rows.

    Example:
        >>> lin = Layer("fc", "module", "Linear", (), ("linear",), ((8, 128, 64),), ((8, 128, 32),),
        ...             flops=2 * 1024 * 64 * 32, in_numel=8 * 128 * 64, out_numel=8 * 128 * 32,
        ...             work_numel=8 * 128 * 32, param_numel=64 * 32 + 32, calls=1)
        >>> gemm_dims(lin)
        (1024, 64, 32)
    """
    names = {layer.op.lower(), *(o.strip("_").lower() for o in layer.ops)}
    if "linear" not in names or not layer.in_shapes or not layer.out_shapes or layer.flops <= 0:
        raise OptionError(f"fp8_price: layer {layer.key!r} ({layer.op}, ops {list(layer.ops)}, {layer.flops} FLOPs) "
                          "is not an nn.Linear with matmul FLOPs: FP8 prices the GEMMs of Linear layers only; "
                          "pass the Layer of an nn.Linear from autoprec.trace")
    k, n = layer.in_shapes[0][-1], layer.out_shapes[0][-1]
    m = round(layer.flops / max(layer.calls, 1) / (2 * k * n))
    return max(m, 1), k, n


def _matmul(profile: DeviceProfile) -> Curve:
    return next(c for c in profile.curves if c.kind == "matmul")


def _memory(profile: DeviceProfile) -> tuple[float, float]:
    """(bytes per second, seconds per kernel launch), from the profile's BF16 pointwise rate (5 elements moved
    per element, 3 kernels per call, forward and backward: see :func:`autoprec.device.roofline`)."""
    rates = profile.elementwise["pointwise"]
    fmt = next(f for f in ("bf16", "fp16", "fp32") if f in rates)
    per_call, per_elem = rates[fmt]
    return 5 * (4 if fmt == "fp32" else _BF16) / per_elem, per_call / 3


def _gemm(curve: Curve, fmt: str, m: int, k: int, n: int, bandwidth: float) -> float:
    """One GEMM ``m x k @ k x n`` in ``fmt`` ("fp8": FP8 operands, BF16 output): torchao's max(compute, memory)."""
    compute = curve.at(fmt, 2.0 * m * k * n) / 3
    operand = _FP8 if fmt == "fp8" else _BF16
    return max(compute, ((m * k + k * n) * operand + m * n * _BF16) / bandwidth)


def _cast_bytes(recipe: str, role: str, numel: int, fused: bool) -> list[int]:
    """Bytes read and written by each kernel that casts one tensor (``input``, ``weight``, ``grad_output``) to FP8
    for forward and backward: torchao's ``get_tensor_memory_traffic_ovhd_s``, kernel by kernel."""
    fuse = fused and role != "weight"
    if recipe == "tensorwise":
        amax = 0 if fuse else _BF16 * numel
        if role == "weight":  # amax, amax stage 2, forward cast, backward cast (each one layout)
            return [amax, 0, (_BF16 + _FP8) * numel, (_BF16 + _FP8) * numel]
        return [amax, 0, (_BF16 + 2 * _FP8) * numel]  # amax, stage 2, one cast writing both layouts
    if recipe == "rowwise":
        if role == "weight":  # cast, transpose in BF16, cast of the transpose
            first = (0 if fuse else _BF16 * numel) + _FP8 * numel
            return [first, 2 * _BF16 * numel, (_BF16 + _FP8) * numel]
        first = (0 if fuse else _BF16 * numel) + (_FP8 + _BF16) * numel  # cast and BF16 transpose
        return [first, (_BF16 + _FP8) * numel]
    if role == "weight":  # rowwise_with_gw_hp: rowwise cast, scale reduction, tensorwise cast of the transpose
        return [(_BF16 + _FP8) * numel, 0, (_BF16 + _FP8) * numel]
    return [(0 if fuse else _BF16 * numel) + _FP8 * numel]  # forward cast only: grad-weight reads BF16


def _casts(recipe: str, m: int, k: int, n: int, bandwidth: float, launch: float, fused: bool) -> float:
    """Seconds of all the cast kernels of one call: each ``max(bytes / bandwidth, launch)``, as torchao."""
    kernels = [*_cast_bytes(recipe, "input", m * k, fused), *_cast_bytes(recipe, "weight", k * n, fused),
               *_cast_bytes(recipe, "grad_output", m * n, fused)]
    return sum(max(b / bandwidth, launch) for b in kernels)


def _why(price: Fp8Price, dims: tuple[int, int, int]) -> str:
    """The note: FP8's speedup, or why it does not pay (the GEMMs save nothing, or the casts cost more)."""
    m, k, n = dims
    shape = f"M={m}, K={k}, N={n}"
    if price.pays:
        return f"FP8 {price.speedup:.2f}x faster ({price.recipe}, {shape})"
    saved = price.bf16 - price.gemms
    small = ", ".join(f"{d}={v}" for d, v in (("K", k), ("N", n), ("M", m)) if v == min(m, k, n)) or shape
    if saved <= 0.01 * price.bf16:
        return f"no gain: {small}, the FP8 GEMMs are no faster than BF16 here (launch-bound)"
    return (f"no gain: {small}, the casts cost more ({price.casts * 1e6:.3g} us) than the GEMMs save "
            f"({saved * 1e6:.3g} us)")


def fp8_price(layer: Layer, profile: DeviceProfile, recipe: str = "tensorwise", *, fused: bool = False) -> Fp8Price:
    """The modelled step time of an ``nn.Linear``'s GEMMs in BF16 and in FP8 with torchao's ``recipe`` (see the
    module's docstring for the model and where its figures come from). ``layer`` is the trace's record, as
    priced: rescale the trace to the training batch first. ``fused``: the casts of the input and grad_output
    read their tensor inside the op before (torchao's ``enable_fusion_modeling``).

    A profile without FP8 GEMMs (a CPU, a GPU below sm_89) gives ``fp8=inf``: FP8 never pays there; so does a
    Linear whose K or N is not a multiple of 16 (cuBLAS's FP8 GEMMs need them so; torchtitan's filter skips them).

    Example:
        >>> from autoprec.device import estimate
        >>> def linear(m, k, n):
        ...     return Layer("fc", "module", "Linear", (), ("linear",), ((m, k),), ((m, n),), flops=2 * m * k * n,
        ...                  in_numel=m * k, out_numel=m * n, work_numel=m * n, param_numel=k * n + n, calls=1)
        >>> h100 = estimate("cuda")
        >>> fp8_price(linear(8192, 4096, 4096), h100).note
        'FP8 1.39x faster (tensorwise, M=8192, K=4096, N=4096)'
        >>> fp8_price(linear(8192, 1024, 1024), h100).note
        'no gain: K=1024, N=1024, the casts cost more (60 us) than the GEMMs save (26.5 us)'
        >>> fp8_price(linear(256, 64, 64), h100).note
        'no gain: K=64, N=64, the FP8 GEMMs are no faster than BF16 here (launch-bound)'
        >>> round(fp8_price(linear(8192, 4096, 4096), h100, "rowwise_with_gw_hp").speedup, 2)  # BF16 weight grad
        1.27
    """
    if recipe not in FP8_COST_RECIPES:
        raise OptionError(f"fp8_price: unknown FP8 recipe {recipe!r}: use one of {', '.join(FP8_COST_RECIPES)}")
    m, k, n = dims = gemm_dims(layer)
    calls, curve = max(layer.calls, 1), _matmul(profile)
    low = "bf16" if "bf16" in curve.seconds else "fp16"
    bandwidth, launch = _memory(profile)
    bf16 = calls * sum(_gemm(curve, low, *g, bandwidth) for g in ((m, k, n), (m, n, k), (k, m, n)))
    odd = [f"{d}={v}" for d, v in (("K", k), ("N", n)) if v % 16]
    if not profile.fp8 or odd:
        why = ("a CPU has no FP8 GEMMs" if profile.target == "cpu" else
               "the profile has no FP8 GEMM figures (a GPU below sm_89, or calibrated without them: re-run "
               "`autoprec calibrate` on an sm_89+ GPU)")
        note = (f"no FP8 on {profile.target}: {why}" if not profile.fp8 else
                f"no FP8: {', '.join(odd)} not a multiple of 16 (torch._scaled_mm's FP8 GEMMs need K and N so)")
        return Fp8Price(bf16=bf16, fp8=math.inf, gemms=math.inf, casts=0.0, recipe=recipe, note=note)
    weight_grad = low if recipe == "rowwise_with_gw_hp" else "fp8"
    gemms = calls * (_gemm(curve, "fp8", m, k, n, bandwidth) + _gemm(curve, "fp8", m, n, k, bandwidth)
                     + _gemm(curve, weight_grad, k, m, n, bandwidth))
    casts = calls * _casts(recipe, m, k, n, bandwidth, launch, fused)
    price = Fp8Price(bf16=bf16, fp8=gemms + casts, gemms=gemms, casts=casts, recipe=recipe, note="")
    return dataclasses.replace(price, note=_why(price, dims))
