"""What ``autoprec.guard`` costs per training step, next to the same policy installed by ``apply``.

**Benchmark shapes** (``--models``, default ``gpt2 llama``): the transformers models at the size
``compile_speed.py`` and ``cpu_speed.py`` time (``_zoo.build(name, "large")``: width 256, 4 layers,
8 x 128 tokens), every ``Linear`` / GPT-2 ``Conv1D`` in BF16 (a hand-written CPU policy, no tune),
trained with Adam (forward with the model's own loss, backward, ``opt.step``), each variant on its
own deep copy of the FP32 model:

* ``policy``: ``policy.apply(copy)``; ``guard``: ``autoprec.guard(copy, policy, every=50,
  check_every=0)`` with ``guard.step(loss, batch)`` after the optimizer step (the watch, no FP32 check);
* ``guard+check``: the same with ``check_every=1``: every step runs the FP32 check (two forwards of
  the step's batch, policy off and on), so ``guard+check - guard`` is the cost of one check; at the
  default ``check_every = 10 x every`` = 500 it is amortized over 500 steps;
* ``policy-compiled``, ``guard-compiled``: the policy (the guard, check off) installed, then
  ``torch.compile(copy, backend=--backend)`` (Inductor by default); warm-up steps until nothing
  compiles, not timed.

All variants interleaved (``autoprec.device._timing.Clock.rounds``: one step of each per round, the order
rotated every round), one thread. Overhead = per round, guard's step over policy's in the same round
(load that drifts cancels), minus 1; reported as the median over rounds with a 95% bootstrap interval
of that median; verdict against the issue's bound (eager 2%, compiled 1%): ``met`` where the
interval's top is under it, ``missed`` where its bottom is over it, else ``not resolved``.

**Linear stacks** (``--widths``): ``Linear(width, width)`` + GELU blocks, every Linear in BF16,
SGD; ``apply ms`` / ``guard ms`` medians of interleaved rounds of ``--steps`` steps, ``watch
us/layer`` the difference per 16-bit layer and step. The watch's work per 16-bit layer and forward is
fixed (eager: one ``aminmax`` over the output, its fold into the statistics deferred to the read, where
a fixed number of ops folds every pass of every layer; compiled: the ``aminmax`` and a few 0-dim ops in
the graph: ``tests/watch/test_guard.py`` counts them), so the overhead is largest at small widths.

``syncs/50 steps``: the guard's host reads over 50 steps (``autoprec.guard._watch._host`` counted).

Run: ``python benchmarks/guard_overhead.py [--models gpt2 llama] [--rounds 50] [--widths 256 1024]
[--backend inductor]`` (about 5 min here); ``--quick``: tiny models, 2 rounds, Dynamo's ``eager``
backend (the code path, for the tests). Writes ``benchmarks/results/guard_overhead.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare import machine

import autoprec
from autoprec import LayerEntry, Policy
from autoprec.core import call_model
from autoprec.device import Clock
from autoprec.watch import _watch

BOUND = {"eager": 2.0, "compiled": 1.0}  # issue 20: guard overhead at every=50, % of the policy's step
EVERY, CHECK_FACTOR = 50, 10


def _model(width: int, depth: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)])


def _steps(model, x, opt, n: int, guard=None) -> float:
    """Seconds per training step over ``n`` steps."""
    t = time.perf_counter()
    for _ in range(n):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if guard is not None:
            guard.step(loss, x)
    return (time.perf_counter() - t) / n


def measure(width: int, depth: int, batch: int, rounds: int, steps: int) -> dict:
    """One row: apply and guard step times for a model of ``depth`` layers of ``width``."""
    torch.manual_seed(0)
    model, x = _model(width, depth), torch.randn(batch, width)
    policy = Policy(layers={f"{i}.0": LayerEntry("bf16") for i in range(depth)}, target="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {"apply": [], "guard": []}
    reads = []
    host = _watch._host
    _watch._host = lambda table: reads.append(1) or host(table)
    try:
        for _ in range(rounds):  # interleaved: a busy moment slows both
            with policy.apply(model):
                _steps(model, x, opt, 3)
                times["apply"].append(_steps(model, x, opt, steps))
            with autoprec.guard(model, policy, every=50) as guard:
                _steps(model, x, opt, 3, guard)
                reads.clear()
                times["guard"].append(_steps(model, x, opt, steps, guard))
                syncs = len(reads) * 50 / steps
    finally:
        _watch._host = host
    a, g = statistics.median(times["apply"]), statistics.median(times["guard"])
    return {"width": width, "layers": depth, "batch": batch, "apply_ms": round(1e3 * a, 3),
            "guard_ms": round(1e3 * g, 3), "overhead_pct": round(100 * (g / a - 1), 1),
            "watch_us_per_layer": round(1e6 * (g - a) / depth, 1), "syncs_per_50_steps": syncs}


# ---------------------------------------------------------------------------------------------
# the benchmark shapes: GPT-2 and Llama from _zoo, eager and compiled
# ---------------------------------------------------------------------------------------------

def bf16_policy(model: nn.Module) -> Policy:
    """Every ``Linear`` and GPT-2 ``Conv1D`` of ``model`` in BF16 (a CPU policy, written by hand)."""
    layers = {n: LayerEntry("bf16") for n, m in model.named_modules()
              if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    return Policy(layers=layers, target="cpu")


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


class _Variant:
    """One variant's own model copy, precision installed (policy or guard), maybe compiled, and Adam."""

    def __init__(self, model: nn.Module, policy: Policy, samples: list, *, guard: bool, check_every: int = 0,
                 compiled: bool = False, backend: str = "inductor") -> None:
        self.model = copy.deepcopy(model)
        self.guard = (autoprec.guard(self.model, policy, every=EVERY, check_every=check_every) if guard
                      else None)
        self.handle = self.guard if guard else policy.apply(self.model)
        self.fn = torch.compile(self.model, backend=backend) if compiled else self.model
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.samples, self.count, self.compile_s = samples, 0, 0.0

    def step(self) -> None:
        batch, loss_fn = self.samples[self.count % len(self.samples)]
        self.count += 1
        self.opt.zero_grad(set_to_none=True)
        out = call_model(self.fn, batch)
        loss = loss_fn(out, batch) if loss_fn is not None else out.loss
        loss.backward()
        self.opt.step()
        if self.guard is not None:
            self.guard.step(loss, batch)

    def warm(self, least: int = 2, most: int = 8) -> None:
        """Untimed steps until one compiles nothing new (at least ``least``); the first's extra time is
        the compile."""
        times = []
        for i in range(most):
            g0, t = _graphs(), time.perf_counter()
            self.step()
            times.append(time.perf_counter() - t)
            if i + 1 >= least and _graphs() == g0:
                break
        self.compile_s = max(0.0, sum(times) - len(times) * min(times))


def _ci(xs: list[float], stat: Callable[[list[float]], float] = statistics.median, n: int = 2000) -> list[float]:
    """95% bootstrap interval of ``stat(xs)`` (fixed seed: the same figures re-print the same interval)."""
    rng = random.Random(0)
    boots = sorted(stat([rng.choice(xs) for _ in xs]) for _ in range(n))
    return [boots[int(0.025 * n)], boots[int(0.975 * n) - 1]]


def _verdict(ci_pct: list[float], bound: float) -> str:
    return "met" if ci_pct[1] <= bound else "missed" if ci_pct[0] > bound else "not resolved"


def _overhead(guard: list[float], policy: list[float], bound: float) -> dict[str, Any]:
    """Per-round paired ratio guard / policy - 1, in %: median, quartiles, 95% interval, verdict."""
    pct = [100 * (g / p - 1) for g, p in zip(guard, policy)]
    q1, _, q3 = statistics.quantiles(pct, n=4) if len(pct) > 1 else [pct[0]] * 3
    ci = _ci(pct)
    return {"median_pct": round(statistics.median(pct), 2), "quartiles_pct": [round(q1, 2), round(q3, 2)],
            "ci95_pct": [round(c, 2) for c in ci], "bound_pct": bound, "verdict": _verdict(ci, bound)}


def _syncs(v: _Variant) -> int:
    """The guard's host reads (``_watch._host`` calls) over ``EVERY`` more steps of ``v``."""
    reads: list[int] = []
    host = _watch._host
    _watch._host = lambda table: reads.append(1) or host(table)
    try:
        for _ in range(EVERY):
            v.step()
    finally:
        _watch._host = host
    return len(reads)


def watch_ops(model: nn.Module, policy: Policy, batch: Any, reps: int = 30) -> tuple[float, int]:
    """(seconds, calls): the watch's own ops over one forward of ``batch``, timed alone.

    One forward under ``autoprec.runtime._apply.watched`` keeps each 16-bit layer's raw output; then the
    watch's observers (``Watch(...).observers()``, the ones the guard installs) run on those
    outputs, all of them per repetition, then the watch folds them (``Watch.fold``, which the guard runs once
    per read, here once per forward: an upper bound), ``reps`` times: the median repetition. A noise-free
    floor of the eager overhead (without the Python of the hook that hands them the output).
    """
    from autoprec.runtime import watched

    outs: list[tuple[str, torch.Tensor]] = []
    m = copy.deepcopy(model)
    handle = watched(policy, m, {k: (lambda out, k=k: outs.append((k, out.detach()))) for k in policy.layers})
    try:
        with torch.no_grad():
            call_model(m, batch)
    finally:
        handle.remove()
    watch = _watch.Watch(list(policy.layers), "cpu")
    observers = watch.observers()
    calls = [(observers[k], t) for k, t in outs]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for observe, t in calls:
            observe(t)
        watch.fold()  # the fold of this forward's passes: the guard folds once per read, so an upper bound
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(calls)


def measure_model(name: str, size: str, rounds: int, backend: str, compiled: bool = True) -> dict[str, Any]:
    """One row: step times of every variant on ``_zoo.build(name, size)``, overheads and verdicts."""
    import _zoo
    from compile_speed import compile_clean

    spec = _zoo.build(name, size, heldout=0, train=2)
    compile_clean(spec.model)
    policy = bf16_policy(spec.model)
    build = {"model": spec.model, "policy": policy, "samples": spec.train}
    variants = {"policy": _Variant(**build, guard=False), "guard": _Variant(**build, guard=True),
                "guard+check": _Variant(**build, guard=True, check_every=1)}
    if compiled:
        variants["policy-compiled"] = _Variant(**build, guard=False, compiled=True, backend=backend)
        variants["guard-compiled"] = _Variant(**build, guard=True, compiled=True, backend=backend)
    try:
        for v in variants.values():
            v.warm()
        graphs = _graphs()
        times = Clock(torch.device("cpu"), 0.0).rounds({k: v.step for k, v in variants.items()},
                                                       least=rounds, most=rounds, warmup=0)
        recompiles = _graphs() - graphs  # Dynamo graphs compiled in the timed rounds, any variant
        syncs = _syncs(variants["guard-compiled" if compiled else "guard"])
        ops_s, ops_calls = watch_ops(spec.model, policy, spec.train[0][0])
    finally:
        for v in variants.values():
            v.handle.remove()
        torch._dynamo.reset()
    med = {k: statistics.median(t) for k, t in times.items()}
    check = [c - g for c, g in zip(times["guard+check"], times["guard"])]
    per_check = statistics.median(check)
    row: dict[str, Any] = {
        "model": name, "size": size, "layers_bf16": len(policy.layers), "rounds": rounds,
        "params": sum(p.numel() for p in spec.model.parameters()),
        "median_ms": {k: round(1e3 * m, 2) for k, m in med.items()},
        "overhead_eager": _overhead(times["guard"], times["policy"], BOUND["eager"]),
        "watch_ops_ms_per_forward": round(1e3 * ops_s, 3), "watch_ops_calls": ops_calls,
        "watch_ops_pct": round(100 * ops_s / med["policy"], 2),
        "check_ms": round(1e3 * per_check, 2), "check_ci95_ms": [round(1e3 * c, 2) for c in _ci(check)],
        "check_forward_ratio": round(per_check / med["policy"], 3),
        "check_amortized_pct": round(100 * per_check / (CHECK_FACTOR * EVERY) / med["policy"], 3),
        "syncs_per_50_steps": syncs,
    }
    if compiled:
        row["backend"] = backend
        row["overhead_compiled"] = _overhead(times["guard-compiled"], times["policy-compiled"], BOUND["compiled"])
        row["compile_s"] = {k: round(variants[k].compile_s, 1) for k in ("policy-compiled", "guard-compiled")}
        row["graphs_compiled_in_timed_rounds"] = recompiles
    return row


def table(models: list[dict[str, Any]], stacks: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"# guard overhead, {meta['cpu']}, torch {meta['torch']}, 1 thread, every={EVERY}",
           ("| model | policy ms | guard ms | overhead eager (q1..q3; 95% CI) | bound | verdict | "
            "policy-compiled ms | guard-compiled ms | overhead compiled (q1..q3; 95% CI) | bound | verdict | "
            "watch ops alone ms (% of policy step) | "
            "FP32 check ms (95% CI) | check / policy step | check amortized at check_every=500 | syncs/50 steps |"),
           "|---|---:|---:|---|---:|---|---:|---:|---|---:|---|---:|---|---:|---:|---:|"]

    def cell(o: dict[str, Any]) -> str:
        q, c = o["quartiles_pct"], o["ci95_pct"]
        return f"{o['median_pct']:+.2f}% ({q[0]:+.1f}..{q[1]:+.1f}; {c[0]:+.2f}..{c[1]:+.2f})"

    for r in models:
        m, e, c = r["median_ms"], r["overhead_eager"], r.get("overhead_compiled")
        comp = (f"{m['policy-compiled']} | {m['guard-compiled']} | {cell(c)} | {c['bound_pct']}% | {c['verdict']}"
                if c else "- | - | - | - | -")
        out.append(f"| {r['model']} | {m['policy']} | {m['guard']} | {cell(e)} | {e['bound_pct']}% | "
                   f"{e['verdict']} | {comp} | {r['watch_ops_ms_per_forward']} ({r['watch_ops_pct']}%) | {r['check_ms']} ({r['check_ci95_ms'][0]}..{r['check_ci95_ms'][1]}) | "
                   f"{r['check_forward_ratio']:.2f} | {r['check_amortized_pct']:.3f}% | {r['syncs_per_50_steps']} |")
    if stacks:
        header = ("width", "layers", "batch", "apply_ms", "guard_ms", "overhead_pct", "watch_us_per_layer",
                  "syncs_per_50_steps")
        out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in stacks]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--size", default="large", choices=["large", "default", "quick"])
    parser.add_argument("--rounds", type=int, default=50, help="interleaved rounds, one step of each variant")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend ('none': no compiled variants)")
    parser.add_argument("--widths", type=int, nargs="*", default=[256, 1024])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--stack-rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=EVERY,
                        help="steps per round of the Linear stacks (a guard per round: at least every=50 to read)")
    parser.add_argument("--quick", action="store_true", help="tiny: quick models, 2 rounds, backend eager")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "guard_overhead.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.rounds, args.backend, args.widths, args.stack_rounds, args.steps = \
            "quick", 2, "eager", [32], 2, 3
    logging.getLogger("autoprec").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()
    t0, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # before compiling: Inductor's CPU kernels keep the thread count they see
    try:
        models = [measure_model(m, args.size, args.rounds, args.backend, compiled=args.backend != "none")
                  for m in args.models]
        stacks = [measure(w, args.depth, args.batch, args.stack_rounds, args.steps) for w in args.widths]
    finally:
        torch.set_num_threads(threads)
    meta = {**machine(), "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
            "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
            "date": time.strftime("%Y-%m-%d"), "every": EVERY, "check_every_default": CHECK_FACTOR * EVERY,
            "backend": args.backend, "size": args.size, "rounds": args.rounds, "optimizer": "Adam(lr=1e-4)",
            "seconds": round(time.perf_counter() - t0)}
    result = {"meta": meta, "models": models, "rows": stacks}
    print(table(models, stacks, meta))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
