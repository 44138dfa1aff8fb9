"""Where the search's Optuna study lives: none (in memory), an RDB URL, or a journal file.

An RDB URL (``"sqlite:///study.db"``, ``"postgresql://..."``) is passed to Optuna as it is. A
``"journal:PATH"`` spec opens Optuna's ``JournalStorage`` on the file at ``PATH``, which several
worker processes (on one machine, or on a shared file system) can append to at once: each
``tune`` with the same model, batch and settings takes trials of the same study and reuses what
the others measured. An Optuna storage object is used as it is.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import OptionError

__all__ = ["JOURNAL", "open_storage"]

JOURNAL = "journal:"


def open_storage(spec: Any) -> Any:
    """The Optuna storage for ``tune(storage=spec)``: None, an RDB URL, a ``JournalStorage`` or ``spec`` itself.

    Example:
        >>> import os, tempfile
        >>> s = open_storage("journal:" + os.path.join(tempfile.mkdtemp(), "study.log"))
        >>> type(s).__name__
        'JournalStorage'
        >>> open_storage(None) is None, open_storage("sqlite:///study.db")
        (True, 'sqlite:///study.db')
    """
    if spec is None or not isinstance(spec, str):
        return spec
    if not spec.startswith(JOURNAL):
        return spec
    path = spec[len(JOURNAL):]
    if not path:
        raise OptionError(f"storage={spec!r} names no file: use 'journal:/path/to/study.log'")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OptionError(f"storage={spec!r}: the folder {folder!r} does not exist; create it or name a file in an "
                          "existing folder")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(path))
