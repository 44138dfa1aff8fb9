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
``callback.guard`` holds the events and the policy in force. The Trainer's checkpoints carry the guard's
state (``trainer_state.json``, as the Trainer keeps its stateful callbacks'), so ``trainer.train(
resume_from_checkpoint=...)`` goes on with the revised policy, its events and the watch's history.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable

from ..errors import OptionError
from ..policy._policy import Policy
from ..watch import Guard
from . import _missing
from ._fit import fitting_module

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - only without transformers
    raise _missing("hf", "transformers", exc) from exc

__all__ = ["AutoprecCallback", "AutoprecGuardCallback"]

log = logging.getLogger("autoprec.integrations.hf")


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


class AutoprecGuardCallback(TrainerCallback, ExportableState):
    """Trains under :func:`autoprec.guard`: ``every``, ``action`` and the other keyword arguments are the
    guard's (checked when training begins, where the guard is built); ``every`` counts optimizer steps.
    The Trainer hands its callbacks no loss and no batch, so ``guard.step`` gets none, and the guard's
    FP32 check (which runs the model on the step's batch) is off: ``check_every=0``. With ``fp16=True`` the
    guard watches the Trainer's own GradScaler (Accelerate's, which its prepared optimizer steps with; its
    scale and skipped steps, a collapsed one reset as :func:`autoprec.guard` says) unless you pass ``scaler=``.

    Checkpoints: the Trainer writes :meth:`state` (the guard's :meth:`~autoprec.Guard.state_dict`) into
    each checkpoint's ``trainer_state.json`` and reads it back when it resumes one; training then begins
    with the checkpoint's guard state (the revised policy, the events, the watch's statistics and step
    count). With ``TrainingArguments(restore_callback_states_from_checkpoint=True)`` the Trainer instead
    replaces this callback by one rebuilt from :meth:`state` (``policy`` as ``Policy.to_dict()`` data; a
    ``loss_fn`` or ``scaler`` given here is not rebuilt): find it in ``trainer.callback_handler.callbacks``.

    Example:
        >>> import autoprec
        >>> cb = AutoprecGuardCallback(autoprec.Policy(layers={}), every=10)
        >>> cb.guard is None, sorted(cb.state()["args"])
        (True, ['action', 'every', 'policy'])
    """

    def __init__(self, policy: Policy | Mapping[str, Any], loss_fn: Callable[..., Any] | None = None, *,
                 every: int = 50, action: str = "adapt", **options: Any) -> None:
        if isinstance(policy, Mapping):  # the Trainer rebuilding the callback from a checkpoint's state()
            policy = Policy.from_dict(policy)
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
        self.resume: dict[str, Any] | None = None  # a guard state to go on from (a checkpoint's), until training begins
        self._training = False

    def state(self) -> dict[str, Any]:
        """What a Trainer checkpoint keeps of this callback: how to rebuild it (``args``: the policy given,
        as data, and the guard's plain options) and the guard's state (``attributes["resume"]``)."""
        plain = {k: v for k, v in self.options.items()
                 if k != "check_every" and (v is None or isinstance(v, (bool, int, float, str)))}
        guard = self.guard.state_dict() if self.guard is not None else self.resume
        return {"args": {"policy": self.policy.to_dict(), **plain}, "attributes": {"resume": guard}}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Install the policy, watched, on the model (or the part of it the policy was tuned on); a resumed
        run goes on from the checkpoint's guard state, a second ``train()`` from the first one's guard."""
        if model is None:
            raise OptionError("the Trainer passed no model to AutoprecGuardCallback.on_train_begin")
        if self._training:
            return
        before = self.guard.state_dict() if self.guard is not None else self.resume
        if state.global_step > 0:  # resumed: the checkpoint's trainer_state.json holds the guard it saved
            saved = _saved(state, type(self).__name__)
            if saved is None:
                log.warning("resumed at step %d from a checkpoint without autoprec's guard state: the guard "
                            "starts again from the policy given", state.global_step)
            before = saved
        options = dict(self.options)
        if options.get("scaler") is None:  # fp16=True: the GradScaler Accelerate steps the optimizer with
            options["scaler"] = getattr(kwargs.get("optimizer"), "scaler", None)
        self.guard = Guard(fitting_module(self.policy, model), self.policy, self.loss_fn, **options)
        self._training, self.resume = True, None
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


def _saved(state: Any, name: str) -> dict[str, Any] | None:
    """The guard state a checkpoint's ``TrainerState`` holds for the callback class ``name`` (the first one's)."""
    entry = (getattr(state, "stateful_callbacks", None) or {}).get(name)
    if isinstance(entry, list):
        entry = entry[0] if entry else None
    resume = entry.get("attributes", {}).get("resume") if isinstance(entry, Mapping) else None
    return resume if isinstance(resume, Mapping) and resume else None
