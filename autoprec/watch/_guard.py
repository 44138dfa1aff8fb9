"""The guard: watch a policy's 16-bit layers during training and act when a range leaves its format,
or when the loss drifts away from FP32's (the FP32 check, :mod:`autoprec.watch._check`)."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Callable

import torch
from torch import nn

from ..core._formats import LOW_PRECISIONS, cuda_bf16_native, info
from ..errors import GuardError, GuardWarning, OptionError, PolicyError
from ..policy._policy import Policy, ScalerSettings
from ..runtime._apply import Handle, _device_type, watched
from ._check import CHECK_FACTOR, Check, Verdict, judge_gaps
from ._events import ACTIONS, GuardEvent
from ._grads import ScalerReading, grad_misfit, scale_of, scaler_reset
from ._grads import num as _num
from ._watch import Watch

__all__ = ["DEFAULT_HEADROOM", "DEFAULT_LOSS_BOUND", "Guard", "guard"]

log = logging.getLogger("autoprec.guard")

DEFAULT_HEADROOM = 8.0  # tune's default, for policies that do not record theirs (stats["headroom"])
DEFAULT_LOSS_BOUND = 0.01  # tune's default loss tolerance, for policies that do not record theirs


#: the formats whose layers the guard watches: the 16-bit ones and FP8 (a Linear's GEMMs, its output BF16)
WATCHED = LOW_PRECISIONS + ("fp8",)


def _misfit(precision: str, amax: float, bad: int, headroom: float) -> str | None:
    """Why a layer's watched figures no longer fit ``precision``, or None when they fit. An FP8 layer's output is
    BF16 (torchao scales each FP8 operand to its own amax at every step): it is held to BF16's range."""
    top = info("bf16" if precision == "fp8" else precision).max
    if bad:
        return f"non-finite output in {bad} forward pass{'es' if bad > 1 else ''} (|out| max {_num(amax)})"
    if amax * headroom > top:
        return f"|out| max {_num(amax)} x headroom {headroom:g} > {top:g}"
    return None


class Guard:
    """A policy installed on a model and watched while it trains; built by :func:`guard`.

    Call :meth:`step` once per training step; every ``every`` steps it reads the watch (one host
    sync) and acts on each 16-bit layer whose largest ``|output|`` times ``headroom`` passes its
    format's largest finite value, or whose output was non-finite, and on each FP16 layer whose
    gradient (unscaled) times ``headroom`` passes 65504, or went non-finite while the scaler collapsed
    (:mod:`autoprec.watch._grads`): ``"adapt"`` promotes it (FP16 to BF16 where the policy's formats
    allow BF16, else FP32; BF16 to FP32) and installs the revised policy, ``"warn"`` logs and warns
    (:class:`~autoprec.GuardWarning`, once per layer), ``"raise"`` raises :class:`~autoprec.GuardError`.
    The scaler is reset to the policy's tuned init scale when a layer was promoted on its gradients
    (and the scale is below it), or when it collapsed (scale below 1, or more than half the steps
    since the last read skipped) and no FP16 layer is left (``"adapt"`` only; an event on layer
    ``"scaler"``). Every ``check_every`` steps it also runs the FP32 check (:meth:`step`). Weights
    and optimizer are never touched.

    Example:
        >>> import torch, autoprec
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = torch.nn.init.constant_(m[0].weight, 3000.0)
        >>> p = autoprec.Policy(layers={"0": autoprec.LayerEntry("fp16")}, formats=("fp16", "bf16"))
        >>> g = autoprec.guard(m, p, every=1)
        >>> x = torch.ones(2, 4); _ = m(x); g.step(None, x)
        >>> g.policy.assignment, g.events[0].evidence
        ({'0': 'bf16'}, 'step 1: 0 fp16 -> bf16: |out| max 1.2e4 x headroom 8 > 65504')
        >>> g.remove()
    """

    def __init__(self, model: nn.Module, policy: Policy, loss_fn: Callable[..., Any] | None = None, *,
                 scaler: Any = None, every: int = 50, action: str = "adapt", headroom: float | None = None,
                 check_every: int | None = None) -> None:
        if not isinstance(policy, Policy):
            raise PolicyError(f"guard takes an autoprec.Policy, got {type(policy).__name__}: "
                              "use autoprec.load('policy.json') or autoprec.tune(...)")
        if type(every) is not int or every < 1:
            raise OptionError(f"guard(every={every!r}): a whole number of steps, at least 1 (e.g. every=50)")
        if action not in ACTIONS:
            raise OptionError(f"guard(action={action!r}): use one of {', '.join(map(repr, ACTIONS))}")
        if headroom is None:
            headroom = policy.stats.get("headroom", DEFAULT_HEADROOM)
        if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not headroom >= 1:
            raise OptionError(f"guard(headroom={headroom!r}): a number of at least 1 (the policy was tuned with "
                              f"{DEFAULT_HEADROOM:g} unless it says otherwise)")
        if check_every is None:
            check_every = CHECK_FACTOR * every
        if type(check_every) is not int or check_every < 0:
            raise OptionError(f"guard(check_every={check_every!r}): a whole number of steps (e.g. "
                              f"{CHECK_FACTOR * every}, the default: {CHECK_FACTOR} x every), or 0 for no FP32 check")
        self.model, self.loss_fn, self.scaler = model, loss_fn, scaler
        self.every, self.action, self.headroom, self.check_every = every, action, float(headroom), check_every
        self.bound = float(policy.tolerance.get("loss", DEFAULT_LOSS_BOUND))
        self.check = Check(loss_fn)
        self.events: list[GuardEvent] = []
        self._step = 0
        self._policy = policy
        self._handle: Handle | None = None
        scale = scale_of(scaler)  # one host copy here, none per step
        self._last_scale = float(scale) if scale is not None else None
        self._install(policy, fresh=True)

    # -- the policy in force ------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        """The policy in force: the one given, revised where the guard promoted a layer (its
        ``stats["guard_events"]`` lists the events, so ``.save()`` writes the history)."""
        return self._policy

    def _install(self, policy: Policy, *, fresh: bool = False) -> None:
        if fresh:
            layers = [k for k, p in policy.assignment.items() if p in WATCHED]  # units and op entries
            self._watch = Watch(layers, self._device())
        watching = [k for k in self._watch.layers if policy.assignment.get(k) in WATCHED]
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        try:
            self._handle = watched(policy, self.model, self._watch.observers(watching))
        except Exception:
            if not fresh:  # the policy in force goes back on: a failed revision leaves the run as it was
                self._handle = watched(self._policy, self.model, self._watch.observers(
                    k for k in self._watch.layers if self._policy.assignment.get(k) in WATCHED))
            raise
        self._policy = policy

    def _device(self) -> str | torch.device:
        for t in self.model.parameters():
            return t.device
        return _device_type(self.model)

    def remove(self) -> None:
        """Take the policy off the model, as ``handle.remove()`` does (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- the training loop --------------------------------------------------------------------
    def step(self, loss: Any = None, batch: Any = None) -> None:
        """Count one training step; every ``every`` steps read the watch and act; every
        ``check_every`` steps run the FP32 check on ``batch`` (the step's; ``loss`` is not used).

        The check (:mod:`autoprec.watch._check`) keeps the loss gap in ``guard.check`` and judges it
        (:func:`~autoprec.watch._check.judge_gaps`) against ``policy.tolerance["loss"]`` (else 0.01).
        Cost per check: 2 forward passes and 2 host syncs; when it acts, one pass per 16-bit layer
        (alone in FP32) and one or two per promotion more.
        """
        if self._handle is None:
            raise OptionError("guard.step() after guard.remove(): the policy is off the model; build a new "
                              "guard with autoprec.guard(model, policy)")
        if batch is None and self.check_every:
            raise OptionError("guard.step(loss) without the batch: the FP32 check runs the step's batch every "
                              f"check_every={self.check_every} steps; call guard.step(loss, batch), or build the "
                              "guard with check_every=0 to run no FP32 check")
        self._step += 1
        if self._step % self.every == 0:
            self._check()
        if self.check_every and self._step % self.check_every == 0:
            self._check_fp32(batch)

    def _check(self) -> None:
        revised, acted, by_grads = self._policy, [], []  # by_grads: promoted on their gradients
        figures = self._watch.read(scale_of(self.scaler))
        scaler = self._scaler_reading()
        for layer, (amax, bad) in figures.items():
            old = revised.assignment.get(layer)
            why = None if old not in WATCHED else (
                _misfit(old, amax, bad, self.headroom)
                or grad_misfit(old, *self._watch.grads[layer], self.headroom, scaler))
            if why is None or (self.action == "warn" and any(e.layer == layer for e in self.events)):
                continue
            new = self._promotion(old)
            event = GuardEvent(self._step, layer, self.action, old, new,
                               f"step {self._step}: {layer} {old} -> {new}: {why}")
            self.events.append(event)
            if self.action == "raise":
                raise GuardError(f"autoprec.guard: layer {layer!r} runs in {old}, but {event.evidence}: its output "
                                 f"no longer fits {old}; run it in {new} (set its entry to '{new}' in the policy, or "
                                 f"tune again on a later checkpoint) or guard with action='adapt'", event)
            log.warning("%s%s", event.evidence, "" if self.action == "adapt" else " (action='warn': not changed)")
            if self.action == "warn":
                warnings.warn(f"autoprec.guard: {event.evidence}; guard with action='adapt' to promote it",
                              GuardWarning, stacklevel=3)
                continue
            revised = _promoted(revised, layer, new, event)
            acted.append(layer)
            if "grad" in why:  # a range's evidence names |out| or the output
                by_grads.append(layer)
        if acted:
            for layer in acted:
                self._watch.reset(layer)  # the new format starts a fresh watch
            self._install(revised)
        self._reset_scaler(scaler, by_grads)

    def _scaler_reading(self) -> ScalerReading | None:
        """The scaler since the last read (from the scale read with the watch), or None without one."""
        if self._watch.scale is None or self._last_scale is None:
            return None
        old, self._last_scale = self._last_scale, self._watch.scale
        return ScalerReading.between(old, self._watch.scale, self.scaler.get_backoff_factor(), self.every)

    def _reset_scaler(self, scaler: ScalerReading | None, promoted: list[str]) -> None:
        """Reset a collapsed scaler to the tuned init scale (``scaler.update(new_scale)``) where
        :func:`~autoprec.watch._grads.scaler_reset` says so; an event on layer ``"scaler"``."""
        init = (self._policy.scaler or ScalerSettings()).init_scale
        evidence = scaler_reset(self._step, scaler, init, promoted, "fp16" in self._policy.assignment.values())
        if evidence is None or (self.action == "warn" and any(e.layer == "scaler" for e in self.events)):
            return
        event = GuardEvent(self._step, "scaler", self.action, _num(scaler.scale), f"{init:g}", evidence)
        self.events.append(event)
        if self.action == "raise":
            raise GuardError(f"autoprec.guard: {evidence}: the GradScaler collapsed; reset it with "
                             f"scaler.update({init:g}) or guard with action='adapt'", event)
        log.warning("%s%s", evidence, "" if self.action == "adapt" else " (action='warn': not changed)")
        if self.action == "warn":
            warnings.warn(f"autoprec.guard: {evidence}; guard with action='adapt' to reset it", GuardWarning,
                          stacklevel=4)
            return
        self.scaler.update(init)
        self._last_scale = init
        stats = {**self._policy.stats, "guard_events": [*self._policy.stats.get("guard_events", []), event.to_dict()]}
        self._policy = dataclasses.replace(self._policy, stats=stats)

    def _check_fp32(self, batch: Any) -> None:
        """One FP32 check, and the action its verdict calls for (the guard's own policy off meanwhile)."""
        self._handle.remove()
        self._handle = None
        try:
            self.check.measure(self.model, batch, self._policy, step=self._step)
            verdict = judge_gaps(self.check.gaps, self.bound)
            if verdict is not None and self.action == "warn" and self.check.warned:
                verdict = None  # warned once: the re-probe would say nothing new
            found = [] if verdict is None else self.check.reprobe(
                self.model, batch, self._policy, verdict, step=self._step, promotion=self._promotion)
        finally:
            self._install(self._policy)
        if verdict is None:
            log.debug("step %d: check: loss gap %.3g vs FP32", self._step, self.check.gaps[-1])
            return
        self._act_on_check(verdict, found)

    def _act_on_check(self, verdict: Verdict, found: list[tuple[str, str, str, float]]) -> None:
        head = f"step {self._step}: check: {verdict.describe()}"
        if not found:
            log.warning("%s: no 16-bit layer reverted to FP32 alone closes any of it", head)
            return
        events = [GuardEvent(self._step, layer, self.action, old, new, f"{head}: {layer} {old} -> {new} closes it "
                             f"to {after:.3g}") for layer, old, new, after in found]
        self.events.extend(events)
        fixes = ", ".join(f"{e.layer!r} in {e.new}" for e in events)
        if self.action == "raise":
            raise GuardError(f"autoprec.guard: {events[-1].evidence}: the policy drifted from FP32 during training; "
                             f"run {fixes} (set the entries in the policy, or tune again on a later checkpoint) or "
                             "guard with action='adapt'", events[0])
        for e in events:
            log.warning("%s%s", e.evidence, "" if self.action == "adapt" else " (action='warn': not changed)")
        if self.action == "warn":
            self.check.warned = True
            warnings.warn(f"autoprec.guard: {events[-1].evidence}; run {fixes}, or guard with action='adapt'",
                          GuardWarning, stacklevel=4)
            return
        revised = self._policy
        for e in events:
            revised = _promoted(revised, e.layer, e.new, e, reason="loss gap")
            if e.layer in self._watch.layers:
                self._watch.reset(e.layer)
        self._install(revised)

    def _promotion(self, old: str) -> str:
        if old == "fp8":  # its region is BF16 already: the GEMMs go back to it
            return "bf16"
        if old == "fp16" and "bf16" in self._policy.formats:
            on_cuda = _device_type(self.model) == "cuda"
            if not on_cuda or cuda_bf16_native():
                return "bf16"
        return "fp32"

    # -- resuming -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The guard's state as plain data: the policy in force, the step count, the events and the
        watch's statistics (one host copy). Save it with the model's and optimizer's state.

        Example:
            >>> import torch, autoprec
            >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
            >>> g = autoprec.guard(m, autoprec.Policy(layers={"0": autoprec.LayerEntry("bf16")}))
            >>> sorted(g.state_dict()); g.remove()
            ['check', 'events', 'policy', 'scale', 'step', 'watch']
        """
        return {"step": self._step, "policy": self._policy.to_dict(), "events": [e.to_dict() for e in self.events],
                "watch": self._watch.state_dict(), "check": self.check.state_dict(), "scale": self._last_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: install its policy (revised where the guard had acted),
        and take its step count, events, statistics and FP32-check history."""
        policy = Policy.from_dict(state["policy"])
        if policy != self._policy:
            self._install(policy)
        self._watch.load_state_dict(state["watch"])
        self.events = [GuardEvent.from_dict(e) for e in state["events"]]
        if "check" in state:
            self.check.load_state_dict(state["check"])
        self._step = int(state["step"])
        if state.get("scale") is not None and self._last_scale is not None:
            self._last_scale = float(state["scale"])


def _promoted(policy: Policy, layer: str, new: str, event: GuardEvent, *, reason: str = "range") -> Policy:
    """``policy`` with ``layer`` in ``new`` and ``event`` appended to its ``stats["guard_events"]``."""
    entry = policy.layers[layer]
    if new == "fp32":
        entry = dataclasses.replace(entry, precision=new, reason=reason, excluded=True, detail=event.evidence, recipe="")
    else:
        entry = dataclasses.replace(entry, precision=new, detail=event.evidence, recipe="")
    stats = {**policy.stats, "guard_events": [*policy.stats.get("guard_events", []), event.to_dict()]}
    return dataclasses.replace(policy, layers={**policy.layers, layer: entry}, stats=stats)


def guard(model: nn.Module, policy: Policy, loss_fn: Callable[..., Any] | None = None, *, scaler: Any = None,
          every: int = 50, action: str = "adapt", headroom: float | None = None,
          check_every: int | None = None) -> Guard:
    """Install ``policy`` on ``model`` and keep it right while the model trains; returns a :class:`Guard`.

    Call ``guard.step(loss, batch)`` after each optimizer step. Every ``every`` steps it reads, in one
    host sync, what it kept on the device for each 16-bit layer (largest ``|output|``, forward passes
    with a non-finite output) and acts where a range passes its format's limit with ``headroom``
    (None: the policy's tuning headroom, ``stats["headroom"]``, else 8): ``action="adapt"`` promotes
    the layer and installs the revised policy (``guard.policy``), ``"warn"`` logs and warns, ``"raise"``
    raises :class:`~autoprec.GuardError`. Every ``check_every`` steps (None: 10 x ``every``; 0: never)
    it runs the FP32 check: the loss of the step's batch (``loss_fn(output, batch)``, None: the
    model's own loss, as in :func:`autoprec.tune`) with the policy off and on, two forward passes
    without grad; a gap past the bound (``policy.tolerance["loss"]``, else 0.01) and past the first
    checks' level, or rising towards it, re-probes the 16-bit layers and promotes those that close it
    (:meth:`Guard.step` states the cost). ``guard.events`` lists what it did; ``guard.remove()``
    takes the policy off. It also watches, in the same read, each 16-bit layer's gradient (the
    largest finite ``|grad|`` w.r.t. its output and the backward passes with a non-finite one) and,
    with ``scaler`` (a ``GradScaler``), the scale and the steps skipped since the last read: an FP16
    layer whose unscaled gradient passes 65504 with ``headroom``, or goes non-finite while the scaler
    collapses, is promoted as above, and the scaler it drove down is reset to the policy's tuned init
    scale (``scaler.update(init_scale)``, the one change it makes to the scaler; :class:`Guard`). The guard
    never touches weights, ``.grad``, buffers, the RNG or the optimizer.

    Example:
        >>> import torch, autoprec
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> policy = autoprec.Policy(layers={"0": autoprec.LayerEntry("bf16"), "2": autoprec.LayerEntry("fp32")})
        >>> g = autoprec.guard(model, policy, every=10)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> for _ in range(20):
        ...     x = torch.randn(4, 8)
        ...     loss = model(x).square().mean()
        ...     loss.backward(); opt.step(); opt.zero_grad()
        ...     g.step(loss, x)
        >>> g.events, g.policy is policy
        ([], True)
        >>> g.remove()
    """
    return Guard(model, policy, loss_fn, scaler=scaler, every=every, action=action, headroom=headroom,
                 check_every=check_every)
