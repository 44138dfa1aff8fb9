"""Stage 3, search (loss scale): GradScaler settings for the FP16 layers, from measured gradients.

Inputs are measurements: the probe's log2 histogram of the gradients reaching the FP16 layers and
their largest value, and the FP32 reference trajectory's largest parameter gradient per step
(its trend and its step-to-step jitter). A GradScaler with settings ``(init_scale,
growth_interval, backoff_factor)`` is simulated over ``horizon`` steps exactly as
``torch.amp.GradScaler`` behaves (skip and back off on overflow, double after ``growth_interval``
clean steps), with the gradient scale following the measured trend (for five times the span it
was measured over, and at most ``2**max_drift``) and jitter drawn from the measured residuals. Each step costs the fraction of gradient information it loses: a
skipped step loses all of it, a clean step the share of FP16 gradient values that flush to zero
(and half the share that falls into subnormals). Optuna's TPE minimises the mean loss, seeded
with the range-based suggestion and torch's defaults.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..core._formats import info
from ..probe._records import Probe
from ..probe._reductions import HIST_LO
from ..probe._training import Trajectory

__all__ = ["ScalerChoice", "GROWTH_INTERVALS", "BACKOFF_FACTORS", "simulate", "search_scaler", "loss_table", "grad_trajectory"]

log = logging.getLogger("autoprec.loss_scale")

GROWTH_INTERVALS = (100, 250, 500, 1000, 2000, 4000)
BACKOFF_FACTORS = (0.25, 0.5)


@dataclass(frozen=True)
class ScalerChoice:
    """The chosen settings and what the simulation predicts for them."""

    init_scale: float
    growth_interval: int
    backoff_factor: float
    skip_rate: float         # predicted fraction of skipped steps
    lost: float              # predicted mean fraction of gradient information lost per step
    trials: int


def loss_table(hist: Sequence[int]) -> tuple[np.ndarray, int]:
    """lost[k]: information lost when every value's log2 is shifted by k - offset (flushed + subnormal/2)."""
    h = np.asarray(hist, dtype=np.float64)
    total = h.sum()
    cum = np.concatenate([[0.0], np.cumsum(h)]) / max(total, 1.0)   # cum[i] = share with log2 < HIST_LO + i
    fp16 = info("fp16")
    zero_exp = math.floor(math.log2(fp16.subnormal / 2))              # below this: flushed to zero
    normal_exp = math.floor(math.log2(fp16.tiny))                    # below this: subnormal, fewer digits
    offset = 200
    shifts = np.arange(-offset, offset + 1)

    def share_below(exp: int) -> np.ndarray:
        idx = np.clip(exp - HIST_LO - shifts, 0, len(h))
        return cum[idx]

    flushed = share_below(zero_exp)
    subnormal = share_below(normal_exp) - flushed
    return flushed + 0.5 * subnormal, offset


def simulate(log2_grad: np.ndarray, ceiling_log2: float, table: np.ndarray, offset: int, *, init_log2: float,
             growth_interval: int, backoff: float) -> tuple[float, float]:
    """(skip rate, mean lost fraction) of a GradScaler over a gradient trajectory (log2 of the largest).

    Example:
        >>> table, off = loss_table([0] * 300)
        >>> simulate(np.zeros(10), 15.0, table, off, init_log2=20, growth_interval=2, backoff=0.5)[0] > 0
        True
    """
    s = init_log2
    clean = 0
    skips = 0
    lost = 0.0
    for g in log2_grad:
        if g + s >= ceiling_log2:                     # inf/nan in the scaled gradients: skip and back off
            skips += 1
            lost += 1.0
            s += math.log2(backoff)
            clean = 0
            continue
        k = int(round(s + g)) + offset
        lost += float(table[min(max(k, 0), len(table) - 1)])
        clean += 1
        if clean == growth_interval:
            s += 1.0
            clean = 0
    n = max(len(log2_grad), 1)
    return skips / n, lost / n


def grad_trajectory(curve: Trajectory | None, horizon: int, seed: int, max_drift: float) -> np.ndarray:
    """log2 of the largest gradient per simulated step, relative to the first measured one."""
    g = np.array([x for x in (curve.grad_absmax if curve else ()) if x > 0], dtype=np.float64)
    if len(g) < 3:
        return np.zeros(horizon)
    y = np.log2(g) - math.log2(g[0])
    t = np.arange(len(y), dtype=np.float64)
    slope, intercept = np.polyfit(t, y, 1)
    resid = y - (slope * t + intercept)
    rng = np.random.default_rng(seed)
    # the measured trend is followed for five times the span it was measured over, then held
    steps = np.minimum(np.arange(horizon, dtype=np.float64), 5.0 * len(y))
    trend = np.clip(intercept + slope * steps, -max_drift, max_drift)
    return trend + rng.choice(resid, size=horizon, replace=True)


def search_scaler(probe: Probe, fp16_keys: Sequence[str], curve: Trajectory | None, *, n_trials: int = 40,
                  horizon: int = 1000, max_drift: float = 8.0, seed: int = 0) -> ScalerChoice:
    """Choose (init scale, growth interval, backoff) for the FP16 layers ``fp16_keys``.

    The initial scale is searched at or below the probe's suggestion, which already keeps the
    caller's range headroom; the dynamic scaler may grow past it during training.

    Example:
        >>> from autoprec.probe import Probe, Ranges, HIST_HI
        >>> hist = [0] * (HIST_HI - HIST_LO); hist[-20 - HIST_LO] = 100      # gradients near 2**-20
        >>> r = Ranges(1.0, 2.0 ** -20, tuple(hist), tuple(hist))
        >>> p = Probe(1.0, {"fc": r}, {}, 2.0 ** 30, 2.0 ** -20, (), 0, ("fp16",))
        >>> c = search_scaler(p, ["fc"], None, n_trials=10)
        >>> c.skip_rate, c.init_scale >= 2.0 ** 16
        (0.0, True)
    """
    import optuna

    hist = np.zeros(len(next(iter(probe.ranges.values())).grad_hist) if probe.ranges else 1)
    for key in fp16_keys:
        if key in probe.ranges:
            hist = hist + np.asarray(probe.ranges[key].grad_hist)
    table, offset = loss_table(hist.tolist())
    grad_max = max([probe.ranges[k].grad_absmax for k in fp16_keys if k in probe.ranges] + [probe.grad_absmax])
    ceiling = math.log2(info("fp16").max / max(grad_max, 1e-45))     # overflow at log2(scale) >= ceiling
    traj = grad_trajectory(curve, horizon, seed, max_drift)
    guess = int(round(math.log2(probe.loss_scale)))

    def cost(e: int, growth: int, backoff: float) -> tuple[float, float]:
        return simulate(traj, ceiling, table, offset, init_log2=e, growth_interval=growth, backoff=backoff)

    def objective(trial: "optuna.Trial") -> float:
        e = trial.suggest_int("init_log2", max(0, guess - 8), max(0, guess))
        growth = trial.suggest_categorical("growth_interval", list(GROWTH_INTERVALS))
        backoff = trial.suggest_categorical("backoff_factor", list(BACKOFF_FACTORS))
        skip, lost = cost(e, growth, backoff)
        trial.set_user_attr("skip", skip)
        # ties go to the range-based suggestion and torch's defaults
        return lost + 1e-9 * (abs(e - guess) + abs(math.log2(growth / 2000)) + abs(math.log2(backoff / 0.5)))

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        study.enqueue_trial({"init_log2": guess, "growth_interval": 2000, "backoff_factor": 0.5})
        study.optimize(objective, n_trials=n_trials, gc_after_trial=False)
    finally:
        optuna.logging.set_verbosity(verbosity)
    best = study.best_trial
    e, growth, backoff = best.params["init_log2"], best.params["growth_interval"], best.params["backoff_factor"]
    skip, lost = cost(e, growth, backoff)
    log.info("loss scale: 2^%d, growth interval %d, backoff %g (skip rate %.3g, lost %.3g)", e, growth, backoff,
             skip, lost)
    return ScalerChoice(2.0 ** e, growth, backoff, skip, lost, len(study.trials))
