"""Tuning a mixture of experts: the experts' FLOPs go to 16-bit as blanket BF16 puts them, the router's format is
decided by its own measurement (not by its name), and experts run as a loop are one layer per block, so the
candidates do not multiply with the expert count, whether one module runs them or each is a module of its own."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autoprec
from tests.flopcount import DtypeFlops, measured_fraction
from tests.models_coverage import looped_moe, moe


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


@pytest.fixture(scope="module")
def looped():
    """Tuned looped MoEs (a ModuleList of expert MLPs run on their routed tokens): 8 experts, and 4 experts of
    which the last is routed no token by the tuning batch."""
    out = {}
    for experts, unrouted in ((4, 1), (8, 0)):
        model, x = looped_moe(experts=experts, unrouted=unrouted)
        policy = autoprec.tune(model, x, target="cuda", dtypes=["bf16"], progress=False, verify_steps=0)
        out[experts] = (model, x, policy)
    return out


def _blanket(policy):
    return dataclasses.replace(policy, layers={k: dataclasses.replace(e, precision="bf16")
                                               for k, e in policy.layers.items()})


def test_looped_experts_are_one_role_and_reach_blanket_bf16s_share(looped):
    """Separate expert modules fed their own token counts are probed as one role per Linear: 4 and 8 experts cost the
    same probe passes; their FLOPs run in BF16 (>= 0.9 of blanket BF16's share); the router is probed alone."""
    assert looped[4][2].stats["probe_passes"] == looped[8][2].stats["probe_passes"]
    for experts, (model, x, policy) in looped.items():
        keys = [k for k in policy.layers if k.startswith("experts.")]
        assert len(keys) == 2 * experts and all(policy.layers[k].precision == "bf16" for k in keys)
        ours, all_bf16 = (measured_fraction(p, model, lambda m=model, b=x: m(b)) for p in (policy, _blanket(policy)))
        assert all_bf16 > 0.9 and ours >= 0.9 * all_bf16, (experts, ours, all_bf16)
        router = policy.layers["router"]
        assert "bf16" in router.measured and "shared" not in router.measured["bf16"], router.measured
        assert policy.layers["experts.1.up"].measured["bf16"]["shared"] == experts - (experts == 4)


def test_an_expert_the_tuning_batch_never_calls_takes_its_roles_format(looped):
    """The expert routed no token has no measurement; the policy states that and gives it the format its role's
    experts that ran got, so a later batch that routes tokens to it runs it in BF16, not in the FP32 that flows in."""
    model, x, policy = looped[4]
    for leaf in ("up", "down"):
        entry = policy.layers[f"experts.3.{leaf}"]
        assert entry.precision == "bf16" and entry.flops == 0 and not entry.measured
        assert entry.detail == (f"not run by the tuning batch: the format of role experts.*.{leaf} (3 members ran: "
                                f"experts.0.{leaf}, experts.1.{leaf}, experts.2.{leaf})")
    with torch.no_grad():
        model.router.bias[3] = 1e4  # now every token goes to expert 3
    with torch.enable_grad(), policy.autocast(model), DtypeFlops() as counter:
        model(x)
    experts_flops = 2 * 2 * x.numel() // 128 * 128 * 512
    assert counter.flops[torch.bfloat16] >= experts_flops, counter.flops
