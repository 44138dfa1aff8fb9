"""The exception tree of autoprec.

Every error autoprec raises on purpose derives from :class:`AutoprecError` and also from the
builtin it is, so ``except ValueError`` keeps working for callers who do not know autoprec::

    AutoprecError
    ├── BatchError(ValueError)        the batch cannot drive the model / the loss is not a scalar
    ├── ModelError(ValueError)        the model cannot be tuned (no floating parameters, NaN in FP32)
    ├── OptionError(ValueError)       an option of tune/apply is out of range
    ├── FormatError(RuntimeError)     a precision format the device cannot run
    ├── PolicyError(ValueError)       a policy file is corrupt, of an unknown version, or for another model
    └── ProfileError(ValueError)      a device profile is corrupt, of an unknown version, or for another target
"""

from __future__ import annotations

__all__ = ["AutoprecError", "BatchError", "FormatError", "ModelError", "OptionError", "PolicyError", "ProfileError"]


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


class PolicyError(AutoprecError, ValueError):
    """A policy file or object is invalid, of an unknown schema version, or does not fit the model."""


class ProfileError(AutoprecError, ValueError):
    """A device profile file or option is invalid, of an unknown schema version, or for another target."""
