"""Stage 1, trace: the model as a list of layers with their op kinds, shapes, FLOPs and hazards."""

from __future__ import annotations

from ._capture import capture
from ._flops import DtypeFlops, dispatch_flops, registered
from ._trace import Layer, Trace, trace

__all__ = ["DtypeFlops", "Layer", "Trace", "capture", "dispatch_flops", "registered", "trace"]
