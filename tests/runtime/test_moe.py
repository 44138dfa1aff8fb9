"""Mixture-of-experts experts run in their region's format, eager and under torch.compile: a unit with stacked
weights runs with its own parameters cast inside the region (as FSDP2's ``param_dtype`` gathers them), so
``F.grouped_mm`` (which autocast leaves alone, and which Dynamo hands no function mode) runs in BF16, with the
same values as the computation written by hand in BF16 and gradients reaching the FP32 weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprec.core import unit_modules
from autoprec.runtime import Runtime
from tests.flopcount import DtypeFlops
from tests.models_coverage import GroupedExperts


class Block(nn.Module):
    """The grouped experts alone, fed tokens sorted by expert and their group offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = GroupedExperts(16, 32, 4)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return self.experts(x, offs)


def _block() -> tuple[Block, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return Block(), torch.randn(24, 16), torch.tensor([5, 12, 12, 24], dtype=torch.int32)


def _by_hand(block: Block, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    up, down = block.experts.up.to(torch.bfloat16), block.experts.down.to(torch.bfloat16)
    return F.grouped_mm(F.gelu(F.grouped_mm(x.to(torch.bfloat16), up, offs=offs)), down, offs=offs).float()


def test_grouped_experts_run_in_bf16_with_gradients_to_the_fp32_weights():
    """Eager: the values of the BF16 computation written by hand, BF16 FLOPs only, FP32 gradients on the masters."""
    block, x, offs = _block()
    runtime = Runtime(block, {"experts": "bf16"}, units=["experts"], device_type="cpu").install()
    try:
        with DtypeFlops() as counter:
            out = block(x, offs)
        assert out.dtype == torch.float32 and set(counter.flops) == {torch.bfloat16}
        assert torch.equal(out, _by_hand(block, x, offs))
        out.sum().backward()
    finally:
        runtime.remove()
    ref = Block()
    ref.load_state_dict(block.state_dict())
    _by_hand(ref, x, offs).sum().backward()
    for p, q in zip(block.parameters(), ref.parameters()):
        assert type(p) is nn.Parameter and p.dtype == p.grad.dtype == torch.float32
        assert torch.equal(p.grad, q.grad)


def test_grouped_experts_compile_fullgraph_with_the_eager_values():
    """torch.compile(fullgraph=True) traces the region with no graph break; values and gradients equal eager's."""
    block, x, offs = _block()
    runtime = Runtime(block, {"experts": "bf16"}, units=["experts"], device_type="cpu").install()
    try:
        eager = block(x, offs)
        eager.sum().backward()
        grads = [p.grad.clone() for p in block.parameters()]
        block.zero_grad()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(block)(x, offs)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x, offs)
        compiled.sum().backward()
    finally:
        runtime.remove()
        torch._dynamo.reset()
    assert torch.equal(compiled, eager) and torch.equal(compiled, _by_hand(block, x, offs))
    assert all(torch.equal(p.grad, g) for p, g in zip(block.parameters(), grads))


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(8, 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bilinear(x, x)


def test_bilinear_in_bf16_eager_and_compiled():
    """nn.Bilinear (which autocast leaves alone too) runs in BF16 with its cast weights, compiled as eager."""
    torch.manual_seed(0)
    m, x = Pair(), torch.randn(5, 8)
    runtime = Runtime(m, {"bilinear": "bf16"}, units=["bilinear"], device_type="cpu").install()
    try:
        eager = m(x)
        torch._dynamo.reset()
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    finally:
        runtime.remove()
        torch._dynamo.reset()
    b, bil = x.to(torch.bfloat16), m.bilinear
    by_hand = F.bilinear(b, b, bil.weight.to(torch.bfloat16), bil.bias.to(torch.bfloat16)).float()
    assert torch.equal(eager, by_hand) and torch.equal(compiled, by_hand)


def _mixtral_experts(impl: str) -> tuple[nn.Module, tuple]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2)
    cfg._experts_implementation = impl
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        nn.init.normal_(p, std=0.1)
    return block, (torch.randn(2, 6, 32),)


class Holder(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.experts(x, idx, w)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm", "eager"])
def test_transformers_experts_are_one_unit_in_bf16(impl):
    """Mixtral's experts (stacked weights, an activation child) are one layer, whichever way transformers runs them
    (one grouped matmul, batched matmuls, a loop over experts): every expert FLOP runs in BF16 in its region."""
    block, args = _mixtral_experts(impl)
    units = unit_modules(block)
    assert "experts" in units and "experts.act_fn" not in units
    runtime = Runtime(block, {"experts": "bf16"}, units=list(units), device_type="cpu").install()
    try:
        with DtypeFlops() as counter:
            out = block(*args)
        out.sum().backward()
    finally:
        runtime.remove()
    router = 2 * 12 * 32 * 4  # the gate's FP32 linear: the rest is the experts'
    assert counter.flops[torch.float32] == router and counter.flops[torch.bfloat16] > 10 * router
    assert out.dtype == block.experts.gate_up_proj.grad.dtype == torch.float32


def test_transformers_grouped_mm_experts_compile_with_no_break_added():
    """Compiled, Mixtral's grouped-mm experts in BF16 add no graph break to the FP32 model's and give eager's values:
    transformers runs ``F.grouped_mm`` there only with BF16 weights, which the region hands it."""
    block, _ = _mixtral_experts("grouped_mm")
    experts = Holder(block.experts)
    x = torch.randn(12, 32)
    idx = torch.tensor([[i % 4, (i + 1) % 4] for i in range(12)])
    w = torch.full((12, 2), 0.5)
    torch._dynamo.reset()
    before = torch._dynamo.explain(experts)(x, idx, w).graph_break_count
    runtime = Runtime(experts, {"experts": "bf16"}, units=["experts"], device_type="cpu").install()
    try:
        eager = experts(x, idx, w)
        torch._dynamo.reset()
        after = torch._dynamo.explain(experts)(x, idx, w).graph_break_count
        compiled = torch.compile(experts, backend="aot_eager", fullgraph=after == 0)(x, idx, w)
    finally:
        runtime.remove()
        torch._dynamo.reset()
    assert after <= before
    assert torch.equal(compiled, eager)
