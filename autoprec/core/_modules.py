"""A model's modules under the names a policy uses, whatever wraps them.

Training stacks wrap models: ``torch.compile`` (``_orig_mod.``), DDP and ``nn.DataParallel``
(``module.``), activation-checkpoint wrappers (``_checkpoint_wrapped_module.``), FSDP1
(``_fsdp_wrapped_module.``). FSDP2's ``fully_shard`` keeps the names but swaps each module's class
for a subclass (``FSDPLinear``), and autoprec's own runtime does the same. A policy's keys are the
*canonical* names: the wrappers' segments left out, and a module's class is the one it was written
as. So a policy tuned on the bare model fits the wrapped one, and the other way round.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from torch import nn

__all__ = ["ATOMIC", "canonical_modules", "class_name", "inside", "leaves", "module_signatures", "signatures_of", "stacked",
           "unit_modules", "unwrap"]

# wrapper class name -> the attribute holding the wrapped module; matched by name so that no
# distributed or compile module is imported here
_WRAPPERS = {
    "OptimizedModule": "_orig_mod",
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "CheckpointWrapper": "_checkpoint_wrapped_module",
    "OffloadWrapper": "_checkpoint_wrapped_module",
    "FullyShardedDataParallel": "_fsdp_wrapped_module",
}


def _inner(module: nn.Module) -> nn.Module | None:
    for cls in type(module).__mro__:
        attr = _WRAPPERS.get(cls.__name__)
        if attr is not None:
            inner = module._modules.get(attr)
            return inner if isinstance(inner, nn.Module) else None
    return None


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside any wrappers at the top (compile, DDP, checkpoint, FSDP1).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> unwrap(nn.DataParallel(lin)) is lin
        True
    """
    inner = _inner(module)
    while inner is not None:
        module, inner = inner, _inner(inner)
    return module


def _walk(module: nn.Module, path: str, seen: set[int], links: dict | None,
          holder: Any = None, name: str = "") -> Iterator[tuple[str, nn.Module]]:
    raw = module
    module = unwrap(module)
    if id(module) in seen:
        return
    seen.add(id(module))
    if links is not None:
        links[path] = (holder, name, raw)
    yield path, module
    for child_name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{path}.{child_name}" if path else child_name, seen, links, module, child_name)


def canonical_modules(model: nn.Module, links: dict[str, tuple[Any, str, nn.Module]] | None = None
                      ) -> dict[str, nn.Module]:
    """``{canonical path: module}`` for every module of ``model``, wrappers left out.

    ``links``, when given, receives ``path -> (holder, name, child)``: ``holder._modules[name] is
    child`` while the model keeps that module in place (``child`` may be a wrapper around it).

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2))
        >>> list(canonical_modules(nn.DataParallel(m)))
        ['', '0']
    """
    return dict(_walk(model, "", set(), links))


#: Modules whose ``forward`` never calls their children as modules (``nn.MultiheadAttention`` hands
#: ``out_proj``'s weight to one functional call, or runs one fused kernel): a layer of their own, run
#: as one piece, like a leaf. Matched by class name along the MRO, so no subclass escapes. Modules with
#: stacked weights of their own (:func:`stacked`) and no parameters below them are atomic too: MoE experts.
ATOMIC = frozenset({"MultiheadAttention"})


def _atomic(module: nn.Module) -> bool:
    if any(cls.__name__ in ATOMIC for cls in type(module).__mro__):
        return True
    # stacked experts whose children hold no parameters (an activation): their forward runs the experts
    # (one grouped matmul, batched matmuls, or a loop over slices) as one piece, a layer of its own
    return stacked(module) and not any(True for c in module.children() for _ in c.parameters())


def stacked(module: nn.Module) -> bool:
    """Whether ``module`` holds stacked weights of its own: a floating parameter of 3 dimensions or more
    in a module that is no convolution (grouped experts: ``(experts, in, out)``).

    Example:
        >>> stacked(nn.Linear(2, 2)), stacked(nn.Conv2d(1, 1, 3)), stacked(nn.Bilinear(2, 2, 2))
        (False, False, True)
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    return any(p.dim() >= 3 for p in module._parameters.values() if p is not None and p.is_floating_point())


def unit_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that are layers of their own: the leaves (modules without children) and the
    :data:`ATOMIC` ones (their children left out), by canonical path.

    Example:
        >>> sorted(unit_modules(nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
        ['0', '1']
    """
    return leaves(canonical_modules(model))


def leaves(modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The leaves of a ``{canonical path: module}`` map (see :func:`unit_modules`), without walking again.

    Example:
        >>> list(leaves(canonical_modules(nn.Sequential(nn.Linear(2, 2)))))
        ['0']
        >>> list(leaves(canonical_modules(nn.Sequential(nn.MultiheadAttention(4, 2)))))
        ['0']
    """
    atomic = [path for path, mod in modules.items() if _atomic(mod)]
    return {path: mod for path, mod in modules.items()
            if (path in atomic or not any(c is not None for c in mod._modules.values()))
            and not any(inside(path, a) for a in atomic)}


def class_name(module: nn.Module) -> str:
    """The name of the class ``module`` was written as: FSDP2's and autoprec's swapped classes left out.

    Example:
        >>> class_name(nn.Linear(2, 2))
        'Linear'
    """
    for cls in type(module).__mro__:
        if cls.__dict__.get("_autoprec_base") is None and not any(
                b.__name__ == "FSDPModule" for b in cls.__bases__) and cls.__name__ != "FSDPModule":
            return cls.__name__
    return type(module).__name__


def inside(path: str, outer: str) -> bool:
    """Whether module ``path`` lies strictly inside module ``outer`` (``""`` is the root).

    Example:
        >>> inside("a.b", "a"), inside("a", "a"), inside("a", "")
        (True, False, True)
    """
    return (outer == "" and path != "") or path.startswith(outer + ".")


def module_signatures(model: nn.Module) -> dict[str, str]:
    """``{path: "Class[param shapes]"}`` for every leaf module: what a policy checks a model against.

    Example:
        >>> module_signatures(nn.Sequential(nn.Linear(2, 3)))
        {'0': 'Linear[weight(3, 2),bias(3,)]'}
    """
    return signatures_of(unit_modules(model))


def signatures_of(units: Mapping[str, nn.Module]) -> dict[str, str]:
    """:func:`module_signatures` of leaves the caller has already (:func:`leaves`).

    Example:
        >>> signatures_of({"fc": nn.Linear(2, 3, bias=False)})
        {'fc': 'Linear[weight(3, 2)]'}
    """
    return {path: f"{class_name(mod)}[" + ",".join(f"{n}{tuple(p.shape)}" for n, p in mod.named_parameters())
            + "]" for path, mod in units.items()}
