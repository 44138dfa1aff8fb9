"""Device profile files: a :class:`~autoprec.device._costs.DeviceProfile` as versioned JSON, validated on load.

``autoprec calibrate --out h100.json`` writes one on the device; ``tune(..., profile="h100.json")``
reads it on another machine. A file that does not fit is a :class:`~autoprec.errors.ProfileError`
naming the field, the value found, what is allowed, and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ..core._fields import Source, bad, check_int, check_number, check_str
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


def _object(where: Source, field: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise bad(where, field, value, "a JSON object")
    return value


def _formats(where: Source, field: str, value: Mapping[str, Any], required: tuple[str, ...]) -> None:
    unknown = [f for f in value if f not in _FORMATS]
    missing = [f for f in required if f not in value]
    if unknown or missing:
        raise bad(where, field, sorted(value), f"the formats {list(required)} (each of {list(_FORMATS)})")


def _positive(where: Source, field: str, values: list[Any]) -> tuple[float, ...]:
    return tuple(check_number(where, f"{field}[{j}]", x, strict=True) for j, x in enumerate(values))


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
    where = Source(f"device profile {source!r}", ProfileError, _FIX)
    data = _object(where, "(top level)", data)
    _check_header(where, data)
    cast, region, fmts = _cast_and_region(where, data)
    curves = _curves(where, data.get("curves"), fmts)
    elementwise = _elementwise(where, data.get("elementwise"), fmts)
    layers = _layers(where, data.get("layers", {}), fmts)
    ops = data.get("full_width_ops", [])
    if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
        raise bad(where, "full_width_ops", ops, "a list of op names")
    return DeviceProfile(
        target=data["target"], device=data["device"], capability=data["capability"], origin=origin,
        curves=curves, elementwise=elementwise,
        cast={f: check_number(where, f"cast.{f}", v, strict=True) for f, v in cast.items()},
        region={f: check_number(where, f"region.{f}", v) for f, v in region.items()},
        layers=layers, full_width_ops=frozenset(ops), torch_version=data["torch_version"], threads=data["threads"],
        source=source)


def _check_header(where: Source, data: Mapping[str, Any]) -> None:
    """The schema version, no unknown field, and the fields that say which device the profile is of."""
    version = data.get(_VERSION_KEY)
    if type(version) is not int or version != PROFILE_VERSION:
        raise bad(where, _VERSION_KEY, version, f"{PROFILE_VERSION} (the version this autoprec reads)")
    known = {_VERSION_KEY, "target", "device", "capability", "torch_version", "threads", "curves", "elementwise",
             "cast", "region", "layers", "full_width_ops"}
    for key in data:
        if key not in known:
            raise bad(where, key, data[key], f"only the fields {sorted(known)}")
    if data.get("target") not in ("cpu", "cuda"):
        raise bad(where, "target", data.get("target"), "'cpu' or 'cuda'")
    for key in ("device", "capability", "torch_version"):
        check_str(where, key, data.get(key))
    check_int(where, "threads", data.get("threads"))


def _cast_and_region(where: Source, data: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any],
                                                                        tuple[str, ...]]:
    """The cast and region objects (their figures are checked as the profile is built) and the formats priced."""
    cast = _object(where, "cast", data.get("cast"))
    low = tuple(f for f in cast)
    if not low:
        raise bad(where, "cast", dict(cast), "at least one of 'fp16', 'bf16'")
    _formats(where, "cast", cast, low)
    if "fp32" in cast:
        raise bad(where, "cast", sorted(cast), "'fp16' and/or 'bf16' (FP32 needs no cast)")
    region = _object(where, "region", data.get("region"))
    _formats(where, "region", region, low)
    return cast, region, ("fp32",) + low


def _curves(where: Source, raw: Any, fmts: tuple[str, ...]) -> tuple[Curve, ...]:
    """The time-against-size curves: ascending sizes, times that do not decrease, a matmul curve among them."""
    if not isinstance(raw, list) or not raw:
        raise bad(where, "curves", raw, "a non-empty list of {kind, flops, seconds}")
    curves = tuple(_curve(where, i, c, fmts) for i, c in enumerate(raw))
    if not any(c.kind == "matmul" for c in curves):
        raise bad(where, "curves", [c.kind for c in curves], "a 'matmul' curve among them")
    return curves


def _curve(where: Source, i: int, raw: Any, fmts: tuple[str, ...]) -> Curve:
    c = _object(where, f"curves[{i}]", raw)
    if c.get("kind") not in KINDS:
        raise bad(where, f"curves[{i}].kind", c.get("kind"), f"one of {list(KINDS)}")
    flops = c.get("flops")
    if not isinstance(flops, list) or len(flops) < 2:
        raise bad(where, f"curves[{i}].flops", flops, "a list of 2 or more FLOP counts")
    xs = _positive(where, f"curves[{i}].flops", flops)
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise bad(where, f"curves[{i}].flops", flops, "strictly ascending sizes")
    secs = _object(where, f"curves[{i}].seconds", c.get("seconds"))
    if c["kind"] == "matmul" and "fp8" in secs:  # FP8 GEMMs (optional, matmul only): see _fp8_costs
        _formats(where, f"curves[{i}].seconds", {f: v for f, v in secs.items() if f != "fp8"}, fmts)
    else:
        _formats(where, f"curves[{i}].seconds", secs, fmts)
    ys = {}
    for f, s in secs.items():
        name = f"curves[{i}].seconds.{f}"
        if not isinstance(s, list) or len(s) != len(xs):
            raise bad(where, name, s, f"a list of {len(xs)} times, one per size")
        ys[f] = _positive(where, name, s)
        if any(b < a for a, b in zip(ys[f], ys[f][1:])):
            raise bad(where, name, s, "times that do not decrease as the size grows")
    return Curve(c["kind"], xs, ys)


def _elementwise(where: Source, raw: Any, fmts: tuple[str, ...]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per elementwise class and format: seconds per call (>= 0) and per element (> 0)."""
    ew = _object(where, "elementwise", raw)
    if sorted(ew) != sorted(ELEMENTWISE):
        raise bad(where, "elementwise", sorted(ew), f"exactly the classes {list(ELEMENTWISE)}")
    elementwise: dict[str, dict[str, tuple[float, float]]] = {}
    for k, per in ew.items():
        per = _object(where, f"elementwise.{k}", per)
        _formats(where, f"elementwise.{k}", per, fmts)
        elementwise[k] = {}
        for f, v in per.items():
            if not isinstance(v, list) or len(v) != 2:
                raise bad(where, f"elementwise.{k}.{f}", v, "[seconds per call, seconds per element]")
            elementwise[k][f] = (check_number(where, f"elementwise.{k}.{f}[0]", v[0]),
                                 check_number(where, f"elementwise.{k}.{f}[1]", v[1], strict=True))
    return elementwise


def _layers(where: Source, raw: Any, fmts: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The model's layers timed at their shapes: per layer, seconds (> 0) per format."""
    layers = {}
    for k, per in _object(where, "layers", raw).items():
        per = _object(where, f"layers.{k}", per)
        for f in per:
            if f not in fmts:
                raise bad(where, f"layers.{k}", sorted(per), f"formats among {list(fmts)}")
        layers[str(k)] = {f: check_number(where, f"layers.{k}.{f}", v, strict=True) for f, v in per.items()}
    return layers
