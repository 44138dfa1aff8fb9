"""Stage 1, trace: the model as a list of layers with their op kinds, shapes, FLOPs and hazards.

Two views are combined. ``torch.export.export(strict=False)`` gives the FX graph of ATen ops, each
with ``nn_module_stack`` (its module) and ``torch_fn`` (the torch call it came from): that names the
functional ops in each module's own code and the hazardous ops inside each leaf. One eager forward
under :class:`torch.utils.flop_counter.FlopCounterMode`, through the same region hooks that apply a
policy, gives the keys exactly as they occur at run time, with FLOPs and activation sizes.
Where FX cannot capture a module's own code (data-dependent control flow, ``.item()``), that code
is *opaque*: a leaf becomes one layer run as a whole, a parent's functional ops are not split into
layers of their own (they run in the precision that flows in, FP32 between layers), and the trace
says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from .batch import call_model
from .modules import canonical_modules, class_name, inside, leaves, unit_modules
from .ops import hazard_of, op_name
from .runtime import Runtime

__all__ = ["Layer", "Trace", "trace", "module_signatures", "signatures_of", "fingerprint"]

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
    runtime = Runtime(model, {}, units=units, opaque=opaque, device_type=device_type, watcher=recorder,
                      modules=modules).install()
    try:
        # grad on (nothing is run backward): layers entered with it off are inside a custom Function
        with counter, torch.enable_grad():
            call_model(model, batch)
    finally:
        runtime.remove()
    return recorder


class _TensorsOut(nn.Module):
    """Returns only the tensors of a module's output: export needs no cache objects it cannot flatten."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        return [t for t in pytree.tree_leaves(self.inner(*args, **kwargs)) if isinstance(t, torch.Tensor)]


def _export(mod: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    """Export ``mod`` and return its call nodes, with ``nn_module_stack`` paths relative to ``mod``."""
    quiet = [logging.getLogger(n) for n in ("torch", "torch.fx", "torch._dynamo", "torch.export")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    chatter = io.StringIO()  # export prints partial graphs to stderr when it fails: keep them for DEBUG
    try:
        with contextlib.redirect_stderr(chatter):
            ep = torch.export.export(_TensorsOut(mod), args, kwargs, strict=False)
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)
        if chatter.getvalue():
            log.debug("torch.export output:\n%s", chatter.getvalue())
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    for n in nodes:
        stack = n.meta.get("nn_module_stack") or {}
        n.meta["nn_module_stack"] = {k: (_strip_inner(path), cls) for k, (path, cls) in stack.items()}
    return nodes


def _strip_inner(path: str) -> str:
    return "" if path in ("", "inner") else path[len("inner."):] if path.startswith("inner.") else path


def _export_nodes(model: nn.Module, batch: Any) -> list[Any]:
    args, kwargs = ((), dict(batch)) if isinstance(batch, dict) else (
        (tuple(batch), {}) if isinstance(batch, (tuple, list)) else ((batch,), {}))
    return _export(model, args, kwargs)


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _capture_inputs(model: nn.Module, batch: Any) -> dict[str, tuple[tuple, dict]]:
    seen: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for path, mod in model.named_modules():
        def hook(m, args, kwargs, path=path):
            seen.setdefault(path, (args, kwargs))
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def _export_per_module(model: nn.Module, batch: Any, first_error: str) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """Export module by module; returns (nodes with their module prefix, opaque modules)."""
    inputs = _capture_inputs(model, batch)
    modules = dict(model.named_modules())
    nodes: list[tuple[str, Any]] = []
    opaque: dict[str, str] = {}

    def capture(path: str, error: str | None) -> bool:
        mod = modules[path]
        if error is None and path not in inputs:  # a container (ModuleList) or unused: try its children
            return all([capture(f"{path}.{n}" if path else n, None) for n, _ in mod.named_children()])
        if error is None:
            args, kwargs = inputs[path]
            try:
                found = _export(mod, tuple(args), dict(kwargs))
            except Exception as exc:  # noqa: BLE001 - any capture failure makes the part opaque
                error = _why(exc)
            else:
                nodes.extend((path, n) for n in found)
                return True
        children = [f"{path}.{n}" if path else n for n, _ in mod.named_children()]
        if all([capture(c, None) for c in children]):
            # every child captured: the failure lies in this module's own code, which stays opaque
            opaque[path] = error
        return False

    capture("", first_error)
    return nodes, opaque


def _fx_ops(nodes: list[tuple[str, Any]], units: dict[str, nn.Module]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The torch-level ops FX saw, and the floating elements they write, per unit / own-code module."""
    per: dict[str, list[str]] = {}
    numel: dict[str, int] = {}
    unit_paths = sorted(units, key=len, reverse=True)
    for prefix, node in nodes:
        stack = node.meta.get("nn_module_stack") or {}
        inner = list(stack.values())[-1][0] if stack else ""
        path = ".".join(p for p in (prefix, inner) if p)
        owner = next((u for u in unit_paths if path == u or inside(path, u)), path)
        fn = node.meta.get("torch_fn")
        name = fn[1].split(".")[-1] if fn else str(node.target).split(".")[1]
        per.setdefault(owner, []).append(name)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            try:
                numel[owner] = numel.get(owner, 0) + int(val.numel())
            except (TypeError, RuntimeError):  # a symbolic size: leave it out
                pass
    return per, numel


def module_signatures(model: nn.Module) -> dict[str, str]:
    """``{path: "Class[param shapes]"}`` for every leaf module: what a policy checks a model against.

    Example:
        >>> module_signatures(torch.nn.Sequential(torch.nn.Linear(2, 3)))
        {'0': 'Linear[weight(3, 2),bias(3,)]'}
    """
    return signatures_of(unit_modules(model))


def signatures_of(units: Mapping[str, nn.Module]) -> dict[str, str]:
    """:func:`module_signatures` of leaves the caller has already (:func:`autoprec.modules.leaves`).

    Example:
        >>> signatures_of({"fc": torch.nn.Linear(2, 3, bias=False)})
        {'fc': 'Linear[weight(3, 2)]'}
    """
    return {path: f"{class_name(mod)}[" + ",".join(f"{n}{tuple(p.shape)}" for n, p in mod.named_parameters())
            + "]" for path, mod in units.items()}


def trace(model: nn.Module, batch: Any, *, device_type: str) -> Trace:
    """Trace ``model`` on ``batch`` into layers (the model is run, never changed).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        >>> [l.key for l in trace(m, torch.ones(2, 8), device_type="cpu").layers]
        ['0', '1']
    """
    opaque: dict[str, str] = {}
    try:
        nodes = [("", n) for n in _export_nodes(model, batch)]
        route = "torch.export"
    except Exception as exc:  # noqa: BLE001
        first = _why(exc)
        log.info("whole-model torch.export failed (%s); capturing module by module", first)
        nodes, opaque = _export_per_module(model, batch, first)
        route = "torch.export per module"
    modules = canonical_modules(model)
    units = leaves(modules)
    fx, fx_numel = _fx_ops(nodes, units)
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
        if op == "scaled_dot_product_attention" and row["flops"] == 0:
            row["flops"] = _sdpa_flops(row["in_shapes"]) * row["calls"]  # CPU kernels are not in the registry
        layers.append(Layer(key=key, kind=row["kind"], op=op, hazards=hazards, ops=ops,
                            in_shapes=row["in_shapes"], out_shapes=row["out_shapes"], flops=int(row["flops"]),
                            in_numel=row["in"], out_numel=row["out"],
                            work_numel=fx_numel.get(key, row["out"]) if row["kind"] == "module" else row["out"],
                            param_numel=param_numel, calls=row["calls"], opaque=key in opaque))
    tied = _tied_groups(model, units, {lay.key for lay in layers})
    signatures = signatures_of(units)
    digest = fingerprint(signatures, [lay.key for lay in layers])
    log.info("traced %d layers (%d opaque) via %s", len(layers), len(opaque), route)
    return Trace(layers=tuple(layers), units=tuple(units), opaque=opaque, tied=tied, fx_route=route,
                 fx_nodes=len(nodes), fingerprint=digest, signatures=signatures, handoff=recorder.handoff())


def fingerprint(signatures: dict[str, str], keys: list[str]) -> str:
    """A short hash of a model's leaf modules and layer keys.

    Example:
        >>> len(fingerprint({"0": "Linear[]"}, ["0"]))
        16
    """
    text = "\n".join(f"{k}={v}" for k, v in sorted(signatures.items())) + "\n" + "\n".join(keys)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sdpa_flops(shapes: tuple[tuple[int, ...], ...]) -> int:
    if len(shapes) < 3 or len(shapes[0]) < 2:
        return 0
    q, k, v = shapes[:3]
    batch = 1
    for d in q[:-2]:
        batch *= d
    return 2 * batch * q[-2] * k[-2] * (q[-1] + v[-1])


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
