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
"""

from __future__ import annotations

from typing import Any

from ..errors import OptionError
from ..policy import Policy
from . import _missing
from ._fit import fitting_module

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - only without transformers
    raise _missing("hf", "transformers", exc) from exc

__all__ = ["AutoprecCallback"]


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
