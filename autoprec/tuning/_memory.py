"""Peak memory of tuning, per stage: CUDA's allocator peak on a GPU, the process's resident set on a CPU.

On CUDA each stage starts with ``torch.cuda.reset_peak_memory_stats`` and ends by reading
``torch.cuda.max_memory_allocated``: torch has no way to put a caller's earlier peak back, so after
``tune`` that figure is tuning's own. On a CPU the resident set (``/proc/self/statm``) is sampled
at every step, and the kernel's high-water mark (``VmHWM``, what ``ru_maxrss`` reports) is read at
each stage's ends: when it rose during a stage it is that stage's exact peak; when it did not (the
process peaked higher before ``tune``), the samples are a lower bound and ``exact`` says so.
Figures are bytes above the memory in use when tuning started (the caller's model, data, ...).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

__all__ = ["PeakMemory", "release"]


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_TRIM = _malloc_trim()


def release() -> None:
    """Hand memory freed by the last stage back to the system: glibc's free lists.

    A stage's passes free their tensors, but glibc keeps freed blocks below its (adaptive, up to
    32 MiB) mmap threshold on its heap, so the resident set would carry one stage's peak into the
    next. (No ``gc.collect()``: tensors go by reference counting, and a collection of the heap of a
    process with torch and transformers loaded costs ~0.2 s, as much as a small model's whole tune.)
    On CUDA torch's caching allocator keeps its blocks (they are reused, and
    ``max_memory_allocated`` does not count them).

    Example:
        >>> release() is None
        True
    """
    if _TRIM is not None:
        _TRIM(0)


def _rss() -> tuple[int, int]:
    """(resident set, high-water mark) of this process in bytes; (0, 0) where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return 0, 0
    kb = {k: int(v.split()[0]) for k, v in fields.items()}
    return 1024 * kb.get("VmRSS", 0), 1024 * kb.get("VmHWM", 0)


class PeakMemory:
    """Tracks the peak memory of each stage; :meth:`stats` gives it in MiB.

    Example:
        >>> m = PeakMemory(torch.device("cpu"))
        >>> m.stage("probe"); m.sample(); m.finish()
        >>> sorted(m.stats())
        ['peak_memory_exact', 'peak_memory_kind', 'peak_memory_mb', 'peak_memory_mb_by_stage']
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.kind = "cuda max_memory_allocated" if self.cuda else "process RSS"
        self.by_stage: dict[str, int] = {}
        self.exact = True
        self._name: str | None = None
        self._base = self._now()[0]
        self._peak = 0
        self._hwm = 0

    def _now(self) -> tuple[int, int]:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device)
        return _rss()

    def stage(self, name: str) -> None:
        """End the current stage (if any) and start ``name``."""
        self.finish()
        release()
        self._name = name
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._peak, self._hwm = self._now()

    def sample(self) -> None:
        """Note the memory in use now (on a CPU; CUDA's allocator keeps its own peak)."""
        if self._name is not None and not self.cuda:
            self._peak = max(self._peak, _rss()[0])

    def finish(self) -> None:
        """End the current stage."""
        if self._name is None:
            return
        now, hwm = self._now()
        peak = max(self._peak, now)
        if self.cuda:
            peak = max(peak, hwm)
        elif hwm > self._hwm:
            peak = max(peak, hwm)
        elif hwm > peak:  # the process peaked higher before this stage: the samples are a lower bound
            self.exact = False
        self.by_stage[self._name] = max(self.by_stage.get(self._name, 0), peak - self._base)
        self._name = None

    def stats(self) -> dict[str, object]:
        """``peak_memory_mb`` (largest stage), ``peak_memory_mb_by_stage``, ``peak_memory_kind``, ``peak_memory_exact``."""
        mb = {k: round(max(v, 0) / 2 ** 20, 1) for k, v in self.by_stage.items()}
        return {"peak_memory_mb": max(mb.values(), default=0.0), "peak_memory_mb_by_stage": mb,
                "peak_memory_kind": self.kind, "peak_memory_exact": self.exact}

