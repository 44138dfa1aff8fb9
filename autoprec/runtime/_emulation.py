"""CUDA autocast emulated on a CPU: how a 16-bit region runs its ops when the policy is for a GPU.

A policy tuned for CUDA on a machine without one is measured (probe, search, verification) the way
CUDA runs it. Inside a 16-bit region CUDA autocast

* casts its lower-precision ops (the matmul/conv family) to the region's format; they run as tensor
  cores run them (operands rounded to FP16 or BF16, FP32 accumulation, a 16-bit result), see
  :func:`autoprec.runtime._casts.emulated`: FP32 kernels, so at FP32's speed on every CPU (the CPU has
  no FP16 kernels, and BF16 ones only with AVX512-BF16);
* computes its FP32 ops in FP32, whatever the region's format: the inputs are cast up and the output
  stays FP32 (pow, rsqrt, exp/log, softmax, norms, sums, losses: :data:`autoprec.core._ops.CUDA_FP32_OPS`);
  the lists are the installed torch's own (:data:`autoprec.core._ops.CUDA_LISTS`, read from its header);
* runs its promote ops in the widest floating dtype among their inputs;
* refuses ``binary_cross_entropy`` (unsafe to autocast) and runs every other op in the dtype that
  arrives.

CPU autocast has other lists (it computes FFTs, linear algebra, 3-D pooling and padding in FP32 and
leaves softmax, norms and pow alone), so inside an emulated region the rules above replace it for
the ops they name, and the ops only CPU autocast acts on (read from torch's dispatcher) run with it
switched off.

FFTs: cuFFT transforms FP16 (only at power-of-two signal sizes) and not BF16; the CPU has kernels
for neither. An FP16 transform is emulated: computed in FP32 from the FP16 input and rounded to FP16
(``complex32`` for a complex result), the dtype cuFFT returns; cuFFT computes in FP16 itself, so the
emulated error is a lower bound of the GPU's. A BF16 transform, or an FP16 one at another size, is
refused with the error CUDA gives.

The rules work on torch functions, the level a ``TorchFunctionMode`` sees: a composite function
(``F.multi_head_attention_forward``) is one call, and the ops inside it follow CPU autocast.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..core._ops import ALIASES, AUTOCAST_GAPS, CUDA_FP32_OPS, CUDA_LOWER_OPS, CUDA_PROMOTE_OPS, FFT_OPS
from ._casts import LOW, emulated

__all__ = ["rule_of", "run_as_cuda"]

def _autocast_ops(key: str) -> frozenset[str]:
    """The aten ops (names without overloads) torch's dispatcher has an autocast kernel for at ``key``."""
    return frozenset(op.split("::")[-1].split(".")[0] for op in torch._C._dispatch_get_registrations_for_dispatch_key(key))


#: the ops torch's CPU autocast acts on (FP32 lifts, lower casts, promotes) and CUDA's does not, read from the
#: dispatcher, and pad and istft, which call some: CUDA runs them in the dtype that arrives, so an emulated region
#: runs them with CPU autocast off
_CPU_ONLY = (_autocast_ops("AutocastCPU") - _autocast_ops("AutocastCUDA")) | {"pad", "istft"}

_BCE = ("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast (CUDA refuses them "
        "in a 16-bit region; emulated on the CPU): combine the sigmoid before it with the loss, as "
        "binary_cross_entropy_with_logits or BCEWithLogitsLoss, which are safe")


def rule_of(func: Any) -> str | None:
    """How a 16-bit region of a policy runs a torch function on CUDA: ``"lower"``, ``"fp32"``,
    ``"promote"``, ``"fft"``, ``"refuse"``, ``"native"`` (CPU autocast would lift it, CUDA does not),
    or None (runs as it is). That is CUDA autocast's list, except for the matmul-class ops autocast
    leaves alone (:data:`~autoprec.core._ops.AUTOCAST_GAPS`: bilinear, grouped_mm), whose operands the
    region casts itself before autocast sees them: those are ``"lower"``.

    Example:
        >>> rule_of(torch.rsqrt), rule_of(torch.Tensor.__matmul__), rule_of(torch.relu), rule_of(torch.bilinear)
        ('fp32', 'lower', None, 'lower')
    """
    name = func if isinstance(func, str) else getattr(func, "__name__", None)
    if not isinstance(name, str):
        return None
    name = ALIASES.get(name, name)  # torch._grouped_mm is grouped_mm
    if name in ("__matmul__", "__rmatmul__") or name in AUTOCAST_GAPS:
        return "lower"
    if name in CUDA_FP32_OPS:
        return "fp32"
    if name in CUDA_PROMOTE_OPS:
        return "promote"
    if name in CUDA_LOWER_OPS:
        return "lower"
    if name in FFT_OPS:
        return "fft"
    if name == "binary_cross_entropy":
        return "refuse"
    if name in _CPU_ONLY or (name.startswith("linalg_") and not name.endswith("_")):
        return "native"
    return None


# what torch.compiler.assume_constant_result does, without importing Dynamo along with autoprec
rule_of._dynamo_marked_constant = True  # type: ignore[attr-defined]


_ELIGIBLE = (*LOW, torch.float32)  # what CUDA autocast casts: FP64, integers and complex run as they are


def _recast(tree: Any, dtype: torch.dtype) -> Any:
    """FP32/FP16/BF16 tensors cast to ``dtype``; FP64, integers and complex left alone."""
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.dtype in _ELIGIBLE and tree.dtype != dtype else tree
    if isinstance(tree, (list, tuple, dict)):
        return pytree.tree_map(lambda t: _recast(t, dtype) if isinstance(t, torch.Tensor) else t, tree)
    return tree


def _widest(args: tuple, kwargs: dict) -> torch.dtype | None:
    widest = None
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.dtype in _ELIGIBLE:
            widest = t.dtype if widest is None else torch.promote_types(widest, t.dtype)
    return widest


def run_as_cuda(rule: str, func: Callable, args: tuple, kwargs: dict, low: torch.dtype) -> Any:
    """Run ``func`` as CUDA autocast to ``low`` would, by its :func:`rule_of` ``rule``.

    Example:
        >>> x = torch.full((2,), 300.0, dtype=torch.float16)
        >>> y = run_as_cuda("fp32", torch.Tensor.pow, (x, 2), {}, torch.float16)
        >>> y.dtype, float(y[0])
        (torch.float32, 90000.0)
    """
    if kwargs.get("out") is not None:  # out= calls do not autocast
        return func(*args, **kwargs)
    if rule == "lower":  # tensor cores: 16-bit operands, FP32 accumulation, a 16-bit result
        if _widest(args, kwargs) is None:  # FP64 (or no floating input): autocast leaves it alone
            return func(*args, **kwargs)
        return emulated(func, args, kwargs, low)
    if rule == "refuse":
        raise RuntimeError(_BCE)
    with torch.autocast("cpu", enabled=False):
        if rule == "fp32":
            name = getattr(func, "__name__", "")
            if kwargs.get("dtype") is not None or (name in ("interpolate", "upsample") and kwargs.get("mode") == "area"):
                return func(*args, **kwargs)  # an explicit dtype is respected; "area" is a pooling
            return func(*_recast(args, torch.float32), **_recast(kwargs, torch.float32))
        if rule == "promote":
            wide = _widest(args, kwargs)
            return func(*args, **kwargs) if wide is None else func(*_recast(args, wide), **_recast(kwargs, wide))
        if rule == "fft":
            return _fft(func, args, kwargs)
        return func(*args, **kwargs)


def _fft(func: Callable, args: tuple, kwargs: dict) -> Any:
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.complex32):
        return func(*args, **kwargs)
    if x.dtype == torch.bfloat16:
        raise RuntimeError("Unsupported dtype BFloat16: cuFFT has no BF16 transforms (CUDA emulated on the CPU); "
                           "keep this layer out of BF16")
    wide = x.to(torch.complex64 if x.is_complex() else torch.float32)
    out = func(wide, *args[1:], **{k: v for k, v in kwargs.items() if k != "input"})
    for size in _signal_sizes(_fft_form(func), x, out, args, kwargs):
        if size & (size - 1):
            raise RuntimeError("cuFFT only supports dimensions whose sizes are powers of two when computing in "
                               f"half precision, but got a signal size of {size} (CUDA emulated on the CPU)")
    return out.to(torch.complex32 if out.is_complex() else torch.float16)


def _fft_form(func: Any) -> tuple[tuple[int, ...] | None, bool]:
    """An FFT's default transformed dims (None: all) and whether it is real-to-complex."""
    name = getattr(func, "__name__", "")
    default = (-1,) if name[-1] not in "2n" else ((-2, -1) if name.endswith("2") else None)
    return default, name.startswith(("fft_rfft", "fft_ihfft"))


_fft_form._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _signal_sizes(form: tuple[tuple[int, ...] | None, bool], x: torch.Tensor, out: torch.Tensor, args: tuple,
                  kwargs: dict) -> list[int]:
    """The signal length of each transformed dimension (the real side's length for r2c and c2r)."""
    default, r2c = form
    size_arg = kwargs.get("s", kwargs.get("n", args[1] if len(args) > 1 else None))
    dims = kwargs.get("dim", args[2] if len(args) > 2 else default)
    if isinstance(size_arg, int):
        size_arg = (size_arg,)
    if dims is None:
        dims = tuple(range(-len(size_arg), 0)) if size_arg is not None else tuple(range(-x.dim(), 0))
    elif isinstance(dims, int):
        dims = (dims,)
    sizes = [int(out.shape[d]) for d in dims]
    if r2c:  # real to complex: the last dim halves
        sizes[-1] = int(size_arg[-1]) if size_arg is not None else int(x.shape[dims[-1]])
    return sizes
