"""Measurements shared by the benchmarks: FP64 reference, fidelity, run-time 16-bit FLOPs, training, timing.

Variants are described by :class:`Variant`: a context factory that runs the model in some precision
(``torch.autocast``, a policy's ``autocast``, or nothing for FP32) and the GradScaler settings it
trains with. Nothing here reads a policy's layer table: the 16-bit FLOP fraction is measured from
the dtypes of the aten ops that actually execute (see :class:`PrecisionFlopCounter`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from autoprec.core import call_model

Sample = tuple[Any, Optional[Callable[[Any, Any], torch.Tensor]]]


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------

@dataclass
class Variant:
    """One way of running a model.

    ``context(model)`` returns the context manager a forward runs in; ``install(model)`` (optional)
    installs precision once for a training run and returns something with ``remove()``;
    ``scaler()`` returns a fresh ``torch.amp.GradScaler`` or None.
    """

    name: str
    context: Callable[[nn.Module], Any] = lambda model: nullcontext()
    scaler: Callable[[], Optional[torch.amp.GradScaler]] = lambda: None
    install: Optional[Callable[[nn.Module], Any]] = None
    info: dict[str, Any] = field(default_factory=dict)


def fp32_variant() -> Variant:
    return Variant("fp32")


def amp_variant(dtype: str, device: str = "cpu") -> Variant:
    """Blanket ``torch.autocast`` on ``device``; FP16 trains with a default ``GradScaler``."""
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return Variant(f"amp-{dtype}", context=lambda model: torch.autocast(device, dtype=torch_dtype),
                   scaler=(lambda: torch.amp.GradScaler(device)) if dtype == "fp16" else (lambda: None))


def policy_variant(name: str, policy: Any, default_scaler: bool = False, device: str = "cpu") -> Variant:
    """A policy applied with its public API: ``policy.autocast`` / ``policy.apply`` and ``grad_scaler``.

    ``default_scaler``: use a default ``GradScaler`` where the policy has FP16 layers but no tuned
    scaler settings (the bisection baseline builds bare policies).
    """
    has_fp16 = "fp16" in policy.assignment.values()

    def scaler() -> Optional[torch.amp.GradScaler]:
        s = policy.grad_scaler(device)
        if s is None and has_fp16 and default_scaler:
            s = torch.amp.GradScaler(device)
        return s

    return Variant(name, context=policy.autocast, scaler=scaler, install=policy.apply)


# ---------------------------------------------------------------------------------------------
# loss of one forward
# ---------------------------------------------------------------------------------------------

def loss_of(output: Any, batch: Any, loss_fn: Any) -> torch.Tensor:
    """``loss_fn(output, batch)``, else the model's own loss (scalar, ``.loss`` or ``["loss"]``)."""
    if loss_fn is not None:
        return loss_fn(output, batch)
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["loss"]
    return output.loss


def forward_loss(model: nn.Module, sample: Sample, variant: Variant) -> torch.Tensor:
    batch, loss_fn = sample
    with variant.context(model):
        return loss_of(call_model(model, batch), batch, loss_fn)


# ---------------------------------------------------------------------------------------------
# FP64 reference
# ---------------------------------------------------------------------------------------------

_LOW = (torch.float32, torch.float16, torch.bfloat16)


def _up(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in _LOW:
        return x.double()
    if isinstance(x, torch.dtype) and x in _LOW:
        return torch.float64
    return x


class FP64Mode(TorchFunctionMode):
    """Runs every torch function in FP64: floating arguments and ``dtype=`` go up to float64.

    Model code that pins FP32 (``x.float()``, ``.to(torch.float32)``, FP32 targets captured in a
    loss function) would otherwise mix dtypes or fall back to FP32 inside the reference. Used
    together with ``torch.set_default_dtype(torch.float64)`` so new tensors are FP64 too.
    """

    _TO64 = frozenset({torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._TO64:
            func = torch.Tensor.double
        args, kwargs = pytree.tree_map(_up, (args, kwargs))
        return func(*args, **kwargs)


@contextmanager
def fp64_mode() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with FP64Mode():
            yield
    finally:
        torch.set_default_dtype(old)


def grads_of(model: nn.Module, scale: float = 1.0) -> torch.Tensor:
    """All parameter gradients as one FP64 vector (zeros where a parameter got none)."""
    parts = []
    for p in model.parameters():
        g = p.grad
        parts.append(torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if g is None
                     else g.detach().double().flatten() / scale)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def reference64(model: nn.Module, sample: Sample) -> tuple[float, torch.Tensor]:
    """Loss and gradients of an FP64 copy of ``model`` on ``sample``."""
    m = copy.deepcopy(model).double()
    batch, loss_fn = sample
    batch64 = pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                              batch)
    with fp64_mode():
        loss = loss_of(call_model(m, batch64), batch64, loss_fn)
        loss.backward()
    return float(loss), grads_of(m)


# ---------------------------------------------------------------------------------------------
# fidelity
# ---------------------------------------------------------------------------------------------

@dataclass
class Fidelity:
    loss_err: float
    grad_err: float
    nonfinite: bool
    scale: float          # the loss scale the gradients were taken at (1 without a scaler)
    backoffs: int         # halvings of the scale before the gradients were finite (as a GradScaler skips)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def fidelity(model: nn.Module, sample: Sample, variant: Variant, ref: tuple[float, torch.Tensor],
             max_backoffs: int = 40) -> Fidelity:
    """Loss and gradient error of one forward+backward of ``variant`` against the FP64 reference.

    With a GradScaler the backward runs at its initial scale; where the gradients overflow the scale
    is halved and the pass repeated, as the scaler's skipped steps would do, and the number of
    halvings is reported. A non-finite loss, or gradients that stay non-finite, count as NaN/Inf.
    """
    ref_loss, ref_grads = ref
    s = variant.scaler()
    scale = float(s.get_scale()) if s is not None else 1.0
    backoffs = 0
    while True:
        m = copy.deepcopy(model)
        loss = forward_loss(m, sample, variant)
        lval = float(loss.detach().float())
        if not math.isfinite(lval):
            return Fidelity(math.inf, math.inf, True, scale, backoffs)
        (loss.float() * scale).backward()
        g = grads_of(m, scale)
        if bool(torch.isfinite(g).all()):
            break
        if s is None or backoffs >= max_backoffs:
            return Fidelity(rel(lval, ref_loss), math.inf, True, scale, backoffs)
        scale /= 2
        backoffs += 1
    gerr = float((g - ref_grads).norm() / ref_grads.norm().clamp_min(1e-300))
    return Fidelity(rel(lval, ref_loss), gerr, False, scale, backoffs)


# ---------------------------------------------------------------------------------------------
# 16-bit FLOPs, measured from the ops that run
# ---------------------------------------------------------------------------------------------

def _cpu_sdpa(q, k, v, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(q.shape, k.shape, v.shape)


def _cpu_sdpa_backward(grad_out, q, k, v, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape)


#: torch.utils.flop_counter's registry (mm, addmm, bmm, baddbmm, convolution(+backward), attention
#: kernels), plus the CPU flash-attention kernels that registry lacks in torch 2.13.
FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    **flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def _fp16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.to(torch.float16).to(t.dtype), t))


def _bf16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.to(torch.bfloat16).to(t.dtype), t))


#: ops whose trailing floating arguments are saved forward results (``out``, ``logsumexp``), not
#: operands the emulation rounds: only their first four (grad_out, q, k, v) are checked
_SAVED_RESULTS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
                  torch.ops.aten._scaled_dot_product_flash_attention_backward,
                  torch.ops.aten._scaled_dot_product_efficient_attention_backward}


def _storage(t: Any) -> int | None:
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


_TO_COPY = torch.ops.aten._to_copy.default


class PrecisionFlopCounter(TorchDispatchMode):
    """Counts matmul/conv/attention FLOPs by the precision each executed aten op ran in.

    The FLOPs of an op come from ``torch.utils.flop_counter``'s formulas (plus the CPU flash
    attention kernels), its precision from the dtypes of its floating inputs: FP16 or BF16 if any
    input is.

    **Emulated FP16.** On a CPU autoprec runs an FP16 layer's matmul/conv as an FP32 kernel on
    operands rounded to FP16 just before the call (``x.to(float16).to(float32)`` for each operand,
    as tensor cores see them). Those ops are counted as FP16, recognised from the op stream:

    * forward: every floating operand is (a view of) its own FP16->FP32 copy made in the run of
      casts and view ops directly before the op, and holds only FP16-representable values;
    * backward: at least one operand is a tensor that a forward emulated op consumed (autograd saved
      it), the others are FP16->FP32 copies (the gradient coming back through the cast), and all
      hold only FP16-representable values.

    An FP32 op on activations that FP16 layers produced (an attention kept in FP32 between FP16
    projections) fails both tests: its operands were cast back to FP32 when the FP16 region ended,
    not re-rounded right before it, and they were never operands of an emulated op.
    """

    def __init__(self, detect_emulation: bool = True) -> None:
        super().__init__()
        self.detect_emulation = detect_emulation
        self.flops: dict[str, int] = {"fp32": 0, "fp16": 0, "fp16-emulated": 0, "bf16": 0}
        self._block: set[int] = set()        # FP16->FP32 copies since the last compute op
        self._upcasts: set[int] = set()      # every FP16->FP32 copy of the pass
        self._emulated_in: set[int] = set()  # operands of ops counted as emulated FP16
        # the storages behind those keys stay referenced for the pass, so that a freed storage's
        # address cannot be reused by an unrelated tensor and match by accident
        self._keep: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _TO_COPY:
            src = args[0] if args else None
            if (isinstance(src, torch.Tensor) and src.dtype == torch.float16
                    and kwargs.get("dtype") == torch.float32):
                key = _storage(out)
                self._block.add(key)
                self._upcasts.add(key)
                self._keep.append(out.untyped_storage())
            return out
        if getattr(func, "is_view", False) or func._overloadpacket is torch.ops.aten.detach:
            return out
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            n = int(formula(*args, **kwargs, out_val=out))
            self.flops[self._classify(func, args, kwargs)] += n
        self._block = set()
        return out

    def _classify(self, func: Any, args: tuple, kwargs: dict) -> str:
        floats = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        dtypes = {t.dtype for t in floats}
        if torch.float16 in dtypes:
            return "fp16"
        if torch.bfloat16 in dtypes:
            return "bf16"
        if not self.detect_emulation:
            return "fp32"
        operands = floats[:4] if func._overloadpacket in _SAVED_RESULTS else floats
        keys = [_storage(t) for t in operands]
        if not operands or None in keys:
            return "fp32"
        forward = all(k in self._block for k in keys) and len(set(keys)) == len(keys)
        backward = (any(k in self._emulated_in for k in keys)
                    and all(k in self._emulated_in or k in self._upcasts for k in keys))
        if (forward or backward) and all(_fp16_exact(t) for t in operands):
            if forward:
                self._emulated_in.update(keys)
                self._keep.extend(t.untyped_storage() for t in operands)
            return "fp16-emulated"
        return "fp32"

    def __exit__(self, *exc: object) -> Any:
        self._keep.clear()
        return super().__exit__(*exc)

    def fractions(self) -> dict[str, float]:
        total = sum(self.flops.values())
        if not total:
            return {"fp16": 0.0, "bf16": 0.0, "low": 0.0, "emulated": 0.0, "total_flops": 0}
        fp16 = self.flops["fp16"] + self.flops["fp16-emulated"]
        return {"fp16": fp16 / total, "bf16": self.flops["bf16"] / total,
                "low": (fp16 + self.flops["bf16"]) / total, "emulated": self.flops["fp16-emulated"] / total,
                "total_flops": total}


def measure_flops(model: nn.Module, sample: Sample, variant: Variant) -> dict[str, float]:
    """Forward+backward of ``variant`` on a copy of ``model`` under :class:`PrecisionFlopCounter`."""
    m = copy.deepcopy(model)
    counter = PrecisionFlopCounter()
    s = variant.scaler()
    scale = float(s.get_scale()) if s is not None else 1.0
    with counter:
        loss = forward_loss(m, sample, variant)
        (loss.float() * scale).backward()
    return counter.fractions()


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainRun:
    losses: list[float]
    skipped: int
    nonfinite_steps: int
    final: float            # mean loss of the last 5 steps


def train(model: nn.Module, samples: list[Sample], variant: Variant, steps: int,
          optimizer: Callable[[Any], torch.optim.Optimizer]) -> TrainRun:
    """``steps`` steps from a copy of ``model`` (identical weights), cycling ``samples`` (identical data).

    The precision is installed once (``policy.apply``) where the variant can; a GradScaler step
    that lowers the scale counts as skipped. Without a scaler, the run stops at a non-finite loss.
    """
    m = copy.deepcopy(model)
    opt = optimizer([p for p in m.parameters() if p.requires_grad])
    scaler = variant.scaler()
    handle = variant.install(m) if variant.install is not None else None
    ctx = (lambda mm: nullcontext()) if handle is not None else variant.context
    losses: list[float] = []
    skipped = nonfinite = 0
    try:
        for step in range(steps):
            batch, loss_fn = samples[step % len(samples)]
            opt.zero_grad(set_to_none=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step)
                with ctx(m):
                    loss = loss_of(call_model(m, batch), batch, loss_fn)
            val = float(loss.detach().float())
            losses.append(val)
            if not math.isfinite(val):
                nonfinite += 1
            if scaler is not None:
                before = scaler.get_scale()
                scaler.scale(loss.float()).backward()
                scaler.step(opt)
                scaler.update()
                skipped += int(scaler.get_scale() < before)
            else:
                if not math.isfinite(val):
                    break
                loss.float().backward()
                opt.step()
    finally:
        if handle is not None:
            handle.remove()
    tail = losses[-5:]
    final = sum(tail) / len(tail) if tail else math.nan
    return TrainRun(losses, skipped, nonfinite, final)


class _CastCounter(TorchDispatchMode):
    """Bytes read and written by dtype casts between floating formats (``aten._to_copy``)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
            src = args[0]
            if src.is_floating_point() and out.is_floating_point() and out.dtype != src.dtype:
                self.count += 1
                self.bytes += src.numel() * (src.element_size() + out.element_size())
        return out


def cast_traffic(model: nn.Module, sample: Sample, variant: Variant) -> tuple[int, int]:
    """(casts, bytes they move) in one forward+backward of ``variant`` on a copy of ``model``.

    Casts are memory-bound kernels: on a GPU their bytes are what a per-layer policy can cost over
    blanket autocast. The count is the same on any device.
    """
    m = copy.deepcopy(model)
    handle = variant.install(m) if variant.install is not None else None
    counter = _CastCounter()
    try:
        batch, loss_fn = sample
        with counter:
            with (nullcontext() if handle is not None else variant.context(m)):
                loss = loss_of(call_model(m, batch), batch, loss_fn)
            loss.float().backward()
    finally:
        if handle is not None:
            handle.remove()
    return counter.count, counter.bytes


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def step_times(model: nn.Module, samples: list[Sample], variants: list[Variant], rounds: int, warmup: int = 2,
               optimizer: Callable[[Any], torch.optim.Optimizer] | None = None) -> dict[str, list[float]]:
    """Seconds per training step (forward, backward, optimizer step) for each variant.

    One CPU thread, variants interleaved (the order rotates every round: autoprec's
    ``Clock.rounds``, which ``tune``'s own step timing uses) so that load on the machine hits them
    alike; each variant trains its own copy with its precision installed once. A step's time is a
    throughput: each sample runs steps back to back between two events (CUDA events on a GPU) and
    synchronizes once, as many as the warm-up says fill ``autoprec.device._timing.SAMPLE_S`` (one
    for a step longer than that).
    """
    from autoprec.device import Clock

    device = next(model.parameters()).device
    optimizer = optimizer or (lambda p: torch.optim.Adam(p, lr=1e-4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    handles, steps = [], {}

    def step_of(v: Variant) -> Callable[[], None]:
        m = copy.deepcopy(model)
        handle = v.install(m) if v.install is not None else None
        handles.append(handle)
        opt, scaler, count = optimizer(m.parameters()), v.scaler(), [0]

        def one() -> None:
            batch, loss_fn = samples[count[0] % len(samples)]
            count[0] += 1
            opt.zero_grad(set_to_none=True)
            with (nullcontext() if handle is not None else v.context(m)):
                loss = loss_of(call_model(m, batch), batch, loss_fn)
            if scaler is not None:
                scaler.scale(loss.float()).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.float().backward()
                opt.step()
        return one

    try:
        for v in variants:
            steps[v.name] = step_of(v)
        return Clock(device, 0.0).rounds(steps, least=rounds, most=rounds, warmup=warmup)
    finally:
        torch.set_num_threads(threads)
        for h in handles:
            if h is not None:
                h.remove()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def write_json(path: str, result: Any) -> Any:
    """Write a benchmark's ``result`` to ``path`` (its folder made if missing), indented; returns ``result``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    return result
