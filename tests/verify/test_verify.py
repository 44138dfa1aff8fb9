"""Verification: a finite FP32 reference, a measured noise floor, honest back-off, and loud failure."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import autoprec
from autoprec.probe import default_optimizer, train_curve
from autoprec.search import Decision
from autoprec.verify import compare, judge, verify
from tests.models import mlp, rmsnorm_model, underflow_model, underflow_optimizer, unverifiable_tanh


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


def test_a_layer_joined_to_its_neighbours_is_backed_off_after_them():
    """The Tanh between two Linears was joined to their FP16 (it is not in the search's order): once both are
    backed off, it goes too, labelled as a joined layer, instead of ending verification with an FP16 Tanh whose
    backward flushes the tiny gradients of a 1e-12-scaled loss to zero between two FP32 layers."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 64))
        x, target = torch.randn(256, 256), torch.randn(256, 64)
    res = _verify(model, x, lambda out, b: torch.nn.functional.mse_loss(out.float(), target) * 1e-12,
                  {"0": "fp16", "1": "fp16", "2": "fp16"}, ["0", "2"], optimizer=underflow_optimizer)
    assert [res.decisions[k].precision for k in ("0", "1", "2")] == ["fp32"] * 3
    joined = res.decisions["1"]
    assert joined.reason == "verification back-off" and "it had joined 16-bit neighbours" in joined.detail
    assert "round 3" in joined.detail and res.verification.nothing_cast and res.verification.rounds == 4


def test_a_non_finite_policy_run_backs_off_the_hazard_and_keeps_the_rest():
    """The RMSNorm overflows FP16 (NaN loss, an infinite gap no floor explains): the most sensitive layer, the
    norm, is backed off in round 1 and the BF16 Linears stay cast."""
    model, batch, loss_fn = rmsnorm_model(batch_size=64)
    res = _verify(model, batch, loss_fn, {"fc1": "bf16", "norm": "fp16", "fc2": "bf16"}, ["fc1", "fc2", "norm"])
    v = res.verification
    assert v.passed and v.rounds == 2 and v.max_gap <= v.threshold
    assert res.decisions["norm"].precision == "fp32" and "round 1" in res.decisions["norm"].detail
    assert res.decisions["fc1"].precision == res.decisions["fc2"].precision == "bf16"


@pytest.mark.parametrize("gap, floor, skip_run, passed, threshold", [
    (0.03, 0.0, 0, True, 0.05),        # within the bound: the floor is never needed
    (0.08, 0.0, 0, False, 0.05),       # over the bound, no floor measured (or none found)
    (0.08, 0.045, 0, True, 0.09),      # over the bound, but twice the floor explains it
    (0.10, 0.045, 0, False, 0.09),     # beyond twice the floor: a precision failure
    (0.03, 0.0, 3, False, 0.05),       # a run of skipped scaler steps fails whatever the gap
    (math.inf, 10.0, 0, False, 20.0),  # a non-finite loss: no floor explains it
], ids=["within-bound", "over-bound", "floor-explains", "beyond-floor", "skip-run", "non-finite"])
def test_the_verdict_rule_on_given_gaps_and_floors(gap, floor, skip_run, passed, threshold):
    """The verdict: within max(bound, 2 x noise floor) and no run of 3 skipped steps, on given figures."""
    assert judge(gap, bound=0.05, floor=floor, longest_skip_run=skip_run) == (passed, threshold)


def test_the_verdict_on_given_curves():
    """A chaotic policy curve over the bound passes on a floor that explains it, and fails on a smaller one."""
    fp32 = [2.0, 1.6, 1.3, 1.25, 1.4]
    policy = [2.0, 1.62, 1.45, 1.1, 1.5]  # largest gap 0.15 at step 2 and 3: 0.075 of the first loss
    gap = compare(fp32, policy)
    assert gap == 0.075
    assert judge(gap, bound=0.05, floor=0.04, longest_skip_run=0) == (True, 0.08)
    assert judge(gap, bound=0.05, floor=0.03, longest_skip_run=0) == (False, 0.06)
    assert compare(fp32, policy[:3]) == math.inf  # a run cut short is a failure, not a short comparison


def test_noisy_training_is_judged_on_its_measured_noise_floor():
    """Adam at lr 0.05 makes the curve chaotic: where the gap passes the bound, the floor is measured and the
    verdict, the threshold and the report follow the rule from it (whatever the figures on this CPU)."""
    model, batch, loss_fn = mlp(batch_size=512)
    policy = autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=20,
                           optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05))
    v = policy.verification
    assert policy.low_precision_fraction() > 0  # a 16-bit policy was trained, so a floor can be measured
    assert v.threshold == max(v.bound, 2 * v.noise_floor)
    assert v.max_gap <= v.bound or v.noise_floor > 0  # a gap over the bound always measured the floor
    assert v.passed == (v.max_gap <= v.threshold and v.longest_skip_run < 3)
    if v.noise_floor:
        assert f"noise floor {v.noise_floor:.3g}" in policy.report()


def _failing(**kw):
    """A verification that cannot pass on any CPU: weights already BF16 values make the noise floor exactly 0 (FP32
    from BF16-rounded weights is the FP32 run itself), so the threshold is the bound of 1e-9, and the 2 layers
    still BF16 after 8 rounds of back-off on 12 (3, 2, then 1 a round) leave a gap that no CPU rounds to 1e-9."""
    model, x = unverifiable_tanh()
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
    assert v.noise_floor == 0.0 and v.threshold == 1e-9  # by construction, on every CPU
    first = policy.report().splitlines()[0]
    assert first.startswith("# autoprec policy report: FAILED verification (loss gap")
    backed = [k for k, e in policy.layers.items() if e.reason == "verification back-off"]
    assert backed and policy.excluded() == {}
    assert "## Layers moved to FP32 by a back-off" in policy.report()
    page = policy.report("html")
    assert "<h1>autoprec policy report: FAILED verification</h1>" in page
    assert "<h2>Layers moved to FP32 by a back-off</h2>" in page and f"<td><code>{backed[0]}</code></td>" in page
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


def test_a_failing_fp16_policy_tries_bf16_before_fp32():
    """The first failing round moves every FP16 layer whose BF16 the probe found safe to BF16 at once (no layer
    to FP32 yet); later rounds back off as before. Weights and batch are BF16 and FP16 values at once (no FP16
    subnormals), so the noise floor is exactly 0 in either format and any 16-bit layer fails the 1e-9 bound."""
    model, x = unverifiable_tanh()
    with torch.no_grad():
        for p in model.parameters():
            p.masked_fill_(p.abs() < 2.0 ** -13, 0.0)  # what is left is normal in FP16: exact there
    with pytest.warns(autoprec.VerificationWarning):
        policy = autoprec.tune(model, x, target="cuda", dtypes=["fp16", "bf16"], progress=False,
                               verify_tolerance=1e-9, verify_steps=3)
    details = [e.detail for e in policy.layers.values()]
    # the Linears and the Tanh layers that joined them in FP16: all moved to BF16 in round 1, none to FP32 then
    assert all("moved from fp16 to bf16 by verification round 1:" in d for d in details)
    assert not any("moved to FP32 by verification round 1" in d for d in details)
    assert {e.precision for e in policy.layers.values()} <= {"bf16", "fp32"} and policy.scaler is None
    assert policy.verification.rounds == 8 and policy.verification.noise_floor == 0.0
