"""FP8 per Linear, measured: each ``nn.Linear``'s error when its three GEMMs run in FP8 (torchao's
``Float8Linear``), relative to the same pass with that Linear in BF16.

The rest of the model runs in its BF16 region (``torch.autocast``) in both passes, so the figures are FP8's error
over the BF16 assignment, not over FP32. On a device without FP8 GEMMs (a CPU, a GPU before sm89) torchao emulates
them (``Float8LinearConfig(emulate=True)``): the casts, scales and rounding are FP8's, the products are not fast.

The rule (:meth:`Fp8Error.judge`): forward output SQNR >= 18 dB and weight-gradient SQNR >= 17 dB, the thresholds
torchao's own ``Float8Linear`` test holds its layers to (``test/float8/test_base.py``,
``TestFloat8Linear._test_linear_impl``, pytorch/ao); the input-gradient SQNR and the loss change are reported and
can be gated too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..core._batch import LossFn, call_model, compute_loss, seed_rng
from ..core._fp8 import FP8_RECIPES, float8
from ..core._fp8 import config as fp8_config
from ..errors import FormatError, OptionError  # noqa: F401  (FormatError: the doctests)

__all__ = ["FP8_RECIPES", "Fp8Error", "Fp8Recipe", "Fp8Verdict", "fp8_errors", "fp8_linears", "linear_paths", "sqnr"]

logger = logging.getLogger("autoprec.probe")

Fp8Recipe = Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"]



class _Fp8Region(nn.Module):
    """A Linear's GEMMs in FP8: autocast off inside, the input in BF16 (as a BF16 region hands it over), the
    Parameters shared with the original Linear (no copy).

    Not ``Float8Linear`` under autocast as it is: it casts its input only under CUDA autocast (to CUDA's autocast
    dtype), so under CPU autocast the input stays FP32 while its output is BF16, and ``rowwise_with_gw_hp``'s
    high-precision weight-gradient product fails on the mixed dtypes (torchao 0.18, torch 2.13)."""

    def __init__(self, linear: nn.Linear, config: Any) -> None:
        super().__init__()
        self.inner = float8()[1].from_float(linear, config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the output's dtype is an nn.Linear's: BF16 under autocast, else the input's (a region emulating BF16)
        dtype = torch.bfloat16 if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return self.inner(x.to(torch.bfloat16)).to(dtype)


class _Tap(nn.Module):
    """Runs ``inner`` and keeps what the measurement compares: the output, and the input as its own autograd node
    (its gradient is this Linear's input gradient alone, not that of the input's other users)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.outs: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x = x.view_as(x)
            self.inputs.append(x)
        out = self.inner(x)
        self.outs.append(out)
        return out


def linear_paths(model: nn.Module) -> list[str]:
    """The paths of ``model``'s ``nn.Linear`` modules, in module order (the candidates for FP8).

    Example:
        >>> linear_paths(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
        ['0', '2']
    """
    return [name for name, m in model.named_modules() if name and isinstance(m, nn.Linear)]


@contextlib.contextmanager
def _swapped(model: nn.Module, wraps: dict[str, nn.Module]) -> Iterator[None]:
    """Replace the modules at ``wraps``' paths by their wrappers; put the originals back on every exit path."""
    originals: dict[str, nn.Module] = {}
    try:
        for path, wrapper in wraps.items():
            parent, _, leaf = path.rpartition(".")
            owner = model.get_submodule(parent)
            originals[path] = getattr(owner, leaf)
            setattr(owner, leaf, wrapper)
        yield
    finally:
        for path, original in originals.items():
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, original)


def _linears(model: nn.Module, paths: Sequence[str]) -> dict[str, nn.Linear]:
    known = dict(model.named_modules())
    bad = [p for p in paths if not p or not isinstance(known.get(p), nn.Linear)]
    if bad:
        raise OptionError(f"not nn.Linear paths of the model: {bad}; FP8 candidates are {linear_paths(model)}")
    return {p: known[p] for p in paths}


@contextlib.contextmanager
def fp8_linears(model: nn.Module, paths: Sequence[str], *, recipe: Fp8Recipe = "tensorwise") -> Iterator[nn.Module]:
    """Within the block, the Linears at ``paths`` run their GEMMs in FP8 (torchao's ``Float8Linear``, emulated
    where the device has no FP8 GEMMs); on exit the model is as it was. Run the step under BF16 autocast.

    Raises :class:`~autoprec.FormatError` naming the ``autoprec[fp8]`` extra when torchao is missing.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(16, 16))
        >>> try:
        ...     with fp8_linears(m, ["0"]):
        ...         inside = type(m[0]).__name__
        ... except FormatError:  # torchao is not installed
        ...     inside = "_Fp8Region"
        >>> inside, type(m[0]).__name__
        ('_Fp8Region', 'Linear')
    """
    linears = _linears(model, paths)
    device = next(model.parameters()).device
    config = fp8_config(recipe, device) if paths else None
    with _swapped(model, {p: _Fp8Region(m, config) for p, m in linears.items()}):
        yield model


@dataclasses.dataclass(frozen=True)
class Fp8Verdict:
    """Whether a Linear may train in FP8, and why (the figure that decided, against its bound)."""

    passed: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class Fp8Error:
    """One Linear's FP8 error relative to BF16: SQNRs in dB (higher is better; ``inf`` when equal), the loss's
    relative change, and the probe's seconds for this Linear. ``input_grad_db`` is None where the Linear's input
    needs no gradient, ``weight_grad_db`` where its weight is frozen."""

    path: str
    recipe: str
    forward_db: float
    weight_grad_db: float | None
    input_grad_db: float | None
    loss_rel: float
    seconds: float

    def judge(self, *, forward_db: float = 18.0, weight_grad_db: float = 17.0, input_grad_db: float | None = None,
              loss_rel: float | None = None) -> Fp8Verdict:
        """Pass when every gated figure meets its bound: forward >= 18 dB and weight gradient >= 17 dB by default
        (torchao's ``Float8Linear`` test); ``input_grad_db`` and ``loss_rel`` gate only when given.

        Example:
            >>> e = Fp8Error("fc", "tensorwise", 9.5, 25.0, 24.0, 0.002, 0.1)
            >>> e.judge()
            Fp8Verdict(passed=False, reason='fc: forward SQNR 9.5 dB < 18.0 dB')
            >>> e.judge(forward_db=9.0).passed
            True
        """
        checks = [("forward SQNR", self.forward_db, forward_db), ("weight-gradient SQNR", self.weight_grad_db,
                  weight_grad_db), ("input-gradient SQNR", self.input_grad_db, input_grad_db)]
        for name, value, bound in checks:
            if bound is not None and value is not None and not value >= bound:
                return Fp8Verdict(False, f"{self.path}: {name} {value:.1f} dB < {bound:.1f} dB")
        if loss_rel is not None and not self.loss_rel <= loss_rel:
            return Fp8Verdict(False, f"{self.path}: loss changes by {self.loss_rel:.2e} > {loss_rel:.2e}")
        return Fp8Verdict(True, f"{self.path}: forward {self.forward_db:.1f} dB, weight gradient "
                                f"{_db(self.weight_grad_db)}, input gradient {_db(self.input_grad_db)}")


def _db(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} dB"


def sqnr(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``other`` against ``ref`` in dB (torchao's ``compute_error``), in
    float64; ``inf`` when they are equal.

    Example:
        >>> round(sqnr(torch.ones(4), torch.full((4,), 1.1)), 1)
        20.0
    """
    ref, other = ref.detach().double(), other.detach().double()
    noise = (ref - other).square().sum().item()
    signal = ref.square().sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0.0 else -math.inf


@dataclasses.dataclass
class _Pass:
    loss: float
    outs: dict[str, torch.Tensor]
    weight_grads: dict[str, torch.Tensor | None]
    input_grads: dict[str, torch.Tensor | None]


Region = Callable[[], contextlib.AbstractContextManager]


def _run(model: nn.Module, batch: Any, loss_fn: LossFn | None, taps: dict[str, _Tap], seed: int,
         region: Region | None) -> _Pass:
    """One forward+backward in the BF16 region (BF16 autocast unless ``region``) with ``taps`` in place; the
    gradients by ``autograd.grad`` (the model's ``.grad`` fields are left alone)."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _swapped(model, taps):
        seed_rng(seed, device.type)
        with region() if region is not None else torch.autocast(device.type, dtype=torch.bfloat16):
            loss = compute_loss(call_model(model, batch), batch, loss_fn)
        weights = {p: t.inner.weight if isinstance(t.inner, nn.Linear) else t.inner.inner.weight
                   for p, t in taps.items()}
        wanted = [w for w in weights.values() if w.requires_grad] + [x for t in taps.values() for x in t.inputs]
        unique = list({id(t): t for t in wanted}.values())
        grads = dict(zip(map(id, unique), torch.autograd.grad(loss, unique, allow_unused=True)))
    return _Pass(loss=float(loss.detach()), outs={p: _flat(t.outs) for p, t in taps.items()},
                 weight_grads={p: grads.get(id(w)) for p, w in weights.items()},
                 input_grads={p: _flat([grads.get(id(x)) for x in t.inputs]) for p, t in taps.items()})


def _flat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    found = [t.detach().float().reshape(-1) for t in tensors if t is not None]
    return torch.cat(found) if found else None


def fp8_errors(model: nn.Module, batch: Any, loss_fn: LossFn | None = None, paths: Sequence[str] | None = None, *,
               recipe: Fp8Recipe = "tensorwise", seed: int = 0, region: Region | None = None) -> dict[str, Fp8Error]:
    """Each Linear's FP8 error relative to BF16: one BF16 pass for all, then per Linear one pass with that Linear
    alone in FP8 (``recipe``), the rest of the model under BF16 autocast in both. ``paths`` defaults to every
    ``nn.Linear``. The model is left as it was (modules, parameters, ``.grad``); judge with :meth:`Fp8Error.judge`.
    ``region`` (a context-manager factory) replaces BF16 autocast as the region both passes run in, e.g. BF16
    emulated in FP32 on a CPU without fast BF16 (``benchmarks/fp8.py``).

    Raises :class:`~autoprec.FormatError` naming the ``autoprec[fp8]`` extra when torchao is missing.

    Example:
        >>> _ = torch.manual_seed(0); m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 16))
        >>> try:
        ...     errors = fp8_errors(m, torch.randn(8, 32))
        ...     verdicts = {p: e.judge().passed for p, e in errors.items()}
        ... except FormatError:  # torchao is not installed
        ...     verdicts = {"0": True, "1": True}
        >>> verdicts
        {'0': True, '1': True}
    """
    paths = linear_paths(model) if paths is None else list(paths)
    linears = _linears(model, paths)
    config = fp8_config(recipe, next(model.parameters()).device)
    ref = _run(model, batch, loss_fn, {p: _Tap(m) for p, m in linears.items()}, seed, region)
    out = {}
    for path, linear in linears.items():
        start = time.perf_counter()
        got = _run(model, batch, loss_fn, {path: _Tap(_Fp8Region(linear, config))}, seed, region)
        out[path] = Fp8Error(path=path, recipe=recipe, forward_db=sqnr(ref.outs[path], got.outs[path]),
                             weight_grad_db=_maybe(ref.weight_grads[path], got.weight_grads[path]),
                             input_grad_db=_maybe(ref.input_grads[path], got.input_grads[path]),
                             loss_rel=abs(got.loss - ref.loss) / max(abs(ref.loss), 1e-30),
                             seconds=time.perf_counter() - start)
        logger.debug("fp8 %s: %s", path, out[path])
    return out


def _maybe(ref: torch.Tensor | None, other: torch.Tensor | None) -> float | None:
    return None if ref is None or other is None else sqnr(ref, other)
