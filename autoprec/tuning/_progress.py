"""Progress of tuning's stages: a bar per stage (tqdm on stderr, switchable off) and what each stage did.

Each stage states what it plans (``passes`` for the probe: one forward+backward each; ``trials`` for
the search; ``steps`` for the training runs) and counts what it did; the bar shows done / planned
and tqdm's ETA, which it estimates from the measured time per step of the stage. A stage that
turns out to need more (a verification back-off round) raises its plan as it goes, so the bar never
shows more done than planned. A stage whose count is known only once it has begun (the search: its
trials depend on what the probe left open) opens its bar when it states its plan, so each stage
shows one bar, counted against the right plan from its first step.

Every bar's description says which stage of how many it is and, once a step is done, about how long
the whole tune has left: the steps still planned in this stage and those expected of the stages to
come (:meth:`Progress.expect`), at the time per step measured so far in those stages (each step is
one forward+backward). The counts, times and peak memory of every stage are kept as
:class:`StageCount` records (:attr:`Progress.stages`) whether or not a bar is shown. Library output
goes to logging.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

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

    ``meter`` (a :class:`autoprec.tuning._memory.PeakMemory`) is told of every stage and step. ``stages``
    names the stages to run, in order, for the "stage k of n" of each bar's description; ``clock``
    is the time source of the estimate of the time left.

    Example:
        >>> p = Progress(False)
        >>> p.stage("probe", 3, unit="pass"); p.advance(); p.advance(2); p.close()
        >>> [(s.name, s.unit, s.planned, s.done) for s in p.stages]
        [('probe', 'pass', 3, 3)]
    """

    def __init__(self, enabled: bool, meter: Any = None, *, stages: Iterable[str] = (),
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.enabled = bool(enabled)
        self.meter = meter
        self.stages: list[StageCount] = []
        self._names = list(stages)
        self._clock = clock
        self._expected: dict[str, int] = {}        # stage -> planned steps (passes), for the time left
        self._paced = [0.0, 0]                     # seconds and steps of the finished paced stages
        self._bar: Any = None
        self._current: tuple[str, str, int, float] | None = None   # name, unit, first plan, start time
        self._done = 0
        self._total: int | None = 0

    def expect(self, steps: Mapping[str, int]) -> None:
        """The planned steps (each one forward+backward) of stages to come: they time the estimate of the
        time left, and the stages named here are the ones whose pace is measured.

        Example:
            >>> now = [0.0]
            >>> p = Progress(False, stages=["probe", "search"], clock=lambda: now[0])
            >>> p.expect({"probe": 4, "search": 6})
            >>> p.stage("probe", 4); now[0] = 2.0; p.advance()     # 2 s per step, 3 + 6 steps to go
            >>> p.description()
            'probe (stage 1 of 2, about 18s left)'
        """
        self._expected.update({name: int(n) for name, n in steps.items()})

    def stage(self, name: str, total: int | None, unit: str = "step") -> None:
        """Start a stage that plans ``total`` steps of ``unit`` (closing the previous one); ``None``: the
        stage states its plan with :meth:`plan` once it knows it, and its bar opens then."""
        self.close()
        log.debug("stage %s (%s %s)", name, "?" if total is None else total, unit)
        if name not in self._names:
            self._names.append(name)
        total = None if total is None else int(total)
        self._current, self._done, self._total = (name, unit, total or 0, self._clock()), 0, total
        if total is not None and name in self._expected:  # a paced stage: its plan replaces the expectation
            self._expected[name] = total
        if self.meter is not None:
            self.meter.stage(name)
        if total is not None:
            self._open()

    def _open(self) -> None:
        if self.enabled and self._current is not None and self._bar is None:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self._total, desc=f"autoprec {self.description()}", unit=self._current[1],
                             file=sys.stderr, leave=False, dynamic_ncols=True)

    def description(self) -> str:
        """The current stage, which of how many it is, and (after a step) about how long tuning has left."""
        if self._current is None:
            return ""
        name = self._current[0]
        text = f"{name} (stage {self._names.index(name) + 1} of {len(self._names)}"
        left = self.seconds_left()
        return text + (f", about {_duration(left)} left)" if left is not None else ")")

    def seconds_left(self) -> float | None:
        """Steps still planned here and expected of later stages, at the pace measured so far; ``None``
        before a paced step is done."""
        if self._current is None:
            return None
        name, _, _, t0 = self._current
        seconds, steps = self._paced
        if name in self._expected:
            seconds, steps = seconds + self._clock() - t0, steps + self._done
        if steps == 0:
            return None
        later = sum(self._expected.get(n, 0) for n in self._names[self._names.index(name) + 1:])
        if name not in self._expected:  # a stage whose steps are not passes: its own time is unknown
            return later * seconds / steps if later else None
        return (max(0, (self._total or self._expected[name]) - self._done) + later) * seconds / steps

    def advance(self, n: int = 1) -> None:
        """Count ``n`` steps done in the current stage."""
        self._done += n
        if self._total is not None and self._done > self._total:  # more than planned: the plan grows
            self.plan(self._done)
        if self.meter is not None:
            self.meter.sample()
        if self._bar is not None:
            self._bar.set_description_str(f"autoprec {self.description()}", refresh=False)
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
        """Change the current stage's planned steps to ``total`` (a stage started with ``None`` opens its bar)."""
        if self._total is not None and int(total) == self._total:
            return
        self._total = int(total)
        if self._current is not None and self._current[0] in self._expected:
            self._expected[self._current[0]] = self._total
        if self._bar is None:
            self._open()
        else:
            self._bar.total = self._total
            self._bar.refresh()

    def close(self) -> None:
        """Close the current stage and its bar."""
        if self._current is not None:
            name, unit, _, t0 = self._current
            seconds = self._clock() - t0
            planned = self._done if self._total is None else self._total
            self.stages.append(StageCount(name, unit, planned, self._done, seconds))
            if name in self._expected:
                self._paced = [self._paced[0] + seconds, self._paced[1] + self._done]
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


def _duration(seconds: float) -> str:
    """``'45s'``, ``'3m05s'``, ``'1h02m'``.

    Example:
        >>> _duration(44.6), _duration(185), _duration(3725)
        ('45s', '3m05s', '1h02m')
    """
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
