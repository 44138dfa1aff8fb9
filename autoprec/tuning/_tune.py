"""``autoprec.tune``: trace -> probe -> search -> policy -> verify, on a private model over the caller's weights."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..core._batch import LossFn, leading_rows, split_batches
from ..core._checks import check_batch, check_batches, check_model, check_options, check_storage
from ..core._formats import check_formats, resolve_target
from ..device._calibration import resolve_profile
from ..device._costs import DeviceProfile
from ..distributed._ranks import Ranks, current
from ..errors import OptionError, RankError
from ..policy._policy import Policy
from ..probe._snapshot import Snapshot
from ..probe._training import OptimizerFactory, default_optimizer
from ..search._records import Tolerance
from ..verify._held_out import DEFAULT_FRACTION, Split, accepts_part, split
from ..verify._verify import unverified
from ._fp8 import fp8_stage
from ._isolation import preserve_global_state, private_model
from ._memory import PeakMemory
from ._options import Passes, TuneOptions
from ._progress import Progress
from ._stages import (
    Choice,
    Reference,
    Searched,
    agree_inputs,
    held_out_stage,
    layer_timings,
    priced_trace,
    probe_stage,
    race_stage,
    reference_stage,
    retime_stage,
    scaler_stage,
    search_stage,
    speed_record,
    trace_stage,
    tune_stats,
    verify_stage,
    warn_launch_bound,
)

__all__ = ["tune"]

log = logging.getLogger("autoprec.tune")

def _stages(verify_steps: int, timing: bool, held: bool = False, fp8: bool = False) -> tuple[str, ...]:
    """The stages tune plans, in order, for the progress bars' "stage k of n".

    Example:
        >>> _stages(20, timing=True, held=True)
        ('trace', 'probe', 'search', 'step timing', 'held-out check', 'reference run', 'verify')
        >>> _stages(0, timing=False)
        ('trace', 'probe', 'search')
    """
    return ("trace", "probe", "search", *(("step timing",) if timing else ()), *(("held-out check",) if held else ()),
            *(("fp8",) if fp8 else ()), *(("reference run", "verify") if verify_steps > 0 else ()))


def tune(model: nn.Module, batch: Any, loss_fn: LossFn | None = None, *, batches: Iterable[Any] | None = None,
         dtypes: Iterable[str] | str | None = None, target: str | None = None, tolerance: float = 0.01,
         grad_tolerance: float = 0.05, verify_tolerance: float = 0.05, verify_steps: int = 20,
         optimizer: OptimizerFactory | None = None, n_trials: int = 30, storage: Any = None,
         headroom: float = 8.0, progress: bool = True, seed: int = 0,
         verify_compile: str | None = None, profile: str | DeviceProfile | None = None,
         strict: bool = False, share_roles: bool = True, measure_speed: bool | None = None,
         held_out: float = DEFAULT_FRACTION, train_batch_size: int | None = None) -> Policy:
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
            ``["bf16", "fp8"]`` (CUDA target, torchao installed: ``autoprec[fp8]``) also tries FP8 for the
            GEMMs of each ``nn.Linear`` the search put in BF16, with torchao's recipes: kept where FP8 is priced
            faster at the step and measured within the bounds of :mod:`autoprec.tuning._fp8`, then verified.
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
        train_batch_size: the rows of the real training step when the tuning batch is smaller: every layer
            that takes the batch is priced at that step (its shapes, FLOPs and elements scaled along the
            batch's leading dimension, :mod:`autoprec.trace._rescale`); the probe, the search's
            measurements and verification still run on the batch given. On a GPU a small batch's matmuls
            are launch-bound, where 16-bit buys nothing, and the real step's are not. None (default):
            price the batch as given; tuning for another device than this one, a warning says when most
            of the matmul FLOPs gain nothing at the tuning shapes.

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
                  measure_speed=measure_speed, held_out=held_out, train_batch_size=train_batch_size)
    device = check_model(model)
    target = resolve_target(target, device)
    formats = check_formats(dtypes, target, device)
    fp8, formats = "fp8" in formats, tuple(f for f in formats if f != "fp8")  # the search assigns the 16-bit ones
    timing = speed_measured(measure_speed) and target == device.type
    check_batches(batches)
    check_storage(storage)
    ranks = current(device)
    if ranks.world > 1 and storage is not None:
        raise OptionError(f"storage={storage!r} on {ranks.world} ranks: a tune under torch.distributed shares "
                          "its trials through the process group, not an Optuna storage; pass storage=None, or "
                          "run separate processes without a process group on one storage")
    opts = TuneOptions(formats=formats, target=target, device=device,
                       tol=Tolerance(loss=float(tolerance), grad=float(grad_tolerance)),
                       verify_tolerance=float(verify_tolerance), verify_steps=verify_steps,
                       optimizer=optimizer or default_optimizer, n_trials=n_trials, storage=storage,
                       headroom=float(headroom), seed=seed, verify_compile=verify_compile, share_roles=share_roles,
                       timing=timing, rows=leading_rows(batch), train_batch_size=train_batch_size, fp8=fp8)
    if train_batch_size is not None and opts.rows is None:
        raise OptionError(f"train_batch_size={train_batch_size} scales the batch's leading (batch) dimension, but the "
                          "batch's tensors share no leading size: pass a batch whose tensors all lead with the "
                          "batch rows, or train_batch_size=None")
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
                              stages=_stages(verify_steps, timing, bool(parts.held), opts.fp8)) as bar:
                    tuned: list[Policy] = []

                    def run() -> str:
                        tuned.append(_tune(work, parts, all_batches, loss_fn, opts, profile=prof, ranks=ranks,
                                           bar=bar, snapshot=snap, started=started))
                        return _outcome(tuned[0])

                    _agree(ranks.run(run, "tune"))  # one rank's failure raises on all; the ranks' policies must agree
                    policy = tuned[0]
            finally:
                snap.restore()  # the caller's weights and buffers, bit for bit, however tuning ended
    if policy.verification is not None and not policy.verification.passed:
        unverified(policy, strict)
    return policy


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


def _tune(work: nn.Module, parts: Split, full: list[Any], loss_fn: LossFn | None, opts: TuneOptions, *,
          profile: DeviceProfile, ranks: Ranks, bar: Progress, snapshot: Snapshot, started: float) -> Policy:
    """The stages in order on the private model ``work``: decisions on ``parts.decide``, checks on the rest."""
    tr, candidates, skipped = trace_stage(work, full[0], opts, bar)  # the user's whole batch: priced at its shapes
    profile = layer_timings(profile, tr, candidates, work, opts, ranks)
    agree_inputs(ranks, tr, candidates, opts, len(parts.decide))
    runner, pr = probe_stage(work, parts, loss_fn, tr, candidates, skipped, opts, ranks, bar)
    probe_passes = runner.passes
    reference = Reference(runner, parts.decide[0], pr.loss_scale, *pr.reference)
    priced = priced_trace(tr, opts, work, full[0])
    result = search_stage(priced, pr, reference, profile, opts, ranks, bar)
    search_passes = runner.passes - probe_passes
    pr = dataclasses.replace(pr, reference=())  # parked while training: see autoprec.probe._snapshot.park
    s = Searched(work, full, loss_fn, opts, tr, pr, result, reference, ranks, bar, snapshot, priced)
    warn_launch_bound(s, profile)
    choice, raced = Choice(dict(result.decisions), result.order, (result.loss_err, result.grad_err)), None
    if opts.timing:  # before verification, so that verification verifies what ships
        choice, raced = race_stage(s, choice)
        search_passes = runner.passes - probe_passes  # with the alternatives' measurements (rank 0's)
    held, held_passes, choice = held_out_stage(s, parts, choice)
    fp8 = None
    if opts.fp8:  # on the checked 16-bit decisions: FP8 where it pays and measures safe, verified with the rest
        choice, fp8 = fp8_stage(s, choice, profile, parts.held)
        s = dataclasses.replace(s, fp8_figures=fp8.figures)
    fp32_curve = reference_stage(s, choice)
    scaler, scaler_choice = scaler_stage(s, choice, fp32_curve)
    choice, verification, scaler, policy, verify_passes = verify_stage(s, choice, fp32_curve, scaler)
    raced, speed = retime_stage(s, choice, policy, raced, profile)
    remeasured = 1 if verification is not None and verification.rounds > 1 else 0
    passes = Passes(probe=probe_passes, search=search_passes + remeasured, verify=verify_passes, held_out=held_passes)
    stats = tune_stats(s, profile, candidates, policy, choice, scaler_choice, passes, started)
    if speed is None:
        speed = speed_record(s, profile, raced, verification, stats.modelled_cost_ratio)
    extra = {} if fp8 is None else {"fp8": {"passes": fp8.passes, "assignments": fp8.compared}}
    policy = dataclasses.replace(policy, verification=verification, stats={**stats.as_dict(), **extra}, speed=speed,
                                 held_out=held)
    log.info("tuned %d layers in %.1fs: %.1f%% of matmul/conv FLOPs in 16-bit", len(policy.layers),
             stats.tuning_seconds, 100 * policy.low_precision_fraction())
    return policy
