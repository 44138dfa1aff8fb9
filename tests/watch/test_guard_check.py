"""autoprec.guard's FP32 check: error that grows with training while every range fits is caught and promoted."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprec
from autoprec import GuardError, GuardWarning, LayerEntry, OptionError, Policy
from autoprec.watch._check import BASELINE, TREND, judge_gaps
from tests.models import mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _policy(layers: dict[str, str]) -> Policy:
    """A CUDA policy written by hand (its 16-bit layers emulated on this CPU), BF16 allowed."""
    return Policy(layers={k: LayerEntry(p) for k, p in layers.items()}, target="cuda", formats=("fp16", "bf16"))


def _ternary(*shape: int, seed: int) -> torch.Tensor:
    """Integers in {-1, 0, 1}: exact in every format, and so is any short sum of their products."""
    return torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(seed)).float()


class Cancel(nn.Module):
    """A leaf ``(x @ W.T + shift) - shift`` with ``shift = 2 ** (count // 4)``, ``count`` rising per training forward.

    With integer ``x @ W.T`` of magnitude at most 64 it is exact in BF16 while ``shift <= 128``
    (every sum below 256 is an integer BF16 holds); past that BF16 rounds ``x @ W.T + shift`` to a
    multiple of ``shift / 128``, so the error grows with training while the output (``x @ W.T``)
    stays of magnitude 64: no range comes near a limit. In FP32 it is exact throughout.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("count", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.count += 1
        shift = torch.exp2(torch.div(self.count, 4, rounding_mode="floor").float())
        return (F.linear(x, self.weight) + shift) - shift


class CancelModel(nn.Module):
    """fc (ternary, frozen) -> ReLU -> cancel (ternary, frozen) -> head (trained); inputs ternary: fc is exact in BF16."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8, bias=False)
        self.fc.weight = nn.Parameter(_ternary(8, 8, seed=1), requires_grad=False)
        self.cancel = Cancel(_ternary(8, 8, seed=2))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cancel(F.relu(self.fc(x))) / 16)


class Scale(nn.Module):
    """A leaf ``(x * 2**count) / 2**count``, ``count`` rising per training forward: exact in BF16 always (powers of
    two), exact in FP16 until ``3 * 2**count`` passes 65504 (count 15), then inf; its output stays ``x``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.count += 1
        big = torch.exp2(self.count.float())
        return (x * big) / big


class ScaleModel(nn.Module):
    """scale -> head: the FP16 hazard is inside one layer whose output never leaves [-3, 3]."""

    def __init__(self):
        super().__init__()
        self.scale = Scale()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale(x))


def _spec(model: nn.Module, x: torch.Tensor):
    """(model, batch, loss_fn): MSE against a fixed target."""
    target = torch.randn(x.shape[0], 4, generator=torch.Generator().manual_seed(3))
    return model.train(), x, lambda out, batch: F.mse_loss(out, target)


def cancel_model():
    """:class:`CancelModel` with a ternary batch of 32."""
    torch.manual_seed(0)
    return _spec(CancelModel(), _ternary(32, 8, seed=4))


def scale_model():
    """:class:`ScaleModel` with an integer batch in [-3, 3] of 32."""
    torch.manual_seed(0)
    return _spec(ScaleModel(), torch.randint(-3, 4, (32, 8), generator=torch.Generator().manual_seed(4)).float())


CANCEL = _policy({"fc": "bf16", "cancel": "bf16", "head": "fp32"})
SCALE = _policy({"scale": "fp16", "head": "fp32"})
STEPS, EVERY = 60, 4


def _train(model, x, loss_fn, steps, *, guard=None, policy=None):
    """SGD steps on the trainable parameters with ``guard`` watching (or ``policy`` installed); the losses."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    handle = policy.apply(model) if policy is not None else None
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if guard is not None:
            guard.step(loss, x)
    if handle is not None:
        handle.remove()
    return losses


def test_error_growing_with_training_is_caught_by_the_check_and_promoted():
    """Cancel's BF16 error grows while its output stays small: the check sees the gap leave 0, the re-probe finds
    cancel (not the exact fc), promotes it to FP32, and every later check's gap is 0."""
    model, x, loss_fn = cancel_model()
    g = autoprec.guard(model, CANCEL, loss_fn, every=EVERY, check_every=EVERY)
    _train(model, x, loss_fn, STEPS, guard=g)
    g.remove()
    assert [(e.layer, e.action, e.old, e.new) for e in g.events] == [("cancel", "adapt", "bf16", "fp32")]
    acted = g.events[0].step
    assert g.check.steps == list(range(EVERY, STEPS + 1, EVERY))
    before = [gap for s, gap in zip(g.check.steps, g.check.gaps) if s < acted]
    after = [gap for s, gap in zip(g.check.steps, g.check.gaps) if s > acted]
    assert len(before) >= BASELINE and before[:7] == [0.0] * 7  # exact while shift <= 128 (checks up to step 28)
    assert after and after == [0.0] * len(after)  # fc in BF16 is exact: nothing left to close
    assert g.policy.assignment == {"fc": "bf16", "cancel": "fp32", "head": "fp32"}
    assert g.policy.layers["cancel"].reason == "loss gap" and g.policy.layers["cancel"].excluded
    assert g.events[0].evidence.startswith(f"step {acted}: check: loss gap ")
    assert g.events[0].evidence.endswith("(bound 0.01, noise floor 0): cancel bf16 -> fp32 closes it to 0")
    assert g._watch.read()["fc"][0] <= 8  # the range path had nothing to see


def test_an_fp16_overflow_inside_a_layer_is_promoted_to_bf16_where_bf16_closes_it():
    """Scale's FP16 intermediate overflows while its output stays in [-3, 3]: the check (its train-mode pass one
    count ahead of training) sees an infinite gap, BF16 closes it exactly, and training never goes non-finite."""
    model, x, loss_fn = scale_model()
    bare = _train(copy.deepcopy(model), x, loss_fn, 20, policy=SCALE)
    g = autoprec.guard(model, SCALE, loss_fn, every=1000, check_every=1)
    guarded = _train(model, x, loss_fn, 20, guard=g)
    g.remove()
    assert all(map(math.isfinite, bare[:14])) and not math.isfinite(bare[14])  # count 15: 3 * 2**15 > 65504
    assert [(e.step, e.layer, e.old, e.new) for e in g.events] == [(14, "scale", "fp16", "bf16")]
    assert "check: loss gap inf vs FP32" in g.events[0].evidence and g.events[0].evidence.endswith("closes it to 0")
    assert all(map(math.isfinite, guarded)) and g.check.gaps == [0.0] * 13 + [math.inf] + [0.0] * 6


def test_a_benign_model_sees_no_action_with_checks_on():
    """An MLP all in FP16 trains 100 steps with a check every 10: ten gaps, none near the bound, no event."""
    model, x, loss_fn = mlp()
    policy = _policy({"fc1": "fp16", "fc2": "fp16", "fc3": "fp16"})
    g = autoprec.guard(model, policy, loss_fn, every=10, check_every=10)
    losses = _train(model, x, loss_fn, 100, guard=g)
    g.remove()
    assert g.events == [] and g.policy is policy and all(map(math.isfinite, losses))
    assert len(g.check.gaps) == 10 and max(g.check.gaps) < 0.01 / 2


class _Noisy(nn.Module):
    """Linear -> BatchNorm -> Dropout -> Linear: a train-mode forward draws from the RNG and writes buffers."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.drop(self.norm(self.fc(x))))


def _snapshot(model, guard):
    """Everything a check must leave alone, as copies."""
    return {"params": [p.detach().clone() for p in model.parameters()],
            "grads": [p.grad.clone() for p in model.parameters()],
            "buffers": [b.clone() for b in model.buffers()], "rng": torch.get_rng_state(),
            "training": model.training, "watch": guard._watch.table.clone()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"], ids=["fp32", "bf16"])
def test_a_check_changes_nothing(precision):
    """Weights, grads, buffers (BatchNorm's running statistics), RNG state, mode and the watch are bit-identical
    across a check; with every layer FP32 the two passes agree exactly (the same dropout masks)."""
    torch.manual_seed(0)
    model, x = _Noisy().train(), torch.randn(32, 8)

    def loss_fn(out, batch):
        return out.square().mean()
    policy = _policy({"fc": precision, "norm": "fp32", "head": precision})
    g = autoprec.guard(model, policy, loss_fn, every=1000, check_every=1)
    loss = loss_fn(model(x), x)
    loss.backward()
    before = _snapshot(model, g)
    g.step(loss, x)
    after = _snapshot(model, g)
    g.remove()
    assert len(g.check.gaps) == 1 and (g.check.gaps[0] == 0.0) == (precision == "fp32")
    assert after["training"] and torch.equal(after["rng"], before["rng"]) and torch.equal(after["watch"], before["watch"])
    for key in ("params", "grads", "buffers"):
        assert all(torch.equal(a, b) for a, b in zip(after[key], before[key])), key


def test_forward_passes_are_counted_two_per_check_and_one_per_16_bit_layer_more_at_an_action():
    """A check runs 2 forward passes; the acting one 2 + 2 (fc and cancel alone in FP32) + 1 (cancel promoted)."""
    model, x, loss_fn = cancel_model()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    g = autoprec.guard(model, CANCEL, loss_fn, every=EVERY, check_every=EVERY)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.01)
    extra = {}
    for _ in range(STEPS):
        loss = loss_fn(model(x), x)
        opt.zero_grad(); loss.backward(); opt.step()
        n = len(calls)
        g.step(loss, x)
        if len(calls) > n:
            extra[g.state_dict()["step"]] = len(calls) - n
    g.remove()
    acted = g.events[0].step
    assert extra == {s: 5 if s == acted else 2 for s in range(EVERY, STEPS + 1, EVERY)}
    assert g.check.forwards == sum(extra.values())


@pytest.mark.parametrize(("gaps", "why"), [
    ([], None),
    ([0.02], "over"),  # no history: the bound alone
    ([0.001, 0.002, 0.001, 0.003, 0.002, 0.03], "over"),
    ([0.001, 0.002, 0.001, 0.003, 0.002, 0.009], None),  # under the bound, not rising for TREND checks
    ([0.02, 0.03, 0.02, 0.025, 0.03, 0.035], None),  # the policy's own level: within NOISE_MULTIPLE x its floor
    ([0.02, 0.03, 0.02, 0.025, 0.03, 0.06], "over"),
    ([0.0, 0.0, 0.0, 0.001, 0.003, 0.006], "trend"),  # rising TREND checks, past half the bound
    ([0.0, 0.0, 0.0, 0.001, 0.003, 0.004], None),  # rising, not yet past half the bound
    ([0.0, 0.0, 0.004, 0.003, 0.005, 0.006], None),  # past half the bound, not rising for TREND checks
    ([0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.011], "over"),  # a slow steady climb
    ([0.001, 0.001, math.inf], "over"),  # the policy's loss went non-finite
    ([0.001, 0.001, math.nan], None),  # the FP32 loss is non-finite: nothing to compare with
    ([math.nan, math.inf, 0.001, 0.02], "over"),  # non-finite gaps are no part of the floor
], ids=["empty", "first", "jump", "quiet", "noisy", "noisy-jump", "trend", "early-trend", "not-rising", "climb",
        "inf", "nan", "non-finite-history"])
def test_the_rule_on_given_gap_sequences(gaps, why):
    """judge_gaps acts on a gap past the bound and the first checks' level, or rising towards it; never on noise."""
    verdict = judge_gaps(gaps, 0.01)
    assert (verdict and verdict.why) == why
    assert TREND == 4 and BASELINE == 5


def test_a_verdict_names_its_figures_and_the_target_clears_both_rules():
    """The floor is the first checks' median; the target is max(bound / 2, 2 x floor)."""
    v = judge_gaps([0.004, 0.001, 0.003, 0.002, 0.005, 0.009, 0.04], 0.01)
    assert (v.floor, v.target) == (0.003, 0.006)
    assert v.describe() == "loss gap 0.04 vs FP32 (bound 0.01, noise floor 0.003)"
    assert judge_gaps([0.0, 0.0, 0.0, 0.001, 0.003, 0.006], 0.01).describe().endswith("rising for 4 checks)")


def test_state_dict_carries_the_check_history():
    """The check's steps, gaps and pass count go through JSON into a fresh guard, which judges on from them."""
    model, x, loss_fn = cancel_model()
    g = autoprec.guard(model, CANCEL, loss_fn, every=EVERY, check_every=EVERY)
    _train(model, x, loss_fn, 40, guard=g)
    state = json.loads(json.dumps(g.state_dict()))
    g.remove()
    assert state["check"] == {"steps": g.check.steps, "gaps": g.check.gaps, "forwards": g.check.forwards,
                              "warned": False}
    fresh, _, _ = cancel_model()
    g2 = autoprec.guard(fresh, CANCEL, loss_fn, every=EVERY, check_every=EVERY)
    g2.load_state_dict(state)
    assert (g2.check.steps, g2.check.gaps, g2.check.forwards) == (g.check.steps, g.check.gaps, g.check.forwards)
    assert g2.state_dict() == state
    g2.remove()


def test_action_raise_names_the_layer_the_gap_and_the_fix():
    """action='raise' stops the run at the acting check, names cancel and its fix, and leaves the policy as it was."""
    model, x, loss_fn = cancel_model()
    g = autoprec.guard(model, CANCEL, loss_fn, every=EVERY, check_every=EVERY, action="raise")
    with pytest.raises(GuardError, match=r"step \d+: check: loss gap \S+ vs FP32 \(bound 0.01, noise floor 0\): "
                                         r"cancel bf16 -> fp32 closes it to 0: the policy drifted from FP32 during "
                                         r"training; run 'cancel' in fp32") as info:
        _train(model, x, loss_fn, STEPS, guard=g)
    g.remove()
    assert info.value.event == g.events[0] and g.policy is CANCEL


def test_action_warn_warns_once_and_keeps_checking(caplog):
    """action='warn' warns once for the check, never changes the policy, and keeps the gaps coming."""
    model, x, loss_fn = cancel_model()
    g = autoprec.guard(model, CANCEL, loss_fn, every=EVERY, check_every=EVERY, action="warn")
    with pytest.warns(GuardWarning, match="cancel bf16 -> fp32 closes it to 0") as warned, \
            caplog.at_level(logging.WARNING, "autoprec"):
        _train(model, x, loss_fn, STEPS, guard=g)
    g.remove()
    assert g.policy is CANCEL and [e.action for e in g.events] == ["warn"] and len(warned) == 1
    assert "not changed" in caplog.text and len(g.check.gaps) == STEPS // EVERY
    assert g.check.gaps[-1] > 0.01  # still drifting: nothing was promoted


def test_check_every_defaults_to_ten_times_every_and_zero_turns_it_off():
    """check_every=None is 10 x every; check_every=0 runs no check and needs no batch."""
    model, x, loss_fn = mlp()
    policy = _policy({"fc1": "bf16", "fc2": "fp32", "fc3": "fp32"})
    g = autoprec.guard(model, policy, loss_fn, every=3)
    assert g.check_every == 30
    g.remove()
    g = autoprec.guard(model, policy, loss_fn, every=1, check_every=0)
    for _ in range(5):
        g.step(loss_fn(model(x), x))
    g.remove()
    assert g.check.gaps == []


def test_a_step_without_the_batch_is_refused_while_the_check_is_on():
    """guard.step(loss) with the check on is an OptionError that says to pass the batch or set check_every=0."""
    model, x, loss_fn = mlp()
    g = autoprec.guard(model, _policy({"fc1": "bf16"}), loss_fn)
    with pytest.raises(OptionError, match=r"guard.step\(loss\) without the batch: .* call guard.step\(loss, batch\), "
                                          r"or build the guard with check_every=0"):
        g.step(loss_fn(model(x), x))
    g.remove()
