"""Device profiles: the record, its file, built-in estimates, kernel timing, calibration, and the cost model that prices layers."""

from __future__ import annotations

from ._calibration import cache_dir, cache_file, calibrate, machine, with_layers
from ._costs import Curve, DeviceProfile, StepCost, layer_cost, shape_key
from ._estimates import compute_bound, estimate, roofline
from ._files import load_profile, profile_from_dict, profile_to_dict, save_profile
from ._timing import Clock, monotone

__all__ = ["Clock", "Curve", "DeviceProfile", "StepCost", "cache_dir", "cache_file", "calibrate", "compute_bound", "estimate", "layer_cost", "load_profile", "machine", "monotone", "profile_from_dict", "profile_to_dict", "roofline", "save_profile", "shape_key", "with_layers"]
