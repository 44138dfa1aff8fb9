"""Optional integrations with training frameworks, each imported on first use.

``autoprec.integrations.hf`` (Hugging Face ``Trainer``, ``pip install "autoprec[hf]"``) and
``autoprec.integrations.lightning`` (``pip install "autoprec[lightning]"``) are reached as attributes
after ``import autoprec``; neither framework is imported until then, and a missing one is an
``ImportError`` that names the extra to install.

Example:
    >>> import autoprec
    >>> autoprec.integrations.EXTRAS["hf"]
    'hf'
"""

from __future__ import annotations

import importlib

__all__ = ["EXTRAS"]

# submodule -> the extra of autoprec that installs its framework
EXTRAS = {"hf": "hf", "lightning": "lightning"}


def __getattr__(name: str) -> object:
    """Import ``hf`` or ``lightning`` on first use (``autoprec.integrations.hf.AutoprecCallback``)."""
    if name in EXTRAS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _missing(module: str, framework: str, exc: ImportError) -> ImportError:
    """The error for an integration whose framework is not installed: what to install, by extra.

    Example:
        >>> print(_missing("hf", "transformers", ImportError("No module named 'transformers'")))
        autoprec.integrations.hf needs transformers, which is not installed (No module named 'transformers'): pip install "autoprec[hf]"
    """
    return ImportError(f"autoprec.integrations.{module} needs {framework}, which is not installed ({exc}): "
                       f'pip install "autoprec[{EXTRAS[module]}]"')
