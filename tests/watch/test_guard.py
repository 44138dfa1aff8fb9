"""autoprec.guard: a policy watched during training, promoted before a growing activation overflows FP16."""

from __future__ import annotations

import copy
import html
import json
import logging
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import autoprec
from autoprec import GuardError, GuardWarning, LayerEntry, OptionError, Policy
from autoprec.runtime import installed
from autoprec.watch import _watch
from tests.helpers import count_syncs
from tests.models import FP16_MAX, GROWTH, growing_model, mlp, op_growing_model

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, EVERY = 60, 4
assert GROWTH ** EVERY < 8  # the growth between two reads is less than the headroom: a read comes before an overflow


def _policy(layers: dict[str, str]) -> Policy:
    """A CUDA policy written by hand (its FP16 layers emulated on this CPU), BF16 allowed."""
    return Policy(layers={k: LayerEntry(p) for k, p in layers.items()}, target="cuda", formats=("fp16", "bf16"))


GROWING = _policy({"fc": "fp32", "grow": "fp16", "norm": "fp32", "head": "fp32"})
OP_GROWING = _policy({"fc": "fp32", "::linear": "fp16", "norm": "fp32", "head": "fp32"})  # op_growing_model's


def _train(model, x, loss_fn, steps, *, policy=None, guard=None, opt=None):
    """SGD steps with ``policy`` installed (or ``guard`` watching); the losses, as Python floats at the end."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01)
    handle = policy.apply(model) if policy is not None else None
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if guard is not None:
            guard.step(loss, x)
    if handle is not None:
        handle.remove()
    return [float(v) for v in losses]


def _first_bad(losses):
    return next((i + 1 for i, v in enumerate(losses) if not math.isfinite(v)), None)


def test_a_growing_activation_is_promoted_before_fp16_overflows():
    """The unguarded FP16 run goes non-finite mid-run; the guard promotes the layer to BF16 before that and trains on."""
    model, x, loss_fn = growing_model()
    fp32 = _train(copy.deepcopy(model), x, loss_fn, STEPS)
    bare = _train(copy.deepcopy(model), x, loss_fn, STEPS, policy=GROWING)
    g = autoprec.guard(model, GROWING, loss_fn, every=EVERY)
    guarded = _train(model, x, loss_fn, STEPS, guard=g)
    g.remove()
    assert all(map(math.isfinite, fp32))
    broke = _first_bad(bare)
    assert broke is not None and broke > EVERY  # fine at the start: a hazard of training, not of step 0
    assert [(e.layer, e.action, e.old, e.new) for e in g.events] == [("grow", "adapt", "fp16", "bf16")]
    assert g.events[0].step < broke and all(map(math.isfinite, guarded))
    assert guarded[:g.events[0].step] == bare[:g.events[0].step]  # nothing changed before it acted
    assert g.policy.assignment["grow"] == "bf16" and GROWING.assignment["grow"] == "fp16"
    assert f"x headroom 8 > {FP16_MAX:g}" in g.events[0].evidence
    assert g.events[0].evidence.startswith(f"step {g.events[0].step}: grow fp16 -> bf16: |out| max ")


def test_an_op_entry_is_watched_and_promoted_like_a_module():
    """A policy entry of the form 'module::op' (a functional op in the root's own code) is watched as a module's
    is: the growing F.linear is promoted before FP16 overflows, where the unguarded run goes non-finite."""
    model, x, loss_fn = op_growing_model()
    policy = OP_GROWING
    bare = _train(copy.deepcopy(model), x, loss_fn, STEPS, policy=policy)
    g = autoprec.guard(model, policy, loss_fn, every=EVERY)
    assert g._watch.layers == ("::linear",)
    guarded = _train(model, x, loss_fn, STEPS, guard=g)
    g.remove()
    broke = _first_bad(bare)
    assert broke is not None and broke > EVERY
    assert [(e.layer, e.old, e.new) for e in g.events] == [("::linear", "fp16", "bf16")] and g.events[0].step < broke
    assert g.events[0].evidence.startswith(f"step {g.events[0].step}: ::linear fp16 -> bf16: |out| max ")
    assert all(map(math.isfinite, guarded)) and g.policy.assignment["::linear"] == "bf16"
    assert g._watch.state_dict()["table"][0][0] > 0  # watched on in BF16 after the promotion


@pytest.mark.parametrize("build,policy", [(growing_model, GROWING), (op_growing_model, OP_GROWING)],
                         ids=["module", "op-entry"])
def test_compiled_fullgraph_the_guard_adds_no_break_and_a_revision_recompiles_once(build, policy):
    """Under torch.compile(fullgraph=True) the watch is in the graph (a module's, and an op entry's in the root's own
    code): the guard acts at the eager run's step, training stays finite, and its one revision makes one more graph."""
    from torch._dynamo.utils import counters

    model, x, loss_fn = build()
    twin = copy.deepcopy(model)
    g = autoprec.guard(model, policy, loss_fn, every=EVERY)
    _train(model, x, loss_fn, STEPS, guard=g)
    g.remove()
    assert g.events
    torch._dynamo.reset()
    counters.clear()
    g2 = autoprec.guard(twin, policy, loss_fn, every=EVERY)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    opt, losses = torch.optim.SGD(twin.parameters(), lr=0.01), []
    for _ in range(STEPS):
        loss = loss_fn(compiled(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        g2.step(loss, x)
    g2.remove()
    torch._dynamo.reset()
    assert [(e.step, e.layer, e.new) for e in g2.events] == [(e.step, e.layer, e.new) for e in g.events]
    assert all(math.isfinite(float(v)) for v in losses)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


def test_a_benign_model_sees_no_action():
    """An MLP all in FP16 trains 100 steps under the guard: no event, the policy given stays in force."""
    model, x, loss_fn = mlp()
    policy = _policy({"fc1": "fp16", "fc2": "fp16", "fc3": "fp16"})
    g = autoprec.guard(model, policy, loss_fn, every=10)
    losses = _train(model, x, loss_fn, 100, guard=g)
    g.remove()
    assert g.events == [] and g.policy is policy and all(map(math.isfinite, losses))


def test_the_watch_syncs_once_every_every_steps(monkeypatch):
    """Over 40 steps at every=10 the guard reads the device 4 times, and adds no other host sync."""
    model, x, loss_fn = mlp()
    policy = _policy({"fc1": "fp16", "fc2": "bf16", "fc3": "fp32"})
    reads = []
    monkeypatch.setattr(_watch, "_host", lambda table, _host=_watch._host: reads.append(1) or _host(table))
    counts = count_syncs(monkeypatch)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = policy.apply(model)
    for _ in range(40):  # the same loop without the guard: what it syncs on its own
        loss = loss_fn(model(x), x)
        loss.backward(); opt.step(); opt.zero_grad()
    handle.remove()
    alone, counts["n"] = counts["n"], 0
    g = autoprec.guard(model, policy, loss_fn, every=10)
    for _ in range(40):
        loss = loss_fn(model(x), x)
        loss.backward(); opt.step(); opt.zero_grad()
        g.step(loss, x)
    g.remove()
    assert len(reads) == 4 and counts["n"] - alone == 4


class _Ops(TorchDispatchMode):
    """Records each aten op with the largest number of elements among its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sizes = [a.numel() for a in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, max(sizes, default=0)))
        return func(*args, **(kwargs or {}))


def _forward_ops(model, x, install):
    handle = install(model)
    with torch.no_grad(), _Ops() as mode:
        model(x)
    handle.remove()
    return mode.ops


def test_the_watch_adds_one_pass_over_each_16_bit_output_and_folds_all_passes_in_a_fixed_number_of_ops():
    """Per 16-bit layer and forward the eager watch adds one reduction over the output (aminmax, of a detached view)
    and nothing else; the fold that the read runs (Watch.fold) takes the same ops for 1 forward and for 5 of them,
    and its figures are those of the traced observer's per-pass fold (the same model under torch.compile)."""
    model, x, loss_fn = mlp()
    policy = _policy({"fc1": "fp16", "fc2": "bf16", "fc3": "fp32"})
    plain = _forward_ops(model, x, policy.apply)
    g = autoprec.guard(model, policy, loss_fn)
    with torch.no_grad(), _Ops() as mode:
        model(x)
    added = list(mode.ops)
    for op in plain:
        added.remove(op)
    assert sorted(name for name, _ in added) == ["aminmax", "aminmax", "detach", "detach"]  # detach: a view, no copy
    folds = []
    for forwards in (1, 5):
        for _ in range(forwards):
            model(x)
        with _Ops() as mode:
            g._watch.fold()
        folds.append([name for name, _ in mode.ops])
    eager = g._watch.state_dict()["table"]
    g.remove()
    assert folds[0] == folds[1] and len(folds[1]) < 5 * 2 * 6  # the per-pass fold took 6 ops per layer and forward
    torch._dynamo.reset()
    g2 = autoprec.guard(model, policy, loss_fn)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for _ in range(7):  # the eager watch saw 1 + 1 + 5 forwards
            compiled(x)
    traced = g2._watch.state_dict()["table"]
    g2.remove()
    torch._dynamo.reset()
    assert g2._watch._pending == [] and traced == eager


def test_passes_waiting_for_a_read_stay_bounded(monkeypatch):
    """Forwards with no read in between (an evaluation loop) fold early at PENDING_LIMIT waiting passes: the list
    stays under it, and the figures are those of one fold at the end."""
    model, x, loss_fn = mlp()
    policy = _policy({"fc1": "fp16", "fc2": "bf16", "fc3": "fp32"})
    tables = []
    for limit in (_watch.PENDING_LIMIT, 5):
        monkeypatch.setattr(_watch, "PENDING_LIMIT", limit)
        g = autoprec.guard(model, policy, loss_fn)
        sizes = []
        with torch.no_grad():
            for i in range(12):
                model(x * (i + 1))
                sizes.append(len(g._watch._pending))
        tables.append(g._watch.state_dict()["table"])
        g.remove()
    assert max(sizes) < 5 and sizes[-1] == 24 % 5 and tables[0] == tables[1]


def test_action_raise_names_the_layer_the_figures_and_the_fix():
    """action='raise' stops the run at the read that sees the range leave FP16, and leaves the policy as it was."""
    model, x, loss_fn = growing_model()
    g = autoprec.guard(model, GROWING, loss_fn, every=EVERY, action="raise")
    with pytest.raises(GuardError, match=r"layer 'grow' runs in fp16, but step \d+: grow fp16 -> bf16: \|out\| max "
                                         r"\S+ x headroom 8 > 65504: its output no longer fits fp16; run it in bf16"
                       ) as info:
        _train(model, x, loss_fn, STEPS, guard=g)
    g.remove()
    assert info.value.event == g.events[0] and g.policy is GROWING


def test_action_warn_logs_and_leaves_the_policy(caplog):
    """action='warn' logs and warns once for the layer, and never changes the policy."""
    model, x, loss_fn = growing_model()
    g = autoprec.guard(model, GROWING, loss_fn, every=EVERY, action="warn")
    with pytest.warns(GuardWarning, match="grow fp16 -> bf16") as warned, caplog.at_level(logging.WARNING, "autoprec"):
        _train(model, x, loss_fn, STEPS, guard=g)
    g.remove()
    assert g.policy is GROWING and [e.action for e in g.events] == ["warn"] and len(warned) == 1
    assert "grow fp16 -> bf16" in caplog.text and "not changed" in caplog.text


def test_the_revised_policy_saves_its_history(tmp_path):
    """guard.policy.save() writes the events in stats['guard_events'], loads back equal, and its report lists them."""
    model, x, loss_fn = growing_model()
    g = autoprec.guard(model, GROWING, loss_fn, every=EVERY)
    _train(model, x, loss_fn, STEPS, guard=g)
    g.remove()
    g.policy.save(tmp_path / "p.json")
    back = autoprec.load(tmp_path / "p.json")
    assert back == g.policy and back.stats["guard_events"] == [e.to_dict() for e in g.events]
    assert back.layers["grow"].detail == g.events[0].evidence
    e = g.events[0]
    why = e.evidence.removeprefix(f"step {e.step}: grow fp16 -> bf16: ")
    assert why != e.evidence  # the table's columns say the step and the change; the cell says the figures
    md, page = back.report("md"), back.report("html")
    assert "## Revised during training (autoprec.guard)" in md
    assert f"| {e.step} | `grow` | fp16 -> bf16 | {why.replace('|', chr(92) + '|')} |" in md
    assert f"<td class=num>{e.step}</td><td><code>grow</code></td><td>fp16 -&gt; bf16</td>" in page
    assert html.escape(why) in page
    assert json.loads(back.report("json"))["guard_events"] == [{**e.to_dict(), "evidence": why}]


def test_state_dict_round_trip_resumes_with_the_revised_policy_and_counters():
    """A run saved after the guard acted, resumed in a fresh model and guard, trains on exactly as the uninterrupted one."""
    model, x, loss_fn = growing_model()
    fresh = copy.deepcopy(model)
    g = autoprec.guard(model, GROWING, loss_fn, every=EVERY)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _train(model, x, loss_fn, 48, guard=g, opt=opt)
    assert g.events  # it acted before the save
    saved = json.loads(json.dumps({"model": {k: v.tolist() for k, v in model.state_dict().items()},
                                   "opt": None, "guard": g.state_dict()}))
    opt_state = copy.deepcopy(opt.state_dict())
    rest = _train(model, x, loss_fn, 12, guard=g, opt=opt)
    g.remove()

    fresh.load_state_dict({k: torch.tensor(v) for k, v in saved["model"].items()})
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.01, momentum=0.9)
    opt2.load_state_dict(opt_state)
    g2 = autoprec.guard(fresh, GROWING, loss_fn, every=EVERY)
    g2.load_state_dict(saved["guard"])
    assert g2.policy == Policy.from_dict(saved["guard"]["policy"]) and g2.policy.assignment["grow"] == "bf16"
    assert g2.state_dict() == saved["guard"]
    assert _train(fresh, x, loss_fn, 12, guard=g2, opt=opt2) == rest
    assert g2.state_dict() == g.state_dict()
    g2.remove()


def test_remove_leaves_the_model_as_before():
    """After the guard acted (two installs) and was removed, no module is patched and the model computes as before."""
    model, x, loss_fn = growing_model()
    g = autoprec.guard(model, GROWING, loss_fn, every=EVERY)
    _train(model, x, loss_fn, STEPS, guard=g)
    assert g.events
    untouched = copy.deepcopy(model).eval()
    g.remove()
    g.remove()  # idempotent
    assert not any(installed(m) for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in untouched.modules()]
    assert type(model.grow).__name__ == "Growing" and type(model.grow) is type(untouched.grow)
    assert torch.equal(model.eval()(x), untouched(x))
    with pytest.raises(OptionError, match=r"guard.step\(\) after guard.remove\(\)"):
        g.step()


def test_a_state_that_does_not_fit_the_model_leaves_the_guard_as_it_was():
    """load_state_dict with a policy for another model raises a PolicyError and the guard goes on with its policy."""
    model, x, loss_fn = growing_model()
    g = autoprec.guard(model, GROWING, loss_fn, every=EVERY)
    state = g.state_dict()
    state["policy"]["layers"]["missing"] = state["policy"]["layers"]["grow"]
    with pytest.raises(autoprec.PolicyError, match="layers naming modules the model does not have: missing"):
        g.load_state_dict(state)
    assert g.policy is GROWING and installed(model.grow) and g.state_dict()["step"] == 0
    _train(model, x, loss_fn, 8, guard=g)
    assert g.state_dict()["watch"]["table"][0][0] > 0  # still watching
    g.remove()


@pytest.mark.parametrize(("option", "message"), [({"every": 0}, r"guard\(every=0\): a whole number of steps"),
                                                 ({"action": "stop"}, r"guard\(action='stop'\): use one of 'adapt'"),
                                                 ({"headroom": 0.5}, r"guard\(headroom=0.5\): a number of at least 1"),
                                                 ({"check_every": -1}, r"guard\(check_every=-1\): a whole number of "
                                                  r"steps \(e.g. 500, the default: 10 x every\)"),
                                                 ({"check_every": 2.5}, r"guard\(check_every=2.5\): a whole number")],
                         ids=["every", "action", "headroom", "check_every-negative", "check_every-float"])
def test_bad_options_are_refused(option, message):
    """A bad every, action, headroom or check_every is an OptionError naming it, and nothing is installed."""
    model, _, _ = mlp()
    with pytest.raises(OptionError, match=message):
        autoprec.guard(model, GROWING, **option)
    assert not any(installed(m) for m in model.modules())


def test_a_policy_file_name_is_refused():
    """guard takes a Policy object: a path is a PolicyError that says how to load it."""
    model, _, _ = mlp()
    with pytest.raises(autoprec.PolicyError, match=r"guard takes an autoprec.Policy, got str: use autoprec.load"):
        autoprec.guard(model, "model.autoprec.json")


def test_an_fp8_layer_is_watched_and_goes_back_to_bf16():
    """An FP8 Linear's output is watched like a 16-bit layer's: a non-finite output (a batch with an inf, which
    torchao's amax scaling turns into NaN) moves it to BF16, its recipe dropped, and the revised policy saves."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    policy = Policy(layers={"0": LayerEntry("fp8", recipe="tensorwise"), "2": LayerEntry("bf16")}, target="cuda",
                    formats=("bf16", "fp8"))
    g = autoprec.guard(model, policy, every=1, check_every=0)
    assert g._watch.layers == ("0", "2")
    x = torch.randn(8, 32)
    model(x).float().sum().backward()
    g.step()
    assert not g.events
    x[0, 0] = math.inf
    model(x).float().sum().backward()
    g.step()
    g.remove()
    assert [(e.layer, e.old, e.new) for e in g.events][0] == ("0", "fp8", "bf16")
    assert "non-finite output" in g.events[0].evidence
    assert g.policy.layers["0"].precision == "bf16" and g.policy.layers["0"].recipe == ""
    assert Policy.from_dict(g.policy.to_dict()).layers["0"].precision == "bf16"
