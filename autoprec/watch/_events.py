"""What the guard saw and did: one frozen record per action."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..errors import PolicyError

__all__ = ["ACTIONS", "GuardEvent"]

ACTIONS: tuple[str, ...] = ("adapt", "warn", "raise")


@dataclass(frozen=True)
class GuardEvent:
    """One action of :func:`autoprec.guard`: at ``step`` (the count of ``guard.step`` calls), on
    ``layer``, moving it from ``old`` to ``new`` (``action="adapt"``) or only saying it should
    (``"warn"``, ``"raise"``), with the figures that made it act.

    Example:
        >>> e = GuardEvent(50, "head", "adapt", "fp16", "bf16", "step 50: head fp16 -> bf16: ...")
        >>> GuardEvent.from_dict(e.to_dict()) == e
        True
    """

    step: int
    layer: str
    action: str
    old: str
    new: str
    evidence: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (as written into the revised policy's ``stats["guard_events"]``).

        Example:
            >>> GuardEvent(1, "fc", "warn", "fp16", "bf16", "...").to_dict()["layer"]
            'fc'
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GuardEvent":
        """The record :meth:`to_dict` wrote.

        Example:
            >>> GuardEvent.from_dict({"step": 1, "layer": "fc", "action": "warn", "old": "fp16",
            ...                       "new": "bf16", "evidence": "..."}).step
            1
        """
        try:
            return cls(**{k: data[k] for k in ("step", "layer", "action", "old", "new", "evidence")})
        except (KeyError, TypeError) as exc:
            raise PolicyError(f"a guard event is an object with step, layer, action, old, new and evidence; "
                              f"got {data!r} ({exc}): save the guard's state with guard.state_dict()") from None
