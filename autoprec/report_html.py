"""The report as a self-contained HTML page (inline SVG charts, no dependencies) and as a PNG chart.

The page shows the summary, the FP32 vs policy verification loss curves, a per-layer sensitivity
chart (the probe's error of each layer alone in each 16-bit format, relative to the bound, on a
log scale), the excluded layers with their evidence, and the per-layer format map. The PNG holds
the two charts and needs matplotlib (``pip install autoprec[plot]``).
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

from .errors import OptionError

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["render_html", "save_png", "sensitivity"]

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
    legend = (f'<text x="{width - pad}" y="{pad}" font-size="12" text-anchor="end" fill="#333">'
              f'FP32 (solid) / policy (dashed)</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="verification loss curves">{axes}{line(fp32, "#333", "")}'
            f'{line(pol, "#dd8452", "6 4")}{legend}</svg>')


def _svg_sensitivity(rows: list[tuple[str, str, dict[str, float]]], width: int = 760) -> str:
    if not rows:
        return "<p>no layer was probed</p>"
    bar_h, label_w, pad = 14, 300, 10
    formats = sorted({f for _, _, s in rows for f in s})
    height = pad * 2 + len(rows) * (bar_h * len(formats) + 6) + 30
    lo, hi = -4.0, 4.0  # log10 of error / bound

    def x(v: float) -> float:
        lv = min(max(math.log10(max(v, 1e-12)) if math.isfinite(v) else hi, lo), hi)
        return label_w + (lv - lo) / (hi - lo) * (width - label_w - pad)

    parts = [f'<line x1="{x(1.0):.1f}" y1="{pad}" x2="{x(1.0):.1f}" y2="{height - 30}" stroke="#c44e52" '
             f'stroke-dasharray="4 3"/>',
             f'<text x="{x(1.0):.1f}" y="{height - 16}" font-size="11" text-anchor="middle" fill="#c44e52">'
             f'bound</text>',
             f'<text x="{label_w}" y="{height - 16}" font-size="11">1e-4 x bound</text>',
             f'<text x="{width - pad}" y="{height - 16}" font-size="11" text-anchor="end">1e4 x bound (inf)</text>']
    y = pad
    for key, chosen, scores in rows:
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h}" font-size="11" text-anchor="end">'
                     f'{html.escape(key or "(root)")} [{chosen}]</text>')
        for f in formats:
            if f in scores:
                parts.append(f'<rect x="{label_w}" y="{y}" width="{max(x(scores[f]) - label_w, 1):.1f}" '
                             f'height="{bar_h - 2}" fill="{_COLORS.get(f, "#888")}"><title>{html.escape(key)} '
                             f'{f}: {scores[f]:.3g} x bound</title></rect>')
            y += bar_h
        y += 6
    legend = " ".join(f'<tspan fill="{_COLORS[f]}">&#9632; {f}</tspan>' for f in formats if f in _COLORS)
    parts.append(f'<text x="{pad}" y="{height - 16}" font-size="12">{legend}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="per-layer sensitivity">{"".join(parts)}</svg>')


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(policy: "Policy") -> str:
    """The report as one HTML page.

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> "<svg" in render_html(Policy(layers={"fc": LayerEntry("bf16", measured={"bf16": {"loss_err": 0.0}})}))
        True
    """
    from .report import _mib, summary

    s = summary(policy)
    ver = policy.verification
    items = [f"target device: <b>{html.escape(s['target'])}</b>",
             f"matmul/conv FLOPs in 16-bit: <b>{100 * s['low_precision_flop_fraction']:.1f}%</b>",
             "layers: " + ", ".join(f"{n} {p}" for p, n in sorted(s["layers_per_precision"].items()))]
    if s["emulated"]:
        items.insert(1, "evidence <b>emulated</b>: measured on a CPU running the 16-bit layers as CUDA autocast would")
    if s["scaler"]:
        sc = s["scaler"]
        items.append(f"GradScaler: init scale 2^{math.log2(sc['init_scale']):g}, growth interval "
                     f"{sc['growth_interval']}, backoff {sc['backoff_factor']:g}")
    if ver is not None:
        verdict = "PASSED" if ver.passed else "FAILED"
        floor = f", noise floor {ver.noise_floor:.3g}, threshold {ver.threshold:.3g}" if ver.noise_floor else ""
        items.append(f"verification: <b>{verdict}</b> ({ver.steps} steps, largest gap {ver.max_gap:.3g} of the "
                     f"first FP32 loss, bound {ver.bound:g}{floor}, {ver.skipped_steps} skipped steps, "
                     f"{ver.rounds} round(s))")
    st = s["stats"]
    if st:
        items.append("tuning: " + ", ".join(f"{html.escape(k.replace('_', ' '))} {v:.4g}" if isinstance(v, float)
                                            else f"{html.escape(k.replace('_', ' '))} {html.escape(str(v))}"
                                            for k, v in st.items() if not isinstance(v, dict)))
        by_stage = st.get("peak_memory_mb_by_stage")
        if isinstance(by_stage, dict) and by_stage:
            items.append("peak memory by stage (MiB above the start): "
                         + ", ".join(f"{html.escape(str(k))} {html.escape(_mib(v))}" for k, v in by_stage.items()))
    excluded = [[k or "(root)", e["op"], ", ".join(e["hazards"]) or "-", e["reason"], e["detail"]]
                for k, e in s["excluded"].items()]
    backed = [[k or "(root)", e["op"], e["detail"]] for k, e in s["backed_off"].items()]
    formats = [[k or "(root)", e.op, e.precision, f"{e.flops:,}", "" if e.reason == "cast" else e.reason]
               for k, e in policy.layers.items()]
    curves = _svg_curves(ver.fp32_losses, ver.policy_losses) if ver is not None else "<p>not verified</p>"
    opaque = "".join(f"<li><code>{html.escape(k or '(root)')}</code>: {html.escape(v)}</li>"
                     for k, v in s["opaque"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>autoprec policy report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }} code {{ background: #f6f6f6; }}
</style></head><body>
<h1>autoprec policy report{": FAILED verification" if ver is not None and not ver.passed else ""}</h1>
{"".join(f"<p>{'<b>' * (i == 0)}{html.escape(line)}{'</b>' * (i == 0)}</p>" for i, line in enumerate(s["speed_lines"]))}
<ul>{"".join(f"<li>{i}</li>" for i in items)}</ul>
<h2>Verification: FP32 vs policy loss</h2>
{curves}
<h2>Per-layer sensitivity (probe error of the layer alone, relative to the bound)</h2>
{_svg_sensitivity(sensitivity(policy))}
<h2>Layers kept in FP32 for a numerical reason</h2>
{_table(["layer", "op", "hazard", "reason", "evidence"], excluded) if excluded else "<p>none</p>"}
{"<h2>Layers moved to FP32 by verification back-off</h2><p>Nothing was measured to fail on these layers "
 "themselves: the policy's loss curve left the threshold and they were the most sensitive cast layers.</p>"
 + _table(["layer", "op", "evidence"], backed) if backed else ""}
{f"<h2>Opaque to FX</h2><ul>{opaque}</ul>" if opaque else ""}
<h2>Formats</h2>
{_table(["layer", "op", "format", "FLOPs", "note"], formats)}
</body></html>
"""


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
        ax1.set_title(f"verification: {'passed' if ver.passed else 'FAILED'} (gap {ver.max_gap:.2g})")
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
