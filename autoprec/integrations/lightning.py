"""Lightning: run a policy (and its GradScaler) inside ``Trainer(plugins=[AutoprecPrecision(policy)])``.

Example (needs ``pip install "autoprec[lightning]"``)::

    policy = autoprec.load("model.autoprec.json")
    trainer = lightning.Trainer(plugins=[AutoprecPrecision(policy)], max_epochs=3)
    trainer.fit(lit_module)

The policy may be tuned on the LightningModule itself or on the network it holds (``self.model``):
the plugin installs it on the first module that fits when the Trainer sets up, for the whole run
(so backward, and the recomputation of activation checkpointing, run in the policy's precision), and
takes it off at teardown; with FP16 layers the tuned GradScaler scales the loss and
skips non-finite steps, exactly as Lightning's ``"16-mixed"`` does with its default scaler.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import OptionError
from ..policy import Policy
from . import _missing
from ._fit import fitting_module

try:
    from lightning.pytorch.plugins.precision import MixedPrecision
except ImportError as exc:  # pragma: no cover - only without lightning
    raise _missing("lightning", "Lightning", exc) from exc

__all__ = ["AutoprecPrecision"]


class AutoprecPrecision(MixedPrecision):
    """A Lightning precision plugin that runs an autoprec policy.

    Example:
        >>> import autoprec
        >>> plugin = AutoprecPrecision(autoprec.Policy(layers={"0": autoprec.LayerEntry("bf16")}))
        >>> plugin.scaler is None
        True
    """

    def __init__(self, policy: Policy, device: str | None = None) -> None:
        if not isinstance(policy, Policy):
            raise OptionError(f"AutoprecPrecision needs an autoprec.Policy, got {type(policy).__name__}: "
                              "pass autoprec.load('policy.json')")
        if device is None:
            device = "cuda" if policy.target == "cuda" and torch.cuda.is_available() else "cpu"
        scaler = policy.grad_scaler(device)
        super().__init__("16-mixed" if scaler is not None else "bf16-mixed", device, scaler)
        self.policy = policy
        self._module: nn.Module | None = None
        self._handle: Any = None

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Install the policy on the part of the LightningModule it fits (its parameters stay FP32)."""
        if self._handle is not None:
            self._handle.remove()
        self._module = fitting_module(self.policy, module)
        self._handle = self.policy.apply(self._module)
        return module

    @contextmanager
    def forward_context(self) -> Iterator[None]:
        """The installed per-layer regions instead of one blanket autocast."""
        if self._module is None:
            raise OptionError("AutoprecPrecision has no module yet: pass it to a Trainer via plugins=[...]")
        yield

    def teardown(self) -> None:
        """Take the policy off the module again."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        super().teardown()

    def autocast_context_manager(self) -> Any:  # Lightning calls this for blanket autocast; never here
        raise OptionError("AutoprecPrecision applies per-layer regions, not blanket autocast")
