"""tune() mechanics: pass counts, options, formats per target, resume, batches, back-off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoprec
from tests.models import mlp, transformer_block


def _deep_mlp(depth: int, width: int = 128, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("depth", [2, 4, 8], ids=["d2", "d4", "d8"])
def test_probe_passes_grow_linearly_with_layers(depth):
    """Probe passes with every layer alone = batches + candidate layers x formats: linear in depth; sharing the
    Linears' role (one group pass per format where it is clearly safe) decides alike in no more passes."""
    model = _deep_mlp(depth)
    x = torch.randn(256, 128)
    policy = autoprec.tune(model, x, progress=False, verify_steps=0, dtypes=["fp16", "bf16"], target="cuda",
                           share_roles=False)
    assert policy.stats["candidates"] == depth  # the Linears; Tanh has no FLOPs and no hazard
    assert policy.stats["probe_passes"] == 1 + depth * 2
    assert policy.stats["search_passes"] <= min(30, depth + 1)
    shared = autoprec.tune(model, x, progress=False, verify_steps=0, dtypes=["fp16", "bf16"], target="cuda")
    assert shared.assignment == policy.assignment
    assert shared.stats["probe_passes"] <= policy.stats["probe_passes"]


def test_cpu_target_never_picks_fp16_for_speed():
    """FP16 on a CPU target is allowed and probed, but where the profile measures it slower than FP32 (the
    pinned profile at these sizes) it is never chosen."""
    model, batch, loss_fn = mlp(batch_size=256)
    policy = autoprec.tune(model, batch, loss_fn, dtypes=["fp16"], progress=False, verify_steps=0)
    assert "fp16" not in policy.assignment.values()
    assert policy.grad_scaler() is None


def test_cuda_target_uses_fp16_and_tuned_scale():
    """On a CUDA target FP16 and BF16 cost the same (the pinned roofline); the loss scale follows the measured
    gradients."""
    model, batch, loss_fn = transformer_block(batch_size=8)
    policy = autoprec.tune(model, batch, loss_fn, target="cuda", progress=False, verify_steps=5)
    assert "fp16" in policy.assignment.values()
    with pytest.warns(autoprec.DeviceWarning, match="tuned for 'cuda'"):  # a CUDA policy's scaler for this CPU
        scaler = policy.grad_scaler("cpu")
    assert scaler is not None
    grad_max = policy.stats["fp32_grad_absmax"]
    assert scaler.get_scale() * grad_max * 8 <= 65504 < scaler.get_scale() * grad_max * 16


def test_options_out_of_range_fail_before_work():
    """Bad options raise OptionError naming the value."""
    model = _deep_mlp(1)
    with pytest.raises(autoprec.OptionError, match="tolerance"):
        autoprec.tune(model, torch.randn(4, 128), tolerance=-1, progress=False)
    with pytest.raises(autoprec.OptionError, match="fp8"):
        autoprec.tune(model, torch.randn(4, 128), dtypes=["fp8"], progress=False)
    with pytest.raises(autoprec.OptionError, match="tpu"):
        autoprec.tune(model, torch.randn(4, 128), target="tpu", progress=False)


def test_storage_resumes_finished_trials(tmp_path):
    """With an Optuna storage, a second run reuses the finished trials and reaches the same policy."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    model, batch, loss_fn = transformer_block(batch_size=8)
    first = autoprec.tune(model, batch, loss_fn, storage=storage, progress=False, verify_steps=0, n_trials=6)
    second = autoprec.tune(model, batch, loss_fn, storage=storage, progress=False, verify_steps=0, n_trials=6)
    assert second.assignment == first.assignment
    assert second.stats["search_passes"] == 0  # every trial was already measured
    import optuna
    studies = optuna.get_all_study_summaries(storage)
    assert len(studies) == 1 and studies[0].n_trials == first.stats["trials"]


def test_several_batches_count_for_ranges_and_verification():
    """batches= adds batches: the last is held out (checked on, not decided on), the probe runs each of the others
    once, verification trains on all of them."""
    model, batch, loss_fn = mlp(batch_size=128)
    extra = [torch.randn_like(batch) for _ in range(2)]
    policy = autoprec.tune(model, batch, loss_fn, batches=extra, progress=False, verify_steps=6)
    assert policy.held_out.held == "1 of 3 batches" and policy.stats["held_out_passes"] == 2
    assert policy.stats["probe_passes"] == 2 + policy.stats["candidates"]
    assert policy.verification is not None and policy.verification.passed
    with pytest.raises(autoprec.BatchError, match="iterable"):
        autoprec.tune(model, batch, loss_fn, batches=batch, progress=False)


def test_report_names_every_exclusion_with_evidence():
    """The Markdown and JSON reports carry the formats, the verification and the excluded layers."""
    model, batch, loss_fn = mlp(batch_size=256)
    policy = autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=4)
    md = policy.report()
    assert "matmul/conv FLOPs in 16-bit" in md and "## Verification" in md
    for key in policy.layers:
        assert f"`{key or '(root)'}`" in md
    import json
    data = json.loads(policy.report("json"))
    assert data["low_precision_flop_fraction"] == pytest.approx(policy.low_precision_fraction())
    with pytest.raises(autoprec.OptionError):
        policy.report("pdf")


class _DataDependent(nn.Module):
    """A block whose own code branches on a tensor value (untraceable by torch.export)."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.mean().item() > -1e9:  # data-dependent: a Python branch on a value
            h = torch.softmax(h, -1) * h.shape[-1]
        return self.fc2(h)


def test_untraceable_code_becomes_opaque_and_tuning_completes():
    """Data-dependent control flow: FX fails on that module's own code, the report says so, tune finishes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), _DataDependent())
    policy = autoprec.tune(model, torch.randn(256, 128), progress=False, verify_steps=3)
    assert "1" in policy.opaque and "data-dependent" in policy.opaque["1"].lower()
    assert policy.stats["fx_route"] == "torch.export per module"
    assert {"0", "1.fc1", "1.fc2"} <= set(policy.layers)
    assert not any(k.startswith("1::") for k in policy.layers)  # opaque own code is not split into ops
    assert "Opaque to FX" in policy.report()


class _Tied(nn.Module):
    """Two Linears sharing one weight matrix (like a tied encoder/decoder)."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.enc = nn.Linear(width, width, bias=False)
        self.dec = nn.Linear(width, width, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x) * 1e-3)


def test_tied_weights_share_one_decision():
    """Layers that share a parameter get one format: here the one both can use (enc's range rules out FP16)."""
    torch.manual_seed(0)
    model = _Tied()
    policy = autoprec.tune(model, torch.randn(512, 256) * 5000, progress=False, verify_steps=0,
                           dtypes=["fp16", "bf16"], target="cuda")
    assert policy.layers["enc"].out_absmax * 8 > 65504  # no FP16 headroom for enc
    assert policy.layers["dec"].measured["fp16"]["grad_err"] < policy.layers["dec"].measured["bf16"]["grad_err"]
    assert policy.layers["enc"].precision == policy.layers["dec"].precision == "bf16"


def test_underflow_evidence_follows_the_loss_scale():
    """The probe reports the share of FP16 gradients that flush to zero at the scale it would use."""
    from tests.models import underflow_model
    model, batch, _ = underflow_model()
    tuned = autoprec.tune(model, batch, dtypes=["fp16"], target="cuda", progress=False, verify_steps=0)
    unscaled = autoprec.tune(model, batch, dtypes=["fp16"], target="cuda", progress=False, verify_steps=0,
                             headroom=1e30)  # leaves no room for any scale: 1.0
    assert unscaled.stats["loss_scale_suggested"] == 1.0 < tuned.stats["loss_scale_suggested"]
    assert unscaled.layers["fc2"].measured["fp16"]["grad_underflow"] == 1.0
    assert unscaled.layers["fc2"].measured["fp16"]["grad_err"] == pytest.approx(1.0)
    assert tuned.layers["fc2"].measured["fp16"]["grad_underflow"] < 0.01
    assert tuned.layers["fc2"].precision == "fp16"


class _TwoHeads(nn.Module):
    """A wide and a small Linear side by side on the model's input."""

    def __init__(self) -> None:
        super().__init__()
        self.wide, self.small = nn.Linear(256, 256), nn.Linear(256, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.wide(x), self.small(x)], -1)


def test_cpu_target_keeps_layers_too_small_to_gain_in_fp32():
    """A CPU-target policy casts the wide layer and keeps the small one in FP32 with the reason "no gain";
    a small layer fed by a 16-bit one joins its format instead where that spares the cast of its input."""
    torch.manual_seed(0)
    model = _TwoHeads()
    policy = autoprec.tune(model, torch.randn(1024, 256), progress=False, verify_steps=0)
    assert policy.layers["wide"].precision == "bf16"
    assert policy.layers["small"].precision == "fp32" and policy.layers["small"].reason == "no gain"
    assert "step time fp32" in policy.layers["small"].detail
    assert policy.excluded() == {}  # "no gain" is not a numerical exclusion
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 4))
    policy = autoprec.tune(chain, torch.randn(1024, 256), progress=False, verify_steps=0)
    assert [policy.layers[k].precision for k in "012"] == ["bf16"] * 3
    assert policy.layers["2"].detail.startswith("joins its neighbours in bf16")
    assert policy.excluded() == {}


def test_activation_between_16bit_layers_follows_their_format():
    """A layer with no matmul work and no hazard, fed only by 16-bit layers, runs in their format ("follows"),
    as it would under autocast; the measured error of the policy includes it, and the model's output is FP32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Dropout(0.0), nn.Linear(512, 128), nn.Tanh())
    x = torch.randn(256, 128)
    policy = autoprec.tune(model, x, target="cuda", dtypes=["bf16"], progress=False, verify_steps=3)
    # Dropout(0.0) returns its input tensor: ReLU's output reaches the second Linear directly too
    assert policy.handoff == {"0": ("1",), "1": ("2", "3"), "2": ("3",), "3": ("4",)}
    assert [policy.layers[k].precision for k in "01234"] == ["bf16"] * 5
    assert [policy.layers[k].detail.startswith("follows") for k in "01234"] == [False, True, True, False, True]
    with policy.autocast(model):
        assert model(x).dtype == torch.float32  # the last follower hands back what its producer would have
    assert policy.verification.passed
