"""Stage 2, probe: measured ranges and per-layer, per-format error.

One FP32 reference forward+backward per batch records every layer's output range and the range
of the gradient flowing into it (log2 histograms, so underflow at any loss scale can be read off).
Then each candidate layer is run alone in each 16-bit format, the rest in FP32, on the first
batch, and the error it adds at the loss and at the parameter gradients is measured, with the
non-finite values it produced. Cost: ``len(batches) + candidates * formats`` forward+backward
passes, linear in the number of layers.

With ``share`` (what :func:`autoprec.tune` passes), layers playing one role in repeated blocks
(``h.*.attn.c_attn``: same path pattern, kind and shapes) are measured as a group first, one pass
per role and format casting every member at once, and the group's errors stand for each member
only where they are clearly inside the bound: they bound the member's own error from above. Where
not, the role is split down to the members that differ (:mod:`autoprec.probe._roles` says how and why);
a member's row records the role (``Measurement.group``). GPT-2 small for CUDA: 99 candidates,
199 passes alone, 23 shared (``benchmarks/probe_cost.py --passes``).

Every pass also measures how far it moves the inputs of the ops that amplify small changes (a
softmax over large logits, a top-k route, a centring norm: :mod:`autoprec.probe._amplify`), against the
reference's on the first batch: ``Measurement.amp`` is the largest error that can cause at such an
op's output on any data, and the search refuses a format where it exceeds the gradient bound.

What a pass adds to its forward+backward is fused device work: the gradients are taken off the
parameters (no copy), compared with the reference in place by ``torch._foreach_*`` reductions, and
read with one host transfer (``benchmarks/probe_cost.py``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence

import torch

from ..core._formats import info
from ..distributed._ranks import Ranks
from ..errors import ModelError, RankError
from ._amplify import Amplification, consumers, tee
from ._passes import Measure
from ._records import Measurement, Probe, Ranges
from ._reductions import HIST_BINS, grad_norm, log2_hist
from ._roles import Sharing, measure_role, probe_groups, roles
from ._runner import RangeWatcher, Runner

__all__ = ["probe", "evidence", "suggest_scale"]

log = logging.getLogger("autoprec.probe")

def probe(runner: Runner, batches: Sequence[Any], candidates: Iterable[str], formats: Sequence[str], *,
          headroom: float = 8.0, progress: Callable[[str], None] | None = None,
          skipped: dict[str, str] | None = None, share: Sharing | None = None,
          ranks: Ranks | None = None) -> Probe:
    """Measure ranges on every batch and the error of each candidate layer in each format.

    ``share``: probe the roles of repeated blocks as groups first, split where its thresholds say
    (:mod:`autoprec.probe._roles`); None measures every layer alone. ``progress(key)`` is called after every
    pass (without sharing ``len(batches) + len(candidates) * len(formats)`` in all), with the layer
    or role the pass measured (``""`` for the FP32 reference passes).

    With ``ranks`` of several processes (:mod:`autoprec.distributed._ranks`), every rank runs the FP32 reference
    passes (each needs the ranges and reference gradients itself) and its share of the ``(layer or
    role, format)`` measurements (a role's splits stay on the rank that measured the role); the
    measurements are gathered, so every rank returns them all.
    ``Probe.passes`` counts this rank's passes.

    Example:
        >>> from autoprec.trace import trace
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x = torch.randn(4, 8)
        >>> t = trace(m, x, device_type="cpu")
        >>> r = Runner(m, None, t, device_type="cpu", emulate_fp16=True, seed=0)
        >>> p = probe(r, [x], ["0", "2"], ["bf16"])
        >>> p.get("0", "bf16").finite
        True
    """
    ranks = ranks or Ranks()
    watcher = RangeWatcher()
    state: dict[str, Any] = {}
    found = consumers(runner.trace, runner.modules)
    amp = Amplification(found) if found else None  # records the amplifying ops' inputs on the first batch
    refs = ranks.run(lambda: _reference(runner, batches, watcher, amp, progress, ranks.world, state),
                     "the probe's FP32 reference pass")
    _same_reference(refs)
    ref_loss, ref_grads, ref_amax = state["loss"], state["grads"], state["amax"]
    ranges = watcher.ranges(state["nonfinite"])
    grad_absmax = max([r.grad_absmax for r in ranges.values()] + [ref_amax, 0.0])
    scale = suggest_scale(grad_absmax, headroom)
    candidates = list(candidates)
    groups = roles(runner.trace, candidates) if share is not None else {}
    if amp is not None:
        amp.compare()
    measure = Measure(runner, batches[0], ref_loss, ref_grads, scale, progress, amp)
    work = [(name, tuple(members), fmt) for name, members in probe_groups(candidates, groups) for fmt in formats]
    measurements = _measure_work(ranks, measure, work, share, ranges, headroom)
    log.info("probed %d layers (%d roles) x %d formats in %d passes (rank %d of %d)", len(candidates), len(groups),
             len(formats), runner.passes, ranks.rank, ranks.world)
    hist = state["hist"].tolist() if state["hist"] is not None else [0] * HIST_BINS
    return Probe(ref_loss=float(ref_loss), ranges=ranges, measurements=measurements, loss_scale=scale,
                 grad_absmax=grad_absmax, param_grad_hist=tuple(hist), passes=runner.passes,
                 formats=tuple(formats), skipped=dict(skipped or {}), reference=(ref_loss, ref_grads))


def _reference(runner: Runner, batches: Sequence[Any], watcher: RangeWatcher, amp: Amplification | None,
               progress: Callable[[str], None] | None, world: int, state: dict[str, Any]) -> tuple[float, float]:
    """The FP32 reference passes, one per batch, into ``watcher`` and ``state``; the first batch's loss and
    gradient norm where other ranks compare them (``(0.0, 0.0)`` alone: no host read).

    ``state`` gets the first batch's ``loss``, ``grads``, their largest magnitude (``amax``) and what
    FP32 itself emits non-finite (``nonfinite``), and ``hist``, every batch's parameter-gradient histogram.
    """
    param_hist: torch.Tensor | None = None
    for i, batch in enumerate(batches):
        loss, grads = runner.run(batch, {}, watcher=tee(watcher, amp) if i == 0 else watcher)
        if progress is not None:
            progress("")
        present = [g for g in grads if g is not None and g.numel()]
        check = _finite_check(i, loss, present)
        for g in present:
            param_hist = log2_hist(g) if param_hist is None else param_hist + log2_hist(g)
        if i == 0:
            state.update(loss=loss, grads=grads, amax=max(check[1:], default=0.0),
                         nonfinite=dict(watcher.nonfinite))  # what FP32 itself emits on the measured batch
    state["hist"] = param_hist
    if world == 1:  # nothing to compare with: no host read
        return 0.0, 0.0
    return float(state["loss"]), float(grad_norm(state["grads"], state["loss"]))


def _finite_check(i: int, loss: torch.Tensor, present: list[torch.Tensor]) -> list[float]:
    """Batch ``i``'s FP32 loss and the largest magnitude of each gradient (one host read); all must be finite."""
    amax = torch._foreach_norm(present, math.inf) if present else []
    check = torch.stack([loss.double().reshape(())] + [a.double() for a in amax]).tolist()  # one sync
    if not all(math.isfinite(x) for x in check):
        raise ModelError(f"the model's FP32 loss or gradients are not finite on batch {i} "
                         f"(loss={check[0]}): autoprec cannot tune a model that is broken in FP32; "
                         "fix the model or the batch first")
    return check


def _measure_work(ranks: Ranks, measure: Measure, work: list[tuple[str, tuple[str, ...], str]],
                  share: Sharing | None, ranges: dict[str, Ranges], headroom: float) -> dict[tuple[str, str], Measurement]:
    """Each ``(layer or role, members, format)`` of ``work`` measured, this rank's share here, gathered from
    every rank, in the order of the work."""

    def measure_share() -> list[tuple[int, dict[tuple[str, str], Measurement]]]:
        out = []
        for i, (name, members, fmt) in ranks.share(list(enumerate(work))):
            if len(members) == 1:
                out.append((i, {(name, fmt): measure.alone(name, fmt)}))
            else:
                out.append((i, measure_role(measure, name, list(members), fmt, share, ranges, headroom)))
        return out

    parts: dict[int, dict[tuple[str, str], Measurement]] = {}
    for part in ranks.run(measure_share, "the probe"):
        parts.update(part)
    return {pair: m for i in range(len(work)) for pair, m in parts[i].items()}


def _same_reference(refs: list[tuple[float, float]]) -> None:
    """Every rank's FP32 loss and gradient norm on the first batch agree (up to float noise)."""
    loss0, norm0 = refs[0]
    for r, (loss, norm) in enumerate(refs[1:], 1):
        if not (math.isclose(loss, loss0, rel_tol=1e-5, abs_tol=1e-12)
                and math.isclose(norm, norm0, rel_tol=1e-5, abs_tol=1e-12)):
            raise RankError(f"the FP32 loss on the first batch differs between the ranks: rank 0 has {loss0:.8g} "
                            f"(gradient norm {norm0:.8g}), rank {r} has {loss:.8g} ({norm:.8g}); tuning on several "
                            "ranks needs the same model, batch and loss on every rank: pass rank 0's batch to all "
                            "(e.g. torch.distributed.broadcast_object_list) and seed the model's initialisation")


def evidence(result: Probe, key: str) -> dict[str, dict[str, float]]:
    """The probe's figures for one layer, per format: errors, non-finite values, underflow.

    ``underflow`` is the fraction of the layer's nonzero FP32 outputs that flush to zero in the
    format; ``grad_underflow`` the same for the gradients reaching its output, at the loss scale
    the format runs with (the suggested scale for FP16, none for BF16).

    Example:
        >>> evidence(Probe(0.0, {}, {}, 1.0, 0.0, (), 0, ()), "fc")
        {}
    """
    out: dict[str, dict[str, float]] = {}
    rng = result.ranges.get(key)
    for fmt in result.formats:
        m = result.get(key, fmt)
        if m is None:
            continue
        row = {"loss_err": m.loss_err, "grad_err": m.grad_err, "nonfinite": float(m.nonfinite)}
        if m.amp_at:  # its rounding reaches an amplifying op: the most that can do there (autoprec.probe._amplify)
            row["amp"] = m.amp
        if m.members > 1:  # the errors are its role's, measured with this many layers cast at once
            row["shared"] = float(m.members)
        if rng is not None:
            half_sub = info(fmt).subnormal / 2
            scale = result.loss_scale if fmt == "fp16" else 1.0
            row["underflow"] = round(rng.below(half_sub), 6)
            row["grad_underflow"] = round(rng.below(half_sub, grads=True, scale=scale), 6)
        out[fmt] = row
    return out


def suggest_scale(grad_absmax: float, headroom: float) -> float:
    """The largest power-of-two loss scale that keeps ``grad_absmax * headroom`` inside FP16.

    Example:
        >>> suggest_scale(1e-3, 8.0)
        4194304.0
    """
    if grad_absmax <= 0 or not math.isfinite(grad_absmax):
        return 2.0 ** 16
    exp = math.floor(math.log2(info("fp16").max / (grad_absmax * headroom)))
    return 2.0 ** max(0, min(exp, 48))
