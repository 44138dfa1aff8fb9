"""Pricing the step the user will train (issue 21, part 1): ``tune(..., train_batch_size=N)`` on the default CUDA
path (the built-in H100 estimate, not the suite's pinned roofline), a GPT-2-small-shaped stack tuned on a few rows
and priced at an 8 x 1024-token step."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import autoprec
from autoprec.errors import DeviceWarning, OptionError

WIDTH, TOKENS = 768, 8 * 1024  # GPT-2 small's width; a training step of 8 sequences of 1024 tokens


class _Block(nn.Module):
    """GPT-2 small's four GEMM shapes per block (attention's QKV and output projections, the MLP's two), on rows of
    tokens: what the cost model prices is shapes, not the attention in between."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.attn_proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.c_fc, self.mlp_proj = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.c_attn(x)[:, :WIDTH]
        x = x + self.attn_proj(torch.tanh(q))
        return x + self.mlp_proj(torch.nn.functional.gelu(self.c_fc(x)))


@pytest.fixture(scope="module")
def stack():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(_Block(), _Block())
        for p in model.parameters():
            p.data.mul_(0.5)
        return model, torch.randn(8, WIDTH)


@pytest.fixture
def default_path(monkeypatch):
    """The default path: no pinned profile, so a CUDA target tuned on this CPU prices with the built-in estimate."""
    monkeypatch.delenv("AUTOPREC_PROFILE", raising=False)


def _tune(model, x, **kw):
    return autoprec.tune(model, x, lambda out, batch: out.square().mean(), target="cuda", dtypes="bf16",
                         progress=False, verify_steps=0, n_trials=8, held_out=0, **kw)


def test_priced_at_the_training_step_the_gemms_run_in_16_bit(stack, default_path):
    """At 8 x 1024 tokens every GEMM of GPT-2 small's shapes is compute-bound on an H100: >= 90% of the matmul
    FLOPs in BF16; the stats record the step it was priced at, the report says so."""
    model, x = stack
    policy = _tune(model, x, train_batch_size=TOKENS)
    assert policy.stats["profile_origin"] == "estimate" and "H100" in policy.stats["device"]
    assert policy.low_precision_fraction() >= 0.9, policy.assignment
    assert policy.stats["priced_rows"] == TOKENS
    assert f"priced at a training step of {TOKENS} rows (train_batch_size)" in policy.report()


def test_at_the_tuning_shapes_nothing_pays_and_a_warning_names_the_option(stack, default_path):
    """The same stack priced at its 8 tuning rows is launch-bound on the estimate: every GEMM stays FP32 for no gain,
    and tune warns with the share, the rows and the option to pass."""
    model, x = stack
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        policy = _tune(model, x)
    assert policy.low_precision_fraction() == 0.0 and policy.stats["priced_rows"] is None
    said = [str(w.message) for w in seen if issubclass(w.category, DeviceWarning)]
    assert len(said) == 1, said
    assert said[0].startswith("100% of the matmul/conv FLOPs stay FP32 for no gain: at the tuning batch's shapes "
                              "(8 rows) no 16-bit format is faster on built-in H100 estimate")
    assert "tune(..., train_batch_size=N) (CLI: --train-batch-size N)" in said[0]


def test_tuning_for_the_device_it_runs_on_does_not_warn():
    """The warning is for another target than the tuning device: a CPU policy tuned on the CPU is priced by this
    CPU's own profile (here the suite's pinned one), which measured what these shapes cost."""
    model = nn.Sequential(nn.Linear(16, 16))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        autoprec.tune(model, torch.randn(4, 16), target="cpu", progress=False, verify_steps=0, held_out=0)
    assert not [w for w in seen if issubclass(w.category, DeviceWarning)]


@pytest.mark.parametrize("value", [0, -8, 2.5, True, "8192"])
def test_a_bad_train_batch_size_is_refused_with_the_fix(value):
    with pytest.raises(OptionError, match=f"train_batch_size={value!r} must be the rows of your real training step"):
        autoprec.tune(nn.Linear(4, 4), torch.randn(4, 4), progress=False, train_batch_size=value)


def test_a_batch_without_a_shared_leading_size_cannot_be_scaled():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, y):
            return self.a(x).sum() + self.b(y).sum()

    with pytest.raises(OptionError, match="train_batch_size=64 scales the batch's leading .batch. dimension, but the "
                                          "batch's tensors share no leading size"):
        autoprec.tune(Two(), (torch.randn(4, 4), torch.randn(3, 4)), progress=False, train_batch_size=64)
