"""Verification: a finite FP32 reference, a measured noise floor, honest back-off, and loud failure."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import autoprec
from autoprec.search import Decision
from autoprec.training import default_optimizer, train_curve
from autoprec.verify import verify
from tests.models import mlp, rmsnorm_model, underflow_model, underflow_optimizer


def _verify(model, batch, loss_fn, assignment, order, *, bound=0.05, optimizer=default_optimizer, steps=6,
            target="cpu"):
    """verify() on decisions given by hand, as if the probe had accepted them all."""
    fp32 = train_curve(model, [batch], loss_fn, steps=steps, policy=None, device_type="cpu", scaler=None,
                       optimizer=optimizer, seed=0)
    decisions = {k: Decision(k, p, "cast" if p != "fp32" else "no gain") for k, p in assignment.items()}

    def make_policy(ds, scaler):
        return autoprec.Policy(layers={k: autoprec.LayerEntry(d.precision, d.reason, d.detail, d.excluded)
                                       for k, d in ds.items()}, target=target, scaler=scaler)

    return verify(model, [batch], loss_fn, decisions, order, fp32, bound=bound, scaler=None, make_policy=make_policy,
                  device_type="cpu", optimizer=optimizer, seed=0)


def test_a_real_underflow_failure_is_backed_off_most_sensitive_first_despite_the_noise_floor():
    """FP16 gradients that flush to zero stall training: the gap is far beyond the floor FP32 shows from
    FP16-rounded weights, so the layers go back to FP32 one round at a time, the most sensitive first."""
    model, batch, loss_fn = underflow_model()
    res = _verify(model, batch, loss_fn, {"fc1": "fp16", "fc2": "fp16"}, ["fc1", "fc2"],
                  optimizer=underflow_optimizer)
    v = res.verification
    assert v.passed and v.rounds == 3
    assert [res.decisions[k].precision for k in ("fc1", "fc2")] == ["fp32", "fp32"]
    assert "round 1" in res.decisions["fc2"].detail and "round 2" in res.decisions["fc1"].detail  # fc2 first
    assert 0 < v.noise_floor < v.bound  # measured (the first gap exceeded the bound), and it explains nothing here
    for d in res.decisions.values():
        assert d.reason == "verification back-off" and not d.excluded  # not a numerical reason measured on it
        assert "this layer itself was not measured to fail" in d.detail
    # round 3 had nothing left to compare: not trained, and not called a pass of a comparison
    assert v.nothing_cast and v.policy_losses == () and v.max_gap == 0.0 and v.measured_fraction is None
    assert v.note.startswith("nothing left cast after back-off: rounds 1-2 compared cast policies with FP32 and "
                             "failed (round 2: loss gap ")
    assert res.passes == 6 * 2 + 6  # two policy runs and the noise floor's: no run in round 3


def test_a_non_finite_policy_run_backs_off_the_hazard_and_keeps_the_rest():
    """The RMSNorm overflows FP16 (NaN loss, an infinite gap no floor explains): the most sensitive layer, the
    norm, is backed off in round 1 and the BF16 Linears stay cast."""
    model, batch, loss_fn = rmsnorm_model(batch_size=64)
    res = _verify(model, batch, loss_fn, {"fc1": "bf16", "norm": "fp16", "fc2": "bf16"}, ["fc1", "fc2", "norm"])
    v = res.verification
    assert v.passed and v.rounds == 2 and v.max_gap <= v.threshold
    assert res.decisions["norm"].precision == "fp32" and "round 1" in res.decisions["norm"].detail
    assert res.decisions["fc1"].precision == res.decisions["fc2"].precision == "bf16"


def test_noisy_training_passes_on_its_noise_floor_without_back_off():
    """Adam at lr 0.05 makes the curve chaotic: FP32 from BF16-rounded weights drifts as far as the policy does.
    A gap over the bound that the floor explains is not a precision failure: no back-off, and both are reported."""
    model, batch, loss_fn = mlp(batch_size=512)
    policy = autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=20,
                           optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05))
    v = policy.verification
    assert v.passed and v.rounds == 1
    assert v.max_gap > v.bound  # the bound alone would have backed layers off
    assert v.threshold == 2 * v.noise_floor >= v.max_gap
    assert policy.low_precision_fraction() > 0.9
    assert not any(e.reason == "verification back-off" for e in policy.layers.values())
    assert f"noise floor {v.noise_floor:.3g}" in policy.report()


def _deep_tanh(depth: int = 12) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    return nn.Sequential(*layers), torch.randn(128, 64)


def _failing(**kw):
    """A verification that cannot pass: a bound of 1e-9, below what 8 rounds of back-off reach on 12 layers."""
    model, x = _deep_tanh()
    return autoprec.tune(model, x, target="cuda", dtypes=["bf16"], progress=False, verify_tolerance=1e-9,
                         verify_steps=5, **kw)


def test_a_failed_verification_warns_and_says_so_first():
    """Never a silent failure: a VerificationWarning with the figures, FAILED on the report's first line, and the
    backed-off layers listed as back-offs, not as measured exclusions."""
    with pytest.warns(autoprec.VerificationWarning, match=r"the tuned policy FAILED verification after 8 round\(s\): "
                      r"largest loss gap .* against a threshold of .*It is the safest policy found, not a verified"):
        policy = _failing()
    v = policy.verification
    assert not v.passed and v.rounds == 8 and v.max_gap > v.threshold
    first = policy.report().splitlines()[0]
    assert first.startswith("# autoprec policy report: FAILED verification (loss gap")
    backed = [k for k, e in policy.layers.items() if e.reason == "verification back-off"]
    assert backed and policy.excluded() == {}
    assert "## Layers moved to FP32 by verification back-off" in policy.report()
    page = policy.report("html")
    assert "<h1>autoprec policy report: FAILED verification</h1>" in page
    assert "<h2>Layers moved to FP32 by verification back-off</h2>" in page and f"<td>{backed[0]}</td>" in page
    assert {k for k, e in json.loads(policy.report("json"))["backed_off"].items()} == set(backed)


def test_strict_raises_with_the_policy_attached():
    """strict=True: VerificationError (a RuntimeError) carrying the unverified policy."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", autoprec.VerificationWarning)  # strict raises instead of warning
        with pytest.raises(autoprec.VerificationError, match="FAILED verification after 8 round") as info:
            _failing(strict=True)
    assert isinstance(info.value, RuntimeError)
    assert info.value.policy.verification.passed is False


def _forty_layers() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(40):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    return nn.Sequential(*layers), torch.randn(256, 128)


def test_fp32_that_diverges_with_the_verification_optimizer_is_a_model_error():
    """40 x (Linear + ReLU) under Adam(eps=1e-30) diverges in FP32 itself: tune names the optimizer and the fix
    instead of backing off layers against a NaN reference."""
    model, x = _forty_layers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(autoprec.ModelError, match=r"FP32 training diverged in verification: the loss is nan at step "
                       r"1 of 3 .*with the verification optimizer Adam\(lr=0.001, eps=1e-30, betas=\(0.9, 0.999\), "
                       r"weight_decay=0\).*tune\(\.\.\., optimizer=.*verify_steps=0"):
        autoprec.tune(model, x, target="cuda", dtypes=["bf16"], progress=False, verify_steps=3,
                      optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3, eps=1e-30))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_default_verification_optimizer_trains_the_forty_layer_model():
    """The default optimizer (torch's Adam defaults) keeps FP32 finite there, and the policy verifies in round 1."""
    model, x = _forty_layers()
    policy = autoprec.tune(model, x, target="cuda", dtypes=["bf16"], progress=False, verify_steps=5)
    v = policy.verification
    assert v.passed and v.rounds == 1
    assert policy.low_precision_fraction() == 1.0
