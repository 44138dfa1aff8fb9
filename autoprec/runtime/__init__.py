"""Stage 5, runtime: per-layer precision at run time (class swap, op regions, casts, CUDA emulation) and ``apply``."""

from __future__ import annotations

from ._apply import Handle, apply, autocast, watched
from ._emulation import rule_of, run_as_cuda
from ._runtime import Runtime, Watcher, installed

__all__ = ["Handle", "Runtime", "Watcher", "apply", "autocast", "installed", "rule_of", "run_as_cuda", "watched"]
