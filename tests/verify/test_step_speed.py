"""The measured speed line: the race's choice from given timings, the record's round trip, the wording, and
real timed tunes checked for structure (fields present, medians positive), never for a time."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import autoprec
from autoprec import LayerEntry, Policy, StepSpeed
from autoprec.report import UNPROVEN, clearly_faster, first_failure, speed_lines, unproven
from autoprec.search import Decision
from autoprec.verify import Race, adopt, blanket, choose, measured_record
from tests.models import mlp, rotary_model

FAST, SLOW = (0.010, 0.0101, 0.0102), (0.013, 0.0131, 0.0132)


@pytest.mark.parametrize(("a", "b", "expected"), [
    (FAST, SLOW, True),
    (SLOW, FAST, False),
    (FAST, FAST, False),
    ((0.010, 0.011, 0.030), SLOW, False),  # one slow round: the scatter explains the gap
    ((), SLOW, False),
], ids=["faster", "slower", "same", "within-spread", "untimed"])
def test_clearly_faster_needs_a_gap_beyond_both_spreads(a, b, expected):
    """A candidate counts as faster only when the medians differ by more than the rounds' spreads together."""
    assert clearly_faster(a, b) is expected


def test_choose_takes_the_fastest_clear_winner_or_keeps_the_search():
    """The race ships the fastest alternative clearly faster than the search's choice, else the search's."""
    times = {"search": SLOW, "all bf16": FAST, "runner-up": (0.0115, 0.0116, 0.0117), "fp32": (0.02, 0.02, 0.02)}
    assert choose(times, "search", ["fp32", "runner-up", "all bf16"]) == "all bf16"
    assert choose(times, "search", ["fp32", "runner-up"]) == "runner-up"
    assert choose(times, "search", ["fp32"]) == "search"
    assert choose({"search": SLOW, "fp32": (0.0125, 0.0135, 0.013)}, "search", ["fp32"]) == "search"
    assert choose({"fp32": FAST}, "search", ["fp32"]) == "search"  # the search's own was not timed: no race


def test_blanket_keeps_failing_layers_and_their_weight_partners_fp32():
    """Every layer in the format, but those the probe found failing there and the layers tied to them."""
    a = blanket(["emb", "h.0", "head"], "bf16", {"emb": "range: ..."}, tied=[("emb", "head")])
    assert a == {"emb": "fp32", "h.0": "bf16", "head": "fp32"}


def test_adopt_moves_layers_and_says_why_before_the_evidence():
    """A layer the race moves keeps its evidence, prefixed with why it moved; the others are untouched."""
    d = {"a": Decision("a", "bf16", "cast", "bf16: loss err 1e-4"), "b": Decision("b", "fp32", "no gain", "modelled")}
    out = adopt(d, {"a": "fp32", "b": "bf16"}, "raced")
    assert out["a"] == Decision("a", "fp32", "no gain", "raced; bf16: loss err 1e-4")
    assert out["b"] == Decision("b", "bf16", "cast", "raced; modelled")
    assert adopt(d, {"a": "bf16", "b": "fp32"}, "raced") == d


def test_measured_record_names_the_shipped_variant_policy():
    """The record's ``policy`` rounds are the shipped assignment's: the alternative the race chose, or FP32's."""
    race = Race({"fp32": SLOW, "search": SLOW, "all bf16": FAST}, "all bf16", {}, (0.0, 0.0), {"bf16": ""}, "n")
    r = measured_record(race, modelled=0.7, profile="calibrated here")
    assert r.seconds["policy"] == FAST and r.seconds["search"] == SLOW and r.chosen == "all bf16"
    to_fp32 = measured_record(Race({"fp32": FAST, "search": SLOW}, "fp32", {}, (0.0, 0.0), {}, ""), modelled=0.7,
                              profile="x")
    assert to_fp32.seconds["policy"] == to_fp32.seconds["fp32"] == FAST


def _policy(**speed) -> Policy:
    return Policy(layers={"fc": LayerEntry("bf16")}, formats=("bf16",), speed=StepSpeed(**speed))


def test_speed_line_says_blanket_fails_with_the_layer_and_why():
    """A blanket format the probe found failing is named with its first failing layer and the reason."""
    p = _policy(source="measured", modelled=0.66, profile="calibrated here",
                seconds={"fp32": SLOW, "autocast bf16": FAST, "policy": SLOW},
                blanket={"bf16": first_failure({"rope::matmul": "range: bf16: |out| too large"})})
    line = speed_lines(p)[0]
    assert line.startswith("policy step time 1.00x FP32, 1.30x blanket BF16 autocast (measured here, median of 3 steps")
    assert line.endswith("; blanket BF16 fails: rope::matmul, range: bf16: |out| too large")
    assert "modelled 0.66x FP32 by the device profile (calibrated here); measured 1.00x" in speed_lines(p)[1]


def test_speed_line_recommends_a_safe_faster_blanket_format():
    """Blanket autocast that is numerically safe and clearly faster is recommended with its gain."""
    p = _policy(source="measured", modelled=0.8, seconds={"fp32": SLOW, "autocast bf16": FAST, "policy": SLOW},
                blanket={"bf16": ""})
    assert speed_lines(p)[0].endswith("; blanket BF16 is numerically safe here and 30% faster: use it")


@pytest.mark.parametrize("modelled_speed, seconds, doubted", [
    (0.32, {"fp32": SLOW, "autocast bf16": FAST}, True),      # profile: BF16 3.1x slower; measured 1.3x faster
    (3.0, {"fp32": FAST, "autocast bf16": SLOW}, True),       # profile: BF16 3x faster; measured 1.3x slower
    (0.9, {"fp32": SLOW, "autocast bf16": FAST}, False),      # the profile's figure is near FP32: no doubt
    (0.32, {"fp32": SLOW, "autocast bf16": SLOW}, False),     # the step agrees closely enough (no faster)
], ids=["profile-slower-step-faster", "profile-faster-step-slower", "profile-near-fp32", "step-same"])
def test_a_profile_the_measured_steps_contradict_is_doubted(modelled_speed, seconds, doubted):
    """Where the profile and the measured blanket step put a format on opposite sides of FP32 (a calibration made on
    a busy machine makes every layer "no gain"), the report says so and how to calibrate again."""
    p = Policy(layers={"fc": LayerEntry("fp32", reason="no gain")}, formats=("bf16",),
               stats={"format_speed": {"bf16": {"speed": modelled_speed, "faster": 0, "layers": 1}}},
               speed=StepSpeed("measured", 1.0, "calibrated here", {**seconds, "policy": SLOW}))
    lines = speed_lines(p)
    doubt = [line for line in lines if line.startswith("the device profile prices BF16 at ")]
    assert bool(doubt) == doubted, lines
    if doubted:
        assert f"{1 / modelled_speed:.2g}x the FP32 time over the matmul/conv layers" in doubt[0]
        assert "calibrate again on a quiet machine: `autoprec calibrate --fresh`" in doubt[0]


def test_modelled_speed_line_names_its_source():
    """For another target the line is the profile's figure, labelled as modelled and with where it comes from."""
    p = _policy(source="modelled", modelled=0.66, profile="built-in CUDA estimate", note="target cuda, tuned on cpu",
                blanket={"bf16": "attn::softmax, overflow: ..."})
    assert speed_lines(p) == ["modelled: policy step time 0.66x FP32 (built-in CUDA estimate, not measured: target "
                              "cuda, tuned on cpu); blanket BF16 fails: attn::softmax, overflow: ..."]
    assert speed_lines(Policy(layers={})) == []


def test_step_speed_round_trips_and_bad_rounds_are_refused(tmp_path):
    """The record survives save/load exactly; rounds that are not positive finite numbers name the field."""
    p = _policy(source="measured", modelled=0.66, profile="p", seconds={"fp32": SLOW, "policy": FAST},
                blanket={"bf16": ""}, chosen="runner-up", note="n")
    p.save(tmp_path / "p.json")
    assert autoprec.load(tmp_path / "p.json") == p
    data = json.loads((tmp_path / "p.json").read_text())
    data["speed"]["seconds"]["fp32"] = [0.01, -1]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(autoprec.PolicyError, match=r"speed: StepSpeed field \"seconds\['fp32'\]\" is \[0.01, -1\] "
                                                   r"\(list\); allowed: an object of variant -> list of step seconds"):
        autoprec.load(tmp_path / "bad.json")
    with pytest.raises(autoprec.PolicyError, match="StepSpeed field 'source' is 'guessed'"):
        StepSpeed("guessed", 0.5)


def test_suite_default_is_the_modelled_figure_with_timing_off():
    """In the suite ($AUTOPREC_MEASURE_SPEED=0) tune times nothing and says the figure is modelled, and why."""
    model, batch, loss_fn = mlp()
    policy = autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=0)
    assert policy.speed.source == "modelled" and policy.speed.seconds == {}
    assert policy.speed.modelled == policy.stats["modelled_cost_ratio"] > 0
    assert speed_lines(policy)[0].startswith("modelled: policy step time ")
    assert "step timing switched off" in speed_lines(policy)[0]


def test_another_target_is_modelled_even_with_timing_on():
    """A CUDA policy tuned on a CPU is not timed here: its figure is the profile's, labelled with its source."""
    model, batch, loss_fn = mlp()
    policy = autoprec.tune(model, batch, loss_fn, target="cuda", progress=False, verify_steps=0, measure_speed=True)
    assert policy.speed.source == "modelled" and policy.speed.note == "target cuda, tuned on cpu"
    assert speed_lines(policy)[0].startswith(f"modelled: policy step time {policy.speed.modelled:.2f}x FP32 (")


def test_measure_speed_must_be_a_bool():
    """A measure_speed that is not True, False or None is refused by name."""
    model, batch, loss_fn = mlp()
    with pytest.raises(autoprec.OptionError, match=r"measure_speed='yes' must be True, False or None"):
        autoprec.tune(model, batch, loss_fn, measure_speed="yes")


@pytest.fixture(scope="module")
def timed(one_thread):
    """A CPU tune that times its steps, on a model whose rotary angles ruin BF16 (blanket BF16 fails)."""
    model, batch, loss_fn = rotary_model(seq_len=512, max_freq=0.2, min_freq=0.02)
    before = [t.clone() for t in model.state_dict().values()]
    rng = torch.get_rng_state()
    policy = autoprec.tune(model, batch, loss_fn, target="cpu", progress=False, verify_steps=2, measure_speed=True)
    after = list(model.state_dict().values())
    return policy, all(torch.equal(a, b) for a, b in zip(before, after)), torch.equal(rng, torch.get_rng_state())


def test_timed_tune_records_rounds_of_every_variant(timed):
    """FP32, blanket BF16 autocast and the policy each have at least three positive rounds; the model's
    weights and the global RNG are as they were."""
    policy, weights_kept, rng_kept = timed
    s = policy.speed
    assert s.source == "measured" and {"fp32", "autocast bf16", "policy"} <= set(s.seconds)
    assert all(len(v) >= 3 and min(v) > 0 for v in s.seconds.values())
    assert s.median("policy") > 0 and math.isfinite(s.ratio("policy", "fp32"))
    assert s.modelled == policy.stats["modelled_cost_ratio"]
    assert s.chosen in ("search", "fp32", "runner-up", "all bf16")
    assert weights_kept and rng_kept


def test_timed_tune_says_why_blanket_bf16_fails_first(timed):
    """The speed line leads the report and names the layer blanket BF16 fails on, from the probe's evidence."""
    policy, _, _ = timed
    excluded = [k for k, e in policy.excluded().items()]
    assert excluded and policy.speed.blanket["bf16"].split(",")[0] in excluded
    first = speed_lines(policy)[0]
    assert first.startswith("policy step time ") and "x blanket BF16 autocast (measured here, median of " in first
    assert "; blanket BF16 fails: " in first
    assert policy.report().splitlines()[2] == f"**{first}**"
    assert f"<p><b>{first.split(' (')[0]}" in policy.report("html")
    assert json.loads(policy.report("json"))["speed_lines"][0] == first


def test_retime_times_the_shipped_policy_and_says_why(one_thread):
    """After a back-off the shipped policy is timed again beside FP32 and autocast; the note says why; the
    weights are restored."""
    from autoprec.probe import Snapshot, default_optimizer
    from autoprec.verify import retime

    model, batch, loss_fn = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    policy = Policy(layers={"fc1": LayerEntry("bf16")}, formats=("bf16",))
    race = Race({"search": SLOW}, "search", {}, (0.0, 0.0), unproven({"bf16": ""}), "")
    with Snapshot(list(model.parameters())) as snap:
        s = retime(model, [batch], loss_fn, policy, race, modelled=0.9, profile="p", why="verification backed off 2",
                   formats=("bf16",), device_type="cpu", optimizer=default_optimizer, seed=0, snapshot=snap)
    assert set(s.seconds) == {"fp32", "autocast bf16", "policy"}
    assert s.note == "re-timed after verification backed off 2"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert speed_lines(Policy(layers={}, formats=("bf16",), speed=s))[0].endswith(f"; blanket BF16 is {UNPROVEN}")


@settings(max_examples=100, deadline=None)
@given(source=st.sampled_from(["measured", "modelled"]), modelled=st.floats(0.0, 1e3),
       seconds=st.dictionaries(st.sampled_from(["fp32", "policy", "autocast bf16", "autocast fp16", "x"]),
                               st.lists(st.floats(1e-6, 10.0), min_size=1, max_size=4).map(tuple)),
       blanket_=st.dictionaries(st.sampled_from(["bf16", "fp16", "fp8?"]), st.text(max_size=8)),
       formats=st.lists(st.sampled_from(["fp16", "bf16"]), unique=True).map(tuple))
def test_speed_lines_render_any_valid_record(source, modelled, seconds, blanket_, formats):
    """Any record a file may hold renders: a first line that says measured or modelled, no exception."""
    speed = StepSpeed(source, modelled, seconds=seconds, blanket=blanket_)
    lines = speed_lines(Policy(layers={}, formats=formats, speed=speed))
    assert lines[0].startswith(("policy step time ", "modelled: policy step time "))


def test_speed_line_says_how_much_longer_a_slower_blanket_step_takes():
    """Blanket autocast clearly slower than the policy is named with the extra time its step takes."""
    p = _policy(source="measured", modelled=0.8, seconds={"fp32": SLOW, "autocast bf16": SLOW, "policy": FAST},
                blanket={"bf16": ""})
    assert speed_lines(p)[0].endswith("; blanket BF16 is numerically safe here, and its step takes 30% longer")
