"""Acceptance tests of ``autoprec.tune`` on the hazard models: blanket autocast breaks them, the policy does not.

Each hazard model is first shown broken under blanket ``torch.autocast("cpu", dtype=torch.float16)``;
then ``autoprec.tune`` must keep the hazardous layer out of the format that breaks it, and running
the model under ``policy.autocast`` must stay within the policy's own error bound against FP32.
On a CPU a policy's FP16 layers run emulated (FP16 operands, FP32 accumulation), as tensor cores do.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

import autoprec
from autoprec.policy import scaler_for
from tests.helpers import cached, forward_backward, rel_errors
from tests.models import (
    call_model,
    cnn,
    mlp,
    rmsnorm_model,
    rotary_model,
    scatter_gnn,
    transformer_block,
    underflow_model,
    underflow_optimizer,
    unscaled_attention,
)

HAZARDS = {
    "scatter_gnn": scatter_gnn,
    "rmsnorm_model": rmsnorm_model,
    "unscaled_attention": unscaled_attention,
    "rotary_model": rotary_model,
}
SAFE = {"mlp": mlp, "cnn": cnn, "transformer_block": transformer_block}

# the layers that blanket FP16 autocast breaks, per hazard model
HAZARDOUS_LAYERS = {
    "scatter_gnn": ("conv1::index_put", "conv2::index_put"),
    "rmsnorm_model": ("norm",),
    "unscaled_attention": ("attn::matmul", "attn::softmax"),
}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@cached
def tuned(name: str, dtypes: tuple[str, ...] = ("fp16", "bf16"), target: str | None = "cuda") -> autoprec.Policy:
    """Tune a fresh copy of a factory model once per (model, dtypes, target) for the whole module."""
    factories = {**HAZARDS, **SAFE}
    model, batch, loss_fn = factories[name]()
    return autoprec.tune(model, batch, loss_fn, dtypes=list(dtypes), target=target, progress=False, verify_steps=5)


def measured(detail: str, fmt: str) -> tuple[float, float] | None:
    """The ``(loss err, grad err)`` a layer's evidence text records for ``fmt``, if any."""
    m = re.search(rf"{fmt}: loss err ([0-9.eE+\-inf]+), grad err ([0-9.eE+\-inf]+)", detail)
    return (float(m.group(1)), float(m.group(2))) if m else None


# ---------------------------------------------------------------------------
# blanket autocast breaks the hazard models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HAZARDOUS_LAYERS), ids=list(HAZARDOUS_LAYERS))
def test_blanket_fp16_autocast_breaks_hazard_model(name):
    """Blanket FP16 autocast gives a non-finite loss/gradient or a >10% error against FP32."""
    model, batch, loss_fn = HAZARDS[name]()
    ref_loss, ref_grad = forward_backward(model, batch, loss_fn)
    loss, grad = forward_backward(model, batch, loss_fn, blanket=torch.float16)
    loss_err, grad_err, finite = rel_errors(loss, grad, ref_loss, ref_grad)
    assert not finite or loss_err > 0.1 or grad_err > 0.1, (loss_err, grad_err)


# ---------------------------------------------------------------------------
# the tuned policy keeps the hazardous layers out of the format that breaks them
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", HAZARDOUS_LAYERS["scatter_gnn"], ids=HAZARDOUS_LAYERS["scatter_gnn"])
def test_scatter_gnn_index_put_excluded_for_overflow(key):
    """The hub's scatter-sum stays FP32, excluded for overflow, with the FP16 non-finite count as evidence."""
    entry = tuned("scatter_gnn").layers[key]
    assert entry.precision == "fp32"
    assert entry.excluded
    assert entry.reason == "overflow"
    assert "accumulation" in entry.hazards
    assert re.search(r"fp16: \d+ non-finite outputs", entry.detail), entry.detail
    assert key in tuned("scatter_gnn").excluded()


@pytest.mark.parametrize("key", HAZARDOUS_LAYERS["scatter_gnn"], ids=HAZARDOUS_LAYERS["scatter_gnn"])
def test_scatter_gnn_index_put_not_bf16_either(key):
    """BF16 is no answer for the scatter-sum: its measured error (in the evidence) exceeds the bound."""
    policy = tuned("scatter_gnn")
    entry = policy.layers[key]
    assert entry.precision != "bf16"
    errs = measured(entry.detail, "bf16")
    assert errs is not None, entry.detail
    assert errs[0] > policy.tolerance["loss"] or errs[1] > policy.tolerance["grad"], errs


def test_rmsnorm_norm_not_fp16():
    """The hand-written RMSNorm (x.pow(2) > 65504) never runs in FP16."""
    assert tuned("rmsnorm_model").layers["norm"].precision != "fp16"


def test_rmsnorm_for_cuda_gains_nothing_in_16_bit_as_cuda_autocast_runs_it():
    """Tuned for CUDA (emulated on this CPU): fc1 goes to FP16; the hand-written RMSNorm does not overflow, since
    CUDA autocast computes pow, rsqrt and the weight's product in FP32 in either format, but its output comes back
    FP32, so 16-bit would only add casts: FP32 for no gain, not excluded, and the evidence says it is emulated."""
    policy = tuned("rmsnorm_model")
    assert policy.emulated
    assert policy.layers["fc1"].precision == "fp16"
    norm = policy.layers["norm"]
    assert norm.precision == "fp32" and norm.reason == "no gain" and not norm.excluded, norm.detail
    assert "fp16: it computes in FP32 itself" in norm.detail and "bf16: it computes in FP32 itself" in norm.detail
    assert norm.measured["fp16"]["nonfinite"] == 0
    assert "evidence **emulated**" in policy.report()


def test_rmsnorm_for_the_cpu_in_fp16_overflows():
    """Tuned for the CPU with FP16 offered, the norm runs its pow in real FP16 there (CPU autocast leaves pow
    alone): it overflows, and the evidence names it, measured natively (not emulated)."""
    policy = tuned("rmsnorm_model", ("fp16",), "cpu")
    assert not policy.emulated
    norm = policy.layers["norm"]
    assert norm.precision == "fp32" and norm.reason == "overflow" and norm.excluded
    assert "fp16: non-finite" in norm.detail


@pytest.mark.parametrize("key", HAZARDOUS_LAYERS["unscaled_attention"], ids=HAZARDOUS_LAYERS["unscaled_attention"])
def test_unscaled_attention_scores_not_fp16(key):
    """The unscaled scores matmul and the softmax that reads them are not FP16; FP16's non-finite count is the evidence."""
    entry = tuned("unscaled_attention").layers[key]
    assert entry.precision != "fp16"
    if entry.precision == "fp32":
        assert entry.excluded and entry.reason == "overflow", (entry.reason, entry.detail)
        assert re.search(r"fp16: \d+ non-finite outputs", entry.detail), entry.detail


def test_rotary_rope_gets_fp16():
    """The rotary angle table runs in FP16 (which holds positions up to 2048), not BF16."""
    assert tuned("rotary_model").layers["rope"].precision == "fp16"


def test_rotary_rope_bf16_error_above_bound():
    """Offered BF16 alone, the tuner excludes rope and records BF16's measured error above the bound."""
    policy = tuned("rotary_model", ("bf16",))
    entry = policy.layers["rope"]
    assert entry.precision == "fp32" and entry.excluded
    assert entry.reason in ("error at loss", "error at gradients")
    errs = measured(entry.detail, "bf16")
    assert errs is not None, entry.detail
    assert errs[0] > policy.tolerance["loss"] or errs[1] > policy.tolerance["grad"], errs


def test_rotary_rope_records_bf16_error_above_bound():
    """With FP16 and BF16 offered, rope's probe figures record BF16's error above the bound and FP16's within it."""
    policy = tuned("rotary_model")
    figures = policy.layers["rope"].measured
    bf16, fp16 = figures["bf16"], figures["fp16"]
    tol = policy.tolerance
    assert bf16["loss_err"] > tol["loss"] or bf16["grad_err"] > tol["grad"], bf16
    assert fp16["loss_err"] <= tol["loss"] and fp16["grad_err"] <= tol["grad"], fp16


def test_rotary_rope_report_shows_bf16_rejection():
    """With FP16 and BF16 offered, rope's human-readable evidence (detail or report) shows BF16's error above the bound."""
    policy = tuned("rotary_model")
    entry = policy.layers["rope"]
    text = entry.detail + "\n" + policy.report()
    errs = measured(text, "bf16")
    assert errs is not None, entry.detail
    assert errs[0] > policy.tolerance["loss"] or errs[1] > policy.tolerance["grad"], errs


# ---------------------------------------------------------------------------
# running under the policy stays within the policy's bound
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2], ids=["held-out-1", "held-out-2"])
@pytest.mark.parametrize("name", list(HAZARDS), ids=list(HAZARDS))
def test_policy_run_within_tolerance_on_held_out_batches(name, seed):
    """Under ``policy.autocast``, on batches tune never saw (and their own loss targets), the loss and gradients
    are finite and within the policy's own bound, with no slack."""
    policy = tuned(name)
    model, _, _ = HAZARDS[name]()
    _, batch, loss_fn = HAZARDS[name](seed=seed)
    ref_loss, ref_grad = forward_backward(model, batch, loss_fn)
    loss, grad = forward_backward(model, batch, loss_fn, policy=policy)
    loss_err, grad_err, finite = rel_errors(loss, grad, ref_loss, ref_grad)
    assert finite
    assert loss_err <= policy.tolerance["loss"], loss_err
    assert grad_err <= policy.tolerance["grad"], grad_err
    assert policy.verification is not None and policy.verification.passed


# ---------------------------------------------------------------------------
# gradient underflow: the tuned loss scale trains where GradScaler defaults do not
# ---------------------------------------------------------------------------


def _train(model, batch, steps, *, autocast=None, scaler=None):
    opt = underflow_optimizer(model.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with autocast(model) if autocast is not None else torch.autocast("cpu", enabled=False):
            loss = call_model(model, batch)
        losses.append(float(loss.detach()))
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return losses


def test_underflow_model_policy_trains_where_default_scaler_does_not():
    """20 steps: FP32 and the tuned policy (its loss scale) train alike; FP16 autocast + GradScaler defaults does not."""
    model, batch, _ = underflow_model()
    policy = autoprec.tune(model, batch, None, dtypes=["fp16"], target="cuda", optimizer=underflow_optimizer,
                           progress=False, verify_steps=10)
    scaler = scaler_for(policy, "cpu")  # a CUDA policy emulated on this CPU (grad_scaler's warning: covered below)
    assert scaler is not None and scaler.is_enabled()
    assert scaler.get_scale() > 2.0 ** 16
    assert "fp16" in policy.assignment.values()

    fp32 = _train(copy.deepcopy(model), batch, 20)
    blanket = _train(copy.deepcopy(model), batch, 20,
                     autocast=lambda m: torch.autocast("cpu", dtype=torch.float16), scaler=torch.amp.GradScaler("cpu"))
    tuned_run = _train(copy.deepcopy(model), batch, 20, autocast=policy.autocast, scaler=scaler)

    assert fp32[0] == pytest.approx(tuned_run[0], rel=1e-3)
    assert fp32[-1] < 0.5 * fp32[0]
    assert tuned_run[-1] < 0.5 * tuned_run[0]
    assert abs(tuned_run[-1] - fp32[-1]) <= 0.05 * fp32[-1]
    assert blanket[-1] > 0.95 * blanket[0]


def test_grad_scaler_default_device_keeps_tuned_scale():
    """``policy.grad_scaler()`` without a device keeps the tuned scale, also for a CUDA policy on a host without CUDA
    (where it says, with a DeviceWarning, that the scaler is made for another device than the policy's)."""
    model, batch, _ = underflow_model()
    policy = autoprec.tune(model, batch, None, dtypes=["fp16"], target="cuda", optimizer=underflow_optimizer,
                           progress=False, verify_steps=0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # torch warns when it disables a GradScaler for a missing device
        scaler = policy.grad_scaler()
    kinds = {type(w.message) for w in seen}
    assert kinds == (set() if torch.cuda.is_available() else {autoprec.DeviceWarning}), [str(w.message) for w in seen]
    assert scaler is not None
    assert scaler.is_enabled() and scaler.get_scale() == policy.scaler.init_scale


# ---------------------------------------------------------------------------
# safe models: nearly all matmul/conv work goes to 16-bit, nothing is excluded
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", [None, "cuda"], ids=["cpu-default", "cuda"])
@pytest.mark.parametrize("name", list(SAFE), ids=list(SAFE))
def test_safe_model_mostly_16bit(name, target):
    """At least 90% of the matmul/conv FLOPs of a safe model run in 16-bit, with no numerical exclusion.

    For the CPU, at batch sizes where BF16 pays there (smaller layers are slower in a BF16 region).
    """
    big = {"mlp": {"batch_size": 1024}, "transformer_block": {"batch_size": 32}}
    model, batch, loss_fn = SAFE[name](**(big.get(name, {}) if target is None else {}))
    policy = autoprec.tune(model, batch, loss_fn, target=target, progress=False, verify_steps=5)
    assert policy.target == (target or "cpu")
    assert set(policy.formats) == ({"bf16"} if target is None else {"fp16", "bf16"})
    assert policy.low_precision_fraction() >= 0.9, policy.report()
    assert policy.excluded() == {}, policy.report()
    assert policy.verification is not None and policy.verification.passed
