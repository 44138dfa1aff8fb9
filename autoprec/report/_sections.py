"""The report's content as data: sections of paragraphs, bullets and tables that every renderer draws.

The Markdown report (:mod:`autoprec.report`) and the HTML page (:mod:`autoprec.report._html`) render
the same :func:`sections`, so the two cannot say different things. Text carries two inline marks,
``**bold**`` and ```code```. A :class:`Chart` is drawn by the HTML page only (Markdown has the
numbers as a table); a ``collapsed`` section is the HTML page's folded block of raw figures (the JSON
report carries them for Markdown readers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from ._facts import (
    device_lines,
    experts_line,
    fractions_line,
    held_out_line,
    memory_text,
    num,
    short,
    strip_profile,
    summary,
    why_nothing_cast,
)

if TYPE_CHECKING:
    from ..policy._policy import Policy

__all__ = ["Bullets", "Chart", "Notes", "Section", "Table", "Text", "sections"]


@dataclass(frozen=True)
class Text:
    """A paragraph."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A bulleted list."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A table; ``right`` names the columns (by index) that hold numbers."""

    head: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    right: tuple[int, ...] = ()


@dataclass(frozen=True)
class Notes:
    """The full text behind a table's shortened cells: (layers, text), one entry per distinct text."""

    title: str
    items: tuple[tuple[tuple[str, ...], str], ...]


@dataclass(frozen=True)
class Chart:
    """A chart the HTML page draws from the policy (``"curves"`` or ``"sensitivity"``)."""

    name: str


Block = Union[Text, Bullets, Table, Notes, Chart]


@dataclass(frozen=True)
class Section:
    """A heading (level 1 for the page's title), a verdict that follows it (the page's: FAILED), and its blocks."""

    title: str
    blocks: tuple[Block, ...]
    level: int = 2
    collapsed: bool = False
    verdict: str = ""


def sections(policy: "Policy") -> list[Section]:
    """The report's sections, in order: header, verification, sensitivity, why layers are FP32, formats, stats.

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> [s.title for s in sections(Policy(layers={"fc": LayerEntry("bf16", flops=8)}))][:2]
        ['autoprec policy report', 'Verification']
    """
    s = summary(policy)
    out = [_header(policy, s), _verification(policy)]
    held = held_out_line(policy)
    if held:
        out.append(Section("Held-out check (data the decisions were not made on)", (Text(held),)))
    if s["guard_events"]:  # autoprec.guard revised the policy during training: what it saw, in order
        out.append(_revisions(s["guard_events"]))
    if any(e.measured for e in policy.layers.values()):
        out.append(Section("Per-layer sensitivity (the probe's error of each layer alone, relative to the bound)",
                           (Chart("sensitivity"),)))
    out += _fp32_sections(policy, s)
    from ._fp8 import fp8_section  # it builds on this module's records

    fp8 = fp8_section(policy)
    if fp8 is not None:
        out.append(fp8)
    out += _work_sections(policy, s)
    if s["stats"]:
        out.append(Section("Tuning statistics", _stats_blocks(s["stats"]), collapsed=True))
    return out


def _revisions(events: list[dict[str, Any]]) -> Section:
    """The guard's revisions as a table: step, layer, old -> new, and the figures that made it act."""
    layers = ", ".join(dict.fromkeys(f"`{e['layer'] or '(root)'}`" for e in events))
    lead = Text(f"autoprec.guard revised this policy while the model trained: {len(events)} revision(s) of "
                f"{layers}, from step {events[0]['step']} "
                f"to step {events[-1]['step']} (steps count guard.step calls). The formats below are the revised ones; "
                "the verification above is the tuned policy's.")
    rows = tuple((str(e["step"]), f"`{e['layer'] or '(root)'}`", f"{e['old']} -> {e['new']}", e["evidence"])
                 for e in events)
    return Section("Revised during training (autoprec.guard)",
                   (lead, Table(("step", "layer", "old -> new", "evidence"), rows, right=(0,))))


def _title(policy: "Policy") -> tuple[str, str]:
    """The page's title, and what follows it on a failed verification (the first thing a reader sees)."""
    ver = policy.verification
    if ver is not None and not ver.passed:
        return ("autoprec policy report: FAILED verification",
                f"(loss gap {num(ver.max_gap)} against a threshold of {num(ver.threshold)}): not a verified policy")
    return "autoprec policy report", ""


def _header(policy: "Policy", s: dict[str, Any]) -> Section:
    st = s["stats"]
    speed = s["speed_lines"]  # what the policy buys, first: the step time, measured or modelled
    items = list(speed[1:])
    items.append(f"target device: **{s['target']}**; formats allowed: {', '.join(s['formats']) or '-'}")
    if s["emulated"]:
        items.append(f"evidence **emulated**: measured on a CPU that runs the 16-bit layers as {s['target'].upper()} "
                     "autocast would (FP16 matmul/conv as tensor cores, its FP32 ops in FP32, FFTs as cuFFT's "
                     "half transforms); confirm on the device")
    counts = ", ".join(f"{n} {p}" for p, n in sorted(s["layers_per_precision"].items()))
    items.append(f"layers: {s['layers']} ({counts})")
    items.append(fractions_line(policy))
    experts = experts_line(policy)
    if experts is not None:
        items.append(experts)
    from ._fp8 import fp8_line

    fp8 = fp8_line(policy)
    if fp8 is not None:
        items.append(fp8)
    if s["tolerance"]:
        items.append("error bound: " + ", ".join(f"{k} {v:g}" for k, v in s["tolerance"].items()))
    if s["scaler"]:
        sc = s["scaler"]
        items.append(f"GradScaler: init_scale 2^{_log2(sc['init_scale'])}, growth_interval "
                     f"{sc['growth_interval']}, backoff {sc['backoff_factor']:g}")
    else:
        items.append("GradScaler: not needed (no FP16 layer)")
    if st:
        keys = ("tuning_seconds", "probe_passes", "search_passes", "verify_passes", "trials",
                "measured_loss_err", "measured_grad_err")
        ranks = st.get("world_size", 1)
        items.append("tuning: " + ", ".join(f"{k.replace('_', ' ')} {num(st[k])}" for k in keys if k in st)
                     + (f" (passes: one rank's of {ranks}, tuned under torch.distributed)"
                        if isinstance(ranks, int) and ranks > 1 else "") + memory_text(st))
    if st.get("probe_shared"):
        items.append(f"probe: {st['probe_shared']} of {st.get('probe_measurements', '?')} layer measurements come "
                     f"from {st.get('probe_roles', '?')} roles of repeated blocks probed as groups: those figures "
                     "are the group's, a bound on the layer's own (its evidence says \"at most\")")
    items += device_lines(st)
    title, verdict = _title(policy)
    lead = (Text(f"**{speed[0]}**"),) if speed else ()
    return Section(title, (*lead, Bullets(tuple(items))), level=1, verdict=verdict)


def _verification(policy: "Policy") -> Section:
    ver = policy.verification
    if ver is None:
        return Section("Verification", (Text("not run (verify_steps=0)"),))
    if ver.nothing_cast:
        if ver.rounds > 1:  # earlier rounds compared cast policies: say so
            text = (f"**nothing left cast after back-off: nothing to verify**: "
                    f"{ver.note.removeprefix('nothing left cast after back-off: ')}")
        else:
            text = ("**nothing cast: nothing to verify**: every layer is FP32, so the policy trains as FP32 does and "
                    "no run compared anything")
        blocks: list[Any] = [Text(text)]
        why = why_nothing_cast(policy)
        if why:
            blocks.append(Text(why[0].upper() + why[1:] + "."))
    else:
        verdict = "PASSED" if ver.passed else "FAILED"
        floor = (f"; noise floor {num(ver.noise_floor)}: FP32 from 16-bit-rounded weights, threshold "
                 f"{num(ver.threshold)}" if ver.noise_floor else "")
        compiled = (f"; trained again under torch.compile({ver.compiled!r}): loss gap {num(ver.compiled_max_gap)}"
                    if ver.compiled else "")
        blocks = [Text(f"**{verdict}**: {ver.steps} training steps, largest loss gap {num(ver.max_gap)} of the "
                       f"FP32 loss (bound {num(ver.bound)}{floor}), {ver.skipped_steps} skipped steps (longest run "
                       f"{ver.longest_skip_run}), {ver.rounds} round(s){compiled}. {ver.note}".rstrip())]
    if ver.fp32_losses:
        blocks.append(Chart("curves"))
        idx = sorted({0, len(ver.fp32_losses) // 2, len(ver.fp32_losses) - 1})
        pol = ver.policy_losses
        rows = tuple((str(i), f"{ver.fp32_losses[i]:.6g}", f"{pol[i]:.6g}" if i < len(pol) else "-") for i in idx)
        blocks.append(Table(("step", "FP32 loss", "policy loss"), rows, right=(0, 1, 2)))
    return Section("Verification", tuple(blocks))


def _shortened(rows: list[tuple[str, ...]], details: dict[str, str],
               profile: str) -> tuple[list[tuple[str, ...]], Notes | None]:
    """Rows with their evidence (the last column) shortened, and the full texts where shortening cut."""
    full: dict[str, list[str]] = {}
    out = []
    for row, (key, detail) in zip(rows, details.items()):
        text = strip_profile(detail, profile)
        cut = short(text)
        out.append((*row, cut))
        if cut.endswith(" …"):  # cut: the full text follows the table
            full.setdefault(text, []).append(f"`{key or '(root)'}`")
    notes = Notes("Full evidence", tuple((tuple(keys), text) for text, keys in full.items())) if full else None
    return out, notes


def _fp32_sections(policy: "Policy", s: dict[str, Any]) -> list[Section]:
    """Why each FP32 layer is FP32: a numerical reason, a verification back-off, or no gain."""
    profile = s["stats"].get("profile") if isinstance(s["stats"].get("profile"), str) else ""
    out = []
    title = "Layers kept in FP32 for a numerical reason" + (" (evidence emulated on a CPU)" if s["emulated"] else "")
    if s["excluded"]:
        rows, notes = _shortened([(f"`{k or '(root)'}`", e["op"], ", ".join(e["hazards"]) or "-", e["reason"])
                                  for k, e in s["excluded"].items()],
                                 {k: e["detail"] for k, e in s["excluded"].items()}, profile)
        out.append(Section(title, _blocks(Table(("layer", "op", "hazard", "reason", "evidence"), tuple(rows)), notes)))
    else:
        out.append(Section(title, (Text("none"),)))
    if s["backed_off"]:
        rows, notes = _shortened([(f"`{k or '(root)'}`", e["op"]) for k, e in s["backed_off"].items()],
                                 {k: e["detail"] for k, e in s["backed_off"].items()}, profile)
        out.append(Section("Layers moved to FP32 by a back-off", (
            Text("The policy's errors on the held-out data (held-out check) or its loss curve (verification) left the "
                 "bound, so the cast layers the probe ranked most amplifying or most sensitive went back to FP32. "
                 "Nothing was measured to fail on these layers themselves."),
            *_blocks(Table(("layer", "op", "evidence"), tuple(rows)), notes))))
    if s["no_gain"]:
        rows, notes = _shortened([(f"`{k or '(root)'}`", e["op"]) for k, e in s["no_gain"].items()],
                                 {k: e["detail"] for k, e in s["no_gain"].items()}, profile)
        where = " (priced with the speed figures named at the top)" if profile else ""
        out.append(Section("Layers kept in FP32 for speed (no gain)", (
            Text("A 16-bit format would not make them faster on the target: each format's step time (the layer with "
                 f"its precision region and casts), and where that figure comes from{where}. Their error is not why "
                 "they are FP32."),
            *_blocks(Table(("layer", "op", "evidence"), tuple(rows)), notes))))
    return out


def _blocks(table: Table, notes: Notes | None) -> tuple[Block, ...]:
    return (table,) if notes is None else (table, notes)


def _work_sections(policy: "Policy", s: dict[str, Any]) -> list[Section]:
    """Opaque parts, FLOPs outside every layer, and the per-layer format map."""
    out = []
    if s["opaque"]:
        out.append(Section("Opaque to FX", (
            Text("Their own code could not be captured; it runs in the precision that flows in (FP32)."),
            Bullets(tuple(f"`{k or '(root)'}`: {v}" for k, v in s["opaque"].items())))))
    if s["unseen"]:
        total = max(s["flops_total"], 1)
        out.append(Section("FLOPs outside every layer", (
            Text("Matmul-class work autoprec could not attribute to a layer: it runs in the precision that flows in "
                 "(FP32) and counts as FP32 above."),
            Table(("module", "FLOPs", "share"), tuple((f"`{k or '(root)'}`", str(v), f"{v / total:.1%}")
                                                    for k, v in s["unseen"].items()), right=(1, 2)))))
    rows = tuple((f"`{k or '(root)'}`", e.op, f"fp8 ({e.recipe})" if e.recipe else e.precision, str(e.flops),
                  "" if e.reason == "cast" else e.reason)
                 for k, e in policy.layers.items())
    out.append(Section("Formats", (Table(("layer", "op", "format", "FLOPs", "note"), rows, right=(3,)),)))
    return out


def _stats_blocks(st: dict[str, Any]) -> tuple[Block, ...]:
    """Every tuning statistic: the figures as a table, each breakdown (a map) as a bullet."""
    rows, maps = [], []
    for k, v in st.items():
        if k == "guard_events":
            continue  # a section of its own
        if not isinstance(v, dict):
            rows.append((k.replace("_", " "), _flat(v)))
            continue
        name = "peak memory by stage (MiB above the start)" if k == "peak_memory_mb_by_stage" else k.replace("_", " ")
        maps.append(f"{name}: " + ", ".join(f"{a} {_flat(b)}" for a, b in v.items()))
    blocks: list[Block] = [Table(("statistic", "value"), tuple(rows))] if rows else []
    return tuple(blocks) + ((Bullets(tuple(maps)),) if maps else ())


def _flat(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{a} {_flat(b)}" for a, b in v.items()) + "}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _log2(x: float) -> str:
    return f"{math.log2(x):g}" if x > 0 else "-inf"

