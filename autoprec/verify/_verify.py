"""Stage 6, verify: short training runs, FP32 against the policy, from identical weights and data.

Both runs start from the same weights (the caller's, restored from a snapshot after each run), see
the same batches in the same order with the same RNG seed per step (dropout masks agree), and use
the same optimizer. The policy run uses its GradScaler when it has FP16 layers. A policy passes when its losses stay finite, no run of
``max_skip_run`` or more scaler steps is skipped, and ``|loss_policy - loss_fp32| / |loss_fp32 at
step 0|`` stays within the threshold at every step.

The threshold is the bound asked for, or twice the run's own noise floor where that is larger: a
training curve drifts from any perturbation of the weights, and a gap that FP32 itself shows from
weights rounded once to the policy's 16-bit format is not the policy's fault. The floor costs one
FP32 run and is measured only when a gap exceeds the bound.

The FP32 run is the probe's reference trajectory (:mod:`autoprec.probe._training`); only the policy run
is new here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..core._batch import LossFn
from ..errors import ModelError, VerificationError, VerificationWarning
from ..policy._policy import NOISE_MULTIPLE, Policy, ScalerSettings, Verification, scaler_for
from ..probe._snapshot import Snapshot
from ..probe._training import OptimizerFactory, Trajectory, train_curve
from ..search._records import Decision
from ..trace._flops import DtypeFlops

__all__ = ["VerifyResult", "check_reference", "compare", "judge", "noise_floor", "nothing_cast", "unverified",
           "verify"]

log = logging.getLogger("autoprec.verify")

def compare(fp32: Sequence[float], policy: Sequence[float]) -> float:
    """Largest ``|policy - fp32|`` over the steps, relative to the FP32 loss at step 0.

    Example:
        >>> compare([2.0, 1.0], [2.0, 1.1])
        0.05
    """
    if len(policy) < len(fp32) or not all(math.isfinite(x) for x in policy):
        return math.inf
    base = max(abs(fp32[0]), 1e-12)
    return round(max(abs(a - b) for a, b in zip(fp32, policy)) / base, 12)


def judge(gap: float, *, bound: float, floor: float, longest_skip_run: int,
          max_skip_run: int = 3) -> tuple[bool, float]:
    """The verdict on one policy run: ``(passed, threshold)``.

    The threshold is ``bound``, or ``NOISE_MULTIPLE`` times the run's noise ``floor`` where that is
    larger; the run passes when its gap is within it and no run of ``max_skip_run`` or more scaler
    steps was skipped. An infinite gap (a non-finite loss) fails whatever the floor.

    Example:
        >>> judge(0.08, bound=0.05, floor=0.0, longest_skip_run=0)
        (False, 0.05)
        >>> judge(0.08, bound=0.05, floor=0.045, longest_skip_run=0)  # the floor explains the gap
        (True, 0.09)
        >>> judge(0.01, bound=0.05, floor=0.0, longest_skip_run=3)
        (False, 0.05)
    """
    threshold = max(bound, NOISE_MULTIPLE * floor)
    return gap <= threshold and longest_skip_run < max_skip_run, threshold


def noise_floor(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None, fp32: Trajectory, *, precision: str,
                device_type: str, optimizer: OptimizerFactory, seed: int,
                on_step: Callable[[], None] | None = None, snapshot: Snapshot | None = None) -> float:
    """The gap (as :func:`compare` measures it) between ``fp32`` and FP32 from weights rounded to ``precision``.

    ``model`` ends as it started: rounded and trained in place and restored from ``snapshot``, or a
    private copy without one.

    Example:
        >>> import torch
        >>> from autoprec.probe import default_optimizer, train_curve
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> m, b = torch.nn.Linear(8, 1), [torch.randn(16, 8)]
        >>> ref = train_curve(m, b, None, steps=3, policy=None, device_type="cpu", scaler=None,
        ...                   optimizer=default_optimizer, seed=0)
        >>> 0 < noise_floor(m, b, None, ref, precision="bf16", device_type="cpu", optimizer=default_optimizer,
        ...                 seed=0) < 0.01
        True
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    rounded = copy.deepcopy(model) if snapshot is None else model
    try:
        with torch.no_grad():
            for p in rounded.parameters():
                if p.is_floating_point():
                    p.copy_(p.to(dtype).to(p.dtype))
    except BaseException:
        if snapshot is not None:
            snapshot.restore()
        raise
    curve = train_curve(rounded, batches, loss_fn, steps=len(fp32.losses), policy=None, device_type=device_type,
                        scaler=None, optimizer=optimizer, seed=seed, on_step=on_step, snapshot=snapshot)
    return compare(fp32.losses, curve.losses)


@dataclass(frozen=True)
class VerifyResult:
    """The verified (possibly backed-off) decisions and policy, the verdict, the scaler settings, the passes used."""

    decisions: dict[str, Decision]
    verification: Verification
    scaler: ScalerSettings | None
    passes: int
    policy: Policy                 # the verified policy (its verification not yet filled in)


@dataclass
class _Runs:
    """What every training run of one :func:`verify` shares, the noise floor once measured, and the passes used."""

    model: nn.Module
    batches: Sequence[Any]
    loss_fn: LossFn | None
    fp32: Trajectory
    bound: float
    device_type: str
    optimizer: OptimizerFactory
    seed: int
    on_step: Callable[[], None] | None
    snapshot: Snapshot | None
    passes: int = 0
    floors: list[float] = dataclasses.field(default_factory=list)  # the noise floor, once measured

    @property
    def floor(self) -> float:
        """The noise floor measured so far (0 until then)."""
        return self.floors[0] if self.floors else 0.0

    def train(self, policy: Policy, amp: torch.amp.GradScaler | None, **extra: Any) -> Trajectory:
        """The training curve of ``policy`` (with ``amp``, its scaler), trained as the FP32 reference was."""
        steps = len(self.fp32.losses)
        curve = train_curve(self.model, self.batches, self.loss_fn, steps=steps, policy=policy,
                            device_type=self.device_type, scaler=amp, optimizer=self.optimizer, seed=self.seed,
                            on_step=self.on_step, snapshot=self.snapshot, **extra)
        self.passes += steps
        return curve

    def floor_for(self, policy: Policy, gap: float) -> float:
        """The noise floor, measured once, and only when a finite gap exceeds the bound (0 until then)."""
        low = [p for p in policy.assignment.values() if p != "fp32"]
        if not self.floors and low and self.bound < gap < math.inf:
            self.floors.append(noise_floor(self.model, self.batches, self.loss_fn, self.fp32,
                                           precision="bf16" if "bf16" in low else "fp16",
                                           device_type=self.device_type, optimizer=self.optimizer, seed=self.seed,
                                           snapshot=self.snapshot))
            self.passes += len(self.fp32.losses)
        return self.floor


def verify(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None, decisions: Mapping[str, Decision],
           order: Sequence[str], fp32: Trajectory, *, bound: float, scaler: ScalerSettings | None,
           make_policy: Callable[[Mapping[str, Decision], ScalerSettings | None], Policy], device_type: str,
           optimizer: OptimizerFactory, seed: int, max_skip_run: int = 3, max_rounds: int = 8,
           on_step: Callable[[], None] | None = None, compile_backend: str | None = None,
           snapshot: Snapshot | None = None, fallback: Mapping[str, str] | None = None) -> VerifyResult:
    """Train the policy as ``fp32`` was trained and compare the curves; back off until it passes.

    Each round trains the :class:`Policy` that ``make_policy`` builds from the round's decisions,
    installed with ``apply`` as a user installs it, with its own ``grad_scaler()``: what is verified
    is what ships. A failing round moves the most sensitive quarter of the cast layers (the end of
    ``order``, which the search sorted least sensitive first) to FP32 (labelled a back-off, not a
    numerical exclusion: nothing was measured on those layers), and divides the initial loss
    scale by 16 when a run of skipped steps was the failure. Before any of that, the first failing round
    moves every FP16 (and FP8) layer with a ``fallback`` (``"bf16"``: the probe found it within the bound in BF16),
    joined layers included, to that format at once (FP16's failures in training, a loss scale
    that skips or underflows, are the format's more than a layer's); a later round backs them off to
    FP32 like any other cast layer. The cheap layers the search joined to
    their 16-bit neighbours (outside ``order``) are backed off last, together, once no layer of
    ``order`` is left cast. A round with nothing left cast trains
    nothing (an FP32 policy has nothing to compare): its verdict is :func:`nothing_cast`, and it ends
    the loop. Each round counts the FLOPs its first forward ran by dtype (the verdict's
    ``flops_by_dtype``). With ``compile_backend`` the final policy is trained once more under
    ``torch.compile`` and must meet the same bound.
    """
    decisions = dict(decisions)
    runs = _Runs(model, batches, loss_fn, fp32, bound, device_type, optimizer, seed, on_step, snapshot)
    last: tuple[Verification, str] | None = None  # the round before and the back-off note that followed it
    for rounds in range(1, max_rounds + 1):
        policy = make_policy(decisions, scaler)
        if all(p == "fp32" for p in policy.assignment.values()):  # nothing to compare: no run
            verdict = nothing_cast(fp32.losses, bound, rounds=rounds, noise_floor=runs.floor, last=last)
            log.info("verification round %d: %s", rounds, verdict.note)
            break
        amp = scaler_for(policy, device_type)
        verdict, threshold = _trained_round(runs, policy, amp, rounds=rounds, note=last[1] if last else "",
                                            max_skip_run=max_skip_run)
        cast, joined = _still_cast(decisions, order)
        if verdict.passed or not (cast or joined):
            break
        note = _back_off(decisions, cast, joined, fallback, rounds=rounds, gap=verdict.max_gap,
                         threshold=threshold, skip_run=verdict.longest_skip_run)
        if verdict.longest_skip_run >= max_skip_run and amp is not None and scaler is not None:
            scaler = dataclasses.replace(scaler, init_scale=max(1.0, scaler.init_scale / 16))
        log.info("verification round %d failed (gap %.3g, threshold %.3g, skip run %d): %s", rounds,
                 verdict.max_gap, threshold, verdict.longest_skip_run, note)
        last = (verdict, note)
    if compile_backend is not None and not verdict.nothing_cast:
        verdict = _compiled(runs, policy, verdict, compile_backend, max_skip_run=max_skip_run)
    return VerifyResult(decisions=decisions, verification=verdict, scaler=scaler, passes=runs.passes, policy=policy)


def _trained_round(runs: _Runs, policy: Policy, amp: torch.amp.GradScaler | None, *, rounds: int, note: str,
                   max_skip_run: int) -> tuple[Verification, float]:
    """Round ``rounds``: ``policy`` trained and judged against the FP32 curve; its verdict and threshold."""
    count = DtypeFlops()  # what the first step's forward really ran in
    curve = runs.train(policy, amp, count=count)
    gap = compare(runs.fp32.losses, curve.losses)
    floor = runs.floor_for(policy, gap)
    passed, threshold = judge(gap, bound=runs.bound, floor=floor, longest_skip_run=curve.longest_skip_run,
                              max_skip_run=max_skip_run)
    verdict = Verification(passed=passed, steps=len(runs.fp32.losses), fp32_losses=tuple(runs.fp32.losses),
                           policy_losses=tuple(curve.losses), max_gap=gap, bound=runs.bound,
                           skipped_steps=curve.skipped, longest_skip_run=curve.longest_skip_run,
                           rounds=rounds, note=note, noise_floor=floor, flops_by_dtype=dict(count.flops))
    return verdict, threshold


def _still_cast(decisions: Mapping[str, Decision], order: Sequence[str]) -> tuple[list[str], list[str]]:
    """The cast layers of ``order`` (least sensitive first), and the 16-bit layers the search joined to them."""
    cast = [key for key in order if decisions[key].reason == "cast"]
    # layers the search joined to their 16-bit neighbours (cheap layers, outside ``order``) go last,
    # all at once: they were there for neighbours that have gone back to FP32 by then
    joined = [k for k, d in decisions.items() if d.precision != "fp32" and k not in set(order)]
    return cast, joined


def _back_off(decisions: dict[str, Decision], cast: Sequence[str], joined: Sequence[str],
              fallback: Mapping[str, str] | None, *, rounds: int, gap: float, threshold: float,
              skip_run: int) -> str:
    """Move the layers that failing round ``rounds`` gives up (``decisions`` in place); the note saying so.

    Every FP16 layer with a ``fallback`` goes to it at once; else the most sensitive quarter of
    ``cast`` goes to FP32, or, with none of it left, every layer of ``joined``.
    """
    fallback = fallback or {}
    lowered = [k for k, d in decisions.items() if d.precision in ("fp16", "fp8") and k in fallback]
    drop = lowered or (cast[-max(1, len(cast) // 4):] if cast else joined)
    kinds = "/".join(sorted({decisions[k].precision.upper() for k in lowered}))
    for key in drop:
        d = decisions[key]
        lower = fallback.get(key) if d.precision in ("fp16", "fp8") else None
        decisions[key] = _moved(d, lower, rounds=rounds, gap=gap, threshold=threshold, skip_run=skip_run,
                                ranked=bool(cast))
    if lowered:
        return f"moved {len(drop)} {kinds} layer(s) to BF16 after round {rounds}"
    return f"backed off {len(drop)} layer(s) after round {rounds}"


def _moved(d: Decision, lower: str | None, *, rounds: int, gap: float, threshold: float, skip_run: int,
           ranked: bool) -> Decision:
    """``d`` moved by verification round ``rounds``: to ``lower`` (a BF16 fallback for FP16), else to FP32."""
    if lower is not None:  # FP16 (FP8) -> BF16 where BF16 holds: still cast, backed off further if need be
        return dataclasses.replace(d, precision=lower, recipe="", detail=(
            f"{d.detail}; moved from {d.precision} to {lower} by verification round {rounds}: the policy's loss gap "
            f"{gap:.3g} exceeded the threshold {threshold:.3g}"))
    # not a measurement on this layer: the whole policy failed, and this layer was among the
    # probe's most sensitive cast layers. excluded stays False (no numerical reason measured here).
    return dataclasses.replace(
        d, precision="fp32", reason="verification back-off", excluded=False, recipe="",
        detail=f"{d.detail}; moved to FP32 by verification round {rounds}: the policy's loss gap "
               f"{gap:.3g} exceeded the threshold {threshold:.3g} (longest skip run "
               f"{skip_run}), and "
               + ("the probe ranked this layer among the most sensitive quarter of the cast layers"
                  if ranked else "it had joined 16-bit neighbours that back-off had moved to FP32")
               + "; this layer itself was not measured to fail")


def _compiled(runs: _Runs, policy: Policy, verdict: Verification, backend: str, *,
              max_skip_run: int) -> Verification:
    """``verdict`` with the final ``policy`` trained once more under ``torch.compile(backend=backend)``."""
    curve = runs.train(policy, scaler_for(policy, runs.device_type), compile_backend=backend)
    gap = compare(runs.fp32.losses, curve.losses)
    verdict = dataclasses.replace(verdict, noise_floor=runs.floor_for(policy, gap))
    ok = judge(gap, bound=runs.bound, floor=verdict.noise_floor, longest_skip_run=curve.longest_skip_run,
               max_skip_run=max_skip_run)[0]
    verdict = dataclasses.replace(
        verdict, passed=verdict.passed and ok, compiled=backend, compiled_losses=tuple(curve.losses),
        compiled_max_gap=gap,
        note="; ".join(n for n in (verdict.note, "" if ok else f"compiled ({backend}) run failed: "
                                   f"loss gap {gap:.3g}, longest skip run {curve.longest_skip_run}") if n))
    if not ok:
        log.warning("the policy trained under torch.compile(backend=%r) failed verification (gap %.3g)",
                    backend, gap)
    return verdict


def nothing_cast(fp32_losses: Sequence[float], bound: float, *, rounds: int = 1, noise_floor: float = 0.0,
                 last: tuple[Verification, str] | None = None) -> Verification:
    """The verdict on a policy that casts no layer: nothing to compare, so no run and nothing verified.

    ``last`` is the verdict of the round before and the back-off note that followed it, where
    back-off moved the last cast layers to FP32: those rounds did compare, and the note says so.

    Example:
        >>> v = nothing_cast((2.0, 1.0), 0.05)
        >>> v.nothing_cast, v.passed, v.policy_losses, v.note
        (True, True, (), 'nothing cast: nothing to verify (every layer is FP32)')
    """
    note = "nothing cast: nothing to verify (every layer is FP32)"
    if last is not None:
        prev, backed = last
        compared = "round 1" if rounds == 2 else f"rounds 1-{rounds - 1}"
        note = (f"nothing left cast after back-off: {compared} compared cast policies with FP32 and "
                 f"failed (round {rounds - 1}: loss gap {prev.max_gap:.3g} against a threshold of "
                 f"{prev.threshold:.3g}, longest skip run {prev.longest_skip_run}; {backed}); the policy is FP32 "
                 "throughout, so its last round compared nothing")
    return Verification(passed=True, steps=len(fp32_losses), fp32_losses=tuple(fp32_losses), policy_losses=(),
                        max_gap=0.0, bound=bound, skipped_steps=0, longest_skip_run=0, rounds=rounds, note=note,
                        noise_floor=noise_floor, nothing_cast=True)


def _describe(optimizer: OptimizerFactory) -> str:
    """``Adam(lr=0.001, eps=1e-08)``: the optimizer a factory makes, with its main settings."""
    try:
        opt = optimizer([nn.Parameter(torch.zeros(1))])
    except Exception:  # a factory that wants the real parameters: name the factory instead
        return getattr(optimizer, "__qualname__", repr(optimizer))
    keys = ("lr", "eps", "momentum", "betas", "weight_decay")
    return f"{type(opt).__name__}({', '.join(f'{k}={opt.defaults[k]}' for k in keys if k in opt.defaults)})"


def check_reference(curve: Any, steps: int, optimizer: OptimizerFactory) -> None:
    """The FP32 reference trajectory must be finite: a policy cannot be verified against a diverging FP32 run.

    Example:
        >>> from autoprec.probe import default_optimizer
        >>> check_reference(Trajectory((2.0, 1.0), (1.0, 1.0)), 2, default_optimizer) is None
        True
        >>> check_reference(Trajectory((2.0, float("nan")), (1.0,)), 2, default_optimizer)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        autoprec.errors.ModelError: FP32 training diverged in verification: the loss is nan at step 1 of 2 ...
    """
    bad = next((i for i, x in enumerate(curve.losses) if not math.isfinite(x)), None)
    if bad is None and len(curve.losses) == steps:
        return
    raise ModelError(
        f"FP32 training diverged in verification: the loss is {curve.losses[bad]} at step {bad} of {steps} "
        f"(losses {', '.join(f'{x:.4g}' for x in curve.losses[:bad + 1])}) with the verification optimizer "
        f"{_describe(optimizer)}; no policy can be verified against it. Pass tune(..., optimizer=lambda params: "
        f"...) with an optimizer and learning rate that train this model in FP32 (e.g. a smaller lr), or "
        f"verify_steps=0 to skip verification")


def unverified(policy: Policy, strict: bool) -> None:
    """A policy that failed verification is never returned quietly: a warning, or with ``strict`` an error.

    Example:
        >>> v = Verification(passed=False, steps=1, fp32_losses=(1.0,), policy_losses=(2.0,), max_gap=1.0,
        ...                  bound=0.05, skipped_steps=0, longest_skip_run=0, rounds=1)
        >>> unverified(Policy(layers={}, verification=v), strict=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        autoprec.errors.VerificationError: the tuned policy FAILED verification after 1 round(s): ...
    """
    v = policy.verification
    msg = (f"the tuned policy FAILED verification after {v.rounds} round(s): largest loss gap {v.max_gap:.3g} "
           f"against a threshold of {v.threshold:.3g} (bound {v.bound:g}, noise floor {v.noise_floor:.3g}), "
           f"longest run of skipped steps {v.longest_skip_run}{'; ' + v.note if v.note else ''}. It is the safest "
           f"policy found, not a verified one: see policy.report(); raise verify_tolerance if the gap is "
           f"acceptable, or check the model and optimizer")
    if strict:
        raise VerificationError(msg, policy=policy)
    warnings.warn(msg, VerificationWarning, stacklevel=3)  # at tune's caller
