"""Stage 4, policy: the tuned result as plain data, saved as versioned JSON.

Its records (layer entries, scaler settings, verification) are in :mod:`autoprec.policy._records`.
A policy is readable and editable by a person: keys are the model's own qualified names
(``encoder.layers.3.attn.q``; a functional op in a module's own code is ``module.path::op``),
precision names are ``"fp32" | "fp16" | "bf16"``, and every exclusion carries the evidence behind
it. Loading a policy onto a model it does not fit is a :class:`~autoprec.PolicyError` that lists
the missing, extra and changed layers.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Mapping

import torch
from torch import nn

from ..core._fields import FIX, bad, check_bool, check_choice, check_int, check_number, check_str_map, check_strings
from ..core._formats import LOW_PRECISIONS
from ..core._modules import canonical_modules, leaves, signatures_of
from ..errors import DeviceWarning, OptionError, PolicyError
from ._records import NOISE_MULTIPLE, HeldOut, LayerEntry, ScalerSettings, StepSpeed, Verification

__all__ = ["SCHEMA_VERSION", "NOISE_MULTIPLE", "HeldOut", "LayerEntry", "ScalerSettings", "StepSpeed", "Verification", "Policy",
           "load"]

#: 2 added FP8 (the ``"fp8"`` precision with a layer's ``recipe``); files of version 1 load unchanged.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class Policy:
    """Per-layer precision for one model, with the scaler settings and the evidence.

    Build one with :func:`autoprec.tune`; read one with :func:`autoprec.load`.

    Example:
        >>> import torch, autoprec
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> p = autoprec.Policy(layers={"0": autoprec.LayerEntry("bf16")}, target="cpu",
        ...                     modules={"0": "Linear[weight(4, 4),bias(4,)]"})
        >>> with p.autocast(m):
        ...     y = m(torch.ones(2, 4))
        >>> y.dtype
        torch.float32
    """

    layers: dict[str, LayerEntry]
    target: str = "cpu"
    modules: dict[str, str] = field(default_factory=dict)       # leaf module path -> signature
    opaque: dict[str, str] = field(default_factory=dict)        # module -> why FX could not capture it
    handoff: dict[str, tuple[str, ...]] = field(default_factory=dict)  # layer -> the layers, all, it feeds
    unseen: dict[str, int] = field(default_factory=dict)        # module -> matmul-class FLOPs outside every layer
    formats: tuple[str, ...] = ()
    scaler: ScalerSettings | None = None
    tolerance: dict[str, float] = field(default_factory=dict)
    verification: Verification | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    emulated: bool = False  # the evidence was measured on a CPU emulating the CUDA target (autoprec.runtime._emulation)
    speed: StepSpeed | None = None  # the training step's time against FP32 and blanket autocast (autoprec.verify._step_speed)
    held_out: HeldOut | None = None  # the policy checked on data it was not tuned on (autoprec.verify._held_out)

    def __post_init__(self) -> None:
        r = "Policy"
        if not isinstance(self.layers, dict) or not all(isinstance(k, str) for k in self.layers):
            raise bad(r, "layers", self.layers, "an object of layer name -> LayerEntry")
        wrong = [k for k, e in self.layers.items() if not isinstance(e, LayerEntry)]
        if wrong:
            raise bad(r, f"layers[{wrong[0]!r}]", self.layers[wrong[0]], "an autoprec.LayerEntry")
        check_choice(r, "target", self.target, ("cpu", "cuda"))
        for name in ("modules", "opaque"):
            object.__setattr__(self, name, check_str_map(r, name, getattr(self, name)))
        object.__setattr__(self, "handoff", check_str_map(
            r, "handoff", self.handoff, lambda k, v: check_strings(r, f"handoff[{k!r}]", v),
            "an object of layer name -> list of layer names"))
        object.__setattr__(self, "formats", check_strings(r, "formats", self.formats, LOW_PRECISIONS + ("fp8",)))
        if self.scaler is not None and not isinstance(self.scaler, ScalerSettings):
            raise bad(r, "scaler", self.scaler, "null or an autoprec.ScalerSettings")
        object.__setattr__(self, "tolerance", check_str_map(
            r, "tolerance", self.tolerance, lambda k, v: check_number(r, f"tolerance[{k!r}]", v, strict=True),
            "an object of name -> positive number"))
        if self.verification is not None and not isinstance(self.verification, Verification):
            raise bad(r, "verification", self.verification, "null or an autoprec.Verification")
        if not isinstance(self.stats, dict) or not all(isinstance(k, str) for k in self.stats):
            raise bad(r, "stats", self.stats, "an object of name -> value")
        if type(self.schema_version) is not int or self.schema_version != SCHEMA_VERSION:
            raise PolicyError(f"unknown policy schema version {self.schema_version!r}: this autoprec reads version "
                              f"{SCHEMA_VERSION}; re-run autoprec.tune to make a new policy")
        check_bool(r, "emulated", self.emulated)  # absent in files written before the field: False
        if self.speed is not None and not isinstance(self.speed, StepSpeed):
            raise bad(r, "speed", self.speed, "null or an autoprec.StepSpeed")
        if self.held_out is not None and not isinstance(self.held_out, HeldOut):
            raise bad(r, "held_out", self.held_out, "null or an autoprec.HeldOut")
        object.__setattr__(self, "unseen", check_str_map(
            r, "unseen", self.unseen, lambda k, v: check_int(r, f"unseen[{k!r}]", v),
            "an object of module path -> FLOP count (a non-negative integer)"))

    # -- data ---------------------------------------------------------------------------------
    @property
    def assignment(self) -> dict[str, str]:
        """Layer key -> precision.

        Example:
            >>> Policy(layers={"fc": LayerEntry("fp16")}).assignment
            {'fc': 'fp16'}
        """
        return {k: e.precision for k, e in self.layers.items()}

    @property
    def recipes(self) -> dict[str, str]:
        """FP8 layer key -> its torchao recipe (``"fp8"`` layers only).

        Example:
            >>> Policy(layers={"fc": LayerEntry("fp8", recipe="rowwise"), "head": LayerEntry("bf16")}).recipes
            {'fc': 'rowwise'}
        """
        return {k: e.recipe for k, e in self.layers.items() if e.precision == "fp8"}

    def excluded(self) -> dict[str, LayerEntry]:
        """The layers kept in FP32 for a numerical reason.

        Example:
            >>> Policy(layers={"a": LayerEntry("fp32", "overflow", excluded=True)}).excluded()["a"].reason
            'overflow'
        """
        return {k: e for k, e in self.layers.items() if e.excluded}

    def low_precision_fraction(self) -> float:
        """Fraction of the model's forward matmul-class FLOPs (measured at run time by the trace) in
        layers assigned FP16, BF16 or FP8; FLOPs that run outside every layer (``unseen``) count as FP32.

        Example:
            >>> Policy(layers={"a": LayerEntry("bf16", flops=3), "b": LayerEntry("fp32", flops=1)}
            ...        ).low_precision_fraction()
            0.75
            >>> Policy(layers={"a": LayerEntry("bf16", flops=3)}, unseen={"rnn": 1}).low_precision_fraction()
            0.75
        """
        total = sum(e.flops for e in self.layers.values()) + sum(self.unseen.values())
        low = sum(e.flops for e in self.layers.values() if e.precision != "fp32")
        return low / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data.

        Example:
            >>> Policy(layers={}).to_dict()["schema_version"]
            2
        """
        data = asdict(self)
        data["layers"] = {k: asdict(v) for k, v in self.layers.items()}
        return _jsonable(data)

    @classmethod
    def from_dict(cls, data: Any) -> "Policy":
        """Validate and build a policy from :meth:`to_dict` data.

        Example:
            >>> p = Policy(layers={"fc": LayerEntry("bf16")})
            >>> Policy.from_dict(p.to_dict()) == p
            True
        """
        if not isinstance(data, Mapping):
            raise PolicyError(f"a policy is a JSON object, got {type(data).__name__}: is this a policy file?")
        version = data.get("schema_version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise PolicyError(f"unknown policy schema version {version!r}: this autoprec reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}; re-run autoprec.tune to make a new policy")
        data = {k: v for k, v in data.items() if k not in _DROPPED}
        data["schema_version"] = SCHEMA_VERSION  # an older file holds nothing a newer field changes the meaning of
        layers = data.get("layers")
        if not isinstance(layers, Mapping):
            raise bad("Policy", "layers", layers, "an object of layer name -> entry")
        values = _fields(cls, data, "policy")
        values["layers"] = {k: _record(LayerEntry, v, f"layer {k!r}") for k, v in layers.items()}
        if data.get("scaler") is not None:
            values["scaler"] = _record(ScalerSettings, data["scaler"], "scaler")
        if data.get("verification") is not None:
            values["verification"] = _record(Verification, data["verification"], "verification")
        if data.get("speed") is not None:
            values["speed"] = _record(StepSpeed, data["speed"], "speed")
        if data.get("held_out") is not None:
            values["held_out"] = _record(HeldOut, data["held_out"], "held_out")
        return cls(**values)

    def save(self, path: str | os.PathLike) -> None:
        """Write the policy as JSON: fields in a fixed order, layers in the model's order.

        Example:
            >>> import tempfile, os
            >>> p = Policy(layers={"fc": LayerEntry("bf16")})
            >>> f = os.path.join(tempfile.mkdtemp(), "p.json"); p.save(f); load(f) == p
            True
        """
        text = json.dumps(self.to_dict(), indent=2, allow_nan=True)
        tmp = f"{os.fspath(path)}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise PolicyError(f"cannot write policy file {os.fspath(path)!r}: {exc.strerror or exc}") from None

    # -- checking a model ---------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise :class:`PolicyError` unless ``model`` has the modules this policy names and was tuned on.

        Example:
            >>> p = Policy(layers={}, modules={"0": "Linear[weight(4, 4),bias(4,)]"})
            >>> p.check(torch.nn.Sequential(torch.nn.Linear(4, 4))) is None
            True
            >>> p.check(torch.nn.Sequential(torch.nn.Linear(4, 8)))  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            autoprec.errors.PolicyError: this policy does not fit this model (changed: 0 (Linear[weight(4, 4),bias(4,)] -> Linear[weight(8, 4),bias(8,)])): ...
        """
        if not isinstance(model, nn.Module):
            raise PolicyError(f"a policy applies to a torch.nn.Module, got {type(model).__name__}")
        check_modules(self, canonical_modules(model))

    # -- runtime (stage 5) and report (stage 7) -------------------------------------------------
    def autocast(self, model: nn.Module):
        """Context manager: run ``model`` with this policy's per-layer precision inside the block.

        Example:
            >>> _ = torch.manual_seed(0)
            >>> m, x = torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.randn(8, 4)
            >>> with Policy(layers={"0": LayerEntry("bf16")}).autocast(m):
            ...     y = m(x)
            >>> y.dtype, torch.equal(y, m(x))  # computed in BF16, handed back in FP32
            (torch.float32, False)
        """
        from ..runtime._apply import autocast  # a later stage: imported when used, so the records import no runtime

        return autocast(self, model)

    def apply(self, model: nn.Module):
        """Install this policy on ``model`` until ``handle.remove()``.

        Example:
            >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
            >>> h = Policy(layers={"0": LayerEntry("bf16")}).apply(m)
            >>> m(torch.ones(1, 4)).dtype  # the last layer's BF16 output is handed back in FP32
            torch.float32
            >>> h.remove(); type(m[0]).__name__
            'Linear'
        """
        from ..runtime._apply import apply  # a later stage: imported when used

        return apply(self, model)

    def grad_scaler(self, device: str | torch.device | None = None) -> torch.amp.GradScaler | None:
        """A ``torch.amp.GradScaler`` for ``device``, with the tuned settings; None when no layer is FP16.

        ``device`` is where training will run (``"cuda"``, ``"cpu"``, ``torch.device("cuda:1")``);
        by default the policy's target, or the CPU where the target has no device here. When it is
        another kind of device than the policy was tuned for, a :class:`~autoprec.DeviceWarning`
        says so: the loss scale was chosen for the target's numerics. A policy with FP16 layers but
        no tuned settings (written by hand) gets torch's defaults.

        Example:
            >>> Policy(layers={"0": LayerEntry("bf16")}).grad_scaler() is None
            True
            >>> Policy(layers={"0": LayerEntry("fp16")}, target="cpu").grad_scaler("cpu").get_scale()
            65536.0
        """
        if "fp16" not in self.assignment.values():
            return None
        if device is None:
            device = self.target if self.target == "cpu" or torch.cuda.is_available() else "cpu"
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError):
            raise OptionError(f"grad_scaler(device={device!r}) is not a device: pass where training runs, e.g. "
                              f"'cuda', 'cuda:0' or 'cpu'") from None
        if kind != self.target:
            warnings.warn(f"this policy was tuned for {self.target!r} and its GradScaler is made for {kind!r}: the "
                          f"loss scale was chosen for {self.target} numerics; tune on (or for) {kind!r} "
                          f"(autoprec.tune(..., target={kind!r})) for settings measured there",
                          DeviceWarning, stacklevel=2)
        return scaler_for(self, kind)

    def report(self, format: str = "md") -> str:
        """The report: excluded layers and why, formats, scaler, 16-bit FLOPs, verification.

        Example:
            >>> print(Policy(layers={"0": LayerEntry("bf16", flops=8)}).report().splitlines()[0])
            # autoprec policy report
        """
        from ..report._report import render  # a later stage: imported when used

        return render(self, format)


def scaler_for(policy: Policy, device_type: str) -> torch.amp.GradScaler | None:
    """:meth:`Policy.grad_scaler` without the device check: for tune's runs, which emulate the target."""
    if "fp16" not in policy.assignment.values():
        return None
    s = policy.scaler or ScalerSettings()  # a hand-written FP16 policy still needs loss scaling
    return torch.amp.GradScaler(device_type, init_scale=s.init_scale, growth_factor=s.growth_factor,
                                backoff_factor=s.backoff_factor, growth_interval=s.growth_interval)


def check_modules(policy: Policy, modules: Mapping[str, nn.Module]) -> None:
    """:meth:`Policy.check` on a model's ``{canonical path: module}`` map, for callers that have it already."""
    parts = []
    unknown = sorted(k for k in policy.layers if k.split("::", 1)[0] not in modules)
    if unknown:
        parts.append(f"layers naming modules the model does not have: {_some(unknown)}")
    units = leaves(modules)
    inner = sorted(k for k in policy.layers if "::" not in k and k in modules and k not in units)
    if inner:
        parts.append(f"module entries that name modules with children (a module entry names a leaf; "
                     f"an op in a module's own code is 'module.path::op'): {_some(inner)}")
    if policy.modules:
        have = signatures_of(units)
        missing = sorted(set(policy.modules) - set(have))
        extra = sorted(set(have) - set(policy.modules))
        changed = sorted(k for k in set(have) & set(policy.modules) if have[k] != policy.modules[k])
        if missing:
            parts.append(f"missing from the model: {_some(missing)}")
        if extra:
            parts.append(f"not in the policy: {_some(extra)}")
        if changed:
            parts.append("changed: " + _some([f"{k} ({policy.modules[k]} -> {have[k]})" for k in changed]))
    if parts:
        raise PolicyError("this policy does not fit this model (" + "; ".join(parts) + "): tune this model "
                          "with autoprec.tune, or load the policy made for it; keys are the model's "
                          "qualified module names (module.path, or module.path::op)")


def _some(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


#: Fields of earlier files that are read and dropped: ``fingerprint`` (a digest of ``modules`` and the
#: layer names, both checked against the model directly).
_DROPPED = frozenset({"fingerprint"})


def _fields(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``data``'s entries as keyword arguments of ``cls``: unknown and missing fields are refused by name."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"{where}: expected an object of {cls.__name__} fields, got {_type(data)}; {FIX}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise PolicyError(f"{where}: unknown fields {unknown}; a {cls.__name__} has {known}; {FIX}")
    missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise PolicyError(f"{where}: required fields {missing} are missing; {FIX}")
    return dict(data)


def _record(cls: type, data: Any, where: str) -> Any:
    try:
        return cls(**_fields(cls, data, where))
    except PolicyError as exc:
        text = str(exc)
        raise PolicyError(text if text.startswith(where) else f"{where}: {text}") from None


def _type(x: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), type(x).__name__)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return x  # json writes Infinity/NaN, which json reads back
    return x


def load(path: str | os.PathLike) -> Policy:
    """Read a policy saved by :meth:`Policy.save`.

    Raises :class:`~autoprec.PolicyError` for a missing, corrupt or truncated file, an unknown
    schema version or unknown precision names.

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "p.json")
        >>> Policy(layers={"fc": LayerEntry("fp16")}).save(f)
        >>> load(f).layers["fc"].precision
        'fp16'
    """
    if not isinstance(path, (str, os.PathLike)):
        raise PolicyError(f"load takes a file path, got {type(path).__name__}")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {os.fspath(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"policy file {os.fspath(path)!r} is not UTF-8 text: is it a policy file?") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"policy file {os.fspath(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}): "
                          "it may be truncated or corrupt; re-run autoprec.tune") from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, absurd nesting
        raise PolicyError(f"policy file {os.fspath(path)!r} is not a policy ({type(exc).__name__}): "
                          "it may be corrupt; re-run autoprec.tune") from None
    return Policy.from_dict(data)
