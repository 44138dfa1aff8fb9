"""Amplification: how a layer's rounding grows in the op its output feeds (stage 2, probe).

A probe pass measures the error a 16-bit layer adds at the loss and gradients on the tuning batch.
That figure holds on other batches where the ops downstream respond smoothly to small changes. Some
do not: a softmax over large logits (a rounding of 1e-3 in ``q`` is 100 in a logit of 1e5: the
winner flips on some batches and not on others), a top-k route whose scores nearly tie, a
normalisation by a small variance. For those, the error measured on one batch says little about the
next, so the probe also measures how far each pass moves the *inputs* of such ops (the consumers),
against the FP32 reference on the same batch, and turns that into the error it can cause at the
consumer's output on any data:

- **softmax** (``softmax``, ``log_softmax``, ``logsumexp``): a perturbation whose spread along the
  softmax's dim is ``S`` (in logits) changes every probability by a factor within ``exp(±S)``;
  whatever the margins between the scores, the output can move by ``min(2, expm1(S))`` (L1).
- **exp** (``exp``, ``exp2``, ``expm1``): relative output error ``expm1(max |Δ|)``.
- **centring** (``layer_norm``, ``group_norm``, ``batch_norm``, ``instance_norm``, ``var``, ``std``):
  what is left of the perturbation after the mean is removed, over the group's standard deviation
  (with the op's ``eps``): a value of 1000 with a spread of 0.01 turns a rounding of 2 into 200.
- **route** (``topk``, ``argmax``, ``argmin``, ``sort``, ``argsort``, ``kthvalue``): the share ``f`` of
  rows whose margin between the k-th and (k+1)-th score is below the perturbation's spread, i.e. whose
  choice flips, with a density estimate (rows within 8x the spread, over 8) where the tuning rows are
  too few to contain a near-tie; the figure is ``sqrt(f)``: a flipped row changes its own contribution
  to the gradients wholesale, and contributions of many rows add in quadrature, so ``f`` of them move
  the gradients by about ``sqrt(f)`` of their norm (one flip in 256 tokens: 0.06).

The figure compared with the gradient bound is the largest over the consumers a pass reaches, with
the consumer's name and the relative size of the perturbation at its input ("feeds attn::softmax:
rounding of 1e-3 becomes 2 at its output"). :func:`autoprec.search` refuses a format whose figure
exceeds the bound, for the producer and everything that reaches the consumer through it alike.
Cost: the reference pass keeps at most :data:`MAX_ELEMENTS` input elements per consumer call, and
each probe pass compares against them on the device; :meth:`Amplification.read` is one host read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..trace._trace import Trace

__all__ = ["AMPLIFIERS", "MAX_ELEMENTS", "Amplification", "Consumer", "Reach", "Tee", "consumers", "gain", "rows",
           "tee"]

#: op -> how it amplifies a perturbation of its input
AMPLIFIERS: dict[str, str] = {
    **{op: "softmax" for op in ("softmax", "log_softmax", "logsumexp")},
    **{op: "exp" for op in ("exp", "exp2", "expm1")},
    **{op: "centring" for op in ("layer_norm", "group_norm", "batch_norm", "instance_norm", "var", "std",
                                 "var_mean", "std_mean")},
    **{op: "route" for op in ("topk", "argmax", "argmin", "sort", "argsort", "kthvalue")},
}

#: input elements kept per consumer call by the reference pass (a leading slice of its rows)
MAX_ELEMENTS = 1 << 20

#: the route estimate's density window: rows within this many spreads of a flip, over it
_WINDOW = 8.0


@dataclass(frozen=True)
class Consumer:
    """An op that amplifies what it is fed: its layer key, its kind and how its input splits into rows."""

    key: str
    kind: str                 # a value of AMPLIFIERS
    op: str
    dims: tuple[int, ...] | None = None   # a module's normalised/softmax dims (None: read from the call)
    eps: float = 0.0


@dataclass(frozen=True)
class Reach:
    """What one pass did to the consumers it reached: the largest output error it can cause, where, and
    the relative perturbation at that consumer's input."""

    error: float = 0.0
    at: str = ""
    rounding: float = 0.0

    def describe(self) -> str:
        """The sentence the report shows.

        Example:
            >>> Reach(2.0, "attn::softmax", 1e-3).describe()
            'feeds attn::softmax: rounding of 0.001 becomes 2 at its output'
        """
        return f"feeds {self.at}: rounding of {self.rounding:.2g} becomes {self.error:.2g} at its output"


def consumers(trace: Trace, modules: Mapping[str, nn.Module]) -> dict[str, Consumer]:
    """The layers of ``trace`` that amplify their input, by key.

    Example:
        >>> from autoprec.trace import trace
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Softmax(-1))
        >>> sorted((k, c.kind, c.dims) for k, c in consumers(trace(m, torch.ones(2, 4), device_type="cpu"),
        ...                                                  dict(m.named_modules())).items())
        [('1', 'centring', (-1,)), ('2', 'softmax', (-1,))]
    """
    out = {}
    for lay in trace.layers:
        ops = [o for o in lay.ops if o in AMPLIFIERS]
        if not ops or (lay.kind == "module" and len(set(lay.ops)) > 1):  # a module doing more than one op
            continue
        op = ops[0]
        dims, eps = None, 0.0
        if lay.kind == "module":
            dims, eps = _module_dims(modules.get(lay.key))
        out[lay.key] = Consumer(lay.key, AMPLIFIERS[op], op, dims, eps)
    return out


def _module_dims(module: nn.Module | None) -> tuple[tuple[int, ...] | None, float]:
    if isinstance(module, nn.LayerNorm):
        return tuple(range(-len(module.normalized_shape), 0)), float(module.eps)
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        return ((-1 if module.dim is None else module.dim),), 0.0
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return None, float(module.eps)   # per channel (dim 1): read from the op name
    if isinstance(module, nn.GroupNorm):
        return None, float(module.eps)
    return None, 0.0


def rows(consumer: Consumer, args: tuple, kwargs: dict, z: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """``z`` as a 2-D (rows, elements) FP32 view along the consumer's dims, its ``eps``, and ``k`` (routes).

    Example:
        >>> r, eps, k = rows(Consumer("s", "softmax", "softmax"), (torch.zeros(2, 3, 4), 1), {}, torch.zeros(2, 3, 4))
        >>> tuple(r.shape), k
        ((8, 3), 1)
    """
    op, eps, k = consumer.op, consumer.eps, 1
    dims = consumer.dims
    if dims is None:
        dims, eps, k = _call_dims(op, args, kwargs, z, eps)
    dims = tuple(d % z.dim() for d in dims) if z.dim() else ()
    rest = [d for d in range(z.dim()) if d not in dims]
    moved = z.detach().float().permute(*rest, *dims) if z.dim() else z.detach().float().reshape(1)
    n = math.prod(z.shape[d] for d in dims) if dims else 1
    flat = moved.reshape(-1, max(n, 1))
    keep = max(1, MAX_ELEMENTS // max(n, 1))
    return flat[:keep, :MAX_ELEMENTS], eps, k


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _call_dims(op: str, args: tuple, kwargs: dict, z: torch.Tensor, eps: float) -> tuple[tuple[int, ...], float, int]:
    nd = z.dim()
    if op in ("softmax", "log_softmax", "logsumexp", "sort", "argsort"):
        dim = _arg(args, kwargs, 1, "dim", -1)
        return ((dim if dim is not None else -1),) if isinstance(dim, int) else tuple(dim), eps, 1
    if op in ("topk", "kthvalue"):
        k = int(_arg(args, kwargs, 1, "k", 1))
        return (_arg(args, kwargs, 2, "dim", -1),), eps, k
    if op in ("argmax", "argmin"):
        dim = _arg(args, kwargs, 1, "dim", None)
        return (tuple(range(nd)) if dim is None else (dim,)), eps, 1
    if op == "layer_norm":
        shape = _arg(args, kwargs, 1, "normalized_shape", (z.shape[-1],))
        return tuple(range(-len(shape), 0)), float(_arg(args, kwargs, 4, "eps", 1e-5)), 1
    if op == "group_norm":
        return tuple(range(1, nd)), float(_arg(args, kwargs, 4, "eps", 1e-5)), 1
    if op == "batch_norm":
        return tuple(d for d in range(nd) if d != 1), eps or 1e-5, 1
    if op == "instance_norm":
        return tuple(range(2, nd)), eps or 1e-5, 1
    if op in ("var", "std", "var_mean", "std_mean"):
        dim = _arg(args, kwargs, 1, "dim", None)
        return (tuple(range(nd)) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))), eps, 1
    return tuple(range(nd)), eps, 1   # exp: element by element (rows of everything: the max is what counts)


def gain(kind: str, ref: torch.Tensor, got: torch.Tensor, *, eps: float = 0.0, k: int = 1,
         largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(the output error a perturbation ``got - ref`` can cause, its relative size at the input), both 0-d
    tensors on the device: ``ref`` and ``got`` are (rows, elements) FP32 (see :func:`rows`).

    Example:
        >>> ref = torch.tensor([[1e5, 0.99e5, 0.0]])
        >>> e, r = gain("softmax", ref, ref + torch.tensor([[100.0, -100.0, 0.0]]))
        >>> round(float(e), 3), round(float(r), 4)
        (2.0, 0.001)
        >>> e, _ = gain("softmax", torch.tensor([[1.0, 2.0]]), torch.tensor([[1.001, 2.0]]))
        >>> round(float(e), 4)
        0.001
    """
    delta = got - ref
    rel = delta.abs().amax() / ref.abs().amax().clamp_min(1e-30)
    if kind == "softmax":
        spread = (delta.amax(1) - delta.amin(1)).amax()
        err = torch.expm1(spread).clamp(max=2.0)
    elif kind == "exp":
        err = torch.expm1(delta.abs().amax())
    elif kind == "centring":
        centred = delta - delta.mean(1, keepdim=True)
        sd = (ref.var(1, unbiased=False, keepdim=True) + eps).sqrt().clamp_min(1e-30) if ref.shape[1] > 1 else \
            torch.full_like(ref[:, :1], math.sqrt(eps) if eps > 0 else 1e-30)
        err = (centred.abs() / sd).amax()
    else:  # route
        err = _flips(ref if largest else -ref, delta if largest else -delta, k)
    err = torch.nan_to_num(err.float(), nan=math.inf)
    return err, torch.nan_to_num(rel.float(), nan=math.inf)


def _flips(ref: torch.Tensor, delta: torch.Tensor, k: int) -> torch.Tensor:
    n = ref.shape[1]
    if n <= k:
        return torch.zeros((), device=ref.device)
    top = ref.topk(k + 1, dim=1).values
    margin = top[:, k - 1] - top[:, k]
    spread = delta.amax(1) - delta.amin(1)
    within = (margin <= spread).float().mean()
    near = (margin <= _WINDOW * spread).float().mean() / _WINDOW
    return torch.maximum(within, near).sqrt()


def _first_float(tree: Any) -> torch.Tensor | None:
    for t in pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    return None


class Amplification:
    """A watcher (:class:`autoprec.runtime.Watcher`) of the consumers' inputs.

    The reference pass (``record=True``) keeps each consumer call's input rows; every later pass
    (``record=False``, the same batch) compares its inputs with them on the device. :meth:`read` then
    gives the pass's :class:`Reach` in one host read, and starts the next pass.

    Example:
        >>> c = {"s": Consumer("s", "softmax", "softmax", (-1,))}
        >>> amp = Amplification(c)
        >>> amp.enter("s", "op", ((torch.tensor([[1e5, 0.99e5]]),), {}))
        >>> amp.compare()
        >>> amp.enter("s", "op", ((torch.tensor([[1e5 + 100, 0.99e5]]),), {}))
        >>> amp.read().describe()
        'feeds s: rounding of 0.001 becomes 2 at its output'
    """

    def __init__(self, found: Mapping[str, Consumer]) -> None:
        self.consumers = dict(found)
        self.recording = True
        self.ref: dict[str, list[torch.Tensor]] = {}
        self._calls: dict[str, int] = {}
        self._got: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def enter(self, key: str, kind: str, inputs: tuple) -> None:
        consumer = self.consumers.get(key)
        if consumer is None:
            return
        args, kwargs = inputs  # the runtime's (args, kwargs)
        z = _first_float(args)
        if z is None or not z.numel():
            return
        i = self._calls.get(key, 0)
        self._calls[key] = i + 1
        with torch.no_grad():
            got, eps, k = rows(consumer, tuple(args), dict(kwargs), z)
            if self.recording:
                self.ref.setdefault(key, []).append(got.clone())
                return
            ref = self.ref.get(key, [])
            if i >= len(ref) or ref[i].shape != got.shape:  # a data-dependent call: nothing to compare
                return
            largest = bool(_arg(tuple(args), dict(kwargs), 3, "largest", True)) and consumer.op != "argmin"
            err, rel = gain(consumer.kind, ref[i], got, eps=eps, k=k, largest=largest)
            self._got.append((key, err, rel))

    def exit(self, key: str, kind: str, raw: Any, final: Any) -> None:
        pass

    def compare(self) -> None:
        """The reference is recorded: from now on each pass is compared with it."""
        self.recording = False
        self._calls, self._got = {}, []

    def read(self) -> Reach:
        """This pass's largest output error over the consumers it reached (one host read); resets for the next."""
        got, self._got, self._calls = self._got, [], {}
        if not got:
            return Reach()
        values = torch.stack([torch.stack([e, r.to(e.device)]) for _, e, r in got]).tolist()
        i = max(range(len(got)), key=lambda j: values[j][0])
        return Reach(float(values[i][0]), got[i][0], float(values[i][1])) if values[i][0] > 0 else Reach()


class Tee:
    """Two watchers as one (the runtime takes one).

    Example:
        >>> calls = []
        >>> class W:
        ...     def enter(self, *a): calls.append("enter")
        ...     def exit(self, *a): calls.append("exit")
        >>> t = Tee(W(), W()); t.enter("k", "op", ()); t.exit("k", "op", None, None); calls
        ['enter', 'enter', 'exit', 'exit']
    """

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def enter(self, key: str, kind: str, inputs: tuple) -> None:
        self.first.enter(key, kind, inputs)
        self.second.enter(key, kind, inputs)

    def exit(self, key: str, kind: str, raw: Any, final: Any) -> None:
        self.first.exit(key, kind, raw, final)
        self.second.exit(key, kind, raw, final)


def tee(first: Any, second: Any | None) -> Any:
    """``first`` and ``second`` as one watcher (``first`` alone when there is no second)."""
    return first if second is None else Tee(first, second)

