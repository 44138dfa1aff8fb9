"""autoprec.guard's gradient and scaler watch: an FP16 layer whose gradient grows is promoted before the scaler collapses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import autoprec
from autoprec import GuardError, GuardWarning, LayerEntry, Policy
from autoprec.watch import _watch
from tests import models
from tests.helpers import count_syncs
from tests.models import FP16_MAX, mlp
from tests.ranks import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

GAIN, EVERY, STEPS, INIT_SCALE = 1.5, 4, 40, 2.0 ** 10
assert GAIN ** EVERY < 8  # the gradient grows less than the headroom between two reads: a read sees it coming


def _policy(layers: dict[str, str]) -> Policy:
    """A CUDA policy written by hand (its FP16 layers emulated on this CPU), BF16 allowed."""
    return Policy(layers={k: LayerEntry(p) for k, p in layers.items()}, target="cuda", formats=("fp16", "bf16"))


POLICY = _policy({"fc": "fp32", "mid": "fp16", "head": "fp32"})


def GrowingGradient() -> nn.Module:  # noqa: N802 (builds the model class of tests.models, seeded)
    """tests.models.GrowingGradient whose gradient grows by GAIN per step, 8 -> 16 -> 16 -> 4, seeded weights."""
    torch.manual_seed(0)
    return models.GrowingGradient(GAIN, 8, 16)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=g), torch.randn(64, 4, generator=g)


def _train(model, steps, *, guard=None, scaler=None, run=None):
    """Adam steps with a GradScaler (FP32 trains alike under any gain); the losses and the scale after each step."""
    x, y = _data()
    run = model if run is None else run
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = scaler or torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    losses, scales = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(run(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if guard is not None:
            guard.step(loss, x)
        losses.append(float(loss.detach()))
        scales.append(scaler.get_scale())
    return losses, scales


def test_a_growing_gradient_is_promoted_before_the_scaler_collapses():
    """The FP16 layer's gradient grows 1.5x a step: the guard moves it to BF16 before the scale falls below 1, and the run goes on."""
    model = GrowingGradient()
    handle = POLICY.apply(model)
    _, scales_alone = _train(model, STEPS)
    handle.remove()
    collapse = next(i + 1 for i, s in enumerate(scales_alone) if s < 1)  # the policy alone: the scale falls below 1
    model = GrowingGradient()
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    g = autoprec.guard(model, POLICY, scaler=scaler, every=EVERY, check_every=0)
    losses, scales = _train(model, STEPS, guard=g, scaler=scaler)
    g.remove()
    mid = [e for e in g.events if e.layer == "mid"]
    assert [(e.old, e.new) for e in mid] == [("fp16", "bf16")] and mid[0].step <= collapse
    assert "|grad| max" in mid[0].evidence and "unscaled" in mid[0].evidence and f"> {FP16_MAX:g}" in mid[0].evidence
    assert g.policy.assignment["mid"] == "bf16" and g.policy.stats["guard_events"][0]["layer"] == "mid"
    assert all(map(math.isfinite, losses)) and min(scales[mid[0].step:]) >= 1  # BF16 gradients: no skipped step after


def test_a_collapsed_scaler_is_reset_as_its_fp16_layer_is_promoted():
    """A scaler driven below 1 by the policy's FP16 layer is reset to the tuned init scale as the layer is promoted."""
    model = GrowingGradient()
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    g = autoprec.guard(model, POLICY, scaler=scaler, every=STEPS, check_every=0)  # one read, at the end
    _, scales = _train(model, STEPS, guard=g, scaler=scaler)
    g.remove()
    assert scales[-2] < 1  # collapsed before the guard's first read
    assert [(e.layer, e.old, e.new) for e in g.events] == [("mid", "fp16", "bf16"), ("scaler", f"{scales[-2]:.3g}", "65536")]
    assert "unscaled; scaler skipped" in g.events[0].evidence and "promoted mid" in g.events[1].evidence
    assert scales[-1] == 65536.0 and g.policy.stats["guard_events"][-1]["layer"] == "scaler"


def test_a_benign_mlp_with_a_scaler_sees_no_action():
    """An MLP all in FP16 trains 100 steps with a default GradScaler under the guard: no event, no scaler reset."""
    model, x, loss_fn = mlp()
    policy = _policy({"fc1": "fp16", "fc2": "fp16", "fc3": "fp16"})
    scaler = torch.amp.GradScaler("cpu")
    g = autoprec.guard(model, policy, loss_fn, scaler=scaler, every=10, check_every=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(100):
        loss = loss_fn(model(x), x)
        scaler.scale(loss).backward()
        scaler.step(opt); scaler.update(); opt.zero_grad()
        g.step(loss, x)
    g.remove()
    assert g.events == [] and g.policy is policy and g._watch.grads["fc1"][0] > 0 and g._watch.scale >= 1


def test_gradients_and_scale_come_in_the_one_sync_of_a_read(monkeypatch):
    """With a scaler, 40 steps at every=10 read the device 4 times and add no other host sync."""
    model, x, loss_fn = mlp()
    policy = _policy({"fc1": "fp16", "fc2": "bf16", "fc3": "fp32"})
    reads = []
    monkeypatch.setattr(_watch, "_host", lambda table, _host=_watch._host: reads.append(1) or _host(table))
    counts = count_syncs(monkeypatch)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def loop(guard=None):
        scaler = torch.amp.GradScaler("cpu")  # fresh: the guard reads its initial scale without a sync
        g = guard and guard(scaler)
        handle = policy.apply(model) if g is None else None
        for _ in range(40):
            loss = loss_fn(model(x), x)
            scaler.scale(loss).backward(); scaler.step(opt); scaler.update(); opt.zero_grad()
            if g is not None:
                g.step(loss, x)
        (g or handle).remove()
        return g

    loop()  # the same loop without the guard: what it syncs on its own
    alone, counts["n"] = counts["n"], 0
    g = loop(lambda scaler: autoprec.guard(model, policy, loss_fn, scaler=scaler, every=10, check_every=0))
    assert len(reads) == 4 and counts["n"] - alone == 4 and g._watch.scale == 65536.0


def test_fp16_gradients_are_watched_for_units_and_op_entries_bf16_ones_are_not():
    """Backward fills the gradient columns of the FP16 rows, a unit's (fc1) and an op entry's ('::linear'); a BF16
    layer's (fc2) stay 0: BF16 has FP32's exponent range, so no gradient fits FP32 that overflows BF16 (the
    documented reason in autoprec.watch._watch), and its row holds the forward figures only."""
    model, x, loss_fn = mlp()
    g = autoprec.guard(model, _policy({"fc1": "fp16", "fc2": "bf16", "fc3": "fp32"}), loss_fn, every=100,
                       check_every=0)
    loss_fn(model(x), x).backward()
    rows = dict(zip(g._watch.layers, g._watch.table.tolist()))
    g.remove()
    assert rows["fc1"][0] > 0 and rows["fc1"][2] > 0 and rows["fc1"][3] == 0
    assert rows["fc2"][0] > 0 and rows["fc2"][2:] == [0.0, 0.0]
    op_model, x, loss_fn = models.op_growing_model()
    g = autoprec.guard(op_model, _policy({"::linear": "fp16"}), loss_fn, every=100, check_every=0)
    loss_fn(op_model(x), x).backward()
    (amax, bad, gmax, gbad), = g._watch.table.tolist()
    g.remove()
    assert g._watch.layers == ("::linear",) and amax > 0 and gmax > 0 and bad == gbad == 0


def test_raise_names_the_layer_and_the_gradient():
    """action='raise' on a growing gradient raises a GuardError naming the layer and the unscaled figure."""
    model = GrowingGradient()
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    g = autoprec.guard(model, POLICY, scaler=scaler, every=EVERY, check_every=0, action="raise")
    with pytest.raises(GuardError, match=r"layer 'mid' runs in fp16, but step \d+: mid fp16 -> bf16: \|grad\| max"):
        _train(model, STEPS, guard=g, scaler=scaler)
    g.remove()


def test_compiled_the_gradient_watch_adds_no_graph_break():
    """Under torch.compile(fullgraph=True) the gradient hook traces: the same promotion as eager, no graph break, one recompile."""
    torch._dynamo.reset()
    counters.clear()
    model = GrowingGradient()
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    g = autoprec.guard(model, POLICY, scaler=scaler, every=EVERY, check_every=0)
    losses, _ = _train(model, STEPS, guard=g, scaler=scaler,
                       run=torch.compile(model, fullgraph=True, backend="aot_eager"))
    g.remove()
    torch._dynamo.reset()
    assert [(e.step, e.layer, e.new) for e in g.events] == [(32, "mid", "bf16"), (32, "scaler", "65536")]
    assert all(map(math.isfinite, losses))
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_backward_once(reentrant):
    """A checkpointed FP16 layer's gradient is watched once per backward, with or without reentrant recomputation."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    g = autoprec.guard(model, _policy({"0": "fp16", "1": "fp32"}), every=1, check_every=0)
    x = torch.ones(2, 4, requires_grad=True)
    for factor in (3e4, 1e30):  # d loss / d y = factor x the weight row: finite, then inf in FP16
        y = checkpoint(model[0], x, use_reentrant=reentrant)
        (model[1](y) * factor).sum().backward()
    g._watch.read()
    g.remove()
    gmax, bad = g._watch.grads["0"]
    assert gmax == pytest.approx(3e4 * model[1].weight.abs().max().item(), rel=1e-2) and bad == 1


HOT, FACTOR = 3, 1e9  # rank 1's loss from step HOT on is multiplied by FACTOR: its FP16 gradient is inf


def _one_rank_overflows(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 1))
    ddp = DDP(model)
    g = autoprec.guard(ddp, _policy({"0": "fp16", "1": "fp32", "2": "fp32"}), every=2, check_every=0)
    for step in range(1, 7):
        gen = torch.Generator().manual_seed(100 * rank + step)
        x, y = torch.randn(8, 8, generator=gen), torch.randn(8, 1, generator=gen)
        loss = F.mse_loss(ddp(x).float(), y) * (FACTOR if rank == 1 and step >= HOT else 1.0)
        loss.backward()  # no optimizer step: the weights stay finite whatever rank 1's gradients
        model.zero_grad()
        g.step(loss, x)
    g.remove()
    return {"events": [e.to_dict() for e in g.events], "assignment": g.policy.assignment}


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_one_ranks_gradient_overflow_promotes_the_layer_on_both_ranks(tmp_path):
    """Two gloo ranks under DDP, only rank 1's FP16 gradient goes inf: both promote the layer at the same read."""
    r0, r1 = run_ranks(_one_rank_overflows, tmp_path)
    assert r0["events"] == r1["events"] and [(e["step"], e["layer"], e["new"]) for e in r0["events"]] == [(4, "0", "bf16")]
    assert "non-finite gradient in 2 backward passes" in r0["events"][0]["evidence"]
    assert r0["assignment"]["0"] == r1["assignment"]["0"] == "bf16"


def test_warn_leaves_the_scaler_and_the_policy_alone():
    """action='warn' on a growing gradient warns about the layer once and changes neither the policy nor the scale."""
    model = GrowingGradient()
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    g = autoprec.guard(model, POLICY, scaler=scaler, every=EVERY, check_every=0, action="warn")
    with pytest.warns(GuardWarning, match="mid fp16 -> bf16: \\|grad\\| max"):
        _, scales = _train(model, STEPS, guard=g, scaler=scaler)
    g.remove()
    assert [e.layer for e in g.events] == ["mid"] and g.policy is POLICY and scales[-1] < 1


def test_the_scale_of_the_last_read_rides_in_the_state():
    """state_dict keeps the scale of the last read, and a guard loading it keeps it."""
    model = GrowingGradient()
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    g = autoprec.guard(model, POLICY, scaler=scaler, every=EVERY, check_every=0)
    _train(model, 2 * EVERY, guard=g, scaler=scaler)
    state = g.state_dict()
    g.remove()
    g2 = autoprec.guard(model, POLICY, scaler=torch.amp.GradScaler("cpu", init_scale=1.0), every=EVERY, check_every=0)
    g2.load_state_dict(state)
    g2.remove()
    assert state["scale"] == scaler.get_scale() == INIT_SCALE and g2.state_dict()["scale"] == INIT_SCALE
