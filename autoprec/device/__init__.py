"""Device profiles: the record, its file, built-in estimates, kernel timing, calibration, the cost model that prices layers, and what FP8 saves per Linear."""

from __future__ import annotations

from ._calibration import cache_dir, cache_file, calibrate, machine, with_layers
from ._costs import Curve, DeviceProfile, StepCost, layer_cost, shape_key
from ._estimates import compute_bound, estimate, roofline
from ._files import load_profile, profile_from_dict, profile_to_dict, save_profile
from ._fp8_costs import FP8_COST_RECIPES, Fp8Price, fp8_price, gemm_dims
from ._timing import Clock, monotone

__all__ = ["FP8_COST_RECIPES", "Clock", "Curve", "DeviceProfile", "Fp8Price", "StepCost", "cache_dir", "cache_file", "calibrate", "compute_bound", "estimate", "fp8_price", "gemm_dims", "layer_cost", "load_profile", "machine", "monotone", "profile_from_dict", "profile_to_dict", "roofline", "save_profile", "shape_key", "with_layers"]
