"""Stage 8, guard: keep a policy right for the whole training run.

:func:`guard` installs a policy the way :func:`autoprec.runtime._apply` does and watches its 16-bit layers
while the model trains: each one's largest ``|output|`` and the forward passes whose output held
non-finite values, kept on the device and read once every ``every`` steps. When a layer's range
no longer fits its format with the tuning headroom, the guard promotes it (``action="adapt"``),
warns (``"warn"``) or raises (``"raise"``), and records the event with its evidence.

The package is ``autoprec.watch`` so that ``autoprec.guard`` names the function, never a module.
"""

from __future__ import annotations

from ._events import GuardEvent
from ._guard import Guard, guard

__all__ = ["Guard", "GuardEvent", "guard"]
