"""Stage 1, trace: the model as a list of layers with their op kinds, shapes, FLOPs and hazards.

Two views are combined. ``torch.export.export(strict=False)`` gives the FX graph of ATen ops, each
with ``nn_module_stack`` (its module) and ``torch_fn`` (the torch call it came from): that names the
functional ops in each module's own code and the hazardous ops inside each leaf. One eager forward
under :class:`torch.utils.flop_counter.FlopCounterMode`, through the same region hooks that apply a
policy, gives the keys exactly as they occur at run time, with FLOPs and activation sizes.
Where FX cannot capture a module's own code (data-dependent control flow, ``.item()``), that code
is *opaque*: a leaf becomes one layer run as a whole, a parent's functional ops are not split into
layers of their own (they run in the precision that flows in, FP32 between layers), and the trace
says why (capturing: :mod:`autoprec.trace._capture`).

The FLOP count is of the whole model, not only of its layers: matmul-class work that runs while no
layer is open (opaque own code, a kernel the op vocabulary does not name) is kept per innermost
module as ``Trace.unseen``, so a policy counts it as FP32 instead of leaving it out. The formulas
torch's registry lacks (recurrent kernels, grouped mm, bilinear, ...) come from :mod:`autoprec.trace._flops`.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from ..core._batch import call_model
from ..core._modules import canonical_modules, class_name, leaves, signatures_of
from ..core._ops import hazard_of, op_name
from ..runtime._runtime import Runtime
from . import _flops as _flops  # noqa: F401 - registers the FLOP formulas torch lacks
from ._capture import capture, fx_ops

__all__ = ["Layer", "Trace", "trace", "fingerprint"]

log = logging.getLogger("autoprec.trace")


@dataclass(frozen=True)
class Layer:
    """One layer: a unit module (``kind="module"``) or a functional op (``kind="op"``)."""

    key: str
    kind: str
    op: str                      # module class name, or the op's name
    hazards: tuple[str, ...]     # hazard classes of the ops it runs
    ops: tuple[str, ...]         # the ops it runs (torch-level names, FX view where available)
    in_shapes: tuple[tuple[int, ...], ...]
    out_shapes: tuple[tuple[int, ...], ...]
    flops: int                   # forward matmul/conv/attention FLOPs per step, all calls (FlopCounterMode)
    in_numel: int                # floating input elements per step
    out_numel: int               # floating output elements per step
    work_numel: int              # floating elements its ops write per step (FX graph; else out_numel)
    param_numel: int
    calls: int
    opaque: bool = False


@dataclass(frozen=True)
class Trace:
    """The traced model: its layers in execution order, and what FX could not see."""

    layers: tuple[Layer, ...]
    units: tuple[str, ...]
    opaque: dict[str, str]                # module path -> why FX could not capture its own code
    tied: tuple[tuple[str, ...], ...]     # groups of layers sharing a parameter
    fx_route: str                         # "torch.export" | "torch.export per module"
    fx_nodes: int
    fingerprint: str
    signatures: dict[str, str] = field(default_factory=dict)   # leaf module path -> class and shapes
    handoff: dict[str, tuple[str, ...]] = field(default_factory=dict)  # layer -> the layers, all, its output feeds
    unseen: dict[str, int] = field(default_factory=dict)  # module path -> forward matmul-class FLOPs no layer runs

    @property
    def flops_total(self) -> int:
        """Forward matmul-class FLOPs of one step as measured at run time: the layers' and the unseen."""
        return sum(lay.flops for lay in self.layers) + sum(self.unseen.values())

    def layer(self, key: str) -> Layer:
        """The layer with this key."""
        for lay in self.layers:
            if lay.key == key:
                return lay
        raise KeyError(key)


def _shapes(tree: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in pytree.tree_leaves(tree)
                 if isinstance(t, torch.Tensor) and t.is_floating_point())


def _numel(tree: Any) -> int:
    return sum(t.numel() for t in pytree.tree_leaves(tree)
               if isinstance(t, torch.Tensor) and t.is_floating_point())


#: Calls that only look at a tensor, or return a view of it: they pass a layer's output on unchanged.
_META = frozenset({"size", "dim", "numel", "nelement", "stride", "storage_offset", "is_floating_point",
                   "is_complex", "is_contiguous", "element_size", "data_ptr", "get_device", "__len__", "shape",
                   "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_cpu", "layout", "is_leaf",
                   "grad_fn", "is_sparse", "is_quantized", "is_meta", "is_nested", "names", "register_hook",
                   "retain_grad"})
_VIEWS = frozenset({"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "contiguous", "unsqueeze",
                    "squeeze", "flatten", "unflatten", "expand", "expand_as", "split", "split_with_sizes", "chunk",
                    "unbind", "narrow", "select", "__getitem__", "t", "movedim", "moveaxis", "swapaxes",
                    "swapdims", "T", "mT", "detach"})
#: Elementwise and joining ops that run correctly on a 16-bit input (no hazard: hazardous ops are
#: layers of their own): a layer's output may flow through them, and they follow its format, as
#: under autocast. With an FP32 operand (a residual stream) they promote to FP32 themselves, so the
#: values are those of an FP32 hand-back. In-place forms are not here: they would keep a 16-bit
#: tensor 16-bit where it was FP32.
_FOLLOW = frozenset({"add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "rsub", "neg",
                     "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
                     "__rtruediv__", "__neg__", "__pos__", "relu", "gelu", "silu", "tanh", "sigmoid", "hardtanh",
                     "leaky_relu", "elu", "mish", "dropout", "where", "masked_fill", "clamp", "clip", "cat",
                     "concat", "concatenate", "stack", "pad", "float", "to", "type_as", "clone"})


def _call_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__"):  # a Tensor property: torch.Tensor.shape.__get__ -> "shape"
        parts = (torch.overrides.resolve_name(func) or "").split(".")
        return parts[-2] if len(parts) >= 2 else name
    return name


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _all_tensors(obj: Any, depth: int = 6) -> list[torch.Tensor]:
    """Every tensor in ``obj``: pytree containers, and the attributes of other objects (a KV cache)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(x: Any, d: int) -> None:
        if id(x) in seen or d < 0:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, d - 1)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                walk(v, d - 1)
        elif hasattr(x, "__dict__") and not isinstance(x, (type, nn.Module)):
            for v in vars(x).values():
                walk(v, d - 1)

    walk(obj, depth)
    return found


class _Recorder:
    """Watcher that attributes FLOPs and sizes to each layer during one eager forward, and follows
    where each layer's output goes: into other layers only (through views and elementwise code that
    follows its format), or anywhere else."""

    def __init__(self, counter: FlopCounterMode) -> None:
        self.counter = counter
        self.order: list[str] = []
        self.rows: dict[str, dict[str, Any]] = {}
        self._open: list[tuple[str, int, int]] = []
        self._src: dict[int, frozenset[str]] = {}   # id(tensor) -> the layers it is an output (view) of
        self._alive: list[torch.Tensor] = []        # keeps those ids unique during the pass
        self.feeds: dict[str, set[str]] = {}
        self.escapes: set[str] = set()
        self.unseen: dict[str, int] = {}            # module path -> FLOPs run while no layer was open
        self._modules: list[str] = []               # the module stack (forward hooks)
        self._counted = 0

    def settle(self) -> None:
        """FLOPs counted since the last event belong to the open layer, else to the innermost module."""
        total = self.counter.get_total_flops()
        if total != self._counted and not self._open:
            where = self._modules[-1] if self._modules else ""
            self.unseen[where] = self.unseen.get(where, 0) + total - self._counted
        self._counted = total

    def push(self, path: str) -> None:
        self.settle()
        self._modules.append(path)

    def pop(self) -> None:
        self.settle()
        self._modules.pop()

    def _sources(self, tree: Any) -> frozenset[str]:
        found: frozenset[str] = frozenset()
        for t in _tensors(tree):
            found |= self._src.get(id(t), frozenset())
        return found

    def _mark(self, tree: Any, sources: frozenset[str]) -> None:
        for t in _tensors(tree):
            if t.is_floating_point():
                self._src[id(t)] = self._src.get(id(t), frozenset()) | sources
                self._alive.append(t)

    def call(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        sources = self._sources((args, kwargs))
        if not sources:
            return
        name = _call_name(func)
        if name in _VIEWS or name in _FOLLOW:
            self._mark(out, sources)
        elif name not in _META:
            self.escapes |= sources

    def finish(self, output: Any) -> None:
        self.escapes |= self._sources(_all_tensors(output))

    def handoff(self) -> dict[str, tuple[str, ...]]:
        """Layers whose output flows only into other layers (through views and elementwise code), and those layers."""
        return {k: tuple(sorted(v)) for k, v in self.feeds.items() if v and k not in self.escapes}

    def enter(self, key: str, kind: str, inputs: tuple) -> None:
        self.settle()
        row = self.rows.get(key)
        if row is None:
            self.order.append(key)
            row = self.rows[key] = {"kind": kind, "calls": 0, "flops": 0, "in": 0, "out": 0,
                                    "in_shapes": _shapes(inputs), "out_shapes": ()}
        row["calls"] += 1
        row["in"] += _numel(inputs)
        sources = self._sources(inputs)
        if not torch.is_grad_enabled():
            # inside a custom autograd.Function's forward (the pass runs with grad on): its backward
            # expects the dtypes its forward saw, so nothing is handed in or out uncast here
            self.escapes |= sources | {key}
        for src in sources:
            self.feeds.setdefault(src, set()).add(key)
        self._open.append((key, self.counter.get_total_flops()))

    def exit(self, key: str, kind: str, raw: Any, final: Any) -> None:
        self.settle()
        _, f0 = self._open.pop()
        row = self.rows[key]
        row["flops"] += self.counter.get_total_flops() - f0
        row["out"] += _numel(final)
        row["out_shapes"] = _shapes(final)
        self._mark(final, frozenset((key,)))


def _record(model: nn.Module, batch: Any, units: dict[str, nn.Module], opaque: set[str],
            device_type: str, modules: dict[str, nn.Module]) -> _Recorder:
    # FlopCounterMode counts the matmul/conv/attention family only, which is what 16-bit speeds up
    counter = FlopCounterMode(display=False)
    recorder = _Recorder(counter)
    hooks = []
    for path, mod in modules.items():  # where FLOPs outside every layer run
        hooks.append(mod.register_forward_pre_hook(lambda m, a, path=path: recorder.push(path)))
        hooks.append(mod.register_forward_hook(lambda m, a, o: recorder.pop(), always_call=True))
    runtime = Runtime(model, {}, units=units, opaque=opaque, device_type=device_type, watcher=recorder,
                      modules=modules).install()
    try:
        # grad on (nothing is run backward): layers entered with it off are inside a custom Function
        with counter, torch.enable_grad():
            call_model(model, batch)
            recorder.settle()
    finally:
        runtime.remove()
        for h in hooks:
            h.remove()
    return recorder


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """The model's buffers (BatchNorm's running statistics) and the global RNG as they were before: the trace
    runs the model's forward for real, which would update the one and draw from the other (train-mode
    dropout)."""
    saved = [(mod, name, buf, buf.detach().clone()) for mod in model.modules()
             for name, buf in mod._buffers.items() if buf is not None]
    devices = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for mod, name, buf, copy in saved:
                    mod._buffers[name] = buf  # a forward that rebinds a buffer gets its own tensor back
                    buf.copy_(copy)


def trace(model: nn.Module, batch: Any, *, device_type: str) -> Trace:
    """Trace ``model`` on ``batch`` into layers (the model is run, never changed: its buffers and the global
    RNG are as they were).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        >>> [l.key for l in trace(m, torch.ones(2, 8), device_type="cpu").layers]
        ['0', '1']
    """
    with _untouched(model):
        nodes, opaque, route = capture(model, batch)
        modules = canonical_modules(model)
        units = leaves(modules)
        fx, fx_numel = fx_ops(nodes, units)
        recorder = _record(model, batch, units, set(opaque), device_type, modules)

    layers = []
    for key in recorder.order:
        row = recorder.rows[key]
        if row["kind"] == "op" and not row["in_shapes"] and not row["out_shapes"]:
            continue  # an op on integers only (bincount of indices): no precision to decide
        if row["kind"] == "module":
            mod = modules[key]
            seen = fx.get(key, [])
            ops = tuple(dict.fromkeys(seen)) if seen else (class_name(mod),)
            names = {n[0] for n in (op_name(o) for o in seen) if n}
            op = class_name(mod)
            param_numel = sum(p.numel() for p in mod.parameters())
        else:
            mod = None
            op = key.split("::", 1)[1].rsplit("_", 1)[0] if _has_ordinal(key) else key.split("::", 1)[1]
            ops = (op,)
            names = {op}
            param_numel = 0
        hazards = tuple(sorted({h for h in (hazard_of(n) for n in names) if h}))
        layers.append(Layer(key=key, kind=row["kind"], op=op, hazards=hazards, ops=ops,
                            in_shapes=row["in_shapes"], out_shapes=row["out_shapes"], flops=int(row["flops"]),
                            in_numel=row["in"], out_numel=row["out"],
                            work_numel=fx_numel.get(key, row["out"]) if row["kind"] == "module" else row["out"],
                            param_numel=param_numel, calls=row["calls"], opaque=key in opaque))
    tied = _tied_groups(model, units, {lay.key for lay in layers})
    signatures = signatures_of(units)
    digest = fingerprint(signatures, [lay.key for lay in layers])
    unseen = {path: flops for path, flops in recorder.unseen.items() if flops}
    if unseen:
        log.info("%d of %d matmul-class FLOPs run outside every layer: %s", sum(unseen.values()),
                 recorder.counter.get_total_flops(), unseen)
    log.info("traced %d layers (%d opaque) via %s", len(layers), len(opaque), route)
    return Trace(layers=tuple(layers), units=tuple(units), opaque=opaque, tied=tied, fx_route=route,
                 fx_nodes=len(nodes), fingerprint=digest, signatures=signatures, handoff=recorder.handoff(),
                 unseen=unseen)


def fingerprint(signatures: dict[str, str], keys: list[str]) -> str:
    """A short hash of a model's leaf modules and layer keys.

    Example:
        >>> len(fingerprint({"0": "Linear[]"}, ["0"]))
        16
    """
    text = "\n".join(f"{k}={v}" for k, v in sorted(signatures.items())) + "\n" + "\n".join(keys)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _has_ordinal(key: str) -> bool:
    tail = key.split("::", 1)[1]
    head, _, num = tail.rpartition("_")
    return bool(head) and num.isdigit()


def _tied_groups(model: nn.Module, units: dict[str, nn.Module], used: set[str]) -> tuple[tuple[str, ...], ...]:
    owners: dict[int, list[str]] = {}
    for path, mod in units.items():
        if path not in used:
            continue
        for p in mod.parameters():
            owners.setdefault(id(p), [])
            if path not in owners[id(p)]:
                owners[id(p)].append(path)
    groups = {tuple(sorted(v)) for v in owners.values() if len(v) > 1}
    return tuple(sorted(groups))
