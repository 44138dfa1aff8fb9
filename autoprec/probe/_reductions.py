"""Fused device reductions of the probe: a pass's error against the FP32 reference, gradient norms, ranges.

Everything here runs on the tensors' device with fused ops (``torch._foreach_*`` over all gradients,
one histogram kernel per tensor) and leaves the result there; a caller reads it with one host
transfer. A per-parameter loop with a host read each (``float(...)`` per gradient) costs a device
sync per parameter on a GPU and, on a CPU, was as slow as a whole forward+backward of GPT-2 small
(``benchmarks/probe_cost.py``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["relative_errors", "grad_norm", "log2_hist", "finite_absmax", "HIST_LO", "HIST_HI", "HIST_BINS"]

#: log2 histogram bounds: bucket i counts values with floor(log2|x|) == HIST_LO + i
HIST_LO, HIST_HI = -160, 130
HIST_BINS = HIST_HI - HIST_LO


def log2_hist(t: torch.Tensor) -> torch.Tensor:
    """log2 histogram of the finite nonzero values of ``t``, on its device (no host sync).

    Example:
        >>> h = log2_hist(torch.tensor([0.0, 0.75, 1.0, 3.0, float("inf")]))
        >>> {HIST_LO + i: int(n) for i, n in enumerate(h) if n}
        {-1: 1, 0: 1, 1: 1}
    """
    x = t.detach().float().abs().flatten()
    e = torch.frexp(x).exponent - 1  # floor(log2|x|), int32
    e = e.clamp_(HIST_LO, HIST_HI - 1) - HIST_LO
    e = torch.where((x > 0) & torch.isfinite(x), e, HIST_BINS)  # zeros and Inf/NaN go to a bin that is dropped
    ones = torch.ones((), dtype=torch.int64, device=x.device).expand(e.numel())
    return torch.zeros(HIST_BINS + 1, dtype=torch.int64, device=x.device).index_add_(0, e, ones)[:HIST_BINS]


def finite_absmax(t: torch.Tensor) -> torch.Tensor:
    """Largest finite |value| of ``t`` (0 for none), as a 0-d FP64 tensor on its device.

    Example:
        >>> finite_absmax(torch.tensor([-3.0, float("inf"), 2.0]))
        tensor(3., dtype=torch.float64)
    """
    x = t.detach()
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    return torch.where(torch.isfinite(x), x.abs(), 0).amax().double()


def relative_errors(loss: torch.Tensor, grads: Sequence[torch.Tensor | None], ref_loss: torch.Tensor,
           ref_grads: Sequence[torch.Tensor | None], *, reuse: bool = False,
           ref_norm: torch.Tensor | None = None) -> tuple[float, float, bool]:
    """(loss relative error, gradient relative L2 error, all finite) against a reference.

    Computed on the gradients' device with fused reductions (``torch._foreach_*``) and read with
    one host transfer. ``reuse=True`` overwrites ``grads`` with their difference to the reference
    (for gradients nobody reads afterwards, as :class:`autoprec.probe.Runner` hands them out: it
    saves a copy of every gradient); ``ref_norm`` is the reference's L2 norm (:func:`grad_norm`),
    when known.

    Example:
        >>> r = [torch.tensor([3.0, 4.0]), None]
        >>> relative_errors(torch.tensor(1.1), [torch.tensor([3.0, 4.5]), None], torch.tensor(1.0), r)
        (0.10000002384185791, 0.1, True)
        >>> relative_errors(torch.tensor(1.0), [torch.tensor([float("inf"), 4.0]), None], torch.tensor(1.0), r)
        (inf, inf, False)
    """
    got = [(g, r) for g, r in zip(grads, ref_grads) if r is not None and g is not None and r.numel()]
    missing = [r for g, r in zip(grads, ref_grads) if r is not None and g is None and r.numel()]
    if reuse:
        diffs = [g for g, _ in got]
        if diffs:
            torch._foreach_sub_(diffs, [r for _, r in got])
    else:
        diffs = list(torch._foreach_sub([g for g, _ in got], [r for _, r in got])) if got else []
    num = _norm(diffs + missing, loss)
    den = grad_norm(ref_grads, loss) if ref_norm is None else ref_norm.to(num)
    loss_err = (loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12)
    l_err, l_val, n, d = torch.stack([loss_err.double().reshape(()), loss.double().reshape(()), num, den]).tolist()
    if not math.isfinite(l_val):
        return math.inf, math.inf, False
    if not _TINY < n < math.inf:  # a non-finite gradient, or an FP32 sum of squares out of range: look closer
        amax = torch.stack(torch._foreach_norm(diffs, math.inf)).tolist() if diffs else []
        if not all(math.isfinite(a) for a in amax):  # a difference is finite iff its gradient is
            return math.inf, math.inf, False
        n = float(_norm(diffs + missing, loss, torch.float64))
    if not _TINY < d < math.inf:
        d = float(grad_norm(ref_grads, loss, torch.float64))
    grad_err = n / d if d > 0 else (0.0 if n == 0 else math.inf)
    return l_err, grad_err, True


#: below this, an FP32 norm may have lost elements whose squares underflow (|x| < ~1e-19): for n
#: elements they add at most n * 1e-38 to the squares, negligible against 1e-24 up to n ~ 1e8
_TINY = 1e-12


def _norm(tensors: list[torch.Tensor], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """L2 norm over all ``tensors`` as a 0-d FP64 tensor: per-tensor norms fused (squares summed in
    ``dtype``, default the tensors' own), combined in FP64."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=like.device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)).double())


def grad_norm(grads: Sequence[torch.Tensor | None], like: torch.Tensor,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """L2 norm over all gradients (None skipped), a 0-d FP64 tensor on ``like``'s device.

    Example:
        >>> grad_norm([torch.tensor([3.0]), None, torch.tensor([4.0])], torch.zeros(()))
        tensor(5., dtype=torch.float64)
    """
    return _norm([g for g in grads if g is not None and g.numel()], like, dtype)
