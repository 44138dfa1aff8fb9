"""Progress of tuning's stages: a bar per stage (tqdm on stderr, switchable off) and what each stage did.

Each stage states what it plans (``passes`` for the probe: one forward+backward each; ``trials`` for
the search; ``steps`` for the training runs) and counts what it did; the bar shows done / planned
and tqdm's ETA, which it estimates from the measured time per step of the stage. A stage that
turns out to need more (a verification back-off round) raises its plan as it goes, so the bar never
shows more done than planned. The counts, times and peak memory of every stage are kept as
:class:`StageCount` records (:attr:`Progress.stages`) whether or not a bar is shown. Library output
goes to logging.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("autoprec")


@dataclass(frozen=True)
class StageCount:
    """What one stage planned and did."""

    name: str
    unit: str
    planned: int
    done: int
    seconds: float


class Progress:
    """One bar per stage; ``enabled=False`` shows nothing (stages are still counted and logged).

    ``meter`` (a :class:`autoprec._memory.PeakMemory`) is told of every stage and step.

    Example:
        >>> p = Progress(False)
        >>> p.stage("probe", 3, unit="pass"); p.advance(); p.advance(2); p.close()
        >>> [(s.name, s.unit, s.planned, s.done) for s in p.stages]
        [('probe', 'pass', 3, 3)]
    """

    def __init__(self, enabled: bool, meter: Any = None) -> None:
        self.enabled = bool(enabled)
        self.meter = meter
        self.stages: list[StageCount] = []
        self._bar: Any = None
        self._current: tuple[str, str, int, float] | None = None   # name, unit, first plan, start time
        self._done = 0
        self._total = 0

    def stage(self, name: str, total: int, unit: str = "step") -> None:
        """Start a stage that plans ``total`` steps of ``unit`` (closing the previous one)."""
        self.close()
        log.debug("stage %s (%d %s)", name, total, unit)
        self._current, self._done, self._total = (name, unit, int(total), time.perf_counter()), 0, int(total)
        if self.meter is not None:
            self.meter.stage(name)
        if self.enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=f"autoprec {name}", unit=unit, file=sys.stderr, leave=False,
                             dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        """Count ``n`` steps done in the current stage."""
        self._done += n
        if self._done > self._total:  # more than planned: the plan grows, the bar stays honest
            self.plan(self._done)
        if self.meter is not None:
            self.meter.sample()
        if self._bar is not None:
            self._bar.update(n)

    @property
    def done(self) -> int:
        """Steps done in the current stage."""
        return self._done

    def summary(self) -> dict[str, Any]:
        """The closed stages as plain data (``stages``: unit, planned, done, seconds, peak MiB), and the meter's peak."""
        mem = self.meter.stats() if self.meter is not None else {}
        by_stage = mem.get("peak_memory_mb_by_stage", {})
        stages = {s.name: {"unit": s.unit, "planned": s.planned, "done": s.done, "seconds": round(s.seconds, 3),
                           **({"peak_memory_mb": by_stage[s.name]} if s.name in by_stage else {})}
                  for s in self.stages}
        return {"stages": stages, **mem}

    def plan(self, total: int) -> None:
        """Change the current stage's planned steps to ``total``."""
        if int(total) == self._total:
            return
        self._total = int(total)
        if self._bar is not None:
            self._bar.total = self._total
            self._bar.refresh()

    def close(self) -> None:
        """Close the current stage and its bar."""
        if self._current is not None:
            name, unit, _, t0 = self._current
            self.stages.append(StageCount(name, unit, self._total, self._done, time.perf_counter() - t0))
            self._current = None
            if self.meter is not None:
                self.meter.finish()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
