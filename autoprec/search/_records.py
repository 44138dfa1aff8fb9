"""The search's records: the error bound, one layer's decision, and the open layers as the search ranks them.

Both the search (:mod:`autoprec.search._search`) and the decision texts (:mod:`autoprec.search._decisions`)
read these; they import nothing of either.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Decision", "Ranked", "Tolerance"]


@dataclass(frozen=True)
class Tolerance:
    """The error bound: relative error at the loss and relative L2 error of the gradients.

    >>> Tolerance().within(0.005, 0.06), Tolerance().score(0.005, 0.025)
    (False, 0.5)
    """

    loss: float = 0.01
    grad: float = 0.05

    def within(self, loss_err: float, grad_err: float) -> bool:
        """Whether both errors are inside the bound."""
        return loss_err <= self.loss and grad_err <= self.grad

    def score(self, loss_err: float, grad_err: float) -> float:
        """The larger of the two errors as a fraction of its bound (1.0 = at the bound)."""
        return max(loss_err / self.loss, grad_err / self.grad)


@dataclass(frozen=True)
class Decision:
    """The format of one layer and why."""

    key: str
    precision: str
    reason: str                  # "cast", or why the layer stays FP32
    detail: str = ""             # the measured numbers behind the reason
    excluded: bool = False       # kept in FP32 for a numerical reason (not merely no speed gain)
    recipe: str = ""             # "fp8": torchao's recipe


@dataclass(frozen=True)
class Ranked:
    """What the probe leaves to the search: the layers it decided, and the open layers' best formats, ranked.

    ``moves`` are the open layers as moves (a tied group is one move), least sensitive per
    unit of cost saved first: the search casts the first ``k`` of them.
    """

    pinned: dict[str, Decision]        # layers decided before the search (FP32, or tied weights) and why
    best: dict[str, str]               # open layer -> its best format (cheapest, then least error)
    usable: dict[str, list[str]]       # open layer -> every format it may use
    refused: dict[str, str]            # layer -> the formats refused to it and why ("" where none)
    joinable: dict[str, list[str]]     # pinned layer -> formats refused it only for speed: it may join neighbours
    unsafe: dict[str, dict[str, str]]  # format -> layer -> why it fails numerically there
    moves: tuple[tuple[str, ...], ...]

    @property
    def order(self) -> tuple[str, ...]:
        """The open layers, least sensitive first."""
        return tuple(k for g in self.moves for k in g)
