"""autoprec: measured, per-layer mixed precision for PyTorch training.

Example:
    >>> import torch, autoprec
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
    >>> policy = autoprec.tune(model, torch.randn(128, 64), progress=False, verify_steps=5)
    >>> with policy.autocast(model):
    ...     loss = model(torch.randn(128, 64)).square().mean()
    >>> scaler = policy.grad_scaler()          # None: no FP16 layer on a CPU target
"""

from __future__ import annotations

from . import report as _report  # noqa: F401  (registers Policy.report)
from .apply import Handle
from .calibration import calibrate
from .costs import DeviceProfile
from .distributed import fsdp_plan
from .errors import AutoprecError, BatchError, FormatError, ModelError, OptionError, PolicyError, ProfileError
from .policy import LayerEntry, Policy, ScalerSettings, Verification, load
from .profiles import load_profile
from .tune import tune

__all__ = [
    "AutoprecError",
    "BatchError",
    "DeviceProfile",
    "FormatError",
    "Handle",
    "LayerEntry",
    "ModelError",
    "OptionError",
    "Policy",
    "PolicyError",
    "ProfileError",
    "ScalerSettings",
    "Verification",
    "calibrate",
    "fsdp_plan",
    "load",
    "load_profile",
    "tune",
]

__version__ = "0.1.0"
