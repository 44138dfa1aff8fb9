"""The loss-scale search: GradScaler settings from measured gradient ranges and trajectories."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autoprec.probe import HIST_HI, HIST_LO, Probe, Ranges, Trajectory, suggest_scale
from autoprec.search import grad_trajectory, loss_table, search_scaler, simulate


def _probe(center_log2: int, spread: int = 6) -> Probe:
    """Gradients log-uniform over 2**(center - spread) .. 2**center."""
    hist = [0] * (HIST_HI - HIST_LO)
    for e in range(center_log2 - spread, center_log2 + 1):
        hist[e - HIST_LO] = 100
    gmax = 2.0 ** (center_log2 + 1)
    r = Ranges(1.0, gmax, tuple(hist), tuple(hist))
    return Probe(1.0, {"fc": r}, {}, suggest_scale(gmax, 8.0), gmax, (), 0, ("fp16",))


def _curve(slope_log2_per_step: float, steps: int = 20, jitter: float = 0.2, seed: int = 0) -> Trajectory:
    rng = np.random.default_rng(seed)
    g = 2.0 ** (slope_log2_per_step * np.arange(steps) + jitter * rng.standard_normal(steps))
    return Trajectory(tuple([1.0] * steps), tuple(float(x) for x in g))


def _defaults_cost(probe: Probe, curve: Trajectory | None) -> float:
    table, off = loss_table(probe.ranges["fc"].grad_hist)
    ceiling = math.log2(65504 / probe.grad_absmax)
    traj = grad_trajectory(curve, 1000, 0, 8.0)
    return simulate(traj, ceiling, table, off, init_log2=math.log2(probe.loss_scale), growth_interval=2000,
                    backoff=0.5)[1]


@pytest.mark.parametrize("slope", [-0.2, 0.0, 0.2, 0.4], ids=["shrinking", "flat", "growing", "fast-growing"])
def test_chosen_settings_replayed_on_a_real_grad_scaler_skip_what_was_predicted(slope):
    """The search's prediction is real: its settings on torch.amp.GradScaler, over the gradient trajectory it
    simulated, skip exactly the predicted steps, and no more than torch's defaults skip there."""
    probe, curve = _probe(-30), _curve(slope)
    choice = search_scaler(probe, ["fc"], curve, n_trials=25)
    absolute = grad_trajectory(curve, 1000, 0, 8.0) + math.log2(probe.grad_absmax)
    real = _real_scaler_skips(absolute, init_log2=math.log2(choice.init_scale),
                              growth_interval=choice.growth_interval, backoff=choice.backoff_factor)
    assert real == round(choice.skip_rate * 1000)
    defaults = _real_scaler_skips(absolute, init_log2=math.log2(probe.loss_scale), growth_interval=2000, backoff=0.5)
    assert real <= defaults
    assert choice.init_scale <= probe.loss_scale  # never less headroom than the probe's range allows


def test_growing_gradients_start_lower_to_avoid_skips():
    """When gradients grow during training, a start at the range ceiling would skip steps: the search starts lower."""
    probe, curve = _probe(-30), _curve(0.4)
    choice = search_scaler(probe, ["fc"], curve, n_trials=30)
    assert _defaults_cost(probe, curve) > choice.lost
    assert choice.init_scale < probe.loss_scale or choice.backoff_factor != 0.5


def test_shrinking_gradients_grow_the_scale_sooner():
    """When gradients shrink towards FP16's subnormals, the scaler grows more often than every 2000 steps."""
    probe, curve = _probe(-38, spread=30), _curve(-0.3)
    choice = search_scaler(probe, ["fc"], curve, n_trials=30)
    assert choice.growth_interval < 2000
    assert choice.lost < _defaults_cost(probe, curve)


def test_simulation_skips_when_the_scale_overflows():
    """A scale above the overflow ceiling skips steps and backs off until it fits."""
    table, off = loss_table([0] * (HIST_HI - HIST_LO))
    skip, _ = simulate(np.zeros(100), 16.0, table, off, init_log2=20, growth_interval=1000, backoff=0.5)
    assert skip == pytest.approx(5 / 100)  # 20 -> 19 -> 18 -> 17 -> 16 -> 15: five skipped steps


def _real_scaler_skips(log2_grad: np.ndarray, *, init_log2: float, growth_interval: int, backoff: float) -> int:
    """Steps a real torch.amp.GradScaler skips when the true largest gradient of each step is 2**log2_grad[i],
    scaled and held in FP16 as a scaled backward pass holds it."""
    import torch

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** init_log2, growth_factor=2.0, backoff_factor=backoff,
                                  growth_interval=growth_interval)
    skips = 0
    for g in log2_grad:
        scaler.scale(torch.ones(()))  # a step's scaled loss (its backward is written out below)
        before = scaler.get_scale()
        p.grad = (torch.tensor([2.0 ** float(g)], dtype=torch.float64) * before).to(torch.float16).float()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        skips += scaler.get_scale() < before
    return skips


@pytest.mark.parametrize("init_log2,growth_interval,backoff,slope", [
    (20, 5, 0.5, 0.0), (10, 3, 0.5, 0.1), (14, 2, 0.25, -0.05), (24, 4, 0.25, 0.2), (8, 1000, 0.5, 0.3),
], ids=["overflow-start", "growing", "shrinking-quarter", "high-start-quarter", "late-overflow"])
def test_simulation_skips_the_steps_a_real_grad_scaler_skips(init_log2, growth_interval, backoff, slope):
    """simulate() against torch.amp.GradScaler on the same gradients: the same steps are skipped.

    Gradients sit at half-integer log2 values, so no scaled value lands on FP16's overflow edge where
    rounding, not the scale, would decide."""
    rng = np.random.default_rng(0)
    log2_grad = np.round(slope * np.arange(60) + rng.normal(0, 1.0, 60)) + 0.5
    table, off = loss_table([0] * (HIST_HI - HIST_LO))
    skip_rate, _ = simulate(log2_grad, math.log2(65504), table, off, init_log2=init_log2,
                            growth_interval=growth_interval, backoff=backoff)
    real = _real_scaler_skips(log2_grad, init_log2=init_log2, growth_interval=growth_interval, backoff=backoff)
    assert real > 0  # each case exercises skipping
    assert round(skip_rate * len(log2_grad)) == real
