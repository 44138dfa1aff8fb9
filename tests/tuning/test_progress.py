"""Progress and tuning's own figures: each stage's bar counts the passes it planned and ran, and the peak
memory of tuning is measured per stage and reported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoprec
from autoprec.tuning import PeakMemory, Progress


class _Bars:
    """Stands in for tqdm: records each bar's description, final total and updates."""

    made: list["_Bars"] = []

    def __init__(self, total=None, desc="", unit="it", **kwargs) -> None:
        self.total, self.desc, self.unit, self.n, self.closed = total, desc, unit, 0, False
        self.first_total, self.descs = total, [desc]
        _Bars.made.append(self)

    @property
    def name(self) -> str:
        return self.desc.removeprefix("autoprec ").split(" (")[0]

    def set_description_str(self, desc, refresh=True) -> None:
        self.desc = desc
        self.descs.append(desc)

    def update(self, n=1) -> None:
        self.n += n

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    import tqdm.auto

    _Bars.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", _Bars)
    return _Bars.made


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4)), \
        torch.randn(256, 32)


def test_each_stage_bar_counts_the_passes_it_planned_and_ran(bars, one_thread):
    """Probe: 1 batch (the other is held out) + candidates x formats passes; search: its trials; the held-out
    check: FP32 and the policy on the held-out batch; training runs: their steps."""
    model, x = _model()
    policy = autoprec.tune(model, x, batches=[torch.randn(256, 32)], target="cuda", verify_steps=4, progress=True)
    st = policy.stats
    by_name = {b.name: b for b in bars}
    assert [b.name for b in bars] == ["trace", "probe", "search", "held-out check", "reference run", "verify"]
    # each bar opens on its real plan: no search bar that starts at the trial budget and then shrinks
    assert [b.first_total for b in bars] == [b.total for b in bars]
    assert [b.descs[0].split(" (")[1].split(",")[0].rstrip(")") for b in bars] == \
        [f"stage {k} of 6" for k in range(1, 7)]
    assert all(b.closed and b.n == b.total for b in bars), [(b.desc, b.n, b.total) for b in bars]
    assert by_name["probe"].unit == "pass"
    assert by_name["probe"].total == st["probe_passes"] == 1 + st["candidates"] * len(policy.formats) == 1 + 3 * 2
    assert by_name["held-out check"].total == st["held_out_passes"] == 2 and by_name["held-out check"].unit == "pass"
    assert by_name["search"].total == st["trials"] and by_name["search"].unit == "trial"
    assert by_name["reference run"].total == 4
    assert by_name["reference run"].n + by_name["verify"].n == st["verify_passes"]
    assert {k: (v["planned"], v["done"]) for k, v in st["stages"].items()} == \
        {k: (b.total, b.n) for k, b in by_name.items()}


def test_without_a_bar_the_stages_are_still_counted(bars, one_thread):
    """progress=False makes no bar, and the stats count the same passes."""
    model, x = _model()
    policy = autoprec.tune(model, x, target="cuda", verify_steps=2, progress=False)
    assert bars == []
    assert policy.stats["stages"]["probe"]["done"] == policy.stats["probe_passes"] == 1 + 3 * 2


def test_a_stage_that_needs_more_than_planned_raises_its_plan(bars):
    """A verification back-off round adds steps: the plan grows with them, done never exceeds planned."""
    p = Progress(True)
    p.stage("verify", 3)
    for _ in range(5):
        p.advance()
        assert bars[0].n <= bars[0].total
    p.close()
    assert (bars[0].n, bars[0].total) == (5, 5) and p.stages[0].planned == p.stages[0].done == 5


def test_each_bar_says_its_stage_and_the_time_left_for_the_whole_tune(bars):
    """"stage k of n" from the start; after a step, the time left: this stage's steps and the later stages'
    expected ones at the pace measured so far (a clock given to Progress, no wall-clock time)."""
    now = [0.0]
    p = Progress(True, stages=["trace", "probe", "search"], clock=lambda: now[0])
    p.stage("trace", 1)
    now[0] = 5.0  # the trace's time is not a pass: it does not set the pace
    p.advance()
    p.expect({"probe": 4, "search": 10})
    p.stage("probe", 4, unit="pass")
    assert bars[1].desc == "autoprec probe (stage 2 of 3)"
    now[0] += 2.0
    p.advance()
    assert bars[1].desc == "autoprec probe (stage 2 of 3, about 26s left)"  # (3 + 10) steps x 2 s
    now[0] += 6.0
    p.advance(3)
    p.stage("search", None, unit="trial")  # its plan is not known yet: no bar until it is
    assert len(bars) == 2 and p.description() == "search (stage 3 of 3, about 20s left)"  # 10 expected x 2 s
    p.plan(5)
    assert (bars[2].first_total, bars[2].desc) == (5, "autoprec search (stage 3 of 3, about 10s left)")
    now[0] += 4.0
    p.advance()
    assert bars[2].desc == "autoprec search (stage 3 of 3, about 10s left)"  # 12 s / 5 steps, 4 to go
    p.stage("extra", 2)  # a stage not named up front is counted on
    assert bars[3].desc == "autoprec extra (stage 4 of 4)"
    p.close()
    assert [(s.name, s.planned, s.done) for s in p.stages] == \
        [("trace", 1, 1), ("probe", 4, 4), ("search", 5, 1), ("extra", 2, 0)]


def test_peak_memory_is_measured_per_stage_and_reported(one_thread, tmp_path):
    """policy.stats has the peak (the largest stage's) and its breakdown by stage; the report's tuning line shows it."""
    model, x = _model()
    policy = autoprec.tune(model, x, target="cuda", verify_steps=2, progress=False)
    st = policy.stats
    assert list(st["peak_memory_mb_by_stage"]) == ["copy", "trace", "probe", "search", "held-out check",
                                                    "reference run", "verify"]
    # >= 0, not > 0: in a process that has run bigger things, a small tune may reuse memory already resident
    assert st["peak_memory_mb"] == max(st["peak_memory_mb_by_stage"].values()) >= 0
    assert st["peak_memory_kind"] == "process RSS"  # a CPU model
    line = next(ln for ln in policy.report().splitlines() if ln.startswith("- tuning:"))
    assert f"peak memory {st['peak_memory_mb']:.0f} MiB" in line and "by stage: copy" in line
    assert "peak memory by stage (MiB above the start): copy" in policy.report("html")
    policy.save(tmp_path / "p.json")
    assert autoprec.load(tmp_path / "p.json").stats == st


def test_the_meter_sees_memory_held_during_a_stage():
    """256 MiB held while a stage runs counts towards that stage's peak, not the next one's."""
    m = PeakMemory(torch.device("cpu"))
    m.stage("big")
    held = torch.ones(64 * 2 ** 20)  # 256 MiB, written (resident)
    m.sample()
    del held
    m.stage("small")
    m.sample()
    m.finish()
    mb = m.stats()["peak_memory_mb_by_stage"]
    assert mb["big"] >= 250 and mb["small"] < 100, mb


def test_a_hand_edited_memory_figure_still_renders():
    """Stats are free-form in a file: a null peak or a list where the breakdown was renders as it is."""
    from autoprec.policy import LayerEntry, Policy

    p = Policy(layers={"fc": LayerEntry("bf16", flops=10)},
               stats={"peak_memory_mb": None, "peak_memory_mb_by_stage": [1], "peak_memory_exact": "?"})
    assert "peak memory None MiB above the start (?)" in p.report()
    assert "peak memory by stage" not in p.report("html")
