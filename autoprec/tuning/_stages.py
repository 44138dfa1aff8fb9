"""The stages of ``autoprec.tune`` after its checks, each a function: trace, probe, search, step timing,
held-out check, reference run, loss scaler, verification, retiming, and the stats.

:func:`autoprec.tuning._tune._tune` calls them in order. What they share after the search is a
:class:`Searched`; what the later stages change (the decisions, their order, the measured errors) is
a :class:`Choice` each returns anew.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core._batch import LossFn
from ..core._modules import canonical_modules
from ..device._calibration import with_layers
from ..device._costs import DeviceProfile, StepCost, format_speed
from ..device._fp8_costs import fp8_price
from ..distributed._ranks import Ranks
from ..errors import DeviceWarning
from ..policy._policy import HeldOut, LayerEntry, Policy, ScalerSettings, StepSpeed, Verification
from ..probe._probe import evidence, probe
from ..probe._records import Probe
from ..probe._reductions import relative_errors
from ..probe._roles import Sharing, probe_groups, role_of, roles, unrun_units
from ..probe._runner import Runner
from ..probe._snapshot import Snapshot, park, unpark
from ..probe._training import Trajectory, train_curve
from ..report._speed_lines import first_failure, modelled_record, profile_label, unproven
from ..search._loss_scale import ScalerChoice, search_scaler
from ..search._records import Decision
from ..search._search import SearchResult, search
from ..trace._rescale import fewer_rows, rescaled
from ..trace._trace import Trace, trace
from ..verify._held_out import Split
from ..verify._held_out import check as check_held_out
from ..verify._step_speed import Race, adopt, blanket, measured_record, race, retime
from ..verify._verify import check_reference, nothing_cast, verify
from ._options import Passes, TuneOptions, TuneStats
from ._progress import Progress

__all__ = [
    "Choice",
    "Reference",
    "Searched",
    "agree_inputs",
    "bf16_fallback",
    "held_out_stage",
    "layer_timings",
    "modelled",
    "priced_trace",
    "probe_stage",
    "race_stage",
    "reference_stage",
    "retime_stage",
    "scaler_stage",
    "search_stage",
    "speed_record",
    "trace_stage",
    "tune_stats",
    "verify_stage",
    "warn_launch_bound",
]


class Reference:
    """The FP32 reference of the tuning batch, and a policy's errors against it, measured like the search's trials.

    Its gradients can be parked off the device (:func:`autoprec.probe._snapshot.park`) while training runs
    hold gradients and optimizer state, and taken back when a backed-off policy must be measured again.
    """

    def __init__(self, runner: Runner, batch: Any, loss_scale: float, loss: Any, grads: Any) -> None:
        self.runner, self.batch, self.loss_scale, self.loss = runner, batch, loss_scale, loss
        self._ref: dict[str, Any] = {"grads": grads}  # after the search, the reference gradients live here alone
        self._parked: list[Any] = []

    def measure(self, assignment: Mapping[str, str], scale: float | None = None) -> tuple[float, float, bool]:
        """The loss error, gradient error and finiteness of ``assignment`` on the tuning batch."""
        fp16 = "fp16" in assignment.values()
        s = (scale or self.loss_scale) if fp16 else 1.0
        loss, grads = self.runner.run(self.batch, dict(assignment), scale=s)
        return relative_errors(loss, grads, self.loss, self._ref["grads"], reuse=True)

    def hold_off(self) -> None:
        """Park the reference gradients off the device (once: a second call while parked does nothing)."""
        if not self._parked:
            self._parked.append(park(self._ref))

    def take_back(self) -> None:
        """Bring the parked reference gradients back, for :meth:`measure`."""
        self._ref["grads"] = unpark(self._parked.pop())


@dataclass(frozen=True)
class Choice:
    """The decisions a stage leaves: per layer, the order verification backs off in, the errors measured."""

    decisions: dict[str, Decision]
    order: tuple[str, ...]
    measured: tuple[float, float]  # loss and gradient error on the tuning batch


@dataclass(frozen=True)
class Searched:
    """What the stages after the search share."""

    work: nn.Module
    full: list[Any]                 # every batch tune was given: the training runs train on all
    loss_fn: LossFn | None
    opts: TuneOptions
    tr: Trace
    pr: Probe                       # without its reference: that lives in ``reference``
    result: SearchResult
    reference: Reference
    ranks: Ranks
    bar: Progress
    snapshot: Snapshot
    priced: Trace                   # the trace the costs are priced at: ``tr`` itself, or at train_batch_size
    fp8_figures: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # Linear -> {"fp8": figures}

    def policy(self, decisions: Mapping[str, Decision], scaler: ScalerSettings | None) -> Policy:
        """The policy of ``decisions`` (with ``scaler`` where a layer runs in FP16)."""
        layers = {}
        for lay in self.tr.layers:
            d = decisions[lay.key]
            rng = self.pr.ranges.get(lay.key)
            layers[lay.key] = LayerEntry(precision=d.precision, reason=d.reason, detail=d.detail,
                                         excluded=d.excluded, kind=lay.kind, op=lay.op, hazards=lay.hazards,
                                         flops=lay.flops, out_absmax=rng.out_absmax if rng else 0.0,
                                         grad_absmax=rng.grad_absmax if rng else 0.0,
                                         measured={**evidence(self.pr, lay.key), **self.fp8_figures.get(lay.key, {})},
                                         recipe=d.recipe)
        layers.update(unrun_entries(self.tr, decisions))
        fp16_used = any(d.precision == "fp16" for d in decisions.values())
        o, tr = self.opts, self.tr
        return Policy(layers=layers, target=o.target, modules=dict(tr.signatures), opaque=dict(tr.opaque),
                      handoff=dict(tr.handoff), unseen=dict(tr.unseen), formats=o.formats + (("fp8",) if o.fp8 else ()),
                      scaler=scaler if fp16_used else None,
                      tolerance={"loss": o.tol.loss, "grad": o.tol.grad, "verify": o.verify_tolerance},
                      emulated=o.emulated)


def unrun_entries(tr: Trace, decisions: Mapping[str, Decision]) -> dict[str, LayerEntry]:
    """Policy entries for the unit modules with parameters the tuning batch never called (an expert routed no
    token): the format the members of its role that ran all got, where they agree on one and none of them was
    kept FP32 for a measured reason; FP32 otherwise. Either way the entry's detail says it was not run, so a
    later batch that does call it runs it in a stated format, not in whatever precision flows in.

    Example:
        >>> import torch
        >>> from autoprec.search._records import Decision
        >>> class Two(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
        ...     def forward(self, x):
        ...         return self.experts[0](x)
        >>> tr = trace(Two(), torch.ones(2, 4), device_type="cpu")
        >>> e = unrun_entries(tr, {"experts.0": Decision("experts.0", "bf16", "cast")})["experts.1"]
        >>> e.precision, e.reason, e.detail
        ('bf16', 'cast', 'not run by the tuning batch: the format of role experts.* (1 member ran: experts.0)')
    """
    out = {}
    for unit, ran in unrun_units(tr).items():
        formats = {decisions[k].precision for k in ran if k in decisions}
        excluded = any(decisions[k].excluded for k in ran if k in decisions)
        if len(formats) == 1 and not excluded:
            members = f"{len(ran)} member{'s' if len(ran) > 1 else ''} ran: {', '.join(ran[:3])}"
            members += ", ..." if len(ran) > 3 else ""
            fmt = formats.pop()
            recipes = {decisions[k].recipe for k in ran if k in decisions}
            fmt = "bf16" if fmt == "fp8" and len(recipes) != 1 else fmt  # FP8 members that differ: their region's
            entry = LayerEntry(precision=fmt, reason="cast" if fmt != "fp32" else "not run",
                               recipe=recipes.pop() if fmt == "fp8" else "",
                               detail=f"not run by the tuning batch: the format of role {role_of(unit)} ({members})")
        else:
            why = "no member of its role ran" if not ran else "the members of its role that ran differ"
            entry = LayerEntry(precision="fp32", reason="not run",
                               detail=f"not run by the tuning batch, and {why}: FP32")
        out[unit] = dataclasses.replace(entry, kind="module", op=tr.signatures[unit].split("[", 1)[0])
    return out


def trace_stage(work: nn.Module, batch: Any, opts: TuneOptions, bar: Progress) -> tuple[Trace, list[str],
                                                                                          dict[str, str]]:
    """Trace the model on ``batch`` (the user's whole batch: layers priced at its shapes); the candidates (layers
    with matmul/conv work or a known hazard) and the layers skipped, with why."""
    bar.stage("trace", 1)
    tr = trace(work, batch, device_type=opts.device_type)
    bar.advance()
    candidates, skipped = [], {}
    for lay in tr.layers:
        if lay.flops > 0 or lay.hazards:
            candidates.append(lay.key)
        else:
            skipped[lay.key] = "no matmul/conv work to speed up and no known hazard"
    return tr, candidates, skipped


def layer_timings(profile: DeviceProfile, tr: Trace, candidates: list[str], work: nn.Module, opts: TuneOptions,
                  ranks: Ranks) -> DeviceProfile:
    """A profile calibrated here for the target, with the model's layers timed at their shapes (rank 0's timings)."""
    if profile.origin != "calibrated" or profile.target != opts.device_type:
        return profile
    timed = [lay for lay in tr.layers if lay.key in candidates]
    return ranks.run(lambda: with_layers(profile, timed, canonical_modules(work), device=opts.device)
                     if ranks.rank == 0 else None, "timing the model's layers")[0]


def agree_inputs(ranks: Ranks, tr: Trace, candidates: list[str], opts: TuneOptions, n_batches: int) -> None:
    """Every rank traced the same layers and was given the same options (:class:`~autoprec.RankError` if not)."""
    o = opts
    ranks.agree((tr.fingerprint, candidates, o.formats, o.target, o.tol, o.verify_tolerance, o.verify_steps,
                 o.n_trials, o.headroom, o.seed, o.verify_compile, n_batches), "the model's layers or tune's options",
                "run tune with the same model, batches and options on every rank")


def probe_stage(work: nn.Module, parts: Split, loss_fn: LossFn | None, tr: Trace, candidates: list[str],
                skipped: dict[str, str], opts: TuneOptions, ranks: Ranks, bar: Progress) -> tuple[Runner, Probe]:
    """Plan the stages' passes and probe each candidate in each format on the batches decisions are made on."""
    o, batches = opts, parts.decide
    runner = Runner(work, loss_fn, tr, device_type=o.device_type, emulate_fp16=o.device_type == "cpu",
                    emulate_cuda=o.emulated, seed=o.seed)
    share = Sharing(loss=o.tol.loss, grad=o.tol.grad) if o.share_roles else None
    planned = len(probe_groups(candidates, roles(tr, candidates))) if share is not None else len(candidates)
    # this rank's share of the measurements (as autoprec.probe deals them); a role that splits adds passes
    probe_plan = len(batches) + len(ranks.share(range(planned * len(o.formats))))
    bar.expect({"probe": probe_plan, "search": min(o.n_trials, len(candidates) + 1),
                "held-out check": 2 * len(parts.held), "reference run": o.verify_steps,
                "verify": o.verify_steps * (2 if o.verify_compile else 1)})  # the search's is its most: its plan follows
    bar.stage("probe", probe_plan, unit="pass")
    pr = probe(runner, batches, candidates, o.formats, headroom=o.headroom, progress=lambda key: bar.advance(),
               skipped=skipped, share=share, ranks=ranks)
    return runner, pr


def priced_trace(tr: Trace, opts: TuneOptions, work: nn.Module | None = None, batch: Any = None) -> Trace:
    """The trace the search prices: ``tr`` at ``opts.train_batch_size`` rows where one is given
    (:func:`autoprec.trace._rescale.rescaled`), else ``tr`` itself. With ``work`` and ``batch`` (what ``tr`` traced)
    a second trace on half the rows tells which sizes carry the batch: flattened tokens and routed experts too."""
    if opts.train_batch_size is None:
        return tr
    smaller = None
    if work is not None and batch is not None and opts.rows and opts.rows >= 2:
        smaller = trace(work, fewer_rows(batch, opts.rows // 2), device_type=opts.device_type)
    return rescaled(tr, opts.rows, opts.train_batch_size, smaller)  # tune refused a train_batch_size without rows


#: the share of the matmul FLOPs kept FP32 for "no gain" above which tuning for another device warns
LAUNCH_BOUND_SHARE = 0.5


def warn_launch_bound(s: Searched, profile: DeviceProfile) -> None:
    """Warn (:class:`~autoprec.DeviceWarning`) when tuning for another device than this one, without
    ``train_batch_size``, the search kept most matmul FLOPs FP32 because no format is faster at the tuning
    batch's shapes: the real step is usually larger, and priced there the decision would differ."""
    o = s.opts
    if o.train_batch_size is not None or o.target == o.device_type:
        return
    flops = {lay.key: lay.flops for lay in s.tr.layers if lay.flops > 0}
    idle = sum(f for k, f in flops.items() if s.result.decisions[k].reason == "no gain")
    if not flops or idle <= LAUNCH_BOUND_SHARE * sum(flops.values()):
        return
    rows = f"{o.rows} rows" if o.rows is not None else "the batch given"
    warnings.warn(f"{100 * idle / sum(flops.values()):.0f}% of the matmul/conv FLOPs stay FP32 for no gain: at the "
                  f"tuning batch's shapes ({rows}) no 16-bit format is faster on {profile.device}, where a real "
                  "training step is usually larger; pass the rows of your training step, "
                  "tune(..., train_batch_size=N) (CLI: --train-batch-size N), to price that step",
                  DeviceWarning, stacklevel=4)


def search_stage(tr: Trace, pr: Probe, reference: Reference, profile: DeviceProfile, opts: TuneOptions,
                 ranks: Ranks, bar: Progress) -> SearchResult:
    """The Optuna search over what the probe left open, each trial measured against ``reference``."""
    bar.stage("search", None, unit="trial")  # its bar opens when the search states its plan: what the probe left open

    def searched(i: int, n: int) -> None:  # trial i of n (a resumed study starts past 0; i = 0 states the plan)
        bar.plan(n)
        bar.advance(max(0, i - bar.done))

    return search(tr, pr, reference.measure, profile=profile, tolerance=opts.tol, headroom=opts.headroom,
                  n_trials=opts.n_trials, storage=opts.storage, seed=opts.seed, progress=searched, ranks=ranks)


def race_stage(s: Searched, choice: Choice) -> tuple[Choice, Race]:
    """Time real training steps of the search's choice against the alternatives (rank 0's race decides); a
    clearly faster alternative the probe also allows ships instead. Before verification, so that verification
    verifies what ships."""
    o, result, bar = s.opts, s.result, s.bar
    bar.stage("step timing", 1)
    s.snapshot.restore()
    keys = [lay.key for lay in s.tr.layers]
    alternatives = {f"all {f}": blanket(keys, f, result.unsafe.get(f, {}), s.tr.tied) for f in o.formats}
    alternatives.update({"runner-up": result.runner_up} if result.runner_up else {})
    probe_scale = ScalerSettings(init_scale=s.pr.loss_scale)
    decisions = choice.decisions
    raced = s.ranks.run(lambda: race(
        s.work, s.full, s.loss_fn, search=result.assignment, alternatives=alternatives, unsafe=result.unsafe,
        measure=s.reference.measure, within=o.tol.within,
        make=lambda a: s.policy(adopt(decisions, a, ""), probe_scale), formats=o.formats,
        device_type=o.device_type, optimizer=o.optimizer, seed=o.seed, snapshot=s.snapshot,
        before_timing=s.reference.hold_off) if s.ranks.rank == 0 else None, "timing training steps")[0]
    bar.advance()
    if raced.chosen == "search":
        return choice, raced
    decisions = adopt(decisions, raced.assignment, f"moved by the measured step race: {raced.note}")
    order = (*choice.order, *(k for k, d in decisions.items() if d.reason == "cast" and k not in choice.order))
    return Choice(decisions, order, raced.errors), raced


def held_out_stage(s: Searched, parts: Split, choice: Choice) -> tuple[HeldOut | None, int, Choice]:
    """The policy on the data it was not decided on: back off until it holds there too
    (:mod:`autoprec.verify._held_out`). The record, the passes it ran, the choice it leaves."""
    held = parts.record()
    if not parts.held:
        return held, 0, choice
    if not any(d.precision != "fp32" for d in choice.decisions.values()):
        return HeldOut(parts.what, skipped="nothing cast: an FP32 policy has nothing to check"), 0, choice
    s.bar.stage("held-out check", 2 * len(parts.held), unit="pass")
    s.reference.hold_off()  # the tuning batch's reference gradients, off the device while the held-out ones are on it
    checked = check_held_out(s.reference.runner, parts, choice.decisions, probe=s.pr, tol=s.opts.tol,
                             tuning=choice.measured, tied=s.tr.tied, scale=s.pr.loss_scale, progress=s.bar.advance)
    held = checked.record
    if held.backed_off:  # what ships changed: its errors on the tuning batch, as the search's were measured
        s.reference.take_back()
        measured = s.reference.measure({key: d.precision for key, d in checked.decisions.items()})[:2]
        choice = dataclasses.replace(choice, decisions=checked.decisions, measured=measured)
    return held, checked.passes, choice


def reference_stage(s: Searched, choice: Choice) -> Trajectory | None:
    """The FP32 reference trajectory (gradient trend for the scaler, curve for verify), when verification
    runs and the policy casts something; from the caller's state (the passes so far moved batch-norm
    statistics)."""
    o = s.opts
    if o.verify_steps <= 0 or not any(d.precision != "fp32" for d in choice.decisions.values()):
        return None
    s.bar.stage("reference run", o.verify_steps)
    s.reference.hold_off()
    s.snapshot.restore()
    fp32_curve = train_curve(s.work, s.full, s.loss_fn, steps=o.verify_steps, policy=None, device_type=o.device_type,
                             scaler=None, optimizer=o.optimizer, seed=o.seed, on_step=s.bar.advance,
                             snapshot=s.snapshot)
    check_reference(fp32_curve, o.verify_steps, o.optimizer)
    return fp32_curve


def scaler_stage(s: Searched, choice: Choice, fp32_curve: Trajectory | None) -> tuple[ScalerSettings | None,
                                                                                      ScalerChoice | None]:
    """The GradScaler settings for the FP16 layers (none without them), searched on the probe's gradients."""
    fp16_keys = [k for k, d in choice.decisions.items() if d.precision == "fp16"]
    if not fp16_keys:
        return None, None
    found = search_scaler(s.pr, fp16_keys, fp32_curve, seed=s.opts.seed)
    return ScalerSettings(init_scale=found.init_scale, growth_interval=found.growth_interval,
                          backoff_factor=found.backoff_factor), found


def verify_stage(s: Searched, choice: Choice, fp32_curve: Trajectory | None, scaler: ScalerSettings | None
                 ) -> tuple[Choice, Verification | None, ScalerSettings | None, Policy, int]:
    """Train the policy against the FP32 trajectory, backing layers off until it holds
    (:mod:`autoprec.verify._verify`): the choice, verification, scaler and policy that ship, and the steps run."""
    o = s.opts
    if fp32_curve is None:
        verification = nothing_cast((), o.verify_tolerance) if o.verify_steps > 0 else None  # nothing to compare
        return choice, verification, scaler, s.policy(choice.decisions, scaler), 0
    fp16_keys = [k for k, d in choice.decisions.items() if d.precision == "fp16"]
    fallback = {**bf16_fallback(s.pr, s.result, fp16_keys),
                **{k: "bf16" for k, d in choice.decisions.items() if d.precision == "fp8"}}  # BF16 passed for them
    s.bar.stage("verify", o.verify_steps * (2 if o.verify_compile else 1))
    checked = verify(s.work, s.full, s.loss_fn, choice.decisions, choice.order, fp32_curve, bound=o.verify_tolerance,
                     scaler=scaler, make_policy=s.policy, device_type=o.device_type, optimizer=o.optimizer,
                     seed=o.seed, on_step=s.bar.advance, compile_backend=o.verify_compile, snapshot=s.snapshot,
                     fallback=fallback)
    choice = dataclasses.replace(choice, decisions=checked.decisions)
    verification, scaler = checked.verification, checked.scaler
    if verification.rounds > 1:  # the backed-off policy's error, measured like the search's trials
        s.reference.take_back()
        scale = scaler.init_scale if scaler is not None else None
        s.reference.runner.recipes = {key: d.recipe for key, d in choice.decisions.items() if d.precision == "fp8"}
        measured = s.reference.measure({key: d.precision for key, d in choice.decisions.items()}, scale)[:2]
        choice = dataclasses.replace(choice, measured=measured)
    return choice, verification, scaler, checked.policy, o.verify_steps + checked.passes  # the very policy trained


def retime_stage(s: Searched, choice: Choice, policy: Policy, raced: Race | None, profile: DeviceProfile
                 ) -> tuple[Race | None, StepSpeed | None]:
    """Time again when what ships is not what the race timed (the held-out check or verification backed off)."""
    backed = sum(d.reason in ("verification back-off", "held-out back-off") for d in choice.decisions.values())
    if raced is None or not backed:
        return raced, None
    o = s.opts
    raced = dataclasses.replace(raced, blanket=unproven(raced.blanket))
    label = profile_label(profile.origin, o.target, profile.source)
    speed = s.ranks.run(lambda: retime(s.work, s.full, s.loss_fn, policy, raced,
                                       why=f"the held-out check and verification backed off {backed} layer(s)",
                                       modelled=modelled(s.priced, profile, policy, s.result), profile=label,
                                       formats=o.formats, device_type=o.device_type, optimizer=o.optimizer,
                                       seed=o.seed, snapshot=s.snapshot) if s.ranks.rank == 0 else None,
                        "timing training steps")[0]
    return raced, speed


def speed_record(s: Searched, profile: DeviceProfile, raced: Race | None, verification: Verification | None,
                 ratio: float) -> StepSpeed:
    """``policy.speed`` where no retiming gave it: the race's figures, else the profile's modelled ``ratio``."""
    o, label = s.opts, profile_label(profile.origin, s.opts.target, profile.source)
    if raced is not None:
        if verification is not None and not verification.passed:
            raced = dataclasses.replace(raced, blanket=unproven(raced.blanket))
        return measured_record(raced, modelled=ratio, profile=label)
    return modelled_record(ratio, label, {f: first_failure(s.result.unsafe.get(f, {})) for f in o.formats},
                           f"target {o.target}, tuned on {o.device_type}" if o.target != o.device_type
                           else "step timing switched off (measure_speed=False or $AUTOPREC_MEASURE_SPEED=0)")


def tune_stats(s: Searched, profile: DeviceProfile, candidates: list[str], policy: Policy, choice: Choice,
               scaler_choice: ScalerChoice | None, passes: Passes, started: float) -> TuneStats:
    """``policy.stats``: the passes, the search's and probe's figures, the profile; the last stage closes and
    its count, time and peak memory join the progress summary."""
    pr, tr, o = s.pr, s.tr, s.opts
    seconds = round(time.perf_counter() - started, 3)
    s.bar.close()
    return TuneStats(
        tuning_seconds=seconds, probe_passes=passes.probe,
        search_passes=passes.search, verify_passes=passes.verify, held_out_passes=passes.held_out,
        world_size=s.ranks.world, trials=s.result.trials, headroom=o.headroom, candidates=len(candidates),
        probe_roles=len({m.group for m in pr.measurements.values() if m.members > 1}),
        probe_shared=sum(m.members > 1 for m in pr.measurements.values()), probe_measurements=len(pr.measurements),
        measured_loss_err=float(choice.measured[0]), measured_grad_err=float(choice.measured[1]),
        modelled_cost_ratio=round(modelled(s.priced, profile, policy, s.result), 4), fx_route=tr.fx_route,
        fx_nodes=tr.fx_nodes, loss_scale_suggested=pr.loss_scale,
        scaler_trials=scaler_choice.trials if scaler_choice else 0,
        scaler_predicted_skip_rate=scaler_choice.skip_rate if scaler_choice else 0.0,
        fp32_grad_absmax=pr.grad_absmax, device=profile.device, capability=profile.capability,
        profile_origin=profile.origin, profile=profile.describe(), calibration_seconds=round(profile.seconds, 3),
        priced_rows=o.train_batch_size,
        format_speed=format_speed([s.priced.layer(k) for k in candidates], o.formats, profile),
        progress=s.bar.summary())


def modelled(tr: Trace, profile: DeviceProfile, policy: Policy, result: SearchResult) -> float:
    """The device profile's step time of ``policy``'s assignment over FP32's (casts priced per edge)."""
    if not result.cost_fp32:
        return 1.0
    return step_seconds(tr, profile, policy.assignment, policy.recipes) / result.cost_fp32


def step_seconds(tr: Trace, profile: DeviceProfile, assignment: Mapping[str, str], recipes: Mapping[str, str]) -> float:
    """The modelled step of ``assignment``, its ``recipes``' Linears in FP8: the step with them in BF16, each one's
    BF16 GEMMs replaced by its FP8 price (:func:`autoprec.device.fp8_price`)."""
    region = {k: "bf16" if k in recipes or p == "fp8" else p for k, p in assignment.items()}
    total = StepCost(tr.layers, tr.handoff, profile).total(region)
    traced = {lay.key: lay for lay in tr.layers}
    for key, recipe in recipes.items():
        if key not in traced:  # not run by the tuning batch (an expert routed no token): nothing priced
            continue
        price = fp8_price(traced[key], profile, recipe)
        total += price.fp8 - price.bf16
    return total


def bf16_fallback(pr: Probe, result: SearchResult, keys: list[str]) -> dict[str, str]:
    """The FP16 layers that verification may move to BF16 before FP32: probed in BF16 without a numerical
    failure (``result.unsafe``). Where FP16 was chosen for speed, BF16 runs at its speed on the GPUs that
    run both; a layer that joined FP16 neighbours (probed, or not probed for want of work and hazard)
    follows them to BF16."""
    refused = result.unsafe.get("bf16", {})
    return {k: "bf16" for k in keys if "bf16" in pr.formats and k not in refused
            and (pr.get(k, "bf16") is not None or k in pr.skipped)}  # skipped: no work, no hazard: it follows
