"""Amplification (autoprec.probe._amplify): how a layer's rounding grows in the op its output feeds, and what tune does with it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import autoprec
from autoprec.device import roofline
from autoprec.probe import Amplification, Consumer, Runner, consumers, gain, probe, rows
from autoprec.trace import trace

#: a CUDA profile where every 16-bit layer pays, however small (no launch costs, free casts): decisions are numerical
ALWAYS_PAYS = roofline(fp32_flops=19.5e12, low_speedup=8.0, bandwidth=1e18, launch=0.0, region=0.0,
                       device="test GPU: every 16-bit layer faster")


class LogitsAttention(nn.Module):
    """An embedding Linear, then q, k, v; scores = q k^T without 1/sqrt(d), scaled so that logits reach ~1e3-1e4."""

    def __init__(self, d_in: int = 16, d: int = 32, gain_qk: float = 6.0) -> None:
        super().__init__()
        self.emb, self.q, self.k, self.v = nn.Linear(d_in, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d_in)
        with torch.no_grad():
            self.q.weight.mul_(gain_qk)
            self.k.weight.mul_(gain_qk)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.emb(x)
        scores = self.q(h) @ self.k(h).transpose(-1, -2)
        return self.out(torch.softmax(scores, -1) @ self.v(h))


def draw(seed: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (x, target) of the attention model's distribution."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 16, 16, generator=g) * 4, torch.randn(rows, 16, 16, generator=g)


def mse(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (out - batch[1]).square().mean()


def attention() -> LogitsAttention:
    torch.manual_seed(0)
    return LogitsAttention()


# -- the gain of each kind of consumer, on constructed inputs (exact: no CPU dependence) ---------------------------
@pytest.mark.parametrize("logit, expected", [(1e5, 2.0), (1.0, math.expm1(1.5e-3))], ids=["saturated", "small"])
def test_softmax_gain_is_the_spread_of_the_perturbation_in_logits(logit, expected):
    """A rounding of 1e-3 in logits of 1e5 is 100: any margin flips (2, the most an L1 change can be); of 1: 1.5e-3."""
    ref = torch.tensor([[logit, 0.5 * logit, 0.0]])
    err, rel = gain("softmax", ref, ref * (1 + torch.tensor([[1e-3, -1e-3, 0.0]])))
    assert float(err) == pytest.approx(expected, rel=1e-3)
    assert float(rel) == pytest.approx(1e-3, rel=1e-3)


def test_centring_gain_is_the_perturbation_over_the_spread():
    """Values of 1000 +- 0.01 moved by 2 (BF16's step there): 200 standard deviations; a shift of all by 2: nothing."""
    ref = 1000 + 0.01 * torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    err, _ = gain("centring", ref, ref + torch.tensor([[2.0, 0.0, 0.0, 0.0]]))
    assert float(err) == pytest.approx(1.5 / 0.01, rel=1e-3)  # the perturbation less its mean (0.5), over sd 0.01
    shifted, _ = gain("centring", ref, ref + 2.0)
    assert float(shifted) == 0.0


def test_route_gain_is_the_root_of_the_share_of_rows_whose_choice_flips():
    """Top-1 of 4 rows: 2 rows with a margin of 0.01 flip under a spread of 0.1, the others (margin 10) do not:
    half the rows' gradient contributions change, sqrt(1/2) of the gradients' norm."""
    ref = torch.tensor([[5.0, 4.99, 0.0], [5.0, 4.99, 0.0], [15.0, 5.0, 0.0], [15.0, 5.0, 0.0]])
    delta = torch.tensor([[0.0, 0.1, 0.0]]).expand(4, 3)
    err, _ = gain("route", ref, ref + delta, k=1)
    assert float(err) == pytest.approx(math.sqrt(0.5))
    none, _ = gain("route", ref, ref, k=1)
    assert float(none) == 0.0


def test_rows_follow_the_consumers_dims_and_keep_a_bounded_slice():
    """softmax over dim 1 of (2, 3, 4) is 8 rows of 3; a LayerNorm module normalises its last dims."""
    z = torch.arange(24.0).reshape(2, 3, 4)
    got, _, _ = rows(Consumer("s", "softmax", "softmax"), (z, 1), {}, z)
    assert got.shape == (8, 3) and got[0].tolist() == [0.0, 4.0, 8.0]
    ln = nn.LayerNorm(4)
    (c,) = consumers(trace(nn.Sequential(ln), torch.ones(2, 4), device_type="cpu"), {"0": ln}).values()
    got, eps, _ = rows(c, (z,), {}, z)
    assert (c.kind, got.shape, eps) == ("centring", (6, 4), 1e-5)


def test_route_ops_are_layers_with_a_hazard():
    """topk is traced as a layer of hazard class "route", so its scores' producers can be measured against it."""

    class Router(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            values, _ = self.gate(x).topk(2, dim=-1)
            return values

    layers = {lay.key: lay for lay in trace(Router(), torch.ones(3, 8), device_type="cpu").layers}
    assert layers["::topk"].hazards == ("route",)


# -- measured in the probe ------------------------------------------------------------------------------------------
def test_the_probe_measures_how_far_a_producer_moves_the_softmax():
    """Each of emb, q, k in BF16 moves logits of ~1e3 by far more than a nat: amp 2 at the softmax; v reaches none."""
    model, batch = attention(), draw(0)
    tr = trace(model, batch, device_type="cpu")
    runner = Runner(model, mse, tr, device_type="cpu", emulate_fp16=True, seed=0)
    pr = probe(runner, [batch], ["emb", "q", "k", "v"], ["bf16"])
    for key in ("emb", "q", "k"):
        m = pr.get(key, "bf16")
        assert (m.amp, m.amp_at) == (2.0, "::softmax"), key
        assert 1e-4 < m.amp_in < 1e-2 and m.amplified().startswith("feeds ::softmax: rounding of ")
    assert pr.get("v", "bf16").amp == 0.0 and pr.get("v", "bf16").amp_at == ""


def test_amplification_reads_once_per_pass(monkeypatch):
    """The watcher compares on the device and reads all its consumers with one host transfer."""
    amp = Amplification({"a": Consumer("a", "softmax", "softmax", (-1,)), "b": Consumer("b", "exp", "exp")})
    for key in ("a", "b"):
        amp.enter(key, "op", ((torch.ones(2, 3),), {}))
    amp.compare()
    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or original(self))
    for key, moved in (("a", 0.1), ("b", 0.2)):
        amp.enter(key, "op", ((torch.ones(2, 3) + torch.tensor([0.0, 0.0, moved]),), {}))
    reach = amp.read()
    assert len(calls) == 1 and reach.at == "b" and reach.error == pytest.approx(math.expm1(0.2), rel=1e-5)


# -- what tune does with it ------------------------------------------------------------------------------------------
def _tuned() -> autoprec.Policy:
    return autoprec.tune(attention(), draw(0), mse, target="cuda", profile=ALWAYS_PAYS, progress=False,
                         verify_steps=0, measure_speed=False)


def test_tune_keeps_what_feeds_large_logits_fp32_and_says_why():
    """The chain that feeds the softmax stays FP32 ("amplified"); v and out, which feed none, go 16-bit."""
    policy = _tuned()
    for key in ("emb", "q", "k", "::matmul"):
        entry = policy.layers[key]
        assert (entry.precision, entry.reason, entry.excluded) == ("fp32", "amplified", True), key
        assert "feeds ::softmax: rounding of" in entry.detail and "becomes 2 at its output > bound 0.05" in entry.detail
    assert policy.layers["v"].precision != "fp32" and policy.layers["out"].precision != "fp32"
    assert "amplified" in policy.report()


def _grad_err(model: nn.Module, batch, policy: autoprec.Policy | None) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if policy is None:
        mse(model(*batch), batch).backward()
    else:
        with policy.autocast(model):
            mse(model(*batch), batch).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_the_policy_holds_on_twenty_batches_tune_did_not_see():
    """On 20 fresh batches of the same distribution the policy's gradient error stays within the bound (0.05)."""
    model, policy = attention(), _tuned()
    worst = 0.0
    for seed in range(1, 21):
        batch = draw(seed)
        ref = _grad_err(model, batch, None)
        got = _grad_err(model, batch, policy)
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    assert worst <= 0.05
