"""Hugging Face: run a policy inside ``transformers.Trainer`` with a callback.

Example (needs ``pip install "autoprec[hf]"``)::

    policy = autoprec.load("model.autoprec.json")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                   callbacks=[AutoprecCallback(policy)])
    trainer.train()

The callback installs the policy's per-layer regions on the model when training begins and
removes them when it ends; leave ``bf16``/``fp16`` in ``TrainingArguments`` off for a BF16-only
policy. A policy with FP16 layers needs loss scaling: set ``fp16=True`` so that the Trainer scales
the loss; its autocast then covers only the code between layers, the policy's layers keep their
own precision. (The Trainer's scaler uses its own initial scale, not the tuned one.)

:class:`AutoprecGuardCallback` does the same under :func:`autoprec.guard` (use it instead of
``AutoprecCallback``, not with it): one ``guard.step`` after each optimizer step (``on_step_end``),
``callback.guard`` holds the events and the policy in force.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import OptionError
from ..policy import Policy
from ..watch import Guard
from . import _missing
from ._fit import fitting_module

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - only without transformers
    raise _missing("hf", "transformers", exc) from exc

__all__ = ["AutoprecCallback", "AutoprecGuardCallback"]


class AutoprecCallback(TrainerCallback):
    """Installs a policy on the Trainer's model for the duration of training.

    Example:
        >>> import autoprec
        >>> cb = AutoprecCallback(autoprec.Policy(layers={}))
        >>> cb.handle is None
        True
    """

    def __init__(self, policy: Policy) -> None:
        if not isinstance(policy, Policy):
            raise OptionError(f"AutoprecCallback needs an autoprec.Policy, got {type(policy).__name__}")
        self.policy = policy
        self.handle: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Apply the policy to the model (or the part of it the policy was tuned on)."""
        if model is None:
            raise OptionError("the Trainer passed no model to AutoprecCallback.on_train_begin")
        if self.handle is None:
            self.handle = self.policy.apply(fitting_module(self.policy, model))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Take the policy off the model again."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class AutoprecGuardCallback(TrainerCallback):
    """Trains under :func:`autoprec.guard`: ``every``, ``action`` and the other keyword arguments are the
    guard's (checked when training begins, where the guard is built); ``every`` counts optimizer steps.
    The Trainer hands its callbacks no loss and no batch, so ``guard.step`` gets none, and the guard's
    FP32 check (which runs the model on the step's batch) is off: ``check_every=0``.

    Example:
        >>> import autoprec
        >>> cb = AutoprecGuardCallback(autoprec.Policy(layers={}), every=10)
        >>> cb.guard is None
        True
    """

    def __init__(self, policy: Policy, loss_fn: Callable[..., Any] | None = None, *, every: int = 50,
                 action: str = "adapt", **options: Any) -> None:
        if not isinstance(policy, Policy):
            raise OptionError(f"AutoprecGuardCallback needs an autoprec.Policy, got {type(policy).__name__}: "
                              "pass autoprec.load('policy.json')")
        self.policy, self.loss_fn = policy, loss_fn
        if options.get("check_every"):
            raise OptionError(f"AutoprecGuardCallback(check_every={options['check_every']!r}): the Trainer hands "
                              "its callbacks no batch, and the FP32 check runs the model on one; leave check_every "
                              "out (0), or guard your own loop with autoprec.guard(...) and guard.step(loss, batch)")
        self.options = {"every": every, "action": action, **options, "check_every": 0}
        self.guard: Guard | None = None
        self._training = False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Install the policy, watched, on the model (or the part of it the policy was tuned on)."""
        if model is None:
            raise OptionError("the Trainer passed no model to AutoprecGuardCallback.on_train_begin")
        if not self._training:  # a second train() goes on from the first one's guard (revised policy, events)
            before = self.guard.state_dict() if self.guard is not None else None
            self.guard = Guard(fitting_module(self.policy, model), self.policy, self.loss_fn, **self.options)
            self._training = True
            if before is not None:
                self.guard.load_state_dict(before)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """One ``guard.step`` after the optimizer step."""
        if self._training and self.guard is not None:
            self.guard.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Take the policy off (``.guard`` keeps the events and the policy in force)."""
        if self.guard is not None:
            self.guard.remove()
        self._training = False
