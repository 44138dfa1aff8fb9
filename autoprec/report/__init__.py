"""Stage 7, report: the policy and its evidence as Markdown, JSON, HTML and PNG."""

from __future__ import annotations

from ._facts import CELL
from ._html import LABEL_CHAR_PX, LABEL_MAX_CHARS
from ._report import render
from ._speed_lines import UNPROVEN, clearly_faster, first_failure, speed_lines, unproven

__all__ = ["CELL", "LABEL_CHAR_PX", "LABEL_MAX_CHARS", "UNPROVEN", "clearly_faster", "first_failure", "render", "speed_lines", "unproven"]
