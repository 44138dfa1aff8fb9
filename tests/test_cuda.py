"""CUDA behaviour (skipped without a GPU; CI has none)."""

from __future__ import annotations

import warnings

import pytest
import torch

import autoprec
from tests.models import rmsnorm_model, transformer_block

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_tune_on_cuda_uses_real_autocast_and_a_cuda_scaler():
    """On a GPU the policy runs real FP16/BF16 autocast and hands out a CUDA GradScaler."""
    model, batch, loss_fn = transformer_block(batch_size=8)
    model, batch = model.cuda(), batch.cuda()
    policy = autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=5)
    assert policy.target == "cuda" and policy.low_precision_fraction() >= 0.9
    with policy.autocast(model):
        loss = loss_fn(model(batch), batch)
    assert torch.isfinite(loss)
    assert "fp16" in policy.assignment.values() and policy.scaler is not None  # FP16 pays on a GPU: it is used
    with warnings.catch_warnings():
        warnings.simplefilter("error", autoprec.DeviceWarning)  # tuned on this device: no warning
        scaler = policy.grad_scaler()
    assert scaler.is_enabled() and scaler._device == "cuda"
    assert scaler.get_scale() == policy.scaler.init_scale
    assert scaler.get_growth_interval() == policy.scaler.growth_interval


def test_rmsnorm_hazard_on_cuda_is_excluded_from_fp16():
    """The hand-written RMSNorm stays out of FP16 on the GPU: CUDA autocast computes its pow and rsqrt in FP32, so
    its output comes back FP32 and 16-bit gains nothing, as the CPU's emulation of CUDA finds (test_emulation)."""
    model, batch, loss_fn = rmsnorm_model(batch_size=256)
    model, batch = model.cuda(), batch.cuda()
    policy = autoprec.tune(model, batch, lambda o, b: loss_fn(o.cpu(), b.cpu()), progress=False, verify_steps=5)
    assert policy.layers["norm"].precision != "fp16"
    assert policy.layers["norm"].reason == "no gain" and not policy.emulated


def test_calibration_on_the_gpu_measures_every_format(tmp_path):
    """On a GPU, calibrate times FP32, FP16 and BF16 (synchronised), records the compute capability, and
    the profile file it writes prices a CUDA-target tune, which says where its figures came from."""
    from autoprec.device import save_profile

    p = autoprec.calibrate("cuda", dtypes=["fp16", "bf16"], seconds=2.0, cache=False)
    assert p.target == "cuda" and p.capability.startswith("sm_") and p.formats == ("fp32", "fp16", "bf16")
    assert all(t > 0 for c in p.curves for s in c.seconds.values() for t in s)
    path = tmp_path / "gpu.json"
    save_profile(p, path)
    model, batch, loss_fn = transformer_block(batch_size=8)
    policy = autoprec.tune(model, batch, loss_fn, target="cuda", profile=str(path), progress=False, verify_steps=0)
    assert policy.stats["profile_origin"] == "file" and policy.stats["capability"] == p.capability
