"""Stage 6, verify: short training runs against FP32, the held-out check and the measured step speed."""

from __future__ import annotations

from ._held_out import split
from ._step_speed import Race, adopt, blanket, choose, measured_record, retime
from ._verify import compare, judge, nothing_cast, verify

__all__ = ["Race", "adopt", "blanket", "choose", "compare", "judge", "measured_record", "nothing_cast", "retime", "split", "verify"]
