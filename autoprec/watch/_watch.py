"""The watch: per 16-bit layer, its largest ``|output|`` and its non-finite forward passes, on the device.

Each watched layer owns one row ``[max |out|, non-finite passes]`` of one small device tensor. Its
observer (:func:`autoprec.apply.watched` calls it with the layer's raw 16-bit output) updates the
row in place: one reduction over the output and a few 0-dim ops, no host sync. :meth:`Watch.read`
copies the whole table to the host at once: one sync for every layer. Under ``torch.distributed`` (a
default process group of more than one rank) the read first gathers every rank's table in one
collective and combines them (the largest ``|out|`` of any rank, the non-finite passes of all ranks), so
that every rank reads the same figures and acts alike at the same step; each rank's own table stays local.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

__all__ = ["Watch"]


def _host(table: torch.Tensor) -> list[list[float]]:
    """The one device-to-host copy of a read (tests count its calls)."""
    return table.tolist()


def _world() -> int:
    """The number of ranks of the default process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _across_ranks(table: torch.Tensor) -> torch.Tensor:
    """Every rank's ``table`` combined: one all-gather, then the max of column 0 and the sum of column 1.

    Example:
        >>> _across_ranks(torch.tensor([[3.0, 1.0]])).tolist()  # one process: the table itself
        [[3.0, 1.0]]
    """
    world = _world()
    if world == 1:
        return table
    tables = [torch.empty_like(table) for _ in range(world)]
    dist.all_gather(tables, table.contiguous())
    stacked = torch.stack(tables)
    return torch.stack([stacked[:, :, 0].amax(0), stacked[:, :, 1].sum(0)], dim=1)


def _floats(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        if out.is_floating_point() and out.numel():
            yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _floats(item)
    elif isinstance(out, dict):
        for item in out.values():
            yield from _floats(item)


def _observer(row: torch.Tensor) -> Callable[[Any], None]:
    amax, bad = row[0], row[1]

    def update(t: torch.Tensor) -> None:
        lo, hi = torch.aminmax(t.detach())  # one pass, no temporary (abs().amax() makes one)
        m = torch.fmax(hi, lo.neg())  # max |t|; NaN only when the output is NaN
        torch.fmax(amax, m, out=amax)  # fmax: a NaN does not hide the maximum
        bad.add_(m.lt(math.inf).logical_not())  # inf or NaN anywhere in this output (isfinite takes 5 ops)

    def observe(out: Any) -> None:
        if type(out) is torch.Tensor and out.is_floating_point() and out.numel():  # the common case
            update(out)
            return
        for t in _floats(out):
            update(t)
    return observe


class Watch:
    """Running statistics of ``layers`` on ``device``; :meth:`read` is the only host sync.

    Example:
        >>> w = Watch(["fc"], "cpu")
        >>> observe = w.observers()["fc"]
        >>> observe(torch.tensor([1.0, -3.0])); w.read()
        {'fc': (3.0, 0)}
        >>> observe(torch.tensor([float("nan"), 2.0])); observe(torch.tensor([-float("inf")])); w.read()
        {'fc': (inf, 2)}
    """

    def __init__(self, layers: Iterable[str], device: torch.device | str) -> None:
        self.layers = tuple(layers)
        self.table = torch.zeros(len(self.layers), 2, dtype=torch.float32, device=device)
        self.reads = 0

    def observers(self, only: Iterable[str] | None = None) -> dict[str, Callable[[Any], None]]:
        """Layer -> the callable that updates its row (for ``only`` those layers, or all)."""
        keep = set(self.layers if only is None else only)
        return {k: _observer(self.table[i]) for i, k in enumerate(self.layers) if k in keep}

    def read(self) -> dict[str, tuple[float, int]]:
        """Layer -> (largest |output| seen, forward passes with a non-finite output): one sync (and,
        with a default process group, one all-gather: every rank's figures combined, the same on each;
        every rank must read at the same step, as :class:`~autoprec.Guard` does)."""
        self.reads += 1
        rows = _host(_across_ranks(self.table)) if self.layers else []
        return {k: (row[0], int(row[1])) for k, row in zip(self.layers, rows)}

    def reset(self, layer: str) -> None:
        """Start ``layer``'s statistics again (after its format changed)."""
        self.table[self.layers.index(layer)].zero_()

    def state_dict(self) -> dict[str, Any]:
        """The statistics as plain data (a host copy)."""
        return {"layers": list(self.layers), "table": self.table.tolist(), "reads": self.reads}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the statistics :meth:`state_dict` wrote; rows of layers not watched here are ignored."""
        rows = dict(zip(state["layers"], state["table"]))
        with torch.no_grad():
            for i, k in enumerate(self.layers):
                if k in rows:
                    self.table[i] = torch.tensor(rows[k], dtype=self.table.dtype)
        self.reads = int(state.get("reads", 0))
