"""Capturing a model's graph for the trace: ``torch.export`` of the whole model, else module by module.

``torch.export.export(strict=False)`` gives the FX graph of ATen ops, each with ``nn_module_stack``
(its module) and ``torch_fn`` (the torch call it came from). Where the whole model cannot be
exported (data-dependent control flow, ``.item()``), each module is exported alone on the inputs it
was called with (arguments export cannot take, such as a ``DynamicCache``, bound as constants), and
only the modules whose *own* code fails stay opaque.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..core._batch import call_model
from ..core._modules import inside

__all__ = ["capture", "fx_ops"]

log = logging.getLogger("autoprec.trace")


def capture(model: nn.Module, batch: Any) -> tuple[list[tuple[str, Any]], dict[str, str], str]:
    """``(nodes with their module prefix, opaque modules -> why, route)`` of ``model`` on ``batch``.

    Example:
        >>> nodes, opaque, route = capture(torch.nn.Linear(2, 2), torch.ones(1, 2))
        >>> route, opaque, [str(n.target) for _, n in nodes]
        ('torch.export', {}, ['aten.linear.default'])
    """
    try:
        return [("", n) for n in _export_nodes(model, batch)], {}, "torch.export"
    except Exception as exc:  # noqa: BLE001
        first = _why(exc)
        log.info("whole-model torch.export failed (%s); capturing module by module", first)
        nodes, opaque = _export_per_module(model, batch, first)
        return nodes, opaque, "torch.export per module"


class _TensorsOut(nn.Module):
    """Returns only the tensors of a module's output: export needs no cache objects it cannot flatten.

    ``fixed`` holds the arguments export cannot take as inputs (a ``DynamicCache``, a config object):
    position or keyword -> value, bound here as constants, so a module called with them still exports.
    """

    def __init__(self, inner: nn.Module, fixed: dict[int | str, Any] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.fixed = fixed or {}

    def forward(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        if self.fixed:
            args = tuple(self.fixed.get(i, a) for i, a in enumerate(args))
            kwargs = {**kwargs, **{k: v for k, v in self.fixed.items() if isinstance(k, str)}}
        return [t for t in pytree.tree_leaves(self.inner(*args, **kwargs)) if isinstance(t, torch.Tensor)]


_BASIC = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
          torch.layout)


def _exportable(value: Any) -> bool:
    """Whether export takes ``value`` as an input: a pytree of tensors and plain values."""
    return all(isinstance(leaf, _BASIC) for leaf in pytree.tree_leaves(value))


def _copied(value: Any) -> Any:
    """A copy of an argument export cannot take (so exporting does not grow the run's own cache); the
    object itself where it cannot be copied."""
    if _exportable(value):
        return value
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - an uncopyable object is bound as it is
        return value


def _export(mod: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    """Export ``mod`` and return its call nodes, with ``nn_module_stack`` paths relative to ``mod``."""
    quiet = [logging.getLogger(n) for n in ("torch", "torch.fx", "torch._dynamo", "torch.export")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    chatter = io.StringIO()  # export prints partial graphs to stderr when it fails: keep them for DEBUG
    fixed: dict[int | str, Any] = {i: _copied(a) for i, a in enumerate(args) if not _exportable(a)}
    fixed.update({k: _copied(v) for k, v in kwargs.items() if not _exportable(v)})
    args = tuple(None if i in fixed else a for i, a in enumerate(args))
    kwargs = {k: v for k, v in kwargs.items() if k not in fixed}
    try:
        with contextlib.redirect_stderr(chatter):
            ep = torch.export.export(_TensorsOut(mod, fixed), args, kwargs, strict=False)
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
            if path not in seen:  # cache objects as they were at this call: the forward goes on to fill them
                seen[path] = (tuple(_copied(a) for a in args), {k: _copied(v) for k, v in kwargs.items()})
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


def fx_ops(nodes: list[tuple[str, Any]], units: dict[str, nn.Module]) -> tuple[dict[str, list[str]], dict[str, int]]:
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
