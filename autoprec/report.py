"""Stage 7, report: what the policy decided and the measurements behind it, as Markdown, JSON or HTML."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from .errors import OptionError

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["render", "speed_block", "summary"]


def summary(policy: "Policy") -> dict[str, Any]:
    """The report as plain data.

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> summary(Policy(layers={"fc": LayerEntry("bf16", flops=10)}))["low_precision_flop_fraction"]
        1.0
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
        "low_precision_flop_fraction": policy.low_precision_fraction(),
        "flops_total": sum(e.flops for e in policy.layers.values()) + sum(policy.unseen.values()),
        "flops_unseen": sum(policy.unseen.values()),
        "unseen": dict(policy.unseen),
        "excluded": {k: {"reason": e.reason, "detail": e.detail, "hazards": list(e.hazards), "op": e.op}
                     for k, e in policy.excluded().items()},
        "backed_off": {k: {"detail": e.detail, "op": e.op} for k, e in policy.layers.items()
                       if e.reason == "verification back-off"},
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
            "note": ver.note},
        "stats": dict(policy.stats),
        "assignment": policy.assignment,
        **_speed_summary(policy),
    }


def _markdown(policy: "Policy") -> str:
    s = summary(policy)
    ver = s["verification"]
    if ver is not None and not ver["passed"]:  # the first line a reader sees
        lines = [f"# autoprec policy report: FAILED verification (loss gap {_num(ver['max_gap'])} against a "
                 f"threshold of {_num(ver['threshold'])}): not a verified policy", ""]
    else:
        lines = ["# autoprec policy report", ""]
    lines += speed_block(policy)
    lines.append(f"- target device: **{s['target']}**; formats allowed: {', '.join(s['formats']) or '-'}")
    if s["emulated"]:
        lines.append(f"- evidence **emulated**: measured on a CPU that runs the 16-bit layers as {s['target'].upper()} "
                     "autocast would (FP16 matmul/conv as tensor cores, its FP32 ops in FP32, FFTs as cuFFT's "
                     "half transforms); confirm on the device")
    counts = ", ".join(f"{n} {p}" for p, n in sorted(s["layers_per_precision"].items()))
    lines.append(f"- layers: {s['layers']} ({counts})")
    lines.append(f"- matmul/conv FLOPs in 16-bit: **{100 * s['low_precision_flop_fraction']:.1f}%** of "
                 f"{s['flops_total']} forward FLOPs measured at run time"
                 + (f", {s['flops_unseen']} of them outside every layer (FP32)" if s["flops_unseen"] else ""))
    if s["tolerance"]:
        lines.append("- error bound: " + ", ".join(f"{k} {v:g}" for k, v in s["tolerance"].items()))
    if s["scaler"]:
        sc = s["scaler"]
        lines.append(f"- GradScaler: init_scale 2^{_log2(sc['init_scale'])}, growth_interval "
                     f"{sc['growth_interval']}, backoff {sc['backoff_factor']:g}")
    else:
        lines.append("- GradScaler: not needed (no FP16 layer)")
    st = s["stats"]
    if st:
        keys = ("tuning_seconds", "probe_passes", "search_passes", "verify_passes", "trials",
                "measured_loss_err", "measured_grad_err")
        ranks = st.get("world_size", 1)
        lines.append("- tuning: " + ", ".join(f"{k.replace('_', ' ')} {_num(st[k])}" for k in keys if k in st)
                     + (f" (passes: one rank's of {ranks}, tuned under torch.distributed)"
                        if isinstance(ranks, int) and ranks > 1 else "") + _memory(st))
    if st.get("probe_shared"):
        lines.append(f"- probe: {st['probe_shared']} of {st.get('probe_measurements', '?')} layer measurements come "
                     f"from {st.get('probe_roles', '?')} roles of repeated blocks probed as groups: those figures "
                     "are the group's, a bound on the layer's own (its evidence says \"at most\")")
    lines += _device(st)
    lines.append("")
    lines.append("## Verification")
    if ver is None:
        lines.append("not run")
    else:
        verdict = "PASSED" if ver["passed"] else "FAILED"
        floor = (f"; noise floor {_num(ver['noise_floor'])}: FP32 from 16-bit-rounded weights, threshold "
                 f"{_num(ver['threshold'])}" if ver["noise_floor"] else "")
        lines.append(f"**{verdict}**: {ver['steps']} training steps, largest loss gap "
                     f"{_num(ver['max_gap'])} of the FP32 loss (bound {_num(ver['bound'])}{floor}), "
                     f"{ver['skipped_steps']} skipped steps (longest run {ver['longest_skip_run']}), "
                     f"{ver['rounds']} round(s). {ver['note']}".rstrip())
        if policy.verification is not None and policy.verification.fp32_losses:
            v = policy.verification
            lines += ["", "| step | FP32 loss | policy loss |", "| ---: | ---: | ---: |"]
            idx = sorted({0, len(v.fp32_losses) // 2, len(v.fp32_losses) - 1})
            for i in idx:
                pol = v.policy_losses[i] if i < len(v.policy_losses) else float("nan")
                lines.append(f"| {i} | {v.fp32_losses[i]:.6g} | {pol:.6g} |")
    lines += ["", "## Layers kept in FP32 for a numerical reason"
              + (" (evidence emulated on a CPU)" if s["emulated"] else ""), ""]
    if s["excluded"]:
        lines += ["| layer | op | hazard | reason | evidence |", "| --- | --- | --- | --- | --- |"]
        for k, e in s["excluded"].items():
            lines.append(f"| `{k or '(root)'}` | {e['op']} | {', '.join(e['hazards']) or '-'} | {e['reason']} | "
                         f"{e['detail'].replace('|', '/')} |")
    else:
        lines.append("none")
    if s["backed_off"]:
        lines += ["", "## Layers moved to FP32 by verification back-off", "",
                  "The policy's loss curve left the threshold, so verification moved the cast layers the probe "
                  "ranked most sensitive to FP32. Nothing was measured to fail on these layers themselves.", "",
                  "| layer | op | evidence |", "| --- | --- | --- |"]
        lines += [f"| `{k or '(root)'}` | {e['op']} | {e['detail'].replace('|', '/')} |"
                  for k, e in s["backed_off"].items()]
    if s["no_gain"]:
        lines += ["", "## Layers kept in FP32 for speed (no gain)", "",
                  "A 16-bit format would not make them faster on the target: each format's step time, and where "
                  "that figure comes from.", "", "| layer | op | evidence |", "| --- | --- | --- |"]
        lines += [f"| `{k or '(root)'}` | {e['op']} | {e['detail'].replace('|', '/')} |"
                  for k, e in s["no_gain"].items()]
    if s["opaque"]:
        lines += ["", "## Opaque to FX", "",
                  "Their own code could not be captured; it runs in the precision that flows in (FP32).", ""]
        lines += [f"- `{k or '(root)'}`: {v}" for k, v in s["opaque"].items()]
    if s["unseen"]:
        lines += ["", "## FLOPs outside every layer", "",
                  "Matmul-class work autoprec could not attribute to a layer: it runs in the precision that "
                  "flows in (FP32) and counts as FP32 above.", "",
                  "| module | FLOPs | share |", "| --- | ---: | ---: |"]
        lines += [f"| `{k or '(root)'}` | {v} | {v / max(s['flops_total'], 1):.1%} |" for k, v in s["unseen"].items()]
    lines += ["", "## Formats", "", "| layer | op | format | FLOPs | note |", "| --- | --- | --- | ---: | --- |"]
    for k, e in policy.layers.items():
        note = "" if e.reason == "cast" else e.reason
        lines.append(f"| `{k or '(root)'}` | {e.op} | {e.precision} | {e.flops} | {note} |")
    return "\n".join(lines) + "\n"


def _speed_summary(policy: "Policy") -> dict[str, Any]:
    """``speed`` (the policy's step-time record, or None) and ``speed_lines`` (what the report says first)."""
    from dataclasses import asdict

    from .speed_lines import speed_lines
    return {"speed": None if policy.speed is None else asdict(policy.speed), "speed_lines": speed_lines(policy)}


def speed_block(policy: "Policy") -> list[str]:
    """The report's first lines: what the policy buys (:func:`autoprec.step_speed.speed_lines`), in Markdown.

    Example:
        >>> from autoprec.policy import Policy
        >>> speed_block(Policy(layers={}, stats={"modelled_cost_ratio": 0.5, "profile_origin": "calibrated"}))
        ['**modelled: policy step time 0.50x FP32 (calibrated here, not measured)**', '']
    """
    from .speed_lines import speed_lines
    lines = speed_lines(policy)
    return [f"**{lines[0]}**", "", *(f"- {line}" for line in lines[1:])] if lines else []


def _device(st: dict[str, Any]) -> list[str]:
    """The device lines: what priced the formats, and each format's modelled speed on the model.
    (``stats`` is free-form in a file: anything not of the shape ``tune`` writes is left out.)"""
    origin = st.get("profile_origin")
    if not isinstance(origin, str):
        return []
    lines = [f"- speed figures: {st.get('profile', origin)}"]
    if origin == "estimate":
        lines[-1] += " **(an estimate, not measured on the device)**"
    speeds = st.get("format_speed")
    for fmt, sp in sorted(speeds.items(), key=lambda kv: str(kv[0])) if isinstance(speeds, dict) else ():
        speed = sp.get("speed") if isinstance(sp, dict) else None
        if not isinstance(speed, (int, float)) or isinstance(speed, bool) or not 0 < speed < math.inf:
            continue
        how = "measured" if origin != "estimate" else "estimated"
        verdict = (f"{speed:.3g}x the FP32 speed ({1 / speed:.3g}x slower)" if speed < 1
                   else f"{speed:.3g}x the FP32 speed")
        lines.append(f"- {fmt} on all {_num(sp.get('layers'))} matmul/conv layers: {verdict}, {how}; faster alone "
                     f"for {_num(sp.get('faster'))} of them"
                     + (" (layers stay FP32 where it is slower)" if speed < 1 else ""))
    return lines


def _memory(st: dict[str, Any]) -> str:
    """``, peak memory 412 MiB (process RSS; by stage: probe 380, ...)``: tuning's peak above where it started.

    Stats are free-form (a file may carry anything there): what is not a number is shown as it is.
    """
    if "peak_memory_mb" not in st:
        return ""
    by = st.get("peak_memory_mb_by_stage")
    stages = ", ".join(f"{k} {_mib(v)}" for k, v in by.items()) if isinstance(by, dict) else ""
    bound = ", a lower bound" if st.get("peak_memory_exact") is False else ""
    return (f", peak memory {_mib(st['peak_memory_mb'])} MiB above the start ({st.get('peak_memory_kind', '?')}{bound}"
            + (f"; by stage: {stages}" if stages else "") + ")")


def _mib(x: Any) -> str:
    return f"{x:.0f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _log2(x: float) -> str:
    import math
    return f"{math.log2(x):g}" if x > 0 else "-inf"


def _num(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def render(policy: "Policy", format: str = "md") -> str:
    """The report as ``"md"`` (Markdown), ``"json"`` or ``"html"`` (one page with inline SVG charts).

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> render(Policy(layers={"fc": LayerEntry("bf16")}), "json").startswith("{")
        True
    """
    if format in ("md", "markdown"):
        return _markdown(policy)
    if format == "json":
        return json.dumps(summary(policy), indent=2, sort_keys=True)
    if format == "html":
        from .report_html import render_html
        return render_html(policy)
    raise OptionError(f"report format {format!r} is not supported: use 'md', 'json' or 'html'")


def _register() -> None:
    from .policy import register_stage

    register_stage("report", render)


_register()
