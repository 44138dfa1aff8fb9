"""What the policy buys, in words: the speed record's lines, first in the CLI and the reports.

:func:`speed_lines` turns a policy's :class:`~autoprec.StepSpeed` into the lines a user reads first:
measured step times against FP32 and blanket autocast where ``tune`` timed them
(:mod:`autoprec.verify._step_speed`), with each blanket format's verdict and the device profile's modelled
figure beside them; for another target the modelled figure, labelled with where its profile comes
from. :func:`clearly_faster` is the rule by which one set of timed rounds beats another, for the
words here and for the race that decides what ships.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..policy._records import StepSpeed

if TYPE_CHECKING:
    from ..policy._policy import Policy

__all__ = ["DOUBT", "MARGIN", "UNPROVEN", "clearly_faster", "first_failure", "modelled_record", "profile_doubt", "profile_label",
           "speed_lines",
           "step_ms", "unproven"]


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


#: The verdict of a format that no layer fails in, when verification had to back off the policy itself.
UNPROVEN = "not shown safe: verification backed off this policy's own cast layers, and blanket casts more"


def unproven(verdicts: Mapping[str, str]) -> dict[str, str]:
    """``verdicts`` after a verification that backed the policy off: "safe" (``""``) is no longer shown.

    Example:
        >>> unproven({"bf16": "", "fp16": "attn, overflow"})["fp16"]
        'attn, overflow'
    """
    return {f: v or UNPROVEN for f, v in verdicts.items()}


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

def speed_lines(policy: "Policy") -> list[str]:
    """What the policy buys, first line first: measured step times where ``tune`` timed them, else the
    modelled figure with its source; then the blanket formats' verdicts, the modelled figure beside the
    measured one, and how the race decided. Empty for a policy without figures.

    Example:
        >>> from autoprec.policy import Policy
        >>> s = StepSpeed("measured", 0.7, "calibrated here", {"fp32": (0.040, 0.041, 0.042),
        ...               "autocast bf16": (0.030, 0.031, 0.032), "policy": (0.034, 0.035, 0.036)},
        ...               blanket={"bf16": ""})
        >>> for line in speed_lines(Policy(layers={}, formats=("bf16",), speed=s)):
        ...     print(line)
        policy step time 0.85x FP32, 1.13x blanket BF16 autocast (measured here, median of 3 steps: policy 35 ms, FP32 41 ms, autocast bf16 31 ms); blanket BF16 is numerically safe here and 13% faster: use it
        modelled 0.70x FP32 by the device profile (calibrated here); measured 0.85x: the profile's error on this model
        >>> stats = {"modelled_cost_ratio": 0.66, "profile_origin": "estimate"}
        >>> speed_lines(Policy(layers={}, stats=stats, target="cuda"))
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
             + ", ".join(f"{'FP32' if k == 'fp32' else k} {step_ms(s.seconds[k])}" for k in shown) + ")")
    lines = ["; ".join([head, *(_verdict(s, f) for f in fmts if f in s.blanket)])]
    lines.append(f"modelled {s.modelled:.2f}x FP32 by the device profile ({s.profile}); measured "
                 f"{s.ratio('policy', 'fp32'):.2f}x: the profile's error on this model")
    lines += [doubt for f in auto if (doubt := profile_doubt(s, f, policy.stats.get("format_speed")))]
    if s.note:
        lines.append(s.note)
    return lines

#: How far the profile's modelled speed of a format over the matmul/conv layers may sit on the other side
#: of FP32 from the blanket step measured here before the report doubts the profile ...
DOUBT = 1.5
#: ... when the blanket step's median sits at least this far on its side of FP32's
MARGIN = 1.1


def profile_doubt(s: StepSpeed, fmt: str, format_speed: Any) -> str:
    """A warning when the device profile and the measured steps disagree on which side of FP32 ``fmt`` is.

    The profile's figure covers the matmul/conv layers alone and the step covers everything, so only
    a disagreement in direction counts: the profile prices ``fmt`` more than :data:`DOUBT` times
    slower (or faster) than FP32 while blanket autocast in it measured :data:`MARGIN` times faster
    (or slower) than FP32's step, medians against medians. A profile calibrated while the machine was busy, or on another machine, does
    that, and it makes every layer "no gain" (or casts layers that slow the step down).

    Example:
        >>> s = StepSpeed("measured", 1.0, "calibrated here", {"fp32": (0.020, 0.021, 0.020),
        ...               "autocast bf16": (0.016, 0.017, 0.016)})
        >>> profile_doubt(s, "bf16", {"bf16": {"speed": 0.32}})[:98]
        'the device profile prices BF16 at 3.1x the FP32 time over the matmul/conv layers, but blanket BF16'
        >>> profile_doubt(s, "bf16", {"bf16": {"speed": 0.9}})
        ''
    """
    auto = f"autocast {fmt}"
    speed = format_speed.get(fmt, {}).get("speed") if isinstance(format_speed, dict) else None
    if auto not in s.seconds or "fp32" not in s.seconds or not isinstance(speed, (int, float)) or speed <= 0:
        return ""
    measured = s.ratio(auto, "fp32")
    slower = speed < 1 / DOUBT and measured < 1 / MARGIN
    faster = speed > DOUBT and measured > MARGIN
    if not (slower or faster):
        return ""
    return (f"the device profile prices {fmt.upper()} at {1 / speed:.2g}x the FP32 time over the matmul/conv "
            f"layers, but blanket {fmt.upper()} autocast measured {s.ratio(auto, 'fp32'):.2f}x FP32's step here: the "
            f"profile does not describe this machine as it runs now (calibrated while it was busy, or elsewhere?); "
            "calibrate again on a quiet machine: `autoprec calibrate --fresh` (with the threads you tune with: "
            "--threads N) replaces this machine's cached profile, then tune again")


def _verdict(s: StepSpeed, fmt: str) -> str:
    name, auto = fmt.upper(), f"autocast {fmt}"
    if s.blanket[fmt] == UNPROVEN:
        return f"blanket {name} is {UNPROVEN}"
    if s.blanket[fmt]:
        return f"blanket {name} fails: {s.blanket[fmt]}"
    if auto in s.seconds and clearly_faster(s.seconds[auto], s.seconds["policy"]):
        gain = s.ratio("policy", auto) - 1
        return f"blanket {name} is numerically safe here and {100 * gain:.0f}% faster: use it"
    if auto in s.seconds and clearly_faster(s.seconds["policy"], s.seconds[auto]):
        return f"blanket {name} is numerically safe here, and its step takes {100 * (s.ratio(auto, 'policy') - 1):.0f}% longer"
    return f"blanket {name} is numerically safe here, and not clearly faster than the policy"

def step_ms(rounds: Sequence[float]) -> str:
    """The median of timed rounds in milliseconds, as the lines write it.

    Example:
        >>> step_ms([0.0234, 0.0231, 0.3]), step_ms([1.9731])
        ('23.4 ms', '1973 ms')
    """
    ms = statistics.median(rounds) * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.3g} ms"
