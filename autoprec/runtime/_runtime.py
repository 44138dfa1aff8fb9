"""Per-layer precision at run time: the one runtime that trace, probe, verify and apply share.

A *layer* is either a **unit module** (a leaf, or an atomic module such as ``nn.MultiheadAttention``,
run as one piece) keyed by its canonical path, or a **functional op** called in a non-unit module's
own ``forward`` (an accumulation, a softmax, a matmul between leaves, ...) keyed ``"module.path::op"``
with ``_1``, ``_2`` ... for the same op called from other lines of code in that forward (the root's
path is ``""``); the calls from one line, as in a loop, are one layer.

How it runs: each module that has something to do gets its class swapped for a cached subclass
(the way torchao and FSDP2 change a module) whose ``forward`` runs the original one inside a
``with torch.autocast(...)`` block, and the per-module settings live on the instance as plain
frozen data. ``torch.compile`` traces all of it with no graph break, guards on the class and the
settings (so applying another policy, or removing it, recompiles), and activation checkpointing
recomputes through the same ``forward``, so recomputation runs in the precision the forward ran.
No state lives on the runtime between calls: what one forward needs (the op counts in a module's
own code) lives in a ``TorchFunctionMode`` made for that call on torch's per-thread mode stack, so
threads running one model never share it. Own code whose op entries ``torch.autocast`` alone runs as
their regions would (``_covers``: GPT-2's attention with its SDPA entry) runs under autocast, with no
mode: on a 12-layer GPT-2 an eager forward with every layer in BF16 makes 1.27x the Python calls of
blanket autocast (``benchmarks/runtime_overhead.py``).

A region with precision ``p``:

* enters ``torch.autocast`` for ``p`` (disabled for ``"fp32"``) and casts the layer's floating
  inputs to ``p``, so the ops inside run in ``p``, not only the ones on autocast's list (on CUDA,
  autocast's own FP32 list still lifts norms, softmax, pow/exp/log, sums and losses);
* hands its floating outputs back in the dtype its first floating input arrived in, so the code
  between layers always sees one dtype; except where the trace saw the output flow only into other
  layers of the assignment (``handoff``): each of those casts its inputs on entry anyway, so the
  16-bit output goes to them as it is (autocast's own behaviour, bit-identical forward values), and
  they hand back the model's own floating dtype. Only with grad mode on: a custom
  ``autograd.Function``'s forward runs with it off, and its hand-written backward expects the
  dtypes its forward saw;
* an FP32 region does nothing (not even a cast) unless a caller's autocast is on or a 16-bit
  tensor reaches it: an FP32 layer costs two Python calls per step in eager mode, none compiled. An
  FP32 layer whose parameters are 16-bit (FSDP2's ``param_dtype``, a cast model) is an error that
  names :func:`autoprec.fsdp_plan`, never a silent 16-bit computation.

FP16 on a CPU has no fast kernels; with ``emulate_fp16`` the matmul/conv family is emulated the way
GPU tensor cores run it: operands rounded to FP16, products accumulated in FP32, the result rounded
to FP16. With ``emulate_cuda`` (a policy for CUDA run on a CPU) the 16-bit regions follow CUDA
autocast's rules instead of the CPU's: its FP32 ops in FP32, its promote ops in the widest input
dtype, FFTs as cuFFT runs them (see :mod:`autoprec.runtime._emulation`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from ..core._formats import to_dtype
from ..core._fp8 import Fp8Gemms, fp8_gemms, fp8_linear
from ..core._modules import canonical_modules, stacked
from ..core._ops import CUDA_LOWER_OPS
from ..errors import PolicyError
from ._casts import (
    LOW,
    autocast_for,
    cast_args,
    cast_tree,
    dynamo_compiling,
    eager,
    enter_autocast,
    has_low,
    leave_autocast,
)
from ._opmodes import (
    MODE_HANDLERS,
    EagerOwnCode,
    Emulate,
    EmulateCuda,
    EmulateCudaFp16,
    OwnCode,
    back_dtype,
    owner,
    run_eagerly_after_a_break,
)

__all__ = ["Patches", "Runtime", "Watcher", "installed"]

_SPEC = "_autoprec_spec"
_modes_on = torch._C._is_torch_function_mode_enabled


class Watcher(Protocol):
    """Observes layers as they run (the probe records ranges, the trace records FLOPs).

    A watcher may also define ``call(func, args, kwargs, out)``, told of every torch call in code
    that is no layer (own code between layers, opaque code), and ``finish(output)``, told of what
    the root module returns: the trace follows where each layer's output goes with them.
    """

    def enter(self, key: str, kind: str, inputs: tuple) -> None: ...

    def exit(self, key: str, kind: str, raw: Any, final: Any) -> None: ...


@dataclass(frozen=True, eq=False)
class _Spec:
    """What one module's ``forward`` does besides its own work (plain data, set per instance)."""

    path: str
    device_type: str
    precision: str | None = None       # a unit's region, or None
    dtype: torch.dtype | None = None   # its torch dtype
    autocast_dtype: torch.dtype | None = None  # the dtype its region's autocast runs (16-bit, not emulated), else None
    unit: bool = False
    emulate: bool = False              # FP16 matmuls emulated inside (CPU)
    gaps: bool = False                 # 16-bit, its own parameters cast inside the region (see ``_may_gap``)
    keep: bool = False                 # hands a 16-bit output on uncast (handoff)
    fed: bool = False                  # fed by a kept layer: hands back ``handback`` for 16-bit input
    handback: torch.dtype = torch.float32
    boundary: bool = False             # called from a parent whose own code is tracked: hide its ops
    own: bool = False                  # its own code's functional ops are tracked
    own_always: bool = False           # ... even without a caller's autocast
    opaque: bool = False               # own code tracked for a watcher only, never split into layers
    entries: Mapping[str, str] | None = None      # op key -> precision (own code)
    op_keep: frozenset = frozenset()
    op_fed: frozenset = frozenset()
    emulate_fp16: bool = False
    emulate_cuda: bool = False         # 16-bit regions follow CUDA autocast's rules (a CUDA policy on a CPU)
    root: bool = False
    watcher: Any = None
    observe: Callable[[Any], None] | None = None  # told of a 16-bit unit's raw output (autoprec.guard's watch)
    op_observe: Mapping[str, Callable[[Any], None]] | None = None  # op key -> told of that 16-bit op's raw output
    covered: torch.dtype | None = None  # own code whose op entries autocast alone runs as their regions would
    fp8: Fp8Gemms | None = None        # an "fp8" Linear: its GEMMs in FP8 (torchao), autocast off, the rest BF16
    # derived: a unit, no boundary, no root (its forward goes straight to ``_unit``); a region without a mode inside
    direct: bool = field(init=False)
    plain: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "direct", self.unit and not self.boundary and not self.root)
        object.__setattr__(self, "plain", not (self.emulate or self.gaps or self.fp8 is not None
                                               or (self.emulate_cuda and self.dtype in LOW)))


# -- one module's forward ---------------------------------------------------------------------
def _check_fp32_params(path: str, module: nn.Module) -> None:
    for name, p in module._parameters.items():
        if p is not None and p.dtype in LOW:
            raise PolicyError(
                f"layer {path!r} is FP32 in the policy, but its parameter {name!r} is {p.dtype} here (FSDP2's "
                "MixedPrecisionPolicy(param_dtype=...) gathers it in 16 bits, or the model was cast): give each "
                "layer of autoprec.fsdp_plan(policy, model) its own fully_shard unit with "
                "MixedPrecisionPolicy(param_dtype=torch.float32) before sharding the modules around it, or "
                "keep the parameters FP32")


def _call(spec: _Spec, forward: Callable, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    run = _unit if spec.unit and not spec.root else _body
    n = torch._C._len_torch_function_stack() if spec.boundary else 0
    if n:  # a boundary under a mode: its parent's own code may be tracked
        top = torch._C._get_function_stack_at(n - 1)
        if type(top) is EagerOwnCode:  # eager: the parent's mode steps off the stack while its child runs
            torch._C._pop_torch_function_stack()
            try:
                return run(spec, forward, module, args, kwargs)
            finally:
                torch._C._push_on_torch_function_stack(top)
        mode = owner()  # traced, or another mode above it: the parent's mode lets the child's ops pass
        if mode is not None:
            mode.depth += 1
            try:
                return run(spec, forward, module, args, kwargs)
            finally:
                mode.depth -= 1
    return run(spec, forward, module, args, kwargs)


def _body(spec: _Spec, forward: Callable, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    if spec.unit:
        out = _unit(spec, forward, module, args, kwargs)
    elif spec.own and (spec.own_always or torch.is_autocast_enabled(spec.device_type) or has_low(args, kwargs)):
        if spec.covered is not None and spec.op_observe is None and torch.is_grad_enabled():
            out = _covered(spec, forward, module, args, kwargs)
        elif eager():  # the mode pushed by hand: what its __enter__/__exit__ do, without their Python calls
            torch._C._push_on_torch_function_stack(EagerOwnCode(spec))
            try:
                out = forward(module, *args, **kwargs)
            finally:
                torch._C._pop_torch_function_stack()
        else:
            with OwnCode(spec):
                out = forward(module, *args, **kwargs)
    else:
        out = forward(module, *args, **kwargs)
    if spec.root and spec.watcher is not None and hasattr(spec.watcher, "finish"):
        spec.watcher.finish(out)
    return out


#: Ops that a device's autocast casts to its 16-bit format (all floating inputs, as a region casts them) and that
#: have no in-place form (autocast leaves in-place calls alone), by the names op layers have.
AUTOCAST_COVERS = {
    "cpu": frozenset({"linear", "matmul", "mm", "bmm", "einsum", "prelu", "scaled_dot_product_attention", "conv1d",
                      "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}),
    "cuda": frozenset({"linear", "matmul", "mm", "bmm", "einsum", "prelu", "scaled_dot_product_attention", "conv1d",
                       "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}) & CUDA_LOWER_OPS,
}


def _covers(entries: Mapping[str, str], keep: frozenset, device_type: str, handback: torch.dtype,
            emulate_fp16: bool) -> torch.dtype | None:
    """The 16-bit dtype in which ``torch.autocast`` over a module's own code gives exactly what its op regions give,
    or None: every op entry is one 16-bit format, hands its output on uncast (``keep``: it flows only into layers,
    through views and ops that follow its format, see :mod:`autoprec.trace`), and is an op autocast casts
    (``AUTOCAST_COVERS``) from the model's FP32; and every child module is a unit, which runs a region of its own
    (one the assignment leaves out, never seen to run, an FP32 one), so the autocast reaches no code of theirs.
    Then no function mode has to see each op of the forward (a view, a shape read): on a 12-layer GPT-2 that is
    hundreds of Python calls per step. An op of that own code the trace never saw (a branch it did not take)
    runs under the autocast too."""
    formats = set(entries.values())
    if len(formats) != 1 or handback != torch.float32:
        return None
    (precision,) = formats
    covers = AUTOCAST_COVERS.get(device_type, frozenset())
    if precision not in ("fp16", "bf16") or (precision == "fp16" and emulate_fp16) or any(k not in keep or k.split("::", 1)[1].rstrip("_0123456789") not in covers
                                                for k in entries):
        return None
    return to_dtype(precision)


def _covered(spec: _Spec, forward: Callable, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Own code run under autocast alone (see ``_covers``)."""
    if eager():
        prev = enter_autocast(spec.device_type, spec.covered)
        try:
            return forward(module, *args, **kwargs)
        finally:
            leave_autocast(spec.device_type, prev)
    with torch.autocast(spec.device_type, dtype=spec.covered):
        return forward(module, *args, **kwargs)


def _unit(spec: _Spec, forward: Callable, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    # in eager mode each Python call here costs per layer and step: the common call (one plain tensor) and the
    # region's autocast (what torch.autocast's __enter__/__exit__ do, see ``enter_autocast``) are inline
    precision, watcher, device = spec.precision, spec.watcher, spec.device_type
    if watcher is not None:
        watcher.enter(spec.path, "module", (args, kwargs))
    x = args[0] if len(args) == 1 and not kwargs and type(args[0]) is torch.Tensor else None
    if precision is None or (precision == "fp32" and not torch.is_autocast_enabled(device)
                             and not (x.dtype in LOW if x is not None else has_low(args, kwargs))):
        try:
            out = forward(module, *args, **kwargs)  # nothing to cast, no autocast to undo
        except RuntimeError:
            if precision is not None:
                _check_fp32_params(spec.path, module)  # 16-bit weights fed FP32 inputs: say why
            raise
        if watcher is not None and out is not None:
            watcher.exit(spec.path, "module", out, out)
        return out
    if precision == "fp32":
        _check_fp32_params(spec.path, module)
    if x is not None:
        first = x.dtype if x.is_floating_point() else None
        back = spec.handback if spec.fed and first in LOW else first
    else:
        back = back_dtype(spec.fed, spec.handback, args, kwargs)
    if dynamo_compiling() or getattr(torch.compiler, "_is_compiling_flag", False) or _modes_on():
        # not eager (see ``eager``, the order too): the context manager, which Dynamo traces and proxies record
        with autocast_for(device, precision, spec.emulate):
            out = _region_body(spec, forward, module, args, kwargs)
    else:
        prev, prev_dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        torch.set_autocast_enabled(device, spec.autocast_dtype is not None)
        if spec.autocast_dtype is not None:
            torch.set_autocast_dtype(device, spec.autocast_dtype)
        torch.autocast_increment_nesting()
        try:
            if x is not None and spec.plain:
                out = forward(module, x.to(spec.dtype) if x.is_floating_point() else x)
            else:
                out = _region_body(spec, forward, module, args, kwargs)
        finally:
            if torch.autocast_decrement_nesting() == 0:
                torch.clear_autocast_cache()
            torch.set_autocast_enabled(device, prev)
            torch.set_autocast_dtype(device, prev_dtype)
    if spec.keep and torch.is_grad_enabled():
        final = out
    elif type(out) is torch.Tensor and back is not None:
        final = out.to(back) if out.is_floating_point() else out
    else:
        final = cast_tree(out, back)
    if spec.observe is not None:
        spec.observe(out)
    if watcher is not None and out is not None:
        watcher.exit(spec.path, "module", out, final)
    return final


def _region_body(spec: _Spec, forward: Callable, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    args, kwargs = cast_args(args, kwargs, spec.dtype)
    if spec.fp8 is not None:  # an nn.Linear's forward, its GEMMs in FP8 as torchao's Float8Linear runs them
        (x,) = args if not kwargs else (kwargs["input"],)
        return fp8_linear(spec.fp8, module.weight, module.bias, x)
    if spec.gaps:  # the module's own weights in the region's format, their gradients to the FP32 masters
        with _reparametrize_module(module, _cast_params(module, spec.dtype)):
            return _inside(spec, forward, module, args, kwargs)
    return _inside(spec, forward, module, args, kwargs)


def _inside(spec: _Spec, forward: Callable, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    if spec.emulate_cuda and spec.dtype in LOW:
        with EmulateCudaFp16() if spec.dtype == torch.float16 else EmulateCuda():
            return forward(module, *args, **kwargs)
    if spec.emulate:
        with Emulate():
            return forward(module, *args, **kwargs)
    return forward(module, *args, **kwargs)


def _cast_params(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A unit's own floating parameters cast to ``dtype`` (a differentiable copy, as FSDP2's ``param_dtype``
    gathers them): what the region runs with, in place of the parameters, for one call."""
    return {name: p.to(dtype) for name, p in module._parameters.items()
            if p is not None and p.is_floating_point() and p.dtype != dtype}


def _may_gap(module: nn.Module) -> bool:
    """Whether a 16-bit unit runs with its own parameters cast to its format (see ``_region_body``): one that
    may call a matmul-class op autocast does not cast (``AUTOCAST_GAPS``), ``nn.Bilinear``, and modules holding
    stacked (3-D and up) weights that are no convolution, as grouped experts do (``F.grouped_mm`` over them,
    or batched matmuls and per-expert slices in a loop). Casting the weights, not the op's operands in a
    function mode, is what ``torch.compile`` traces: Dynamo hands no mode ``torch._grouped_mm``."""
    if isinstance(module, nn.Bilinear):
        return True
    return stacked(module)


def _forward_of(base_forward: Callable) -> Callable:
    def forward(self, *args, **kwargs):
        spec = self.__dict__.get(_SPEC)
        if spec is None:  # a module the policy left (or one of its class written without it)
            return base_forward(self, *args, **kwargs)
        if spec.direct:  # a unit, no boundary, no root: the common case, shortest
            return _unit(spec, base_forward, self, args, kwargs)
        return _call(spec, base_forward, self, args, kwargs)
    return forward


_WRAPPER_FRAMES = (_forward_of(nn.Module.forward).__code__, _call.__code__, _body.__code__,
                   _unit.__code__, _covered.__code__, _region_body.__code__,
                   _inside.__code__)
_registered = False


def _register_with_dynamo() -> None:
    """Tell Dynamo how to meet the runtime's frames after a graph break (see ``run_eagerly_after_a_break``);
    once, and only where Dynamo is loaded already: importing it takes seconds, and without it
    nothing compiles."""
    global _registered
    if _registered or "torch._dynamo" not in sys.modules:
        return
    run_eagerly_after_a_break(MODE_HANDLERS, recursive=True)
    run_eagerly_after_a_break(_WRAPPER_FRAMES, recursive=False)
    _registered = True


# -- the swapped classes ----------------------------------------------------------------------
_CLASSES: dict[type, type] = {}   # class -> its swapped subclass
_SWAPPED: set[type] = set()        # the swapped subclasses


def _new(cls: type) -> Any:
    """Rebuild a pickled module as the class it was written as (see ``_reduce_ex``)."""
    return cls.__new__(cls)


def _reduce_ex(self: nn.Module, protocol: int) -> Any:
    """Pickle and deep-copy as the class the module was written as, without the policy."""
    _, _, state, *rest = object.__reduce_ex__(self, max(protocol, 2))
    if isinstance(state, dict) and _SPEC in state:
        state = {k: v for k, v in state.items() if k != _SPEC}
    return (_new, (_base_of(type(self)),), state, *rest)


def _base_of(cls: type) -> type:
    return cls.__dict__.get("_autoprec_base", cls)


def _swapped(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (base,), {"forward": _forward_of(base.forward), "_autoprec_base": base,
                                             "__reduce_ex__": _reduce_ex, "__module__": base.__module__,
                                             "__qualname__": base.__qualname__})
        _CLASSES[base] = cls
        _SWAPPED.add(cls)
    return cls


def _ours(module: nn.Module) -> bool:
    return any("_autoprec_base" in c.__dict__ for c in type(module).__mro__)


def installed(module: nn.Module) -> bool:
    """Whether a policy (or a tuning pass) runs on ``module`` now.

    Example:
        >>> installed(nn.Linear(2, 2))
        False
    """
    return _SPEC in module.__dict__


def _instance_forward(spec: _Spec, inner: Callable, module: nn.Module) -> Callable:
    def forward(*args, **kwargs):
        return _call(spec, lambda _module, *a, **k: inner(*a, **k), module, args, kwargs)
    return forward


def _patch(module: nn.Module, spec: _Spec) -> None:
    state = module.__dict__
    if _SPEC in state:
        raise PolicyError(f"a policy already runs on this model (module {spec.path!r}): remove it "
                          "(handle.remove(), or leave its `with policy.autocast(model)` block) before "
                          "applying another")
    if "forward" in state:  # an instance-level forward (accelerate, hand patches) wins over a class
        inner = state["forward"]
        state["_autoprec_forward"] = inner
        state["forward"] = _instance_forward(spec, inner, module)
        state[_SPEC] = spec
        return
    cls = type(module)
    if cls not in _SWAPPED and not _ours(module):
        object.__setattr__(module, "__class__", _swapped(cls))  # nn.Module.__setattr__ is slow
    state[_SPEC] = spec


def _unpatch(module: nn.Module) -> None:
    module.__dict__.pop(_SPEC, None)
    if "_autoprec_forward" in module.__dict__:
        module.__dict__["forward"] = module.__dict__.pop("_autoprec_forward")
        return
    base = type(module).__dict__.get("_autoprec_base")
    if base is not None:
        object.__setattr__(module, "__class__", base)
    # else a class swapped on top of ours (fully_shard after apply): the forward stays ours and,
    # with no settings on the instance, runs the module's own forward unchanged


# -- installing -------------------------------------------------------------------------------
def _ancestors(path: str) -> Iterator[str]:
    """The proper ancestors of a module path, the root ``""`` included."""
    if not path:
        return
    yield ""
    parts = path.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


class Runtime:
    """Installs per-layer precision on a model; ``remove()`` takes every trace of it away again.

    ``assignment`` maps layer keys to ``"fp32"|"fp16"|"bf16"|"fp8"``; layers it leaves out run as they
    would without autoprec. ``units`` are the module paths run as one piece; the functional ops in
    the own code of ``opaque`` modules are not split into layers. ``handoff`` maps a layer to the
    layers its output flows into when that is all it flows into (the trace finds it); a 16-bit
    layer whose consumers all have a precision here hands them its output uncast. ``modules`` is
    the model's ``{canonical path: module}`` when the caller has it already. ``emulate_cuda``: the
    16-bit regions run as CUDA autocast runs them (a policy for CUDA on a CPU; with ``emulate_fp16``).
    An ``"fp8"`` unit (an ``nn.Linear``) runs its GEMMs in FP8 with torchao's recipe from ``recipes``
    (default ``"tensorwise"``): its input in BF16, autocast off, the output BF16, as a BF16 region hands it on.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> r = Runtime(m, {"0": "bf16"}, units=["0", "1"], device_type="cpu").install()
        >>> m(torch.ones(2, 4)).dtype
        torch.float32
        >>> r.remove()
    """

    def __init__(self, model: nn.Module, assignment: Mapping[str, str], *, units: Iterable[str],
                 device_type: str, opaque: Iterable[str] = (), emulate_fp16: bool = False,
                 emulate_cuda: bool = False, watcher: Watcher | None = None, handoff: Mapping[str, Iterable[str]] | None = None,
                 modules: Mapping[str, nn.Module] | None = None, recipes: Mapping[str, str] | None = None) -> None:
        self.model = model
        self.assignment = dict(assignment)
        self.recipes = dict(recipes or {})
        self.units = frozenset(units)
        self.opaque = frozenset(opaque)
        self.device_type = device_type
        self.emulate_fp16 = emulate_fp16
        self.emulate_cuda = emulate_cuda
        self.watcher = watcher
        handoff = {k: tuple(v) for k, v in (handoff or {}).items()}
        self.keep = frozenset(k for k, consumers in handoff.items() if self.assignment.get(k) in ("fp16", "bf16", "fp8")
                              and consumers and all(c in self.assignment for c in consumers))
        self.fed = frozenset(c for k in self.keep for c in handoff[k])
        self._modules = dict(modules) if modules is not None else canonical_modules(model)
        self._patches = Patches([])

    def plan(self) -> list[tuple[nn.Module, _Spec]]:
        """The modules to patch and what each does; O(modules)."""
        mods = self._modules
        handback = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        # op entries by owning module
        entries: dict[str, dict[str, str]] = {}
        for key, precision in self.assignment.items():
            owner, sep, _ = key.partition("::")
            if sep:
                entries.setdefault(owner, {})[key] = precision
        watching = self.watcher is not None
        # a unit's descendants run inside it; nothing of theirs is patched (O(modules x depth))
        skip = {path for path in mods if any(a in self.units for a in _ancestors(path))}
        own = {path for path in mods if path not in self.units and path not in skip
               and (path in entries or watching)}
        covered = self._covered(own, entries, handback) if not watching else {}
        out = []
        for path, mod in mods.items():
            if path in skip:
                continue
            parent = path.rpartition(".")[0] if "." in path else ("" if path else None)
            boundary = parent is not None and parent in own
            # a unit the assignment leaves out, in covered own code: FP32, out of its parent's autocast
            lone = parent in covered and path in self.units and path not in self.assignment
            unit = path in self.units and (path in self.assignment or watching or lone)
            mine = entries.get(path, {})
            tracked = path in own
            if not (boundary or unit or tracked or (watching and path == "")):
                continue
            precision = "fp32" if lone else self.assignment.get(path) if path in self.units else None
            spec = _Spec(
                path=path, device_type=self.device_type, precision=precision, unit=unit,
                dtype=None if precision is None else torch.bfloat16 if precision == "fp8" else to_dtype(precision),
                fp8=self._fp8(path, mod) if precision == "fp8" and unit else None,
                autocast_dtype=to_dtype(precision) if precision in ("fp16", "bf16")
                and not (precision == "fp16" and self.emulate_fp16) else None,
                emulate=precision == "fp16" and self.emulate_fp16, keep=path in self.keep, fed=path in self.fed,
                gaps=unit and precision in ("fp16", "bf16") and _may_gap(mod),
                handback=handback, boundary=boundary, own=tracked,
                own_always=watching or any(p != "fp32" for p in mine.values()) or any(k in self.fed for k in mine),
                opaque=path in self.opaque, entries=mine or None,
                op_keep=frozenset(k for k in mine if k in self.keep), op_fed=frozenset(k for k in mine if k in self.fed),
                emulate_fp16=self.emulate_fp16, emulate_cuda=self.emulate_cuda, root=path == "",
                watcher=self.watcher, covered=covered.get(path))
            out.append((mod, spec))
        return out

    def _fp8(self, path: str, module: nn.Module) -> Fp8Gemms:
        """What an "fp8" layer runs with: its recipe (``recipes``; default tensorwise), for its weight's device."""
        if not isinstance(module, nn.Linear):
            raise PolicyError(f"layer {path!r} is fp8 in the policy, but here it is a {type(module).__name__}: FP8 "
                              "runs the GEMMs of an nn.Linear; make the layer bf16 in the policy, or apply the policy "
                              "to the model it was tuned on")
        return fp8_gemms(self.recipes.get(path, "tensorwise"), module.weight.device)

    def _covered(self, own: set[str], entries: Mapping[str, Mapping[str, str]], handback: torch.dtype,
                 ) -> dict[str, torch.dtype]:
        """The own-code modules that run under autocast alone (see ``_covers``), and its dtype for each."""
        if self.emulate_cuda:  # CUDA's rules on a CPU take a mode
            return {}
        containers: set[str] = set()  # modules with a child that is no unit: its code would run in the autocast
        for path in self._modules:
            if path and path not in self.units:
                containers.add(path.rpartition(".")[0])
        found = {path: _covers(entries[path], self.keep, self.device_type, handback, self.emulate_fp16)
                 for path in own if path in entries and path not in containers}
        return {path: dtype for path, dtype in found.items() if dtype is not None}

    def install(self) -> "Runtime":
        """Patch the modules of :meth:`plan`; returns self."""
        self._patches = Patches(self.plan())
        return self

    def remove(self) -> None:
        """Take the policy off every module it patched (idempotent)."""
        self._patches.remove()


class Patches:
    """The modules one plan patched; ``remove()`` restores them (idempotent).

    A plan (from :meth:`Runtime.plan`) may be installed again and again: ``apply`` caches it.
    """

    def __init__(self, plan: list[tuple[nn.Module, _Spec]]) -> None:
        _register_with_dynamo()
        self._patched: list[nn.Module] = []
        try:
            for mod, spec in plan:
                _patch(mod, spec)
                self._patched.append(mod)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Take the policy off every module it patched."""
        while self._patched:
            _unpatch(self._patched.pop())
