"""Stage 3, search: which layers run in which format.

The probe shrinks and orders the space before Optuna sees it:

1. every layer gets the set of formats in which it ran finite, within the error bound, with range
   headroom, and faster than FP32 in the cost model; a layer with none is *pinned* to FP32 and the
   measurement that excluded it is kept as evidence;
2. each open layer takes its best format (cheapest, then least error) and the open layers are
   ordered by measured error per unit of cost saved;
3. Optuna's TPE searches one integer ``k``, "cast the k least sensitive layers", seeded with the
   greedy guess from the per-layer errors (``enqueue_trial``). Each trial's assignment is measured
   for real (one forward+backward), so the objective is the modelled cost of a configuration
   whose *measured* error is within the bound.
4. Every assignment is priced per edge of the handoff graph (:class:`autoprec.device._costs.StepCost`):
   a cast is paid where a producer and its consumer run in different formats, not around every
   16-bit layer. So a cheap layer between 16-bit layers (a norm, an activation, a dropout) that is
   not faster in 16-bit alone may still *join* its neighbours' format: for each trial's
   assignment, such layers take (runs of them together, then one by one, until nothing changes)
   the format of a neighbour where that lowers the modelled step time, the casts on their edges
   included. Only formats the probe allowed numerically join (a layer without hazard and without
   matmul work, never probed alone, *follows*); their error is part of every trial's measured total.

Measured here: TPE over ``k`` reached 99-100% of the greedy solution in 30 trials at 50-200
layers, where raw per-layer categorical TPE reached 39-75% after 300.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

# Imported here, not where the study is made: importing optuna stores the ImportError of an optional
# backend it lacks (redis), and that traceback's frames would pin whatever was on the stack at the
# first import: the reference gradients and the model copy of the first tune, for good.
import optuna
import torch

from ..core._formats import info
from ..device._costs import DeviceProfile, StepCost, cost_note, layer_cost
from ..distributed._ranks import Ranks
from ..probe._records import Measurement, Probe, Ranges
from ..trace._trace import Layer, Trace
from ._decisions import decide, fmt_err
from ._records import Decision, Ranked, Tolerance
from ._split import run_split_study
from ._storage import open_storage

__all__ = ["FINGERPRINT_SAMPLES", "Decision", "SearchResult", "Tolerance", "grad_fingerprint", "run_study", "search"]

log = logging.getLogger("autoprec.search")

Result = tuple[float, float, bool]   # (loss_err, grad_err, finite) of one assignment against FP32
Measure = Callable[[Mapping[str, str]], Result]


@dataclass(frozen=True)
class SearchResult:
    """The chosen assignment, with the study's figures."""

    decisions: dict[str, Decision]
    order: tuple[str, ...]           # open layers, least sensitive first
    k: int
    trials: int
    loss_err: float                  # measured error of the chosen assignment
    grad_err: float
    cost: float
    cost_fp32: float
    history: tuple[tuple[int, float, float, float], ...] = field(default_factory=tuple)  # (k, cost, loss_err, grad_err)
    runner_up: dict[str, str] = field(default_factory=dict)  # the next cheapest assignment measured within the bound
    unsafe: dict[str, dict[str, str]] = field(default_factory=dict)  # format -> layer -> why it fails numerically there

    @property
    def assignment(self) -> dict[str, str]:
        """Layer key -> precision, for every decided layer."""
        return {k: d.precision for k, d in self.decisions.items()}


def search(trace: Trace, probe: Probe, measure: Measure, *, profile: DeviceProfile, tolerance: Tolerance,
           headroom: float = 8.0, n_trials: int = 30, storage: str | None = None, seed: int = 0,
           progress: Callable[[int, int], None] | None = None, ranks: Ranks | None = None) -> SearchResult:
    """Assign a format to every layer (see the module docstring for how).

    ``measure(assignment)`` runs one forward+backward under an assignment and returns
    ``(loss_err, grad_err, finite)`` against FP32. With ``ranks`` of several processes the trials'
    passes are split across them (:mod:`autoprec.search._split`; no ``storage`` then) and every
    rank returns the result one process would. ``progress(i, n)`` states the plan before the first
    trial (``n`` trials in all, ``i`` of them done already by a resumed study), then counts each trial.
    """
    ranked = _rank(trace, probe, profile, tolerance, headroom)
    space = _Space(trace, ranked, profile, measure)
    trials = _study(trace, probe, ranked, space, tolerance, n_trials=n_trials, storage=storage, seed=seed,
                    progress=progress, ranks=ranks)
    k_best, passed, runner_up = _pick(space, tolerance)
    loss_err, grad_err, _ = space.evaluate(k_best)  # k = 0 unmeasured: FP32 itself, which enters the history
    decisions = decide(trace, probe, profile, ranked, k_best, passed, space.cost, space.assignment(k_best),
                       space.edges)
    history = tuple(sorted((k, space.cost(k), v[0], v[1]) for k, v in space.measured.items()))
    log.info("search: %d open layers, %d trials, cast %d, loss err %.3g, grad err %.3g",
             len(ranked.moves), trials, k_best, loss_err, grad_err)
    return SearchResult(decisions=decisions, order=ranked.order, k=k_best, trials=trials,
                        loss_err=loss_err, grad_err=grad_err, cost=space.cost(k_best),
                        cost_fp32=space.cost_fp32, history=history, runner_up=runner_up, unsafe=ranked.unsafe)


def _rank(trace: Trace, probe: Probe, profile: DeviceProfile, tolerance: Tolerance, headroom: float) -> Ranked:
    """The layers the probe decides (pinned to FP32, with why) and the open layers, each with its best format
    (cheapest, then least error; one format per tied group), ranked for the search."""
    pinned: dict[str, Decision] = {}
    best: dict[str, str] = {}
    usable: dict[str, list[str]] = {}
    refused: dict[str, str] = {}
    joinable: dict[str, list[str]] = {}
    unsafe: dict[str, dict[str, str]] = {}
    for layer in trace.layers:
        fmts, refused[layer.key], pin, slower = _usable(trace, probe, profile, tolerance, headroom, layer.key,
                                                        unsafe)
        if pin is not None:
            pinned[layer.key] = pin
            if slower and not pin.excluded:
                joinable[layer.key] = slower
            continue
        usable[layer.key] = fmts
        best[layer.key] = min(fmts, key=lambda f: (round(layer_cost(layer, f, profile), 6),
                                                   _estimate(tolerance, probe.get(layer.key, f))))
    _tie(trace, pinned, usable, best)
    return Ranked(pinned=pinned, best=best, usable=usable, refused=refused, joinable=joinable, unsafe=unsafe,
                  moves=_moves(trace, probe, profile, tolerance, best))


def _moves(trace: Trace, probe: Probe, profile: DeviceProfile, tolerance: Tolerance,
           best: Mapping[str, str]) -> tuple[tuple[str, ...], ...]:
    """The open layers as moves (one layer, or a tied group that moves together), ordered by measured error per unit of
    modelled cost saved, least first."""

    def saving(key: str) -> float:
        layer = trace.layer(key)
        return layer_cost(layer, "fp32", profile) - layer_cost(layer, best[key], profile)

    def sensitivity(key: str) -> float:
        return _estimate(tolerance, probe.get(key, best[key]))

    moves = _groups(trace, list(best))
    moves.sort(key=lambda g: sum(sensitivity(k) for k in g) / max(sum(saving(k) for k in g), 1e-30))
    return tuple(tuple(g) for g in moves)


class _Space:
    """The search space, one integer: ``k`` -> the assignment casting the first ``k`` moves of ``ranked`` (the
    join rule applied, :func:`_joiners`), its modelled step time, and its measured errors.

    Assignments and measurements are kept: each ``k`` is joined and measured once. ``measured`` is the table
    of measurements the study fills (:func:`run_study`, :func:`autoprec.search._split.run_split_study`).
    """

    def __init__(self, trace: Trace, ranked: Ranked, profile: DeviceProfile, measure: Measure) -> None:
        self.moves = ranked.moves
        self._best = ranked.best
        self.edges = StepCost(trace.layers, trace.handoff, profile)
        self.cost_fp32 = sum({lay.key: layer_cost(lay, "fp32", profile) for lay in trace.layers}.values())
        self.measured: dict[int, Result] = {}
        tied = {k for g in trace.tied for k in g}
        self._join = _joiners(trace, {k: v for k, v in ranked.joinable.items() if k not in tied}, self.edges)
        self._pinned = {key: d.precision for key, d in ranked.pinned.items()}
        self._measure = measure
        self._assigned: dict[int, dict[str, str]] = {}

    def assignment(self, k: int) -> dict[str, str]:
        """Layer -> format with the first ``k`` moves cast (a copy: the caller may change it)."""
        if k not in self._assigned:
            chosen = {key: self._best[key] for g in self.moves[:k] for key in g}
            self._assigned[k] = self._join({**self._pinned, **chosen,
                                            **{key: "fp32" for g in self.moves[k:] for key in g}})
        return dict(self._assigned[k])

    def cost(self, k: int) -> float:
        """The modelled step time of :meth:`assignment` ``(k)``, casts priced per edge."""
        return self.edges.total(self.assignment(k))

    def measure(self, k: int) -> Result:
        """One forward+backward under :meth:`assignment` ``(k)`` (not kept: the split study keeps its own)."""
        return self._measure(self.assignment(k))

    def evaluate(self, k: int) -> Result:
        """The measurement of ``k``, kept in :attr:`measured`; ``k = 0`` is FP32 itself: no pass, no error."""
        if k not in self.measured:
            self.measured[k] = self.measure(k) if k > 0 else (0.0, 0.0, True)
        return self.measured[k]


def _study(trace: Trace, probe: Probe, ranked: Ranked, space: _Space, tolerance: Tolerance, *, n_trials: int,
           storage: str | None, seed: int, progress: Callable[[int, int], None] | None, ranks: Ranks | None) -> int:
    """Run the study over ``k`` (split across ``ranks`` of several processes, else Optuna in this one), seeded
    with the greedy guess; its measurements land in ``space.measured``. Returns the number of trials."""
    n = len(ranked.moves)
    greedy = _greedy(probe, ranked, tolerance)

    def feasible(result: Result) -> bool:
        return _feasible(tolerance, result)

    def value(k: int, result: Result) -> float:
        """The objective: the modelled cost of a feasible k, else worse than any feasible one."""
        if feasible(result):
            return space.cost(k)
        # infeasible: worse than any feasible assignment, and worse the further out of bounds
        return space.cost_fp32 * (2.0 + min(tolerance.score(result[0], result[1]), 1e6) if result[2] else 1e7)

    if ranks is not None and ranks.world > 1:
        return run_split_study(n, greedy, space.measure, space.measured, value, feasible,
                               n_trials=n_trials, seed=seed, ranks=ranks, progress=progress)
    name = f"autoprec-{trace.fingerprint}-{_digest(probe, ranked, tolerance, seed)}"
    return run_study(name, n, greedy, space.evaluate, space.measured, value,
                     n_trials=n_trials, storage=storage, seed=seed, progress=progress)


def _feasible(tolerance: Tolerance, result: Result) -> bool:
    """Whether a measured assignment ran finite and within the bound."""
    return result[2] and tolerance.within(result[0], result[1])


def _greedy(probe: Probe, ranked: Ranked, tolerance: Tolerance) -> int:
    """The study's first guess: the most moves whose errors, added in quadrature (independent roundings add
    roughly so), stay within the bound."""
    acc, greedy = 0.0, 0
    for i, g in enumerate(ranked.moves):
        acc += sum(_estimate(tolerance, probe.get(k, ranked.best[k])) for k in g) ** 2
        if math.sqrt(acc) <= 1.0:
            greedy = i + 1
    return greedy


def _digest(probe: Probe, ranked: Ranked, tolerance: Tolerance, seed: int) -> str:
    """The stored study's key, 12 hex digits. A stored study is reused only for the same model, batch and loss
    (their FP32 loss and gradients), open layers, formats, bound and seed: anything else would hand back
    measurements of another problem."""
    h = hashlib.sha256(repr((probe.ref_loss, [(k, ranked.best[k]) for k in ranked.order], probe.formats, tolerance,
                             seed, sorted(ranked.joinable.items()))).encode())
    if probe.reference:  # the FP32 gradients pin model, batch and loss
        h.update(grad_fingerprint(probe.reference[1]))
    return h.hexdigest()[:12]


#: gradient elements each gradient's fingerprint samples, evenly spaced
FINGERPRINT_SAMPLES = 1024


def grad_fingerprint(grads: Sequence[torch.Tensor | None]) -> bytes:
    """Bytes that pin a set of gradients, computed on their device and copied to the host once: per gradient its
    size, its sum and its L2 norm (in FP64) and up to :data:`FINGERPRINT_SAMPLES` evenly spaced elements. A few
    kB whatever the model's size, where the gradients themselves are its parameters' size; any dtype (BF16 too).

    Example:
        >>> a = grad_fingerprint([torch.ones(4096), None])
        >>> a == grad_fingerprint([torch.ones(4096)]), a == grad_fingerprint([torch.ones(4096).bfloat16()])
        (True, True)
        >>> b = torch.ones(4096); b[7] = 2.0  # between the samples: the sum sees it
        >>> a == grad_fingerprint([b])
        False
    """
    rows = []
    for g in grads:
        if g is None:
            continue
        flat = g.detach().reshape(-1)
        step = max(1, -(-flat.numel() // FINGERPRINT_SAMPLES))
        stats = torch.stack([torch.sum(flat, dtype=torch.float64),
                             torch.linalg.vector_norm(flat, dtype=torch.float64),
                             torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device)])
        rows.append(torch.cat([stats, flat[::step].to(torch.float64)]))
    return torch.cat(rows).cpu().numpy().tobytes() if rows else b""


def _pick(space: _Space, tolerance: Tolerance) -> tuple[int, list[int], dict[str, str]]:
    """The chosen ``k``: the cheapest measured within the bound (the larger on a tie; 0, FP32, where none is),
    the ``k`` measured within the bound, and the runner-up's assignment (``{}`` where there is none)."""
    passed = [k for k, result in space.measured.items() if _feasible(tolerance, result)]
    by_cost = sorted(passed, key=lambda k: (space.cost(k), -k))
    k_best = by_cost[0] if passed else 0
    runner_up = space.assignment(by_cost[1]) if len(by_cost) > 1 else {}
    return k_best, passed, runner_up


def _estimate(tolerance: Tolerance, m: Measurement) -> float:
    """A layer's own error as a fraction of the bound: a role's group figure shared out in quadrature.

    The greedy guess adds the layers' errors in quadrature; a group of ``n`` members measured at
    ``s`` is what ``n`` members of ``s / sqrt(n)`` each add up to, so ordering and guess do not
    count the group's error ``n`` times. (Whether a format is allowed at all uses the bound itself.)
    """
    return tolerance.score(m.loss_err, m.grad_err) / math.sqrt(m.members)


def _underflow(probe: Probe, rng: Ranges | None, fmt: str) -> float:
    """Largest fraction of a layer's nonzero outputs or gradients that flush to zero in ``fmt``."""
    if rng is None:
        return 0.0
    half = info(fmt).subnormal / 2
    scale = probe.loss_scale if fmt == "fp16" else 1.0
    return max(rng.below(half), rng.below(half, grads=True, scale=scale))


def _usable(trace: Trace, probe: Probe, profile: DeviceProfile, tol: Tolerance, headroom: float,
            key: str, unsafe: dict[str, dict[str, str]]) -> tuple[list[str], str, Decision | None, list[str]]:
    """Formats ``key`` may use and why the others were refused, or the decision pinning it to FP32;
    and the formats refused only because the layer alone is not faster in them (it may still join
    neighbours in such a format: see :func:`_joiners`). The formats it fails in for a numerical
    reason go into ``unsafe`` (format -> layer -> ``"reason: detail"``)."""
    layer = trace.layer(key)
    if key in probe.skipped:
        return [], "", Decision(key, "fp32", "no gain", f"{probe.skipped[key]}; "
                                                    f"{cost_note(layer, probe.formats, profile)}"), list(probe.formats)
    ok, failures, slower = [], [], []
    for fmt in probe.formats:
        m = probe.get(key, fmt)
        if m is None:
            continue
        failure = _refusal(layer, fmt, m, probe, profile, tol, headroom)
        if failure is None:
            ok.append(fmt)
            continue
        failures.append(failure)
        if failure[0] == 9 and not m.full_width:  # "no gain" not for computing in FP32 itself: not faster alone
            slower.append(fmt)
    failures.sort()
    for rank, fmt, why, text in failures:
        if rank < 9:  # a numerical failure, not "no gain"
            unsafe.setdefault(fmt, {})[key] = f"{why}: {text}"
    refused = "; ".join(f[3] for f in failures)
    if ok:
        return ok, refused, None, []
    if not failures:
        return [], "", Decision(key, "fp32", "no gain", "no 16-bit format probed; "
                                                        f"{cost_note(layer, probe.formats, profile)}"), []
    reason = failures[0][2]
    hazard = ", ".join(layer.hazards)
    detail = f"[{hazard}] {refused}" if hazard else refused
    return [], refused, Decision(key, "fp32", reason, detail, excluded=reason != "no gain"), slower


def _refusal(layer: Layer, fmt: str, m: Measurement, probe: Probe, profile: DeviceProfile, tol: Tolerance,
             headroom: float) -> tuple[int, str, str, str] | None:
    """Why ``layer`` may not run in ``fmt`` as ``(rank, fmt, reason, detail)``, rank below 9 for a numerical
    failure (the lowest names the layer's reason) and 9 for no gain; ``None`` where it may."""
    rng = probe.ranges.get(layer.key)
    if m.error is not None:
        return (0, fmt, "cannot run", f"{fmt}: {m.error}")
    if m.nonfinite > (rng.nonfinite if rng else 0) or not m.finite:
        what = f"{m.nonfinite} non-finite outputs" if m.nonfinite else "non-finite loss/gradients"
        if rng is not None and rng.nonfinite:
            what += f" (FP32: {rng.nonfinite})"
        return (1, fmt, "overflow", f"{fmt}: {what} (FP32 |out| max {rng.out_absmax:.4g})" if rng else f"{fmt}: {what}")
    if rng is not None and rng.out_absmax * headroom > info(fmt).max:
        return (2, fmt, "range", (f"{fmt}: FP32 |out| max {rng.out_absmax:.4g} x headroom "
                                  f"{headroom:g} exceeds {info(fmt).max:.4g}"))
    if m.amp > tol.grad:  # its rounding grows in an op it feeds: the tuning batch's error says little
        return (3, fmt, "amplified", f"{fmt}: {m.amplified()} > bound {tol.grad:g}")
    if m.loss_err > tol.loss or m.grad_err > tol.grad:
        what = "error at loss" if m.loss_err > tol.loss else "error at gradients"
        bound = tol.loss if m.loss_err > tol.loss else tol.grad
        lost = _underflow(probe, rng, fmt)
        if lost >= 0.01:  # the error comes with values flushed to zero: name the cause
            what = "underflow"
        note = f", {100 * lost:.1f}% of its values flush to zero" if lost else ""
        return (3, fmt, what, f"{fmt}: {fmt_err(m)} > bound {bound:g}{note}")
    if m.full_width:
        return (9, fmt, "no gain", (f"{fmt}: it computes in FP32 itself in a {fmt} region (its output "
                                    "comes back FP32, or torch runs it on a kernel that computes "
                                    "16-bit inputs in FP32): 16-bit would only add casts; "
                                    f"{cost_note(layer, (fmt,), profile)}"))
    if layer_cost(layer, fmt, profile) >= layer_cost(layer, "fp32", profile):  # never chosen for speed where not faster
        return (9, fmt, "no gain", f"{fmt}: not faster: {cost_note(layer, (fmt,), profile)}")
    return None


def run_study(name: str, n: int, greedy: int, evaluate: Callable[[int], tuple[float, float, bool]],
               cache: dict[int, tuple[float, float, bool]],
               value: Callable[[int, tuple[float, float, bool]], float], *, n_trials: int, storage: str | None,
               seed: int, progress: Callable[[int, int], None] | None) -> int:
    """TPE over k in [0, n], seeded with the greedy guess; returns the number of trials in the study.

    A study resumed from ``storage`` hands its finished trials' measurements to ``cache``. Optuna's
    log level is the caller's again afterwards.
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed),
                                    storage=open_storage(storage), study_name=name,
                                    load_if_exists=storage is not None)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        for t in done:  # a resumed study: reuse what its finished trials measured
            if "loss_err" in t.user_attrs:
                cache[int(t.params["k"])] = (t.user_attrs["loss_err"], t.user_attrs["grad_err"],
                                             t.user_attrs["finite"])
        if not done:
            for guess in dict.fromkeys([greedy, n]):
                study.enqueue_trial({"k": guess})
        budget = max(0, min(n_trials, n + 1) - len(done))
        if progress is not None:  # the plan, before the first trial
            progress(len(done), budget + len(done))

        def objective(trial: "optuna.Trial") -> float:
            k = trial.suggest_int("k", 0, n)
            result = evaluate(k)
            trial.set_user_attr("loss_err", result[0])
            trial.set_user_attr("grad_err", result[1])
            trial.set_user_attr("finite", result[2])
            if progress is not None:
                progress(len(study.trials), budget + len(done))
            return value(k, result)

        if budget:
            study.optimize(objective, n_trials=budget, gc_after_trial=False)
        return len(study.trials)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _tie(trace: Trace, decisions: dict[str, Decision], usable: dict[str, list[str]],
         best_fmt: dict[str, str]) -> None:
    """Layers sharing a parameter share one decision: one format that all of them can use."""
    for group in trace.tied:
        open_members = [k for k in group if k in usable]
        if not open_members:
            continue
        common = set.intersection(*(set(usable[k]) for k in open_members))
        heavy = max(open_members, key=lambda k: trace.layer(k).flops)
        pinned = [k for k in group if k in decisions and decisions[k].excluded]
        if pinned or not common:
            why = (f"shares a parameter with {', '.join(pinned)}, which must stay FP32" if pinned
                   else "the layers sharing its parameter have no 16-bit format in common")
            for k in open_members:
                usable.pop(k)
                best_fmt.pop(k)
                decisions[k] = Decision(k, "fp32", "tied weights", why, excluded=True)
            continue
        fmt = best_fmt[heavy] if best_fmt[heavy] in common else sorted(common)[0]
        for k in open_members:
            best_fmt[k] = fmt


def _joiners(trace: Trace, candidates: Mapping[str, Sequence[str]],
             edges: StepCost) -> Callable[[dict[str, str]], dict[str, str]]:
    """The rule that moves cheap layers into their neighbours' format where the edges' casts pay for it.

    ``candidates``: layer -> the 16-bit formats the probe allows it (or, never probed alone, that it
    may follow) although it is not faster in them alone. Moves, each taken only where it makes the
    modelled step time strictly smaller (so that this ends), repeated until none is left:

    * a *run* of candidates that hand over to each other (a norm, then an activation) takes a format
      of the layers around it, each member that may (one cheap layer alone between a 16-bit layer
      and another cheap layer gains nothing: the cast just moves);
    * then each candidate in execution order takes FP32 or a format one of its neighbours runs in,
      whichever gives it and the layers it feeds the least modelled time (:meth:`StepCost.local`).
    """
    order = [lay.key for lay in trace.layers if lay.key in candidates]
    runs = _runs(order, edges)

    def around(members: Sequence[str], a: Mapping[str, str]) -> set[str]:
        inside = set(members)
        return {a.get(n, "fp32") for k in members for n in (*edges.producers.get(k, ()), *edges.consumers.get(k, ()))
                if n not in inside}

    def priced(members: Sequence[str], a: Mapping[str, str]) -> float:
        touched = dict.fromkeys([*members, *(c for k in members for c in edges.consumers.get(k, ()))])
        return sum(edges.of(k, a) for k in touched)

    def apply(assignment: dict[str, str]) -> dict[str, str]:
        out = dict(assignment)
        for _ in range(8):
            changed = False
            for run in runs:
                best, best_cost = {k: out.get(k, "fp32") for k in run}, priced(run, out)
                for fmt in sorted(around(run, out) | {"fp32"}):
                    trial = {**out, **{k: fmt for k in run if fmt == "fp32" or fmt in candidates[k]}}
                    cost = priced(run, trial)
                    if cost < best_cost * (1 - 1e-9):
                        best, best_cost = {k: trial[k] for k in run}, cost
                changed |= any(out.get(k, "fp32") != f for k, f in best.items())
                out.update(best)
            for key in order:
                current = out.get(key, "fp32")
                best, best_cost = current, edges.local(key, out)
                for fmt in ["fp32", *(f for f in candidates[key] if f in around([key], out))]:
                    if fmt == current:
                        continue
                    out[key] = fmt
                    cost = edges.local(key, out)
                    if cost < best_cost * (1 - 1e-9):
                        best, best_cost = fmt, cost
                out[key] = best
                changed |= best != current
            if not changed:
                break
        return out

    return apply


def _runs(order: Sequence[str], edges: StepCost) -> list[list[str]]:
    """The candidates connected by handoff edges among themselves, groups of two or more, in execution order."""
    inside = set(order)
    parent = {k: k for k in order}

    def root(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for k in order:
        for c in edges.consumers.get(k, ()):
            if c in inside:
                parent[root(c)] = root(k)
    groups: dict[str, list[str]] = {}
    for k in order:
        groups.setdefault(root(k), []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def _groups(trace: Trace, open_keys: Sequence[str]) -> list[list[str]]:
    """Open layers as moves: a tied group is one move."""
    seen: set[str] = set()
    out = []
    tied = {k: g for g in trace.tied for k in g}
    for key in open_keys:
        if key in seen:
            continue
        members = [k for k in tied.get(key, (key,)) if k in open_keys]
        seen.update(members)
        out.append(members)
    return out
