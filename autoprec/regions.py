"""Per-layer precision regions at run time: the one mechanism that probe, apply and verify share.

A *layer* is either a **unit module** (a leaf module, or an opaque module run as one piece) keyed by
its qualified name, or a **functional op** called in a non-unit module's own ``forward`` (an
accumulation, a softmax, a matmul between leaves, ...) keyed ``"module.path::op"`` with ``_1``,
``_2`` ... for later calls of the same op in that forward (the root module's path is ``""``).

A region with precision ``p``:

* enters ``torch.autocast`` for ``p`` (disabled for ``"fp32"``) and casts the layer's floating
  inputs to ``p``, so the ops inside run in ``p``, not only the ones on autocast's list; except,
  on CUDA, the ops CUDA autocast always runs in FP32 (norms, softmax, pow/exp/log, sums, losses):
  those compute in FP32 inside a 16-bit region too (the CUDA cost model gives them no gain);
* hands its floating outputs back in the dtype its first floating input arrived in, so the code
  between layers (residual adds, SDPA fed by separate q/k/v Linears) always sees one dtype; except
  where the trace saw the output flow only into other layers of the assignment (``handoff``): each
  of those casts its inputs on entry anyway, so the 16-bit output goes to them as it is, which
  saves a cast up and a cast down with bit-identical forward values (autocast's own behaviour).
  Only with grad mode on: a custom ``autograd.Function``'s forward runs with it off, and its
  hand-written backward expects the dtypes its forward saw;
* restores the autocast state on every path, exceptions included (post-hooks use
  ``always_call=True``).

FP16 on a CPU has no fast kernels; with ``emulate_fp16`` the matmul/conv family is emulated the way
GPU tensor cores run it: operands rounded to FP16, products accumulated in FP32, the result
rounded to FP16.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .formats import to_dtype

__all__ = ["MATMUL_OPS", "HAZARD_OPS", "op_name", "hazard_of", "unit_modules", "inside", "Watcher", "Regions"]

#: The matmul/conv family: autocast casts these, and they carry almost all FLOPs.
MATMUL_OPS = frozenset({
    "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "einsum", "bilinear",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "scaled_dot_product_attention",
})

#: Known numerical hazards, by op, and the class the report names for them.
HAZARD_OPS: dict[str, str] = {
    **{op: "accumulation" for op in ("index_add", "scatter_add", "scatter_reduce", "index_reduce",
                                       "index_put", "embedding_bag", "segment_reduce", "bincount")},
    **{op: "softmax" for op in ("softmax", "log_softmax", "logsumexp")},
    **{op: "variance/norm" for op in ("layer_norm", "group_norm", "batch_norm", "rms_norm", "instance_norm",
                                       "var", "std", "var_mean", "std_mean", "norm", "normalize")},
    **{op: "exp/log/pow" for op in ("exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "pow",
                                     "rsqrt", "sqrt", "reciprocal")},
    **{op: "long reduction" for op in ("sum", "mean", "cumsum", "prod", "cumprod", "nansum", "avg_pool1d",
                                        "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                                        "adaptive_avg_pool3d")},
    **{op: "position/trig" for op in ("sin", "cos", "tan", "sinc")},
    **{op: "loss" for op in ("cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss",
                             "huber_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits",
                             "kl_div", "ctc_loss", "poisson_nll_loss", "gaussian_nll_loss",
                             "cosine_embedding_loss", "margin_ranking_loss", "triplet_margin_loss")},
}

_TRACKED = MATMUL_OPS | frozenset(HAZARD_OPS)


def op_name(func: Any) -> tuple[str, bool] | None:
    """``(base name, in_place)`` of a torch function (or its name), or None for an untracked one.

    Example:
        >>> op_name(torch.Tensor.index_add_)
        ('index_add', True)
    """
    name = func if isinstance(func, str) else getattr(func, "__name__", None)
    if not isinstance(name, str):
        return None
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name in ("rmatmul", "rpow"):
            name = name[1:]
        elif name in ("imatmul", "ipow"):
            return (name[1:], True) if name[1:] in _TRACKED else None
    in_place = name.endswith("_")
    base = name.rstrip("_")
    if base not in _TRACKED:
        return None
    return base, in_place


def hazard_of(op: str) -> str | None:
    """The hazard class of an op name, or None.

    Example:
        >>> hazard_of("scatter_add")
        'accumulation'
    """
    return HAZARD_OPS.get(op)


def unit_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that are layers of their own: the leaves (modules without children).

    Example:
        >>> sorted(unit_modules(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())))
        ['0', '1']
    """
    return {name: mod for name, mod in model.named_modules() if next(mod.children(), None) is None}


def inside(path: str, outer: str) -> bool:
    """Whether module ``path`` lies strictly inside module ``outer`` (``""`` is the root).

    Example:
        >>> inside("a.b", "a"), inside("a", "a"), inside("a", "")
        (True, False, True)
    """
    return (outer == "" and path != "") or path.startswith(outer + ".")


class Watcher(Protocol):
    """Observes layers as they run (the probe records ranges, the trace records FLOPs).

    A watcher may also define ``call(func, args, kwargs, out)``, told of every torch call in code
    that is no layer (own code between layers, opaque code), and ``finish(output)``, told of what
    the outermost module returns: the trace follows where each layer's output goes with them.
    """

    def enter(self, key: str, kind: str, inputs: tuple) -> None: ...

    def exit(self, key: str, kind: str, raw: Any, final: Any) -> None: ...


def _first_float_dtype(tree: Any) -> torch.dtype | None:
    for t in pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return None


def _cast(tree: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return tree
    return pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t,
        tree)


def _has_low(tree: Any) -> bool:
    """Whether any floating tensor in ``tree`` is 16-bit."""
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)
               for t in pytree.tree_leaves(tree))


def _round16(tree: Any) -> Any:
    """Round floating tensors to FP16 values but keep them FP32 (emulated tensor-core operands)."""
    return pytree.tree_map(
        lambda t: t.to(torch.float16).to(torch.float32) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        tree)


@dataclass
class _Frame:
    path: str
    unit: bool
    opaque: bool
    precision: str | None
    emulate: bool
    counts: dict[str, int] = field(default_factory=dict)
    ctx: Any = None
    back: torch.dtype | None = None


class _State(threading.local):
    def __init__(self) -> None:
        self.stack: list[_Frame] = []
        self.handed: dict[str, torch.dtype | None] = {}  # kept layer -> the dtype it would have handed back
        self.root: str | None = None   # the module whose forward is running (the first hooked one)
        self.active = False            # whether this forward tracks ops (see ``Regions._pre``)


class _OpMode(TorchFunctionMode):
    """Gives functional ops in a module's own code their region, and emulates FP16 matmuls."""

    def __init__(self, regions: "Regions") -> None:
        super().__init__()
        self.regions = regions

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        stack = self.regions._state.stack
        if not stack:
            return func(*args, **kwargs)
        named = op_name(func)
        top = stack[-1]
        if named is None or top.unit or top.opaque:  # no layer of its own
            if named is not None and top.emulate and named[0] in MATMUL_OPS:
                out = _emulated(func, args, kwargs)
            else:
                out = func(*args, **kwargs)
            flow = self.regions._flow
            if flow is not None and not top.unit:  # code between layers: where outputs go
                flow(func, args, kwargs, out)
            return out
        base, in_place = named
        n = top.counts.get(base, 0)
        top.counts[base] = n + 1
        key = f"{top.path}::{base}" + (f"_{n}" if n else "")
        return self.regions._run_op(key, func, args, kwargs, in_place, base, top)


def _emulated(func: Callable, args: tuple, kwargs: dict) -> Any:
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        out = func(*_round16(args), **_round16(kwargs))
    return _cast(out, torch.float16)


class Regions:
    """Installs per-layer precision regions on a model; ``remove()`` takes every trace away again.

    ``assignment`` maps layer keys to ``"fp32"|"fp16"|"bf16"``; layers it leaves out run as they
    would without autoprec. ``units`` are the module paths run as one piece; the functional ops in
    the own code of ``opaque`` modules are not split into layers. ``handoff`` maps a layer to the
    layers its output flows into when that is all it flows into (the trace finds it); a 16-bit
    layer whose consumers all have a precision here hands them its output uncast.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> r = Regions(m, {"0": "bf16"}, units=["0", "1"], device_type="cpu").install()
        >>> m(torch.ones(2, 4)).dtype
        torch.float32
        >>> r.remove()
    """

    def __init__(self, model: nn.Module, assignment: Mapping[str, str], *, units: Iterable[str],
                 device_type: str, opaque: Iterable[str] = (), emulate_fp16: bool = False,
                 watcher: Watcher | None = None, handoff: Mapping[str, Iterable[str]] | None = None) -> None:
        self.model = model
        self.assignment = dict(assignment)
        self.units = set(units)
        self.opaque = set(opaque)
        self.device_type = device_type
        self.emulate_fp16 = emulate_fp16
        self.watcher = watcher
        self._flow = getattr(watcher, "call", None)
        self._finish = getattr(watcher, "finish", None)
        handoff = {k: tuple(v) for k, v in (handoff or {}).items()}
        self.keep = frozenset(k for k, consumers in handoff.items() if self.assignment.get(k) in ("fp16", "bf16")
                              and consumers and all(c in self.assignment for c in consumers))
        # a consumer of a kept layer hands its own output back in the dtype the kept layer would have
        self._fed_by: dict[str, list[str]] = {}
        for k in sorted(self.keep):
            for c in handoff[k]:
                self._fed_by.setdefault(c, []).append(k)
        self._state = _State()
        self._handles: list[Any] = []
        self._mode: _OpMode | None = None
        self._needs_ops = watcher is not None or any("::" in k for k in self.assignment) or (
            emulate_fp16 and "fp16" in self.assignment.values())
        # the function mode costs Python time on every torch call: it is entered only where it can
        # change something (a 16-bit op entry, FP16 emulation, a watcher) or under a caller's autocast,
        # whose casts the policy's FP32 op entries must undo
        # ... or where a 16-bit output is handed to an op entry, which must cast it even in FP32
        self._mode_always = watcher is not None or any(
            "::" in k and p != "fp32" for k, p in self.assignment.items()) or (
            emulate_fp16 and "fp16" in self.assignment.values()) or any(
            "::" in c for k in self.keep for c in handoff[k])

    # -- installing ---------------------------------------------------------------------------
    def install(self) -> "Regions":
        """Register the hooks; returns self."""
        for path, mod in self.model.named_modules():
            if self._inside_unit(path):
                continue
            unit = path in self.units
            # with handoffs, the root's hooks make one forward one span (the record of what was handed)
            if not self._needs_ops and not (unit and path in self.assignment) and not (path == "" and self.keep):
                continue
            self._handles.append(mod.register_forward_pre_hook(self._pre(path, unit), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._post(path, unit), with_kwargs=True,
                                                           always_call=True))
        return self

    def remove(self) -> None:
        """Remove every hook this object registered, and unwind any region left open."""
        self.unwind()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def unwind(self) -> None:
        """Close regions a forward left open (a KeyboardInterrupt skips ``always_call`` hooks)."""
        stack = self._state.stack
        while stack:
            frame = stack.pop()
            if frame.ctx is not None:
                frame.ctx.__exit__(None, None, None)
        self._state.root = None
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def _inside_unit(self, path: str) -> bool:
        return any(inside(path, u) for u in self.units)

    # -- module regions -----------------------------------------------------------------------
    def _pre(self, path: str, unit: bool) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            state = self._state
            if state.root is None:
                # a forward begins: it tracks ops (function mode, a frame per module) only where that can
                # change something: a 16-bit op entry, FP16 emulation, a watcher, or a caller's autocast,
                # whose casts the policy's FP32 entries must undo
                state.root = path
                state.handed.clear()
                state.active = self._mode_always or torch.is_autocast_enabled(self.device_type)
                if self._needs_ops and state.active:
                    self._mode = _OpMode(self)
                    self._mode.__enter__()
            precision = self.assignment.get(path) if unit else None
            if not state.active and (precision is None or (precision == "fp32" and not _has_low((args, kwargs)))):
                return None  # nothing to cast, no autocast to undo, no op to count: no region
            frame = _Frame(path, unit, path in self.opaque, precision,
                           emulate=precision == "fp16" and self.emulate_fp16)
            if self.watcher is not None and unit:
                self.watcher.enter(path, "module", (args, kwargs))
            if precision is not None:
                frame.back = self._back(path, (args, kwargs))
                frame.ctx = self._autocast(precision, frame.emulate)
                frame.ctx.__enter__()
                args, kwargs = _cast((args, kwargs), to_dtype(precision))
            state.stack.append(frame)
            return args, kwargs
        return hook

    def _post(self, path: str, unit: bool) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
            state = self._state
            stack = state.stack
            final = output
            try:
                if stack and stack[-1].path == path:  # else the pre-hook made no region (or never ran)
                    frame = stack.pop()
                    if frame.ctx is not None:
                        frame.ctx.__exit__(None, None, None)
                    if path in self.keep and torch.is_grad_enabled():
                        state.handed[path] = frame.back
                    elif frame.back is not None:
                        final = _cast(output, frame.back)
                    if self.watcher is not None and unit and output is not None:
                        self.watcher.exit(path, "module", output, final)
            finally:
                if state.root == path and not stack:
                    state.root = None
                    if self._finish is not None:
                        self._finish(final)
                    if self._mode is not None:
                        mode, self._mode = self._mode, None
                        mode.__exit__(None, None, None)
            return final if final is not output else None
        return hook

    def _back(self, key: str, inputs: Any) -> torch.dtype | None:
        """The dtype a region hands its output back in: its input's, or, fed by a kept layer, that layer's."""
        first = _first_float_dtype(inputs)
        if first in (torch.float16, torch.bfloat16):
            handed = self._state.handed
            for producer in self._fed_by.get(key, ()):
                if producer in handed:
                    return handed[producer]
        return first

    def _autocast(self, precision: str, emulate: bool):
        if precision == "fp32" or emulate:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=to_dtype(precision))

    # -- functional-op regions ----------------------------------------------------------------
    def _run_op(self, key: str, func: Callable, args: tuple, kwargs: dict, in_place: bool,
                base: str, frame: _Frame) -> Any:
        precision = self.assignment.get(key)
        watcher = self.watcher
        if watcher is not None:
            watcher.enter(key, "op", (args, kwargs))
        if precision is None:
            if frame.emulate and base in MATMUL_OPS:
                out = _emulated(func, args, kwargs)
            else:
                out = func(*args, **kwargs)
            if watcher is not None:
                watcher.exit(key, "op", out, out)
            return out
        back = self._back(key, (args, kwargs))
        emulate = precision == "fp16" and self.emulate_fp16
        dtype = to_dtype(precision)
        with self._autocast(precision, emulate):
            cargs, ckwargs = _cast((args, kwargs), dtype)
            if emulate and base in MATMUL_OPS:
                raw = _emulated(func, cargs, ckwargs)
            else:
                raw = func(*cargs, **ckwargs)
        if in_place and isinstance(args[0], torch.Tensor) and raw is not args[0]:
            # the op ran on a cast copy of `self`: write the result back into the caller's tensor
            args[0].copy_(raw)
            final = args[0]
        else:
            if key in self.keep and torch.is_grad_enabled():
                self._state.handed[key] = back
                final = raw
            else:
                final = _cast(raw, back)
        if watcher is not None:
            watcher.exit(key, "op", raw, final)
        return final
