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


class _Flat(nn.Module):
    """Tokens flattened with the sequence (``B * T`` rows) before a Linear, and a position table of fixed size."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(8, 16))
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.pos[: x.shape[1]]
        return self.fc(h.reshape(-1, 16)) @ self.pos.t()


def test_flattened_tokens_and_routed_experts_grow_with_the_batch_given_a_smaller_trace():
    """With the model traced again on half the rows, sizes that carry the batch grow wherever they sit: ``B * T``
    flattened rows and the tokens a router sends each expert; the position table does not. Without it, only
    sizes leading with the batch's rows do (flattened rows are priced as traced)."""
    from autoprec.trace._rescale import fewer_rows
    from tests.models_coverage import looped_moe

    x = torch.randn(4, 8, 16)
    model = _Flat()
    t, half = trace(model, x, device_type="cpu"), trace(model, fewer_rows(x, 2), device_type="cpu")
    fc = rescaled(t, 4, 400, half).layer("fc")
    assert fc.in_shapes == ((3200, 16),) and fc.flops == 100 * t.layer("fc").flops
    assert rescaled(t, 4, 400).layer("fc").in_shapes == ((32, 16),)  # the old rule: 32 is not the batch's 4 rows
    table = [lay for lay in t.layers if lay.kind == "op" and lay.flops and lay.key != "fc"]
    assert table and all(rescaled(t, 4, 400, half).layer(lay.key).in_shapes[1] == (16, 8) for lay in table)
    moe, batch = looped_moe(experts=4)
    t, half = trace(moe, batch, device_type="cpu"), trace(moe, fewer_rows(batch, 4), device_type="cpu")
    big = rescaled(t, 8, 800, half)
    for key in [lay.key for lay in t.layers if lay.key.startswith("experts.") and lay.flops]:
        rows = t.layer(key).in_shapes[0][0]
        assert big.layer(key).in_shapes[0][0] == 100 * rows, key
        assert big.layer(key).flops == 100 * t.layer(key).flops
