"""Tuning and training on several processes: the ranks of a process group and the FSDP2 wrap plan."""

from __future__ import annotations

from ._fsdp import fsdp_plan
from ._ranks import current

__all__ = ["current", "fsdp_plan"]
