"""Precision formats: names, dtypes, numeric limits, and which a target device may use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch

from ..errors import FormatError, OptionError

__all__ = ["Precision", "PRECISIONS", "LOW_PRECISIONS", "FormatInfo", "info", "to_dtype", "from_dtype",
           "default_formats", "check_formats", "resolve_target"]

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
LOW_PRECISIONS: tuple[str, ...] = ("fp16", "bf16")

_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "32": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class FormatInfo:
    """Numeric limits of one format (from ``torch.finfo``)."""

    name: str
    dtype: torch.dtype
    max: float
    tiny: float          # smallest normal
    subnormal: float     # smallest positive subnormal: anything below half of it flushes to zero
    eps: float


def info(name: str) -> FormatInfo:
    """Limits of a format by name.

    Example:
        >>> info("fp16").max
        65504.0
    """
    dtype = to_dtype(name)
    fi = torch.finfo(dtype)
    sub = float(fi.smallest_normal) * float(fi.eps)
    return FormatInfo(_canonical(name), dtype, float(fi.max), float(fi.smallest_normal), sub, float(fi.eps))


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise OptionError(f"unknown precision {name!r}: use one of 'fp32', 'fp16', 'bf16'")
    return _ALIASES[key]


def to_dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision name.

    Example:
        >>> to_dtype("bf16")
        torch.bfloat16
    """
    return _DTYPES[_canonical(name)]


def from_dtype(dtype: torch.dtype) -> str:
    """The precision name of a torch dtype.

    Example:
        >>> from_dtype(torch.float16)
        'fp16'
    """
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise OptionError(f"dtype {dtype} is not a precision autoprec assigns: use float32, float16 or bfloat16")


def resolve_target(target: str | torch.device | None, model_device: torch.device) -> str:
    """The device type a policy is tuned for: ``"cpu"`` or ``"cuda"`` (default: the model's).

    Example:
        >>> resolve_target(None, torch.device("cpu"))
        'cpu'
    """
    if target is None:
        if model_device.type not in ("cpu", "cuda"):
            raise FormatError(f"the model is on {model_device.type!r}; autoprec tunes for 'cpu' or 'cuda': "
                              "move the model, or pass target='cpu' or target='cuda'")
        return model_device.type
    try:
        kind = target.type if isinstance(target, torch.device) else torch.device(target).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise OptionError(f"target device {target!r} is not supported: use 'cpu' or 'cuda'")
    return kind


def cuda_bf16_native(device: torch.device | int | None = None) -> bool:
    """Whether a CUDA device (default: the current one) runs BF16 in hardware (Ampere and later), not emulated.

    Example:
        >>> isinstance(cuda_bf16_native(), bool)
        True
    """
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):  # torch asks the current device
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch without the argument: it did not count emulation then
            return bool(torch.cuda.is_bf16_supported())


def default_formats(target: str) -> tuple[str, ...]:
    """The 16-bit formats tried by default: BF16 on CPU, FP16 (and BF16 where supported) on CUDA.

    Tried, not assumed fast: a layer gets one only where the device profile (measured by
    :mod:`autoprec.device._calibration`, or read from a file) prices it below FP32.

    Example:
        >>> default_formats("cpu")
        ('bf16',)
    """
    if target == "cuda":
        if torch.cuda.is_available() and not cuda_bf16_native():
            return ("fp16",)
        return ("fp16", "bf16")
    return ("bf16",)


def _check_fp8(formats: tuple[str, ...], target: str, run_device: torch.device) -> None:
    """FP8 is asked for: it needs BF16 beside it (the rest of an FP8 layer's region), a CUDA target, torchao, and
    on a CUDA device it runs on, FP8 GEMMs (sm89+)."""
    from ._fp8 import float8, native_fp8

    if "bf16" not in formats:
        raise OptionError(f"dtypes={list(formats)!r} names fp8 without bf16: an FP8 layer runs its GEMMs in FP8 and "
                          "the rest of its region in BF16; pass dtypes=['bf16', 'fp8']")
    if target != "cuda":
        raise FormatError(f"fp8 for target {target!r}: a CPU has no FP8 GEMMs, so FP8 can only cost time there; "
                          "tune for target='cuda' (FP8 is emulated on this CPU), or leave 'fp8' out")
    float8()  # torchao, or the error naming autoprec[fp8]
    if run_device.type == "cuda" and not native_fp8(run_device):
        raise FormatError(f"this CUDA device ({torch.cuda.get_device_name(run_device)}) has no FP8 GEMMs (sm89 and "
                          "later have them): leave 'fp8' out, or tune on an Ada, Hopper or Blackwell GPU")


def check_formats(dtypes: Iterable[str] | str | None, target: str, run_device: torch.device) -> tuple[str, ...]:
    """Validate the caller's ``dtypes=`` against the target and the device the probe runs on.

    A format the device cannot run is a :class:`FormatError`, never a silent downgrade. ``"fp8"`` (the GEMMs of
    Linears, with ``"bf16"`` for the rest of their regions) needs a CUDA target and torchao (``autoprec[fp8]``).

    Example:
        >>> check_formats(["bf16"], "cpu", torch.device("cpu"))
        ('bf16',)
    """
    if dtypes is None:
        formats: Sequence[str] = default_formats(target)
    else:
        if isinstance(dtypes, str):
            dtypes = [d for d in dtypes.split(",") if d.strip()]
        elif isinstance(dtypes, torch.dtype):
            dtypes = [dtypes]
        if not isinstance(dtypes, Iterable):
            raise OptionError(f"dtypes={dtypes!r} must name 16-bit formats, e.g. ['bf16'] or 'fp16,bf16'")
        formats = []
        for d in dtypes:
            if not isinstance(d, (str, torch.dtype)):
                raise OptionError(f"dtypes entry {d!r} is not a precision name: use 'fp16' or 'bf16'")
            fp8 = isinstance(d, str) and d.strip().lower() in ("fp8", "float8")
            if isinstance(d, str) and not fp8 and d.strip().lower() not in _ALIASES:
                raise OptionError(f"unknown precision {d!r} in dtypes: use 'fp16' and/or 'bf16' (FP32 is always "
                                  "allowed), and 'fp8' beside 'bf16' for the GEMMs of Linears on a CUDA target")
            name = "fp8" if fp8 else from_dtype(d) if isinstance(d, torch.dtype) else _canonical(d)
            if name == "fp32":
                continue  # FP32 is always allowed; dtypes names the 16-bit candidates
            if name not in formats:
                formats.append(name)
    formats = tuple(formats)
    if "fp8" in formats:
        _check_fp8(formats, target, run_device)
    if not formats:
        raise OptionError(f"dtypes={dtypes!r} names no 16-bit format, so there is nothing to tune: name 'fp16' "
                          "and/or 'bf16' (FP32 is always allowed), or leave dtypes out for the target's default")
    if target == "cuda" and "bf16" in formats and torch.cuda.is_available() and run_device.type == "cuda":
        if not cuda_bf16_native(run_device):
            raise FormatError("this CUDA device cannot run bf16 (no native BF16 before Ampere): pass dtypes=['fp16']")
    return formats
