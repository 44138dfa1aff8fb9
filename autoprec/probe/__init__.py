"""Stage 2, probe: measured ranges and per-layer, per-format error (passes, roles, amplification, reductions),
and FP8 per Linear (torchao, optional)."""

from __future__ import annotations

from ._amplify import Amplification, Consumer, consumers, gain, rows
from ._fp8 import FP8_RECIPES, Fp8Error, Fp8Verdict, fp8_errors, fp8_linears, linear_paths, sqnr
from ._passes import Measure
from ._probe import probe, suggest_scale
from ._records import Measurement, Probe, Ranges
from ._reductions import HIST_HI, HIST_LO, grad_norm, relative_errors
from ._roles import Sharing, role_of, roles
from ._runner import Runner
from ._snapshot import Snapshot
from ._training import Trajectory, default_optimizer, train_curve

__all__ = ["Amplification", "Consumer", "FP8_RECIPES", "Fp8Error", "Fp8Verdict", "HIST_HI", "HIST_LO", "Measure", "Measurement", "Probe", "Ranges", "Runner", "Sharing", "Snapshot", "Trajectory", "consumers", "default_optimizer", "fp8_errors", "fp8_linears", "gain", "grad_norm", "linear_paths", "probe", "relative_errors", "role_of", "roles", "rows", "sqnr", "suggest_scale", "train_curve"]
