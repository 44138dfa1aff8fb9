"""The modelled step time of a layer in each format, priced from a :class:`DeviceProfile`.

A model, not a timing: it ranks assignments. One training step of a layer (forward and
backward) costs, in seconds:

* its own work: where the profile measured this very layer (its shape, on the device: see
  :mod:`autoprec.device._calibration`), that time; otherwise the matmul/conv/attention time the profile
  measured along a ladder of sizes, interpolated at the layer's FLOPs per call, plus its other
  elementwise work at the profile's per-call and per-element rates (the per-call term is the
  kernel launch on a GPU, the dispatcher on a CPU);
* in a 16-bit region, also the region's own overhead per call (the runtime's Python, autocast,
  small casts: measured) and the casts of its floating inputs and outputs (per element,
  measured), unless they are handed over uncast.

:func:`layer_cost` prices a layer alone, with all its casts. A whole assignment is priced per
*edge* of the handoff graph (:class:`StepCost`): the runtime hands a 16-bit output on uncast to
the layers it feeds, so a cast is paid where producer and consumer run in different formats, and
at the model's own edges (an input that comes from no handing-over layer, an output that leaves
the layers), not around every 16-bit layer.

Ops that a 16-bit region computes in FP32 on the target (``full_width_ops``: CUDA autocast's FP32
list, the losses under CPU autocast) are priced at their FP32 rate there: such a layer pays the
casts and gains nothing. Nothing here assumes a format is fast: every speed is a profile figure,
and a profile says where its figures came from (``origin``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ..core._ops import HAZARD_OPS
from ..trace._trace import Layer

__all__ = ["Curve", "DeviceProfile", "ORIGINS", "StepCost", "cost_note", "format_speed", "layer_cost", "shape_key"]

#: Where a profile's figures come from.
ORIGINS = ("calibrated", "file", "estimate")
#: Classes of elementwise work the profile prices separately (they differ per format on a CPU).
ELEMENTWISE = ("pointwise", "norm", "softmax", "accumulation")
KINDS = ("matmul", "conv", "attention")


@dataclass(frozen=True)
class Curve:
    """Measured forward+backward seconds of one kernel kind at ascending sizes (forward FLOPs per call)."""

    kind: str                               # "matmul" | "conv" | "attention"
    flops: tuple[float, ...]                # ascending
    seconds: dict[str, tuple[float, ...]]   # format -> seconds per call at each size, non-decreasing; the
    #                                         matmul curve may add "fp8": three FP8 GEMMs, no casts

    def at(self, precision: str, flops: float) -> float:
        """Seconds of one call of ``flops`` forward FLOPs: interpolated log-log between measured sizes,
        never cheaper than the smallest (launch-bound), at the largest size's throughput beyond it.

        Example:
            >>> Curve("matmul", (1e6, 1e8), {"fp32": (1e-5, 1e-3)}).at("fp32", 1e7)
            0.0001
        """
        xs, ys = self.flops, self.seconds[precision]
        if flops <= xs[0]:
            return ys[0]
        if flops >= xs[-1]:
            return ys[-1] * flops / xs[-1]
        i = bisect.bisect_right(xs, flops)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        w = math.log(flops / x0) / math.log(x1 / x0)
        return round(math.exp((1 - w) * math.log(y0) + w * math.log(y1)), 15)


@dataclass(frozen=True)
class DeviceProfile:
    """What the cost model knows of one target device, and where each figure came from."""

    target: str                                   # "cpu" | "cuda"
    device: str                                   # the device's name
    capability: str                               # e.g. "AVX512, avx512_bf16, amx" or "sm_90"
    origin: str                                   # "calibrated" | "file" | "estimate"
    curves: tuple[Curve, ...]
    elementwise: dict[str, dict[str, tuple[float, float]]]  # class -> format -> (s per call, s per element)
    cast: dict[str, float]                        # format -> s per element cast each way, forward+backward
    region: dict[str, float]                      # format -> s per call of a region in it (the runtime's own)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # shape_key -> format -> s per call
    full_width_ops: frozenset[str] = frozenset()  # ops a 16-bit region computes in FP32 on this target
    torch_version: str = ""
    threads: int = 0                              # intra-op threads it was measured with (0: not measured)
    source: str = ""                              # the file or cache it was read from; "" for an estimate
    seconds: float = 0.0                          # calibration time spent in this run

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats it prices (FP32 always).

        Example:
            >>> from autoprec.device import estimate
            >>> estimate("cuda").formats
            ('fp32', 'fp16', 'bf16')
        """
        return ("fp32",) + tuple(f for f in ("fp16", "bf16") if f in self.cast)

    @property
    def fp8(self) -> bool:
        """Whether it prices FP8 GEMMs: an ``"fp8"`` entry in its matmul curve (three FP8 GEMMs per call, no
        casts; see :func:`autoprec.device.fp8_price`). Not one of :attr:`formats`: FP8 is a format of
        ``nn.Linear`` GEMMs, not of a 16-bit region.

        Example:
            >>> from autoprec.device import estimate
            >>> estimate("cuda").fp8
            True
        """
        return any(c.kind == "matmul" and "fp8" in c.seconds for c in self.curves)

    def describe(self) -> str:
        """One line: what the figures are and where they come from.

        Example:
            >>> from autoprec.device import estimate
            >>> estimate("cuda").describe()
            'built-in estimate for cuda (not measured: run `autoprec calibrate` on the GPU)'
        """
        if self.origin == "estimate":
            return f"built-in estimate for {self.target} (not measured: run `autoprec calibrate` on the GPU)"
        where = "calibrated here" if self.origin == "calibrated" else f"profile file {self.source}"
        return (f"{where}: {self.device} ({self.capability}), torch {self.torch_version}, "
                f"{self.threads} thread(s)")


def shape_key(layer: Layer) -> str:
    """The key a profile measures a layer by: op, shapes, FLOPs and parameters of one call.

    Example:
        >>> lin = Layer("fc", "module", "Linear", (), ("linear",), ((8, 4),), ((8, 2),), flops=128,
        ...             in_numel=32, out_numel=16, work_numel=16, param_numel=10, calls=1)
        >>> shape_key(lin)
        'Linear|8x4|8x2|128|10'
    """
    def shapes(s: tuple[tuple[int, ...], ...]) -> str:
        return ",".join("x".join(map(str, t)) for t in s)

    calls = max(layer.calls, 1)
    return f"{layer.op}|{shapes(layer.in_shapes)}|{shapes(layer.out_shapes)}|{layer.flops // calls}|{layer.param_numel}"


def _kernel_kind(layer: Layer) -> str:
    """Which measured curve prices a layer's matmul/conv FLOPs."""
    names = {o.strip("_").lower() for o in layer.ops} | {layer.op.lower()}
    if any("conv" in n for n in names):
        return "conv"
    if any("attention" in n for n in names):
        return "attention"
    return "matmul"


def _elementwise_kind(layer: Layer) -> str:
    """Which measured elementwise rate prices a layer's work without matmul FLOPs."""
    hazards = {HAZARD_OPS.get(o.strip("_")) for o in layer.ops}
    if "accumulation" in hazards:
        return "accumulation"
    if "softmax" in hazards:
        return "softmax"
    if "variance/norm" in hazards or "norm" in layer.op.lower():
        return "norm"
    return "pointwise"


def _body(layer: Layer, run: str, profile: DeviceProfile) -> tuple[float, str]:
    """Seconds of the layer's own work in format ``run`` (no region, no casts), and where it came from."""
    calls = max(layer.calls, 1)
    measured = profile.layers.get(shape_key(layer))
    if measured is not None and run in measured:
        return calls * measured[run], "measured at this layer's shape"
    if layer.flops > 0:
        kind = _kernel_kind(layer)
        curve = next((c for c in profile.curves if c.kind == kind), None)
        if curve is None:
            curve, kind = next(c for c in profile.curves if c.kind == "matmul"), "matmul"
        extra = max(layer.work_numel - layer.out_numel, 0)
        per_call, per_elem = profile.elementwise["pointwise"][run]
        return (calls * curve.at(run, layer.flops / calls) + per_elem * extra,
                f"modelled from the profile's {kind} curve")
    kind = _elementwise_kind(layer)
    per_call, per_elem = profile.elementwise[kind][run]
    kernels = calls * max(len(layer.ops), 1)
    return kernels * per_call + per_elem * max(layer.work_numel, layer.out_numel), f"modelled from {kind} rates"


def _full_width(layer: Layer, profile: DeviceProfile) -> bool:
    """Whether the layer's work runs in FP32 inside a 16-bit region: an op of ``full_width_ops`` (``__pow__``,
    ``index_add_``), in a layer whose body is no matmul. A unit module with matmul FLOPs is priced by them, in
    its format (its matmuls run in it: autocast's own, and grouped experts' with their stacked weights cast in
    the region, see ``autoprec.runtime``): a routing ``cumsum`` or a ``sum`` beside them does not make them FP32."""
    if layer.kind == "module" and layer.flops > 0:
        return False
    return any(o.strip("_") in profile.full_width_ops for o in layer.ops)


def layer_cost(layer: Layer, precision: str, profile: DeviceProfile, *, casts: bool = True) -> float:
    """Modelled seconds of one training step (forward+backward) of ``layer`` in ``precision``.

    ``casts=False``: without the cast of its inputs and outputs, for a layer whose inputs arrive in
    its format and whose output goes on uncast (see the runtime's handoff).

    Example:
        >>> def linear(rows, width):
        ...     return Layer("fc", "module", "Linear", (), ("linear",), ((rows, width),), ((rows, width),),
        ...                  flops=2 * rows * width * width, in_numel=rows * width, out_numel=rows * width,
        ...                  work_numel=rows * width, param_numel=width * width + width, calls=1)
        >>> from autoprec.device import estimate
        >>> cuda = estimate("cuda")
        >>> layer_cost(linear(4096, 1024), "bf16", cuda) < layer_cost(linear(4096, 1024), "fp32", cuda)
        True
        >>> layer_cost(linear(64, 64), "bf16", cuda) < layer_cost(linear(64, 64), "fp32", cuda)  # launch-bound
        False
    """
    return _cost(layer, precision, profile, casts)[0]


def _cost(layer: Layer, precision: str, profile: DeviceProfile, casts: bool) -> tuple[float, str]:
    if precision == "fp32":
        return _body(layer, "fp32", profile)
    measured = shape_key(layer) in profile.layers
    run = "fp32" if _full_width(layer, profile) and not measured else precision
    body, where = _body(layer, run, profile)
    if run != precision:
        where += f" (computes in FP32 inside a {precision} region on {profile.target})"
    cast = profile.cast[precision] * (layer.in_numel + layer.out_numel) if casts else 0.0
    return body + cast + max(layer.calls, 1) * profile.region[precision], where


def cost_note(layer: Layer, formats: tuple[str, ...], profile: DeviceProfile) -> str:
    """The step time of ``layer`` in FP32 and each format, and where each figure came from.

    Example:
        >>> lin = Layer("fc", "module", "Linear", (), ("linear",), ((8, 16),), ((8, 16),), flops=4096,
        ...             in_numel=128, out_numel=128, work_numel=128, param_numel=272, calls=1)
        >>> from autoprec.device import estimate
        >>> print(cost_note(lin, ("bf16",), estimate("cuda")))  # doctest: +NORMALIZE_WHITESPACE
        step time fp32 15 us, bf16 35 us (2.33x FP32) with its region and casts; modelled from the profile's
        matmul curve; built-in estimate for cuda (not measured: run `autoprec calibrate` on the GPU)
    """
    t32, where = _cost(layer, "fp32", profile, True)
    parts, sources = [f"fp32 {_time(t32)}"], [where]
    for fmt in formats:
        t, w = _cost(layer, fmt, profile, True)
        ratio = t / t32 if t32 > 0 else float("inf")
        parts.append(f"{fmt} {_time(t)} ({ratio:.3g}x FP32)")
        sources.append(w)
    unique = list(dict.fromkeys(sources))
    src = "; ".join(s for s in unique if not any(o != s and o.startswith(s) for o in unique))
    return f"step time {', '.join(parts)} with its region and casts; {src}; {profile.describe()}"


def _time(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def format_speed(layers: list[Layer], formats: tuple[str, ...], profile: DeviceProfile) -> dict[str, dict[str, float]]:
    """Per format, over the layers with matmul/conv FLOPs: ``speed``, their modelled FP32 step time
    over their time all in that format (regions and casts included; below 1 the format is slower
    here), and ``faster``, how many of the ``layers`` alone run faster in it.

    Example:
        >>> lin = Layer("fc", "module", "Linear", (), ("linear",), ((4096, 1024),), ((4096, 1024),),
        ...             flops=2 * 4096 * 1024 * 1024, in_numel=4096 * 1024, out_numel=4096 * 1024,
        ...             work_numel=4096 * 1024, param_numel=1024 * 1025, calls=1)
        >>> from autoprec.device import estimate
        >>> format_speed([lin], ("bf16",), estimate("cuda"))
        {'bf16': {'speed': 4.3558, 'faster': 1, 'layers': 1}}
    """
    heavy = [lay for lay in layers if lay.flops > 0]
    t32 = [layer_cost(lay, "fp32", profile) for lay in heavy]
    out = {}
    for f in formats:
        t = [layer_cost(lay, f, profile) for lay in heavy]
        out[f] = {"speed": round(sum(t32) / sum(t), 4) if heavy else 1.0,
                  "faster": sum(a < b for a, b in zip(t, t32)), "layers": len(heavy)}
    return out


class StepCost:
    """The modelled step time of a whole assignment, its casts priced per edge of the handoff graph.

    ``handoff`` maps a layer to the layers its output flows into when that is all it flows into
    (:attr:`autoprec.trace.Trace.handoff`); the runtime hands such a layer's 16-bit output on uncast,
    and each consumer casts it on entry only if it runs in another format. So, per layer in format ``p``:

    * its inputs from handing-over producers cost a cast for the share of producers in another
      format (an FP32 consumer casts a 16-bit producer's output up; a 16-bit one casts the rest
      down); inputs from no such producer (the model's input, a layer whose output also goes
      elsewhere) arrive FP32 and cost a cast in a 16-bit layer;
    * a 16-bit layer whose output does not only feed layers hands it back FP32: one more cast.

    A layer with no handoff edges costs what :func:`layer_cost` says with its casts. Layers an
    assignment leaves out count as FP32.

    Example:
        >>> def lay(key, rows, width, flops):
        ...     return Layer(key, "module", "Linear" if flops else "GELU", (), ("linear",) if flops else ("gelu",),
        ...                  ((rows, width),), ((rows, width),), flops=flops, in_numel=rows * width,
        ...                  out_numel=rows * width, work_numel=rows * width, param_numel=0, calls=1)
        >>> from autoprec.device import estimate
        >>> chain = [lay("a", 4096, 1024, 2 * 4096 * 1024 ** 2), lay("b", 4096, 1024, 0),
        ...          lay("c", 4096, 1024, 2 * 4096 * 1024 ** 2)]
        >>> cost = StepCost(chain, {"a": ("b",), "b": ("c",)}, estimate("cuda"))
        >>> cost.cast_numel({"a": "bf16", "b": "fp32", "c": "bf16"}) // (4096 * 1024)  # a in, b in, c in, c out
        4
        >>> cost.cast_numel({"a": "bf16", "b": "bf16", "c": "bf16"}) // (4096 * 1024)  # a in, c out
        2
    """

    def __init__(self, layers: Iterable[Layer], handoff: Mapping[str, Iterable[str]], profile: DeviceProfile) -> None:
        self.profile = profile
        self.layers = {lay.key: lay for lay in layers}
        self.consumers = {k: tuple(c for c in v if c in self.layers) for k, v in handoff.items() if k in self.layers}
        self.consumers = {k: v for k, v in self.consumers.items() if v}
        producers: dict[str, list[str]] = {}
        for p, cs in self.consumers.items():
            for c in cs:
                producers.setdefault(c, []).append(p)
        self.producers = {k: tuple(v) for k, v in producers.items()}
        self._body: dict[tuple[str, str], float] = {}

    def body(self, key: str, precision: str) -> float:
        """Seconds of ``key`` in ``precision`` with its region, without any cast."""
        got = self._body.get((key, precision))
        if got is None:
            got = self._body[key, precision] = layer_cost(self.layers[key], precision, self.profile, casts=False)
        return got

    def _casts(self, key: str, a: Mapping[str, str]) -> tuple[float, float]:
        """(seconds, elements) of the casts ``key`` pays under ``a``: on its input edges, and its output's."""
        lay, p = self.layers[key], a.get(key, "fp32")
        seconds = elements = 0.0
        producers = self.producers.get(key, ())
        if producers:
            share = lay.in_numel / len(producers)
            for q in producers:
                fq = a.get(q, "fp32")
                if fq != p:
                    elements += share
                    seconds += share * self.profile.cast[p if p != "fp32" else fq]
        elif p != "fp32":
            elements += lay.in_numel
            seconds += lay.in_numel * self.profile.cast[p]
        if p != "fp32" and key not in self.consumers:
            elements += lay.out_numel
            seconds += lay.out_numel * self.profile.cast[p]
        return seconds, elements

    def of(self, key: str, a: Mapping[str, str]) -> float:
        """Seconds of layer ``key`` under assignment ``a``: its work, region, and the casts it pays."""
        return self.body(key, a.get(key, "fp32")) + self._casts(key, a)[0]

    def local(self, key: str, a: Mapping[str, str]) -> float:
        """The part of the step time that depends on the format of ``key``: its own, and its consumers'."""
        return self.of(key, a) + sum(self.of(c, a) for c in self.consumers.get(key, ()))

    def total(self, a: Mapping[str, str]) -> float:
        """Modelled seconds of one training step of all the layers under ``a``."""
        return sum(self.of(key, a) for key in self.layers)

    def cast_numel(self, a: Mapping[str, str]) -> int:
        """Elements cast per step under ``a`` (each cast once forward, its gradient once backward)."""
        return round(sum(self._casts(key, a)[1] for key in self.layers))
