"""The FP32 check: now and then, the loss of the current batch with the policy off and on.

Every ``check_every`` steps :class:`Check` runs two forward passes of the step's batch, one with
no policy (FP32) and one with the policy in force, and keeps their relative loss gap. A gap is
judged against its own history (:func:`judge_gaps`), as verification judges a loss gap against the
run's noise floor: error that grows with training while every range fits shows as a gap that
leaves the level of the first checks. When the guard acts, :meth:`Check.reprobe` finds the 16-bit
layers behind the gap, one forward pass per layer at the current weights on the current batch.

A forward pass of the check changes nothing the training sees: it runs under ``torch.no_grad``
(no graph, no ``.grad``), in the model's own train/eval mode, with the generators forked and seeded
alike for every pass (the same dropout masks; the global RNG state is left as it was), and the
buffers a pass writes (batch norm's running statistics, counters) are copied back afterwards, so a
train-mode pass normalises with the batch's statistics, as the training forward did, and leaves the
running ones as they were. Its cost: a copy of the model's buffers per pass, and one host sync (the
loss) per pass.
"""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..core._batch import call_model, compute_loss
from ..core._formats import LOW_PRECISIONS
from ..policy._policy import NOISE_MULTIPLE, Policy
from ..runtime._apply import apply

__all__ = ["BASELINE", "CHECK_FACTOR", "TREND", "Check", "Verdict", "gap_of", "judge_gaps"]

CHECK_FACTOR = 10  # check_every defaults to CHECK_FACTOR x every
BASELINE = 5       # the noise floor: the median gap of the first BASELINE checks
TREND = 4          # a trend: the last TREND gaps strictly rising, the latest past half the bound


def gap_of(policy_loss: float, fp32_loss: float) -> float:
    """``|policy_loss - fp32_loss| / |fp32_loss|``: inf where only the policy's loss is non-finite,
    NaN where the FP32 loss is (then the check has nothing to compare with).

    Example:
        >>> gap_of(1.02, 1.0), gap_of(float("inf"), 1.0), gap_of(0.0, 0.0)
        (0.020000000000000018, inf, 0.0)
    """
    if not math.isfinite(fp32_loss):
        return math.nan
    if not math.isfinite(policy_loss):
        return math.inf
    diff = abs(policy_loss - fp32_loss)
    return diff / abs(fp32_loss) if fp32_loss else (0.0 if diff == 0 else math.inf)


@dataclass(frozen=True)
class Verdict:
    """Why a check acts: its ``gap``, the ``bound``, the noise ``floor`` it was judged against,
    ``why`` (``"over"``: past ``max(bound, NOISE_MULTIPLE x floor)``; ``"trend"``: rising for
    :data:`TREND` checks and past half of that), and the ``target`` a promotion brings the gap under
    (``max(bound / 2, NOISE_MULTIPLE x floor)``: clear of both rules)."""

    gap: float
    bound: float
    floor: float
    why: str
    target: float

    def describe(self) -> str:
        """The figures, as the event's evidence gives them.

        Example:
            >>> Verdict(0.034, 0.01, 0.002, "over", 0.005).describe()
            'loss gap 0.034 vs FP32 (bound 0.01, noise floor 0.002)'
        """
        rising = f", rising for {TREND} checks" if self.why == "trend" else ""
        return f"loss gap {self.gap:.3g} vs FP32 (bound {self.bound:g}, noise floor {self.floor:.3g}{rising})"


def judge_gaps(gaps: Sequence[float], bound: float, *, multiple: float = NOISE_MULTIPLE) -> Verdict | None:
    """The verdict on the latest of ``gaps`` (oldest first), or None when it is no reason to act.

    The noise floor is the median of the first :data:`BASELINE` earlier finite gaps (fewer while
    there are fewer): the level the policy showed when the run started. A median over all earlier
    checks would climb with a slow steady growth and never be passed. The latest gap acts when it
    is non-finite (inf: only the policy's loss went inf/NaN), or past ``max(bound, multiple x floor)``
    ("over"), or when the last :data:`TREND` gaps rise strictly and the latest is past
    ``max(bound / 2, multiple x floor)`` ("trend": acting before the bound). A NaN gap (the FP32 loss
    itself non-finite) never acts and is left out of the floor.

    Example:
        >>> judge_gaps([0.001, 0.002, 0.001, 0.03], 0.01).why
        'over'
        >>> judge_gaps([0.02, 0.03, 0.02, 0.03], 0.01) is None  # the policy's own noise level
        True
        >>> judge_gaps([0.0001, 0.001, 0.003, 0.006], 0.01).why
        'trend'
    """
    if not gaps or math.isnan(gaps[-1]):
        return None
    gap, earlier = gaps[-1], [g for g in gaps[:-1] if math.isfinite(g)]
    floor = statistics.median(earlier[:BASELINE]) if earlier else 0.0
    target = max(bound / 2, multiple * floor)
    if gap > max(bound, multiple * floor):
        return Verdict(gap, bound, floor, "over", target)
    last = gaps[-TREND:]
    if len(last) == TREND and all(a < b for a, b in zip(last, last[1:])) and gap > target:
        return Verdict(gap, bound, floor, "trend", target)
    return None


@contextmanager
def _untouched(model: nn.Module, seed: int) -> Iterator[None]:
    """A forward pass that leaves no trace: no grad, the generators forked and seeded, the buffers copied back."""
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":  # this device's generator only: fork_rng forked no other
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:  # all of them: batch norm's kernels update in place without a version bump
                buf.copy_(copy)


class Check:
    """The FP32 check's history (the step and gap of each check) and its forward passes.

    ``loss_fn(output, batch)`` as :func:`autoprec.tune` takes it (None: the model's own loss, else
    the surrogate). ``forwards`` counts the passes run: two per check, and at an action one per
    16-bit layer plus one or two per promoted layer (:meth:`reprobe`).

    Example:
        >>> import torch, autoprec
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> c = Check(None)
        >>> c.measure(m, torch.ones(2, 4), autoprec.Policy(layers={"0": autoprec.LayerEntry("fp32")}), step=10)
        0.0
        >>> c.steps, c.gaps, c.forwards
        ([10], [0.0], 2)
    """

    def __init__(self, loss_fn: Callable[..., Any] | None) -> None:
        self.loss_fn = loss_fn
        self.steps: list[int] = []
        self.gaps: list[float] = []
        self.forwards = 0
        self.warned = False  # action="warn": the check warned once, and re-probes no more
        self._fp32 = math.nan

    def loss(self, model: nn.Module, batch: Any, policy: Policy | None, seed: int) -> float:
        """One untraced forward pass of ``batch`` with ``policy`` (None: FP32) installed; its loss."""
        self.forwards += 1
        handle = apply(policy, model) if policy is not None else None
        try:
            with _untouched(model, seed):
                return float(compute_loss(call_model(model, batch), batch, self.loss_fn))
        finally:
            if handle is not None:
                handle.remove()

    def measure(self, model: nn.Module, batch: Any, policy: Policy, *, step: int) -> float:
        """The gap of ``policy`` against FP32 on ``batch`` (two forward passes), kept in the history."""
        self._fp32 = self.loss(model, batch, None, step)
        gap = gap_of(self.loss(model, batch, policy, step), self._fp32)
        self.steps.append(step)
        self.gaps.append(gap)
        return gap

    def reprobe(self, model: nn.Module, batch: Any, policy: Policy, verdict: Verdict, *, step: int,
                promotion: Callable[[str], str]) -> list[tuple[str, str, str, float]]:
        """The promotions that bring the gap under ``verdict.target``: ``(layer, old, new, gap after)``.

        Each 16-bit layer is reverted to FP32 alone (one pass each); then, the layer whose reversion
        closes most first, each layer that helps is promoted (``promotion(old)``, e.g. FP16 to BF16,
        where that alone brings the gap under the target, else FP32) until the gap is under it.
        """
        low = [k for k, p in policy.assignment.items() if p in LOW_PRECISIONS or p == "fp8"]
        alone = {k: self._gap(model, batch, _with(policy, k, "fp32"), step) for k in low}
        current, gap, done = policy, verdict.gap, []
        for layer in sorted(low, key=lambda k: (alone[k], low.index(k))):
            if not alone[layer] < gap:
                break  # no layer further down closes anything on its own
            old = policy.assignment[layer]
            for new in dict.fromkeys((promotion(old), "fp32")):
                trial = _with(current, layer, new)
                after = self._gap(model, batch, trial, step)
                if after <= verdict.target:
                    break
            current, gap = trial, after
            done.append((layer, old, new, after))
            if gap <= verdict.target:
                break
        return done

    def _gap(self, model: nn.Module, batch: Any, policy: Policy, step: int) -> float:
        return gap_of(self.loss(model, batch, policy, step), self._fp32)

    def state_dict(self) -> dict[str, Any]:
        """The history as plain data."""
        return {"steps": list(self.steps), "gaps": list(self.gaps), "forwards": self.forwards, "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the history :meth:`state_dict` wrote."""
        self.steps = [int(s) for s in state["steps"]]
        self.gaps = [float(g) for g in state["gaps"]]
        self.forwards = int(state.get("forwards", 0))
        self.warned = bool(state.get("warned", False))


def _with(policy: Policy, layer: str, precision: str) -> Policy:
    """``policy`` with ``layer`` run in ``precision`` (a trial of the re-probe; its history not touched)."""
    return replace(policy, layers={**policy.layers, layer: replace(policy.layers[layer], precision=precision,
                                                                   recipe="" if precision != "fp8" else
                                                                   policy.layers[layer].recipe)})
