"""Field checks for the policy records: one path for records built in code and loaded from files.

Each record (:class:`~autoprec.LayerEntry`, :class:`~autoprec.ScalerSettings`,
:class:`~autoprec.Verification`, :class:`~autoprec.Policy`) checks its own fields in
``__post_init__`` with these helpers, so a policy written by hand in Python is held to the same
rules as one read from JSON. Every refusal is a :class:`~autoprec.PolicyError` that names the
record and field, shows the value found, says what is allowed, and how to fix it.

Other files go through the same helpers: where ``record`` is a :class:`Source` (a device profile
file, :mod:`autoprec.device._files`), the refusal is that source's error class, with its fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import AutoprecError, PolicyError

__all__ = ["FIX", "Source", "bad", "check_bool", "check_choice", "check_int", "check_number", "check_str",
           "check_str_map", "check_numbers", "check_strings"]

FIX = "correct it (in the policy file, or the code that built the record) or re-run autoprec.tune for a new policy"


@dataclass(frozen=True)
class Source:
    """A file whose fields the helpers check, when it is not a policy record: its name in messages, the
    error its refusals raise, and the fix they name.

    Example:
        >>> from autoprec.errors import ProfileError
        >>> where = Source("device profile 'gpu.json'", ProfileError, "re-run `autoprec calibrate`")
        >>> check_int(where, "threads", -1)
        Traceback (most recent call last):
        ...
        autoprec.errors.ProfileError: device profile 'gpu.json': field 'threads' is -1; allowed: an integer >= 0; fix: re-run `autoprec calibrate`
    """

    name: str
    error: type[AutoprecError]
    fix: str


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def bad(record: str | Source, name: str, value: Any, allowed: str) -> AutoprecError:
    """The error for one field: the record, the field, the value found, what is allowed, the fix.

    ``record`` names a policy record (a :class:`~autoprec.PolicyError`), or is a :class:`Source` (its error
    and fix).

    Example:
        >>> print(bad("LayerEntry", "precision", "fp8", "one of 'fp32', 'fp16', 'bf16'"))
        LayerEntry field 'precision' is 'fp8' (str); allowed: one of 'fp32', 'fp16', 'bf16'; correct it (in the policy file, or the code that built the record) or re-run autoprec.tune for a new policy
    """
    if isinstance(record, Source):
        return record.error(f"{record.name}: field {name!r} is {_show(value)}; allowed: {allowed}; fix: {record.fix}")
    return PolicyError(f"{record} field {name!r} is {_show(value)} ({type(value).__name__}); allowed: {allowed}; {FIX}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)  # JSON true/false is not a number


def check_number(record: str | Source, name: str, value: Any, *, low: float | None = 0.0, strict: bool = False,
                 high: float | None = None, finite: bool = True) -> float:
    """A real number in range; returns it as a float.

    Example:
        >>> check_number("ScalerSettings", "init_scale", 65536, strict=True)
        65536.0
        >>> check_number("ScalerSettings", "init_scale", True)
        Traceback (most recent call last):
        ...
        autoprec.errors.PolicyError: ScalerSettings field 'init_scale' is True (bool); allowed: a finite number >= 0; correct it (in the policy file, or the code that built the record) or re-run autoprec.tune for a new policy
    """
    parts = ["a finite number" if finite else "a number (inf allowed, not NaN)"]
    if low is not None:
        parts.append(f"{'>' if strict else '>='} {low:g}")
    if high is not None:
        parts.append(f"and < {high:g}")
    allowed = " ".join(parts)
    if not _is_number(value):
        raise bad(record, name, value, allowed)
    try:
        x = float(value)
    except OverflowError:  # an integer beyond float range
        raise bad(record, name, value, allowed) from None
    if math.isnan(x) or (finite and math.isinf(x)):
        raise bad(record, name, value, allowed)
    if low is not None and (x < low or (strict and x == low)):
        raise bad(record, name, value, allowed)
    if high is not None and x >= high:
        raise bad(record, name, value, allowed)
    return x


def check_int(record: str | Source, name: str, value: Any, *, low: int = 0) -> int:
    """An integer (not a bool) of at least ``low``.

    Example:
        >>> check_int("Verification", "steps", 20)
        20
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise bad(record, name, value, f"an integer >= {low}")
    return value


def check_bool(record: str | Source, name: str, value: Any) -> bool:
    """``True`` or ``False`` (JSON ``true``/``false``), not a string or number that looks like one.

    Example:
        >>> check_bool("Verification", "passed", "false")
        Traceback (most recent call last):
        ...
        autoprec.errors.PolicyError: Verification field 'passed' is 'false' (str); allowed: true or false (a JSON boolean, not a string); correct it (in the policy file, or the code that built the record) or re-run autoprec.tune for a new policy
    """
    if not isinstance(value, bool):
        raise bad(record, name, value, "true or false (a JSON boolean, not a string)")
    return value


def check_str(record: str | Source, name: str, value: Any) -> str:
    """A string.

    Example:
        >>> check_str("LayerEntry", "detail", "ok")
        'ok'
    """
    if not isinstance(value, str):
        raise bad(record, name, value, "a string")
    return value


def check_choice(record: str | Source, name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``.

    Example:
        >>> check_choice("Policy", "target", "cuda", ("cpu", "cuda"))
        'cuda'
    """
    if not isinstance(value, str) or value not in choices:
        raise bad(record, name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_strings(record: str | Source, name: str, value: Any,
                  choices: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """A list or tuple of strings (each one of ``choices`` where given); returns a tuple.

    Example:
        >>> check_strings("LayerEntry", "hazards", ["overflow"])
        ('overflow',)
    """
    allowed = "a list of strings" + ("" if choices is None else " from " + ", ".join(repr(c) for c in choices))
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise bad(record, name, value, allowed)
    if choices is not None and any(v not in choices for v in value):
        raise bad(record, name, value, allowed)
    return tuple(value)


def check_numbers(record: str | Source, name: str, value: Any, *, finite: bool = True) -> tuple[float, ...]:
    """A list or tuple of numbers (NaN and inf only where ``finite=False``); returns a tuple of floats.

    Example:
        >>> check_numbers("Verification", "fp32_losses", [2, 1.5])
        (2.0, 1.5)
    """
    allowed = "a list of finite numbers" if finite else "a list of numbers (NaN and inf allowed)"
    if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
        raise bad(record, name, value, allowed)
    try:
        out = tuple(float(v) for v in value)
    except OverflowError:
        raise bad(record, name, value, allowed) from None
    if finite and not all(math.isfinite(v) for v in out):
        raise bad(record, name, value, allowed)
    return out


def check_str_map(record: str | Source, name: str, value: Any, check: Callable[[str, Any], Any] | None = None,
                  allowed: str = "an object of string -> string") -> dict[str, Any]:
    """A dict with string keys; values are strings, or pass ``check(key, value)`` (which may convert them).

    Example:
        >>> check_str_map("Policy", "modules", {"0": "Linear[weight(4, 4)]"})
        {'0': 'Linear[weight(4, 4)]'}
    """
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise bad(record, name, value, allowed)
    if check is None:
        if not all(isinstance(v, str) for v in value.values()):
            raise bad(record, name, value, allowed)
        return dict(value)
    return {k: check(k, v) for k, v in value.items()}
