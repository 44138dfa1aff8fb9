"""A policy in sharded training: which modules FSDP2 must wrap on their own.

FSDP2's ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` casts every parameter of a
``fully_shard`` unit to BF16 when it gathers them, so an FP32 layer of the policy would get 16-bit
weights (the runtime refuses that with a :class:`~autoprec.PolicyError` rather than compute in the
wrong precision). The FP32 layers that own parameters therefore get a ``fully_shard`` unit of their
own with an FP32 ``param_dtype``, made *before* the units around them::

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for module in autoprec.fsdp_plan(policy, model).values():
        fully_shard(module, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    for block in model.blocks:
        fully_shard(block, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    policy.apply(model)

Without a 16-bit ``param_dtype`` (FSDP2's default keeps the parameters' own dtype) no plan is needed:
the policy's regions cast as they do on an unsharded model.
"""

from __future__ import annotations

from torch import nn

from ..core._modules import unit_modules
from ..policy._policy import Policy

__all__ = ["fsdp_plan"]


def fsdp_plan(policy: Policy, model: nn.Module) -> dict[str, nn.Module]:
    """``{layer: module}`` for the FP32 layers of ``policy`` that own parameters: each needs its own
    ``fully_shard`` unit with ``MixedPrecisionPolicy(param_dtype=torch.float32)`` when the units
    around it gather parameters in 16 bits. In the model's order.

    Example:
        >>> import torch, autoprec
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.ReLU())
        >>> p = autoprec.Policy(layers={"0": autoprec.LayerEntry("bf16"), "1": autoprec.LayerEntry("fp32"),
        ...                             "2": autoprec.LayerEntry("fp32")})
        >>> list(autoprec.fsdp_plan(p, m))
        ['1']
    """
    policy.check(model)
    assignment = policy.assignment
    return {path: mod for path, mod in unit_modules(model).items()
            if assignment.get(path) == "fp32" and any(True for _ in mod.parameters(recurse=False))}
