"""Progress bars for long stages (tqdm on stderr), switchable off; library output goes to logging."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("autoprec")


class Progress:
    """One bar per stage; ``enabled=False`` shows nothing (stage changes are still logged)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self._bar: Any = None

    def stage(self, name: str, total: int) -> None:
        """Start a stage of ``total`` steps (closing the previous one)."""
        self.close()
        log.debug("stage %s (%d steps)", name, total)
        if self.enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=f"autoprec {name}", file=sys.stderr, leave=False,
                             dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        """Count ``n`` steps done in the current stage."""
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """Close the current bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
