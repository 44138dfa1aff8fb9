"""The trace at the batch size of the real training step: what the cost model prices when the tuning batch is small.

Users tune on a small batch and train on a large one; on a GPU the small batch's matmuls are launch-bound, where
16-bit buys nothing, and the large one's are compute-bound, where it buys most. :func:`rescaled` gives the trace
with every tensor that carries the batch (its leading size is the tuning batch's rows) grown to the training
step's rows, and each layer's FLOPs and element counts grown with it; parameters, per-call counts and everything
without the batch dimension stay. The probe and the search still measure errors on the batch they were given;
only the price of each format changes.
"""

from __future__ import annotations

from dataclasses import replace

from ._trace import Layer, Trace

__all__ = ["rescaled"]


def _grow(shapes: tuple[tuple[int, ...], ...], rows: int, to: int) -> tuple[tuple[int, ...], ...]:
    return tuple((to, *s[1:]) if s and s[0] == rows else s for s in shapes)


def _numel(shapes: tuple[tuple[int, ...], ...]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def _layer(layer: Layer, rows: int, to: int) -> Layer:
    ins, outs = _grow(layer.in_shapes, rows, to), _grow(layer.out_shapes, rows, to)
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


def rescaled(trace: Trace, rows: int, to: int) -> Trace:
    """``trace`` as it would be with ``to`` rows in the batch instead of ``rows``: layers whose inputs or outputs
    lead with ``rows`` scale their shapes, FLOPs and element counts by ``to / rows``; the rest stay.

    Example:
        >>> import torch
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
    return replace(trace, layers=tuple(_layer(lay, rows, to) for lay in trace.layers),
                   unseen={k: round(v * factor) for k, v in trace.unseen.items()})
