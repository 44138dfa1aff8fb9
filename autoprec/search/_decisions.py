"""The decision texts: why each layer runs in the format the search chose, in measured numbers.

Once the search has chosen ``k`` (:func:`autoprec.search._search.search`), every open layer gets its
decision: *cast* (its format, its error alone, the other formats within the bound, those refused),
*no gain* (an assignment casting it was measured within the bound, but a cheaper one won) or
*combined error* (casting it too put the measured total over the bound). Then the layers whose
format the join rule moved (:func:`autoprec.search._search._joiners`) say they *join their
neighbours* (or *follow* their inputs), priced with the casts on their edges; a layer left in FP32
beside 16-bit neighbours says what the other format would have cost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..device._costs import DeviceProfile, StepCost, cost_note
from ..probe._records import Measurement, Probe
from ..trace._trace import Layer, Trace
from ._records import Decision, Ranked

__all__ = ["decide", "fmt_err", "ms"]


def fmt_err(m: Measurement) -> str:
    """A measurement's errors as the decision texts write them.

    >>> fmt_err(Measurement("fc", "bf16", 0.00123, 0.0456, 0, True))
    'loss err 0.00123, grad err 0.0456'
    >>> fmt_err(Measurement("fc", "bf16", 0.002, 0.03, 0, True, group="mlp", members=4))
    'loss err 0.002, grad err 0.03 (at most: 4 layers of role mlp cast at once)'
    """
    text = f"loss err {m.loss_err:.3g}, grad err {m.grad_err:.3g}"
    if m.members > 1:  # a role's group measurement: a bound on this layer's own error
        text += f" (at most: {m.members} layers of role {m.group} cast at once)"
    return text


def ms(seconds: float) -> str:
    """Seconds as milliseconds, three significant digits.

    >>> ms(0.0012345)
    '1.23 ms'
    """
    return f"{seconds * 1e3:.3g} ms"


def decide(trace: Trace, probe: Probe, profile: DeviceProfile, ranked: Ranked, k_best: int, passed: Sequence[int],
           cost: Callable[[int], float], final: Mapping[str, str], edges: StepCost) -> dict[str, Decision]:
    """Every layer's decision, in the trace's order, once the search chose to cast the first ``k_best`` moves.

    ``passed``: the ``k`` measured within the bound; ``cost(k)``: the modelled step time of casting the
    first ``k`` moves; ``final``: the chosen assignment, the join rule applied.
    """
    decisions = dict(ranked.pinned)
    cast = {key for g in ranked.moves[:k_best] for key in g}
    position = {key: i for i, g in enumerate(ranked.moves) for key in g}
    for key in ranked.order:
        if key in cast:
            decisions[key] = cast_decision(key, probe, ranked)
        else:
            wider = [k for k in passed if k > position[key]]
            decisions[key] = left_out(trace.layer(key), probe, profile, ranked.best[key], k_best,
                                      min(wider) if wider else None, cost)
    for key, d in list(decisions.items()):
        fmt = final[key]
        if fmt != d.precision:  # joined its neighbours
            decisions[key] = joined(key, fmt, probe, final, edges)
        elif key in ranked.joinable and d.reason == "no gain" and any(
                final.get(n, "fp32") != "fp32" for n in (*edges.producers.get(key, ()), *edges.consumers.get(key, ()))):
            decisions[key] = beside(d, ranked.joinable[key][0], final, edges)
    return {lay.key: decisions[lay.key] for lay in trace.layers}


def cast_decision(key: str, probe: Probe, ranked: Ranked) -> Decision:
    """An open layer cast to its best format: its error there, the other formats within the bound, those refused."""
    best = ranked.best[key]
    detail = f"{best}: {fmt_err(probe.get(key, best))}"
    others = [f"{f}: {fmt_err(probe.get(key, f))}" for f in ranked.usable[key] if f != best]
    if others:
        detail += "; also within the bound: " + ", ".join(others)
    if ranked.refused[key]:
        detail += "; refused " + ranked.refused[key]
    return Decision(key, best, "cast", detail)


def left_out(layer: Layer, probe: Probe, profile: DeviceProfile, best: str, k_best: int, wider: int | None,
             cost: Callable[[int], float]) -> Decision:
    """An open layer left in FP32: *no gain* where casting the first ``wider`` moves (it among them) was measured
    within the bound but costs more than casting ``k_best``, else *combined error*."""
    key = layer.key
    m = probe.get(key, best)
    # left out for cost where an assignment casting it was measured within the bound: not numerics
    if wider is not None:
        return Decision(key, "fp32", "no gain",
                        f"alone in {best}: {fmt_err(m)}; casting the first {wider} layers with it was measured "
                        f"within the bound, but the modelled step time is {ms(cost(wider))} against "
                        f"{ms(cost(k_best))} with {k_best} cast (casts priced per edge); "
                        f"{cost_note(layer, (best,), profile)}")
    return Decision(key, "fp32", "combined error",
                    f"alone in {best}: {fmt_err(m)}; casting it too put the measured total over the bound",
                    excluded=True)


def joined(key: str, fmt: str, probe: Probe, final: Mapping[str, str], edges: StepCost) -> Decision:
    """A layer the join rule moved into its neighbours' format ``fmt`` in ``final``, priced with its edges' casts.

    A layer never probed alone *follows* where all its inputs come in ``fmt``."""
    producers = edges.producers.get(key, ())
    a32 = {**final, key: "fp32"}
    priced = (f"with the casts on its edges, it and the layers it feeds cost {ms(edges.local(key, final))} "
              f"in {fmt} against {ms(edges.local(key, a32))} in fp32")
    if key in probe.skipped:
        from_ = [p for p in producers if final.get(p) == fmt]
        detail = (f"follows: its inputs come in {fmt} from {', '.join(sorted(from_))}, handed over uncast; "
                  if from_ and len(from_) == len(producers) else f"joins its neighbours in {fmt}; ")
        detail += f"{probe.skipped[key]}; {priced}"
    else:
        m = probe.get(key, fmt)
        detail = f"joins its neighbours in {fmt}: {fmt}: {fmt_err(m)} alone (within the bound); {priced}"
    return Decision(key, fmt, "cast", detail)


def beside(d: Decision, alt: str, final: Mapping[str, str], edges: StepCost) -> Decision:
    """A layer kept in FP32 (*no gain*) beside 16-bit neighbours in ``final``: what ``alt`` would have cost it."""
    alt_assignment = {**final, d.key: alt}
    return Decision(d.key, d.precision, d.reason,
                    f"{d.detail}; beside its neighbours in this policy, with the casts on its "
                    f"edges, it and the layers it feeds cost {ms(edges.local(d.key, final))} in fp32 "
                    f"against {ms(edges.local(d.key, alt_assignment))} in {alt}", d.excluded)
