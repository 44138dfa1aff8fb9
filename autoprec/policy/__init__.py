"""Stage 4, policy: the tuned result as plain frozen records, saved and loaded as versioned JSON."""

from __future__ import annotations

from ._policy import Policy, SCHEMA_VERSION, load, scaler_for
from ._records import BACK_OFFS, HeldOut, LayerEntry, NOISE_MULTIPLE, ScalerSettings, StepSpeed, Verification, low_fraction

__all__ = ["BACK_OFFS", "HeldOut", "LayerEntry", "NOISE_MULTIPLE", "Policy", "SCHEMA_VERSION", "ScalerSettings", "StepSpeed", "Verification", "load", "low_fraction", "scaler_for"]
