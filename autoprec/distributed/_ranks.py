"""Tuning on several processes: the ranks of an initialised ``torch.distributed`` process group.

Under ``torchrun`` (a default process group initialised before ``tune``), the probe's passes and
the search's trials are split across the ranks and every rank gathers what the others measured,
so each returns the policy one process would. Without a process group everything here is a no-op
for one rank. Work is split round-robin (item ``i`` goes to rank ``i % world``): deterministic, the
same on every rank, and balanced to one item.

Every collective here is made the same number of times on every rank; a rank whose share of the
work failed raises on every rank (:class:`~autoprec.RankError` on the others) instead of leaving
them waiting in a collective.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence, TypeVar

import torch

from ..errors import RankError

__all__ = ["Ranks", "current"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's rank among ``world`` tuning processes (``world == 1``: no process group).

    ``device`` is the CUDA device the object collectives of an NCCL group run on (NCCL moves every
    gathered object through one); None for gloo and for one rank.
    """

    rank: int = 0
    world: int = 1
    device: torch.device | None = None

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world``-th, starting at ``rank``.

        Example:
            >>> Ranks(1, 2).share(["a", "b", "c", "d", "e"])
            ['b', 'd']
        """
        return list(items[self.rank::self.world])

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), by rank; ``[obj]`` for one rank.

        Example:
            >>> Ranks().gather({"loss": 1.0})
            [{'loss': 1.0}]
        """
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        with self._on_device():
            dist.all_gather_object(out, obj)
        return out

    def run(self, work: Callable[[], T], what: str) -> list[T]:
        """Run ``work()`` here and gather every rank's result; if it raised on any rank, raise on all.

        The rank that failed raises its own exception; the others a :class:`~autoprec.RankError`
        naming that rank and its error (``what`` says which step failed).

        Example:
            >>> Ranks().run(lambda: 2 + 2, "adding")
            [4]
        """
        try:
            mine: tuple[bool, Any] = (True, work())
            failure: BaseException | None = None
        except Exception as exc:  # noqa: BLE001 - re-raised below, on this rank as it is
            mine, failure = (False, f"{type(exc).__name__}: {str(exc)[:300]}"), exc
        results = self.gather(mine)
        failed = [(r, res[1]) for r, res in enumerate(results) if not res[0]]
        if failure is not None:
            raise failure
        if failed:
            r, text = failed[0]
            raise RankError(f"{what} failed on rank {r} of {self.world} ({text}); every rank stops, so none "
                            "waits for it: see that rank's output for the cause")
        return [res[1] for res in results]

    def agree(self, value: Any, what: str, fix: str) -> None:
        """Raise :class:`~autoprec.RankError` on every rank unless ``value`` (its ``repr``) is the same on all.

        Example:
            >>> Ranks().agree(("fc", "bf16"), "the policy", "re-run") is None
            True
        """
        if self.world == 1:
            return
        digest = hashlib.sha256(repr(value).encode()).hexdigest()[:16]
        seen = self.gather((digest, repr(value)[:200]))
        if len({d for d, _ in seen}) > 1:
            other = next(r for r, (d, _) in enumerate(seen) if d != seen[0][0])
            raise RankError(f"{what} differs between the ranks: rank 0 has {seen[0][1]}, rank {other} has "
                            f"{seen[other][1]}; {fix}")

    def _on_device(self) -> ContextManager[Any]:
        return torch.cuda.device(self.device) if self.device is not None else nullcontext()


def current(device: torch.device | None = None) -> Ranks:
    """The ranks of the default process group, or one rank without one.

    ``device``: the model's device; on an NCCL group the object collectives run there (or on the
    CUDA device ``LOCAL_RANK`` names, for a model on the CPU).

    Example:
        >>> current()  # no process group in this process
        Ranks(rank=0, world=1, device=None)
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Ranks()
    backend = str(dist.get_backend())
    on_cuda = None
    if "nccl" in backend and "cpu:" not in backend:  # objects travel through a CUDA tensor: whose device?
        if device is not None and device.type == "cuda":
            on_cuda = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        else:
            on_cuda = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), device=on_cuda)
