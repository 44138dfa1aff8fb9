"""The report as a self-contained HTML page (inline SVG charts, no dependencies) and as a PNG chart.

The page draws the same sections as the Markdown report (:mod:`autoprec.report._sections`), with
two charts: the FP32 vs policy verification loss curves, and a per-layer sensitivity chart (the
probe's error of each layer alone in each 16-bit format, relative to the bound, on a log scale;
layers FP32 for speed get hollow bars and grey labels: their error is not why). The tuning
statistics are folded in a ``<details>`` block. The PNG holds the two charts and needs matplotlib
(``pip install autoprec[plot]``).
"""

from __future__ import annotations

import html
import math
import re
from typing import TYPE_CHECKING, Any

from ..errors import OptionError
from ..policy._records import BACK_OFFS
from ._sections import Bullets, Chart, Notes, Section, Table, Text, sections

if TYPE_CHECKING:
    from ..policy._policy import Policy

__all__ = ["LABEL_CHAR_PX", "LABEL_FONT_PX", "LABEL_MAX_CHARS", "render_html", "save_png", "sensitivity"]

_COLORS = {"fp32": "#4c72b0", "fp16": "#dd8452", "bf16": "#55a868"}


def sensitivity(policy: "Policy") -> list[tuple[str, str, dict[str, float]]]:
    """Per probed layer: (key, chosen precision, {format: error / bound}), in model order.

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> p = Policy(layers={"fc": LayerEntry("bf16", measured={"bf16": {"loss_err": 0.005, "grad_err": 0.01}})},
        ...            tolerance={"loss": 0.01, "grad": 0.05})
        >>> sensitivity(p)
        [('fc', 'bf16', {'bf16': 0.5})]
    """
    tl, tg = policy.tolerance.get("loss", 0.01), policy.tolerance.get("grad", 0.05)
    rows = []
    for key, e in policy.layers.items():
        if not e.measured:
            continue
        scores = {f: max(m.get("loss_err", 0.0) / tl, m.get("grad_err", 0.0) / tg) for f, m in e.measured.items()}
        rows.append((key, e.precision, scores))
    return rows


def _svg_curves(fp32: tuple[float, ...], pol: tuple[float, ...], width: int = 640, height: int = 260) -> str:
    pts = [v for v in fp32 + pol if math.isfinite(v)]
    if not pts:
        return "<p>no finite losses to plot</p>"
    lo, hi = min(pts), max(pts)
    hi = hi if hi > lo else lo + 1.0
    pad = 60
    n = max(len(fp32), len(pol), 2)

    def line(vals: tuple[float, ...], color: str, dash: str) -> str:
        coords = " ".join(f"{pad + i * (width - 2 * pad) / (n - 1):.1f},"
                          f"{height - pad - (v - lo) / (hi - lo) * (height - 2 * pad):.1f}"
                          for i, v in enumerate(vals) if math.isfinite(v))
        return f'<polyline fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}" points="{coords}"/>'

    axes = (f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>'
            f'<text x="{pad - 4}" y="{pad + 4}" font-size="11" text-anchor="end">{hi:.4g}</text>'
            f'<text x="{pad - 4}" y="{height - pad}" font-size="11" text-anchor="end">{lo:.4g}</text>'
            f'<text x="{pad}" y="{height - pad + 14}" font-size="11">step 0</text>'
            f'<text x="{width - pad}" y="{height - pad + 14}" font-size="11" text-anchor="end">step {n - 1}</text>')
    what = "FP32 (solid) / policy (dashed)" if pol else "FP32 (solid); nothing cast, so no policy run"
    legend = f'<text x="{width - pad}" y="{pad - 10}" font-size="12" text-anchor="end" fill="#333">{what}</text>'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="verification loss curves">{axes}{line(fp32, "#333", "")}'
            + (line(pol, "#dd8452", "6 4") if pol else "") + f'{legend}</svg>')


#: the sensitivity chart's labels: a monospace font, so that a label's width is its length times this
LABEL_FONT_PX, LABEL_CHAR_PX, LABEL_MAX_CHARS = 11, 6.8, 90

#: how a layer's bars and label look, by why it has its format: (label colour, bar style, legend text)
_KINDS = {
    "cast": ("#222", "solid", "cast: its bar is its error in the format it runs in"),
    "numerical": ("#c44e52", "solid", "FP32 for a numerical reason (red label): the bar shows why"),
    "back-off": ("#8172b2", "hollow", "FP32 by a back-off (held-out check or verification; purple): not measured "
                 "to fail alone"),
    "no gain": ("#999", "hollow", "FP32 for speed, no gain (grey label, hollow bar): its error is not why"),
}


def _kind(entry: Any) -> str:
    if entry.precision != "fp32":
        return "cast"
    if entry.excluded:
        return "numerical"
    return "back-off" if entry.reason in BACK_OFFS else "no gain"


def _label(key: str, entry: Any) -> str:
    tag = entry.precision if entry.precision != "fp32" else f"fp32: {entry.reason}"
    return f"{key or '(root)'} [{tag}]"


def _fit(label: str) -> str:
    """``label`` within :data:`LABEL_MAX_CHARS`, cut in the middle (the full label is the tooltip)."""
    if len(label) <= LABEL_MAX_CHARS:
        return label
    half = (LABEL_MAX_CHARS - 1) // 2
    return label[:half] + "…" + label[-(LABEL_MAX_CHARS - 1 - half):]


def _svg_sensitivity(policy: "Policy", plot_w: int = 440) -> str:
    rows = sensitivity(policy)
    if not rows:
        return "<p>no layer was probed</p>"
    bar_h, pad = 14, 10
    labels = [_label(k, policy.layers[k]) for k, _, _ in rows]
    label_w = math.ceil(max(len(_fit(t)) for t in labels) * LABEL_CHAR_PX) + 2 * pad
    width = label_w + plot_w + pad
    formats = sorted({f for _, _, s in rows for f in s})
    height = pad * 2 + len(rows) * (bar_h * len(formats) + 6) + 24
    lo, hi = -4.0, 4.0  # log10 of error / bound

    def x(v: float) -> float:
        lv = min(max(math.log10(max(v, 1e-12)) if math.isfinite(v) else hi, lo), hi)
        return label_w + (lv - lo) / (hi - lo) * plot_w

    parts = [f'<line x1="{x(1.0):.1f}" y1="{pad}" x2="{x(1.0):.1f}" y2="{height - 24}" stroke="#c44e52" '
             f'stroke-dasharray="4 3"/>',
             f'<text x="{x(1.0):.1f}" y="{height - 8}" font-size="11" text-anchor="middle" fill="#c44e52">bound</text>',
             f'<text x="{label_w}" y="{height - 8}" font-size="11">1e-4 x bound</text>',
             f'<text x="{label_w + plot_w}" y="{height - 8}" font-size="11" text-anchor="end">1e4 x bound (inf)</text>']
    y = pad
    for (key, _, scores), label in zip(rows, labels):
        color, style, _ = _KINDS[_kind(policy.layers[key])]
        parts.append(f'<text class="label" x="{label_w - pad}" y="{y + bar_h - 3}" font-size="{LABEL_FONT_PX}" '
                     f'font-family="monospace" text-anchor="end" fill="{color}"><title>{html.escape(label)}</title>'
                     f'{html.escape(_fit(label))}</text>')
        for f in formats:
            if f in scores:
                c = _COLORS.get(f, "#888")
                paint = (f'fill="{c}"' if style == "solid" else
                         f'fill="#fff" stroke="{c}" stroke-width="1.5" stroke-dasharray="3 2"')
                parts.append(f'<rect x="{label_w}" y="{y + 1}" width="{max(x(scores[f]) - label_w, 1):.1f}" '
                             f'height="{bar_h - 3}" {paint}><title>{html.escape(key or "(root)")} {f}: '
                             f'{scores[f]:.3g} x bound</title></rect>')
            y += bar_h
        y += 6
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="per-layer sensitivity" data-label-width="{label_w - pad}">{"".join(parts)}</svg>'
            + _legend(policy, formats))


def _legend(policy: "Policy", formats: list[str]) -> str:
    """The chart's key, as page text (it wraps; nothing in it can be cut off)."""
    shown = {_kind(e) for e in policy.layers.values() if e.measured}
    swatch = " ".join(f'<span style="color:{_COLORS.get(f, "#888")}">&#9632;</span> {f}' for f in formats)
    kinds = "; ".join(f'<span style="color:{c}">{"&#9632;" if st == "solid" else "&#9633;"}</span> {html.escape(t)}'
                      for k, (c, st, t) in _KINDS.items() if k in shown)
    return f'<p class="legend">{swatch}. {kinds}.</p>'


_MARKS = re.compile(r"\*\*(.+?)\*\*|`([^`]+)`")


def _inline(text: str) -> str:
    """Report text to HTML: escaped, with ``**bold**`` and ```code``` marked up."""
    out, last = [], 0
    for m in _MARKS.finditer(text):
        out.append(html.escape(text[last:m.start()]))
        out.append(f"<b>{html.escape(m.group(1))}</b>" if m.group(1) is not None
                   else f"<code>{html.escape(m.group(2))}</code>")
        last = m.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


def _block(block: Any, policy: "Policy") -> str:
    if isinstance(block, Text):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, Table):
        th = "".join(f"<th>{_inline(h)}</th>" for h in block.head)
        body = "".join("<tr>" + "".join(f'<td{" class=num" if i in block.right else ""}>{_inline(c)}</td>'
                                        for i, c in enumerate(r)) + "</tr>" for r in block.rows)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Notes):
        return (f"<p>{_inline(block.title)}:</p><ul class=notes>"
                + "".join(f"<li>{_inline(', '.join(keys))}: {_inline(text)}</li>" for keys, text in block.items)
                + "</ul>")
    if isinstance(block, Chart):
        ver = policy.verification
        if block.name == "curves":
            return _svg_curves(ver.fp32_losses, ver.policy_losses) if ver is not None else ""
        return _svg_sensitivity(policy)
    raise TypeError(f"unknown report block {type(block).__name__}")


def _section(sec: Section, policy: "Policy") -> str:
    body = "\n".join(_block(b, policy) for b in sec.blocks)
    head = f"<h{sec.level}>{_inline(sec.title)}</h{sec.level}>"
    if sec.verdict:
        head += f'\n<p class="verdict"><b>{_inline(sec.verdict)}</b></p>'
    if sec.collapsed:
        return f"<details><summary>{head}</summary>\n{body}\n</details>"
    return f"{head}\n{body}"


_STYLE = """body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; } th { background: #f3f3f3; } code { background: #f6f6f6; }
ul.notes { font-size: 13px; } p.verdict { color: #c44e52; } p.legend { font-size: 13px; color: #444; }
details summary h2 { display: inline; } details summary { cursor: pointer; margin: 1em 0; }"""


def render_html(policy: "Policy") -> str:
    """The report as one HTML page: the Markdown report's sections, with charts and the raw statistics folded.

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> "<svg" in render_html(Policy(layers={"fc": LayerEntry("bf16", measured={"bf16": {"loss_err": 0.0}})}))
        True
    """
    body = "\n".join(_section(sec, policy) for sec in sections(policy))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>autoprec policy report</title>\n'
            f"<style>\n{_STYLE}\n</style></head><body>\n{body}\n</body></html>\n")


def save_png(policy: "Policy", path: str) -> None:
    """Write the verification curves and the sensitivity chart as a PNG (needs matplotlib).

    Example:
        >>> import os, tempfile
        >>> from autoprec.policy import Policy, LayerEntry
        >>> path = os.path.join(tempfile.mkdtemp(), "r.png")
        >>> try:
        ...     save_png(Policy(layers={"fc": LayerEntry("bf16", measured={"bf16": {"loss_err": 1e-3}})}), path)
        ...     print(open(path, "rb").read(4) == b"\\x89PNG")
        ... except OptionError as e:  # matplotlib is not installed
        ...     print("pip install 'autoprec[plot]'" in str(e))
        True
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("the PNG report needs matplotlib: pip install 'autoprec[plot]', "
                          "or use --format html") from None
    rows = sensitivity(policy)
    ver = policy.verification
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(4, 0.28 * len(rows) + 1.5)),
                                   gridspec_kw={"width_ratios": [1, 1.4]})
    if ver is not None:
        ax1.plot(ver.fp32_losses, label="FP32", color="#333")
        ax1.plot(ver.policy_losses, "--", label="policy", color="#dd8452")
        ax1.set_title("verification: nothing cast, nothing to verify" if ver.nothing_cast else
                      f"verification: {'passed' if ver.passed else 'FAILED'} (gap {ver.max_gap:.2g})")
        ax1.set_xlabel("step")
        ax1.set_ylabel("loss")
        ax1.legend()
    else:
        ax1.set_title("not verified")
    formats = sorted({f for _, _, s in rows for f in s})
    height = 0.8 / max(len(formats), 1)
    for j, f in enumerate(formats):
        ys = [i + j * height for i in range(len(rows))]
        vals = [min(max(s.get(f, float("nan")), 1e-4), 1e4) for _, _, s in rows]
        ax2.barh(ys, vals, height=height, color=_COLORS.get(f, "#888"), label=f)
    ax2.set_xscale("log")
    ax2.axvline(1.0, color="#c44e52", linestyle="--", label="bound")
    ax2.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))])
    ax2.set_yticklabels([f"{k or '(root)'} [{c}]" for k, c, _ in rows], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("error of the layer alone / bound")
    ax2.set_title("per-layer sensitivity")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
