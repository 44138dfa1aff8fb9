"""The trace at the training step's batch size (issue 21): what grows with the batch, and what does not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprec.trace import trace
from autoprec.trace._rescale import rescaled
from tests.models import transformer_block


class _WithTable(nn.Module):
    """A Linear on the batch, and a matmul of two parameters that no batch size changes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.a = nn.Parameter(torch.randn(8, 24))
        self.b = nn.Parameter(torch.randn(24, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + (self.a @ self.b).sum()


def test_batch_carrying_layers_grow_by_the_ratio_and_the_rest_stay():
    """Every layer of a transformer block takes the batch: its shapes lead with the new rows, its FLOPs and element
    counts grow 16x; parameters and per-call counts do not change."""
    model, batch, _ = transformer_block()
    rows = batch.shape[0]
    t = trace(model, batch, device_type="cpu")
    big = rescaled(t, rows, 16 * rows)
    assert [lay.key for lay in big.layers] == [lay.key for lay in t.layers]
    for a, b in zip(t.layers, big.layers):
        assert all(s[0] == 16 * rows for s in b.in_shapes + b.out_shapes), a.key
        assert (b.flops, b.in_numel, b.out_numel, b.work_numel) == (
            16 * a.flops, 16 * a.in_numel, 16 * a.out_numel, 16 * a.work_numel), a.key
        assert (b.param_numel, b.calls, b.hazards, b.ops) == (a.param_numel, a.calls, a.hazards, a.ops), a.key
    assert big.handoff == t.handoff and big.fingerprint == t.fingerprint and big.units == t.units


def test_a_layer_without_the_batch_is_priced_as_traced():
    """A matmul of two parameters takes no batch: it keeps its shapes and FLOPs while the Linear grows."""
    t = trace(_WithTable(), torch.ones(4, 16), device_type="cpu")
    big = {lay.key: lay for lay in rescaled(t, 4, 400).layers}
    small = {lay.key: lay for lay in t.layers}
    fixed = [k for k, lay in small.items() if lay.kind == "op" and lay.flops]
    assert fixed and all(big[k] == small[k] for k in fixed)
    assert big["fc"].flops == 100 * small["fc"].flops == 100 * 2 * 4 * 16 * 16


def test_same_rows_is_the_trace_itself_and_bad_sizes_are_refused():
    t = trace(nn.Sequential(nn.Linear(4, 4)), torch.ones(2, 4), device_type="cpu")
    assert rescaled(t, 2, 2) is t
    with pytest.raises(ValueError, match=r"rescaled\(rows=2, to=0\): both are batch sizes, at least 1"):
        rescaled(t, 2, 0)
