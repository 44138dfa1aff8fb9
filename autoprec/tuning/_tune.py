"""``autoprec.tune``: trace -> probe -> search -> policy -> verify, on a private model over the caller's weights."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..core._batch import LossFn, split_batches
from ..core._checks import check_batch, check_batches, check_model, check_options, check_storage
from ..core._formats import check_formats, resolve_target
from ..core._modules import canonical_modules
from ..device._calibration import resolve_profile, with_layers
from ..device._costs import DeviceProfile, StepCost, format_speed
from ..distributed._ranks import Ranks, current
from ..errors import OptionError, RankError
from ..policy._policy import HeldOut, LayerEntry, Policy, ScalerSettings
from ..probe._probe import Runner, errors, evidence, probe
from ..probe._roles import Sharing, roles, units
from ..probe._snapshot import Snapshot, park, unpark
from ..probe._training import OptimizerFactory, default_optimizer, train_curve
from ..report._speed_lines import first_failure, modelled_record, profile_label, unproven
from ..search._loss_scale import search_scaler
from ..search._search import Decision, Tolerance, search
from ..trace._trace import trace
from ..verify._held_out import DEFAULT_FRACTION, Split, accepts_part, split
from ..verify._held_out import check as check_held_out
from ..verify._step_speed import adopt, blanket, measured_record, race, retime
from ..verify._verify import check_reference, nothing_cast, unverified, verify
from ._isolation import preserve_global_state, private_model
from ._memory import PeakMemory
from ._progress import Progress

__all__ = ["tune"]

log = logging.getLogger("autoprec.tune")

def _stages(verify_steps: int, timing: bool, held: bool = False) -> tuple[str, ...]:
    """The stages tune plans, in order, for the progress bars' "stage k of n".

    Example:
        >>> _stages(20, timing=True, held=True)
        ('trace', 'probe', 'search', 'step timing', 'held-out check', 'reference run', 'verify')
        >>> _stages(0, timing=False)
        ('trace', 'probe', 'search')
    """
    return ("trace", "probe", "search", *(("step timing",) if timing else ()), *(("held-out check",) if held else ()),
            *(("reference run", "verify") if verify_steps > 0 else ()))


def tune(model: nn.Module, batch: Any, loss_fn: LossFn | None = None, *, batches: Iterable[Any] | None = None,
         dtypes: Iterable[str] | str | None = None, target: str | None = None, tolerance: float = 0.01,
         grad_tolerance: float = 0.05, verify_tolerance: float = 0.05, verify_steps: int = 20,
         optimizer: OptimizerFactory | None = None, n_trials: int = 30, storage: Any = None,
         headroom: float = 8.0, progress: bool = True, seed: int = 0,
         verify_compile: str | None = None, profile: str | DeviceProfile | None = None,
         strict: bool = False, share_roles: bool = True, measure_speed: bool | None = None,
         held_out: float = DEFAULT_FRACTION) -> Policy:
    """Measure where ``model`` may run in FP16/BF16 and return the tuned :class:`Policy`.

    Args:
        model: an FP32 ``nn.Module``; it ends as it started, bit for bit. autoprec works on a private
            model (its own modules, hooks and gradients) over the same weight storage: no second
            copy of the weights. The training runs of verification change those weights in place
            and put them back from a snapshot kept off the device (host memory for a GPU model, a
            temporary file for a CPU model), on every exit, errors and Ctrl-C included; a thread
            that uses the model while ``tune`` runs sees the training run's weights.
        batch: what the model takes: a tensor, a tuple/list (positional) or a dict (keyword).
        loss_fn: ``loss_fn(output, batch) -> scalar``; default: the model's own loss where it
            returns one, else a fixed random projection of the outputs.
        batches: more batches (an iterable): their ranges count, and verification trains on all.
        dtypes: the 16-bit formats allowed, e.g. ``["fp16"]``; default: BF16 on a CPU, FP16 and
            BF16 on CUDA. A layer gets one only where the device profile finds it faster than FP32.
        target: the device the policy is for (``"cpu"``/``"cuda"``); default: the model's device. For
            ``"cuda"`` on a CPU, every pass runs CUDA autocast's rules (:mod:`autoprec.runtime._emulation`) and
            the policy is marked ``emulated``.
        tolerance: bound on the relative error at the loss.
        grad_tolerance: bound on the relative L2 error of the parameter gradients.
        verify_tolerance: bound on the loss-curve gap in verification, relative to the first loss.
        verify_steps: training steps per verification run (0 skips verification). A policy that
            casts nothing is not trained (an FP32 policy has nothing to compare): its verification
            says ``nothing_cast``.
        optimizer: factory ``params -> torch.optim.Optimizer`` for verification.
        n_trials: Optuna trials at most.
        storage: where the search's Optuna study lives, to resume or share it: an RDB URL
            (``"sqlite:///study.db"``), ``"journal:PATH"`` (a journal file several worker processes
            can tune on at once, each reusing what the others measured) or an Optuna storage object.
        headroom: range margin: a layer whose FP32 maximum times ``headroom`` exceeds a format's
            range is not given that format, and the loss scale leaves this much room.
        progress: show progress bars on stderr: per stage, the passes (trials, steps) done of those
            planned, with an ETA from the measured time per pass.
        seed: seed for the study and for the dropout masks of every pass.
        verify_compile: a ``torch.compile`` backend (``"inductor"``, ``"aot_eager"``): the verified
            policy also trains compiled with it and must meet the same bound; None (default) skips it.
        profile: the device profile that prices each format: a file from ``autoprec calibrate`` (to
            tune for a device from another machine) or a ``DeviceProfile``; None (default): the
            device is calibrated here when it is the target (cached per machine), else the built-in
            CUDA estimate, which the report names as such. See :func:`autoprec.calibrate`.
        strict: raise :class:`~autoprec.VerificationError` when the policy fails verification even
            after backing off; by default the policy is returned with a
            :class:`~autoprec.VerificationWarning`, and its report says FAILED on its first line.
        share_roles: probe the layers that play one role in repeated blocks (``h.*.attn.c_attn``) as
            a group first, one pass casting all of them, and split only where that measurement is
            not clearly inside the bound or a member differs (:mod:`autoprec.probe._roles`); False probes
            every layer alone.
        measure_speed: time real training steps (forward, backward, optimizer step) on the tuning
            batch when the tuning device is the target: FP32, blanket ``torch.autocast`` in each format,
            the policy and the assignments the probe also allows, interleaved, medians
            (:mod:`autoprec.verify._step_speed`; a few seconds). An alternative measured clearly faster than the
            search's choice ships instead, before verification; ``policy.speed`` keeps the figures
            beside the modelled ones. None (default): on, unless ``$AUTOPREC_MEASURE_SPEED`` is ``0``
            (the test suite's setting: decisions that do not hang on timings). For another target the
            figure is the device profile's, labelled so.
        held_out: the share of what tune is given that decisions are not made on but checked on
            (:mod:`autoprec.verify._held_out`): of ``batches`` the last ones, else rows of ``batch``. The policy
            must be within ``tolerance``/``grad_tolerance`` there too, or layers go back to FP32 (the
            most amplified, then the closest to the bound, first) until it is; ``policy.held_out``
            keeps both figures and the calibrated margin. 0 switches the check off.

    Raises :class:`~autoprec.ModelError` when FP32 training itself does not stay finite with the
    verification optimizer: nothing could be verified against it (pass an ``optimizer`` that
    trains the model, or ``verify_steps=0``).

    ``policy.stats`` records the passes, time and peak memory of each stage (``stages``,
    ``peak_memory_mb``: bytes above those in use when ``tune`` started; on CUDA from
    ``torch.cuda.max_memory_allocated``, whose peak ``tune`` resets: torch cannot restore a caller's
    earlier peak; on a CPU from the process's resident set, see :mod:`autoprec.tuning._memory`).

    ``model`` may be wrapped (``torch.compile``, DDP, ``nn.DataParallel``, activation-checkpoint
    wrappers); the policy's keys are the names without the wrappers, and it fits both.

    Under ``torchrun`` (a ``torch.distributed`` default process group initialised before the call),
    call ``tune`` on every rank with the same model, batches and options: the probe's layer passes
    and the search's trials are split across the ranks (:mod:`autoprec.distributed._ranks`), the measurements
    gathered, and every rank returns the policy one process would. Each rank runs the FP32
    reference pass and the verification runs itself; ``stats`` counts this rank's passes, and
    ``stats["world_size"]`` the ranks. Ranks given different inputs, or one rank failing, raise
    :class:`~autoprec.RankError` on every rank; ``storage`` cannot be combined with ranks.

    Example:
        >>> import torch, autoprec
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
        >>> policy = autoprec.tune(model, torch.randn(2048, 64), progress=False, verify_steps=5)
        >>> policy.layers["0"].precision
        'bf16'
    """
    check_options(tolerance=tolerance, grad_tolerance=grad_tolerance, verify_tolerance=verify_tolerance,
                  verify_steps=verify_steps, n_trials=n_trials, headroom=headroom, seed=seed, progress=progress,
                  optimizer=optimizer, verify_compile=verify_compile, strict=strict, share_roles=share_roles,
                  measure_speed=measure_speed, held_out=held_out)
    device = check_model(model)
    target = resolve_target(target, device)
    formats = check_formats(dtypes, target, device)
    timing = speed_measured(measure_speed) and target == device.type
    check_batches(batches)
    check_storage(storage)
    ranks = current(device)
    if ranks.world > 1 and storage is not None:
        raise OptionError(f"storage={storage!r} on {ranks.world} ranks: a tune under torch.distributed shares "
                          "its trials through the process group, not an Optuna storage; pass storage=None, or "
                          "run separate processes without a process group on one storage")
    tol = Tolerance(loss=float(tolerance), grad=float(grad_tolerance))
    all_batches = split_batches(batch, batches)
    started = time.perf_counter()
    with preserve_global_state():
        # a calibration is timed: rank 0's figures price every rank's search (the others wait)
        prof = ranks.run(lambda: resolve_profile(profile, target=target, device=device, formats=formats)
                         if ranks.rank == 0 else None, "resolving the device profile")[0]
        meter = PeakMemory(device)  # on CUDA it resets the device's peak-memory statistics
        meter.stage("copy")
        work = private_model(model)
        # what tuning may change in the storage it shares with the caller's model: the buffers
        # (batch-norm statistics, in every pass) and, when it trains, the trainable parameters
        trained = [p for p in work.parameters() if p.requires_grad] if verify_steps > 0 or timing else []
        with Snapshot(trained + list(work.buffers())) as snap:
            try:
                for i, b in enumerate(all_batches):
                    check_batch(work, b, loss_fn, i)
                parts = split(all_batches, float(held_out), accepts=accepts_part(work, loss_fn))
                with Progress(progress and ranks.rank == 0, meter=meter,
                              stages=_stages(verify_steps, timing, bool(parts.held))) as bar:
                    tuned: list[Policy] = []

                    def run() -> str:
                        tuned.append(_tune(work, parts, all_batches, loss_fn, formats=formats, target=target,
                                           device=device, tol=tol, verify_tolerance=float(verify_tolerance),
                                           verify_steps=verify_steps, optimizer=optimizer or default_optimizer,
                                           n_trials=n_trials, storage=storage, headroom=float(headroom), seed=seed,
                                           bar=bar, started=started, verify_compile=verify_compile, profile=prof,
                                           ranks=ranks, snapshot=snap, share_roles=share_roles,
                                           timing=timing))
                        return _outcome(tuned[0])

                    _agree(ranks.run(run, "tune"))  # one rank's failure raises on all; the ranks' policies must agree
                    policy = tuned[0]
            finally:
                snap.restore()  # the caller's weights and buffers, bit for bit, however tuning ended
    if policy.verification is not None and not policy.verification.passed:
        unverified(policy, strict)
    return policy


def _modelled(tr: Any, profile: DeviceProfile, policy: Policy, result: Any) -> float:
    """The device profile's step time of ``policy``'s assignment over FP32's (casts priced per edge)."""
    if not result.cost_fp32:
        return 1.0
    return StepCost(tr.layers, tr.handoff, profile).total(policy.assignment) / result.cost_fp32


def _bf16_fallback(pr: Any, result: Any, keys: list[str]) -> dict[str, str]:
    """The FP16 layers that verification may move to BF16 before FP32: probed in BF16 without a numerical
    failure (``result.unsafe``). Where FP16 was chosen for speed, BF16 runs at its speed on the GPUs that
    run both; a layer that joined FP16 neighbours (probed, or not probed for want of work and hazard)
    follows them to BF16."""
    refused = result.unsafe.get("bf16", {})
    return {k: "bf16" for k in keys if "bf16" in pr.formats and k not in refused
            and (pr.get(k, "bf16") is not None or k in pr.skipped)}  # skipped: no work, no hazard: it follows


def speed_measured(option: bool | None) -> bool:
    """Whether ``tune(measure_speed=option)`` times training steps: the option, else ``$AUTOPREC_MEASURE_SPEED``
    (``0``, ``false``, ``no`` or ``off``: not), else yes.

    Example:
        >>> import os; from unittest import mock
        >>> with mock.patch.dict(os.environ, {"AUTOPREC_MEASURE_SPEED": "0"}):
        ...     speed_measured(None), speed_measured(True)
        (False, True)
    """
    if option is not None:
        return option
    return os.environ.get("AUTOPREC_MEASURE_SPEED", "1").strip().lower() not in ("0", "false", "no", "off")


def _outcome(policy: Policy) -> str:
    """What every rank must agree on: the assignment, the scaler, the verdict and the trial count."""
    ver = policy.verification
    return repr((sorted(policy.assignment.items()), policy.scaler, policy.stats.get("trials"),
                 None if ver is None else (ver.passed, ver.rounds)))


def _agree(outcomes: list[str]) -> None:
    if len(set(outcomes)) > 1:
        other = next(r for r, o in enumerate(outcomes) if o != outcomes[0])
        raise RankError(f"the ranks tuned different policies: rank 0 {outcomes[0][:300]}, rank {other} "
                        f"{outcomes[other][:300]}; their measurements differ by more than float noise (different "
                        "machines or thread counts?): tune on one process, or on ranks of one kind of machine")


def _tune(work: nn.Module, parts: Split, full: list[Any], loss_fn: LossFn | None, *, formats: tuple[str, ...],
          target: str, device: torch.device, tol: Tolerance, verify_tolerance: float, verify_steps: int,
          optimizer: OptimizerFactory, n_trials: int, storage: str | None, headroom: float, seed: int,
          bar: Progress, started: float, verify_compile: str | None, profile: DeviceProfile,
          ranks: Ranks, snapshot: Snapshot, share_roles: bool, timing: bool) -> Policy:
    device_type = device.type
    emulate = device_type == "cpu"
    batches = parts.decide  # what the probe and search decide on: the held-out part is checked on (autoprec.verify._held_out)

    bar.stage("trace", 1)
    tr = trace(work, full[0], device_type=device_type)  # the user's whole batch: layers priced at its shapes
    bar.advance()

    candidates, skipped = [], {}
    for lay in tr.layers:
        if lay.flops > 0 or lay.hazards:
            candidates.append(lay.key)
        else:
            skipped[lay.key] = "no matmul/conv work to speed up and no known hazard"
    if profile.origin == "calibrated" and profile.target == device_type:  # the model's layers at their shapes
        timed = [lay for lay in tr.layers if lay.key in candidates]
        profile = ranks.run(lambda: with_layers(profile, timed, canonical_modules(work), device=device)
                            if ranks.rank == 0 else None, "timing the model's layers")[0]  # rank 0's timings
    emulated = emulate and target == "cuda"  # a CUDA policy measured on a CPU: CUDA autocast's rules
    ranks.agree((tr.fingerprint, candidates, formats, target, tol, verify_tolerance, verify_steps, n_trials,
                 headroom, seed, verify_compile, len(batches)), "the model's layers or tune's options",
                "run tune with the same model, batches and options on every rank")
    runner = Runner(work, loss_fn, tr, device_type=device_type, emulate_fp16=emulate, emulate_cuda=emulated,
                    seed=seed)
    share = Sharing(loss=tol.loss, grad=tol.grad) if share_roles else None
    planned = len(units(candidates, roles(tr, candidates))) if share is not None else len(candidates)
    # this rank's share of the measurements (as autoprec.probe deals them); a role that splits adds passes
    probe_plan = len(batches) + len(ranks.share(range(planned * len(formats))))
    bar.expect({"probe": probe_plan, "search": min(n_trials, len(candidates) + 1),
                "held-out check": 2 * len(parts.held), "reference run": verify_steps,
                "verify": verify_steps * (2 if verify_compile else 1)})  # the search's is its most: its plan follows
    bar.stage("probe", probe_plan, unit="pass")
    pr = probe(runner, batches, candidates, formats, headroom=headroom, progress=lambda key: bar.advance(),
               skipped=skipped, share=share, ranks=ranks)
    probe_passes = runner.passes
    ref_loss, ref_grads = pr.reference
    ref: dict[str, Any] = {"grads": ref_grads}  # after the search, the reference gradients live here alone
    del ref_grads

    def measure(assignment: dict[str, str], scale: float | None = None) -> tuple[float, float, bool]:
        fp16 = "fp16" in assignment.values()
        s = (scale or pr.loss_scale) if fp16 else 1.0
        loss, grads = runner.run(batches[0], dict(assignment), scale=s)
        return errors(loss, grads, ref_loss, ref["grads"], reuse=True)

    bar.stage("search", None, unit="trial")  # its bar opens when the search states its plan: what the probe left open

    def searched(i: int, n: int) -> None:  # trial i of n (a resumed study starts past 0; i = 0 states the plan)
        bar.plan(n)
        bar.advance(max(0, i - bar.done))

    result = search(tr, pr, measure, profile=profile, tolerance=tol, headroom=headroom, n_trials=n_trials,
                    storage=storage, seed=seed, progress=searched, ranks=ranks)
    search_passes = runner.passes - probe_passes
    pr = dataclasses.replace(pr, reference=())  # parked while training: see autoprec.probe._snapshot.park

    decisions = dict(result.decisions)

    def make_policy(decisions: Mapping[str, Decision], scaler: ScalerSettings | None) -> Policy:
        layers = {}
        for lay in tr.layers:
            d = decisions[lay.key]
            rng = pr.ranges.get(lay.key)
            layers[lay.key] = LayerEntry(precision=d.precision, reason=d.reason, detail=d.detail,
                                         excluded=d.excluded, kind=lay.kind, op=lay.op, hazards=lay.hazards,
                                         flops=lay.flops, out_absmax=rng.out_absmax if rng else 0.0,
                                         grad_absmax=rng.grad_absmax if rng else 0.0, measured=evidence(pr, lay.key))
        fp16_used = any(d.precision == "fp16" for d in decisions.values())
        return Policy(layers=layers, target=target, modules=dict(tr.signatures), opaque=dict(tr.opaque),
                      handoff=dict(tr.handoff), unseen=dict(tr.unseen), formats=formats,
                      scaler=scaler if fp16_used else None,
                      tolerance={"loss": tol.loss, "grad": tol.grad, "verify": verify_tolerance},
                      emulated=emulated)

    measured = (result.loss_err, result.grad_err)
    order, parked_box = result.order, []

    def hold_off() -> None:  # the reference gradients, off the device while runs hold gradients and optimizer state
        if not parked_box:
            parked_box.append(park(ref))

    raced = None
    if timing:  # before verification, so that verification verifies what ships
        bar.stage("step timing", 1)
        snapshot.restore()
        keys = [lay.key for lay in tr.layers]
        alternatives = {f"all {f}": blanket(keys, f, result.unsafe.get(f, {}), tr.tied) for f in formats}
        alternatives.update({"runner-up": result.runner_up} if result.runner_up else {})
        probe_scale = ScalerSettings(init_scale=pr.loss_scale)
        raced = ranks.run(lambda: race(
            work, full, loss_fn, search=result.assignment, alternatives=alternatives, unsafe=result.unsafe,
            measure=measure, within=tol.within, make=lambda a: make_policy(adopt(decisions, a, ""), probe_scale),
            formats=formats, device_type=device_type, optimizer=optimizer, seed=seed, snapshot=snapshot,
            before_timing=hold_off) if ranks.rank == 0 else None, "timing training steps")[0]  # rank 0's decides
        bar.advance()
        search_passes = runner.passes - probe_passes  # with the alternatives' measurements (rank 0's)
        if raced.chosen != "search":
            decisions = adopt(decisions, raced.assignment, f"moved by the measured step race: {raced.note}")
            order = (*order, *(k for k, d in decisions.items() if d.reason == "cast" and k not in order))
            measured = raced.errors
    held = parts.record()
    held_passes = 0
    if parts.held and not any(d.precision != "fp32" for d in decisions.values()):
        held = HeldOut(parts.what, skipped="nothing cast: an FP32 policy has nothing to check")
    elif parts.held:  # the policy on data it was not decided on: back off until it holds there too
        bar.stage("held-out check", 2 * len(parts.held), unit="pass")
        hold_off()  # the tuning batch's reference gradients, off the device while the held-out ones are on it
        checked_out = check_held_out(runner, parts, decisions, probe=pr, tol=tol, tuning=measured, tied=tr.tied,
                                     scale=pr.loss_scale, progress=bar.advance)
        held, held_passes = checked_out.record, checked_out.passes
        if held.backed_off:  # what ships changed: its errors on the tuning batch, as the search's were measured
            decisions = checked_out.decisions
            ref["grads"] = unpark(parked_box.pop())
            measured = measure({key: d.precision for key, d in decisions.items()})[:2]
    fp32_curve = parked = speed = None
    label = profile_label(profile.origin, target, profile.source)
    cast_any = any(d.precision != "fp32" for d in decisions.values())
    if verify_steps > 0 and cast_any:  # the FP32 reference trajectory: gradient trend for the scaler, curve for verify
        bar.stage("reference run", verify_steps)
        hold_off()
        parked = parked_box[0]
        snapshot.restore()  # from the caller's state: the passes so far moved batch-norm statistics
        fp32_curve = train_curve(work, full, loss_fn, steps=verify_steps, policy=None, device_type=device_type,
                                 scaler=None, optimizer=optimizer, seed=seed, on_step=bar.advance,
                                 snapshot=snapshot)
        check_reference(fp32_curve, verify_steps, optimizer)
    fp16_keys = [k for k, d in decisions.items() if d.precision == "fp16"]
    scaler = scaler_choice = None
    if fp16_keys:
        scaler_choice = search_scaler(pr, fp16_keys, fp32_curve, seed=seed)
        scaler = ScalerSettings(init_scale=scaler_choice.init_scale, growth_interval=scaler_choice.growth_interval,
                                backoff_factor=scaler_choice.backoff_factor)
    verification = None
    verify_passes = verify_steps if fp32_curve is not None else 0
    if fp32_curve is not None:
        bar.stage("verify", verify_steps * (2 if verify_compile else 1))
        checked = verify(work, full, loss_fn, decisions, order, fp32_curve, bound=verify_tolerance,
                         scaler=scaler, make_policy=make_policy, device_type=device_type, optimizer=optimizer,
                         seed=seed, on_step=bar.advance, compile_backend=verify_compile, snapshot=snapshot,
                         fallback=_bf16_fallback(pr, result, fp16_keys))
        decisions, verification, scaler = checked.decisions, checked.verification, checked.scaler
        policy = checked.policy  # the very policy that was trained and compared
        verify_passes += checked.passes
        if verification.rounds > 1:  # the backed-off policy's error, measured like the search's trials
            ref["grads"] = unpark(parked)
            scale = scaler.init_scale if scaler is not None else None
            measured = measure({key: d.precision for key, d in decisions.items()}, scale)[:2]
    else:
        policy = make_policy(decisions, scaler)
        if verify_steps > 0:  # nothing cast: no run would compare anything
            verification = nothing_cast((), verify_tolerance)
    backed = sum(d.reason in ("verification back-off", "held-out back-off") for d in decisions.values())
    if raced is not None and backed:  # what ships is not what the race timed: time it again
        raced = dataclasses.replace(raced, blanket=unproven(raced.blanket))
        speed = ranks.run(lambda: retime(work, full, loss_fn, policy, raced,
                                         why=f"the held-out check and verification backed off {backed} layer(s)",
                                         modelled=_modelled(tr, profile, policy, result), profile=label,
                                         formats=formats, device_type=device_type, optimizer=optimizer,
                                         seed=seed, snapshot=snapshot) if ranks.rank == 0 else None,
                          "timing training steps")[0]

    stats = {
        "tuning_seconds": round(time.perf_counter() - started, 3),
        "probe_passes": probe_passes,
        "search_passes": search_passes + (1 if verification is not None and verification.rounds > 1 else 0),
        "verify_passes": verify_passes,
        "held_out_passes": held_passes,
        "world_size": ranks.world,  # the passes above are this rank's (autoprec.distributed._ranks)
        "trials": result.trials,
        "headroom": headroom,  # the range margin the probe and search used (autoprec.guard checks with it)
        "candidates": len(candidates),
        "probe_roles": len({m.group for m in pr.measurements.values() if m.members > 1}),
        "probe_shared": sum(m.members > 1 for m in pr.measurements.values()),  # rows that are a role's bound
        "probe_measurements": len(pr.measurements),
        "measured_loss_err": float(measured[0]),
        "measured_grad_err": float(measured[1]),
        "modelled_cost_ratio": round(_modelled(tr, profile, policy, result), 4),  # of the policy that ships
        "fx_route": tr.fx_route,
        "fx_nodes": tr.fx_nodes,
        "loss_scale_suggested": pr.loss_scale,
        "scaler_trials": scaler_choice.trials if scaler_choice else 0,
        "scaler_predicted_skip_rate": scaler_choice.skip_rate if scaler_choice else 0.0,
        "fp32_grad_absmax": pr.grad_absmax,
        "device": profile.device,
        "capability": profile.capability,
        "profile_origin": profile.origin,
        "profile": profile.describe(),
        "calibration_seconds": round(profile.seconds, 3),
        # modelled FP32 step time of the matmul/conv layers over that in each format (< 1: slower)
        "format_speed": format_speed([tr.layer(k) for k in candidates], formats, profile),
    }
    bar.close()  # the last stage ends: its count, time and peak memory go into the stats
    stats.update(bar.summary())
    if speed is None and raced is not None:
        if verification is not None and not verification.passed:
            raced = dataclasses.replace(raced, blanket=unproven(raced.blanket))
        speed = measured_record(raced, modelled=stats["modelled_cost_ratio"], profile=label)
    elif speed is None:
        speed = modelled_record(stats["modelled_cost_ratio"], label,
                                {f: first_failure(result.unsafe.get(f, {})) for f in formats},
                                f"target {target}, tuned on {device_type}" if target != device_type
                                else "step timing switched off (measure_speed=False or $AUTOPREC_MEASURE_SPEED=0)")
    policy = dataclasses.replace(policy, verification=verification, stats=stats, speed=speed, held_out=held)
    log.info("tuned %d layers in %.1fs: %.1f%% of matmul/conv FLOPs in 16-bit", len(policy.layers),
             stats["tuning_seconds"], 100 * policy.low_precision_fraction())
    return policy
