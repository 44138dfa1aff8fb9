"""CUDA autocast emulated on a CPU: a policy for CUDA runs (and is tuned and verified) by CUDA's op lists."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from torch import nn

import autoprec
from autoprec import LayerEntry, Policy
from autoprec.probe import default_optimizer, train_curve
from autoprec.runtime import rule_of, run_as_cuda
from tests.helpers import CPU_AUTOCAST_FP32, FP32_OPS, NATIVE_OPS, unit_out
from tests.models import FNO, RMSNormModel, UnscaledAttentionModel, call_model, fno, rmsnorm_model

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32


def _policy(layers: dict[str, str], target: str) -> Policy:
    return Policy(layers={k: LayerEntry(p) for k, p in layers.items()}, target=target)


# -- the op lists ----------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", list(FP32_OPS), ids=list(FP32_OPS))
def test_cuda_fp32_ops_compute_in_fp32_in_a_16_bit_region(name, precision):
    """In a 16-bit layer of a CUDA policy on the CPU, an op on CUDA autocast's FP32 list takes the rounded input up
    and returns FP32, equal to FP32 on that input; a CPU policy runs it in 16-bit."""
    fn = FP32_OPS[name]
    x = torch.rand(4, 16) * 3 + 0.5
    low = F16 if precision == "fp16" else B16
    out = unit_out(fn, x, precision, "cuda")
    assert out.dtype == F32
    torch.testing.assert_close(out, fn(x.to(low).float()), rtol=1e-6, atol=1e-6)
    if not (name in CPU_AUTOCAST_FP32 and precision == "bf16"):
        assert unit_out(fn, x, precision, "cpu").dtype == low


@pytest.mark.parametrize("name", list(NATIVE_OPS), ids=list(NATIVE_OPS))
def test_ops_off_cudas_lists_run_in_16_bit(name):
    """Ops CUDA autocast leaves alone (mean, sqrt, sin, activations, in-place ops, an explicit dtype) stay FP16."""
    assert unit_out(NATIVE_OPS[name], torch.randn(4, 16), "fp16", "cuda").dtype == F16


def test_promote_ops_run_in_the_widest_input_dtype():
    """addcmul of FP16 and FP32 tensors runs in FP32 under CUDA rules."""
    a, b = torch.randn(3).half(), torch.randn(3)
    out = run_as_cuda(rule_of(torch.addcmul), torch.addcmul, (a, b, a), {}, F16)
    assert rule_of(torch.addcmul) == "promote" and out.dtype == F32


@pytest.mark.parametrize("rule", ["fp32", "lower", "promote"])
def test_fp64_is_not_autocast(rule):
    """CUDA autocast leaves FP64 alone, in every list."""
    fn = {"fp32": torch.exp, "lower": torch.mm, "promote": torch.dot}[rule]
    x = torch.randn(3, 3, dtype=torch.float64) if rule == "lower" else torch.randn(3, dtype=torch.float64)
    assert rule_of(fn) == rule
    assert run_as_cuda(rule, fn, (x,) if rule == "fp32" else (x, x), {}, B16).dtype == torch.float64


def test_binary_cross_entropy_is_refused_as_cuda_refuses_it():
    """CUDA autocast refuses binary_cross_entropy in a 16-bit region; the emulation says so and names the fix."""
    fn = lambda p: F.binary_cross_entropy(torch.sigmoid(p), torch.zeros_like(p))  # noqa: E731
    with pytest.raises(RuntimeError, match="unsafe to autocast.*binary_cross_entropy_with_logits"):
        unit_out(fn, torch.randn(4, 3), "fp16", "cuda")


def test_a_layer_in_own_code_follows_cuda_rules_too():
    """An op entry in a module's own code (``::softmax``) in FP16: for CUDA the FP32 softmax of the FP16-rounded
    input, for the CPU an FP16 softmax."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            self.h = self.fc(x)
            return torch.softmax(self.h, -1)

    m, x = M(), torch.randn(2, 8)
    with _policy({"fc": "fp32", "::softmax": "fp16"}, "cuda").autocast(m):
        cuda = m(x)
    assert torch.equal(cuda, torch.softmax(m.h.half().float(), -1))
    with _policy({"fc": "fp32", "::softmax": "fp16"}, "cpu").autocast(m):
        cpu = m(x)
    assert torch.equal(cpu, torch.softmax(m.h.half(), -1).float())
    assert not torch.equal(cpu, cuda)


# -- the RMSNorm hazard: apply and verify emulate as the probe does ----------------------------
def test_cuda_policy_applied_on_the_cpu_runs_rmsnorm_as_cuda_does():
    """The hand-written RMSNorm in FP16: near FP32 under a CUDA policy (pow/rsqrt in FP32); under a CPU policy
    x.pow(2) overflows FP16 and the norm collapses."""
    model, x, _ = rmsnorm_model()
    with torch.no_grad():
        ref = model(x)
    err = {}
    for target in ("cuda", "cpu"):
        with _policy({"norm": "fp16"}, target).autocast(model), torch.no_grad():
            err[target] = float((model(x) - ref).norm() / ref.norm())
    assert err["cuda"] < 0.01 < 0.5 < err["cpu"], err


def test_verification_trains_with_the_emulation():
    """train_curve (what verify runs) on an FP16 norm: CUDA policy within 1% of FP32, CPU policy (overflow) not."""
    model, x, loss_fn = rmsnorm_model()
    kw = {"steps": 3, "device_type": "cpu", "scaler": None, "optimizer": default_optimizer, "seed": 0}
    fp32 = train_curve(model, [x], loss_fn, policy=None, **kw).losses
    cuda = train_curve(model, [x], loss_fn, policy=_policy({"norm": "fp16"}, "cuda"), **kw).losses
    cpu = train_curve(model, [x], loss_fn, policy=_policy({"norm": "fp16"}, "cpu"), **kw).losses
    assert all(abs(a - b) <= 0.01 * abs(a) for a, b in zip(fp32, cuda)), (fp32, cuda)
    assert any(not abs(a - b) <= 0.1 * abs(a) for a, b in zip(fp32, cpu)), (fp32, cpu)


COMPILED = {
    "rmsnorm": (RMSNormModel, (4, 64), {"fc1": "bf16", "norm": "fp16", "fc2": "fp16"}),
    "attention": (UnscaledAttentionModel, (2, 8, 64), {"attn.q": "fp16", "attn::matmul": "bf16",
                                                       "attn::softmax": "fp16"}),
    "fno": (FNO, (2, 1, 16, 16), {"blocks.0.spectral": "fp16", "blocks.1.skip": "bf16"}),
}


@pytest.mark.parametrize("name", list(COMPILED), ids=list(COMPILED))
def test_emulated_cuda_policy_adds_no_graph_break(name):
    """Compiled (aot_eager, fullgraph), a CUDA policy's FP16 and BF16 units and op entries on the CPU (FFTs
    included) break the graph no more than no policy, and compute what eager does."""
    build, shape, layers = COMPILED[name]
    torch.manual_seed(0)
    model, x = build(), torch.randn(*shape)
    dynamo.reset()
    try:
        bare = dynamo.explain(model)(x).graph_break_count
        with _policy(layers, "cuda").autocast(model):
            eager = model(x)
            dynamo.reset()
            explained = dynamo.explain(model)(x)
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    finally:
        dynamo.reset()
    assert explained.graph_break_count == bare == 0
    torch.testing.assert_close(compiled, eager)


# -- FFTs: cuFFT's half transforms ----------------------------------------------------------------
def test_fp16_fft_is_emulated_as_cufft_returns_it():
    """An FP16 rfft2/irfft2 returns complex32/FP16: the FP32 transform of the FP16 input, rounded."""
    x = torch.randn(2, 8, 16).half()
    y = run_as_cuda("fft", torch.fft.rfft2, (x,), {}, F16)
    assert y.dtype == torch.complex32
    assert torch.equal(torch.view_as_real(y), torch.view_as_real(torch.fft.rfft2(x.float()).to(torch.complex32)))
    back = run_as_cuda("fft", torch.fft.irfft2, (y,), {"s": (8, 16)}, F16)
    assert back.dtype == F16
    torch.testing.assert_close(back.float(), x.float(), rtol=0.01, atol=0.01)


@pytest.mark.parametrize("call", [
    lambda x: torch.fft.rfft2(x), lambda x: torch.fft.fft(x, dim=1), lambda x: torch.fft.rfftn(x, s=(8, 12)),
    lambda x: torch.fft.irfft(torch.fft.rfft(x.float()).to(torch.complex32), n=10)],
    ids=["rfft2", "fft-dim1", "rfftn-s", "irfft-n"])
def test_fp16_fft_at_a_size_other_than_a_power_of_two_is_refused(call):
    """cuFFT's half transforms need power-of-two sizes; the emulation refuses others with CUDA's message."""
    x = torch.randn(8, 12).half()
    with pytest.raises(RuntimeError, match=r"powers of two .* signal size of (12|10)"):
        unit_out(call, x, "fp16", "cuda")


def test_bf16_fft_is_refused_as_cufft_has_none():
    """cuFFT has no BF16 transforms (CPU autocast would lift them to FP32): refused, naming cuFFT."""
    with pytest.raises(RuntimeError, match="Unsupported dtype BFloat16: cuFFT has no BF16"):
        unit_out(torch.fft.rfft2, torch.randn(4, 8, 8), "bf16", "cuda")


# -- tune: the FNO's spectral layers, the evidence marked ------------------------------------------
SPECTRAL = ("blocks.0.spectral", "blocks.1.spectral")


def test_fno_spectral_layers_are_probed_for_cuda():
    """Tuned for CUDA on the CPU, the FNO's spectral layers are measured in FP16 (cuFFT half, emulated) and cast,
    refused BF16 with cuFFT's reason; the policy says its evidence is emulated and trains as FP32 does."""
    model, batch, loss_fn = fno()
    policy = autoprec.tune(model, batch, loss_fn, dtypes=["fp16", "bf16"], target="cuda", progress=False,
                           verify_steps=3)
    assert policy.emulated
    for key in SPECTRAL:
        entry = policy.layers[key]
        fp16 = entry.measured["fp16"]
        assert fp16["nonfinite"] == 0 and fp16["loss_err"] <= policy.tolerance["loss"], entry.detail
        assert entry.precision == "fp16", entry.detail
        assert "bf16: RuntimeError: Unsupported dtype BFloat16: cuFFT has no BF16" in entry.detail
    assert policy.verification is not None and policy.verification.passed


def test_fno_at_a_size_cufft_half_cannot_run_keeps_spectral_layers_fp32():
    """At 24x24 (not a power of two) cuFFT has no FP16 transform: the spectral layers stay FP32, 'cannot run'."""
    model, batch, loss_fn = fno(size=24)
    policy = autoprec.tune(model, batch, loss_fn, dtypes=["fp16"], target="cuda", progress=False, verify_steps=0)
    for key in SPECTRAL:
        entry = policy.layers[key]
        assert entry.precision == "fp32" and entry.reason == "cannot run", entry.detail
        assert "powers of two" in entry.detail and "signal size of 24" in entry.detail


def test_cpu_policy_is_not_marked_emulated():
    """A policy tuned for the CPU on the CPU was measured natively."""
    model, batch, loss_fn = rmsnorm_model()
    policy = autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=0)
    assert not policy.emulated
    assert "emulated" not in policy.report()


# -- the policy file ------------------------------------------------------------------------------
def test_emulated_round_trips_and_old_files_load(tmp_path):
    """``emulated`` survives save/load; a file written before the field loads as not emulated."""
    policy = Policy(layers={"fc": LayerEntry("fp16")}, target="cuda", emulated=True)
    path = tmp_path / "p.json"
    policy.save(path)
    assert autoprec.load(path) == policy and autoprec.load(path).emulated
    data = json.loads(path.read_text())
    del data["emulated"]
    assert Policy.from_dict(data).emulated is False


@pytest.mark.parametrize("value", ["yes", 1, None], ids=["string", "int", "null"])
def test_emulated_must_be_true_or_false(value):
    """A policy file whose ``emulated`` is not a JSON boolean is refused, naming the field and the value."""
    data = Policy(layers={}, target="cuda").to_dict()
    data["emulated"] = value
    with pytest.raises(autoprec.PolicyError, match=rf"Policy field 'emulated' is {re.escape(repr(value))} "
                       rf"\({type(value).__name__}\); allowed: true or false"):
        Policy.from_dict(data)


def test_json_and_html_reports_say_emulated():
    """The JSON and HTML reports carry the mark too, and only for emulated evidence."""
    policy = Policy(layers={"fc": LayerEntry("fp16", measured={"fp16": {"loss_err": 0.0}})}, target="cuda")
    assert json.loads(policy.report("json"))["emulated"] is False
    assert "emulated" not in policy.report("html")
    emulated = dataclasses.replace(policy, emulated=True)
    assert json.loads(emulated.report("json"))["emulated"] is True
    assert "evidence <b>emulated</b>" in emulated.report("html")


def test_call_model_unchanged_by_emulated_policy_removal():
    """Leaving the block restores the model: the same output as before the policy."""
    model, x, _ = rmsnorm_model()
    before = call_model(model, x)
    with _policy({"norm": "fp16", "fc1": "bf16"}, "cuda").autocast(model):
        model(x)
    assert torch.equal(call_model(model, x), before)


def test_private_torch_names_follow_their_op():
    """torch._grouped_mm is grouped_mm to CUDA's rules: cast to the region's format like every matmul (an FP32
    weight beside a BF16 activation would fail in the kernel)."""
    from autoprec.runtime import rule_of

    assert rule_of(torch._grouped_mm) == rule_of("grouped_mm") == "lower"
