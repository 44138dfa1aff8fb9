"""Which FP32 the user runs (issue 21, part 2): the speed of "fp32" differs 7x on an H100 between strict FP32 and
TF32, so the calibration's cache key, the profile and the built-in estimate carry it."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from autoprec.device import estimate
from autoprec.device._calibration import cache_file, fp32_kind, machine


@contextmanager
def _tf32(matmul: bool, conv: bool = True):
    """torch's TF32 flags set for the block, then back (they are properties of backend modules: monkeypatch cannot
    undo them)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_cpu_matmul_precision_other_than_highest_is_another_machine():
    """``torch.set_float32_matmul_precision("high")`` changes what an FP32 matmul may run as: it is in the
    capability and so in the cache file's name; back at "highest" the key is the default one again."""
    cpu = torch.device("cpu")
    before = torch.get_float32_matmul_precision()
    default_file, (_, default_cap) = cache_file(cpu), machine(cpu)
    try:
        torch.set_float32_matmul_precision("high")
        assert machine(cpu)[1] == default_cap + ", FP32 matmul precision high"
        assert cache_file(cpu) != default_file
    finally:
        torch.set_float32_matmul_precision(before)
    assert cache_file(cpu) == default_file and fp32_kind("cpu") == ""


def test_cuda_names_its_matmul_and_convolution_fp32():
    """On CUDA both flags are named (read from torch's backends, whether or not a GPU is here)."""
    with _tf32(matmul=True, conv=False):
        assert fp32_kind("cuda") == "FP32 matmuls TF32, convolutions strict"
    assert fp32_kind("cuda") == "FP32 matmuls strict, convolutions TF32"


def test_the_estimate_prices_the_fp32_the_process_runs():
    """Strict FP32 is 67 TFLOP/s on the H100 estimate, TF32 495: a large GEMM's 16-bit gain is ~13x against strict
    and under 2x against TF32; without ``tf32=`` the estimate follows torch's flag."""
    big = 3.9e10  # GPT-2 small's MLP GEMM at 8 x 1024 tokens

    def gain(p):
        return p.curves[0].at("fp32", big) / p.curves[0].at("bf16", big)
    strict, tf32 = estimate("cuda", tf32=False), estimate("cuda", tf32=True)
    assert 12 < gain(strict) < 14.8 and 1.5 < gain(tf32) < 2.0
    assert "strict, 67 TFLOP/s" in strict.device and "on TF32, 495 TFLOP/s" in tf32.device
    with _tf32(matmul=True):
        assert estimate("cuda").device == tf32.device
    assert estimate("cuda").device == strict.device
