"""Casting tensors for a precision region: the arguments down to its format, the outputs back.

Plain tensors take a fast path (pytree's per-call cost is larger than a small layer's kernel);
containers go through :mod:`torch.utils._pytree`. FP16 on a CPU is emulated the way GPU tensor
cores run it: operands rounded to FP16, products accumulated in FP32, the result rounded to FP16.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..core._formats import to_dtype

__all__ = ["CONTAINERS", "LOW", "autocast_for", "cast_args", "cast_tree", "dynamo_compiling", "eager", "emulated", "emulating",
           "enter_autocast", "first_float_dtype", "first_float_dtype_in", "has_low", "leave_autocast", "round16"]

LOW = (torch.float16, torch.bfloat16)
CONTAINERS = (list, tuple, dict)


def first_float_dtype(tree: Any) -> torch.dtype | None:
    for t in pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return None


def first_float_dtype_in(args: tuple, kwargs: dict) -> torch.dtype | None:
    """The first floating dtype among the arguments (plain tensors first-class; containers via pytree)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            if a.is_floating_point():
                return a.dtype
        elif isinstance(a, CONTAINERS):
            found = first_float_dtype(a)
            if found is not None:
                return found
    return None


def cast_tree(tree: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return tree
    if isinstance(tree, torch.Tensor):  # the common case, without pytree's per-call cost
        return tree.to(dtype) if tree.is_floating_point() and tree.dtype != dtype else tree
    return pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t,
        tree)


def cast_args(args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Cast the floating tensors among the arguments to ``dtype``."""
    args = tuple(a if not isinstance(a, (torch.Tensor, *CONTAINERS)) else cast_tree(a, dtype) for a in args)
    if kwargs:
        kwargs = {k: v if not isinstance(v, (torch.Tensor, *CONTAINERS)) else cast_tree(v, dtype)
                  for k, v in kwargs.items()}
    return args, kwargs


def has_low(args: tuple, kwargs: dict) -> bool:
    """Whether any floating tensor among the arguments is 16-bit (top level first: the common case)."""
    nested = False
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            if a.dtype in LOW:
                return True
        elif isinstance(a, CONTAINERS):
            nested = True
    return nested and any(isinstance(t, torch.Tensor) and t.dtype in LOW
                          for t in pytree.tree_leaves((args, kwargs)))


def round16(tree: Any, dtype: torch.dtype = torch.float16) -> Any:
    """Round floating tensors to ``dtype``'s values (FP16, BF16) but keep them FP32 (emulated tensor-core operands)."""
    return pytree.tree_map(
        lambda t: t.to(dtype).to(torch.float32) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        tree)


def emulated(func: Callable, args: tuple, kwargs: dict, dtype: torch.dtype = torch.float16) -> Any:
    """``func`` as a GPU's tensor cores run it in ``dtype`` (FP16, BF16): operands rounded to ``dtype``, products
    accumulated in FP32 (an FP32 kernel, autocast off), the result rounded to ``dtype``. On a CPU without fast
    kernels for ``dtype`` (no FP16 kernels at all; BF16 without AVX512-BF16, 10-60x slower than FP32) this runs
    at FP32's speed, with the numerics of the GPU it stands for on every CPU alike.

    Example:
        >>> a = torch.tensor([[1.0 + 2 ** -9]])
        >>> emulated(torch.matmul, (a, a), {}, torch.bfloat16)
        tensor([[1.]], dtype=torch.bfloat16)
    """
    counted = not torch.compiler.is_compiling()  # eager runs only: a FLOP count never runs compiled
    if counted:
        _EMULATING.dtypes = [*getattr(_EMULATING, "dtypes", []), dtype]
    try:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            out = func(*round16(args, dtype), **round16(kwargs, dtype))
    finally:
        if counted:
            _EMULATING.dtypes = _EMULATING.dtypes[:-1]
    return cast_tree(out, dtype)


#: ``dtypes``: the formats :func:`emulated` runs ops in on this thread now, innermost last (a FLOP count by dtype)
_EMULATING = threading.local()


def emulating() -> torch.dtype | None:
    """The format this thread's :func:`emulated` op runs in (FP32 kernels on operands rounded to it), or None.

    Example:
        >>> emulating() is None
        True
    """
    dtypes = getattr(_EMULATING, "dtypes", None)
    return dtypes[-1] if dtypes else None


def autocast_for(device_type: str, precision: str, emulate: bool) -> torch.autocast:
    if precision in ("fp32", "fp8") or emulate:  # an FP8 region runs torchao's GEMMs with autocast off
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=to_dtype(precision))




#: ``torch.compiler.is_dynamo_compiling`` where torch has it: one Python call in eager mode, folded by Dynamo
dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)


def eager() -> bool:
    """Whether this code runs as it is: not traced by Dynamo or export, no function mode (a proxy mode of
    make_fx, a mode of the runtime's own) active. Only then may a region switch autocast with torch's C
    calls (:func:`enter_autocast`), which a tracer would not record: else it enters ``torch.autocast``.

    Example:
        >>> eager()
        True
    """
    # Dynamo first: it folds that call to True, and never reads the flag (True while it traces) to guard on it
    return not (dynamo_compiling() or getattr(torch.compiler, "_is_compiling_flag", False)
                or torch._C._is_torch_function_mode_enabled())


def enter_autocast(device_type: str, dtype: torch.dtype | None) -> tuple[bool, torch.dtype]:
    """What ``torch.autocast(device_type, dtype, enabled=dtype is not None).__enter__`` does, without building
    the object (eager mode only, see :func:`eager`); returns the state :func:`leave_autocast` restores.

    Example:
        >>> prev = enter_autocast("cpu", torch.bfloat16)
        >>> torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
        (True, torch.bfloat16)
        >>> leave_autocast("cpu", prev)
        >>> torch.is_autocast_enabled("cpu")
        False
    """
    prev = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, dtype is not None)
    if dtype is not None:
        torch.set_autocast_dtype(device_type, dtype)
    torch.autocast_increment_nesting()
    return prev


def leave_autocast(device_type: str, prev: tuple[bool, torch.dtype]) -> None:
    """Undo :func:`enter_autocast` (its ``__exit__``: the cast cache is cleared when the outermost region ends)."""
    if torch.autocast_decrement_nesting() == 0:
        torch.clear_autocast_cache()
    torch.set_autocast_enabled(device_type, prev[0])
    torch.set_autocast_dtype(device_type, prev[1])
