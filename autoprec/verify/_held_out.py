"""The held-out check: the searched policy measured on data its decisions were not made on.

``tune`` splits what it is given (:func:`split`): with several batches, the last quarter of them (at
least one) is held out; with one batch whose tensors share a leading size, a quarter of its rows (at
least 2, and never more than the rows kept). The probe and the search (what decides) see only the
rest; the step race and verification, which train, train on everything. After the search (and the
step race), the policy's loss and gradient errors against FP32 on the held-out part must be within
the bound; where they are not, layers go back to FP32 in this order
(:func:`backoff_order`), 1, then 2, then 4 more at a time, until the policy holds there:

1. those whose rounding reaches an amplifying op (a softmax over large logits, a route, a
   normalisation by a small spread: :mod:`autoprec.probe._amplify`), the most amplified first;
2. then by their own measured error as a fraction of the bound, the largest first: a layer at half
   the bound on the tuning data is not safe on unseen data by a margin of 2.

The margin is calibrated, not assumed: :attr:`autoprec.HeldOut.margin` is how many times the
search's policy's held-out error exceeds its tuning error, and the report states it. A batch that
cannot be split (its tensors differ in leading size, it has fewer than 4 rows, or the loss fails on
a part of it, as a ``loss_fn`` closed over a fixed target does) is not split: the record says why.
Cost: one FP32 and one policy forward+backward per held-out batch, plus one per back-off round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from ..core._batch import LossFn, leading_rows
from ..core._checks import check_batch
from ..errors import AutoprecError
from ..policy._records import HeldOut
from ..probe._records import Probe
from ..probe._reductions import relative_errors
from ..probe._runner import Runner
from ..search._records import Decision, Tolerance

__all__ = ["DEFAULT_FRACTION", "Checked", "Split", "accepts_part", "backoff_order", "check", "split"]

#: the share of what ``tune`` is given that it holds out by default
DEFAULT_FRACTION = 0.25


@dataclass(frozen=True)
class Split:
    """What decisions are made on, what they are checked on, and how that was decided."""

    decide: list[Any]
    held: list[Any]
    what: str = ""         # "2 of 8 rows", "1 of 4 batches"
    skipped: str = ""      # why nothing is held out ("" where something is)

    def record(self) -> HeldOut | None:
        """The record of a split that held nothing out (None where something was)."""
        return None if self.held else HeldOut("", skipped=self.skipped)


def _rows(batch: Any, start: int, stop: int) -> Any:
    return pytree.tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)


def split(batches: Sequence[Any], fraction: float, *, accepts: Callable[[Any], str]) -> Split:
    """Hold out ``fraction`` of ``batches`` (whole batches where there are several, else rows of the one).

    ``accepts(part)`` runs the model and loss on a part of a split batch: ``""`` where it works, else why not.

    Example:
        >>> s = split([torch.ones(8, 2)], 0.25, accepts=lambda part: "")
        >>> s.what, [tuple(b.shape) for b in s.decide], [tuple(b.shape) for b in s.held]
        ('2 of 8 rows', [(6, 2)], [(2, 2)])
        >>> split([torch.ones(3, 2)], 0.25, accepts=lambda part: "").skipped
        'a batch of 3 rows is too small to hold rows out (4 or more): pass more batches with batches='
    """
    if fraction <= 0:
        return Split(list(batches), [], skipped="held_out=0: nothing was held out")
    n = len(batches)
    if n > 1:
        held = min(n - 1, max(1, round(n * fraction)))
        return Split(list(batches[:n - held]), list(batches[n - held:]), f"{held} of {n} batches")
    rows = leading_rows(batches[0])
    if rows is None:
        return Split(list(batches), [], skipped="the batch's tensors do not share a leading (row) size, so no rows "
                                                "could be held out: pass more batches with batches=")
    held = max(2, round(rows * fraction))
    if rows - held < held:
        return Split(list(batches), [], skipped=f"a batch of {rows} rows is too small to hold rows out (4 or more): "
                                                "pass more batches with batches=")
    keep, out = _rows(batches[0], 0, rows - held), _rows(batches[0], rows - held, rows)
    why = accepts(keep) or accepts(out)
    if why:
        return Split(list(batches), [], skipped=f"the model or loss does not take part of the batch's rows ({why}); "
                                                "pass more batches with batches= to hold one out")
    return Split([keep], [out], f"{held} of {rows} rows")


def accepts_part(model: torch.nn.Module, loss_fn: LossFn | None) -> Callable[[Any], str]:
    """:func:`split`'s ``accepts``: one FP32 forward and loss of a part (``""`` where that works)."""

    def run(part: Any) -> str:
        try:
            check_batch(model, part, loss_fn, 0)
        except AutoprecError as exc:
            return str(exc).split(";")[0][:160]
        return ""
    return run


def backoff_order(decisions: Mapping[str, Decision], probe: Probe, tol: Tolerance,
                  tied: Sequence[Sequence[str]] = ()) -> list[tuple[str, ...]]:
    """The 16-bit layers as units (layers sharing weights together), in the order they go back to FP32:
    the most amplified first, then the largest measured error as a fraction of the bound.

    Example:
        >>> from autoprec.probe import Measurement
        >>> p = Probe(0.0, {}, {("a", "bf16"): Measurement("a", "bf16", 0.001, 0.04, 0, True),
        ...                     ("b", "bf16"): Measurement("b", "bf16", 0.0, 0.01, 0, True, amp=0.03, amp_at="s")},
        ...           1.0, 0.0, (), 0, ("bf16",))
        >>> backoff_order({k: Decision(k, "bf16", "cast") for k in "ab"}, p, Tolerance())
        [('b',), ('a',)]
    """
    cast = [k for k, d in decisions.items() if d.precision != "fp32"]
    groups = {k: tuple(g) for g in tied for k in g if k in decisions}
    units, seen = [], set()
    for key in cast:
        unit = tuple(k for k in groups.get(key, (key,)) if k in decisions and decisions[k].precision != "fp32")
        if unit and unit[0] not in seen:
            seen.update(unit)
            units.append(unit)

    def rank(unit: tuple[str, ...]) -> tuple[float, float]:
        rows = [probe.get(k, decisions[k].precision) for k in unit]
        rows = [m for m in rows if m is not None]
        amp = max([m.amp / tol.grad for m in rows], default=0.0)
        err = max([tol.score(m.loss_err, m.grad_err) for m in rows], default=0.0)
        return (-amp, -err)
    return sorted(units, key=rank)


@dataclass(frozen=True)
class Checked:
    """What :func:`check` returns: the decisions that ship, the record, and the passes it ran."""

    decisions: dict[str, Decision]
    record: HeldOut
    passes: int


def _errors(runner: Runner, held: Sequence[Any], refs: list, assignment: Mapping[str, str],
            scale: float) -> tuple[float, float]:
    worst = (0.0, 0.0)
    for batch, (ref_loss, ref_grads) in zip(held, refs):
        fp16 = "fp16" in assignment.values()
        loss, grads = runner.run(batch, dict(assignment), scale=scale if fp16 else 1.0)
        le, ge, finite = relative_errors(loss, grads, ref_loss, ref_grads, reuse=True)
        le, ge = (le, ge) if finite else (math.inf, math.inf)
        worst = (max(worst[0], le), max(worst[1], ge))
    return worst


def check(runner: Runner, split_: Split, decisions: Mapping[str, Decision], *, probe: Probe, tol: Tolerance,
          tuning: tuple[float, float], tied: Sequence[Sequence[str]] = (), scale: float = 1.0,
          progress: Callable[[int], None] | None = None) -> Checked:
    """The policy of ``decisions`` checked on ``split_.held``, backed off until it holds there.

    ``tuning``: the same policy's (loss, gradient) errors on the tuning data, as the search measured them.
    ``progress(n)`` is told of the passes run: ``2 * len(held)`` (FP32 and the policy), then
    ``len(held)`` per back-off round.
    """
    passes0 = runner.passes
    refs = [runner.run(b, {}) for b in split_.held]
    decisions = dict(decisions)
    first = _errors(runner, split_.held, refs, {k: d.precision for k, d in decisions.items()}, scale)
    now, order, backed, rounds, step = first, backoff_order(decisions, probe, tol, tied), [], 1, 1
    if progress is not None:
        progress(2 * len(split_.held))
    while not tol.within(*now) and order:
        take, order = order[:step], order[step:]
        step *= 2
        for unit in take:
            for key in unit:
                old = decisions[key]
                decisions[key] = Decision(key, "fp32", "held-out back-off", _why(old, now, split_.what, probe, tol))
                backed.append(key)
        now = _errors(runner, split_.held, refs, {k: d.precision for k, d in decisions.items()}, scale)
        rounds += 1
        if progress is not None:
            progress(len(split_.held))
    record = HeldOut(split_.what, loss_err=now[0], grad_err=now[1], tuning_loss_err=tuning[0],
                     tuning_grad_err=tuning[1], first_loss_err=first[0], first_grad_err=first[1],
                     bound_loss=tol.loss, bound_grad=tol.grad, backed_off=tuple(backed), rounds=rounds)
    return Checked(decisions, record, runner.passes - passes0)


def _why(old: Decision, now: tuple[float, float], what: str, probe: Probe, tol: Tolerance) -> str:
    m = probe.get(old.key, old.precision)
    own = ""
    if m is not None:
        own = (f"; {m.amplified()}" if m.amp_at else "") + \
              f"; alone on the tuning data: loss err {m.loss_err:.3g}, grad err {m.grad_err:.3g}"
    return (f"{old.precision} on the {what} held out: the policy's loss err {now[0]:.3g}, grad err {now[1]:.3g} "
            f"(bound {tol.loss:g}, {tol.grad:g}) with it in {old.precision}{own}")
