"""Stage 4, policy: the tuned result as plain data, saved as versioned JSON.

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
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .errors import PolicyError
from .formats import PRECISIONS
from .modules import canonical_modules, leaves
from .trace import signatures_of

__all__ = ["SCHEMA_VERSION", "LayerEntry", "ScalerSettings", "Verification", "Policy", "load"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LayerEntry:
    """One layer of a policy."""

    precision: str
    reason: str = "cast"           # "cast", or why the layer is FP32
    detail: str = ""               # measured evidence
    excluded: bool = False         # FP32 for a numerical reason
    kind: str = "module"           # "module" | "op"
    op: str = ""
    hazards: tuple[str, ...] = ()
    flops: int = 0                 # forward matmul/conv FLOPs per step
    out_absmax: float = 0.0        # FP32 reference: largest |output|, over all tuning batches
    grad_absmax: float = 0.0       # FP32 reference: largest |gradient| reaching its output
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # format -> probe figures


@dataclass(frozen=True)
class ScalerSettings:
    """GradScaler settings for FP16 layers."""

    init_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000


@dataclass(frozen=True)
class Verification:
    """Short training runs from identical weights and data: FP32 against the policy."""

    passed: bool
    steps: int
    fp32_losses: tuple[float, ...]
    policy_losses: tuple[float, ...]
    max_gap: float                 # max |policy - fp32| / |fp32 loss at step 0|
    bound: float
    skipped_steps: int
    longest_skip_run: int
    rounds: int                    # verification rounds (1 + back-offs)
    note: str = ""
    compiled: str = ""             # the torch.compile backend of the compiled run, "" where none ran
    compiled_losses: tuple[float, ...] = ()
    compiled_max_gap: float = 0.0


_ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "reason": (str,), "detail": (str,), "excluded": (bool,), "kind": (str,), "op": (str,), "hazards": (list, tuple),
    "flops": (int,), "out_absmax": (int, float), "grad_absmax": (int, float), "measured": (dict,),
}
_SCALER_TYPES: dict[str, tuple[type, ...]] = {
    "init_scale": (int, float), "growth_factor": (int, float), "backoff_factor": (int, float), "growth_interval": (int,),
}


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in kinds:
        return False  # JSON true/false is not a number here
    return isinstance(value, kinds)


def _float(x: Any, field: str) -> float:
    if not _is(x, (int, float)):
        raise PolicyError(f"policy field {field!r} holds {x!r}, not a number")
    return float(x)


def _count(x: Any, field: str) -> int:
    if not _is(x, (int,)) or x < 0:
        raise PolicyError(f"policy field {field!r} holds {x!r}, not a FLOP count (a non-negative integer)")
    return int(x)


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float range
        return False


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join({"str": "a string", "bool": "true/false", "int": "an integer", "float": "a number",
                        "list": "a list", "tuple": "a list", "dict": "an object"}[k.__name__] for k in kinds)


def _scaler(data: Mapping[str, Any]) -> ScalerSettings:
    unknown = set(data) - set(_SCALER_TYPES)
    if unknown:
        raise PolicyError(f"scaler: unknown fields {sorted(unknown)}; known: {sorted(_SCALER_TYPES)}")
    for name, kinds in _SCALER_TYPES.items():
        if name in data and not (_is(data[name], kinds) and data[name] > 0 and _finite(data[name])):
            raise PolicyError(f"scaler: {name} = {data[name]!r} must be a positive {_names(kinds)[2:]}")
    if "backoff_factor" in data and not data["backoff_factor"] < 1:
        raise PolicyError(f"scaler: backoff_factor = {data['backoff_factor']!r} must be below 1")
    return ScalerSettings(**data)


def _entry(data: Mapping[str, Any], key: str) -> LayerEntry:
    if not isinstance(data, Mapping):
        raise PolicyError(f"layer {key!r}: expected an object, got {type(data).__name__}")
    known = {f.name for f in fields(LayerEntry)}
    unknown = set(data) - known
    if unknown:
        raise PolicyError(f"layer {key!r}: unknown fields {sorted(unknown)}; known: {sorted(known)}")
    prec = data.get("precision")
    if prec not in PRECISIONS:
        raise PolicyError(f"layer {key!r}: precision {prec!r} is not one of {list(PRECISIONS)}")
    for name, kinds in _ENTRY_TYPES.items():
        if name in data and not _is(data[name], kinds):
            raise PolicyError(f"layer {key!r}: field {name!r} = {data[name]!r} is not {_names(kinds)}")
    if not all(isinstance(h, str) for h in data.get("hazards", ())):
        raise PolicyError(f"layer {key!r}: 'hazards' must be a list of strings")
    try:
        measured = data.get("measured", {})
        if not isinstance(measured, Mapping) or not all(isinstance(v, Mapping) for v in measured.values()):
            raise PolicyError(f"layer {key!r}: 'measured' must map a format to an object of figures")
        if not all(_is(x, (int, float)) for v in measured.values() for x in v.values()):
            raise PolicyError(f"layer {key!r}: 'measured' figures must be numbers")
        return LayerEntry(**{**data, "hazards": tuple(data.get("hazards", ())),
                             "measured": {str(f): {str(k): float(x) for k, x in v.items()}
                                          for f, v in measured.items()}})
    except (TypeError, ValueError, OverflowError) as exc:
        raise PolicyError(f"layer {key!r}: {exc}") from None


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
    fingerprint: str = ""
    verification: Verification | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.target not in ("cpu", "cuda"):
            raise PolicyError(f"policy target {self.target!r} is not 'cpu' or 'cuda'")
        if not isinstance(self.layers, dict) or not all(isinstance(e, LayerEntry) for e in self.layers.values()):
            raise PolicyError("Policy.layers must map layer names to autoprec.LayerEntry")
        bad = {k: e.precision for k, e in self.layers.items() if e.precision not in PRECISIONS}
        if bad:
            raise PolicyError(f"unknown precisions {bad}: use one of {list(PRECISIONS)}")

    # -- data ---------------------------------------------------------------------------------
    @property
    def assignment(self) -> dict[str, str]:
        """Layer key -> precision.

        Example:
            >>> Policy(layers={"fc": LayerEntry("fp16")}).assignment
            {'fc': 'fp16'}
        """
        return {k: e.precision for k, e in self.layers.items()}

    def excluded(self) -> dict[str, LayerEntry]:
        """The layers kept in FP32 for a numerical reason.

        Example:
            >>> Policy(layers={"a": LayerEntry("fp32", "overflow", excluded=True)}).excluded()["a"].reason
            'overflow'
        """
        return {k: e for k, e in self.layers.items() if e.excluded}

    def low_precision_fraction(self) -> float:
        """Fraction of the model's forward matmul-class FLOPs (measured at run time by the trace) in
        layers assigned FP16 or BF16; FLOPs that run outside every layer (``unseen``) count as FP32.

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
            1
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
            raise PolicyError(f"a policy is a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise PolicyError(f"unknown policy schema version {version!r}: this autoprec reads version "
                              f"{SCHEMA_VERSION}; re-run autoprec.tune to make a new policy")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"unknown policy fields {sorted(unknown)}; known: {sorted(known)}")
        layers = data.get("layers")
        if not isinstance(layers, Mapping):
            raise PolicyError("policy field 'layers' must be an object of layer name -> entry")
        target = data.get("target", "cpu")
        if target not in ("cpu", "cuda"):
            raise PolicyError(f"policy target {target!r} is not 'cpu' or 'cuda'")
        try:
            scaler = data.get("scaler")
            ver = data.get("verification")
            formats = tuple(data.get("formats", ()))
            if any(f not in PRECISIONS for f in formats):
                raise PolicyError(f"policy formats {list(formats)} name a precision outside {list(PRECISIONS)}")
            return cls(
                layers={str(k): _entry(v, str(k)) for k, v in layers.items()},
                target=target,
                modules={str(k): str(v) for k, v in _mapping(data, "modules").items()},
                opaque={str(k): str(v) for k, v in _mapping(data, "opaque").items()},
                handoff={str(k): _layer_names(v, f"handoff[{k!r}]") for k, v in _mapping(data, "handoff").items()},
                unseen={str(k): _count(v, f"unseen[{k!r}]") for k, v in _mapping(data, "unseen").items()},
                formats=formats,
                scaler=None if scaler is None else _scaler(_mapping(data, "scaler")),
                tolerance={str(k): _float(v, "tolerance") for k, v in _mapping(data, "tolerance").items()},
                fingerprint=str(data.get("fingerprint", "")),
                verification=None if ver is None else Verification(**{
                    **_mapping(data, "verification"),
                    "fp32_losses": tuple(float(x) for x in ver.get("fp32_losses", ())),
                    "policy_losses": tuple(float(x) for x in ver.get("policy_losses", ())),
                    "compiled_losses": tuple(float(x) for x in ver.get("compiled_losses", ()))}),
                stats=dict(_mapping(data, "stats")),
                schema_version=version,
            )
        except PolicyError:
            raise
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise PolicyError(f"invalid policy: {exc}") from None

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
            >>> p.check(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        """
        if not isinstance(model, nn.Module):
            raise PolicyError(f"a policy applies to a torch.nn.Module, got {type(model).__name__}")
        check_modules(self, canonical_modules(model))

    # -- runtime (stage 5) and report (stage 7) -------------------------------------------------
    def autocast(self, model: nn.Module):
        """Context manager: run ``model`` with this policy's per-layer precision inside the block.

        Example:
            >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
            >>> with Policy(layers={"0": LayerEntry("bf16")}).autocast(m):
            ...     _ = m(torch.ones(1, 4))
        """
        return _STAGES["autocast"](self, model)

    def apply(self, model: nn.Module):
        """Install this policy on ``model`` until ``handle.remove()``.

        Example:
            >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
            >>> h = Policy(layers={"0": LayerEntry("bf16")}).apply(m); h.remove()
        """
        return _STAGES["apply"](self, model)

    def grad_scaler(self, device: str | None = None) -> torch.amp.GradScaler | None:
        """A ``torch.amp.GradScaler`` with the tuned settings, or None when no layer is FP16.

        A policy with FP16 layers but no tuned settings (written by hand) gets torch's defaults.
        ``device`` defaults to the policy's target, or the CPU where that target has no device here.

        Example:
            >>> Policy(layers={"0": LayerEntry("bf16")}).grad_scaler() is None
            True
        """
        if "fp16" not in self.assignment.values():
            return None
        if device is None:  # a CUDA policy tried out on a host without CUDA runs on the CPU
            device = "cuda" if self.target == "cuda" and torch.cuda.is_available() else "cpu"
        s = self.scaler or ScalerSettings()  # a hand-written FP16 policy still needs loss scaling
        return torch.amp.GradScaler(device, init_scale=s.init_scale, growth_factor=s.growth_factor,
                                    backoff_factor=s.backoff_factor, growth_interval=s.growth_interval)

    def report(self, format: str = "md") -> str:
        """The report: excluded layers and why, formats, scaler, 16-bit FLOPs, verification.

        Example:
            >>> print(Policy(layers={"0": LayerEntry("bf16", flops=8)}).report().splitlines()[0])
            # autoprec policy report
        """
        return _STAGES["report"](self, format)


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


#: The later stages behind Policy's convenience methods. Policy is data: it imports none of them;
#: each registers itself when imported (``autoprec/__init__`` imports them all).
_STAGES: dict[str, Callable[..., Any]] = {}


def register_stage(name: str, fn: Callable[..., Any]) -> None:
    """Register the function behind ``Policy.<name>`` (``"apply"``, ``"autocast"``, ``"report"``)."""
    _STAGES[name] = fn


def _some(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _layer_names(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"policy field {what} must be a list of layer names, got {value!r}")
    return tuple(value)


def _mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise PolicyError(f"policy field {key!r} must be an object, got {type(value).__name__}")
    return value


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
