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

from .device import DeviceProfile, calibrate, load_profile
from .distributed import fsdp_plan
from .errors import (
    AutoprecError,
    AutoprecWarning,
    BatchError,
    DeviceWarning,
    FormatError,
    GuardError,
    GuardWarning,
    ModelError,
    OptionError,
    PolicyError,
    ProfileError,
    RankError,
    VerificationError,
    VerificationWarning,
)
from .policy import HeldOut, LayerEntry, Policy, ScalerSettings, StepSpeed, Verification, load
from .runtime import Handle
from .tuning import tune
from .watch import Guard, GuardEvent, guard

__all__ = [
    "AutoprecError",
    "AutoprecWarning",
    "BatchError",
    "DeviceProfile",
    "DeviceWarning",
    "FormatError",
    "Guard",
    "GuardError",
    "GuardEvent",
    "GuardWarning",
    "Handle",
    "HeldOut",
    "LayerEntry",
    "ModelError",
    "OptionError",
    "Policy",
    "PolicyError",
    "ProfileError",
    "RankError",
    "ScalerSettings",
    "StepSpeed",
    "Verification",
    "VerificationError",
    "VerificationWarning",
    "calibrate",
    "fsdp_plan",
    "guard",
    "load",
    "load_profile",
    "tune",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``autoprec.integrations`` on first use, so ``import autoprec`` imports no training framework."""
    if name == "integrations":
        import importlib

        return importlib.import_module(f"{__name__}.integrations")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
