"""Finding the module a policy was tuned on inside a framework's wrapper module."""

from __future__ import annotations

from torch import nn

from ..errors import PolicyError
from ..policy._policy import Policy

__all__ = ["fitting_module"]


def fitting_module(policy: Policy, module: nn.Module) -> nn.Module:
    """``module`` itself, or the first submodule that fits ``policy`` (a LightningModule's ``self.model``).

    Example:
        >>> import torch
        >>> from autoprec.core import module_signatures
        >>> inner = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> outer = torch.nn.Module(); outer.model = inner
        >>> p = Policy(layers={}, modules=module_signatures(inner))
        >>> fitting_module(p, outer) is inner
        True
    """
    first_error = None
    for _, candidate in module.named_modules():
        try:
            policy.check(candidate)
        except PolicyError as exc:
            first_error = first_error or exc
            continue
        return candidate
    raise PolicyError(f"no part of {type(module).__name__} fits this policy; for the module itself: {first_error}")
