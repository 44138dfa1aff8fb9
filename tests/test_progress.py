"""Progress and tuning's own figures: each stage's bar counts the passes it planned and ran, and the peak
memory of tuning is measured per stage and reported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoprec
from autoprec._memory import PeakMemory
from autoprec._progress import Progress


class _Bars:
    """Stands in for tqdm: records each bar's description, final total and updates."""

    made: list["_Bars"] = []

    def __init__(self, total=None, desc="", unit="it", **kwargs) -> None:
        self.total, self.desc, self.unit, self.n, self.closed = total, desc, unit, 0, False
        _Bars.made.append(self)

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
    """Probe: 2 batches + candidates x formats passes; search: its trials; training runs: their steps."""
    model, x = _model()
    policy = autoprec.tune(model, x, batches=[torch.randn(256, 32)], target="cuda", verify_steps=4, progress=True)
    st = policy.stats
    by_name = {b.desc.removeprefix("autoprec "): b for b in bars}
    assert list(by_name) == ["trace", "probe", "search", "reference run", "verify"]
    assert all(b.closed and b.n == b.total for b in bars), [(b.desc, b.n, b.total) for b in bars]
    assert by_name["probe"].unit == "pass"
    assert by_name["probe"].total == st["probe_passes"] == 2 + st["candidates"] * len(policy.formats) == 2 + 3 * 2
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


def test_peak_memory_is_measured_per_stage_and_reported(one_thread, tmp_path):
    """policy.stats has the peak (the largest stage's) and its breakdown by stage; the report's tuning line shows it."""
    model, x = _model()
    policy = autoprec.tune(model, x, target="cuda", verify_steps=2, progress=False)
    st = policy.stats
    assert list(st["peak_memory_mb_by_stage"]) == ["copy", "trace", "probe", "search", "reference run", "verify"]
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
