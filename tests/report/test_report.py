"""The reports: Markdown and HTML state the same facts, explain every FP32 layer, and never overstate.

The HTML page is also opened in a real browser (headless Chromium) where one is installed: no chart
label is cut off and the page does not overflow its window.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

import autoprec
from autoprec.report import CELL, LABEL_CHAR_PX, LABEL_MAX_CHARS
from tests.models import scatter_gnn, transformer_block

_TUNED: dict[str, autoprec.Policy] = {}


def _failed() -> autoprec.Policy:
    """A policy whose verification failed after backing off layers, with long evidence (written by hand)."""
    long = "; ".join(f"clause {i} of a long piece of evidence with figures 1.23e-4 and 5.67e+8" for i in range(8))
    layers = {"encoder.layers.0.attention.self_attention.query_key_value_projection": autoprec.LayerEntry(
                  "fp32", "verification back-off", long, flops=100, measured={"bf16": {"loss_err": 0.002}}),
              "encoder.layers.0.mlp::gelu": autoprec.LayerEntry("fp32", "overflow", "bf16: x | y " + long,
                                                                excluded=True, kind="op", op="gelu",
                                                                measured={"bf16": {"loss_err": math.inf}}),
              "head": autoprec.LayerEntry("bf16", flops=300, measured={"bf16": {"loss_err": 1e-4}})}
    ver = autoprec.Verification(passed=False, steps=3, fp32_losses=(2.0, 1.5, 1.0), policy_losses=(2.0, 1.7, 1.4),
                                max_gap=0.2, bound=0.05, skipped_steps=0, longest_skip_run=0, rounds=2,
                                note="backed off 1 layer(s) after round 1", flops_by_dtype={"bfloat16": 3, "float32": 1})
    return autoprec.Policy(layers=layers, formats=("bf16",), verification=ver, tolerance={"loss": 0.01})


def _backed_to_nothing() -> autoprec.Policy:
    """Back-off moved the last cast layer to FP32 in round 2: round 1 compared, round 2 had nothing to compare."""
    from autoprec.verify import nothing_cast

    failed = _failed().verification
    ver = nothing_cast((2.0, 1.5, 1.0), 0.05, rounds=2, last=(failed, "backed off 1 layer(s) after round 1"))
    layers = {"fc": autoprec.LayerEntry("fp32", "verification back-off", "moved to FP32 by verification round 1",
                                        flops=10)}
    return autoprec.Policy(layers=layers, formats=("bf16",), verification=ver)


def policy(name: str) -> autoprec.Policy:
    """Real tuned policies (cast and no-gain layers on the pinned CPU profile; FP16 hazards for a GPU) and two
    written by hand (a failed verification with back-offs; back-off down to nothing cast)."""
    if name not in _TUNED:
        if name == "transformer_cpu":
            model, batch, loss_fn = transformer_block()
            _TUNED[name] = autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=3)
        elif name == "gnn_fp16_cuda":
            model, batch, loss_fn = scatter_gnn()
            _TUNED[name] = autoprec.tune(model, batch, loss_fn, target="cuda", dtypes=["fp16"], progress=False,
                                         verify_steps=3)
        elif name == "fp8_cuda":
            pytest.importorskip("torchao")
            from tests.models_fp8 import cheap_casts, outlier_mlp, tune_fp8

            _TUNED[name] = tune_fp8(outlier_mlp(), cheap_casts())
        else:
            _TUNED[name] = {"failed": _failed, "backed_to_nothing": _backed_to_nothing}[name]()
    return _TUNED[name]


NAMES = ["transformer_cpu", "gnn_fp16_cuda", "fp8_cuda", "failed", "backed_to_nothing"]


_BLOCKS = {"p", "li", "td", "th", "tr", "ul", "table", "h1", "h2", "h3", "details", "summary"}


class _Page(HTMLParser):
    """The page's text (outside <style>, <title> and the charts), its table cells, and its SVGs' attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.cells: list[str] = []
        self.svgs: list[dict] = []
        self._skip = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCKS:
            self.text.append(" ")
        if tag in ("style", "title", "svg"):
            self._skip += 1
        if tag == "svg":
            self.svgs.append(dict(attrs))
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in _BLOCKS:
            self.text.append(" ")
        if tag in ("style", "title", "svg"):
            self._skip -= 1
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(_norm("".join(self._cell)))
            self._cell = None

    def handle_data(self, data):
        if self._skip:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _labels(page: str) -> list[tuple[str, str]]:
    """The sensitivity chart's labels: (the whole label, as its tooltip; the label shown)."""
    return [(html.unescape(full), html.unescape(shown))
            for full, shown in re.findall(r'<text class="label"[^>]*><title>(.*?)</title>(.*?)</text>', page)]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def _md_facts(md: str) -> tuple[list[str], list[str]]:
    """Every statement of the Markdown report (headings, bullets, paragraphs) and every table cell, unmarked."""
    facts: list[str] = []
    cells: list[str] = []
    for line in md.splitlines():
        if line.startswith("  ") and facts:  # a wrapped bullet goes on
            facts[-1] += " " + line.strip()
        elif line.startswith("|"):
            row = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= set("-: ") for c in row):
                cells += [_unmark(c) for c in row]
        elif line.strip():
            facts.append(line.lstrip("#").removeprefix(" ").removeprefix("- "))
    return [_norm(_unmark(f)) for f in facts], cells


def _unmark(text: str) -> str:
    return text.replace("**", "").replace("`", "").replace("\\|", "|")


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_every_fact_of_the_markdown_report_is_on_the_html_page(name):
    """Each heading, bullet and paragraph of the Markdown report is in the page's text, each table cell is a cell."""
    p = policy(name)
    facts, cells = _md_facts(p.report())
    page = _parse(p.report("html"))
    text = _norm("".join(page.text))
    missing = [f for f in facts if f not in text]
    assert not missing, missing
    assert not [c for c in cells if c not in page.cells]
    assert facts[0].startswith("autoprec policy report")


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_no_long_table_rows_and_the_profile_is_named_once(name):
    """Evidence cells are cut near CELL characters (the full text follows the table); the profile is named once."""
    p = policy(name)
    md = p.report()
    _, cells = _md_facts(md)
    assert max(len(c) for c in cells) <= CELL + 2
    plain = _norm(_unmark(md.replace("\n  ", " ")).replace(" with its region and casts", ""))
    for e in p.layers.values():  # each evidence is whole in its cell, or below its table (the JSON keeps it as is)
        if e.precision == "fp32":
            whole = e.detail.replace("; " + p.stats.get("profile", "\0"), "").replace(" with its region and casts", "")
            assert _norm(whole) in plain, e.detail
    if "profile" in p.stats:
        assert md.count(p.stats["profile"]) == 1
        shown = re.sub(r"`([^`]*)`", r"<code>\1</code>", p.stats["profile"])  # the page draws code marks
        assert p.report("html").count(shown) == 1 + sum(p.stats["profile"] in str(v)
                                                        for v in p.stats.values())  # + the folded stats


def test_html_page_has_both_charts_a_sensitivity_bar_per_probed_format_and_folded_statistics():
    """The loss curves (FP32 and policy), one bar per probed layer and format, and the statistics in <details>."""
    p = policy("transformer_cpu")
    page = p.report("html")
    assert page.count("<svg") == 2 and page.count("<polyline") == 2
    assert page.count("<rect") == sum(len(e.measured) for e in p.layers.values())
    assert re.search(r"<details><summary><h2>Tuning statistics</h2></summary>\s*<table>", page)
    head = page.split("<details>")[0]
    assert "format speed" not in head and "fx route" not in head  # raw statistics are folded, not in the header


def test_sensitivity_chart_marks_no_gain_layers_apart_with_a_legend():
    """A layer FP32 for speed gets a hollow bar and a grey label naming 'no gain'; the legend says its error is not why."""
    p = policy("gnn_fp16_cuda")
    page = p.report("html")
    for key, e in p.layers.items():
        if not e.measured:
            continue
        bars = re.findall(rf'<rect [^>]*><title>{re.escape(key)} fp16:', page)
        bar = re.search(rf'<rect ([^>]*)><title>{re.escape(key)} fp16:', page).group(1)
        assert bars and (('fill="#fff"' in bar) == (e.reason == "no gain")), (key, bar)
    assert "[fp32: no gain]" in page and "[fp32: overflow]" in page
    legend = re.search(r'<p class="legend">(.*?)</p>', page).group(1)
    assert "FP32 for speed, no gain" in legend and "its error is not why" in legend
    assert "FP32 for a numerical reason" in legend


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_sensitivity_label_column_is_as_wide_as_its_longest_label(name):
    """Labels are monospace: the column is at least the longest label's characters times their width; a label
    cut in the middle (over LABEL_MAX_CHARS) carries the whole one as its tooltip."""
    p = policy(name)
    page = p.report("html")
    chart = [s for s in _parse(page).svgs if s.get("aria-label") == "per-layer sensitivity"]
    if not any(e.measured for e in p.layers.values()):
        assert not chart
        return
    column = float(chart[0]["data-label-width"])
    labels = _labels(page)
    assert labels and max(len(shown) for _, shown in labels) * LABEL_CHAR_PX <= column
    for (full, shown), (key, e) in zip(labels, [(k, e) for k, e in p.layers.items() if e.measured]):
        assert full == f"{key or '(root)'} [{e.precision if e.precision != 'fp32' else 'fp32: ' + e.reason}]"
        assert shown == full or (len(full) > LABEL_MAX_CHARS and shown.replace("…", "") in full.replace(
            full[len(shown.split("…")[0]):len(full) - len(shown.split("…")[1])], ""))
    if name == "failed":  # its first key is longer than the limit: cut in the middle
        assert "…" in labels[0][1] and len(labels[0][1]) == LABEL_MAX_CHARS


def test_a_failed_verification_heads_both_reports():
    """FAILED and the gap head the Markdown report's first line and the page's title and first paragraph."""
    p = policy("failed")
    first = p.report().splitlines()[0]
    assert first == ("# autoprec policy report: FAILED verification (loss gap 0.2 against a threshold of 0.05): "
                     "not a verified policy")
    page = p.report("html")
    assert "<h1>autoprec policy report: FAILED verification</h1>\n<p class=\"verdict\"><b>(loss gap 0.2" in page


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_the_measured_fraction_is_reported_beside_the_prediction(fmt):
    """The header gives the 16-bit share as verification ran it, and the prediction from the layers' formats."""
    p = policy("failed")
    text = _norm(_unmark(p.report(fmt))) if fmt == "md" else _norm("".join(_parse(p.report(fmt)).text))
    assert "matmul/conv FLOPs in 16-bit: 75.0% measured as the verified policy ran (operand dtypes of one forward: " \
           "4 FLOPs); predicted from the layers' formats: 75.0% of 400 forward FLOPs" in text
    data = json.loads(p.report("json"))
    assert data["low_precision_flop_fraction_measured"] == 0.75 == data["verification"]["measured_fraction"]
    assert data["verification"]["flops_by_dtype"] == {"bfloat16": 3, "float32": 1}


def test_a_policy_that_casts_nothing_is_not_trained_and_says_so_everywhere():
    """Every layer FP32 (hazards and no gain): no training run at all, and no report says PASSED or a gap of 0."""
    p = policy("gnn_fp16_cuda")
    v = p.verification
    assert all(e.precision == "fp32" for e in p.layers.values())
    assert v.nothing_cast and v.passed and v.steps == 0 and v.policy_losses == () and v.measured_fraction is None
    assert p.stats["verify_passes"] == 0
    md, page = p.report(), p.report("html")
    assert "**nothing cast: nothing to verify**" in md and "<b>nothing cast: nothing to verify</b>" in page
    assert "**0.0%**: nothing cast" in md
    for text in (md, page):
        assert "PASSED" not in text and "largest loss gap" not in text
    assert "FP32 for a numerical reason (conv1::index_put (overflow), conv2::index_put (overflow))" in md
    assert "allow BF16 where the device runs it" in md and "gain nothing (conv1.lin, conv2.lin, head)" in md
    data = json.loads(p.report("json"))
    assert data["verification"]["nothing_cast"] is True and data["low_precision_flop_fraction_measured"] is None


def test_back_off_to_nothing_says_which_rounds_compared():
    """A policy backed off to nothing cast did compare in its earlier rounds: the report says so, with the gap."""
    p = policy("backed_to_nothing")
    md = p.report()
    assert "**nothing left cast after back-off: nothing to verify**: round 1 compared cast policies with FP32 " \
           "and failed (round 1: loss gap 0.2 against a threshold of 0.05" in md
    assert "verification backed off the last 1 cast layer(s) (fc)" in md and "PASSED" not in md


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


#: measures, in the browser, every chart text against its chart and the page against the window
_PROBE = """<script>
const cut = [];
for (const svg of document.querySelectorAll("svg")) {
  const box = svg.getBoundingClientRect();
  const column = box.left + Number(svg.dataset.labelWidth || box.width);
  for (const t of svg.querySelectorAll("text")) {
    const b = t.getBoundingClientRect();
    const right = t.classList.contains("label") ? column : box.right;
    if (b.width <= 0 || b.left < box.left - 0.5 || b.right > right + 0.5 || b.top < box.top - 0.5
        || b.bottom > box.bottom + 0.5) cut.push(t.textContent);
  }
}
const pre = document.createElement("pre");
pre.id = "probe";
pre.textContent = JSON.stringify({cut: cut, overflow: document.documentElement.scrollWidth > window.innerWidth});
document.body.appendChild(pre);
</script>"""


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium): the page is "
                                                "checked structurally only")
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_in_a_real_browser_no_chart_text_is_cut_and_the_page_fits(name, tmp_path):
    """Headless Chromium lays the page out: every chart text lies inside its chart (labels inside their column),
    the page is no wider than a 1200-pixel window, and a screenshot renders."""
    page = policy(name).report("html").replace("</body>", _PROBE + "</body>")
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400"]
    dom = subprocess.run(args + ["--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result == {"cut": [], "overflow": False}
    shot = tmp_path / "report.png"
    subprocess.run(args + [f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_counts_the_experts_flops_and_their_format():
    """A mixture of experts: the report's header names its stacked-weight experts, their share of the matmul FLOPs
    and their format; a model without experts gets no such line."""
    from autoprec import LayerEntry, Policy
    from autoprec.core import module_signatures
    from tests.models_coverage import moe

    model, _ = moe()
    modules = module_signatures(model)
    flops = {"inp": 10, "router": 1, "experts": 80, "out": 9}
    layers = {k: LayerEntry("fp32" if k == "router" else "bf16", flops=f) for k, f in flops.items()}
    md = Policy(layers=layers, modules=modules).report()
    assert "experts (stacked expert weights): 1 layer, 80.0% of the matmul/conv FLOPs; by format: bf16 1 (80 FLOPs)" \
        in md
    plain = Policy(layers={k: v for k, v in layers.items() if k != "experts"},
                   modules={k: v for k, v in modules.items() if k != "experts"}).report()
    assert "experts (stacked" not in plain


def test_the_fp8_section_says_which_linears_train_in_fp8_why_and_beside_the_hand_filters():
    """A policy tuned with FP8: the header counts the FP8 Linears, the section lists each Linear with its measured
    SQNRs and why it stayed BF16, and the side-by-side table has torchao's default, torchtitan's filter and the tuned
    choice; a policy without FP8 has no such section."""
    md = policy("fp8_cuda").report()
    assert "- FP8 GEMMs: 4 Linears, 71.4% of the matmul/conv FLOPs (tensorwise 4)" in md
    assert "## FP8 (GEMMs of Linears, torchao)" in md
    assert re.search(r"\| `5` \| bf16 \| [0-9.]+ \| - \| 2\.00x \| error: 5: forward SQNR [0-9.]+ dB < 18\.0 dB \|", md), md
    assert re.search(r"\| `2` \| fp8 \(tensorwise\) \| [0-9.]+ \| [0-9.]+ \| 2\.00x \| measured within the bounds", md)
    for name in ("torchao default | 5 | 100.0%", "torchtitan filter | 0 | 0.0%", "tuned | 4 | 71.4%"):
        assert f"| {name} |" in md
    assert "matmul/conv FLOPs in 16-bit or FP8:" in md
    assert "FP8 (GEMMs" not in policy("transformer_cpu").report()
