"""Feeding a batch to a model and turning its output into one scalar loss."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import BatchError

__all__ = ["LossFn", "call_model", "compute_loss", "split_batches", "surrogate_loss", "batch_to", "seed_rng", "leading_rows"]

LossFn = Callable[[Any, Any], torch.Tensor]


def seed_rng(seed: int, device_type: str) -> None:
    """Seed the generators a pass on ``device_type`` draws from (dropout masks), and no other.

    Callers fork those generators first (``torch.random.fork_rng``). For a CPU model the CUDA
    generators are left alone: ``torch.manual_seed`` would queue a CUDA re-seed that replaces the
    caller's own pending one.

    Example:
        >>> seed_rng(0, "cpu"); a = torch.rand(1); seed_rng(0, "cpu"); bool(torch.rand(1) == a)
        True
    """
    if device_type == "cuda":
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on ``batch``: a tensor is one argument, a tuple/list positional, a dict keyword.

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> call_model(m, torch.ones(3, 2)).shape
        torch.Size([3, 1])
    """
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def surrogate_loss(output: Any) -> torch.Tensor:
    """Mean squared distance of every floating output tensor to a fixed random target.

    Used when there is no ``loss_fn`` and the model returns no loss of its own: positive, bounded
    below, and its gradient reaches every output. The targets come from a private generator seeded
    by the tensor's shape, so they are the same on every call and the global RNG is left alone.

    Example:
        >>> float(surrogate_loss(torch.zeros(2, 3))) > 0
        True
    """
    total = None
    for t in pytree.tree_leaves(output):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            # drawn where the output lives (a CUDA output: no host-side draw and copy on every pass)
            gen = torch.Generator(device=t.device).manual_seed(0x5EED + t.numel())
            target = torch.randn(t.shape, generator=gen, device=t.device)
            term = 0.5 * (t.float() - target).square().mean()
            total = term if total is None else total + term
    if total is None:
        raise BatchError("the model's output holds no floating tensor to build a loss from: pass loss_fn=")
    return total


def _own_loss(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    return None


def compute_loss(output: Any, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """The scalar loss of one forward: ``loss_fn``, else the model's own loss, else the surrogate.

    Example:
        >>> float(compute_loss(torch.tensor(2.0), None, None))
        2.0
    """
    if loss_fn is not None:
        loss = loss_fn(output, batch)
    else:
        loss = _own_loss(output)
        if loss is None:
            loss = surrogate_loss(output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise BatchError(f"the loss must be a floating scalar tensor, got {shape}: "
                         "make loss_fn return e.g. loss.mean()")
    return loss.reshape(())


def split_batches(batch: Any, batches: Iterable[Any] | None) -> list[Any]:
    """The list of batches to tune on: ``batch`` first, then ``batches`` (if given).

    Example:
        >>> len(split_batches(torch.ones(1), [torch.ones(1), torch.ones(1)]))
        3
    """
    out = [batch]
    if batches is not None:
        if isinstance(batches, (torch.Tensor, Mapping)):
            raise BatchError("batches= takes an iterable of batches (a list), not a single batch")
        out.extend(list(batches))
    return out


def batch_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor of ``batch`` to ``device``.

    Example:
        >>> batch_to({"x": torch.ones(1)}, torch.device("cpu"))["x"].device.type
        'cpu'
    """
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def leading_rows(batch: Any) -> int | None:
    """The leading size every tensor of ``batch`` with a dimension shares (0-d tensors and other values
    ride along), or None where they differ or there is none.

    Example:
        >>> leading_rows({"x": torch.ones(8, 3), "y": torch.ones(8), "t": torch.tensor(2.0)})
        8
        >>> leading_rows((torch.ones(8, 3), torch.ones(2, 30))) is None
        True
    """
    sizes = {t.shape[0] for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None
