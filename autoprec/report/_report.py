"""Stage 7, report: what the policy decided and the measurements behind it, as Markdown, JSON or HTML.

The JSON report is :func:`summary`; Markdown and HTML draw the same sections
(:mod:`autoprec.report._sections`), so they state the same facts.
"""

from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING, Any

from ..errors import OptionError
from ._facts import summary
from ._sections import Bullets, Chart, Notes, Table, Text, sections

if TYPE_CHECKING:
    from ..policy._policy import Policy

__all__ = ["render", "summary"]


def _markdown(policy: "Policy") -> str:
    lines: list[str] = []
    for sec in sections(policy):
        if sec.collapsed or all(isinstance(b, Chart) for b in sec.blocks):
            continue  # the HTML page's figures and folded raw statistics (the JSON report has them)
        lines += [f"{'#' * sec.level} {sec.title}" + (f" {sec.verdict}" if sec.verdict else ""), ""]
        for block in sec.blocks:
            if isinstance(block, Chart):
                continue
            lines += _md_block(block) + [""]
    return "\n".join(lines).rstrip() + "\n"


def _md_block(block: Any) -> list[str]:
    if isinstance(block, Text):
        return [block.text]
    if isinstance(block, Bullets):
        return [f"- {item}" for item in block.items]
    if isinstance(block, Table):
        align = ["---:" if i in block.right else "---" for i in range(len(block.head))]
        return [_row(block.head), _row(align)] + [_row(r) for r in block.rows]
    if isinstance(block, Notes):
        return [f"{block.title}:", ""] + [line for keys, text in block.items for line in _item(f"{', '.join(keys)}: {text}")]
    raise TypeError(f"unknown report block {type(block).__name__}")


def _item(text: str) -> list[str]:
    """One long bullet, wrapped: continuation lines indented to stay in the item."""
    return textwrap.wrap(text, _WIDTH, initial_indent="- ", subsequent_indent="  ", break_long_words=False,
                         break_on_hyphens=False)


def _row(cells: Any) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


#: the line width of the full evidence below a table (the one place with paragraphs of figures)
_WIDTH = 110


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
        from ._html import render_html
        return render_html(policy)
    raise OptionError(f"report format {format!r} is not supported: use 'md', 'json' or 'html'")

