"""The watch: per 16-bit layer, its largest ``|output|`` and ``|gradient|`` and their non-finite passes, on the device.

Each watched layer owns one row ``[max |out|, non-finite forward passes, max finite |grad|, non-finite
backward passes]`` of one small device tensor. A layer is a unit module or an op entry
(``module.path::op``, a functional op in a module's own code): :func:`autoprec.runtime._apply.watched` calls its
observer with the raw 16-bit output, a unit's at the end of its region, an op entry's in
:func:`autoprec.runtime._opmodes.run_op` as the op's region returns (once per call: an op called in a loop counts
each call as a pass). The observer reduces the output once, ``aminmax`` (its min and max: one pass, no
temporary, no host sync); when the output is FP16 and requires grad it also hooks it, and backward reduces
the gradient w.r.t. it the same way (:mod:`autoprec.watch._grads`). Eager, that is all a pass costs: the
two 0-dim results wait in a list, and :meth:`Watch.fold` folds every waiting pass of every layer into the
table at once, a fixed number of device ops (:func:`_fold`), at the read (or when
:data:`PENDING_LIMIT` passes wait). Traced by ``torch.compile`` the observer folds each pass into its row in
the graph (a few 0-dim ops that Inductor fuses), so the graph has no side effect on Python state; both
folds give the same figures (``tests/watch/test_guard.py``). BF16 outputs are
not hooked, and their rows' gradient columns stay 0: BF16 has FP32's exponent range (largest finite
3.39e38, smallest normal 1.18e-38), so a gradient that overflows BF16 overflows FP32 too and no
promotion fixes it, and BF16 runs without a GradScaler (no scale to collapse); what BF16 loses is
precision, which no range statistic shows and the FP32 check measures (:mod:`autoprec.watch._check`). :meth:`Watch.read`
copies the whole table to the host at once (with the GradScaler's scale, when given): one sync for
every layer. Under ``torch.distributed`` (a default process group of more than one rank) the read first
gathers every rank's table in one collective and combines them (the largest ``|out|`` and ``|grad|`` of
any rank, the non-finite passes of all ranks), so that every rank reads the same figures and acts alike
at the same step; each rank's own table stays local.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from ._grads import hook_grad

__all__ = ["Watch"]


def _host(table: torch.Tensor) -> list[list[float]]:
    """The one device-to-host copy of a read (tests count its calls)."""
    return table.tolist()


def _world() -> int:
    """The number of ranks of the default process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _across_ranks(table: torch.Tensor) -> torch.Tensor:
    """Every rank's ``table`` combined: one all-gather, then the max of the even columns (largest
    magnitudes) and the sum of the odd ones (non-finite counts).

    Example:
        >>> _across_ranks(torch.tensor([[3.0, 1.0, 2.0, 0.0]])).tolist()  # one process: the table itself
        [[3.0, 1.0, 2.0, 0.0]]
    """
    world = _world()
    if world == 1:
        return table
    tables = [torch.empty_like(table) for _ in range(world)]
    dist.all_gather(tables, table.contiguous())
    stacked = torch.stack(tables)
    maxed, summed = stacked.amax(0), stacked.sum(0)
    return torch.stack([(maxed if c % 2 == 0 else summed)[:, c] for c in range(table.shape[1])], dim=1)


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


#: a fold runs early when this many passes wait (forwards without a read, e.g. evaluation): bounded memory
PENDING_LIMIT = 4096


def _observer(row: torch.Tensor, pending: Callable[[int, torch.Tensor, torch.Tensor], None],
              slot: int) -> Callable[[Any], None]:
    """The observer of the layer whose row is ``row`` (its forward pair is ``slot`` of the watch's pending folds,
    its gradient pair ``slot + 1``): in eager mode it reduces each output to its (min, max), one ``aminmax``, and
    hands them to ``pending``; traced by ``torch.compile`` it folds them into ``row`` in the graph."""
    amax, bad, gmax, gbad = row[0], row[1], row[2], row[3]

    def grads(lo: torch.Tensor, hi: torch.Tensor) -> None:
        pending(slot + 1, lo, hi)

    def update(t: torch.Tensor) -> None:
        if t.requires_grad and t.dtype == torch.float16:  # FP16 in training: BF16 gradients have FP32's range
            hook_grad(t, gmax, gbad, grads)
        lo, hi = torch.aminmax(t.detach())  # one pass, no temporary (abs().amax() makes one)
        if not torch.compiler.is_compiling():
            pending(slot, lo, hi)  # folded at the read, for all layers at once (Watch.fold)
            return
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


def _fold(table: torch.Tensor, slots: torch.Tensor, forward: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Fold passes into ``table``: pass ``k`` reduced to ``(lo[k], hi[k])`` goes to pair ``slots[k]`` of the table
    seen as ``(2 x layers, 2)`` (even pairs: ``[max |out|, non-finite forwards]``, odd: ``[max finite |grad|,
    non-finite backwards]``; ``forward``: ``slots`` even), exactly as the traced observer and gradient hook fold
    one pass. A fixed number of ops however many passes and layers.

    Example:
        >>> t = torch.zeros(1, 4); inf, nan = float("inf"), float("nan")
        >>> slots, lo, hi = torch.tensor([0, 0, 1, 1]), torch.tensor([-3.0, nan, -inf, 1.0]), torch.tensor([1.0, nan, 2.0, 5.0])
        >>> _fold(t, slots, slots.eq(0), lo, hi)
        >>> t.tolist()  # |out|: 3 and a NaN pass; |grad|: an inf pass (not a maximum) and 5
        [[3.0, 1.0, 5.0, 1.0]]
    """
    m = torch.fmax(hi, lo.neg())  # max |.| per pass (exact in its dtype); NaN only where the pass held NaN
    finite = m.lt(math.inf)
    # |out| keeps an inf as its maximum, |grad| the largest finite one; a NaN pass leaves both as they were
    value = torch.where(finite.logical_or(forward), m.nan_to_num(0.0, math.inf), 0.0)
    pairs = table.view(-1, 2)
    pairs[:, 0].scatter_reduce_(0, slots, value.to(table.dtype), "amax")
    pairs[:, 1].index_add_(0, slots, finite.logical_not().to(table.dtype))


class Watch:
    """Running statistics of ``layers`` on ``device``; :meth:`read` is the only host sync.

    Example:
        >>> w = Watch(["fc"], "cpu")
        >>> observe = w.observers()["fc"]
        >>> observe(torch.tensor([1.0, -3.0])); w.read()
        {'fc': (3.0, 0)}
        >>> observe(torch.tensor([float("nan"), 2.0])); observe(torch.tensor([-float("inf")])); w.read()
        {'fc': (inf, 2)}
        >>> x = torch.ones(2, requires_grad=True); y = (x * 2).half(); observe(y); (y * -5).sum().backward()
        >>> _ = w.read(scale=torch.tensor(4.0)); w.grads, w.scale
        ({'fc': (5.0, 0)}, 4.0)
    """

    def __init__(self, layers: Iterable[str], device: torch.device | str) -> None:
        self.layers = tuple(layers)
        self._table = torch.zeros(len(self.layers), 4, dtype=torch.float32, device=device)
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # eager passes not folded yet
        self._slots: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # per order of passes: slots, forward
        self.reads = 0
        self.grads: dict[str, tuple[float, int]] = {}  # at the last read: layer -> (max finite |grad|, bad passes)
        self.scale: float | None = None  # at the last read: the scale given to it

    @property
    def table(self) -> torch.Tensor:
        """The statistics, one row per layer, with every pass folded in (:meth:`fold`; no host sync)."""
        self.fold()
        return self._table

    def _add(self, slot: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self._pending.append((slot, lo, hi))
        if len(self._pending) >= PENDING_LIMIT:
            self.fold()

    def fold(self) -> None:
        """Fold the eager passes since the last fold into the table: a fixed number of device ops for all
        of them (:func:`_fold`), no host sync; the slot tensor of an order of passes is built once (a host
        to device copy on a GPU) and kept."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        order = tuple(p[0] for p in pending)
        slots = self._slots.get(order)
        if slots is None:
            if len(self._slots) > 64:  # orders that do not repeat (a varying number of passes): keep a few
                self._slots.clear()
            index = torch.tensor(order, dtype=torch.long).to(self._table.device)
            slots = self._slots[order] = (index, index.remainder(2).eq(0))
        _fold(self._table, *slots, torch.stack([p[1] for p in pending]), torch.stack([p[2] for p in pending]))

    def observers(self, only: Iterable[str] | None = None) -> dict[str, Callable[[Any], None]]:
        """Layer -> the callable that updates its row (for ``only`` those layers, or all)."""
        keep = set(self.layers if only is None else only)
        return {k: _observer(self._table[i], self._add, 2 * i) for i, k in enumerate(self.layers) if k in keep}

    def read(self, scale: torch.Tensor | float | None = None) -> dict[str, tuple[float, int]]:
        """Layer -> (largest |output| seen, forward passes with a non-finite output): one sync (and,
        with a default process group, one all-gather: every rank's figures combined, the same on each;
        every rank must read at the same step, as :class:`~autoprec.Guard` does). The same copy fills
        :attr:`grads` (layer -> (largest finite |grad|, backward passes with a non-finite gradient)) and
        :attr:`scale` (``scale`` read: a 0-dim device tensor, e.g. the GradScaler's, travels in the copy)."""
        self.reads += 1
        table = _across_ranks(self.table)  # folded first
        if isinstance(scale, torch.Tensor):
            flat = _host(torch.cat([table.flatten(), scale.detach().reshape(1).to(table)]))
            rows, self.scale = [flat[i:i + 4] for i in range(0, len(flat) - 1, 4)], flat[-1]
        else:
            rows = _host(table) if self.layers else []
            self.scale = None if scale is None else float(scale)
        self.grads = {k: (row[2], int(row[3])) for k, row in zip(self.layers, rows)}
        return {k: (row[0], int(row[1])) for k, row in zip(self.layers, rows)}

    def reset(self, layer: str) -> None:
        """Start ``layer``'s statistics again (after its format changed)."""
        self.table[self.layers.index(layer)].zero_()  # folded first: no earlier pass lands after the reset

    def state_dict(self) -> dict[str, Any]:
        """The statistics as plain data (a host copy)."""
        return {"layers": list(self.layers), "table": self.table.tolist(), "reads": self.reads}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the statistics :meth:`state_dict` wrote; rows of layers not watched here are ignored."""
        rows = dict(zip(state["layers"], state["table"]))
        with torch.no_grad():
            for i, k in enumerate(self.layers):
                if k in rows:  # a row saved before the gradient columns: their figures start at 0
                    row = [*rows[k], 0.0, 0.0][:self.table.shape[1]]
                    self.table[i] = torch.tensor(row, dtype=self.table.dtype)
        self.reads = int(state.get("reads", 0))
