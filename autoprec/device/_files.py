"""Device profile files: a :class:`~autoprec.device._costs.DeviceProfile` as versioned JSON, validated on load.

``autoprec calibrate --out h100.json`` writes one on the device; ``tune(..., profile="h100.json")``
reads it on another machine. A file that does not fit is a :class:`~autoprec.errors.ProfileError`
naming the field, the value found, what is allowed, and the fix.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from ..errors import ProfileError
from ._costs import ELEMENTWISE, KINDS, Curve, DeviceProfile

__all__ = ["PROFILE_VERSION", "load_profile", "save_profile", "profile_to_dict", "profile_from_dict"]

#: The schema version this autoprec writes and reads.
PROFILE_VERSION = 1
_VERSION_KEY = "autoprec_device_profile"
_FORMATS = ("fp32", "fp16", "bf16")
_FIX = "re-run `autoprec calibrate --out FILE` on the target device to write a valid profile"


def profile_to_dict(profile: DeviceProfile) -> dict[str, Any]:
    """Plain JSON-able data, with the schema version.

    Example:
        >>> from autoprec.device import estimate
        >>> profile_to_dict(estimate("cuda"))["autoprec_device_profile"]
        1
    """
    return {
        _VERSION_KEY: PROFILE_VERSION,
        "target": profile.target, "device": profile.device, "capability": profile.capability,
        "torch_version": profile.torch_version, "threads": profile.threads,
        "curves": [{"kind": c.kind, "flops": list(c.flops), "seconds": {f: list(s) for f, s in c.seconds.items()}}
                   for c in profile.curves],
        "elementwise": {k: {f: list(v) for f, v in fmts.items()} for k, fmts in profile.elementwise.items()},
        "cast": dict(profile.cast), "region": dict(profile.region),
        "layers": {k: dict(v) for k, v in profile.layers.items()},
        "full_width_ops": sorted(profile.full_width_ops),
    }


def save_profile(profile: DeviceProfile, path: str | os.PathLike) -> None:
    """Write ``profile`` as JSON (atomically: a reader never sees half a file).

    Example:
        >>> import os, tempfile
        >>> from autoprec.device import estimate
        >>> f = os.path.join(tempfile.mkdtemp(), "gpu.json")
        >>> save_profile(estimate("cuda"), f)
        >>> load_profile(f).cast == estimate("cuda").cast
        True
    """
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(profile_to_dict(profile), fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def load_profile(path: str | os.PathLike, *, origin: str = "file") -> DeviceProfile:
    """Read and validate a profile file; ``origin`` is what the policy will say it came from.

    Example:
        >>> load_profile("/no/such/profile.json")
        Traceback (most recent call last):
        ...
        autoprec.errors.ProfileError: device profile '/no/such/profile.json' does not exist: pass the path of a file written by `autoprec calibrate --out FILE`
    """
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ProfileError(f"device profile {where!r} does not exist: pass the path of a file written by "
                           "`autoprec calibrate --out FILE`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"device profile {where!r} is not readable JSON ({exc}): {_FIX}") from None
    return profile_from_dict(data, source=where, origin=origin)


def _bad(source: str, field: str, value: Any, allowed: str) -> ProfileError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ProfileError(f"device profile {source!r}: field {field!r} is {shown}; allowed: {allowed}; fix: {_FIX}")


def _number(source: str, field: str, value: Any, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise _bad(source, field, value, "a finite number " + ("> 0" if positive else ">= 0"))
    return float(value)


def _object(source: str, field: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(source, field, value, "a JSON object")
    return value


def _formats(source: str, field: str, value: Mapping[str, Any], required: tuple[str, ...]) -> None:
    unknown = [f for f in value if f not in _FORMATS]
    missing = [f for f in required if f not in value]
    if unknown or missing:
        raise _bad(source, field, sorted(value), f"the formats {list(required)} (each of {list(_FORMATS)})")


def profile_from_dict(data: Any, *, source: str = "<dict>", origin: str = "file") -> DeviceProfile:
    """Validate profile data (see :func:`profile_to_dict`) and build the profile.

    Example:
        >>> from autoprec.device import estimate
        >>> d = profile_to_dict(estimate("cuda")); d["cast"]["bf16"] = -1.0
        >>> profile_from_dict(d)
        Traceback (most recent call last):
        ...
        autoprec.errors.ProfileError: device profile '<dict>': field 'cast.bf16' is -1.0; allowed: a finite number > 0; fix: re-run `autoprec calibrate --out FILE` on the target device to write a valid profile
    """
    data = _object(source, "(top level)", data)
    version = data.get(_VERSION_KEY)
    if type(version) is not int or version != PROFILE_VERSION:
        raise ProfileError(f"device profile {source!r}: field {_VERSION_KEY!r} is {version!r}; allowed: "
                           f"{PROFILE_VERSION} (the version this autoprec reads); fix: {_FIX}")
    known = {_VERSION_KEY, "target", "device", "capability", "torch_version", "threads", "curves", "elementwise",
             "cast", "region", "layers", "full_width_ops"}
    for key in data:
        if key not in known:
            raise _bad(source, key, data[key], f"only the fields {sorted(known)}")
    target = data.get("target")
    if target not in ("cpu", "cuda"):
        raise _bad(source, "target", target, "'cpu' or 'cuda'")
    for key in ("device", "capability", "torch_version"):
        if not isinstance(data.get(key), str):
            raise _bad(source, key, data.get(key), "a string")
    threads = data.get("threads")
    if type(threads) is not int or threads < 0:
        raise _bad(source, "threads", threads, "an integer >= 0")
    cast = _object(source, "cast", data.get("cast"))
    low = tuple(f for f in cast)
    if not low:
        raise _bad(source, "cast", dict(cast), "at least one of 'fp16', 'bf16'")
    fmts = ("fp32",) + low
    _formats(source, "cast", cast, low)
    if "fp32" in cast:
        raise _bad(source, "cast", sorted(cast), "'fp16' and/or 'bf16' (FP32 needs no cast)")
    region = _object(source, "region", data.get("region"))
    _formats(source, "region", region, low)
    curves_raw = data.get("curves")
    if not isinstance(curves_raw, list) or not curves_raw:
        raise _bad(source, "curves", curves_raw, "a non-empty list of {kind, flops, seconds}")
    curves = []
    for i, c in enumerate(curves_raw):
        c = _object(source, f"curves[{i}]", c)
        if c.get("kind") not in KINDS:
            raise _bad(source, f"curves[{i}].kind", c.get("kind"), f"one of {list(KINDS)}")
        flops = c.get("flops")
        if not isinstance(flops, list) or len(flops) < 2:
            raise _bad(source, f"curves[{i}].flops", flops, "a list of 2 or more FLOP counts")
        xs = tuple(_number(source, f"curves[{i}].flops[{j}]", x, positive=True) for j, x in enumerate(flops))
        if any(b <= a for a, b in zip(xs, xs[1:])):
            raise _bad(source, f"curves[{i}].flops", flops, "strictly ascending sizes")
        secs = _object(source, f"curves[{i}].seconds", c.get("seconds"))
        _formats(source, f"curves[{i}].seconds", secs, fmts)
        ys = {}
        for f, s in secs.items():
            name = f"curves[{i}].seconds.{f}"
            if not isinstance(s, list) or len(s) != len(xs):
                raise _bad(source, name, s, f"a list of {len(xs)} times, one per size")
            ys[f] = tuple(_number(source, f"{name}[{j}]", y, positive=True) for j, y in enumerate(s))
            if any(b < a for a, b in zip(ys[f], ys[f][1:])):
                raise _bad(source, name, s, "times that do not decrease as the size grows")
        curves.append(Curve(c["kind"], xs, ys))
    if not any(c.kind == "matmul" for c in curves):
        raise _bad(source, "curves", [c.kind for c in curves], "a 'matmul' curve among them")
    ew = _object(source, "elementwise", data.get("elementwise"))
    if sorted(ew) != sorted(ELEMENTWISE):
        raise _bad(source, "elementwise", sorted(ew), f"exactly the classes {list(ELEMENTWISE)}")
    elementwise = {}
    for k, per in ew.items():
        per = _object(source, f"elementwise.{k}", per)
        _formats(source, f"elementwise.{k}", per, fmts)
        elementwise[k] = {}
        for f, v in per.items():
            if not isinstance(v, list) or len(v) != 2:
                raise _bad(source, f"elementwise.{k}.{f}", v, "[seconds per call, seconds per element]")
            elementwise[k][f] = (_number(source, f"elementwise.{k}.{f}[0]", v[0]),
                                 _number(source, f"elementwise.{k}.{f}[1]", v[1], positive=True))
    layers = {}
    for k, per in _object(source, "layers", data.get("layers", {})).items():
        per = _object(source, f"layers.{k}", per)
        for f in per:
            if f not in fmts:
                raise _bad(source, f"layers.{k}", sorted(per), f"formats among {list(fmts)}")
        layers[str(k)] = {f: _number(source, f"layers.{k}.{f}", v, positive=True) for f, v in per.items()}
    ops = data.get("full_width_ops", [])
    if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
        raise _bad(source, "full_width_ops", ops, "a list of op names")
    return DeviceProfile(
        target=target, device=data["device"], capability=data["capability"], origin=origin,
        curves=tuple(curves), elementwise=elementwise,
        cast={f: _number(source, f"cast.{f}", v, positive=True) for f, v in cast.items()},
        region={f: _number(source, f"region.{f}", v) for f, v in region.items()},
        layers=layers, full_width_ops=frozenset(ops), torch_version=data["torch_version"], threads=threads,
        source=source)
