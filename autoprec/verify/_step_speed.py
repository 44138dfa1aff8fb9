"""What the policy buys, measured: real training steps of the model, FP32 against blanket autocast and the policy.

On the device it tunes for, ``tune`` times whole training steps (forward, backward and the
optimizer's step, with the verification optimizer) of the model on its tuning batch: FP32, blanket
``torch.autocast`` in each allowed format, the policy installed with ``apply`` (with its GradScaler
when it has FP16 layers), and the assignments the probe also allows (every layer in one format, the
search's runner-up, all FP32). Variants are interleaved round by round after a warm-up, and each
figure is the median of its rounds, with half their range as its spread (:meth:`Clock.rounds`).

The measured ranking is part of the decision: an alternative measured *clearly* faster than the
search's choice (:func:`clearly_faster`: the medians differ by more than the two spreads together)
ships instead, and verification then verifies it. The steps train the caller's weight storage in
place: a :class:`~autoprec.probe._snapshot.Snapshot` puts it back. They draw dropout masks from forked,
seeded generators, never the global RNG.

:mod:`autoprec.report._speed_lines` writes the figures as the lines a user reads first (CLI, Markdown and
HTML reports); for another target than the tuning device the figure is the device profile's.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..core._batch import LossFn, call_model, compute_loss, seed_rng
from ..core._formats import to_dtype
from ..device._timing import Clock
from ..policy._records import StepSpeed
from ..probe._snapshot import Snapshot
from ..report._speed_lines import clearly_faster, first_failure, step_ms
from ..search._records import Decision

if TYPE_CHECKING:
    from ..policy._policy import Policy

__all__ = ["BUDGET_S", "Race", "adopt", "blanket", "choose", "measured_record", "race", "retime", "time_steps"]

log = logging.getLogger("autoprec.step_speed")

#: Seconds the timed rounds of one race may take beyond their least count (three rounds always run).
BUDGET_S = 10.0

def time_steps(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None, variants: Mapping[str, Any], *,
               device_type: str, optimizer: Callable, seed: int, seconds: float = BUDGET_S, least: int = 3,
               most: int = 9, snapshot: Snapshot | None = None) -> tuple[dict[str, tuple[float, ...]], dict[str, str]]:
    """Seconds of every round of each variant's training step, and the variants dropped, with why.

    ``variants`` maps a name to None (FP32), a format (``"bf16"``: blanket ``torch.autocast``, FP16
    with a default GradScaler) or a :class:`~autoprec.Policy` (installed for its step only, outside the
    timed region, with its scaler). One optimizer from ``optimizer`` serves every variant; step ``i``
    of each variant sees batch ``i`` and the same dropout seed. A variant whose step raises in the
    warm-up, or whose loss is not finite (its update is then skipped), is dropped. ``model`` is
    trained in place; with ``snapshot`` it is restored at the end, however the timing ends.

    Example:
        >>> m = nn.Linear(8, 1)
        >>> from autoprec.probe import default_optimizer
        >>> t, dropped = time_steps(m, [torch.randn(16, 8)], None, {"fp32": None, "autocast bf16": "bf16"},
        ...                         device_type="cpu", optimizer=default_optimizer, seed=0, seconds=0.0)
        >>> sorted(t), [len(v) for v in t.values()], dropped
        (['autocast bf16', 'fp32'], [3, 3], {})
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # the device the model is on (cuda:N), not the current one: its stream is timed, its generator forked
    device = next((p.device for p in model.parameters()), torch.device(device_type))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    steps = _Steps(model, batches, loss_fn, optimizer(params), device_type, seed,
                   devices=[device.index] if device.type == "cuda" else [])
    clock = Clock(device, 0.0)
    try:
        times = _timed(clock, variants, steps, seconds=seconds, least=least, most=most)
    finally:
        for p in params:
            p.grad = None
        del steps.opt  # the steps' optimizer (and its state) goes now, whatever holds the steps
        if snapshot is not None:
            snapshot.restore()
    return {k: tuple(v) for k, v in times.items() if k not in steps.bad}, steps.bad


def _timed(clock: Clock, variants: Mapping[str, Any], steps: _Steps, *, seconds: float, least: int,
           most: int) -> dict[str, list[float]]:
    """Each variant's step warmed up (one that raises is dropped, in ``steps.bad``), then all timed in rounds."""
    timed = {}
    for name, variant in variants.items():
        timed[name] = steps.of(name, variant)
        try:
            clock.once(timed[name])  # the warm-up: first calls pay one-off costs
        except Exception as exc:  # noqa: BLE001 - e.g. a CPU without FP16 kernels for an op: dropped, said
            steps.bad[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            del timed[name]
    clock.deadline = time.perf_counter() + seconds
    return clock.rounds(timed, least=least, most=most, warmup=0)


@dataclass
class _Steps:
    """The training steps :func:`time_steps` times: one optimizer for every variant, and the variants dropped."""

    model: nn.Module
    batches: Sequence[Any]
    loss_fn: LossFn | None
    opt: torch.optim.Optimizer
    device_type: str
    seed: int
    devices: list[int]
    bad: dict[str, str] = field(default_factory=dict)  # variant -> why it was dropped

    def of(self, name: str, variant: Any) -> Callable[[], None]:
        """One training step of ``variant``: its ``i``-th call trains on batch ``i`` with seed ``seed + i``.

        A non-finite loss skips the update and drops the variant (in :attr:`bad`, with the step it came at).
        """
        context, scaler = _context(variant, self.device_type)
        model, batches, loss_fn, device_type, seed, devices, bad = (
            self.model, self.batches, self.loss_fn, self.device_type, self.seed, self.devices, self.bad)
        count = [0]

        def step() -> None:
            batch = batches[count[0] % len(batches)]
            self.opt.zero_grad(set_to_none=True)
            with torch.random.fork_rng(devices=devices):
                seed_rng(seed + count[0], device_type)
                with context():
                    loss = compute_loss(call_model(model, batch), batch, loss_fn)
            count[0] += 1
            finite = math.isfinite(float(loss.detach()))
            if scaler is not None:
                scaler.scale(loss.float()).backward()
                scaler.step(self.opt)  # skipped by the scaler itself on non-finite gradients
                scaler.update()
            else:
                loss.float().backward()
                if finite:
                    self.opt.step()
            if not finite:
                bad.setdefault(name, f"non-finite loss at its step {count[0]}")

        if variant is None or isinstance(variant, str):
            return step
        return _installed(variant, model, step)


def _context(variant: Any, device_type: str) -> tuple[Callable[[], Any], torch.amp.GradScaler | None]:
    """The context a variant's forward runs in, and its GradScaler (None without FP16 layers)."""
    from ..policy._policy import scaler_for

    if isinstance(variant, str):
        scaler = torch.amp.GradScaler(device_type) if variant == "fp16" else None
        return (lambda: torch.autocast(device_type, dtype=to_dtype(variant))), scaler
    return torch.enable_grad, scaler_for(variant, device_type) if variant is not None else None


def _installed(policy: Policy, model: nn.Module, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with ``policy`` installed for that step only: variants interleave."""
    from ..runtime._apply import apply

    def installed() -> None:
        handle = apply(policy, model)
        try:
            step()
        finally:
            handle.remove()
    return installed


def choose(seconds: Mapping[str, Sequence[float]], current: str, alternatives: Sequence[str]) -> str:
    """The alternative with the least median among those clearly faster than ``current``; else ``current``.

    Example:
        >>> t = {"search": [10, 10.2, 10.1], "all bf16": [8, 8.1, 8.2], "runner-up": [9.9, 10, 10.3]}
        >>> choose(t, "search", ["runner-up", "all bf16"]), choose(t, "search", ["runner-up"])
        ('all bf16', 'search')
    """
    faster = [a for a in alternatives if a in seconds and clearly_faster(seconds[a], seconds.get(current, ()))]
    return min(faster, key=lambda a: statistics.median(seconds[a])) if faster else current


def blanket(keys: Sequence[str], fmt: str, unsafe: Mapping[str, str],
            tied: Sequence[Sequence[str]] = ()) -> dict[str, str]:
    """Every layer in ``fmt``, except those the probe found failing in it (and the layers sharing their weights).

    Example:
        >>> blanket(["a", "b", "c"], "bf16", {"b": "overflow"}, tied=[("b", "c")])
        {'a': 'bf16', 'b': 'fp32', 'c': 'fp32'}
    """
    out = {k: "fp32" if k in unsafe else fmt for k in keys}
    for group in tied:
        if any(out.get(k) == "fp32" for k in group):
            out.update({k: "fp32" for k in group if k in out})
    return out


def adopt(decisions: Mapping[str, Decision], assignment: Mapping[str, str], why: str) -> dict[str, Decision]:
    """The decisions of ``assignment``: each layer it moves says ``why`` before the evidence it had.

    Example:
        >>> d = {"a": Decision("a", "fp32", "no gain", "bf16: not faster (modelled)")}
        >>> adopt(d, {"a": "bf16"}, "measured faster")["a"].detail
        'measured faster; bf16: not faster (modelled)'
    """
    out = dict(decisions)
    for key, d in decisions.items():
        fmt = assignment.get(key, d.precision)
        if fmt != d.precision:
            out[key] = Decision(key, fmt, "cast" if fmt != "fp32" else "no gain", f"{why}; {d.detail}")
    return out


@dataclass(frozen=True)
class Race:
    """What :func:`race` measured: step seconds per variant, what ships, and each format's blanket verdict."""

    seconds: dict[str, tuple[float, ...]]
    chosen: str                                   # "search" or the alternative that ships
    assignment: dict[str, str]                    # the chosen alternative's assignment ({} for "search")
    errors: tuple[float, float]                   # its measured (loss_err, grad_err)
    blanket: dict[str, str]                       # format -> why blanket autocast is not safe ("" = safe)
    note: str


def race(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None, *, search: Mapping[str, str],
         alternatives: Mapping[str, Mapping[str, str]], unsafe: Mapping[str, Mapping[str, str]],
         measure: Callable[[Mapping[str, str]], tuple[float, float, bool]], within: Callable[[float, float], bool],
         make: Callable[[Mapping[str, str]], "Policy"], formats: Sequence[str], device_type: str,
         optimizer: Callable, seed: int, snapshot: Snapshot, before_timing: Callable[[], None] = lambda: None,
         seconds: float = BUDGET_S) -> Race:
    """Time the search's assignment against FP32, blanket autocast in each format and the
    ``alternatives`` that measure within the bound (``measure``: one forward+backward each), and
    choose what ships (:func:`choose`; all FP32 is always an alternative). ``before_timing`` runs
    between the two (to move what the measuring needed off the device); ``seconds`` bounds the
    timed rounds beyond the first three (:func:`time_steps`).

    Example:
        >>> from autoprec.policy import LayerEntry, Policy
        >>> from autoprec.probe import default_optimizer
        >>> m, x = nn.Sequential(nn.Linear(16, 16)), torch.randn(32, 16)
        >>> with Snapshot(list(m.parameters())) as snap:
        ...     r = race(m, [x], None, search={"0": "fp32"}, alternatives={"all bf16": {"0": "bf16"}}, unsafe={},
        ...              measure=lambda a: (0.0, 0.0, True), within=lambda loss, grad: True,
        ...              make=lambda a: Policy(layers={k: LayerEntry(v) for k, v in a.items()}), formats=("bf16",),
        ...              device_type="cpu", optimizer=default_optimizer, seed=0, snapshot=snap, seconds=0.0)
        >>> sorted(r.seconds), r.chosen in ("search", "all bf16"), r.blanket
        (['all bf16', 'autocast bf16', 'fp32', 'search'], True, {'bf16': ''})
    """
    verdicts = {fmt: first_failure(unsafe.get(fmt, {})) for fmt in formats}
    policies: dict[str, Any] = {"search": make(search)}
    errors: dict[str, tuple[float, float]] = {"fp32": (0.0, 0.0)}
    for name, a in alternatives.items():
        if dict(a) == dict(search) or all(p == "fp32" for p in a.values()):
            continue  # the search's own; all FP32 is the "fp32" variant itself
        loss_err, grad_err, finite = measure(a)
        fmt = name.removeprefix("all ")
        if finite and within(loss_err, grad_err):
            policies[name], errors[name] = make(a), (loss_err, grad_err)
        elif fmt in verdicts and not verdicts[fmt]:
            verdicts[fmt] = f"all layers together, loss err {loss_err:.3g}, grad err {grad_err:.3g}: over the bound"
    before_timing()
    variants: dict[str, Any] = {"fp32": None, **{f"autocast {f}": f for f in formats}, **policies}
    timed, dropped = time_steps(model, batches, loss_fn, variants, device_type=device_type, optimizer=optimizer,
                                seed=seed, snapshot=snapshot, seconds=seconds)
    notes = [f"{k} not timed ({v})" for k, v in dropped.items()]
    if "search" not in timed:  # the policy itself could not be timed: nothing to choose from
        return Race(timed, "search", {}, (math.nan, math.nan), verdicts, "; ".join(notes))
    fp32_search = all(p == "fp32" for p in search.values())  # then "fp32" is no other assignment
    others = [n for n in ("fp32", *policies) if n != "search" and not (n == "fp32" and fp32_search)]
    chosen = choose(timed, "search", others)
    if chosen != "search":
        winner = "all FP32" if chosen == "fp32" else chosen
        notes.insert(0, f"the search's assignment lost the measured race to {winner}: {step_ms(timed[chosen])} "
                        f"against {step_ms(timed['search'])} a step, beyond the rounds' spread")
        log.info("step race: %s", notes[0])
    assignment = {k: "fp32" for k in search} if chosen == "fp32" else dict(alternatives.get(chosen, {}))
    return Race(timed, chosen, assignment, errors.get(chosen, (math.nan, math.nan)), verdicts, "; ".join(notes))


def retime(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None, policy: "Policy", raced: Race, *,
           modelled: float, profile: str, why: str, formats: Sequence[str], device_type: str, optimizer: Callable,
           seed: int, snapshot: Snapshot, seconds: float = BUDGET_S) -> StepSpeed:
    """The shipped ``policy`` timed again against FP32 and blanket autocast (after verification changed
    it: ``why``), with the race's verdicts and what it decided in the note.

    Example:
        >>> from autoprec.policy import LayerEntry, Policy
        >>> from autoprec.probe import default_optimizer
        >>> m, x = nn.Sequential(nn.Linear(16, 16)), torch.randn(32, 16)
        >>> raced = Race({}, "search", {}, (0.0, 0.0), {"bf16": ""}, "")
        >>> with Snapshot(list(m.parameters())) as snap:
        ...     s = retime(m, [x], None, Policy(layers={"0": LayerEntry("fp32")}), raced, modelled=1.0, profile="p",
        ...                why="a back-off", formats=("bf16",), device_type="cpu", optimizer=default_optimizer,
        ...                seed=0, snapshot=snap, seconds=0.0)
        >>> sorted(s.seconds), s.note
        (['autocast bf16', 'fp32', 'policy'], 're-timed after a back-off')
    """
    variants = {"fp32": None, **{f"autocast {f}": f for f in formats}, "policy": policy}
    seconds, dropped = time_steps(model, batches, loss_fn, variants, device_type=device_type, optimizer=optimizer,
                                  seed=seed, snapshot=snapshot, seconds=seconds)
    note = "; ".join([f"re-timed after {why}", *(f"{k} not timed ({v})" for k, v in dropped.items()),
                      *([f"before: {raced.note}"] if raced.note else [])])
    return StepSpeed("measured", modelled=modelled, profile=profile, seconds=seconds, blanket=dict(raced.blanket),
                     chosen=raced.chosen, note=note)



def measured_record(raced: Race, *, modelled: float, profile: str) -> StepSpeed:
    """The policy's :class:`StepSpeed` from a race: the variant that ships is ``"policy"``.

    Example:
        >>> r = Race({"fp32": (2.0,), "search": (1.0,), "all bf16": (0.5,)}, "all bf16", {}, (0.0, 0.0), {}, "")
        >>> sorted(measured_record(r, modelled=0.6, profile="calibrated here").seconds)
        ['fp32', 'policy', 'search']
    """
    seconds = {("policy" if k == raced.chosen else k): tuple(v) for k, v in raced.seconds.items()}
    if raced.chosen == "fp32":  # the all-FP32 policy is the FP32 step
        seconds = {**seconds, "fp32": tuple(raced.seconds["fp32"])}
    return StepSpeed("measured", modelled=modelled, profile=profile, seconds=seconds, blanket=dict(raced.blanket),
                     chosen=raced.chosen, note=raced.note)


