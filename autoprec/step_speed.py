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
place: a :class:`~autoprec.snapshot.Snapshot` puts it back. They draw dropout masks from forked,
seeded generators, never the global RNG.

:func:`speed_lines` writes the figures as the lines a user reads first (CLI, Markdown and HTML
reports); for another target than the tuning device the figure is the device profile's, labelled so.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .batch import LossFn, call_model, compute_loss, seed_rng
from .formats import to_dtype
from .records import StepSpeed
from .search import Decision
from .snapshot import Snapshot
from .timing import Clock

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["Race", "adopt", "blanket", "choose", "clearly_faster", "first_failure", "measured_record", "modelled_record",
           "profile_label", "race", "retime", "speed_lines", "time_steps", "unproven"]

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
        >>> from autoprec.training import default_optimizer
        >>> t, dropped = time_steps(m, [torch.randn(16, 8)], None, {"fp32": None, "autocast bf16": "bf16"},
        ...                         device_type="cpu", optimizer=default_optimizer, seed=0, seconds=0.0)
        >>> sorted(t), [len(v) for v in t.values()], dropped
        (['autocast bf16', 'fp32'], [3, 3], {})
    """
    from .apply import apply
    from .policy import scaler_for

    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params)
    devices = [torch.cuda.current_device()] if device_type == "cuda" and torch.cuda.is_available() else []
    bad: dict[str, str] = {}

    def step_of(name: str, variant: Any) -> Callable[[], None]:
        if isinstance(variant, str):
            scaler = torch.amp.GradScaler(device_type) if variant == "fp16" else None
            context = lambda: torch.autocast(device_type, dtype=to_dtype(variant))  # noqa: E731
        else:
            scaler = scaler_for(variant, device_type) if variant is not None else None
            context = torch.enable_grad
        count = [0]

        def step() -> None:
            batch = batches[count[0] % len(batches)]
            opt.zero_grad(set_to_none=True)
            with torch.random.fork_rng(devices=devices):
                seed_rng(seed + count[0], device_type)
                with context():
                    loss = compute_loss(call_model(model, batch), batch, loss_fn)
            count[0] += 1
            finite = math.isfinite(float(loss.detach()))
            if scaler is not None:
                scaler.scale(loss.float()).backward()
                scaler.step(opt)  # skipped by the scaler itself on non-finite gradients
                scaler.update()
            else:
                loss.float().backward()
                if finite:
                    opt.step()
            if not finite:
                bad.setdefault(name, f"non-finite loss at its step {count[0]}")

        if variant is None or isinstance(variant, str):
            return step

        def installed() -> None:  # the policy is installed for this step only: variants interleave
            handle = apply(variant, model)
            try:
                step()
            finally:
                handle.remove()
        return installed

    clock = Clock(torch.device(device_type), 0.0)
    try:
        steps = {}
        for name, variant in variants.items():
            steps[name] = step_of(name, variant)
            try:
                clock.once(steps[name])  # the warm-up: first calls pay one-off costs
            except Exception as exc:  # noqa: BLE001 - e.g. a CPU without FP16 kernels for an op: dropped, said
                bad[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                del steps[name]
        clock.deadline = time.perf_counter() + seconds
        times = clock.rounds(steps, least=least, most=most, warmup=0)
    finally:
        for p in params:
            p.grad = None
        del opt
        if snapshot is not None:
            snapshot.restore()
    return {k: tuple(v) for k, v in times.items() if k not in bad}, bad


def clearly_faster(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether rounds ``a`` are clearly faster than rounds ``b``: the medians differ by more than the two
    spreads (half of each one's range) together, so that the rounds' own scatter cannot explain it.

    Example:
        >>> clearly_faster([1.0, 1.1, 1.05], [1.4, 1.5, 1.45])
        True
        >>> clearly_faster([1.0, 1.8, 1.05], [1.3, 1.5, 1.45])  # one slow round: within the scatter
        False
    """
    if not a or not b:
        return False
    spread = (max(a) - min(a)) / 2 + (max(b) - min(b)) / 2
    return statistics.median(b) - statistics.median(a) > spread


def choose(seconds: Mapping[str, Sequence[float]], current: str, alternatives: Sequence[str]) -> str:
    """The alternative with the least median among those clearly faster than ``current``; else ``current``.

    Example:
        >>> t = {"search": [10, 10.2, 10.1], "all bf16": [8, 8.1, 8.2], "runner-up": [9.9, 10, 10.3]}
        >>> choose(t, "search", ["runner-up", "all bf16"]), choose(t, "search", ["runner-up"])
        ('all bf16', 'search')
    """
    faster = [a for a in alternatives if a in seconds and clearly_faster(seconds[a], seconds.get(current, ()))]
    return min(faster, key=lambda a: statistics.median(seconds[a])) if faster else current


def blanket(keys: Sequence[str], fmt: str, unsafe: Mapping[str, str], tied: Sequence[Sequence[str]] = ()) -> dict[str, str]:
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
        >>> adopt(d, {"a": "bf16"}, "measured faster")["a"]
        Decision(key='a', precision='bf16', reason='cast', detail='measured faster; bf16: not faster (modelled)', excluded=False)
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
         optimizer: Callable, seed: int, snapshot: Snapshot,
         before_timing: Callable[[], None] = lambda: None) -> Race:
    """Time the search's assignment against FP32, blanket autocast in each format and the
    ``alternatives`` that measure within the bound (``measure``: one forward+backward each), and
    choose what ships (:func:`choose`; all FP32 is always an alternative). ``before_timing`` runs
    between the two (to move what the measuring needed off the device)."""
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
    seconds, dropped = time_steps(model, batches, loss_fn, variants, device_type=device_type, optimizer=optimizer,
                                  seed=seed, snapshot=snapshot)
    notes = [f"{k} not timed ({v})" for k, v in dropped.items()]
    if "search" not in seconds:  # the policy itself could not be timed: nothing to choose from
        return Race(seconds, "search", {}, (math.nan, math.nan), verdicts, "; ".join(notes))
    fp32_search = all(p == "fp32" for p in search.values())  # then "fp32" is no other assignment
    chosen = choose(seconds, "search", [n for n in ("fp32", *policies) if n != "search" and not (n == "fp32" and fp32_search)])
    if chosen != "search":
        notes.insert(0, f"the search's assignment lost the measured race to {'all FP32' if chosen == 'fp32' else chosen}"
                        f": {_ms(seconds[chosen])} against {_ms(seconds['search'])} a step, beyond the rounds' spread")
        log.info("step race: %s", notes[0])
    assignment = {k: "fp32" for k in search} if chosen == "fp32" else dict(alternatives.get(chosen, {}))
    return Race(seconds, chosen, assignment, errors.get(chosen, (math.nan, math.nan)), verdicts, "; ".join(notes))


def retime(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None, policy: "Policy", raced: Race, *,
           modelled: float, profile: str, why: str, formats: Sequence[str], device_type: str, optimizer: Callable,
           seed: int, snapshot: Snapshot) -> StepSpeed:
    """The shipped ``policy`` timed again against FP32 and blanket autocast (after verification changed
    it: ``why``), with the race's verdicts and what it decided in the note."""
    variants = {"fp32": None, **{f"autocast {f}": f for f in formats}, "policy": policy}
    seconds, dropped = time_steps(model, batches, loss_fn, variants, device_type=device_type, optimizer=optimizer,
                                  seed=seed, snapshot=snapshot)
    note = "; ".join([f"re-timed after {why}", *(f"{k} not timed ({v})" for k, v in dropped.items()),
                      *([f"before: {raced.note}"] if raced.note else [])])
    return StepSpeed("measured", modelled=modelled, profile=profile, seconds=seconds, blanket=dict(raced.blanket),
                     chosen=raced.chosen, note=note)


def first_failure(failing: Mapping[str, str]) -> str:
    """``"<layer>, <why>"`` of the first layer failing in a format, and how many more do; "" when none.

    Example:
        >>> first_failure({"h.0.attn::softmax": "overflow: bf16: 3 non-finite outputs", "lm_head": "range: ..."})
        'h.0.attn::softmax, overflow: bf16: 3 non-finite outputs (and 1 more layer)'
    """
    if not failing:
        return ""
    key, why = next(iter(failing.items()))
    more = f" (and {len(failing) - 1} more layer{'s' if len(failing) > 2 else ''})" if len(failing) > 1 else ""
    return f"{key or '(root)'}, {why[:160]}{more}"


#: The verdict of a format that no layer fails in, when verification had to back off the policy itself.
UNPROVEN = "not shown safe: verification backed off this policy's own cast layers, and blanket casts more"


def unproven(verdicts: Mapping[str, str]) -> dict[str, str]:
    """``verdicts`` after a verification that backed the policy off: "safe" (``""``) is no longer shown.

    Example:
        >>> unproven({"bf16": "", "fp16": "attn, overflow"})["fp16"]
        'attn, overflow'
    """
    return {f: v or UNPROVEN for f, v in verdicts.items()}


def _ms(rounds: Sequence[float]) -> str:
    ms = statistics.median(rounds) * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


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


def speed_lines(policy: "Policy") -> list[str]:
    """What the policy buys, first line first: measured step times where ``tune`` timed them, else the
    modelled figure with its source; then the blanket formats' verdicts, the modelled figure beside the
    measured one, and how the race decided. Empty for a policy without figures.

    Example:
        >>> from autoprec.policy import Policy
        >>> s = StepSpeed("measured", 0.7, "calibrated here", {"fp32": (0.040, 0.041, 0.042),
        ...               "autocast bf16": (0.030, 0.031, 0.032), "policy": (0.034, 0.035, 0.036)}, blanket={"bf16": ""})
        >>> for line in speed_lines(Policy(layers={}, formats=("bf16",), speed=s)):
        ...     print(line)
        policy step time 0.85x FP32, 1.13x blanket BF16 autocast (measured here, median of 3 steps: policy 35 ms, FP32 41 ms, autocast bf16 31 ms); blanket BF16 is numerically safe here and 13% faster: use it
        modelled 0.70x FP32 by the device profile (calibrated here); measured 0.85x: the profile's error on this model
        >>> speed_lines(Policy(layers={}, stats={"modelled_cost_ratio": 0.66, "profile_origin": "estimate"}, target="cuda"))
        ['modelled: policy step time 0.66x FP32 (built-in CUDA estimate, not measured)']
    """
    s = policy.speed
    if s is None:
        ratio, origin = policy.stats.get("modelled_cost_ratio"), policy.stats.get("profile_origin")
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
            return []
        return [f"modelled: policy step time {ratio:.2f}x FP32 ({profile_label(origin, policy.target)}, not measured)"]
    fmts = [f for f in (*policy.formats, *s.blanket) if f in s.blanket or f"autocast {f}" in s.seconds]
    fmts = list(dict.fromkeys(fmts))
    if s.source != "measured" or "policy" not in s.seconds or "fp32" not in s.seconds:
        why = f": {s.note}" if s.note else ""
        return ["; ".join([f"modelled: policy step time {s.modelled:.2f}x FP32 ({s.profile}, not measured{why})",
                           *(f"blanket {f.upper()} fails: {s.blanket[f]}" for f in fmts if s.blanket.get(f))])]
    auto = [f for f in fmts if f"autocast {f}" in s.seconds]
    head = f"policy step time {s.ratio('policy', 'fp32'):.2f}x FP32" + "".join(
        f", {s.ratio('policy', f'autocast {f}'):.2f}x blanket {f.upper()} autocast" for f in auto)
    shown = ["policy", "fp32", *(f"autocast {f}" for f in auto)]
    head += (f" (measured here, median of {len(s.seconds['policy'])} steps: "
             + ", ".join(f"{'FP32' if k == 'fp32' else k} {_ms(s.seconds[k])}" for k in shown) + ")")
    lines = ["; ".join([head, *(_verdict(s, f) for f in fmts if f in s.blanket)])]
    lines.append(f"modelled {s.modelled:.2f}x FP32 by the device profile ({s.profile}); measured "
                 f"{s.ratio('policy', 'fp32'):.2f}x: the profile's error on this model")
    if s.note:
        lines.append(s.note)
    return lines


def _verdict(s: StepSpeed, fmt: str) -> str:
    name, auto = fmt.upper(), f"autocast {fmt}"
    if s.blanket[fmt] == UNPROVEN:
        return f"blanket {name} is {UNPROVEN}"
    if s.blanket[fmt]:
        return f"blanket {name} fails: {s.blanket[fmt]}"
    if auto in s.seconds and clearly_faster(s.seconds[auto], s.seconds["policy"]):
        gain = s.ratio("policy", auto) - 1
        return f"blanket {name} is numerically safe here and {100 * gain:.0f}% faster: use it"
    return f"blanket {name} is numerically safe here, and not clearly faster than the policy"


def profile_label(origin: Any, target: str, source: str = "") -> str:
    """Where a modelled figure comes from, in words.

    Example:
        >>> profile_label("estimate", "cuda"), profile_label("file", "cpu", "h100.json")
        ('built-in CUDA estimate', 'profile file h100.json')
    """
    if origin == "estimate":
        return f"built-in {target.upper()} estimate"
    if origin == "calibrated":
        return "calibrated here"
    return f"profile file {source}".strip() if origin == "file" else "device profile"


def modelled_record(modelled: float, profile: str, blanket: Mapping[str, str], why: str) -> StepSpeed:
    """The policy's :class:`StepSpeed` where no step was timed (``why``).

    Example:
        >>> modelled_record(0.66, "built-in CUDA estimate", {}, "target cuda, tuned on cpu").source
        'modelled'
    """
    return StepSpeed("modelled", modelled=modelled, profile=profile, blanket=dict(blanket), note=why)
