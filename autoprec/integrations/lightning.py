"""Lightning: run a policy (and its GradScaler) inside ``Trainer(plugins=[AutoprecPrecision(policy)])``,
or run it under :func:`autoprec.guard` with ``Trainer(callbacks=[AutoprecGuard(policy)])``.

Example (needs ``pip install "autoprec[lightning]"``)::

    policy = autoprec.load("model.autoprec.json")
    trainer = lightning.Trainer(plugins=[AutoprecPrecision(policy)], max_epochs=3)
    trainer.fit(lit_module)

The policy may be tuned on the LightningModule itself or on the network it holds (``self.model``):
the plugin installs it on the first module that fits when the Trainer sets up, for the whole run
(so backward, and the recomputation of activation checkpointing, run in the policy's precision), and
takes it off at teardown; with FP16 layers the tuned GradScaler scales the loss and
skips non-finite steps, exactly as Lightning's ``"16-mixed"`` does with its default scaler.

:class:`AutoprecGuard` installs the policy itself, watched (use it instead of the plugin, not with it):
at fit start on the first module that fits, one ``guard.step`` after each training batch, taken off
at fit end; ``callback.guard`` holds the events and the policy in force, and Lightning's checkpoints
carry the guard's state, so a resumed fit goes on with the revised policy.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..errors import OptionError
from ..policy._policy import Policy
from ..watch import Guard
from . import _missing
from ._fit import fitting_module

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.plugins.precision import MixedPrecision
except ImportError as exc:  # pragma: no cover - only without lightning
    raise _missing("lightning", "Lightning", exc) from exc

__all__ = ["AutoprecGuard", "AutoprecPrecision"]


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


class AutoprecGuard(Callback):
    """A Lightning callback that trains under :func:`autoprec.guard`: ``every``, ``action`` and the other
    keyword arguments are the guard's (they are checked when the fit starts, where the guard is built).

    ``every`` counts training batches (``on_train_batch_end``); each batch's loss is handed to
    ``guard.step``. ``loss_fn(output, batch)`` is the loss of the module the policy fits, for the guard's
    checks that need one (None: as :func:`autoprec.guard`). The FP32 check runs that module on the
    training batch as it comes (``module(*batch)`` for a tuple): it is off unless you ask for it with
    ``check_every=N`` (a Lightning batch is often ``(inputs, labels)``, which the module does not take).
    With ``precision="16-mixed"`` the guard watches the GradScaler of the Trainer's precision plugin (its
    scale and skipped steps; a collapsed one is reset, as :func:`autoprec.guard` says) unless you pass ``scaler=``.

    Example:
        >>> import autoprec
        >>> cb = AutoprecGuard(autoprec.Policy(layers={"0": autoprec.LayerEntry("bf16")}), every=10)
        >>> cb.guard is None, cb.state_dict()
        (True, {})
    """

    def __init__(self, policy: Policy, loss_fn: Callable[..., Any] | None = None, *, every: int = 50,
                 action: str = "adapt", **options: Any) -> None:
        if not isinstance(policy, Policy):
            raise OptionError(f"AutoprecGuard needs an autoprec.Policy, got {type(policy).__name__}: "
                              "pass autoprec.load('policy.json')")
        self.policy, self.loss_fn = policy, loss_fn
        self.options = {"every": every, "action": action, "check_every": 0, **options}
        self.guard: Guard | None = None
        self._state: dict[str, Any] | None = None  # from a checkpoint, before the guard exists
        self._fitting = False  # the guard is on the model

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        """Install the policy, watched, on the part of the LightningModule it fits."""
        state = self._state if self._state is not None else (self.guard.state_dict() if self.guard else None)
        if self.guard is not None:
            self.guard.remove()
        options = dict(self.options)
        if options.get("scaler") is None:  # "16-mixed": watch the scaler the precision plugin steps with
            options["scaler"] = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        self.guard = Guard(fitting_module(self.policy, pl_module), self.policy, self.loss_fn, **options)
        self._fitting = True
        if state is not None:
            self.guard.load_state_dict(state)
            self._state = None

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """One ``guard.step`` with the batch's loss."""
        if self._fitting and self.guard is not None:
            self.guard.step(outputs.get("loss") if isinstance(outputs, Mapping) else outputs, batch)

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        """Take the policy off (``.guard`` keeps the events and the policy in force)."""
        if self.guard is not None:
            self.guard.remove()
        self._fitting = False

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Take the policy off also when the fit ended with an exception."""
        self.on_fit_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The guard's :meth:`~autoprec.Guard.state_dict` (empty before the first fit)."""
        if self.guard is not None:
            return self.guard.state_dict()
        return dict(self._state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the guard from a checkpoint (now, or when the fit starts if it has not yet)."""
        if not state_dict:
            return
        if self._fitting and self.guard is not None:
            self.guard.load_state_dict(state_dict)
        else:
            self._state = dict(state_dict)
