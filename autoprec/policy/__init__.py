"""Stage 4, policy: the tuned result as plain frozen records, saved and loaded as versioned JSON."""

from __future__ import annotations

from ._policy import SCHEMA_VERSION, Policy, load, scaler_for
from ._records import HeldOut, LayerEntry, ScalerSettings, StepSpeed, Verification, low_fraction

__all__ = ["HeldOut", "LayerEntry", "Policy", "SCHEMA_VERSION", "ScalerSettings", "StepSpeed", "Verification", "load", "low_fraction", "scaler_for"]
