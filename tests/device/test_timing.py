"""Kernel timing: a sample is k back-to-back calls between two events and one synchronize; the ladders; cuda:N."""

from __future__ import annotations

import time

import pytest
import torch

from autoprec.device._calibration import calibrate, ladders
from autoprec.device._timing import Clock, HostEvent, pinned
from autoprec.errors import OptionError


class Ticks:
    """A host clock that moves only when a timed callable runs, and a log of calls, events and synchronizes."""

    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []

    def read(self) -> float:
        self.log.append("event")
        return self.now

    def step(self, name: str, seconds: float):
        def call() -> None:
            self.log.append(name)
            self.now += seconds
        return call

    def samples(self) -> list[tuple[str, int]]:
        """The log cut at each synchronize: (callable, calls) of each sample, checking its shape."""
        out, seg = [], []
        for entry in self.log:
            if entry != "sync":
                seg.append(entry)
                continue
            assert seg[0] == "event" and seg[-1] == "event", seg  # the calls lie between the two events
            calls = seg[1:-1]
            assert len(set(calls)) == 1 and "event" not in calls, seg  # back to back, nothing in between
            out.append((calls[0], len(calls)))
            seg = []
        assert not seg, f"calls after the last synchronize: {seg}"
        return out


def clock_on(ticks: Ticks, sample_s: float = 1.0) -> Clock:
    """A CPU clock whose events read ``ticks`` and whose synchronize is logged; a far deadline."""
    clock = Clock(torch.device("cpu"), time.perf_counter() + 1e6, sample_s=sample_s)
    clock.event = lambda: HostEvent(ticks.read)
    clock.sync = lambda: ticks.log.append("sync")
    return clock


def test_a_sample_calls_back_to_back_and_synchronizes_once():
    """One sample: a start event, k calls with nothing between them, an end event, one synchronize; seconds per call."""
    ticks = Ticks()
    per_call = clock_on(ticks).sample(ticks.step("a", 0.25), 5)
    assert ticks.log == ["event"] + ["a"] * 5 + ["event", "sync"]
    assert per_call == pytest.approx(0.25)  # elapsed 1.25 s over 5 calls


def test_fastest_warms_up_then_times_k_calls_per_sample():
    """fastest: a warm-up and an estimate call of each, then rounds of one k-call sample each, k filling a sample."""
    ticks = Ticks()
    clock = clock_on(ticks)
    got = clock.fastest({"a": ticks.step("a", 0.125), "b": ticks.step("b", 0.25)}, reps=3, slice_s=1e6)
    warm = [("a", 1), ("a", 1), ("b", 1), ("b", 1)]
    assert ticks.samples() == warm + [("a", 8), ("b", 4)] * 3  # 1 s samples: 8 calls of a, 4 of b
    assert got == {"a": pytest.approx(0.125), "b": pytest.approx(0.25)}  # elapsed over k, not elapsed
    assert clock.timed == 4 + 3 * 12


def test_a_call_as_long_as_a_sample_is_one_call_per_sample_and_warmed_once():
    """A callable longer than a sample: one warm-up call (no estimate call), then samples of one call."""
    ticks = Ticks()
    got = clock_on(ticks, sample_s=0.5).fastest({"a": ticks.step("a", 2.0)}, reps=2, slice_s=1e6)
    assert ticks.samples() == [("a", 1), ("a", 1), ("a", 1)] and got == {"a": pytest.approx(2.0)}


def test_rounds_take_k_from_the_warm_up_and_rotate():
    """rounds: warm-up calls first, k from the last of them, the order rotating by one each round."""
    ticks = Ticks()
    times = clock_on(ticks).rounds({"a": ticks.step("a", 0.125), "b": ticks.step("b", 0.5)}, least=3, most=3,
                                   warmup=2)
    assert ticks.samples() == [("a", 1), ("b", 1)] * 2 + [("a", 8), ("b", 2), ("b", 2), ("a", 8), ("a", 8), ("b", 2)]
    assert times == {"a": [pytest.approx(0.125)] * 3, "b": [pytest.approx(0.5)] * 3}


def test_rounds_without_a_warm_up_take_one_call_per_sample():
    """rounds(warmup=0) makes no untimed call: each sample is one call."""
    ticks = Ticks()
    clock_on(ticks).rounds({"a": ticks.step("a", 0.125)}, least=2, most=2, warmup=0)
    assert ticks.samples() == [("a", 1), ("a", 1)]


def test_paired_times_both_with_the_calls_of_the_slower():
    """paired: both steps warmed up, then samples of as many calls as fill a sample for the slower, in turn first."""
    ticks = Ticks()
    diff = clock_on(ticks).paired(ticks.step("a", 0.25), ticks.step("b", 0.125), reps=3, slice_s=1e6)
    assert ticks.samples() == [("a", 1), ("a", 1), ("b", 1), ("b", 1), ("a", 4), ("b", 4), ("b", 4), ("a", 4),
                               ("a", 4), ("b", 4)]
    assert diff == pytest.approx(0.125)


def test_calls_per_sample_fill_the_sample_and_are_bounded():
    """k = sample seconds over the estimate, at least one, at most MOST_CALLS."""
    clock = Clock(torch.device("cpu"), 0.0, sample_s=0.01)
    assert [clock.calls(s) for s in (0.02, 0.01, 0.004, 1e-12)] == [1, 1, 2, 1000]


def test_the_host_clock_times_real_calls():
    """On a CPU with the default events and synchronize, a sample still makes exactly k calls and times them."""
    calls = []
    per_call = Clock(torch.device("cpu"), 0.0).sample(lambda: calls.append(sum(range(1000))), 7)
    assert len(calls) == 7 and per_call > 0


def test_the_cuda_ladder_reaches_8192_and_the_cpu_ladder_stays():
    """The GEMM ladder on CUDA climbs to 8192; a CPU's stops at 1024 (the budget bounds both)."""
    cuda, cpu = {k: s for k, s, _ in ladders("cuda")}, {k: s for k, s, _ in ladders("cpu")}
    assert cuda["matmul"][-3:] == (2048, 4096, 8192) and cpu["matmul"][-1] == 1024
    assert all(cuda[k][:len(cpu[k])] == cpu[k] for k in cpu)  # the GPU's ladders extend the CPU's
    assert [k for k, _, _ in ladders("cuda")] == ["matmul", "attention", "conv"]
    assert [share for _, _, share in ladders("cuda")] == [0.6, 0.8, 1.0]


@pytest.mark.parametrize("given, index", [("cuda:1", 1), (torch.device("cuda", 3), 3)], ids=["str", "device"])
def test_a_cuda_index_is_kept(given, index):
    """cuda:N stays N in the device a clock times on (no CUDA call is needed to pick it)."""
    assert pinned(given) == torch.device("cuda", index)
    assert Clock(torch.device(given), 0.0).device == torch.device("cuda", index)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() > 1, reason="needs at most one GPU")
def test_calibrating_a_cuda_device_this_process_lacks_says_so():
    """calibrate('cuda:1') without that GPU is a typed error naming the devices there are, not a CUDA assert."""
    with pytest.raises(OptionError, match=r"calibrate device 'cuda:1': this process sees (no CUDA device|1 CUDA "
                                          r"device\(s\), cuda:0 to cuda:0)"):
        calibrate("cuda:1", seconds=0.1, cache=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_sample_runs_on_the_given_device_and_leaves_the_current_one():
    """On a GPU: a sample of a matmul on the last device times it there, with CUDA events, and the current device stays."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x = torch.randn(256, 256, device=dev)
    calls = []
    current = torch.cuda.current_device()
    per_call = Clock(dev, 0.0).sample(lambda: calls.append(x @ x), 5)
    assert len(calls) == 5 and per_call > 0 and torch.cuda.current_device() == current
    assert all(c.device == dev for c in calls)
