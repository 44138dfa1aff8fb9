"""What FP8 saves per nn.Linear (torchao's roofline with a profile's figures), and the profile's FP8 GEMM figures."""

from __future__ import annotations

import dataclasses
import math
import os
import time

import pytest
import torch
from torch import nn

import autoprec
from autoprec.device import (
    FP8_COST_RECIPES,
    Clock,
    Curve,
    compute_bound,
    estimate,
    fp8_price,
    gemm_dims,
    load_profile,
    profile_from_dict,
    profile_to_dict,
    roofline,
    save_profile,
)
from autoprec.device._fp8_timing import fp8_capable, with_fp8
from autoprec.errors import OptionError, ProfileError
from autoprec.trace import Layer, trace
from autoprec.trace._rescale import rescaled

PINNED_CPU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "cpu_profile.json")
H100 = estimate("cuda", tf32=False)


def _linear(m: int, k: int, n: int, calls: int = 1) -> Layer:
    return Layer("fc", "module", "Linear", (), ("linear",), ((m, k),), ((m, n),), flops=2 * m * k * n * calls,
                 in_numel=m * k * calls, out_numel=m * n * calls, work_numel=m * n * calls, param_numel=k * n + n,
                 calls=calls)


@pytest.mark.parametrize("recipe", FP8_COST_RECIPES)
def test_a_small_linear_does_not_pay_and_the_note_names_its_small_sides(recipe):
    price = fp8_price(_linear(256, 64, 64), H100, recipe)
    assert not price.pays and price.fp8 > price.bf16 and price.speedup < 1
    assert price.note.startswith("no gain: K=64, N=64")


@pytest.mark.parametrize("recipe", FP8_COST_RECIPES)
def test_a_large_linear_pays_within_torchaos_published_range(recipe):
    """torchao's docs: FP8 Linear speedups over BF16 of about 1.2x to 1.6x at large shapes on an H100."""
    price = fp8_price(_linear(8192, 4096, 4096), H100, recipe)
    assert price.pays and price.saving > 0
    assert 1.2 <= price.speedup <= 1.6
    assert price.note == f"FP8 {price.speedup:.2f}x faster ({recipe}, M=8192, K=4096, N=4096)"
    assert price.fp8 == pytest.approx(price.gemms + price.casts)


def test_a_bf16_weight_gradient_gains_less_than_tensorwise_at_the_same_shape():
    tensorwise, gw_hp = (fp8_price(_linear(8192, 4096, 4096), H100, r) for r in ("tensorwise", "rowwise_with_gw_hp"))
    assert gw_hp.bf16 == tensorwise.bf16
    assert gw_hp.gemms > tensorwise.gemms  # its grad-weight GEMM stays BF16
    assert gw_hp.casts < tensorwise.casts  # and casts less
    assert gw_hp.speedup < tensorwise.speedup


def test_the_speedup_grows_with_the_linear_and_tends_to_the_gemm_rate_ratio():
    speedups = [fp8_price(_linear(8192, d, d), H100).speedup for d in (256, 512, 1024, 2048, 4096, 8192, 16384)]
    assert speedups == sorted(speedups) and len(set(speedups)) == len(speedups)
    assert speedups[0] < 1 < speedups[-1] < 2  # 989 -> 1979 TFLOP/s bounds the GEMMs' gain


def test_the_casts_follow_torchaos_kernels_byte_for_byte():
    """Where every cast kernel is bandwidth-bound, casts = bytes / bandwidth, with torchao's byte counts."""
    m, k, n = 16384, 8192, 8192
    bandwidth = 1e12
    p = roofline(fp32_flops=1e14, low_speedup=8.0, fp8_speedup=16.0, bandwidth=bandwidth, launch=0.0, region=0.0)
    x, w, g = m * k, k * n, m * n
    expected = {"tensorwise": (2 * x + 4 * x) + (2 * w + 3 * w + 3 * w) + (2 * g + 4 * g),
                "rowwise": (5 * x + 3 * x) + (3 * w + 4 * w + 3 * w) + (5 * g + 3 * g),
                "rowwise_with_gw_hp": 3 * x + (3 * w + 3 * w) + 3 * g}
    for recipe, nbytes in expected.items():
        assert fp8_price(_linear(m, k, n), p, recipe).casts == pytest.approx(nbytes / bandwidth)
    fused = fp8_price(_linear(m, k, n), p, "tensorwise", fused=True)  # amax reads of input and grad_output fused
    assert fused.casts == pytest.approx((expected["tensorwise"] - 2 * x - 2 * g) / bandwidth)


def test_each_cast_kernel_costs_a_launch_at_least():
    p = roofline(fp32_flops=1e14, low_speedup=8.0, fp8_speedup=16.0, bandwidth=1e18, launch=1e-5, region=0.0)
    kernels = {"tensorwise": 10, "rowwise": 7, "rowwise_with_gw_hp": 5}
    for recipe, count in kernels.items():
        assert fp8_price(_linear(64, 64, 64), p, recipe).casts == pytest.approx(count * 1e-5)


def test_a_cpu_never_pays_and_says_so():
    cpu = load_profile(PINNED_CPU)
    assert not cpu.fp8
    for shape in ((256, 64, 64), (8192, 4096, 4096)):
        price = fp8_price(_linear(*shape), cpu)
        assert not price.pays and price.fp8 == math.inf and price.speedup == 0.0 and price.bf16 > 0
        assert price.note == "no FP8 on cpu: a CPU has no FP8 GEMMs"


def test_a_gpu_profile_without_fp8_figures_never_pays_and_says_how_to_get_them():
    a100 = roofline(fp32_flops=19.5e12, low_speedup=16.0, bandwidth=2e12, launch=5e-6, region=2e-5)
    price = fp8_price(_linear(8192, 4096, 4096), a100)
    assert not a100.fp8 and not price.pays
    assert price.note == ("no FP8 on cuda: the profile has no FP8 GEMM figures (a GPU below sm_89, or calibrated "
                          "without them: re-run `autoprec calibrate` on an sm_89+ GPU)")


def test_a_linear_whose_sides_are_not_multiples_of_16_never_pays():
    price = fp8_price(_linear(8192, 4100, 4096), H100)
    assert not price.pays and price.fp8 == math.inf
    assert price.note == "no FP8: K=4100 not a multiple of 16 (torch._scaled_mm's FP8 GEMMs need K and N so)"


def test_the_estimates_price_fp8_gemms_at_twice_their_16_bit_rate_and_keep_their_formats():
    for p in (H100, compute_bound()):
        gemm = p.curves[0]
        assert p.fp8 and p.formats == ("fp32", "fp16", "bf16")
        assert sorted(c.kind for c in p.curves if "fp8" in c.seconds) == ["matmul"]
        bf16, fp8 = gemm.seconds["bf16"], gemm.seconds["fp8"]
        assert (bf16[-1] - bf16[0]) / (fp8[-1] - fp8[0]) == pytest.approx(2.0, rel=2e-3)  # 1979/989 on the H100
    fp8, flops = H100.curves[0].seconds["fp8"], H100.curves[0].flops
    assert (fp8[-1] - fp8[0]) / (flops[-1] - flops[0]) == pytest.approx(3 / 1979e12)  # 3 GEMMs at 1979 TFLOP/s


def test_a_profile_file_round_trips_its_fp8_figures(tmp_path):
    path = tmp_path / "h100.json"
    save_profile(H100, path)
    back = load_profile(path)
    assert back.fp8 and back.curves[0].seconds["fp8"] == H100.curves[0].seconds["fp8"]
    assert fp8_price(_linear(8192, 4096, 4096), back) == fp8_price(_linear(8192, 4096, 4096), H100)


def test_a_profile_file_without_fp8_still_loads():
    data = profile_to_dict(H100)
    del data["curves"][0]["seconds"]["fp8"]
    old = profile_from_dict(data)
    assert not old.fp8 and old.formats == H100.formats
    assert not fp8_price(_linear(8192, 4096, 4096), old).pays


def test_a_profile_file_with_fp8_outside_the_matmul_curve_is_refused():
    data = profile_to_dict(H100)
    conv = next(c for c in data["curves"] if c["kind"] == "conv")
    conv["seconds"]["fp8"] = conv["seconds"]["bf16"]
    with pytest.raises(ProfileError, match=r"field 'curves\[1\]\.seconds' is \['bf16', 'fp16', 'fp32', 'fp8'\]"):
        profile_from_dict(data)


def test_decreasing_fp8_times_in_a_file_are_refused():
    data = profile_to_dict(H100)
    data["curves"][0]["seconds"]["fp8"][3] = 1.0
    with pytest.raises(ProfileError, match=r"curves\[0\]\.seconds\.fp8.*times that do not decrease"):
        profile_from_dict(data)


def test_the_shapes_come_from_the_trace_rescaled_to_the_training_batch():
    model = nn.Sequential(nn.Linear(64, 128))
    small = trace(model, torch.randn(2, 16, 64), device_type="cpu")
    big = rescaled(small, 2, 512).layers[0]
    assert gemm_dims(small.layers[0]) == (32, 64, 128) and gemm_dims(big) == (8192, 64, 128)
    assert fp8_price(big, H100).bf16 > fp8_price(small.layers[0], H100).bf16


def test_a_linear_called_twice_costs_twice_one_call():
    once, twice = fp8_price(_linear(4096, 4096, 4096), H100), fp8_price(_linear(4096, 4096, 4096, calls=2), H100)
    assert gemm_dims(_linear(4096, 4096, 4096, calls=2)) == (4096, 4096, 4096)
    assert (twice.bf16, twice.fp8) == pytest.approx((2 * once.bf16, 2 * once.fp8))


def test_what_is_not_a_linear_or_not_a_recipe_is_refused():
    norm = Layer("ln", "module", "LayerNorm", (), ("layer_norm",), ((8, 4),), ((8, 4),), flops=0, in_numel=32,
                 out_numel=32, work_numel=32, param_numel=8, calls=1)
    with pytest.raises(OptionError, match=r"layer 'ln' \(LayerNorm, ops \['layer_norm'\], 0 FLOPs\) is not an "
                                          r"nn.Linear with matmul FLOPs: .*pass the Layer of an nn.Linear"):
        fp8_price(norm, H100)
    with pytest.raises(OptionError, match=r"unknown FP8 recipe 'delayed': use one of tensorwise, rowwise, "
                                          r"rowwise_with_gw_hp"):
        fp8_price(_linear(64, 64, 64), H100, "delayed")


def test_timing_fp8_gemms_fills_the_matmul_curve_and_survives_a_file(tmp_path):
    """The calibration's FP8 code path, run on this CPU (``torch._scaled_mm`` emulates there: no figure)."""
    cpu = torch.device("cpu")
    ladder = Curve("matmul", (2.0 * 16 ** 3, 2.0 * 32 ** 3, 2.0 * 64 ** 3),
                   {"fp32": (1e-5, 2e-5, 4e-5), "fp16": (1e-5, 1e-5, 2e-5), "bf16": (1e-5, 1e-5, 2e-5)})
    base = dataclasses.replace(H100, curves=(ladder, *H100.curves[1:]))
    timed = with_fp8(base, Clock(cpu, time.perf_counter() + 0.3), cpu, torch.Generator().manual_seed(0))
    fp8 = timed.curves[0].seconds["fp8"]
    assert len(fp8) == 3 and all(t > 0 for t in fp8) and list(fp8) == sorted(fp8)
    assert timed.curves[1:] == H100.curves[1:]
    save_profile(timed, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json").curves[0].seconds["fp8"] == fp8


def test_a_cpu_calibration_times_no_fp8():
    assert not fp8_capable(torch.device("cpu"))
    assert not autoprec.calibrate("cpu", seconds=0.3, cache=False).fp8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrating_cuda_times_fp8_gemms_where_the_gpu_has_them():
    device = torch.device("cuda")
    profile = autoprec.calibrate(device, seconds=2.0, cache=False)
    major, minor = torch.cuda.get_device_capability(device)
    assert fp8_capable(device) == ((major, minor) >= (8, 9))
    assert profile.fp8 == fp8_capable(device)
    gemm = profile.curves[0]
    if profile.fp8:
        assert len(gemm.seconds["fp8"]) == len(gemm.flops) and all(t > 0 for t in gemm.seconds["fp8"])
        big = fp8_price(_linear(8192, 4096, 4096), profile)
        assert big.gemms > 0 and big.casts > 0 and math.isfinite(big.fp8)
    else:
        assert "fp8" not in gemm.seconds
