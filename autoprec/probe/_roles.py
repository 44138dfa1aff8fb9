"""Roles: the layers that play the same part in repeated blocks, probed as one group first.

A *role* is a set of candidate layers whose keys are equal once every numeric component of the
module path (a block index) is replaced by ``*`` (``transformer.h.*.attn.c_attn``), and that run
the same kind of layer (module class or op, hazards, call count) at the same parameter shapes and
the same input/output shapes apart from their leading (row) dimension. GPT-2 small has 8 roles of
12 layers each, and 3 layers of its own. The rows may differ because separate expert modules run
in a loop (``for e, expert in enumerate(self.experts): out[idx] = expert(x[idx])``) each get the
tokens the router sends them: the experts of one block are one role, so their probe passes do not
multiply with the expert count. Tensors of one dimension, and every dimension after the first,
must be equal. What a member's rows change is not what the group bound rests on: each member's
errors are relative (a mean over its rows), its rounding adds to the group's as any member's does,
and its range (the outlier check below) and its cost are its own.

A unit module that the tuning batch never calls (an expert routed no token) has no layer: see
:func:`unrun_units` for the format its role gives it.

The probe (:func:`autoprec.probe.probe`, with ``share=``) measures a role in each format with one
pass that casts every member at once. That measurement stands for each member only where it is
*clearly safe* (:meth:`Sharing.accepts`): finite loss and gradients, no member emitting more
non-finite values than it does in FP32, and both errors inside ``1 / margin`` of the bound. Why a
group bound is safe for each member: the group pass adds the member's own rounding and every other
member's; independent roundings add (in quadrature, or linearly where they are correlated), so the
member alone is expected to err less than the group, and the margin (4: the group must sit at a
quarter of the bound) covers what partial cancelling and measurement noise could take back. On a
4-block GPT-2 every grouped member's gradient error alone was below its group's, about
``1 / sqrt(n)`` of it (``tests/probe/test_roles.py``); loss errors there are one FP32 ulp of the loss
either way. The row of each member records the role and how many layers were cast
(:class:`autoprec.probe._passes.Measurement` ``group``, ``members``): it is a bound, not the member's own
figure, and the report says so. The search allows a format on that bound; to order the layers it
shares the group's figure out in quadrature (``/ sqrt(n)``), so members of one role tie and keep
execution order, which is also the order in which verification would back them off.

Otherwise the role is split (:meth:`Sharing.split`), and each part is probed in the same way down
to single layers, which are measured alone as without sharing:

- a member that emits non-finite values (the first in execution order: those after it may only be
  fed its Inf) is probed alone, and the members before and after it as two groups (a hazard at one
  depth costs about three passes per level, not one per member);
- a finite group over ``1 / margin`` of the bound splits into the fewest contiguous parts that the
  quadrature model (a part of ``k`` of ``n`` members errs ``sqrt(k / n)`` times the whole) expects
  to come out clearly safe, halves at most; where no part of two would, its members go alone. Under
  a tight bound this can cost a few passes more than probing alone (a group pass that had to split);
  under the default bounds it saves most of them (``benchmarks/probe_cost.py --passes``);
- a group that could not run at all (an exception) goes member by member, each with its own error.

Before any pass, a member whose FP32 range does not fit a format with the probe's ``headroom``
(the outlier depth, which the search refuses that format anyway) is taken out of the role for that
format and probed alone, so that it cannot spoil its role's measurement.

Example:
    >>> role_of("encoder.layers.11.attn::softmax_2")
    'encoder.layers.*.attn::softmax_2'
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from ..core._formats import info
from ..trace._trace import Trace

if TYPE_CHECKING:
    from ._passes import Measure
    from ._records import Measurement, Ranges

__all__ = ["Sharing", "measure_role", "role_of", "probe_groups", "roles", "rows_free", "unrun_units"]

log = logging.getLogger("autoprec.roles")


@dataclass(frozen=True)
class Sharing:
    """When a role's one measurement stands for its members: the error bound and the margin under it.

    Example:
        >>> s = Sharing(loss=0.01, grad=0.05)
        >>> s.accepts(0.002, 0.01, True), s.accepts(0.004, 0.01, True)
        (True, False)
    """

    loss: float = 0.01
    grad: float = 0.05
    margin: float = 4.0

    def score(self, loss_err: float, grad_err: float) -> float:
        """The larger error as a fraction of its acceptance line (``bound / margin``): 1.0 = on the line."""
        return self.margin * max(loss_err / self.loss, grad_err / self.grad)

    def accepts(self, loss_err: float, grad_err: float, finite: bool) -> bool:
        """Whether a finite group measurement is clearly inside the bound (non-finite outputs: the caller's check)."""
        return finite and self.score(loss_err, grad_err) <= 1.0

    def split(self, members: Sequence[str], loss_err: float, grad_err: float, finite: bool, *,
              culprit: str | None = None, failed: bool = False) -> list[tuple[str, ...]]:
        """The parts a group that was not accepted is probed as next (see the module docstring).

        Example:
            >>> Sharing().split(list("abcdefgh"), 0.0, 0.0, True, culprit="c")
            [('a', 'b'), ('c',), ('d', 'e', 'f', 'g', 'h')]
            >>> Sharing().split(list("abcdefgh"), 0.003, 0.0, True)
            [('a', 'b', 'c', 'd'), ('e', 'f', 'g', 'h')]
            >>> Sharing().split(list("abcd"), 0.05, 0.0, True)
            [('a',), ('b',), ('c',), ('d',)]
        """
        members = tuple(members)
        n = len(members)
        if failed:
            return [(m,) for m in members]
        if culprit is not None:
            i = members.index(culprit)
            return [p for p in (members[:i], (culprit,), members[i + 1:]) if p]
        score = self.score(loss_err, grad_err)
        if not finite or not math.isfinite(score):
            size = n // 2  # non-finite with no member to blame: bisect
        else:
            size = min(n // 2, math.floor(n / max(score, 1.0) ** 2))
        if size < 2:
            return [(m,) for m in members]
        parts = math.ceil(n / size)
        return [members[i * n // parts:(i + 1) * n // parts] for i in range(parts)]


def role_of(key: str) -> str:
    """``key`` with every numeric component of its module path replaced by ``*`` (the op part is kept).

    Example:
        >>> role_of("h.3.mlp.c_fc"), role_of("fc1")
        ('h.*.mlp.c_fc', 'fc1')
    """
    path, sep, op = key.partition("::")
    return ".".join("*" if part.isdigit() else part for part in path.split(".")) + sep + op


def rows_free(shapes: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """``shapes`` with the leading (row) dimension of each of two dimensions or more left out (``-1``).

    Example:
        >>> rows_free([(140, 128), (8, 64, 128), (5,)])
        ((-1, 128), (-1, 64, 128), (5,))
    """
    return tuple((-1, *s[1:]) if len(s) >= 2 else tuple(s) for s in shapes)


def roles(trace: Trace, candidates: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The roles among ``candidates`` with two members or more: name -> members in execution order.

    Members share the pattern of :func:`role_of`, the layer kind, op, hazards, call count, input and
    output shapes apart from the leading dimension (:func:`rows_free`) and (for modules) the parameter
    shapes. The name is the pattern; where one pattern holds layers of different shapes, each such
    role after the first gets ``#2``, ``#3``, ...

    Example:
        >>> import torch
        >>> from autoprec.trace import trace
        >>> m = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)], torch.nn.Linear(4, 2))
        >>> roles(trace(m, torch.ones(2, 4), device_type="cpu"), ["0", "1", "2", "3"])
        {'*': ('0', '1', '2')}
    """
    wanted = set(candidates)
    found: dict[tuple, list[str]] = {}
    for lay in trace.layers:
        if lay.key not in wanted:
            continue
        sig = (role_of(lay.key), lay.kind, lay.op, lay.hazards, rows_free(lay.in_shapes), rows_free(lay.out_shapes),
               lay.calls,
               trace.signatures.get(lay.key, "") if lay.kind == "module" else "")
        found.setdefault(sig, []).append(lay.key)
    out: dict[str, tuple[str, ...]] = {}
    for sig, members in found.items():
        if len(members) < 2:
            continue
        name, i = sig[0], 1
        while name in out:
            i += 1
            name = f"{sig[0]}#{i}"
        out[name] = tuple(members)
    return out


def unrun_units(trace: Trace) -> dict[str, tuple[str, ...]]:
    """The unit modules with parameters that the traced run never called, each with the layers of its role that ran.

    A role here is the :func:`role_of` pattern and the parameter signature (class and parameter shapes): an
    expert the tuning batch routed no token to, and the experts of its block that ran. The list is empty for
    a unit whose role had no member run.

    Example:
        >>> import torch
        >>> from autoprec.trace import trace
        >>> class Two(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
        ...     def forward(self, x):
        ...         return self.experts[0](x)
        >>> unrun_units(trace(Two(), torch.ones(2, 4), device_type="cpu"))
        {'experts.1': ('experts.0',)}
    """
    ran = [lay.key for lay in trace.layers if lay.kind == "module"]
    out: dict[str, tuple[str, ...]] = {}
    for unit in trace.units:
        sig = trace.signatures.get(unit, "")
        if unit in set(ran) or sig.endswith("[]"):
            continue
        out[unit] = tuple(k for k in ran if role_of(k) == role_of(unit) and trace.signatures.get(k) == sig)
    return out


def probe_groups(candidates: Sequence[str], groups: Mapping[str, tuple[str, ...]]) -> list[tuple[str, tuple[str, ...]]]:
    """The candidates as the probe measures them, ``(role name or key, members)`` (a role, or one layer), each at its first member's place.

    Example:
        >>> probe_groups(["a.0", "b", "a.1"], {"a.*": ("a.0", "a.1")})
        [('a.*', ('a.0', 'a.1')), ('b', ('b',))]
    """
    of = {k: name for name, members in groups.items() for k in members}
    out, seen = [], set()
    for key in candidates:
        name = of.get(key)
        if name is None:
            out.append((key, (key,)))
        elif name not in seen:
            seen.add(name)
            out.append((name, groups[name]))
    return out


def measure_role(measure: Measure, name: str, members: Sequence[str], fmt: str, share: Sharing,
                 ranges: Mapping[str, Ranges], headroom: float) -> dict[tuple[str, str], Measurement]:
    """The measurements of one role in ``fmt``: from group passes where they are clearly safe, split
    elsewhere down to members measured alone (see the module docstring).

    ``measure``: the probe's :class:`autoprec.probe._passes.Measure`; ``ranges``: the FP32 reference's.

    Example (three equal layers, one role, well inside the bound: one pass after the reference):
        >>> import torch
        >>> from autoprec.probe import Measure
        >>> from autoprec.probe import Runner
        >>> from autoprec.trace import trace
        >>> m, x = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)]), torch.randn(4, 8)
        >>> r = Runner(m, None, trace(m, x, device_type="cpu"), device_type="cpu", emulate_fp16=True, seed=0)
        >>> loss, grads = r.run(x, {})
        >>> measure = Measure(r, x, loss, grads, 1.0, None)
        >>> rows = measure_role(measure, "*", ["0", "1", "2"], "fp16", Sharing(), {}, 8.0)
        >>> sorted((k, m.members) for (k, _), m in rows.items()), r.passes
        ([('0', 3), ('1', 3), ('2', 3)], 2)
    """
    top = info(fmt).max
    misfit = [k for k in members if k in ranges and ranges[k].out_absmax * headroom > top]
    rest = tuple(k for k in members if k not in misfit)
    todo = ([rest] if rest else []) + [(k,) for k in misfit]
    out: dict[tuple[str, str], Measurement] = {}
    while todo:
        part = todo.pop(0)
        if len(part) == 1:
            out[(part[0], fmt)] = measure.alone(part[0], fmt)
            continue
        got = measure.run(name, part, fmt)
        if isinstance(got, str):
            todo[0:0] = share.split(part, math.inf, math.inf, False, failed=True)
            continue
        culprit = next((k for k in part if got.nonfinite[k] > (ranges[k].nonfinite if k in ranges else 0)), None)
        grad_err = max(got.grad_err, got.reach.error)  # an amplified rounding counts against the gradient bound
        if culprit is None and share.accepts(got.loss_err, grad_err, got.finite):
            out.update({(k, fmt): got.row(k, fmt, name, len(part)) for k in part})
        else:
            todo[0:0] = share.split(part, got.loss_err, grad_err, got.finite, culprit=culprit)
    log.debug("role %s in %s: %d members, %d measured in a group", name, fmt, len(members),
              sum(m.members > 1 for m in out.values()))
    return out
