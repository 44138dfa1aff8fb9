"""Tuning a mixture of experts: the experts' FLOPs go to 16-bit as blanket BF16 puts them, the router's format is
decided by its own measurement (not by its name), and experts run as a loop are one layer per block, so the
candidates do not multiply with the expert count."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autoprec
from tests.flopcount import measured_fraction
from tests.models_coverage import moe


def test_grouped_experts_reach_blanket_bf16s_share_and_the_router_is_measured():
    model, x = moe()
    policy = autoprec.tune(model, x, target="cuda", dtypes=["bf16"], progress=False, verify_steps=0)
    blanket = dataclasses.replace(policy, layers={k: dataclasses.replace(e, precision="bf16")
                                                  for k, e in policy.layers.items()})
    ours, all_bf16 = (measured_fraction(p, model, lambda: model(x)) for p in (policy, blanket))
    assert all_bf16 > 0.9 and ours >= 0.9 * all_bf16
    assert policy.layers["experts"].precision == "bf16" and policy.layers["experts"].flops > 0
    router = policy.layers["router"]
    assert "bf16" in router.measured and router.reason in ("cast", "no gain") or router.excluded


def _mixtral(experts: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=experts,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    cfg._experts_implementation = "eager"
    ids = torch.randint(0, 64, (2, 16))
    return transformers.MixtralForCausalLM(cfg).train(), {"input_ids": ids, "labels": ids}


def test_experts_in_a_loop_are_one_layer_whatever_their_count():
    """transformers' eager experts (a Python loop over slices of stacked weights): one layer per block whatever the
    expert count (so the candidates do not multiply with it), none of their FLOPs unseen, and tuned into BF16."""
    from autoprec.core import unit_modules

    assert sorted(unit_modules(_mixtral(4)[0])) == sorted(unit_modules(_mixtral(8)[0]))
    model, batch = _mixtral(4)
    policy = autoprec.tune(model, batch, target="cuda", dtypes=["bf16"], progress=False, verify_steps=0)
    experts = [k for k in policy.layers if k.endswith("mlp.experts")]
    assert experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"] and not policy.unseen
    assert all(policy.layers[k].precision == "bf16" and policy.layers[k].flops > 0 for k in experts)
