"""The function modes of the runtime: op-level regions in a module's own code, FP16 and CUDA emulation.

:class:`OwnCode` is entered by a module whose own ``forward`` calls functional ops that are layers
(``module.path::op``); it numbers the call sites per op name (:func:`~autoprec.runtime._sites.call_site`: the
calls from one line, in a loop, are one layer) and runs each call in its region. Calls made
inside the module's children pass through: each child raises the mode's ``depth`` while it runs
(the runtime's ``boundary``). One mode object per call, on torch's per-thread mode stack, so
threads never share one.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode

from ..core._ops import MATMUL_OPS, op_name
from ._casts import (
    LOW,
    autocast_for,
    cast_args,
    cast_tree,
    eager,
    emulated,
    enter_autocast,
    first_float_dtype_in,
    leave_autocast,
)
from ._emulation import rule_of, run_as_cuda
from ._sites import call_site

__all__ = ["MODE_HANDLERS", "EagerOwnCode", "Emulate", "EmulateCuda", "EmulateCudaFp16", "OwnCode", "back_dtype", "op_of", "owner",
           "run_eagerly_after_a_break", "run_op"]


class Emulate(TorchFunctionMode):
    """Inside an FP16 unit on a CPU: the matmul/conv family runs emulated."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        named = op_of(func)
        if named is not None and named[0] in MATMUL_OPS:
            return emulated(func, args, kwargs)
        return func(*args, **kwargs)


class EmulateCuda(TorchFunctionMode):
    """Inside a BF16 unit of a policy for CUDA, on a CPU: CUDA autocast's rules (:mod:`autoprec.runtime._emulation`)."""

    low = torch.bfloat16

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = rule_of(func)
        if rule is None:
            return func(*args, **kwargs)
        return run_as_cuda(rule, func, args, kwargs, self.low)


class EmulateCudaFp16(EmulateCuda):
    """Inside an FP16 unit of a policy for CUDA, on a CPU: CUDA autocast's rules, FP16 matmuls as tensor cores."""

    low = torch.float16


class OwnCode(TorchFunctionMode):
    """One call of a module's ``forward``: gives the functional ops in its own code their regions.

    Calls made inside its child modules pass through (each child raises ``depth`` while it runs).
    It is entered where it can change something: a 16-bit op entry, an op fed a handed-off 16-bit
    tensor, a caller's autocast (whose casts FP32 entries undo), or 16-bit inputs to the module.
    """

    def __init__(self, spec: Any) -> None:
        super().__init__()
        self.spec = spec
        self.depth = 0
        self.counts: dict[str, int] = {}
        self.sites: dict[str, dict[Any, int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth:
            return func(*args, **kwargs)
        return self.handle(func, op_of(func), args, kwargs)

    def handle(self, func: Callable, named: tuple[str, bool] | None, args: tuple, kwargs: dict) -> Any:
        """Run one op of the module's own code: in its layer's region, or as it is where it is no layer."""
        spec = self.spec
        if named is None or spec.opaque:  # no layer of its own
            out = func(*args, **kwargs)
            flow = getattr(spec.watcher, "call", None)
            if flow is not None:  # code between layers: where outputs go
                flow(func, args, kwargs, out)
            return out
        base, in_place = named
        # one layer per call site (a call in a loop is one layer); per call where no site is found
        n = self.counts.get(base, 0)
        self.counts[base] = n + 1
        sites = self.sites.setdefault(base, {})
        n = sites.setdefault(call_site() or n, len(sites))
        key = f"{spec.path}::{base}" + (f"_{n}" if n else "")
        return run_op(spec, key, func, args, kwargs, in_place, base)


#: op names by torch function, for :class:`EagerOwnCode` (the functions torch hands a mode: a bounded set)
_NAMES: dict[Any, tuple[str, bool] | None] = {}


class EagerOwnCode(OwnCode):
    """:class:`OwnCode` in eager mode, where each op of the model pays for its Python calls: an op name is a
    dict lookup, an op that is no layer returns at once, and the runtime takes the mode off the stack
    while a child module runs (so the child's ops never reach it) instead of raising ``depth``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth:
            return func(*args, **kwargs)
        try:
            named = _NAMES[func]
        except KeyError:
            named = _NAMES[func] = op_name(func)
        except TypeError:  # an unhashable callable
            named = op_name(func)
        if named is None and self.spec.watcher is None:
            return func(*args, **kwargs)
        return self.handle(func, named, args, kwargs)


def run_eagerly_after_a_break(codes: Iterable[Any], *, recursive: bool) -> None:
    """Code that Dynamo meets as a frame of its own only after a graph break in the model's own code
    (a data-dependent op) runs as it is there, instead of being compiled again and counting the same
    break once more; inlined into a traced forward it is traced as usual. ``recursive``: what it
    calls runs as it is too (a mode's handler calls torch ops only); else what it calls (the
    model's own ``forward``) is compiled as usual."""
    try:
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # pragma: no cover - older torch: such a break is counted more than once
        return
    inner = FrameAction.SKIP if recursive else FrameAction.DEFAULT
    for code in codes:
        set_code_exec_strategy(code, FrameExecStrategy(FrameAction.SKIP, inner))


MODE_HANDLERS = (Emulate.__torch_function__.__code__, EmulateCuda.__torch_function__.__code__,
                 OwnCode.__torch_function__.__code__, OwnCode.handle.__code__, EagerOwnCode.__torch_function__.__code__)


def op_of(func: Any) -> tuple[str, bool] | None:
    """:func:`op_name`, read by torch.compile as the constant it is for one function."""
    return op_name(func)


# what torch.compiler.assume_constant_result does, without importing Dynamo along with autoprec
op_of._dynamo_marked_constant = True  # type: ignore[attr-defined]


def owner() -> OwnCode | None:
    """The innermost own-code mode on this thread's mode stack."""
    for i in range(torch._C._len_torch_function_stack() - 1, -1, -1):
        mode = torch._C._get_function_stack_at(i)
        if isinstance(mode, OwnCode):
            return mode
    return None


def back_dtype(spec_fed: bool, handback: torch.dtype, args: tuple, kwargs: dict) -> torch.dtype | None:
    first = first_float_dtype_in(args, kwargs)
    if spec_fed and first in LOW:
        return handback
    return first


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_op(spec: Any, key: str, func: Callable, args: tuple, kwargs: dict, in_place: bool, base: str) -> Any:
    precision = spec.entries.get(key) if spec.entries else None
    watcher = spec.watcher
    if watcher is not None:
        watcher.enter(key, "op", (args, kwargs))
    if precision is None:
        out = func(*args, **kwargs)
        if watcher is not None:
            watcher.exit(key, "op", out, out)
        return out
    back = back_dtype(key in spec.op_fed, spec.handback, args, kwargs)
    emulate = precision == "fp16" and spec.emulate_fp16
    dtype = _DTYPES[precision]
    if eager():  # what torch.autocast's __enter__/__exit__ do, without building the object each call
        prev = enter_autocast(spec.device_type, None if precision == "fp32" or emulate else dtype)
        try:
            raw = _region(spec, func, args, kwargs, dtype, emulate, base)
        finally:
            leave_autocast(spec.device_type, prev)
    else:
        with autocast_for(spec.device_type, precision, emulate):
            raw = _region(spec, func, args, kwargs, dtype, emulate, base)
    observe = spec.op_observe.get(key) if spec.op_observe else None
    if observe is not None:  # autoprec.guard's watch, as _unit tells it of a unit's raw output
        observe(raw)
    if in_place and isinstance(args[0], torch.Tensor) and raw is not args[0]:
        # the op ran on a cast copy of `self`: write the result back into the caller's tensor
        args[0].copy_(raw)
        final = args[0]
    elif key in spec.op_keep and torch.is_grad_enabled():
        final = raw
    else:
        final = cast_tree(raw, back)
    if watcher is not None:
        watcher.exit(key, "op", raw, final)
    return final


def _region(spec: Any, func: Callable, args: tuple, kwargs: dict, dtype: torch.dtype, emulate: bool, base: str) -> Any:
    """One op in its region's format, inside the region's autocast."""
    cargs, ckwargs = cast_args(args, kwargs, dtype)
    rule = rule_of(func) if spec.emulate_cuda and dtype in LOW else None
    if rule is not None:  # a policy for CUDA on a CPU: as CUDA autocast runs it
        return run_as_cuda(rule, func, cargs, ckwargs, dtype)
    if emulate and base in MATMUL_OPS:
        return emulated(func, cargs, ckwargs)
    return func(*cargs, **ckwargs)
