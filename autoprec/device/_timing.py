"""Timing kernels on the device for :mod:`autoprec.device._calibration`: forward+backward steps, interleaved, least time.

Every step runs as a training step does: forward under ``torch.autocast`` in the format (inputs
already in it, weights FP32 and cast by autocast, as in the runtime's regions), then backward,
with parameter gradients reset. Inputs come from a private generator, never the global RNG.

What a figure measures is throughput, seconds per call as a training step's stream of kernels runs
them: after a warm-up, one sample calls a step ``k`` times back to back between a start and an end
event and synchronizes once (:meth:`Clock.sample`); ``k`` makes a sample last about
:data:`SAMPLE_S`. On CUDA the events are ``torch.cuda.Event`` on the timed device's current stream
and the synchronize is that device's, so the launch latency that a synchronize around every call
would add to a small kernel is not counted, and a step that the host cannot launch as fast as the
GPU runs it is priced at the host's pace. On a CPU the same loop runs with :class:`HostEvent`, the
host clock.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core._formats import to_dtype
from ..trace._trace import Layer
from ._costs import ELEMENTWISE, Curve

__all__ = ["Clock", "HostEvent", "curve", "elementwise", "layer_step", "monotone", "pinned", "region"]

#: A format more than this many times slower than FP32 at a size is not timed at larger sizes (a CPU
#: without FP16 kernels: its large sizes alone would outlast the budget); its times there are the
#: larger sizes' FP32 times at the last measured ratio.
GIVE_UP = 16.0


#: Seconds one timed sample should last: a callable shorter than this is called back to back ``k``
#: times in one sample (``k`` from its time after a warm-up), so the per-call figure is the
#: throughput of a stream of calls: the GPU's launch latency and the one synchronize per sample are
#: spread over ``k`` calls instead of added to each.
SAMPLE_S = {"cuda": 2e-3, "cpu": 1e-3}
#: The most calls in one sample.
MOST_CALLS = 1000


class HostEvent:
    """The host clock with the interface of ``torch.cuda.Event`` that :class:`Clock` uses: ``record``
    and ``elapsed_time`` (milliseconds), so that a CPU runs the same timing loop as a GPU.

    Example:
        >>> ticks = iter([1.0, 1.5])
        >>> start, end = HostEvent(lambda: next(ticks)), HostEvent(lambda: next(ticks))
        >>> start.record(); end.record()
        >>> start.elapsed_time(end)
        500.0
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.at = math.nan

    def record(self, stream: Any = None) -> None:
        self.at = self.clock()

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.at - self.at) * 1e3


def pinned(device: str | torch.device) -> torch.device:
    """``device`` with its index: ``cuda`` is the current CUDA device, ``cuda:N`` stays ``N`` (no CUDA
    call then), anything else is itself. Timing on a device times its own stream and synchronizes it.

    Example:
        >>> pinned("cuda:1"), pinned("cpu")
        (device(type='cuda', index=1), device(type='cpu'))
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Clock:
    """Times forward+backward closures, interleaved across formats, until a deadline.

    One *sample* of a closure calls it ``k`` times back to back between two events (CUDA events on
    ``device``'s current stream; :class:`HostEvent` on a CPU) and synchronizes once, after the end
    event: its figure is the elapsed time over ``k``, seconds per call of a stream of calls (the
    throughput), not the latency of one call with a synchronize around it. ``k`` comes from the
    closure's time after a warm-up call, so that a sample lasts about ``sample_s``. ``sync`` and
    ``event`` are the synchronize and the event factory used; ``timed`` counts the calls made.

    Example:
        >>> clock = Clock(torch.device("cpu"), time.perf_counter() + 1.0)
        >>> sorted(clock.fastest({"a": lambda: None, "b": lambda: None}))
        ['a', 'b']
        >>> clock.timed >= 4  # a warm-up and at least one round each
        True
    """

    def __init__(self, device: torch.device, deadline: float, *, sample_s: float | None = None) -> None:
        self.device = pinned(device)
        cuda = self.device.type == "cuda"
        self.sync: Callable[[], None] = (lambda: torch.cuda.synchronize(self.device)) if cuda else (lambda: None)
        self.event: Callable[[], Any] = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else HostEvent
        self.sample_s = SAMPLE_S.get(self.device.type, SAMPLE_S["cpu"]) if sample_s is None else sample_s
        self.deadline = deadline
        self.timed = 0

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sample(self, fn: Callable[[], None], calls: int = 1) -> float:
        """Seconds per call of ``fn`` called ``calls`` times back to back: an event before the first
        and after the last, one synchronize, the elapsed time over ``calls``.

        Example:
            >>> n = []
            >>> Clock(torch.device("cpu"), 0.0).sample(lambda: n.append(1), calls=4) >= 0, len(n)
            (True, 4)
        """
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            start, end = self.event(), self.event()
            start.record()
            for _ in range(calls):
                fn()
            end.record()
        self.sync()
        self.timed += calls
        return start.elapsed_time(end) / 1e3 / calls

    def once(self, fn: Callable[[], None]) -> float:
        """Seconds of one call of ``fn`` (a sample of one call): a warm-up, a first estimate."""
        return self.sample(fn, 1)

    def calls(self, seconds: float) -> int:
        """Calls of a closure of ``seconds`` per call in one sample: enough to last ``sample_s``.

        Example:
            >>> clock = Clock(torch.device("cpu"), 0.0, sample_s=1e-3)
            >>> clock.calls(1e-4), clock.calls(5e-3), clock.calls(0.0)
            (10, 1, 1000)
        """
        return max(1, min(MOST_CALLS, int(self.sample_s / max(seconds, 1e-9))))

    def warm(self, fn: Callable[[], None]) -> tuple[float, int]:
        """A warm-up call of ``fn`` (first calls pay one-off costs: not a figure), then, if it was shorter
        than a sample, a second call as the estimate: ``(seconds per call, calls per sample)``."""
        t = self.once(fn)
        if t < self.sample_s:
            t = self.once(fn)
        return t, self.calls(t)

    def fastest(self, fns: Mapping[str, Callable[[], None]], reps: int = 5, slice_s: float = 0.25) -> dict[str, float]:
        """Least seconds per call of each closure over up to ``reps`` interleaved rounds of one sample
        each within ``slice_s`` and the budget (at least one round), after a warm-up each. The least,
        not the median: other load on the machine only ever adds time, and a profile is read for
        ratios between formats timed side by side."""
        first = {k: self.warm(f) for k, f in fns.items()}
        per_round = sum(t * n for t, n in first.values())
        rounds = max(1, min(reps, int(min(slice_s, self.left()) / max(per_round, 1e-9))))
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                times[k].append(self.sample(f, first[k][1]))
        return {k: min(v) for k, v in times.items()}

    def rounds(self, fns: Mapping[str, Callable[[], None]], *, least: int = 3, most: int = 9,
               warmup: int = 1) -> dict[str, list[float]]:
        """Seconds per call of each closure in every round: ``warmup`` untimed calls of each first, then
        rounds that take one sample of every closure, the order rotating by one each round (load on the
        machine and whatever a call leaves behind hit them alike): at least ``least`` rounds, and more
        while the deadline allows, up to ``most``. A sample makes as many calls as the last warm-up call
        says fill ``sample_s``; with ``warmup=0``, one. For medians and spreads of whole steps (see
        :mod:`autoprec.verify._step_speed`).

        Example:
            >>> clock = Clock(torch.device("cpu"), time.perf_counter())  # no time left: ``least`` rounds
            >>> {k: len(v) for k, v in clock.rounds({"a": lambda: None, "b": lambda: None}).items()}
            {'a': 3, 'b': 3}
        """
        names = list(fns)
        calls = dict.fromkeys(names, 1)
        for _ in range(warmup):
            for k in names:
                calls[k] = self.calls(self.once(fns[k]))
        times: dict[str, list[float]] = {k: [] for k in names}
        r = 0
        while r < least or (r < most and self.left() > 0):
            shift = r % max(len(names), 1)
            for k in names[shift:] + names[:shift]:
                times[k].append(self.sample(fns[k], calls[k]))
            r += 1
        return times

    def paired(self, a: Callable[[], None], b: Callable[[], None], reps: int = 15, slice_s: float = 0.4) -> float:
        """Median over rounds of ``a``'s seconds per call minus ``b``'s, a sample of each back to back (in
        turn first), both of as many calls as fill ``sample_s`` for the slower: a small difference
        between two steps that load on the machine slows alike."""
        (ta, _), (tb, _) = self.warm(a), self.warm(b)
        calls = self.calls(max(ta, tb))
        rounds = max(3, min(reps, int(min(slice_s, max(self.left(), 0.0)) / max((ta + tb) * calls, 1e-9))))
        diffs = []
        for r in range(rounds):
            if r % 2:
                tb, ta = self.sample(b, calls), self.sample(a, calls)
            else:
                ta, tb = self.sample(a, calls), self.sample(b, calls)
            diffs.append(ta - tb)
        return statistics.median(diffs)


def _autocast(device: torch.device, fmt: str) -> Any:
    return torch.autocast(device.type, dtype=to_dtype(fmt), enabled=fmt != "fp32")


def _step(fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor] = ()) -> Callable[[], None]:
    """A closure running ``fn`` forward and backward (parameter gradients reset, as in a training step)."""
    grad: list[torch.Tensor] = []

    def run() -> None:
        for p in params:
            p.grad = None
        out = fn()
        if not grad:
            grad.append(torch.ones_like(out))
        out.backward(grad[0])
    return run


def _rand(shape: Sequence[int], fmt: str, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen, device="cpu").to(device=device, dtype=to_dtype(fmt))
    return x.requires_grad_(True)


def _kernels(kind: str, n: int, fmt: str, device: torch.device, gen: torch.Generator) -> tuple[float, Callable]:
    """Forward FLOPs and the step of one ladder point."""
    if kind == "matmul":
        w = nn.Parameter(torch.randn(n, n, generator=gen).to(device))
        x = _rand((n, n), fmt, device, gen)

        def mm() -> torch.Tensor:
            with _autocast(device, fmt):
                return F.linear(x, w)
        return 2.0 * n ** 3, _step(mm, [w])
    if kind == "conv":
        w = nn.Parameter(torch.randn(n, n, 3, 3, generator=gen).to(device) * 0.1)
        x = _rand((8, n, 16, 16), fmt, device, gen)

        def conv() -> torch.Tensor:
            with _autocast(device, fmt):
                return F.conv2d(x, w, padding=1)
        return 2.0 * 8 * n * 16 * 16 * n * 9, _step(conv, [w])
    q, k, v = (_rand((4, 4, n, 64), fmt, device, gen) for _ in range(3))

    def attn() -> torch.Tensor:
        with _autocast(device, fmt):
            return F.scaled_dot_product_attention(q, k, v)
    return 4.0 * 4 * 4 * n * n * 64, _step(attn)


def curve(kind: str, sizes: Sequence[int], formats: Sequence[str], clock: Clock, device: torch.device,
           gen: torch.Generator) -> Curve:
    """The ``kind`` kernel timed at ``sizes`` (GEMM sides, conv channels or attention lengths) in each
    format until the clock's deadline (the two smallest always), made non-decreasing.

    Example:
        >>> clock = Clock(torch.device("cpu"), time.perf_counter() + 1.0)
        >>> c = curve("matmul", (16, 32), ("fp32", "bf16"), clock, torch.device("cpu"), torch.Generator())
        >>> c.flops
        (8192.0, 65536.0)
    """
    flops, secs = [], {f: [] for f in formats}
    gave_up: dict[str, float] = {}
    for i, n in enumerate(sizes):
        if i >= 2 and clock.left() <= 0:
            break
        steps = {}
        for f in formats:
            fl, steps[f] = _kernels(kind, n, f, device, gen)
        timed = clock.fastest({f: s for f, s in steps.items() if f not in gave_up})
        flops.append(fl)
        for f in formats:
            secs[f].append(timed[f] if f in timed else timed["fp32"] * gave_up[f])
            if f != "fp32" and f not in gave_up and timed[f] > GIVE_UP * timed["fp32"]:
                gave_up[f] = timed[f] / timed["fp32"]
    return Curve(kind, tuple(flops), {f: monotone(s) for f, s in secs.items()})


def monotone(times: Sequence[float]) -> tuple[float, ...]:
    """The closest non-decreasing sequence (least squares in log time: pool adjacent violators), so
    that a noisy point neither makes a larger size cheaper nor lifts every size after it.

    Example:
        >>> [round(x, 3) for x in monotone([1.0, 4.0, 1.0, 8.0])]
        [1.0, 2.0, 2.0, 8.0]
    """
    blocks: list[list[float]] = []  # [mean log time, count]
    for t in times:
        blocks.append([math.log(t), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (a, n), (b, m) = blocks[-2], blocks.pop()
            blocks[-1] = [(a * n + b * m) / (n + m), n + m]
    return tuple(math.exp(v) for v, n in blocks for _ in range(int(n)))


def elementwise(formats: Sequence[str], clock: Clock, device: torch.device,
                 gen: torch.Generator) -> tuple[dict[str, dict[str, tuple[float, float]]], dict[str, float]]:
    """Per call and per element seconds of each elementwise class, and per element cast seconds.

    Example:
        >>> clock = Clock(torch.device("cpu"), time.perf_counter() + 1.0)
        >>> rates, cast = elementwise(("fp32", "bf16"), clock, torch.device("cpu"), torch.Generator())
        >>> sorted(rates), sorted(cast)
        (['accumulation', 'norm', 'pointwise', 'softmax'], ['bf16'])
    """
    small, large = 1 << 12, 1 << 18

    def ops(kind: str, n: int, fmt: str) -> Callable[[], None]:
        x = _rand((n // 256, 256), fmt, device, gen)
        if kind == "pointwise":
            return _step(lambda: F.gelu(x))
        if kind == "norm":
            w = nn.Parameter(torch.ones(256, device=device, dtype=x.dtype))
            return _step(lambda: F.layer_norm(x, (256,), w), [w])
        if kind == "softmax":
            return _step(lambda: torch.softmax(x, -1))
        if kind == "accumulation":
            rows = x.reshape(-1, 16)
            index = torch.randint(0, 600, (rows.shape[0],), generator=gen).to(device)
            return _step(lambda: torch.zeros(600, 16, device=device, dtype=x.dtype).index_add(0, index, rows))
        y = _rand((n // 256, 256), "fp32", device, gen)  # a cast down and back up
        return _step(lambda: y.to(to_dtype(fmt)).float())

    out: dict[str, dict[str, tuple[float, float]]] = {}
    cast: dict[str, float] = {}
    for kind in ELEMENTWISE + ("cast",):
        fmts = [f for f in formats if f != "fp32"] if kind == "cast" else list(formats)
        t_small = clock.fastest({f: ops(kind, small, f) for f in fmts}, slice_s=0.05)
        t_large = clock.fastest({f: ops(kind, large, f) for f in fmts}, slice_s=0.2)
        for f in fmts:
            per_elem = max((t_large[f] - t_small[f]) / (large - small), 1e-15)
            per_call = max(t_small[f] - per_elem * small, 0.0)
            if kind == "cast":
                cast[f] = per_elem / 2  # each way
            else:
                out.setdefault(kind, {})[f] = (per_call, per_elem)
    return out, cast


def region(formats: Sequence[str], clock: Clock, device: torch.device, gen: torch.Generator) -> dict[str, float]:
    """Seconds one 16-bit region of the runtime adds per call (forward+backward) over an FP32 layer:
    a stack of tiny Linears with the runtime installed, all in the format against all in FP32.

    Example:
        >>> clock = Clock(torch.device("cpu"), time.perf_counter() + 1.0)
        >>> region(("fp32", "bf16"), clock, torch.device("cpu"), torch.Generator())["bf16"] >= 0
        True
    """
    from ..runtime._runtime import Runtime

    n = 32
    units = [str(i) for i in range(n)]
    x = torch.randn(4, 8, generator=gen).to(device)
    models, runtimes = {}, []
    try:
        for f in formats:
            models[f] = nn.Sequential(*[nn.Linear(8, 8) for _ in range(n)]).to(device)
            runtimes.append(Runtime(models[f], {u: f for u in units}, units=units, device_type=device.type).install())
        steps = {f: _step(lambda m=m: m(x), list(m.parameters())) for f, m in models.items()}
        return {f: max(clock.paired(steps[f], steps["fp32"]), 0.0) / n for f in formats if f != "fp32"}
    finally:
        for r in runtimes:
            r.remove()


_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "matmul": torch.matmul, "bmm": torch.bmm, "mm": torch.mm,
    "scaled_dot_product_attention": F.scaled_dot_product_attention,
    "softmax": lambda x: torch.softmax(x, -1), "log_softmax": lambda x: torch.log_softmax(x, -1),
}


def layer_step(layer: Layer, module: nn.Module | None, fmt: str, device: torch.device,
                gen: torch.Generator) -> Callable[[], None] | None:
    """The forward+backward step of one layer at its own shapes in ``fmt``, or None where it cannot be
    made from shapes alone (several inputs to a module, integer inputs, an op outside ``_OPS``).

    Example:
        >>> from autoprec.trace import trace
        >>> m = nn.Sequential(nn.Linear(8, 8))
        >>> lay = trace(m, torch.randn(4, 8), device_type="cpu").layers[0]
        >>> step = layer_step(lay, m[0], "bf16", torch.device("cpu"), torch.Generator())
        >>> step() is None and m[0].weight.grad.dtype == torch.float32
        True
    """
    if layer.kind == "module":
        if module is None or len(layer.in_shapes) != 1:
            return None
        x = _rand(layer.in_shapes[0], fmt, device, gen)

        def fwd() -> torch.Tensor:
            with _autocast(device, fmt):
                out = module(x)
            return out if isinstance(out, torch.Tensor) else next(t for t in out if isinstance(t, torch.Tensor))
        return _step(fwd, [p for p in module.parameters() if p.requires_grad])
    op = _OPS.get(layer.op)
    if op is None or not layer.in_shapes:
        return None
    args = [_rand(s, fmt, device, gen) for s in layer.in_shapes]

    def call() -> torch.Tensor:
        with _autocast(device, fmt):
            return op(*args)
    return _step(call)
