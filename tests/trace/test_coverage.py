"""autoprec sees the whole model: recurrent layers, nn.MultiheadAttention, grouped-mm experts, bilinear,
einsum and ops in Python loops are layers; work it cannot attribute is reported, never counted as covered.

The 16-bit share is measured as the model runs (tests/flopcount.py: FLOPs by operand dtype at
dispatch), not read from the policy.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import autoprec
from autoprec.errors import PolicyError
from autoprec.trace import capture, registered, trace
from tests.flopcount import DtypeFlops, measured_fraction
from tests.models_coverage import BUILDERS, scan

_TUNED: dict[str, tuple[autoprec.Policy, nn.Module, torch.Tensor]] = {}


def tuned(name: str) -> tuple[autoprec.Policy, nn.Module, torch.Tensor]:
    """One GPU-target BF16 policy per model (BF16 runs for real on the CPU, so its dtype is measurable)."""
    if name not in _TUNED:
        model, batch = BUILDERS[name]()
        policy = autoprec.tune(model, batch, target="cuda", dtypes=["bf16"], progress=False, verify_steps=0)
        _TUNED[name] = policy, model, batch
    return _TUNED[name]


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_formulas_cover_the_kernels_torch_lacks():
    """The recurrent CPU kernel, grouped mm, bilinear, CPU attention and the fused MHA/encoder paths have formulas."""
    assert {"mkldnn_rnn_layer", "_cudnn_rnn", "_grouped_mm", "_trilinear", "_native_multi_head_attention",
            "_transformer_encoder_layer_fwd", "_scaled_dot_product_flash_attention_for_cpu"} <= set(registered())


@pytest.mark.parametrize("cell", ["LSTM", "GRU"], ids=["lstm", "gru"])
def test_recurrent_formula_equals_the_decomposed_kernel(cell):
    """oneDNN's fused LSTM counts what the same LSTM run as mm/addmm cells counts (oneDNN off)."""
    torch.manual_seed(0)
    rnn, x = getattr(nn, cell)(16, 24, num_layers=2, batch_first=True, bidirectional=True), torch.randn(3, 7, 16)
    fused = _flops(lambda: rnn(x))
    with torch.backends.mkldnn.flags(enabled=False):
        cells = _flops(lambda: rnn(x))
    assert fused > 0 and abs(fused - cells) / cells < 0.01


def test_fast_paths_count_what_the_slow_paths_count():
    """nn.MultiheadAttention's and TransformerEncoderLayer's fused inference kernels count as their slow paths."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 32)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    slow = (_flops(lambda: mha(x, x, x)), _flops(lambda: layer(x)))
    mha.eval(), layer.eval()
    with torch.no_grad():
        fast = (_flops(lambda: mha(x, x, x)), _flops(lambda: layer(x)))
    assert slow == fast and min(slow) > 0


def test_grouped_mm_and_bilinear_formulas():
    """grouped mm counts 2·M·K·N over all groups; bilinear 2·N·O·I1·I2."""
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    assert _flops(lambda: torch.nn.functional.grouped_mm(torch.randn(10, 8), torch.randn(3, 8, 4), offs=offs)) \
        == 2 * 10 * 8 * 4
    bil = nn.Bilinear(5, 6, 7)
    assert _flops(lambda: bil(torch.randn(4, 5), torch.randn(4, 6))) == 2 * 4 * 7 * 5 * 6


@pytest.mark.parametrize("name", ["lstm", "gru", "attention", "moe", "scan"])
def test_most_matmul_work_runs_in_16_bit_measured_at_run_time(name):
    """GPU target: >= 90% of the matmul FLOPs run with BF16 operands, and the report says what ran."""
    policy, model, batch = tuned(name)
    measured = measured_fraction(policy, model, lambda: model(batch))
    assert measured >= 0.9, policy.assignment
    assert abs(policy.low_precision_fraction() - measured) <= 0.02


@pytest.mark.parametrize("name", ["rnn", "bilinear_einsum"])
def test_reported_fraction_is_what_runs(name):
    """The policy's fraction equals the run-time count; the recurrent / bilinear layer itself is BF16."""
    policy, model, batch = tuned(name)
    assert abs(policy.low_precision_fraction() - measured_fraction(policy, model, lambda: model(batch))) <= 0.02
    assert policy.layers["rnn" if name == "rnn" else "bilinear"].precision == "bf16"


@pytest.mark.parametrize("edit", [None, "mixer::matmul"], ids=["as-tuned", "op-entry-fp32"])
def test_the_measured_fraction_is_what_the_policy_ran(edit):
    """Verification counts the FLOPs its policy run computed, by operand dtype: the same count as an independent
    dispatch count of the policy's forward, op-level entries (``mixer::matmul``) included, cast or FP32."""
    from autoprec.policy import low_fraction
    from autoprec.probe import default_optimizer, train_curve
    from autoprec.trace import DtypeFlops as Counted

    model, batch = BUILDERS["scan"]()
    policy = autoprec.tune(model, batch, target="cuda", dtypes=["bf16"], progress=False, verify_steps=2)
    assert "mixer::matmul" in policy.layers
    if edit is None:
        counted = policy.verification.flops_by_dtype
        fraction = policy.verification.measured_fraction
    else:  # an op-level entry moved to FP32 by hand: counted as a policy run counts it
        policy = dataclasses.replace(policy, layers={**policy.layers, edit: dataclasses.replace(
            policy.layers[edit], precision="fp32", reason="edited")})
        count = Counted()
        train_curve(model, [batch], None, steps=1, policy=policy, device_type="cpu", scaler=None,
                    optimizer=default_optimizer, seed=0, count=count)
        counted, fraction = count.flops, low_fraction(count.flops)
    with torch.enable_grad(), policy.autocast(model), DtypeFlops() as oracle:
        model(batch)
    assert counted == {str(k).removeprefix("torch."): v for k, v in oracle.flops.items()}
    assert fraction == oracle.low_fraction()
    assert (fraction < 1) == (edit is not None) and fraction == pytest.approx(policy.low_precision_fraction())


def test_a_gpu_policys_emulated_fp16_counts_as_fp16():
    """On a CPU a GPU policy's FP16 matmuls run as FP16-rounded operands in FP32 kernels: the library's count
    calls them FP16 (what the GPU runs), where a plain dispatch count sees FP32."""
    from autoprec.trace import DtypeFlops as Counted

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 16)), torch.randn(8, 16)
    policy = autoprec.Policy(layers={"0": autoprec.LayerEntry("fp16")}, target="cuda")
    with policy.autocast(model), Counted() as count, DtypeFlops(emulated=False) as plain:
        model(x)
    assert count.flops == {"float16": 2 * 8 * 16 * 16}
    assert dict(plain.flops) == {torch.float32: 2 * 8 * 16 * 16}


def test_multihead_attention_is_one_layer():
    """nn.MultiheadAttention (bare and inside TransformerEncoderLayer) is a layer; out_proj is not a key."""
    policy, _, _ = tuned("attention")
    assert {"attn", "encoder.self_attn"} <= set(policy.layers)
    assert not any(k.endswith("out_proj") for k in policy.layers)
    assert policy.layers["attn"].flops > 0 and policy.layers["attn"].precision == "bf16"


def test_loop_is_one_layer_whatever_the_sequence_length():
    """A matmul called once per time step is one key: the same layers at 8 and 24 steps, and the policy
    tuned at 8 steps fits and covers the model at 24."""
    short = trace(*scan(seq_len=8), device_type="cpu")
    model, long_batch = scan(seq_len=24)
    long = trace(model, long_batch, device_type="cpu")
    assert [lay.key for lay in short.layers] == [lay.key for lay in long.layers]
    assert short.layer("mixer::matmul").calls == 8 and long.layer("mixer::matmul").calls == 24
    assert long.flops_total == _flops(lambda: model(long_batch)) and not long.unseen  # every FLOP in a layer
    policy, _, _ = tuned("scan")  # tuned at 16 steps
    policy.check(model)
    assert abs(policy.low_precision_fraction() - measured_fraction(policy, model, lambda: model(long_batch))) < 0.02


class _OpaqueMatmul(nn.Module):
    """Own code export cannot capture (a branch on a tensor's value) doing most of the model's matmul work."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.w = nn.Parameter(torch.randn(64, 256) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > 0:
            h = -h
        return h @ self.w


def test_work_outside_every_layer_is_reported_not_counted_as_covered(tmp_path):
    """FLOPs of opaque own code are ``unseen`` at their module, count as FP32, and survive save/load."""
    torch.manual_seed(0)
    model, batch = nn.Sequential(nn.Linear(64, 64), _OpaqueMatmul()), torch.randn(256, 64)
    policy = autoprec.tune(model, batch, target="cuda", dtypes=["bf16"], progress=False, verify_steps=0)
    assert set(policy.unseen) == {"1"} and policy.unseen["1"] == 2 * 256 * 64 * 256
    measured = measured_fraction(policy, model, lambda: model(batch))
    assert measured < 0.5 and abs(policy.low_precision_fraction() - measured) <= 0.02
    report = policy.report()
    assert "## FLOPs outside every layer" in report and f"| `1` | {policy.unseen['1']} |" in report
    assert f'"flops_unseen": {2 * 256 * 64 * 256}' in policy.report("json")
    policy.save(tmp_path / "p.json")
    assert autoprec.load(tmp_path / "p.json").unseen == policy.unseen


def test_bad_unseen_entry_names_the_field():
    """A negative or non-integer FLOP count in ``unseen`` is a PolicyError naming the entry."""
    data = autoprec.Policy(layers={}).to_dict()
    data["unseen"] = {"enc": -3}
    with pytest.raises(PolicyError, match=r"Policy field \"unseen\['enc'\]\" is -3 \(int\); allowed: an integer >= 0"):
        autoprec.Policy.from_dict(data)
    data["unseen"] = {"enc": 1.5}
    with pytest.raises(PolicyError, match=r"Policy field \"unseen\['enc'\]\" is 1.5 \(float\); allowed: an integer"):
        autoprec.Policy.from_dict(data)


def test_dtype_counter_sees_bf16_operands():
    """The run-time counter itself: an FP32 and a BF16 matmul of equal size split the count in half."""
    a = torch.randn(8, 8)
    with DtypeFlops() as counter:
        a @ a
        a.bfloat16() @ a.bfloat16()
    assert counter.low_fraction() == 0.5


def test_per_module_export_keeps_hf_attention_fed_a_cache():
    """Whole-model export fails on Mixtral's eager experts (a data-dependent loop); per-module export still
    captures each attention module, called with a DynamicCache, so only the experts stay opaque."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    cfg._experts_implementation = "eager"
    model = transformers.MixtralForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 8))
    nodes, opaque, route = capture(model, {"input_ids": ids, "labels": ids})
    assert route == "torch.export per module"
    assert set(opaque) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert {"model.layers.0.self_attn", "model.layers.1.self_attn"} <= {prefix for prefix, _ in nodes}


def test_loop_layer_keeps_its_precision_under_compile():
    """Under torch.compile (fullgraph, no break) the per-step matmul is the same key: the compiled model runs
    the policy's BF16 entry bit for bit as eager does."""
    model, batch = scan(seq_len=4)
    policy = autoprec.Policy(layers={"mixer::matmul": autoprec.LayerEntry("bf16", kind="op", op="matmul")},
                             target="cuda")
    with torch.no_grad():
        fp32 = model(batch)
        with policy.autocast(model):
            eager = model(batch)
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(batch)
    assert not torch.equal(eager, fp32) and torch.equal(compiled, eager)


def test_hf_mamba_slow_scan_layers_do_not_grow_with_length():
    """transformers' Mamba without its CUDA kernels scans in Python (a matmul per step): the same layer
    keys at 8 and 32 tokens."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=4))
    keys = []
    for length in (8, 32):
        ids = torch.randint(0, 64, (2, length))
        keys.append([lay.key for lay in trace(model, {"input_ids": ids}, device_type="cpu").layers])
    assert keys[0] == keys[1] and "backbone.layers.0.mixer::matmul" in keys[0]
