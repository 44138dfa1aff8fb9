"""Shared ground of every stage: precision formats, the op vocabulary, a model's modules, feeding a batch, the up-front checks of what a caller hands to ``tune``, the field checks of records."""

from __future__ import annotations

from ._batch import batch_to, call_model, compute_loss, leading_rows
from ._checks import check_batch
from ._fields import FIX
from ._formats import to_dtype
from ._modules import canonical_modules, class_name, module_signatures, unit_modules
from ._ops import op_name

__all__ = ["FIX", "batch_to", "call_model", "canonical_modules", "check_batch", "class_name", "compute_loss", "leading_rows", "module_signatures", "op_name", "to_dtype", "unit_modules"]
