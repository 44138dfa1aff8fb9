"""The trace at the batch size of the real training step: what the cost model prices when the tuning batch is small.

Users tune on a small batch and train on a large one; on a GPU the small batch's matmuls are launch-bound, where
16-bit buys nothing, and the large one's are compute-bound, where it buys most. :func:`rescaled` gives the trace
with every tensor that carries the batch grown to the training step's rows, and each layer's FLOPs and element
counts grown with it; parameters, per-call counts and everything without the batch dimension stay. The probe
and the search still measure errors on the batch they were given; only the price of each format changes.

Which sizes carry the batch: those that differ in a second trace of the model on fewer rows (``smaller``,
:func:`fewer_rows`): the batch's own rows, rows flattened with the sequence (``B * T`` tokens) and the tokens a
router sends each expert alike. Without that trace, or for a layer it does not have (an expert the smaller batch
routed nothing to), a size carries the batch where it is the leading size and equals the tuning batch's rows.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ._trace import Layer, Trace

__all__ = ["fewer_rows", "rescaled"]

Shapes = tuple[tuple[int, ...], ...]


def fewer_rows(batch: Any, rows: int) -> Any:
    """``batch`` cut to its first ``rows`` rows (every tensor with a leading size), for :func:`rescaled`'s
    smaller trace.

    Example:
        >>> fewer_rows({"x": torch.ones(4, 3), "n": 2}, 2)["x"].shape
        torch.Size([2, 3])
    """
    return pytree.tree_map(lambda t: t[:rows] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)


def _grow(shapes: Shapes, rows: int, to: int, smaller: Shapes | None) -> Shapes:
    if smaller is None or len(smaller) != len(shapes) or any(len(a) != len(b) for a, b in zip(shapes, smaller)):
        return tuple((to, *s[1:]) if s and s[0] == rows else s for s in shapes)
    return tuple(tuple(round(d * to / rows) if d != e else d for d, e in zip(s, t)) for s, t in zip(shapes, smaller))


def _numel(shapes: tuple[tuple[int, ...], ...]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def _layer(layer: Layer, rows: int, to: int, smaller: Layer | None) -> Layer:
    ins = _grow(layer.in_shapes, rows, to, None if smaller is None else smaller.in_shapes)
    outs = _grow(layer.out_shapes, rows, to, None if smaller is None else smaller.out_shapes)
    if ins == layer.in_shapes and outs == layer.out_shapes:
        return layer  # nothing it takes or gives carries the batch: a weight-only op, a fixed table

    def times(new: tuple[tuple[int, ...], ...], old: tuple[tuple[int, ...], ...], count: int) -> int:
        before = _numel(old)
        return round(count * _numel(new) / before) if before else count
    factor = to / rows
    return replace(layer, in_shapes=ins, out_shapes=outs, flops=round(layer.flops * factor),
                   in_numel=times(ins, layer.in_shapes, layer.in_numel),
                   out_numel=times(outs, layer.out_shapes, layer.out_numel),
                   work_numel=times(outs, layer.out_shapes, layer.work_numel))


def rescaled(trace: Trace, rows: int, to: int, smaller: Trace | None = None) -> Trace:
    """``trace`` as it would be with ``to`` rows in the batch instead of ``rows``: layers whose inputs or outputs
    carry the batch scale those sizes, their FLOPs and element counts by ``to / rows``; the rest stay. ``smaller``:
    the same model traced on fewer rows, which tells the sizes that carry the batch (the module's docstring).

    Example:
        >>> from autoprec.trace import trace
        >>> t = trace(torch.nn.Sequential(torch.nn.Linear(16, 32)), torch.ones(4, 16), device_type="cpu")
        >>> big = rescaled(t, 4, 4096).layers[0]
        >>> big.in_shapes, big.flops == 1024 * t.layers[0].flops
        (((4096, 16),), True)
    """
    if rows <= 0 or to <= 0:
        raise ValueError(f"rescaled(rows={rows}, to={to}): both are batch sizes, at least 1")
    if to == rows:
        return trace
    factor = to / rows
    small = {lay.key: lay for lay in smaller.layers} if smaller is not None else {}
    return replace(trace, layers=tuple(_layer(lay, rows, to, small.get(lay.key)) for lay in trace.layers),
                   unseen={k: round(v * factor) for k, v in trace.unseen.items()})
