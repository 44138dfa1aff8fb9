"""The probe's per-pass error computation: the same figures as FP64 sums over every gradient, read with one
host transfer, and ranges that match a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from autoprec.probe import HIST_HI, HIST_LO, Runner, grad_norm, probe, relative_errors
from autoprec.trace import trace

_HOST_READS = {"item", "tolist", "__float__", "__bool__", "__int__"}


class _HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host (each one a device sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _HOST_READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _loop_errors(loss, grads, ref_loss, ref_grads):
    """The plain definition: one FP64 sum per parameter."""
    if not math.isfinite(float(loss)) or any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
        return math.inf, math.inf, False
    num = den = 0.0
    for g, r in zip(grads, ref_grads):
        if r is None:
            continue
        g = torch.zeros_like(r) if g is None else g
        num += float(((g.double() - r.double()) ** 2).sum())
        den += float((r.double() ** 2).sum())
    loss_err = float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12))
    return loss_err, (math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)), True


def _case(seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (0,), (8, 8, 3), (1,), (128,)]
    ref = [scale * torch.randn(s, generator=g) for s in shapes] + [None]
    got = [r + 1e-3 * scale * torch.randn(r.shape, generator=g) for r in ref[:-1]] + [torch.ones(3)]
    got[4] = None  # a parameter without a gradient in this pass: all of its reference counts as error
    return torch.tensor(2.5), got, torch.tensor(2.0), ref


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e25], ids=["unit", "tiny", "past-fp32-norm"])
def test_errors_match_fp64_sums_over_every_gradient(scale):
    """Loss and gradient errors equal the FP64 per-parameter definition, also where an FP32 norm would overflow."""
    loss, got, ref_loss, ref = _case(0, scale)
    want = _loop_errors(loss, got, ref_loss, ref)
    have = relative_errors(loss, [None if g is None else g.clone() for g in got], ref_loss, ref)
    assert have[2] is True and have[0] == pytest.approx(want[0], rel=1e-6)
    assert have[1] == pytest.approx(want[1], rel=1e-5) and 0 < have[1] < math.inf


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_a_non_finite_gradient_or_loss_is_not_finite(bad):
    """One non-finite gradient value, or a non-finite loss, gives (inf, inf, False)."""
    loss, got, ref_loss, ref = _case(1)
    got[3][1, 2, 0] = bad
    assert relative_errors(loss, got, ref_loss, ref) == (math.inf, math.inf, False)
    _, got, _, _ = _case(1)
    assert relative_errors(torch.tensor(bad), got, ref_loss, ref) == (math.inf, math.inf, False)


def test_reuse_overwrites_the_gradients_and_gives_the_same_figures():
    """``reuse=True`` leaves each gradient holding its difference to the reference; the figures do not change."""
    loss, got, ref_loss, ref = _case(2)
    kept = [None if g is None else g.clone() for g in got]
    first = relative_errors(loss, kept, ref_loss, ref)
    assert all(a is None or torch.equal(a, b) for a, b in zip(kept, got))  # reuse=False: untouched
    norm = grad_norm(ref, ref_loss)
    assert relative_errors(loss, got, ref_loss, ref, reuse=True, ref_norm=norm) == pytest.approx(first, rel=1e-12)
    assert torch.equal(got[0], kept[0] - ref[0])


def test_errors_read_the_host_once_whatever_the_number_of_parameters():
    """One host transfer per call, for 6 or 600 gradients: no per-parameter sync."""
    for n in (6, 600):
        ref = [torch.randn(4) for _ in range(n)]
        got = [r + 1e-3 for r in ref]
        with _HostReads() as mode:
            relative_errors(torch.tensor(1.0), got, torch.tensor(1.0), ref)
        assert mode.reads == 1, n


def _deep(depth: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers = [m for _ in range(depth) for m in (nn.Linear(16, 16), nn.Tanh())]
    return nn.Sequential(*layers, nn.Linear(16, 1)), torch.randn(8, 16)


def test_probe_host_reads_per_pass_do_not_grow_with_the_parameters():
    """The probe reads the host a fixed number of times per pass: the same at 2 and at 12 layers (4 -> 24 params)."""
    per_pass = []
    for depth in (2, 12):
        model, x = _deep(depth)
        tr = trace(model, x, device_type="cpu")
        runner = Runner(model, None, tr, device_type="cpu", emulate_fp16=True, seed=0)
        probe(runner, [x], [], ["bf16"])  # the reference pass alone: ranges are read once, per layer set
        with _HostReads() as mode:
            pr = probe(runner, [x], ["0", "2"], ["bf16", "fp16"])
        assert pr.passes == 1 + 1 + 4  # the earlier reference, this one, 2 layers x 2 formats
        per_pass.append(mode.reads / 5)
    assert per_pass[0] == per_pass[1] <= 3, per_pass


def test_ranges_match_a_direct_log2_histogram():
    """Each layer's output range and log2 histogram are those of its FP32 output, computed directly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 8) * 100
    tr = trace(model, x, device_type="cpu")
    pr = probe(Runner(model, None, tr, device_type="cpu", emulate_fp16=True, seed=0), [x], ["0"], ["bf16"])
    with torch.no_grad():
        out = model[1](model[0](x))
    v = out.abs().flatten()
    v = v[v > 0]
    expect = torch.bincount((torch.floor(torch.log2(v)).long() - HIST_LO), minlength=HIST_HI - HIST_LO).tolist()
    assert pr.ranges["1"].out_hist == tuple(expect)
    assert pr.ranges["1"].out_absmax == pytest.approx(float(out.abs().max()))
    assert sum(pr.ranges["1"].out_hist) == int((out != 0).sum()) < out.numel()  # ReLU zeros are not counted


class _BiasAttention(nn.Module):
    """Attention with a mask as T5 has it: a learned position bias (a parameter that requires grad)."""

    def __init__(self, learned: bool) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)
        bias = torch.randn(1, 2, 8, 8)
        if learned:
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 8, 3, 2, 16).permute(2, 0, 3, 1, 4)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.out(att.transpose(1, 2).reshape(x.shape[0], 8, 32))


@pytest.mark.parametrize("learned,emulate_cuda,wide", [(True, False, True), (False, False, False), (True, True, False)],
                         ids=["learned-mask-cpu", "constant-mask-cpu", "learned-mask-cuda-emulated"])
def test_sdpa_on_the_math_kernel_counts_as_computing_in_fp32(learned, emulate_cuda, wide):
    """On the CPU, an SDPA whose mask requires grad runs torch's math kernel, which computes BF16 inputs in FP32:
    the probe's measurement says it computes in FP32 itself (no gain, no claim of 16-bit FLOPs). A constant mask
    runs the BF16 flash kernel; emulating CUDA, the GPU's kernel choice is not the CPU's, so no claim is made."""
    from autoprec.probe import Measure

    torch.manual_seed(0)
    model, x = _BiasAttention(learned), torch.randn(4, 8, 32)
    tr = trace(model, x, device_type="cpu")
    key = next(lay.key for lay in tr.layers if "scaled_dot_product_attention" in lay.key)
    runner = Runner(model, None, tr, device_type="cpu", emulate_fp16=True, seed=0, emulate_cuda=emulate_cuda)
    ref_loss, ref_grads = runner.run(x, {})
    outcome = Measure(runner, x, ref_loss, ref_grads, 1.0, None).run(key, (key,), "bf16")
    assert outcome.full_width[key] is wide
