"""CPU training-step speed under torch.compile: FP32, blanket BF16 autocast, autoprec's CPU policy, eager and compiled.

autoprec's runtime runs a policy by swapping each patched module's class for one whose ``forward``
enters the region's ``torch.autocast`` itself, so that ``torch.compile`` traces the policy with
no graph break. This script checks that claim where BF16 pays on a CPU with native BF16: the
transformers models at their large config (``_zoo.build(name, "large")``: width 256, 4 layers,
8 x 128 tokens or 64-px images). For each model it tunes a CPU policy
(``autoprec.tune(model, batch, loss_fn, target="cpu")``; tune never changes the model) and times a
full training step (forward, backward, AdamW step) of six variants, each on its own deep copy of
the FP32 model made before any variant ran:

* ``fp32-eager``, ``fp32-compiled``: plain FP32;
* ``amp-bf16-eager``, ``amp-bf16-compiled``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around
  the forward (and the model's own loss);
* ``policy-eager``, ``policy-compiled``: ``policy.apply(copy)`` once, before compiling.

Compiled = ``torch.compile(copy)`` (default Inductor backend, ``--backend`` to change it). Each
variant warms up until a step compiles nothing new (at least ``--warmup`` steps); that compile
time is reported on its own and kept out of the step times. Then ``--repeats`` rounds, the variants
interleaved (order rotated every round), ``--steps`` timed steps of each variant per round, one
thread; the step time is the median over all timed steps.

Graph breaks: ``torch._dynamo.explain`` on one forward, FP32 / under blanket autocast / with the
policy installed (the same count for the eager and the compiled variant). Recompiles: Dynamo graphs
compiled after a variant's first step (warm-up or timed), with the guard failures behind them.

Target: on benign models (blanket BF16 within autoprec's default bounds of FP32 on the tuning batch:
loss relative error <= 0.01, gradient relative L2 error <= 0.05) the compiled policy's step is within
5% of compiled blanket autocast's (ratio <= 1.05).

Run:  python benchmarks/compile_speed.py [--models gpt2 llama vit resnet] [--repeats 15] [--steps 3]
      python benchmarks/compile_speed.py --models gpt2 --size quick --backend aot_eager  # quick check
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _zoo
import torch
from _measure import (
    Fidelity,
    amp_variant,
    fidelity,
    forward_loss,
    fp32_variant,
    grads_of,
    loss_of,
    median,
)
from compare import machine

import autoprec
from autoprec.core import call_model

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("gpt2", "llama", "bert", "vit", "resnet", "convnext")
DEFAULT_MODELS = ("gpt2", "llama", "vit", "resnet")
VARIANTS = ("fp32-eager", "fp32-compiled", "amp-bf16-eager", "amp-bf16-compiled", "policy-eager", "policy-compiled")
TARGET = 1.05   # compiled policy / compiled blanket BF16, on benign models
BENIGN = {"loss": 0.01, "grad": 0.05}  # autoprec's default tolerance and grad_tolerance


# ---------------------------------------------------------------------------------------------
# one variant: its own model copy, eager or compiled, and how a step runs it
# ---------------------------------------------------------------------------------------------

@dataclass
class Runner:
    """One variant's model copy and training state. ``fn`` is what a step calls (the copy, or its
    ``torch.compile`` wrapper); ``context()`` is entered around the forward (blanket autocast), ``around()``
    around the whole step, backward and optimizer included, compiling steps too (global flags such as TF32)."""

    name: str
    model: torch.nn.Module
    fn: Callable[..., Any]
    optimizer: torch.optim.Optimizer
    context: Callable[[], Any] = nullcontext
    scaler: Any = None
    handle: Any = None
    compiled: bool = False
    around: Callable[[], Any] = nullcontext
    # filled in by time_steps
    warmup_s: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    graphs: int = 0          # new Dynamo graphs compiled by the first step (one another variant compiled
    #                          already, for the same code and guards, is reused and not counted)
    recompiles: int = 0      # Dynamo graphs compiled after the first step
    recompile_reasons: list[str] = field(default_factory=list)
    peak_mib: float | None = None


def make_runner(name: str, model: torch.nn.Module, *, compiled: bool, backend: str = "inductor",
                context: Callable[[], Any] = nullcontext, scaler: Any = None, handle: Any = None,
                optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
                around: Callable[[], Any] = nullcontext) -> Runner:
    """``model`` must already be this variant's own copy, with its precision installed (``handle``)."""
    optimizer = optimizer or (lambda p: torch.optim.AdamW(p, lr=1e-4))
    fn = torch.compile(model, backend=backend) if compiled else model
    return Runner(name, model, fn, optimizer(model.parameters()), context, scaler, handle, compiled, around)


def _dynamo_state() -> tuple[int, int]:
    """(Dynamo graphs compiled so far, guard failures recorded so far), process-wide."""
    from torch._dynamo.utils import counters, guard_failures
    return counters["stats"]["unique_graphs"], sum(len(v) for v in guard_failures.values())


def _new_guard_failures(n_before: int) -> list[str]:
    from torch._dynamo.utils import guard_failures
    reasons = [str(r) for v in guard_failures.values() for r in v]
    return reasons[n_before:]


def train_step(r: Runner, sample: Any, sync: Callable[[], None]) -> float:
    """One timed training step: forward (+ loss), backward, optimizer step. Returns seconds."""
    batch, loss_fn = sample
    with r.around():
        sync()
        t0 = time.perf_counter()
        r.optimizer.zero_grad(set_to_none=True)
        with r.context():
            loss = loss_of(call_model(r.fn, batch), batch, loss_fn)
        if r.scaler is not None:
            r.scaler.scale(loss.float()).backward()
            r.scaler.step(r.optimizer)
            r.scaler.update()
        else:
            loss.float().backward()
            r.optimizer.step()
        sync()
        return time.perf_counter() - t0


def time_steps(runners: list[Runner], samples: list[Any], *, repeats: int, steps: int = 1, warmup: int = 2,
               max_warmup: int = 8, measure_peak: bool = False,
               progress: Callable[[Runner], None] | None = None) -> None:
    """Time training steps of every runner (results in its ``times``, ``warmup_s``, ``graphs``, ...).

    Warm-up: each runner alone, at least ``warmup`` steps and until a step compiles no new Dynamo
    graph (at most ``max_warmup``). Then ``repeats`` rounds with the runners interleaved (order
    rotated every round), ``steps`` consecutive timed steps of each per round, on one CPU thread
    (set before the compiling steps: Inductor's CPU kernels keep it). A model on a GPU is
    synchronised around each step. Graphs compiled after a runner's first step are its recompiles
    (with the guard failures that caused them). ``measure_peak``: on a GPU, the memory one extra
    steady-state step adds at its peak over what was allocated before it (every runner's weights
    and optimizer state). ``progress(runner)`` is called after each runner's warm-up.
    """
    cuda = next(runners[0].model.parameters()).is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # before the first (compiling) step: Inductor's CPU kernels keep this count
    try:
        _time_steps(runners, samples, cuda, sync, repeats, steps, warmup, max_warmup, measure_peak, progress)
    finally:
        torch.set_num_threads(threads)


def _time_steps(runners: list[Runner], samples: list[Any], cuda: bool, sync: Callable[[], None], repeats: int,
                steps: int, warmup: int, max_warmup: int, measure_peak: bool,
                progress: Callable[[Runner], None] | None = None) -> None:
    def step(r: Runner, i: int, first: bool = False) -> float:
        graphs0, fails0 = _dynamo_state()
        dt = train_step(r, samples[i % len(samples)], sync)
        graphs1, _ = _dynamo_state()
        if first:
            r.graphs += graphs1 - graphs0
        elif graphs1 > graphs0:
            r.recompiles += graphs1 - graphs0
            r.recompile_reasons += _new_guard_failures(fails0)
        return dt

    for r in runners:
        for i in range(max(max_warmup, 1)):
            before = r.recompiles
            r.warmup_s.append(step(r, i, first=i == 0))
            if i + 1 >= warmup and (i == 0 and r.graphs == 0 or i > 0 and r.recompiles == before):
                break
        if progress is not None:
            progress(r)
    for rep in range(repeats):
        k = rep % len(runners)
        for r in runners[k:] + runners[:k]:
            for s in range(steps):
                r.times.append(step(r, rep * steps + s))
    if measure_peak and cuda:
        for r in runners:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(r, 0)
            r.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20


def paired_ratios(a: Runner, b: Runner, steps: int) -> list[float]:
    """Per round, ``a``'s median step over ``b``'s: both ran in the same round, close in time, so load
    that drifts over the run cancels; the spread of these ratios shows how noisy the machine was."""
    n = min(len(a.times), len(b.times)) // steps
    return [median(a.times[i * steps:(i + 1) * steps]) / median(b.times[i * steps:(i + 1) * steps]) for i in range(n)]


def quartiles(xs: list[float]) -> list[float]:
    """[first quartile, median, third quartile] of ``xs`` (the one value three times for a single one)."""
    if len(xs) < 2:
        return [median(xs)] * 3
    q = statistics.quantiles(xs, n=4)
    return [q[0], median(xs), q[2]]


def compile_seconds(r: Runner) -> float:
    """Warm-up time beyond what the same number of steady steps take: the compile (and first-step) cost."""
    if not r.warmup_s or not r.times:
        return math.nan
    return max(0.0, sum(r.warmup_s) - len(r.warmup_s) * median(r.times))


# ---------------------------------------------------------------------------------------------
# graph breaks
# ---------------------------------------------------------------------------------------------

def _args(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def graph_breaks(model: torch.nn.Module, batch: Any, context: Callable[[], Any] = nullcontext) -> dict[str, Any]:
    """``torch._dynamo.explain`` of one forward of ``model`` (run as it is: pass a copy) inside ``context``.

    explain resets Dynamo before and after: call it before compiling anything that is still to run.
    """
    args, kwargs = _args(batch)
    with context():
        ex = torch._dynamo.explain(model)(*args, **kwargs)
    reasons = []
    for b in ex.break_reasons:
        frame = b.user_stack[-1] if getattr(b, "user_stack", None) else None
        where = f" ({os.path.basename(frame.filename)}:{frame.lineno})" if frame is not None else ""
        reasons.append(f"{str(b.reason).splitlines()[0][:200]}{where}")
    return {"graphs": ex.graph_count, "breaks": ex.graph_break_count, "reasons": reasons}


# ---------------------------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------------------------

def _blanket_error(model: torch.nn.Module, sample: Any) -> Fidelity:
    """Blanket BF16 autocast against FP32 on one forward+backward (copies of ``model``)."""
    m = copy.deepcopy(model)
    loss = forward_loss(m, sample, fp32_variant())
    loss.float().backward()
    ref = (float(loss.detach()), grads_of(m))
    return fidelity(model, sample, amp_variant("bf16"), ref)


def compile_clean(model: torch.nn.Module) -> torch.nn.Module:
    """Take the two Dynamo hazards of the transformers models out of the way, the same in every variant:

    * ``GPT2LMHeadModel`` has no ``loss_type`` transformers recognises: every loss logs a warning,
      a graph break; name the loss it falls back to anyway (``ForCausalLM``);
    * the classification loss sets ``config.problem_type`` on its first call, so every compiled
      model recompiles on its second step; set it first (integer labels, several classes).

    Returns ``model``.
    """
    if hasattr(model, "loss_type") and getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    config = getattr(model, "config", None)
    if (type(model).__name__.endswith("ForImageClassification") and getattr(config, "problem_type", "") is None
            and getattr(config, "num_labels", 1) > 1):
        config.problem_type = "single_label_classification"
    return model


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = _zoo.build(name, args.size, heldout=0, train=2)
    compile_clean(spec.model)
    # every variant's own copy, and the explain copies, made from the FP32 model before anything ran
    copies = {v: copy.deepcopy(spec.model) for v in VARIANTS}
    probes = {k: copy.deepcopy(spec.model) for k in ("fp32", "amp-bf16", "policy")}
    t0 = time.perf_counter()
    policy = autoprec.tune(spec.model, spec.tune[0], spec.tune[1], target="cpu", progress=False)
    tune_s = time.perf_counter() - t0
    blanket = _blanket_error(spec.model, spec.tune)
    benign = (not blanket.nonfinite and blanket.loss_err <= BENIGN["loss"] and blanket.grad_err <= BENIGN["grad"])

    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    batch = spec.train[0][0]
    breaks = {"fp32": graph_breaks(probes["fp32"], batch)}
    breaks["amp-bf16"] = graph_breaks(probes["amp-bf16"], batch, bf16)
    with policy.apply(probes["policy"]):
        breaks["policy"] = graph_breaks(probes["policy"], batch)
    torch._dynamo.reset()

    runners = []
    for v in VARIANTS:
        m = copies[v]
        kind, compiled = v.rsplit("-", 1)[0], v.endswith("-compiled")
        handle = policy.apply(m) if kind == "policy" else None
        runners.append(make_runner(v, m, compiled=compiled, backend=args.backend,
                                   context=bf16 if kind == "amp-bf16" else nullcontext, handle=handle,
                                   scaler=policy.grad_scaler("cpu") if kind == "policy" else None))
    try:
        time_steps(runners, spec.train, repeats=args.repeats, steps=args.steps, warmup=args.warmup,
                   max_warmup=args.max_warmup)
    finally:
        for r in runners:
            if r.handle is not None:
                r.handle.remove()
        torch._dynamo.reset()

    t = {r.name: median(r.times) for r in runners}
    variants: dict[str, Any] = {}
    for r in runners:
        kind, mode = r.name.rsplit("-", 1)
        variants[r.name] = {
            "mode": mode, "precision": kind, "median_s": t[r.name], "min_s": min(r.times), "n": len(r.times),
            "ratio_fp32_eager": t[r.name] / t["fp32-eager"],
            "ratio_amp_bf16_same_mode": t[r.name] / t[f"amp-bf16-{mode}"],
            "graph_breaks": breaks[kind]["breaks"], "break_reasons": breaks[kind]["reasons"],
            "warmup_steps": len(r.warmup_s), "first_step_s": r.warmup_s[0],
            "compile_s": compile_seconds(r) if r.compiled else None,
            "new_graphs_first_step": r.graphs if r.compiled else None,
            "recompiles": r.recompiles if r.compiled else None,
            "recompile_reasons": sorted(set(r.recompile_reasons))[:10],
            "times_s": r.times,
        }
    ratio = t["policy-compiled"] / t["amp-bf16-compiled"]
    paired = paired_ratios(runners[VARIANTS.index("policy-compiled")], runners[VARIANTS.index("amp-bf16-compiled")],
                           args.steps)
    return {
        "model": name, "size": args.size, "params": sum(p.numel() for p in spec.model.parameters()),
        "batch": {k: list(v.shape) for k, v in batch.items()} if isinstance(batch, Mapping) else None,
        "policy": {"tune_s": round(tune_s, 1), "low_fraction": round(policy.low_precision_fraction(), 4),
                   "counts": {p: list(policy.assignment.values()).count(p) for p in ("fp32", "bf16", "fp16")},
                   "verified": None if policy.verification is None else policy.verification.passed},
        "blanket_bf16_vs_fp32": {"loss_err": blanket.loss_err, "grad_err": blanket.grad_err,
                                 "nonfinite": blanket.nonfinite},
        "benign": benign,
        "variants": variants,
        "target": {"policy_compiled_vs_amp_bf16_compiled": ratio, "bound": TARGET, "applies": benign,
                   "met": ratio <= TARGET, "paired_ratio_quartiles": quartiles(paired)},
    }


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def header(meta: dict[str, Any]) -> str:
    return (f"CPU: {meta['cpu']} ({meta['cores']} cores), AVX512-BF16: "
            f"{'yes' if meta['avx512_bf16'] else 'no'}, AMX: {'yes' if meta['amx'] else 'no'}; torch {meta['torch']}; "
            f"autoprec {meta['commit']}; "
            f"backend {meta['backend']}; {meta['timing_threads']} thread; {meta['repeats']} rounds x "
            f"{meta['steps']} steps, interleaved, medians\n"
            f"target: on benign models (blanket BF16 within loss err <= {BENIGN['loss']}, grad err <= "
            f"{BENIGN['grad']} of FP32) compiled policy / compiled blanket BF16 <= {TARGET}")


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [header(meta), "",
           "| model | variant | step ms (median) | step ms (min) | x FP32 eager | x blanket BF16 (same mode) | "
           "graph breaks | compile s | recompiles |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        for v in VARIANTS:
            x = r["variants"][v]
            comp = "" if x["compile_s"] is None else f"{x['compile_s']:.0f}"
            rec = "" if x["recompiles"] is None else str(x["recompiles"])
            out.append(f"| {r['model']} | {v} | {1e3 * x['median_s']:.1f} | {1e3 * x['min_s']:.1f} | "
                       f"{x['ratio_fp32_eager']:.2f} | "
                       f"{x['ratio_amp_bf16_same_mode']:.2f} | {x['graph_breaks']} | {comp} | {rec} |")
    out += ["", "| model | policy BF16 share | blanket BF16 grad err vs FP32 | benign | "
            "compiled policy / compiled blanket BF16 (medians) | same, per round: q1 / median / q3 | "
            "target (<= 1.05) |",
            "| --- | ---: | ---: | :---: | ---: | ---: | :---: |"]
    for r in rows:
        tg = r["target"]
        verdict = ("met" if tg["met"] else "**missed**") if tg["applies"] else \
            f"n/a ({'met' if tg['met'] else 'missed'})"
        out.append(f"| {r['model']} | {100 * r['policy']['low_fraction']:.0f}% | "
                   f"{r['blanket_bf16_vs_fp32']['grad_err']:.1e} | {'yes' if r['benign'] else 'no'} | "
                   f"{tg['policy_compiled_vs_amp_bf16_compiled']:.3f} | "
                   f"{' / '.join(f'{q:.2f}' for q in tg['paired_ratio_quartiles'])} | {verdict} |")
    return "\n".join(out)


def _git_commit() -> str | None:
    """The repository's commit, with ``+dirty`` where autoprec/ has uncommitted changes (None outside git)."""
    import subprocess
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "autoprec"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def meta_of(args: argparse.Namespace) -> dict[str, Any]:
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return {**machine(), "commit": _git_commit(), "date": time.strftime("%Y-%m-%d"),
            "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()), "amx": bool(amx),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "backend": args.backend,
            "size": args.size, "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup,
            "inductor_caches": bool(args.cache), "optimizer": "AdamW(lr=1e-4), eager",
            "target": f"benign models: policy-compiled / amp-bf16-compiled <= {TARGET}"}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    p.add_argument("--size", default="large", choices=["large", "default", "quick"],
                   help="_zoo config (large: width 256, 4 layers, 8 x 128 tokens / 64 px)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each variant per round")
    p.add_argument("--warmup", type=int, default=2, help="least warm-up steps (more until nothing compiles)")
    p.add_argument("--max-warmup", type=int, default=8)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: fast, for tests)")
    p.add_argument("--cache", action="store_true",
                   help="keep Inductor's on-disk caches (default off, so compile times are cold)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "compile_speed.json"))
    args = p.parse_args(argv)
    logging.getLogger("autoprec").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # before compiling: Inductor's CPU kernels take the thread count it sees
    import transformers
    transformers.logging.set_verbosity_error()
    import torch._inductor.config as inductor_config
    force_disable = inductor_config.force_disable_caches
    inductor_config.force_disable_caches = not args.cache
    meta = meta_of(args)
    rows: list[dict[str, Any]] = []
    try:
        for name in args.models:
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            rows.append(run_model(name, args))
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump({"meta": meta, "results": rows}, fh, indent=1)
    finally:
        inductor_config.force_disable_caches = force_disable
    print(table(rows, meta))
    return rows


if __name__ == "__main__":
    main()
