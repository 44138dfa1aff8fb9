"""GPU training-step speed at production sizes: FP32 (strict and TF32), blanket BF16/FP16 autocast, autoprec;
eager and compiled.

The issue's GPU question: on models where blanket autocast is safe, is the tuned policy within 5%
of autocast's step time, and at least 1.5x faster than FP32? And does that still hold under
``torch.compile``, which fuses the casts a per-layer policy adds? Two models, random weights from
transformers configs (nothing downloaded):

* ``gpt2``: GPT-2 small (12 layers, width 768, 12 heads, vocab 50257), 8 x 1024 tokens (``--batch``,
  ``--seq``), LM loss;
* ``resnet50``: ResNet-50 (bottleneck blocks [3, 4, 6, 3], widths 256..2048), 64 x 224 px, 1000 classes;
* ``mixtral`` (on request, ``--models mixtral``): a Mixtral mixture of experts (4 layers, width 1024, 8 experts of
  width 1408, top 2, vocab 32000), 8 x 1024 tokens: the experts' grouped GEMMs, the policy against blanket BF16.

For each: tune a policy on the GPU (``autoprec.tune(model, batch)``, target = the model's device),
then time full training steps (forward, backward, GradScaler where FP16 is used, AdamW) of ten
variants, each on its own copy: the five above eager, and the same five compiled
(``torch.compile(copy)``, default Inductor backend, ``--backend`` to change it; the policy installed
with ``policy.apply(copy)`` before compiling). Each variant warms up until a step compiles nothing
new (compile time reported apart, not in the step time); then the variants run interleaved (order
rotated every round), synchronised around each step, medians. Also each variant's peak memory in
a steady-state step and the bytes its dtype casts move per step in eager mode (the memory-bound
work a per-layer policy can add over blanket autocast; the same on any device; compiled code
fuses many of them).

FP32 twice: ``fp32`` is PyTorch's default, strict FP32 matmuls (``torch.backends.cuda.matmul.allow_tf32``
off; cuDNN convolutions use TF32 by default either way); ``fp32-tf32`` switches TF32 matmuls on
around its whole step only (forward, backward, optimizer, and the warm-up steps that compile it),
and every other variant runs with them off, whatever the flag was outside. Dynamo guards the flag
(its global-state guard), so each compiled variant keeps the graph compiled under its own setting:
switching between interleaved variants compiles nothing again. Inductor's extern matmuls (cuBLAS)
read the flag when they run; its Triton matmul templates (max-autotune) read it when they compile:
both see the variant's setting. The policy is compared with both FP32 baselines.

Run:  python benchmarks/gpu_speed.py [--models gpt2 resnet50] [--rounds 20] [--batch 8 --seq 1024] [--out-dir DIR]
      python benchmarks/gpu_speed.py --device cpu --size tiny --backend aot_eager  # the same code path, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from contextlib import nullcontext

import torch
from _measure import Variant, amp_variant, cast_traffic, fp32_variant, median, policy_variant
from compare import machine
from compile_speed import Runner, compile_clean, compile_seconds, make_runner, time_steps

import autoprec
from autoprec.core import batch_to

MODELS = ("gpt2", "resnet50", "mixtral")
DEFAULT_MODELS = ("gpt2", "resnet50")  # mixtral on request (``--models mixtral``): it does not fit run.sh's budget
EAGER = ("fp32", "fp32-tf32", "amp-bf16", "amp-fp16", "autoprec")
VARIANTS = EAGER + tuple(f"{v}-compiled" for v in EAGER)
#: the variants that run with TF32 matmuls (every other one with strict FP32 matmuls)
TF32 = ("fp32-tf32", "fp32-tf32-compiled")


@contextmanager
def tf32_matmuls(on: bool) -> Iterator[None]:
    """FP32 matmuls in TF32 (``on``) or strict FP32 inside; the flag as it was after.

    ``torch.backends.cuda.matmul.allow_tf32`` (what ``torch.set_float32_matmul_precision("high")`` sets
    for CUDA; unlike that call it leaves oneDNN's CPU matmuls alone). Harmless on a CPU.

    Example:
        >>> before = torch.backends.cuda.matmul.allow_tf32
        >>> with tf32_matmuls(not before):
        ...     torch.backends.cuda.matmul.allow_tf32 == (not before)
        True
        >>> torch.backends.cuda.matmul.allow_tf32 == before
        True
    """
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def build(name: str, size: str, device: str, n_batches: int = 3, batch: int | None = None,
          seq: int | None = None) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """The model (FP32, train mode, dropout off) on ``device`` and ``n_batches`` batches for it (``batch`` rows,
    GPT-2's ``seq`` tokens each; default: the ``size``'s)."""
    import transformers as tf

    tiny = size == "tiny"
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "gpt2":
            layers, width, heads, vocab, (rows, tokens) = (2, 64, 4, 256, (2, 32)) if tiny else \
                (12, 768, 12, 50257, (8, 1024))
            batch, seq = batch or rows, seq or tokens
            model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab,
                                                     n_positions=seq, resid_pdrop=0.0, embd_pdrop=0.0,
                                                     attn_pdrop=0.0, bos_token_id=vocab - 1,
                                                     eos_token_id=vocab - 1, loss_type="ForCausalLM",
                                                     use_cache=False))  # a training run keeps no KV cache
            batches = []
            for _ in range(n_batches):
                ids = torch.randint(0, vocab, (batch, seq), generator=g)
                batches.append({"input_ids": ids, "labels": ids.clone()})
        elif name == "mixtral":  # a mixture of experts (issue 24): its experts' GEMMs, policy against blanket BF16
            layers, width, experts, vocab, (rows, tokens) = (2, 64, 4, 256, (2, 32)) if tiny else \
                (4, 1024, 8, 32000, (8, 1024))
            batch, seq = batch or rows, seq or tokens
            model = tf.MixtralForCausalLM(tf.MixtralConfig(
                vocab_size=vocab, hidden_size=width, intermediate_size=(11 * width) // 8, num_hidden_layers=layers,
                num_attention_heads=max(width // 128, 4), num_key_value_heads=max(width // 512, 2),
                num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=seq, use_cache=False,
                router_aux_loss_coef=0.0))
            batches = []
            for _ in range(n_batches):
                ids = torch.randint(0, vocab, (batch, seq), generator=g)
                batches.append({"input_ids": ids, "labels": ids.clone()})
        elif name == "resnet50":
            widths, depths, stem, (rows, px), labels = ([16, 32, 64, 128], [1, 1, 1, 1], 16, (4, 32), 10) if tiny \
                else ([256, 512, 1024, 2048], [3, 4, 6, 3], 64, (64, 224), 1000)
            batch = batch or rows
            model = tf.ResNetForImageClassification(tf.ResNetConfig(
                embedding_size=stem, hidden_sizes=widths, depths=depths, layer_type="bottleneck", num_labels=labels))
            batches = [{"pixel_values": torch.randn(batch, 3, px, px, generator=g),
                        "labels": torch.randint(0, labels, (batch,), generator=g)} for _ in range(n_batches)]
        else:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    compile_clean(model)  # no graph break or recompile of transformers' own making
    return model.float().train().to(device), [batch_to(b, torch.device(device)) for b in batches]


def _runners(copies: dict[str, torch.nn.Module], variants: dict[str, Variant], backend: str) -> list[Runner]:
    """One runner per variant on its own copy; the TF32 flag set around each one's whole step."""
    def optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=1e-4)

    runners = []
    for n in VARIANTS:
        v, m = variants[n.removesuffix("-compiled")], copies[n]
        handle = v.install(m) if v.install is not None else None
        runners.append(make_runner(n, m, compiled=n.endswith("-compiled"), backend=backend,
                                   context=nullcontext if handle is not None else (lambda v=v, m=m: v.context(m)),
                                   scaler=v.scaler(), handle=handle, optimizer=optimizer,
                                   around=lambda on=n in TF32: tf32_matmuls(on)))
    return runners


def _progress(model: str) -> Any:
    def say(r: Runner) -> None:
        print(f"[{model}] {r.name}: warm-up {len(r.warmup_s)} step(s) in {sum(r.warmup_s):.1f} s, "
              f"{r.graphs} graph(s)", file=sys.stderr, flush=True)
    return say


@contextmanager
def partial_on_sigterm(path: str, name: str, runners: list[Runner], info: dict[str, Any]) -> Iterator[None]:
    """Inside, a SIGTERM (``run.sh``'s stage limit) writes what was measured so far to ``path`` and exits 124:
    ``info`` and each runner's warm-up steps (an eager variant's last is a steady step), graphs and timed steps.

    Example:
        >>> with partial_on_sigterm("/tmp/x.partial.json", "m", [], {}):
        ...     signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        True
    """
    def dump(signum: int, frame: Any) -> None:
        state = {"model": name, "complete": False, **info, "runners": {
            r.name: {"compiled": r.compiled, "warmup_s": r.warmup_s, "graphs": r.graphs, "recompiles": r.recompiles,
                     "times": r.times} for r in runners}}
        with open(path, "w") as f:
            json.dump(state, f, indent=1)
        print(f"[{name}] stopped by SIGTERM: what was measured is in {path}", file=sys.stderr, flush=True)
        raise SystemExit(124)
    old = signal.signal(signal.SIGTERM, dump)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Tune ``name``'s policy, time every variant; the row the JSON holds (``verdicts`` adds the ratios)."""
    runners: list[Runner] = []
    info: dict[str, Any] = {}
    with partial_on_sigterm(os.path.splitext(args.out)[0] + ".partial.json", name, runners, info):
        return _run_model(name, args, runners, info)


def _run_model(name: str, args: argparse.Namespace, runners: list[Runner], info: dict[str, Any]) -> dict[str, Any]:
    model, batches = build(name, args.size, args.device, batch=args.batch, seq=args.seq)
    device_type = torch.device(args.device).type
    copies = {v: copy.deepcopy(model) for v in VARIANTS}  # each variant's own, before anything ran
    t0 = time.perf_counter()
    with tf32_matmuls(False):
        policy = autoprec.tune(model, batches[0], target="cuda", progress=False)
    tune_s = time.perf_counter() - t0
    info.update(tune_s=round(tune_s, 1), low_fraction=round(policy.low_precision_fraction(), 4))
    print(f"[{name}] tuned in {tune_s:.1f} s", file=sys.stderr, flush=True)
    variants = {"fp32": fp32_variant(), "fp32-tf32": Variant("fp32-tf32"),
                "amp-bf16": amp_variant("bf16", device_type), "amp-fp16": amp_variant("fp16", device_type),
                "autoprec": policy_variant("autoprec", policy, device=device_type)}
    samples = [(b, None) for b in batches]
    runners += _runners(copies, variants, args.backend)
    try:
        time_steps(runners, samples, repeats=args.rounds, warmup=args.warmup, max_warmup=max(args.warmup, 8),
                   measure_peak=True, progress=_progress(name))
    finally:
        for r in runners:
            if r.handle is not None:
                r.handle.remove()
        torch._dynamo.reset()
    base = median(runners[0].times)
    counts = {p: list(policy.assignment.values()).count(p) for p in ("fp32", "fp16", "bf16")}
    row: dict[str, Any] = {
        "model": name, "size": args.size, "params": sum(p.numel() for p in model.parameters()),
        "batch": {k: list(v.shape) for k, v in batches[0].items()},
        "timing": {r.name: {"median_s": median(r.times), "ratio": median(r.times) / base, "n": len(r.times),
                            "tf32_matmuls": r.name in TF32} for r in runners},
        "compile": {r.name: {"compile_s": compile_seconds(r), "warmup_s": sum(r.warmup_s),
                             "warmup_steps": len(r.warmup_s), "graphs": r.graphs, "recompiles": r.recompiles,
                             "recompile_reasons": sorted(set(r.recompile_reasons))[:10]}
                    for r in runners if r.compiled},
        "peak_mib": {r.name: r.peak_mib for r in runners},
        "cast_mib": {n: cast_traffic(model, samples[0], v)[1] / 2**20 for n, v in variants.items()},
        "policy": {"tune_s": round(tune_s, 1), "low_fraction": round(policy.low_precision_fraction(), 4),
                   "counts": counts, "excluded": sorted(policy.excluded()),
                   "scaler": None if policy.scaler is None else policy.scaler.init_scale,
                   "verified": None if policy.verification is None else policy.verification.passed,
                   "passes": int(sum(policy.stats.get(k, 0) for k in ("probe_passes", "search_passes",
                                                                          "verify_passes")))},
    }
    return verdicts(row)


def verdicts(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with, per mode (eager ``""``, ``"_compiled"``), the policy's step against the best blanket
    autocast and against both FP32 baselines, TF32's speed-up over strict FP32, and the issue's target
    (within 5% of autocast and >= 1.5x faster) against strict FP32 and against TF32.

    Example:
        >>> t = {"fp32": 7.0, "fp32-tf32": 2.0, "amp-bf16": 1.0, "amp-fp16": 1.1, "autoprec": 1.02}
        >>> t.update({f"{k}-compiled": v for k, v in t.items()})
        >>> r = verdicts({"timing": {k: {"median_s": v} for k, v in t.items()}})
        >>> r["meets_target"], round(r["speedup_vs_tf32"], 2), r["tf32_speedup_compiled"]
        (True, 1.96, 3.5)
    """
    t = {n: row["timing"][n]["median_s"] for n in VARIANTS}
    for suffix, key in (("", ""), ("-compiled", "_compiled")):
        best_amp = min(t[f"amp-bf16{suffix}"], t[f"amp-fp16{suffix}"])
        row[f"policy_vs_autocast{key}"] = vs_amp = t[f"autoprec{suffix}"] / best_amp
        row[f"speedup_vs_fp32{key}"] = t[f"fp32{suffix}"] / t[f"autoprec{suffix}"]
        row[f"speedup_vs_tf32{key}"] = t[f"fp32-tf32{suffix}"] / t[f"autoprec{suffix}"]
        row[f"tf32_speedup{key}"] = t[f"fp32{suffix}"] / t[f"fp32-tf32{suffix}"]
        row[f"meets_target{key}"] = vs_amp <= 1.05 and row[f"speedup_vs_fp32{key}"] >= 1.5
        row[f"meets_target_tf32{key}"] = vs_amp <= 1.05 and row[f"speedup_vs_tf32{key}"] >= 1.5
    return row


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The Markdown tables: step times and verdicts, compile cost, peak memory."""
    out = [(f"device: {meta['device']}; outside the variants: TF32 matmul {meta['tf32_matmul']}, cuDNN TF32 "
            f"{meta['tf32_cudnn']}; fp32 = strict FP32 matmuls, fp32-tf32 = TF32 matmuls; "
            f"compiled: torch.compile, backend {meta['args']['backend']}"), "",
           ("| model | mode | params | FP32 ms/step | FP32-TF32 | amp-bf16 | amp-fp16 | autoprec | "
            "policy / best autocast | FP32 / policy | TF32 / policy | target met (FP32 / TF32) | "
            "16-bit FLOPs (policy) | cast MiB/step: autocast bf16 / policy | tune s |"),
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: |"]
    yes = {True: "yes", False: "no"}
    for r in rows:
        tm = r["timing"]
        for suffix, key, mode in (("", "", "eager"), ("-compiled", "_compiled", "compiled")):
            # ratios to strict FP32 of the same mode
            fp32 = tm[f"fp32{suffix}"]["median_s"]
            x = {v: tm[f"{v}{suffix}"]["median_s"] / fp32 for v in ("fp32-tf32", "amp-bf16", "amp-fp16", "autoprec")}
            out.append(f"| {r['model']} | {mode} | {r['params']:,} | {1e3 * fp32:.1f} | {x['fp32-tf32']:.2f} | "
                       f"{x['amp-bf16']:.2f} | {x['amp-fp16']:.2f} | {x['autoprec']:.2f} | "
                       f"{r[f'policy_vs_autocast{key}']:.3f} | {r[f'speedup_vs_fp32{key}']:.2f}x | "
                       f"{r[f'speedup_vs_tf32{key}']:.2f}x | "
                       f"{yes[r[f'meets_target{key}']]} / {yes[r[f'meets_target_tf32{key}']]} | "
                       f"{100 * r['policy']['low_fraction']:.0f}% | "
                       f"{r['cast_mib']['amp-bf16']:.0f} / {r['cast_mib']['autoprec']:.0f} | {r['policy']['tune_s']} |")
    compiled = VARIANTS[len(EAGER):]
    out += ["", "| model | " + " | ".join(f"{v} compile s / graphs / recompiles" for v in compiled) + " |",
            "| --- |" + " ---: |" * len(compiled)]
    for r in rows:
        c = r["compile"]
        out.append(f"| {r['model']} | " + " | ".join(
            f"{c[v]['compile_s']:.0f} / {c[v]['graphs']} / {c[v]['recompiles']}" for v in compiled) + " |")
    if any(v is not None for r in rows for v in r["peak_mib"].values()):
        out += ["", "| model | " + " | ".join(f"{v} peak MiB" for v in VARIANTS) + " |",
                "| --- |" + " ---: |" * len(VARIANTS)]
        for r in rows:
            out.append(f"| {r['model']} | " + " | ".join(f"{r['peak_mib'][v]:.0f}" for v in VARIANTS) + " |")
    return "\n".join(out)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, help="rows per batch (default: 8 for gpt2, 64 for resnet50; tiny: 2, 4)")
    p.add_argument("--seq", type=int, help="GPT-2's tokens per row (default 1024; tiny: 32)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="least warm-up steps (more until nothing compiles)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled variants")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "gpu_speed.json"),
                   help="the JSON; the Markdown tables go beside it (.md)")
    p.add_argument("--out-dir", help="write gpu_speed.json and gpu_speed.md here (instead of --out)")
    args = p.parse_args(argv)
    if args.out_dir:
        args.out = os.path.join(args.out_dir, "gpu_speed.json")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this benchmark is for a GPU (use --device cpu --size tiny to check "
                         "that it runs)")
    warnings.filterwarnings("ignore")
    logging.getLogger("autoprec").setLevel(logging.WARNING)
    meta = {**machine(), "device": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda"
            else "cpu", "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32, "tf32_variants": list(TF32),
            "tf32_env": {k: os.environ.get(k) for k in ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE")},
            "args": vars(args)}
    rows = []
    for name in args.models:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        rows.append(run_model(name, args))
    text = table(rows, meta)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
