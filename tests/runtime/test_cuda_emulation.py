"""The CPU's CUDA emulation against real CUDA autocast (skipped without a GPU; CI has none)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import FP32_OPS, NATIVE_OPS, unit_out

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPS = {**FP32_OPS, **NATIVE_OPS, "addcmul": lambda x: torch.addcmul(x, x, torch.ones(16)),
       "linear": lambda x: torch.nn.functional.linear(x, torch.ones(8, 16) / 16)}


def _on_gpu(fn, x: torch.Tensor, low: torch.dtype) -> torch.Tensor:
    """``fn`` as a 16-bit region runs it on the GPU: the input cast to ``low``, CUDA autocast on, CPU tensors
    made by ``fn`` itself (the ones, the zeros) moved along by a default device."""
    with torch.device("cuda"), torch.autocast("cuda", dtype=low):
        return fn(x.cuda().to(low))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", list(OPS), ids=list(OPS))
def test_emulated_op_matches_cuda_autocast(name, precision):
    """Each op in a 16-bit region: the emulation on the CPU gives CUDA autocast's dtype and its values."""
    low = torch.float16 if precision == "fp16" else torch.bfloat16
    x = torch.rand(4, 16) * 3 + 0.5
    emulated = unit_out(OPS[name], x, precision, "cuda")
    real = _on_gpu(OPS[name], x, low)
    assert emulated.dtype == real.dtype
    torch.testing.assert_close(emulated.float(), real.cpu().float(), rtol=2e-2, atol=1e-3)


def test_emulated_fp16_fft_matches_cufft():
    """rfft2 in FP16 at a power-of-two size: complex32 from both, values within FP16 rounding of the transform."""
    x = torch.randn(2, 16, 16)
    emulated = unit_out(torch.fft.rfft2, x, "fp16", "cuda")
    real = _on_gpu(torch.fft.rfft2, x, torch.float16)
    assert emulated.dtype == real.dtype == torch.complex32
    torch.testing.assert_close(torch.view_as_real(emulated).float(), torch.view_as_real(real).cpu().float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("precision", "size", "message"), [("fp16", 12, "powers of two"),
                                                             ("bf16", 16, "Unsupported dtype BFloat16")],
                         ids=["fp16-size-12", "bf16"])
def test_fft_the_gpu_refuses_is_refused_by_the_emulation(precision, size, message):
    """cuFFT refuses FP16 at a size other than a power of two, and BF16 at any: so does the emulation."""
    low = torch.float16 if precision == "fp16" else torch.bfloat16
    x = torch.randn(2, size, size)
    with pytest.raises(RuntimeError, match=message):
        _on_gpu(torch.fft.rfft2, x, low)
    with pytest.raises(RuntimeError, match=message):
        unit_out(torch.fft.rfft2, x, precision, "cuda")
