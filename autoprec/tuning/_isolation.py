"""What keeps ``tune`` from touching the caller's world: global state restored, a private model over the caller's weights."""

from __future__ import annotations

import copy
import random
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..core._modules import canonical_modules, unwrap
from ..errors import ModelError

__all__ = ["preserve_global_state", "private_model"]


@contextmanager
def preserve_global_state() -> Iterator[None]:
    """Run tuning with grad on and autocast off; restore every global RNG, grad and autocast state.

    Example:
        >>> with torch.no_grad():
        ...     with preserve_global_state():
        ...         inside = torch.is_grad_enabled()
        ...     inside, torch.is_grad_enabled()
        (True, False)
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py = random.getstate()
    try:
        import numpy as np
        npst = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        np, npst = None, None
    grad = torch.is_grad_enabled()
    cache = torch.is_autocast_cache_enabled()
    autocast = {d: torch.is_autocast_enabled(d) for d in ("cpu", "cuda")}
    try:
        torch.set_grad_enabled(True)  # a caller's no_grad() must not reach the probe's backward passes
        # nor a caller's autocast the FP32 reference: every region sets its own precision. The cache of
        # cast weights goes too: inside a caller's autocast it would outlive our optimizer steps.
        for d in autocast:
            torch.set_autocast_enabled(d, False)
        torch.set_autocast_cache_enabled(False)
        yield
    finally:
        for d, on in autocast.items():
            torch.set_autocast_enabled(d, on)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        if np is not None:
            np.random.set_state(npst)
        torch.set_grad_enabled(grad)
        torch.set_autocast_cache_enabled(cache)


def private_model(model: nn.Module) -> nn.Module:
    """A copy of the model without wrappers (compile, DDP, checkpoint, FSDP1) and without a policy.

    Its parameters and buffers share storage with the caller's (plain ``nn.Parameter`` and tensor
    buffers; other tensor types are copied): the copy has its own module objects, hooks and
    ``.grad``, but no second set of weights. What changes those values (training runs, batch-norm
    statistics) must restore them: see :mod:`autoprec.probe._snapshot`.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> w = private_model(torch.compile(m)).weight
        >>> w is m.weight, w.data_ptr() == m.weight.data_ptr()
        (False, True)
    """
    if any(c.__name__ == "FSDPModule" for m in model.modules() for c in type(m).__mro__):
        raise ModelError("tune cannot copy a model sharded by FSDP2's fully_shard (its parameters are "
                         "DTensors): tune the unsharded model (before fully_shard); the policy fits the sharded "
                         "one, see autoprec.fsdp_plan")
    links: dict[str, tuple[Any, str, nn.Module]] = {}
    inner = unwrap(model)
    memo: dict[int, Any] = {}
    for p in inner.parameters():
        if type(p) is nn.Parameter:
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    for b in inner.buffers():
        if type(b) is torch.Tensor:
            memo[id(b)] = b.detach()
    work = copy.deepcopy(inner, memo)  # an installed policy does not come along (see autoprec.runtime)
    canonical_modules(work, links)
    for holder, name, child in links.values():
        if holder is not None and unwrap(child) is not child:
            holder._modules[name] = unwrap(child)
    return work
