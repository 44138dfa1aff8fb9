"""The exception tree of autoprec.

Every error autoprec raises on purpose derives from :class:`AutoprecError` and also from the
builtin it is, so ``except ValueError`` keeps working for callers who do not know autoprec::

    AutoprecError
    ├── BatchError(ValueError)        the batch cannot drive the model / the loss is not a scalar
    ├── ModelError(ValueError)        the model cannot be tuned (no floating parameters, NaN in FP32)
    ├── OptionError(ValueError)       an option of tune/apply is out of range
    ├── FormatError(RuntimeError)     a precision format the device cannot run
    ├── GuardError(RuntimeError)      ``guard(action="raise")``: a layer's range left its format during training
    ├── PolicyError(ValueError)       a policy file is corrupt, of an unknown version, or for another model
    ├── ProfileError(ValueError)      a device profile is corrupt, of an unknown version, or for another target
    ├── RankError(RuntimeError)       a tune on several ranks: one rank failed, or their inputs or results differ
    └── VerificationError(RuntimeError)  ``tune(strict=True)``: the policy failed verification

Outcomes that are not errors but must not pass unnoticed are warnings of class
:class:`AutoprecWarning` (a ``UserWarning``)::

    AutoprecWarning(UserWarning)
    ├── VerificationWarning           the returned policy failed verification (``strict=False``)
    ├── DeviceWarning                 a policy runs on another device than the one it was tuned for
    └── GuardWarning                  ``guard(action="warn")``: a layer's range left its format during training
"""

from __future__ import annotations

__all__ = ["AutoprecError", "AutoprecWarning", "BatchError", "DeviceWarning", "FormatError", "GuardError", "GuardWarning",
           "ModelError", "OptionError", "PolicyError", "ProfileError", "RankError", "VerificationError",
           "VerificationWarning"]


class AutoprecError(Exception):
    """Base class of every error autoprec raises on purpose.

    Example:
        >>> import autoprec
        >>> try:
        ...     autoprec.load("/no/such/policy.json")
        ... except autoprec.AutoprecError as e:
        ...     print(type(e).__name__)
        PolicyError
    """


class BatchError(AutoprecError, ValueError):
    """The batch cannot be fed to the model, or the loss it yields is not a finite scalar."""


class ModelError(AutoprecError, ValueError):
    """The model cannot be tuned as it is (no floating parameters, non-finite in FP32, ...)."""


class OptionError(AutoprecError, ValueError):
    """An option passed to autoprec is out of range or of the wrong kind."""


class FormatError(AutoprecError, RuntimeError):
    """A precision format was asked for that the target device cannot run."""


class GuardError(AutoprecError, RuntimeError):
    """``autoprec.guard(..., action="raise")``: a 16-bit layer's output no longer fits its format.

    The message names the layer, the figures and the fix; the record is ``error.event``.
    """

    def __init__(self, message: str, event: object = None) -> None:
        super().__init__(message)
        self.event = event


class PolicyError(AutoprecError, ValueError):
    """A policy file or object is invalid, of an unknown schema version, or does not fit the model."""


class RankError(AutoprecError, RuntimeError):
    """A tune on several ranks (``torchrun``): one rank failed, or the ranks' inputs or results differ.

    Raised on every rank, so that none waits in a collective for a rank that stopped.
    """


class VerificationError(AutoprecError, RuntimeError):
    """``tune(strict=True)``: the policy failed verification even after backing off.

    The policy (with its :class:`~autoprec.Verification` and report) is ``error.policy``.

    Example:
        >>> err = VerificationError("failed", policy=None)
        >>> err.policy is None, isinstance(err, RuntimeError)
        (True, True)
    """

    def __init__(self, message: str, policy: object = None) -> None:
        super().__init__(message)
        self.policy = policy


class AutoprecWarning(UserWarning):
    """Base class of the warnings autoprec gives: an outcome that is not an error but must be seen.

    Example:
        >>> issubclass(VerificationWarning, AutoprecWarning), issubclass(AutoprecWarning, UserWarning)
        (True, True)
    """


class VerificationWarning(AutoprecWarning):
    """The policy ``tune`` returns failed verification: it is the safest policy found, not a verified one."""


class DeviceWarning(AutoprecWarning):
    """A policy is used on another kind of device than the one it was tuned for."""


class GuardWarning(AutoprecWarning):
    """``autoprec.guard(..., action="warn")``: a 16-bit layer's output no longer fits its format."""

class ProfileError(AutoprecError, ValueError):
    """A device profile file or option is invalid, of an unknown schema version, or for another target."""
