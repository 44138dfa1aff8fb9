"""The report's facts: the policy as plain data (the JSON report), and the one-line statements built from it.

:mod:`autoprec.report._sections` arranges these into the sections that the Markdown and HTML
reports both draw.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING, Any

from ..policy._records import BACK_OFFS
from ._speed_lines import speed_lines

if TYPE_CHECKING:
    from ..policy._policy import Policy

__all__ = ["CELL", "device_lines", "experts_line", "fractions_line", "guard_revisions", "memory_text", "num", "short", "strip_profile",
           "summary", "why_nothing_cast"]


def summary(policy: "Policy") -> dict[str, Any]:
    """The report as plain data.

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> summary(Policy(layers={"fc": LayerEntry("bf16", flops=10)}))["low_precision_flop_fraction"]
        1.0
        >>> summary(Policy(layers={"fc": LayerEntry("bf16", flops=10)}))["low_precision_flop_fraction_measured"] is None
        True
    """
    counts: dict[str, int] = {}
    for e in policy.layers.values():
        counts[e.precision] = counts.get(e.precision, 0) + 1
    ver = policy.verification
    return {
        "target": policy.target,
        "emulated": policy.emulated,
        "formats": list(policy.formats),
        "layers": len(policy.layers),
        "layers_per_precision": counts,
        "low_precision_flop_fraction": policy.low_precision_fraction(),  # predicted from the layers' formats
        "low_precision_flop_fraction_measured": None if ver is None else ver.measured_fraction,
        "flops_total": sum(e.flops for e in policy.layers.values()) + sum(policy.unseen.values()),
        "flops_unseen": sum(policy.unseen.values()),
        "unseen": dict(policy.unseen),
        "excluded": {k: {"reason": e.reason, "detail": e.detail, "hazards": list(e.hazards), "op": e.op}
                     for k, e in policy.excluded().items()},
        "backed_off": {k: {"detail": e.detail, "op": e.op, "by": e.reason} for k, e in policy.layers.items()
                       if e.reason in BACK_OFFS},
        "no_gain": {k: {"detail": e.detail, "op": e.op} for k, e in policy.layers.items()
                    if e.reason == "no gain" and e.precision == "fp32"},
        "opaque": dict(policy.opaque),
        "scaler": None if policy.scaler is None or "fp16" not in policy.assignment.values()
        else vars(policy.scaler),
        "tolerance": dict(policy.tolerance),
        "verification": None if ver is None else {
            "passed": ver.passed, "steps": ver.steps, "max_gap": ver.max_gap, "bound": ver.bound,
            "noise_floor": ver.noise_floor, "threshold": ver.threshold,
            "skipped_steps": ver.skipped_steps, "longest_skip_run": ver.longest_skip_run, "rounds": ver.rounds,
            "note": ver.note, "nothing_cast": ver.nothing_cast, "flops_by_dtype": dict(ver.flops_by_dtype),
            "measured_fraction": ver.measured_fraction, "compiled": ver.compiled,
            "compiled_max_gap": ver.compiled_max_gap},
        "stats": dict(policy.stats),
        "guard_events": guard_revisions(policy),
        "assignment": policy.assignment,
        "speed": None if policy.speed is None else dataclasses.asdict(policy.speed),
        "speed_lines": speed_lines(policy),  # what the report says first
    }


#: the longest evidence a table cell shows; the full text follows the table
CELL = 120


def fractions_line(policy: "Policy") -> str:
    """The 16-bit share of the matmul/conv FLOPs: measured where verification ran the policy, and predicted.

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> print(fractions_line(Policy(layers={"fc": LayerEntry("bf16", flops=8)})))
        matmul/conv FLOPs in 16-bit: **100.0%** predicted from the layers' formats (not measured: verification did not run), of 8 forward FLOPs measured at run time by the trace
    """
    total = sum(e.flops for e in policy.layers.values()) + sum(policy.unseen.values())
    unseen = sum(policy.unseen.values())
    of = (f"{total} forward FLOPs measured at run time by the trace"
          + (f", {unseen} of them outside every layer (FP32)" if unseen else ""))
    predicted = f"{100 * policy.low_precision_fraction():.1f}%"
    low = "16-bit or FP8" if "fp8" in policy.formats else "16-bit"
    ver = policy.verification
    measured = None if ver is None else ver.measured_fraction
    if measured is not None:
        counted = sum(ver.flops_by_dtype.values())
        return (f"matmul/conv FLOPs in {low}: **{100 * measured:.1f}% measured** as the verified policy ran "
                f"(operand dtypes of one forward: {counted} FLOPs); predicted from the layers' formats: {predicted} "
                f"of {of}")
    if ver is not None and ver.nothing_cast:
        return f"matmul/conv FLOPs in {low}: **0.0%**: nothing cast ({of})"
    why = "verification did not run" if ver is None else "a policy file from before the count"
    return f"matmul/conv FLOPs in {low}: **{predicted}** predicted from the layers' formats (not measured: {why}), of {of}"


#: a parameter of three dimensions or more in a module signature (``up(4, 128, 512)``): stacked expert weights
_STACKED = re.compile(r"\w+\(\d+, \d+, \d+")


def experts_line(policy: "Policy") -> str | None:
    """The mixture-of-experts line: the layers whose modules hold stacked (3-D and up) weights and are no
    convolution, as grouped experts are; their share of the matmul/conv FLOPs and their formats. None where
    the model has none.

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> p = Policy(layers={"experts": LayerEntry("bf16", flops=96), "router": LayerEntry("fp32", flops=4)},
        ...            modules={"experts": "GroupedExperts[up(4, 8, 16)]", "router": "Linear[weight(4, 8)]"})
        >>> print(experts_line(p))
        experts (stacked expert weights): 1 layer, 96.0% of the matmul/conv FLOPs; by format: bf16 1 (96 FLOPs)
    """
    experts = {k: e for k, e in policy.layers.items()
               if _STACKED.search(policy.modules.get(k, "")) and not policy.modules[k].startswith("Conv")}
    if not experts:
        return None
    total = sum(e.flops for e in policy.layers.values()) + sum(policy.unseen.values())
    flops = sum(e.flops for e in experts.values())
    by: dict[str, list[int]] = {}
    for e in experts.values():
        by.setdefault(e.precision, []).append(e.flops)
    share = f"{100 * flops / total:.1f}%" if total else "-"
    formats = ", ".join(f"{p} {len(v)} ({sum(v)} FLOPs)" for p, v in sorted(by.items()))
    return (f"experts (stacked expert weights): {len(experts)} layer{'s' if len(experts) > 1 else ''}, {share} of "
            f"the matmul/conv FLOPs; by format: {formats}")


def device_lines(st: dict[str, Any]) -> list[str]:
    """The device lines: what priced the formats (named here once), and each format's modelled speed.
    (``stats`` is free-form in a file: anything not of the shape ``tune`` writes is left out.)

    Example:
        >>> device_lines({"profile_origin": "estimate", "profile": "built-in estimate for cuda"})
        ['speed figures: built-in estimate for cuda **(an estimate, not measured on the device)**']
        >>> device_lines({"profile_origin": "calibrated", "profile": "this CPU", "priced_rows": 8192})
        ['speed figures: this CPU; priced at a training step of 8192 rows (train_batch_size), not the tuning batch']
    """
    origin = st.get("profile_origin")
    if not isinstance(origin, str):
        return []
    lines = [f"speed figures: {st.get('profile', origin)}"]
    if origin == "estimate":
        lines[-1] += " **(an estimate, not measured on the device)**"
    rows = st.get("priced_rows")
    if isinstance(rows, int) and not isinstance(rows, bool):
        lines[-1] += f"; priced at a training step of {rows} rows (train_batch_size), not the tuning batch"
    speeds = st.get("format_speed")
    for fmt, sp in sorted(speeds.items(), key=lambda kv: str(kv[0])) if isinstance(speeds, dict) else ():
        speed = sp.get("speed") if isinstance(sp, dict) else None
        if not isinstance(speed, (int, float)) or isinstance(speed, bool) or not 0 < speed < math.inf:
            continue
        how = "measured" if origin != "estimate" else "estimated"
        verdict = (f"{speed:.3g}x the FP32 speed ({1 / speed:.3g}x slower)" if speed < 1
                   else f"{speed:.3g}x the FP32 speed")
        lines.append(f"{fmt} on all {num(sp.get('layers'))} matmul/conv layers: {verdict}, {how}; faster alone "
                     f"for {num(sp.get('faster'))} of them"
                     + (" (layers stay FP32 where it is slower)" if speed < 1 else ""))
    return lines


def memory_text(st: dict[str, Any]) -> str:
    """``, peak memory 412 MiB (process RSS; by stage: probe 380, ...)``: tuning's peak above where it started.

    Stats are free-form (a file may carry anything there): what is not a number is shown as it is.

    Example:
        >>> memory_text({"peak_memory_mb": 412.3, "peak_memory_kind": "process RSS"})
        ', peak memory 412 MiB above the start (process RSS)'
    """
    if "peak_memory_mb" not in st:
        return ""
    by = st.get("peak_memory_mb_by_stage")
    stages = ", ".join(f"{k} {_mib(v)}" for k, v in by.items()) if isinstance(by, dict) else ""
    bound = ", a lower bound" if st.get("peak_memory_exact") is False else ""
    return (f", peak memory {_mib(st['peak_memory_mb'])} MiB above the start ({st.get('peak_memory_kind', '?')}{bound}"
            + (f"; by stage: {stages}" if stages else "") + ")")


def strip_profile(text: str, profile: str) -> str:
    """The evidence without the profile's description, which the report names once at the top.

    Example:
        >>> strip_profile("bf16: not faster; calibrated here: a CPU", "calibrated here: a CPU")
        'bf16: not faster'
    """
    return text.replace("; " + profile, "").replace(profile, "the speed figures above") if profile else text


#: words every step-time note carries (:func:`autoprec.device._costs.cost_note`): said once, in the no-gain section
_FILLER = " with its region and casts"


def short(text: str, limit: int = CELL) -> str:
    """``text`` cut to about ``limit`` characters at a clause (long asides dropped first), marked with an ellipsis.

    Step times lose the words every one of them carries ("with its region and casts": the report's
    no-gain section says it once).

    Example:
        >>> short("bf16: not faster (because of a long aside here); step time 1 ms; modelled", 40)
        'bf16: not faster; step time 1 ms …'
    """
    text = text.replace(_FILLER, "")
    if len(text) <= limit:
        return text
    clauses = [re.sub(r" \([^()]{20,}\)", "", c) for c in text.split("; ")]
    out = clauses[0]
    if len(out) > limit:
        return out[:limit].rsplit(" ", 1)[0] + " …"
    for c in clauses[1:]:
        if len(out) + 2 + len(c) > limit:
            break
        out += "; " + c
    return out + " …"


def _mib(x: Any) -> str:
    return f"{x:.0f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def num(x: Any) -> str:
    """A figure as the report writes it: floats to 3 significant digits, anything else as it is.

    Example:
        >>> num(0.000273412), num(20)
        ('0.000273', '20')
    """
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def why_nothing_cast(policy: "Policy") -> str:
    """Why a policy casts no layer, and what to do about it; ``""`` where some layer is cast.

    The reasons, each with its count and first layers: verification backed the last cast layers off,
    layers are FP32 for a numerical reason (the probe's evidence), or 16-bit is not faster at these
    layers' shapes on the device that priced them.

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> print(why_nothing_cast(Policy(layers={"fc": LayerEntry("fp32", "no gain", flops=8)}, formats=("bf16",))))
        nothing cast: 1 matmul/conv layer(s) gain nothing (fc): BF16 is not faster than FP32 for these layer sizes on cpu; tune with a realistic batch size (the training step's, not a small sample), or for the device you train on (target=/profile=, --target/--profile)
    """
    layers = policy.layers
    if any(e.precision != "fp32" for e in layers.values()):
        return ""
    backed = [k for k, e in layers.items() if e.reason in BACK_OFFS]
    hazards = [k for k, e in layers.items() if e.excluded]
    slow = [k for k, e in layers.items() if e.reason == "no gain" and e.flops > 0]
    parts = []
    if backed:
        parts.append(f"the held-out check or verification backed off the last {len(backed)} cast layer(s) "
                     f"({_some(backed)}): the policy's errors on held-out data or its loss curve left the bound; raise the verification tolerance (verify_tolerance=, "
                     "--verify-tolerance) if that gap is acceptable, or check the model and optimizer")
    if hazards:
        named = _some([f"{k or '(root)'} ({layers[k].reason})" for k in hazards])
        ranged = any(layers[k].reason in ("overflow", "range") for k in hazards) and "bf16" not in policy.formats
        fix = ("allow BF16 where the device runs it (dtypes=, --dtypes): it has FP32's range" if ranged
               else "a looser tolerance (tolerance=, --tolerance) lets more of them cast")
        parts.append(f"{len(hazards)} layer(s) are FP32 for a numerical reason ({named}): see their evidence in the "
                     f"report; {fix}")
    if slow:
        fmts = "/".join(f.upper() for f in policy.formats) or "16-bit"
        device = policy.stats.get("device") if isinstance(policy.stats.get("device"), str) else policy.target
        estimate = " (by a built-in estimate)" if policy.stats.get("profile_origin") == "estimate" else ""
        parts.append(f"{len(slow)} matmul/conv layer(s) gain nothing ({_some(slow)}): {fmts} is not faster than FP32 "
                     f"for these layer sizes on {device}{estimate}; tune with a realistic batch size (the training "
                     "step's, not a small sample), or for the device you train on (target=/profile=, "
                     "--target/--profile)")
    if not parts:
        parts.append("no layer has matmul/conv work that 16-bit could speed up")
    return "nothing cast: " + "; ".join(parts)


def guard_revisions(policy: Policy) -> list[dict[str, Any]]:
    """The revisions :func:`autoprec.guard` made while the model trained (``stats["guard_events"]``, oldest
    first), each as ``step``, ``layer``, ``action``, ``old``, ``new`` and ``evidence``, the evidence without
    the ``"step N: layer old -> new: "`` the other fields say. A policy saved before the guard existed, or
    never guarded, has none; an entry that is no event (a hand edit) is left out, a missing field is ``"-"``.

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> e = {"step": 50, "layer": "head", "action": "adapt", "old": "fp16", "new": "bf16",
        ...      "evidence": "step 50: head fp16 -> bf16: |out| max 9.1e3 x headroom 8 > 65504"}
        >>> guard_revisions(Policy(layers={}, stats={"guard_events": [e, "junk"]}))[0]["evidence"]
        '|out| max 9.1e3 x headroom 8 > 65504'
        >>> guard_revisions(Policy(layers={}))
        []
    """
    events = policy.stats.get("guard_events")
    out = []
    for e in events if isinstance(events, list) else []:
        if not isinstance(e, dict) or not isinstance(e.get("evidence"), str):
            continue
        row = {k: e.get(k, "-") for k in ("step", "layer", "action", "old", "new")}
        text = e["evidence"].removeprefix(f"step {row['step']}: ")
        text = text.removeprefix(f"{row['layer']} {row['old']} -> {row['new']}: ")
        out.append({**row, "evidence": text})
    return out


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(k or "(root)" for k in keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def held_out_line(policy: "Policy") -> str:
    """What the held-out check found, in one sentence ("" where the policy has no record of one).

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> from autoprec.policy import HeldOut
        >>> h = HeldOut("2 of 8 rows", loss_err=2e-4, grad_err=0.01, tuning_loss_err=1e-4, tuning_grad_err=0.004,
        ...             first_loss_err=2e-4, first_grad_err=0.01)
        >>> print(held_out_line(Policy(layers={}, held_out=h)))
        **PASSED** on 2 of 8 rows held out: loss error 0.0002, gradient error 0.01 there (bounds 0.01, 0.05), against 0.0001, 0.004 on the tuning data: a margin of 2.5x (held-out over tuning error)
    """
    h = policy.held_out
    if h is None:
        return ""
    if h.skipped:
        return f"not run: {h.skipped}"
    verdict = f"**{'PASSED' if h.passed else 'FAILED'}** on {h.held} held out: "
    margin = f"a margin of {num(h.margin)}x (held-out over tuning error)"
    if not h.backed_off:
        return (f"{verdict}loss error {num(h.loss_err)}, gradient error {num(h.grad_err)} there (bounds "
                f"{num(h.bound_loss)}, {num(h.bound_grad)}), against {num(h.tuning_loss_err)}, "
                f"{num(h.tuning_grad_err)} on the tuning data: {margin}")
    return (f"{verdict}the searched policy had loss error {num(h.first_loss_err)}, gradient error "
            f"{num(h.first_grad_err)} there (bounds {num(h.bound_loss)}, {num(h.bound_grad)}), against "
            f"{num(h.tuning_loss_err)}, {num(h.tuning_grad_err)} on the tuning data: a margin of {num(h.margin)}x; "
            f"{len(h.backed_off)} layer(s) went back to FP32 in {h.rounds - 1} round(s), the most amplifying and "
            f"closest to the bound first ({_some(list(h.backed_off))}): now {num(h.loss_err)}, {num(h.grad_err)}")
