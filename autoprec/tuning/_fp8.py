"""Stage: FP8 for the GEMMs of Linears, after the 16-bit search (``tune(..., dtypes=["bf16", "fp8"])``).

The rule, and its defaults:

1. **Candidates**: the ``nn.Linear`` layers the 16-bit decisions put in BF16, both dimensions multiples of 16
   (``torch._scaled_mm``'s requirement, the one torchao's filters check).
2. **Cost**: FP8 must be priced faster than BF16 at the step the policy is priced at (its three GEMMs at the
   profile's FP8 rate plus the recipe's casts, :func:`autoprec.device.fp8_price`); else the layer stays BF16,
   "no gain".
3. **Each layer alone**: torchao's recipes in the order of their speed (``tensorwise``, ``rowwise``,
   ``rowwise_with_gw_hp``); the layer gets the first that pays and whose error over the BF16 policy is inside
   torchao's own test thresholds: output SQNR >= 18 dB, weight-gradient SQNR >= 17 dB
   (:meth:`autoprec.probe.Fp8Error.judge`). One pass per recipe tried, the rest of the model in its policy.
4. **Held out**: each chosen layer is judged again, as it was chosen (its role together), on the first batch of
   ``tune``'s ``held_out`` data; one that fails there stays BF16.
5. **Together**: with every passing layer in FP8 at once, the loss may move by at most ``tune``'s ``tolerance``
   from the BF16 policy's, on the tuning batch and on held-out data (``tune``'s ``held_out``: its first batch)
   alike; while not, the layer with the lowest output SQNR alone goes back to BF16. FP8's errors add up over
   layers: each one passing alone is not enough. Gradients are bounded per layer (3.), not jointly: with many FP8
   layers each one's gradient carries the others' errors too, and its SQNR falls below torchao's one-layer bound
   while training is unharmed; ``policy.stats["fp8"]`` reports the whole gradient's SQNR.
6. **Verification** trains the policy, FP8 layers included, against FP32 (:mod:`autoprec.verify`); a failing
   round moves every FP8 layer back to BF16 first.

Beside the tuned choice, torchao's default (every Linear) and torchtitan's filter (not the output head nor the
router, torchao's auto filter by shape) are measured on the same batch, one pass each, and priced the same way:
``policy.stats["fp8"]``, which the report shows side by side.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core._fp8 import FP8_RECIPES
from ..core._modules import canonical_modules
from ..device._costs import DeviceProfile
from ..device._fp8_costs import Fp8Price, fp8_price
from ..probe._fp8 import Fp8Error, Fp8Verdict, sqnr
from ..probe._roles import probe_groups, roles
from ..search._records import Decision
from ._stages import Choice, Searched, step_seconds

__all__ = ["FORWARD_DB", "WEIGHT_GRAD_DB", "Fp8Stage", "fp8_stage", "hand_filters"]

log = logging.getLogger("autoprec.tune")

#: torchao's thresholds for one Float8Linear (``test/float8/test_base.py``)
FORWARD_DB, WEIGHT_GRAD_DB = 18.0, 17.0
#: torchtitan's FQN filter for Llama (``torchtitan/components/quantization``): the output head and the router
TITAN_SKIP = ("output", "lm_head", "router.gate")


@dataclasses.dataclass(frozen=True)
class Fp8Stage:
    """What the FP8 stage decided and measured: per Linear its figures (``figures[key]["fp8"]``), the passes
    run, and the side-by-side assignments (name -> Linears in FP8, modelled step over FP32, loss change)."""

    figures: dict[str, dict[str, dict[str, float]]]
    passes: int
    compared: dict[str, dict[str, Any]]


class _Taps:
    """A runtime watcher keeping the raw outputs of some layers (the FP8 candidates)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = frozenset(keys)
        self.outs: dict[str, list[torch.Tensor]] = {}

    def enter(self, key: str, kind: str, inputs: tuple) -> None:
        pass

    def exit(self, key: str, kind: str, raw: Any, final: Any) -> None:
        if key in self.keys and isinstance(raw, torch.Tensor):
            self.outs.setdefault(key, []).append(raw.detach().float().reshape(-1))

    def out(self, key: str) -> torch.Tensor | None:
        got = self.outs.get(key)
        return torch.cat(got) if got else None


@dataclasses.dataclass
class _Pass:
    loss: float
    outs: _Taps
    grads: list[torch.Tensor | None]


def _flat(grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    return torch.cat([g.detach().double().reshape(-1) for g in grads if g is not None])


class _Measure:
    """Passes of the tuning batch with some Linears in FP8 on top of the BF16 decisions, against those decisions."""

    def __init__(self, s: Searched, assignment: Mapping[str, str], keys: Sequence[str], batch: Any = None,
                 name: str = "") -> None:
        self.runner = s.reference.runner
        self.batch = s.reference.batch if batch is None else batch
        self.name = name  # "" for the tuning batch, else what the batch is ("held-out")
        self.assignment = dict(assignment)
        self.weight = {id(p): i for i, p in enumerate(self.runner.params)}
        self.passes = 0
        self.ref = self.run({}, keys)

    def run(self, recipes: Mapping[str, str], keys: Sequence[str] | None = None) -> _Pass:
        """One pass with ``recipes``' Linears in FP8, keeping the outputs of ``keys`` (default: those Linears)."""
        taps = _Taps(list(recipes) if keys is None else keys)
        assignment = {**self.assignment, **{k: "fp8" for k in recipes}}
        loss, grads = self.runner.run(self.batch, assignment, watcher=taps, recipes=dict(recipes))
        self.passes += 1
        return _Pass(float(loss), taps, [g.detach().clone() if g is not None else None for g in grads])

    def judged(self, key: str, recipe: str, got: _Pass, module: nn.Linear) -> tuple[Fp8Error, Fp8Verdict]:
        """Layer ``key``'s FP8 error in ``got`` against the BF16 policy's pass, and its verdict on torchao's bounds."""
        ref_out, out = self.ref.outs.out(key), got.outs.out(key)
        i = self.weight.get(id(module.weight))
        wgrad = None if i is None or self.ref.grads[i] is None else sqnr(self.ref.grads[i], got.grads[i])
        err = Fp8Error(path=key, recipe=recipe, forward_db=sqnr(ref_out, out) if ref_out is not None else math.inf,
                       weight_grad_db=wgrad, input_grad_db=None, loss_rel=self.loss_rel(got), seconds=0.0)
        return err, err.judge(forward_db=FORWARD_DB, weight_grad_db=WEIGHT_GRAD_DB)

    def loss_rel(self, got: _Pass) -> float:
        return abs(got.loss - self.ref.loss) / max(abs(self.ref.loss), 1e-30)

    def grad_db(self, got: _Pass) -> float:
        return sqnr(_flat(self.ref.grads), _flat(got.grads))


def _linears(s: Searched, keys: Sequence[str]) -> dict[str, nn.Linear]:
    mods = canonical_modules(s.work)  # the trace's names: without the wrappers' prefixes
    return {k: mods[k] for k in keys if isinstance(mods.get(k), nn.Linear)}


def _fits(m: nn.Linear) -> bool:
    return m.in_features % 16 == 0 and m.out_features % 16 == 0


def hand_filters(linears: Mapping[str, nn.Linear], recipe: str = "tensorwise") -> dict[str, list[str]]:
    """The Linears FP8 by hand filters: torchao's default (every one that fits) and torchtitan's (not the output
    head nor the router, and torchao's auto filter by shape, ``_auto_filter_for_recipe``).

    Example:
        >>> ls = {"h.0.fc": nn.Linear(4096, 4096), "lm_head": nn.Linear(4096, 32000), "tiny": nn.Linear(64, 64)}
        >>> f = hand_filters(ls)
        >>> f["torchao default"], f["torchtitan filter"]
        (['h.0.fc', 'lm_head', 'tiny'], ['h.0.fc'])
    """
    # torchao's own filter, not a copy
    from torchao.float8 import _auto_filter_for_recipe

    auto = _auto_filter_for_recipe(recipe, filter_fqns=list(TITAN_SKIP))
    fits = {k: m for k, m in linears.items() if _fits(m)}
    return {"torchao default": list(fits), "torchtitan filter": [k for k, m in fits.items() if auto(m, k)]}


def _figures(err: Fp8Error | None, price: Fp8Price, passed: bool) -> dict[str, float]:
    """A Linear's FP8 figures as the policy keeps them (``measured["fp8"]``: numbers only; FP8 that cannot run: -1)."""
    out = {"bf16_seconds": price.bf16, "fp8_seconds": price.fp8 if math.isfinite(price.fp8) else -1.0,
           "pays": float(price.pays), "passed": float(passed)}
    if err is not None:
        out.update(forward_db=err.forward_db, loss_rel=err.loss_rel)
        if err.weight_grad_db is not None:
            out["weight_grad_db"] = err.weight_grad_db
    return out


@dataclasses.dataclass
class _Outcome:
    """One candidate's FP8 result so far: its recipe (None: stays BF16), its last measured error, and why."""

    recipe: str | None
    err: Fp8Error | None
    why: str


def _decide(m: _Measure, members: Sequence[str], modules: Mapping[str, nn.Linear],
            prices: Mapping[str, Mapping[str, Fp8Price]]) -> dict[str, _Outcome]:
    """Each member's first recipe (fastest first) that pays and passes. A role's members are measured together, one
    pass per recipe (their figures then bound each one's own: a member downstream of another sees both errors);
    a member that fails there, where a role has several, is measured alone before it is given up."""
    out = {k: _Outcome(None, None, prices[k][FP8_RECIPES[0]].note) for k in members}
    left = list(members)
    for recipe in FP8_RECIPES:
        paying = [k for k in left if prices[k][recipe].pays]
        if not paying:
            continue
        got = m.run(dict.fromkeys(paying, recipe))
        for k in paying:
            err, verdict = m.judged(k, recipe, got, modules[k])
            out[k] = _Outcome(recipe if verdict.passed else None, err,
                              verdict.reason if verdict.passed else "error: " + verdict.reason)
        left = [k for k in left if out[k].recipe is None]
    if len(members) > 1:
        for k in [k for k in left if out[k].err is not None]:
            out[k] = _decide(m, [k], modules, prices)[k]
    return out


def _holds(m: _Measure, chosen: Mapping[str, str], tolerance: float) -> str | None:
    """Why the chosen FP8 layers together do not hold on ``m``'s batch (the loss moved past ``tolerance`` from the
    BF16 policy's), or None where they hold."""
    got = m.run(chosen, keys=())
    loss_rel = m.loss_rel(got)
    if loss_rel <= tolerance:
        return None
    on = f" on the {m.name} batch" if m.name else ""
    return f"with {len(chosen)} FP8 layers the loss moved {loss_rel:.2e}{on} (bound {tolerance:.2e})"


def _together(measures: Sequence[_Measure], chosen: dict[str, str], errors: Mapping[str, Fp8Error],
              tolerance: float) -> list[tuple[str, str]]:
    """Give layers back to BF16, the lowest output SQNR alone first, until the chosen FP8 layers together hold on
    every batch of ``measures`` (the tuning batch, then held-out data): (layer, why) of those given back."""
    notes = []
    while chosen:
        why = next((w for w in (_holds(m, chosen, tolerance) for m in measures) if w is not None), None)
        if why is None:
            break
        worst = min(chosen, key=lambda k: errors[k].forward_db)
        del chosen[worst]
        notes.append((worst, f"{worst}: back to BF16, {why}"))
    return notes


def _recheck(m: _Measure, groups: Sequence[Sequence[str]], chosen: dict[str, str],
             modules: Mapping[str, nn.Linear]) -> list[tuple[str, str]]:
    """Each chosen layer judged again on ``m``'s batch (held-out data) as it was chosen: its role's chosen members in
    FP8 together, one pass per role; (layer, why) of those that fail there, taken out of ``chosen``."""
    notes = []
    for members in groups:
        mine = {k: chosen[k] for k in members if k in chosen}
        if not mine:
            continue
        got = m.run(mine)
        for key, recipe in mine.items():
            verdict = m.judged(key, recipe, got, modules[key])[1]
            if not verdict.passed:
                del chosen[key]
                notes.append((key, f"{verdict.reason} on the {m.name} batch"))
    return notes


def _groups(s: Searched, keys: Sequence[str]) -> list[tuple[str, ...]]:
    """The candidates as measured: the roles of repeated blocks (``share_roles``) as one group each, else alone."""
    groups = roles(s.tr, keys) if s.opts.share_roles else {}
    return [members for _, members in probe_groups(list(keys), groups)]


def fp8_stage(s: Searched, choice: Choice, profile: DeviceProfile, held: Sequence[Any] = ()
              ) -> tuple[Choice, Fp8Stage]:
    """FP8 for the BF16 Linears that pay and measure safe (the module's rule): the new choice, and the figures.
    ``held``: batches the decisions were not made on; the gate of all FP8 layers together holds on the first too."""
    bf16 = [k for k, d in choice.decisions.items() if d.precision == "bf16" and "::" not in k]
    every = _linears(s, [lay.key for lay in s.tr.layers if lay.kind == "module"])
    candidates = {k: lin for k, lin in _linears(s, bf16).items() if _fits(lin)}
    groups = _groups(s, list(candidates))
    s.bar.stage("fp8", 4 + len(groups))
    m = _Measure(s, {k: d.precision for k, d in choice.decisions.items()}, list(candidates))
    prices = {k: {r: fp8_price(s.priced.layer(k), profile, r) for r in FP8_RECIPES} for k in candidates}
    outcomes: dict[str, _Outcome] = {}
    for members in groups:
        outcomes.update(_decide(m, members, candidates, prices))
        s.bar.advance()
    chosen = {k: o.recipe for k, o in outcomes.items() if o.recipe is not None}
    measures = [m]
    if held and chosen:  # lazily: its BF16 reference pass only where there is something to check
        measures.append(_Measure(s, m.assignment, list(chosen), batch=held[0], name="held-out"))
        for key, note in _recheck(measures[1], groups, chosen, candidates):
            outcomes[key] = _Outcome(None, outcomes[key].err, "error: " + note)
    for key, note in _together(measures, chosen, {k: outcomes[k].err for k in chosen}, s.opts.tol.loss):
        outcomes[key] = _Outcome(None, outcomes[key].err, "error: " + note)
    figures = {k: {"fp8": _figures(o.err, prices[k][o.recipe or FP8_RECIPES[0]], o.recipe is not None)}
               for k, o in outcomes.items()}
    decisions = dict(choice.decisions)
    for key, o in outcomes.items():
        d = decisions[key]
        done = f"fp8 ({o.recipe}): {o.why}" if o.recipe else f"stays bf16, fp8 {o.why}"
        decisions[key] = dataclasses.replace(d, precision="fp8" if o.recipe else d.precision, recipe=o.recipe or "",
                                             detail=f"{d.detail}; {done}".lstrip("; "))
    compared = _compare(s, m, every, chosen, profile, decisions)
    passes = sum(x.passes for x in measures)
    log.info("fp8: %d of %d BF16 Linears in FP8 (%d passes)", len(chosen), len(candidates), passes)
    return dataclasses.replace(choice, decisions=decisions), Fp8Stage(figures, passes, compared)


def _compare(s: Searched, m: _Measure, every: Mapping[str, nn.Linear], chosen: Mapping[str, str],
             profile: DeviceProfile, decisions: Mapping[str, Decision]) -> dict[str, dict[str, Any]]:
    """torchao's default, torchtitan's filter and the tuned choice on the same batch: Linears in FP8, the share of
    the Linears' FLOPs, the modelled step over FP32's, the loss's change from the BF16 policy (one pass each)."""
    hands = hand_filters(every)
    base = {k: d.precision for k, d in decisions.items()}
    base.update({k: "bf16" for k in chosen})
    flops = {k: s.priced.layer(k).flops for k in every}
    total = sum(flops.values()) or 1
    cost_fp32 = s.result.cost_fp32 or 1.0
    out = {}
    assignments = [(n, dict.fromkeys(keys, "tensorwise")) for n, keys in hands.items()] + [("tuned", dict(chosen))]
    for name, recipes in assignments:
        got = m.run(recipes, keys=()) if recipes else m.ref
        out[name] = {"fp8_layers": sorted(recipes), "fp8_flops": sum(flops[k] for k in recipes) / total,
                     "modelled_ratio": round(step_seconds(s.priced, profile, base, recipes) / cost_fp32, 4),
                     "loss_rel": m.loss_rel(got), "grad_db": m.grad_db(got) if recipes else math.inf}
        s.bar.advance()
    return out

