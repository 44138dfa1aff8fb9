"""A policy under ``torch.compile`` on the CPU: no graph break of its own, ``fullgraph=True`` compiles,
compiled values equal eager ones with the policy, and applying/changing/removing a policy recompiles.

Every policy here comes from the model's trace: every layer ``"bf16"`` except every other hazardous one
(``"fp32"``), the trace's handoff and opaque modules kept, so the policies have module entries and op
entries in a module's own code (``attn::softmax``, ``conv1::index_add``, ...).
Most tests compile with the fast ``aot_eager`` backend; one runs Inductor on a tiny model.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from torch import nn

from autoprec import LayerEntry, Policy
from autoprec.core import module_signatures
from autoprec.trace import trace
from tests import models as TM

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch and leaves no compiled code behind."""
    dynamo.reset()
    yield
    dynamo.reset()


# -- models and policies ----------------------------------------------------------------------
def _hazard(name: str, **kwargs):
    def build():
        model, batch, loss_fn = TM.FACTORIES[name](**kwargs)
        return model, batch, loss_fn
    return build


def _zoo(name: str):
    """A benchmark model of ``benchmarks/_zoo.py`` at size "quick". Language models get token ids only, no
    labels and no KV cache, the loss taken outside: their loss code (GPT-2's breaks the graph, with a policy
    or without) and cache code cost tracing time and are no concern here."""
    def build():
        pytest.importorskip("torch_geometric" if name == "gcn" else "transformers")
        if _BENCH not in sys.path:
            sys.path.insert(0, _BENCH)
        import _zoo

        spec = _zoo.build(name, "quick", heldout=0, train=0)
        batch, loss_fn = spec.tune
        if isinstance(batch, dict) and "input_ids" in batch:
            ids = batch["input_ids"]
            batch = {"input_ids": ids}
            if name == "t5":
                batch["decoder_input_ids"] = ids
            if name != "bert":
                batch["use_cache"] = False

            def loss_fn(out, batch, ids=ids):
                return F.cross_entropy(out.logits.float().flatten(0, 1), ids.flatten())
        return spec.model, batch, loss_fn
    return build


def _policy(model: nn.Module, batch) -> Policy:
    """Every traced layer bf16 except every other hazardous one fp32; handoff and opaque as traced."""
    tr = trace(model, batch, device_type="cpu")
    layers = {lay.key: LayerEntry("fp32" if lay.hazards and i % 2 else "bf16", kind=lay.kind)
              for i, lay in enumerate(tr.layers)}
    return Policy(layers=layers, modules=module_signatures(model), handoff=dict(tr.handoff),
                  opaque=dict(tr.opaque))


def _ops(policy: Policy) -> dict[str, str]:
    return {k: p for k, p in policy.assignment.items() if "::" in k}


def _split(batch) -> tuple[tuple, dict]:
    """``(args, kwargs)`` as :func:`autoprec.core._batch.call_model` passes ``batch``."""
    if isinstance(batch, Mapping):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _explain(model: nn.Module, batch):
    dynamo.reset()
    args, kwargs = _split(batch)
    return dynamo.explain(model)(*args, **kwargs)


def _autocast_in_graphs(explained) -> bool:
    """Whether a captured graph enters an autocast region (the policy's regions were traced, not skipped)."""
    enter = torch.amp.autocast_mode._enter_autocast
    return any(n.target is enter for g in explained.graphs for n in g.graph.nodes)


def _step(run: nn.Module, params: nn.Module, batch, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward of ``run``; the loss and the gradients of ``params``' parameters."""
    params.zero_grad(set_to_none=True)
    loss = loss_fn(TM.call_model(run, batch), batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}


# -- 1. graph breaks --------------------------------------------------------------------------
def _explained(build):
    """A model's policy, and Dynamo's explain of the model without and with it applied."""
    model, batch, _ = build()
    without = _explain(model, batch)
    policy = _policy(model, batch)
    with policy.autocast(model):
        with_policy = _explain(model, batch)
    return policy, without, with_policy


# name -> (builder, an op entry the policy must have, or None where every traced layer is a module)
_NO_DATA_DEPENDENT = {
    "rmsnorm_model": (_hazard("rmsnorm_model"), None),
    "unscaled_attention": (_hazard("unscaled_attention"), "attn::softmax"),
    "rotary_model": (_hazard("rotary_model"), None),
    "underflow_model": (_hazard("underflow_model"), "::mse_loss"),
    "cnn": (_hazard("cnn"), "::adaptive_avg_pool2d"),
    "gpt2": (_zoo("gpt2"), "transformer.h.0.attn::scaled_dot_product_attention"),
    "llama": (_zoo("llama"), "model.layers.0.self_attn::scaled_dot_product_attention"),
    "bert": (_zoo("bert"), "bert.encoder.layer.0.attention.self::scaled_dot_product_attention"),
    "t5": (_zoo("t5"), "encoder.block.0.layer.0.SelfAttention::log"),
}


@pytest.mark.parametrize("name", list(_NO_DATA_DEPENDENT), ids=list(_NO_DATA_DEPENDENT))
def test_policy_adds_no_graph_break(name):
    """With the policy applied, Dynamo breaks the graph exactly as often as without it (here: never)."""
    build, op_key = _NO_DATA_DEPENDENT[name]
    policy, without, with_policy = _explained(build)
    if op_key is not None:
        assert op_key in _ops(policy), sorted(_ops(policy))
    else:
        assert not _ops(policy)
    assert with_policy.graph_break_count == without.graph_break_count == 0, \
        [str(r.reason) for r in with_policy.break_reasons]
    assert with_policy.graph_count == without.graph_count == 1
    assert _autocast_in_graphs(with_policy) and not _autocast_in_graphs(without)


# name -> (builder, the module whose own code has the data-dependent op, an op entry of the policy)
_DATA_DEPENDENT = {
    "scatter_gnn": (_hazard("scatter_gnn"), "conv1", "conv1::index_put"),
    "scatter_gnn-index_add": (_hazard("scatter_gnn", aggr="index_add"), "conv1", "conv1::index_add"),
    "gcn": (_zoo("gcn"), "convs.0", "convs.0::scatter_add"),
}


@pytest.mark.parametrize("name", list(_DATA_DEPENDENT), ids=list(_DATA_DEPENDENT))
def test_data_dependent_models_break_only_for_their_own_ops(name):
    """A model with a data-dependent op of its own (bincount, nonzero) breaks without a policy already, and
    more graphs may be compiled with 16-bit op entries in that module (a recompile under the mode): every break
    reason with the policy is one without it (Dynamic shape operator), none comes from autoprec's code."""
    build, owner, op_key = _DATA_DEPENDENT[name]
    policy, without, with_policy = _explained(build)
    ops = _ops(policy)
    assert op_key in ops, sorted(ops)
    assert any(k.startswith(owner + "::") and p != "fp32" for k, p in ops.items()), ops
    reasons = {str(r.reason) for r in without.break_reasons}
    assert without.graph_break_count > 0 and reasons
    assert all(str(r.reason).startswith("Dynamic shape operator") for r in without.break_reasons)
    assert {str(r.reason) for r in with_policy.break_reasons} <= reasons
    assert _autocast_in_graphs(with_policy)


# -- 2. fullgraph compile, values equal to eager ----------------------------------------------
_COMPILED = {
    "mlp": (_hazard("mlp"), None),
    "transformer_block": (_hazard("transformer_block"), "attn::scaled_dot_product_attention"),
    "unscaled_attention": (_hazard("unscaled_attention"), "attn::softmax"),
    "gpt2": (_zoo("gpt2"), "transformer.h.0.attn::scaled_dot_product_attention"),
}


@pytest.mark.parametrize("name", list(_COMPILED), ids=list(_COMPILED))
def test_fullgraph_aot_eager_equals_eager_bit_for_bit(name):
    """fullgraph=True compiles forward and backward with the policy; loss and gradients equal eager's exactly."""
    build, op_key = _COMPILED[name]
    model, batch, loss_fn = build()
    policy = _policy(model, batch)
    if op_key is not None:
        assert op_key in _ops(policy), sorted(_ops(policy))
    plain_loss, _ = _step(model, model, batch, loss_fn)
    with policy.autocast(model):
        eager_loss, eager_grads = _step(model, model, batch, loss_fn)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        loss, grads = _step(compiled, model, batch, loss_fn)
    assert not torch.equal(eager_loss, plain_loss)  # the policy changes the values: the check below can fail
    assert torch.equal(loss, eager_loss), (loss.item(), eager_loss.item())
    assert grads.keys() == eager_grads.keys() and grads
    for k in grads:
        assert torch.equal(grads[k], eager_grads[k]), (k, (grads[k] - eager_grads[k]).abs().max().item())


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.ln(self.fc1(x))))


def test_inductor_within_bf16_rounding_of_eager():
    """Inductor with the policy: compiled values within one bf16 ulp of eager (Inductor may fuse and round differently)."""
    torch.manual_seed(0)
    model, x = _Tiny(), torch.randn(16, 32)
    policy = _policy(model, x)
    assert policy.assignment == {"fc1": "bf16", "ln": "fp32", "fc2": "bf16"}
    with torch.no_grad():
        plain = model(x)
        with policy.autocast(model):
            eager = model(x)
            out = torch.compile(model)(x)
    assert out.dtype == eager.dtype == torch.float32
    # fc2 ran in bf16 and handed back FP32: its values are bf16 numbers, the plain FP32 ones are not
    assert torch.equal(out, out.bfloat16().float()) and not torch.equal(plain, plain.bfloat16().float())
    assert (out - eager).abs().max().item() <= 2 ** -7 * eager.abs().max().item()


# -- 3. recompilation -------------------------------------------------------------------------
def test_compiled_model_follows_every_policy_change():
    """Compiled once: each policy applied (bf16; two ops, or a module, fp32 instead) and removal give eager's values."""
    model, x, _ = TM.unscaled_attention()
    base = _policy(model, x)
    assert base.assignment["attn::matmul"] == base.assignment["attn::softmax"] == base.assignment["attn.q"] == "bf16"

    def variant(changes: dict[str, str]) -> Policy:
        layers = {k: LayerEntry(changes.get(k, e.precision), kind=e.kind) for k, e in base.layers.items()}
        return Policy(layers=layers, modules=base.modules, handoff=base.handoff, opaque=base.opaque)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    # (label, policy or None for none, apply it to the model or to the compiled wrapper)
    states = [("fp32", None, None), ("bf16", base, model),
              ("scores fp32", variant({"attn::matmul": "fp32", "attn::softmax": "fp32"}), compiled),
              ("q fp32", variant({"attn.q": "fp32"}), model), ("fp32 again", None, None),
              ("bf16 again", base, compiled)]
    eager = {}
    for label, policy, _ in states:
        if policy is None:
            eager[label] = model(x).detach()
        else:
            with policy.autocast(model):
                eager[label] = model(x).detach()
    prev = None
    for label, policy, holder in states:
        if policy is None:
            out = compiled(x).detach()
        else:
            with policy.autocast(holder):
                out = compiled(x).detach()
        assert torch.equal(out, eager[label]), (label, (out - eager[label]).abs().max().item())
        if prev is not None:
            assert not torch.equal(out, prev), label  # every step changes the values: staleness would show
        prev = out


# -- 4. training under compile ----------------------------------------------------------------
def _train(compiled: bool, steps: int = 5) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model, x, loss_fn = TM.transformer_block()
    policy = _policy(model, x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    handle = policy.apply(model)
    try:
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        losses = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(run(x), x)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    finally:
        handle.remove()
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def test_training_compiled_equals_eager():
    """Five Adam steps on the transformer block, policy installed once: compiled losses and weights equal eager's."""
    eager_losses, eager_params = _train(compiled=False)
    losses, params = _train(compiled=True)
    assert eager_losses[-1] < eager_losses[0]  # it trains
    assert torch.equal(losses, eager_losses), (losses.tolist(), eager_losses.tolist())
    assert all(torch.equal(p, q) for p, q in zip(params, eager_params))
