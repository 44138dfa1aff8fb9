"""One probe measurement pass: some layers cast to one format, the rest FP32, compared with FP32.

:class:`Measure` runs a pass through the probe's :class:`~autoprec.probe.Runner` and hands back an
:class:`Outcome`: the errors at the loss and the gradients, and per cast layer the non-finite values
it emitted and whether its output came back full width. A layer measured alone gets its own
:class:`Measurement` row; a role measured as a group (:mod:`autoprec.probe._roles`) gives each member a
row carrying the group's errors, marked with the role and the number of layers cast at once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch.utils import _pytree as pytree

from ..core._formats import to_dtype
from ._amplify import Amplification, Reach, tee
from ._records import Measurement
from ._reductions import grad_norm, relative_errors

if TYPE_CHECKING:
    from ._runner import Runner

log = logging.getLogger("autoprec.probe")

__all__ = ["CountWatcher", "Outcome", "Measure"]


class CountWatcher:
    """Counts the non-finite values each cast layer emits in a measurement run (on the device: read once).

    Example:
        >>> w = CountWatcher(["fc"])
        >>> w.exit("fc", "module", torch.tensor([1.0, float("inf")]), None)
        >>> w.read(), w.full_width("fc")
        ({'fc': 1}, True)
    """

    def __init__(self, keys: Iterable[str], *, sdpa_paths: bool = False, dtype: torch.dtype | None = None) -> None:
        self.count: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, set[torch.dtype]] = {k: set() for k in keys}  # floating dtypes of its own output
        self.sdpa_paths = sdpa_paths  # ask torch which SDPA kernel runs (the policy's own device, not emulated)
        self.dtype = dtype  # the regions' format: the SDPA kernel is chosen for the inputs as the region casts them
        self.wide: set[str] = set()   # layers torch ran on a path that computes 16-bit inputs in FP32

    def read(self) -> dict[str, int]:
        """The counts per layer, as ints (one host sync)."""
        keys = list(self.count)
        got = torch.stack([self.count[k].to(self.count[keys[0]].device) for k in keys]).tolist() if keys else []
        counts = dict(zip(keys, got))
        return {k: int(counts.get(k, 0)) for k in self.dtypes}

    def full_width(self, key: str) -> bool:
        """Whether ``key`` computed in FP32 although its region was 16-bit: its output came out FP32/FP64,
        or torch chose SDPA's math kernel for it, which computes half/bfloat16 inputs in FP32."""
        return key in self.wide or (bool(self.dtypes[key]) and self.dtypes[key] <= {torch.float32, torch.float64})

    def enter(self, key: str, kind: str, inputs: tuple) -> None:
        if self.sdpa_paths and kind == "op" and key in self.dtypes and _is_sdpa(key) and _math_sdpa(*inputs,
                                                                                                    self.dtype):
            self.wide.add(key)

    def exit(self, key: str, kind: str, raw: Any, final: Any) -> None:
        if key not in self.dtypes:
            return
        for t in pytree.tree_leaves(raw):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                bad = (~torch.isfinite(t.detach())).sum()
                self.count[key] = self.count[key] + bad if key in self.count else bad
                self.dtypes[key].add(t.dtype)


def _is_sdpa(key: str) -> bool:
    return key.rpartition("::")[2].startswith("scaled_dot_product_attention")


def _math_sdpa(args: tuple, kwargs: dict, dtype: torch.dtype | None = None) -> bool:
    """Whether torch runs this ``scaled_dot_product_attention`` call on its math kernel (on a CPU: a mask
    that requires grad, dropout), which computes half/bfloat16 inputs in FP32. ``dtype``: the format the
    region casts the floating inputs to before the call (the kernel choice depends on it: flash attention
    takes only 16-bit inputs); torch is asked about inputs of that dtype, allocated, not computed.

    Example:
        >>> q = torch.randn(1, 2, 4, 8)
        >>> _math_sdpa((q, q, q), {}), _math_sdpa((q, q, q, torch.zeros(4, 4, requires_grad=True)), {})
        (False, True)
        >>> _math_sdpa((q, q, q), {}, torch.bfloat16)
        False
    """
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    bound = {**dict(zip(names, args)), **kwargs}
    if dtype is not None:  # as the region will call it: floating inputs in its format (a bool mask stays)
        bound = {k: torch.empty_like(v, dtype=dtype, requires_grad=v.requires_grad)
                 if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in bound.items()}
    try:
        choice = torch._fused_sdp_choice(bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
                                         float(bound.get("dropout_p", 0.0)), bool(bound.get("is_causal", False)),
                                         scale=bound.get("scale"))
        return torch.is_grad_enabled() and choice == int(torch.nn.attention.SDPBackend.MATH)
    except (AttributeError, KeyError, RuntimeError, TypeError) as exc:  # an older torch, an unusual call
        log.debug("no SDPA kernel choice for this call (%s): not flagged as computing in FP32", exc)
        return False


@dataclass(frozen=True)
class Outcome:
    """What one pass measured: errors against FP32, and per cast layer its non-finite count and width."""

    loss_err: float
    grad_err: float
    finite: bool                  # loss and all gradients finite
    nonfinite: dict[str, int]     # cast layer -> Inf/NaN values in its own output
    full_width: dict[str, bool]   # cast layer -> its output came back FP32 from the 16-bit region
    reach: Reach = Reach()        # what the pass did to the amplifying ops it reached

    def row(self, key: str, fmt: str, group: str = "", members: int = 1) -> Measurement:
        """The :class:`Measurement` of ``key`` from this pass (``group``: the role it was measured with).

        Example:
            >>> o = Outcome(0.001, 0.002, True, {"h.0.fc": 0, "h.1.fc": 0}, {"h.0.fc": False, "h.1.fc": False})
            >>> o.row("h.1.fc", "bf16", "h.*.fc", 2).members
            2
        """
        r = self.reach
        return Measurement(key, fmt, self.loss_err, self.grad_err, self.nonfinite[key], self.finite,
                           full_width=self.full_width[key], group=group, members=members,
                           amp=r.error, amp_at=r.at, amp_in=r.rounding)


class Measure:
    """Runs measurement passes on the probe's first batch against its FP32 reference.

    Example:
        >>> from autoprec.probe import Runner
        >>> from autoprec.trace import trace
        >>> m, x = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()), torch.ones(4, 8)
        >>> r = Runner(m, None, trace(m, x, device_type="cpu"), device_type="cpu", emulate_fp16=True, seed=0)
        >>> ref_loss, ref_grads = r.run(x, {})
        >>> Measure(r, x, ref_loss, ref_grads, 1.0, None).alone("0", "bf16").finite
        True
    """

    def __init__(self, runner: Runner, batch: Any, ref_loss: torch.Tensor, ref_grads: list, scale: float,
                 progress: Callable[[str], None] | None, amp: Amplification | None = None) -> None:
        self.runner, self.batch, self.scale, self.progress = runner, batch, scale, progress
        self.amp = amp  # compares each pass's amplifying inputs with the reference's (autoprec.probe._amplify)
        self.ref = (ref_loss, ref_grads, grad_norm(ref_grads, ref_loss))

    def run(self, name: str, keys: Sequence[str], fmt: str) -> Outcome | str:
        """One pass with ``keys`` in ``fmt`` (FP16 at the loss scale); the exception's text where it cannot run.

        ``name`` (the layer or role measured) goes to the progress callback.
        """
        # on the policy's own device torch's SDPA kernel choice is known; emulating CUDA, the GPU's is not this
        counter = CountWatcher(keys, sdpa_paths=not self.runner.emulate_cuda, dtype=to_dtype(fmt))
        try:
            loss, grads = self.runner.run(self.batch, {k: fmt for k in keys},
                                          scale=self.scale if fmt == "fp16" else 1.0, watcher=tee(counter, self.amp))
        except Exception as exc:  # noqa: BLE001 - a format a layer cannot run is a measurement
            if self.amp is not None:
                self.amp.read()  # what the failed pass left: not the next pass's
            if self.progress is not None:
                self.progress(name)
            return f"{type(exc).__name__}: {str(exc)[:200]}"
        ref_loss, ref_grads, ref_norm = self.ref
        loss_err, grad_err, finite = relative_errors(loss, grads, ref_loss, ref_grads, reuse=True, ref_norm=ref_norm)
        del loss, grads  # this pass's gradients go before the next pass makes its own
        if self.progress is not None:
            self.progress(name)
        reach = self.amp.read() if self.amp is not None else Reach()
        return Outcome(loss_err, grad_err, finite, counter.read(), {k: counter.full_width(k) for k in keys}, reach)

    def alone(self, key: str, fmt: str) -> Measurement:
        """The measurement of ``key`` alone in ``fmt``."""
        got = self.run(key, (key,), fmt)
        if isinstance(got, str):
            return Measurement(key, fmt, math.inf, math.inf, 0, False, error=got)
        return got.row(key, fmt)
