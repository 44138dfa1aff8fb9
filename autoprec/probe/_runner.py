"""The probe's runner: one forward+backward of the private model under a precision assignment, and the FP32
ranges watched on the way."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..core._batch import LossFn, call_model, compute_loss, seed_rng
from ..core._modules import canonical_modules
from ..runtime._runtime import Runtime
from ..trace._trace import Trace
from ._records import Ranges
from ._reductions import HIST_BINS, finite_absmax, log2_hist

__all__ = ["RangeWatcher", "Runner"]


class RangeWatcher:
    """Output and gradient ranges per layer, accumulated on the device; read once by :meth:`ranges`."""

    def __init__(self) -> None:
        self.out: dict[str, list[torch.Tensor]] = {}
        self.grad: dict[str, list[torch.Tensor]] = {}
        self.nonfinite: dict[str, torch.Tensor] = {}

    def enter(self, key: str, kind: str, inputs: tuple) -> None:
        pass

    def exit(self, key: str, kind: str, raw: Any, final: Any) -> None:
        for t in pytree.tree_leaves(raw):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                _merge(self.out, key, t)
                bad = (~torch.isfinite(t.detach())).sum()
                self.nonfinite[key] = self.nonfinite[key] + bad if key in self.nonfinite else bad
        for t in pytree.tree_leaves(final):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
                t.register_hook(lambda g, key=key: _merge(self.grad, key, g))

    def ranges(self, nonfinite: dict[str, torch.Tensor]) -> dict[str, Ranges]:
        """The layers' :class:`Ranges` (``nonfinite``: counts of the measured batch), read in one transfer each."""
        keys = list(self.out)
        if not keys:
            return {}
        dev = self.out[keys[0]][0].device
        zero = [torch.zeros((), dtype=torch.float64, device=dev),
                torch.zeros(HIST_BINS, dtype=torch.int64, device=dev)]
        rows = [self.out[k] for k in keys] + [self.grad.get(k, zero) for k in keys]
        amax = torch.stack([r[0].to(dev) for r in rows]).tolist()
        hist = torch.stack([r[1].to(dev) for r in rows]).tolist()
        bad = torch.stack([torch.as_tensor(nonfinite.get(k, 0), device=dev) for k in keys]).tolist()
        n = len(keys)
        return {k: Ranges(out_absmax=amax[i], out_hist=tuple(hist[i]), grad_absmax=amax[n + i],
                          grad_hist=tuple(hist[n + i]), nonfinite=int(bad[i]))
                for i, k in enumerate(keys)}


def _merge(store: dict[str, list[torch.Tensor]], key: str, t: torch.Tensor) -> None:
    amax, hist = finite_absmax(t), log2_hist(t)
    if key in store:
        old = store[key]
        store[key] = [torch.maximum(old[0], amax), old[1] + hist]
    else:
        store[key] = [amax, hist]


class Runner:
    """Runs one forward+backward of a (private) model under a precision assignment.

    The same seed is set before every pass, so dropout masks agree between passes; the global RNG
    is forked, never advanced.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, trace: Trace, *, device_type: str,
                 emulate_fp16: bool, seed: int, emulate_cuda: bool = False) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.trace = trace
        self.device_type = device_type
        self.emulate_fp16 = emulate_fp16
        self.emulate_cuda = emulate_cuda  # a policy for CUDA measured on a CPU: CUDA autocast's rules
        self.recipes: dict[str, str] = {}  # "fp8" layer -> its torchao recipe, for every pass (see ``run``)
        self.seed = seed
        self.passes = 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.modules = canonical_modules(model)  # walked once, not once per pass

    def run(self, batch: Any, assignment: dict[str, str], *, scale: float = 1.0,
            watcher: Any = None, recipes: dict[str, str] | None = None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Loss (detached) and parameter gradients (unscaled, FP32) of one pass.

        ``"fp8"`` layers of ``assignment`` run the recipe ``recipes`` names (default: the runner's ``recipes``).

        The gradients are the parameters' own ``.grad`` tensors, taken off the parameters (no copy):
        the caller owns them, and :func:`errors` may overwrite them (``reuse=True``).
        """
        runtime = Runtime(self.model, assignment, units=self.trace.units, opaque=self.trace.opaque,
                          device_type=self.device_type, emulate_fp16=self.emulate_fp16,
                          emulate_cuda=self.emulate_cuda, watcher=watcher,
                          handoff=self.trace.handoff, modules=self.modules,
                          recipes=self.recipes if recipes is None else recipes)
        for p in self.params:
            p.grad = None
        devices = [torch.cuda.current_device()] if self.device_type == "cuda" and torch.cuda.is_available() else []
        self.passes += 1
        runtime.install()
        try:
            with torch.random.fork_rng(devices=devices):
                seed_rng(self.seed, self.device_type)
                loss = compute_loss(call_model(self.model, batch), batch, self.loss_fn)
                (loss.float() * scale).backward()
        finally:
            runtime.remove()
        grads = [None if p.grad is None else p.grad.detach().float() for p in self.params]
        for p in self.params:
            p.grad = None
        if scale != 1.0:
            torch._foreach_div_([g for g in grads if g is not None], scale)  # ours: taken off the parameters
        return loss.detach().float(), grads
