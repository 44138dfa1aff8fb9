"""The orchestration of ``autoprec.tune``: the stages in order, isolation from the caller's world, progress and peak memory."""

from __future__ import annotations

from ._isolation import private_model
from ._memory import PeakMemory
from ._options import TuneOptions, TuneStats
from ._progress import Progress
from ._tune import tune

__all__ = ["PeakMemory", "Progress", "TuneOptions", "TuneStats", "private_model", "tune"]
