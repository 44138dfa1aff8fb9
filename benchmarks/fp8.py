"""FP8 per Linear, tuned, beside the hand rules: which Linears of a Llama-like, a GPT-2-like and a routed-MoE stack
train in FP8, the share of Linear FLOPs that makes, the modelled step on the H100 estimate, and the loss after a
training run of a few hundred steps against BF16 and FP32 (and, on a GPU, its tokens/s).

The **tuned** assignment is the real pipeline: ``autoprec.tune(model, batch, loss, dtypes=["bf16", "fp8"],
target="cuda", profile=autoprec.device.estimate("cuda"), train_batch_size=R)``, with ``R`` the rows of an
H100-sized step (``--tokens``, 8192 tokens: ``R = 8192 / seq``), so every Linear is priced at the GEMM shapes of
that step (:func:`autoprec.device.fp8_price`) while the probe, the FP8 stage and verification run on the small
batch on this CPU. Every other assignment is that same policy with exactly its Linears set to
``LayerEntry("fp8", recipe="tensorwise")`` and every other FP8 entry set to BF16, so all runs train through
``policy.apply`` with the same BF16 regions (a CUDA policy on this CPU emulates them: BF16-rounded GEMM operands
and results, ``autoprec.runtime._emulation``; FP8 is torchao's emulation, ``Float8LinearConfig(emulate=True)``)
and differ only in which Linears are FP8:

- ``fp32``: no policy; ``bf16``: the tuned policy with no FP8 (the reference);
- ``torchao``: ``convert_to_float8_training``'s default, every ``nn.Linear`` whose dims are multiples of 16;
- ``titan-names``: torchtitan's ``module_filter_fn`` by names (skip FQNs containing ``output``, here ``lm_head``/
  ``head``, and ``router``; dims divisible by 16), ``torchtitan/components/quantization/utils.py``;
- ``titan-auto``: the same names with torchao's ``_auto_filter_for_recipe`` (tensorwise: a Linear stays BF16 when
  ``K <= 4096 and N <= 1024``, H100 speed thresholds), as torchtitan's ``auto_filter_small_kn``;
- ``tuned``: the policy as tuned.

Models (random init, dropout off, vocabulary 2048, a learnable synthetic language over its first 128 tokens: each
has 4 possible successors drawn once from a fixed generator, so the loss falls from ln 2048 = 7.6 through
ln 128 = 4.9 towards ln 4 = 1.4):

- ``llama``: ``transformers.LlamaForCausalLM``, width 512, intermediate 1376, 8 heads, 2 key/value heads, 2 layers,
  untied head;
- ``gpt2``: ``transformers.GPT2LMHeadModel``, width 512, 2 layers, its ``Conv1D`` layers rebuilt as ``nn.Linear``
  (torchao converts only ``nn.Linear``), head tied to the embedding;
- ``llama-2048``: ``LlamaForCausalLM`` at width 2048, intermediate 5632, 16 heads, 4 key/value heads
  (``k_proj``/``v_proj`` 2048 -> 512), 2 layers: the size from which FP8 pays on the H100 estimate;
- ``moe``: a routed mixture of experts as a per-token language model (:class:`MoELM`): embedding, RMS norm, a
  router ``nn.Linear(2048, 16)``, 16 expert MLPs (``nn.ModuleList``, 2048 -> 1408 -> 2048, SiLU) of which each token
  takes its top 2, run in a Python loop on their routed tokens, and a head ``nn.Linear(2048, 2048)``. The language
  is first order, so no attention is needed to learn it; the tuning batch leads with tokens, so the router and the
  head are priced at ``--tokens`` tokens.

The loss is the mean training loss of the last 10 steps; "gap" is that minus the reference's. The tuned assignment's
loss target is met when its gap to BF16 is within the BF16 run's bound: the larger of ``tune``'s tolerance (1% of
BF16's loss) and how far the BF16 run itself ended from FP32 (the change in rounding that everyone accepts moves
the loss that much at this step; ``--seed`` reruns measure the same for a new initialisation). An assignment that
puts the same Linears in FP8 as an earlier one is not trained again (its row says so). "modelled step / BF16" is
the modelled step on the H100 estimate at the priced step (``autoprec.tuning._stages.step_seconds`` on the trace
rescaled to ``R`` rows), over the BF16 reference's. One run per assignment and seed.
"tokens/s" is each run's training throughput after ``--warmup`` steps: on the CPU it times torchao's emulation (FP8
slower than BF16 there, by construction); ``--device cuda`` trains in native FP8 on an sm89+ GPU (tune then prices
with the GPU's own calibration), ``--compile`` under ``torch.compile`` as torchao's FP8 is meant to run (its casts
fused); ``benchmarks/gpu/run.sh``'s optional ``fp8`` stage runs that at 8 x 1024 tokens.

Run:  python benchmarks/fp8.py [--models llama gpt2 llama-2048 moe] [--steps 300] [--big-steps 200] [--tokens 8192]
      [--device cuda] [--compile]
Writes benchmarks/results/fp8.json (``--out``), after each model. The recorded run, split over three processes
(each ``--threads 1``): ``--models llama-2048 --assignments fp32 bf16 torchao titan-auto tuned --out A.json``,
``--models llama-2048 --seed 1 --assignments fp32 bf16 --out C.json`` and ``--models llama gpt2 moe --out B.json``,
then ``--merge A.json C.json B.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import autoprec
from autoprec.device import estimate, fp8_price
from autoprec.policy import LayerEntry
from autoprec.trace import trace
from autoprec.trace._rescale import fewer_rows, rescaled
from autoprec.tuning._fp8 import hand_filters
from autoprec.tuning._stages import step_seconds

VOCAB = 2048
ACTIVE = 128  # the tokens the language uses: a short run learns their frequencies, then their successors
LR = 2e-3
ASSIGNMENTS = ["fp32", "bf16", "torchao", "titan-names", "titan-auto", "tuned"]
TITAN_SKIP = ("output", "lm_head", "head", "router")
TOLERANCE = 0.01  # tune's default loss tolerance: the bound on the final loss's relative gap to BF16's


def _llama(width: int, layers: int) -> nn.Module:
    import transformers as tf

    big = width >= 2048  # Llama 3's proportions: heads of 128, 4 query heads per key/value head
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers,
                         intermediate_size=_mult16(width * 11 // 4 if big else width * 8 // 3),
                         num_attention_heads=max(1, width // (128 if big else 64)),
                         num_key_value_heads=max(1, width // (512 if big else 256)), max_position_embeddings=512,
                         tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg)


def _gpt2(width: int, layers: int) -> nn.Module:
    import transformers as tf

    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=width, n_layer=layers, n_head=max(1, width // 64), n_positions=512,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = tf.GPT2LMHeadModel(cfg)
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ == "Conv1D":  # y = x @ W + b with W (in, out): nn.Linear holds W.T
            lin = nn.Linear(mod.weight.shape[0], mod.weight.shape[1])
            with torch.no_grad():
                lin.weight.copy_(mod.weight.t())
                lin.bias.copy_(mod.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, lin)
    return model


class Expert(nn.Module):
    """One expert MLP: ``down(silu(up(x)))``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.up(x)))


class MoELM(nn.Module):
    """A per-token language model around one routed MoE block: ``x`` holds (token, next token) rows; the output is
    the logits for the next token. Top-``k`` routing, softmax weights over the chosen experts."""

    def __init__(self, width: int, hidden: int, experts: int, top: int = 2) -> None:
        super().__init__()
        self.top = top
        self.embed = nn.Embedding(VOCAB, width)
        self.norm = nn.RMSNorm(width)
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList([Expert(width, hidden) for _ in range(experts)])
        self.out_norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x[:, 0])
        z = self.norm(h)
        weight, chosen = self.router(z).topk(self.top, dim=-1)
        weight = weight.softmax(-1)
        y = torch.zeros_like(z)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                y = y.index_add(0, rows, expert(z[rows]) * weight[rows, slot, None])
        return self.head(self.out_norm(h + y))


def _moe(width: int, layers: int) -> nn.Module:
    del layers  # one MoE block
    return MoELM(width, _mult16(width * 11 // 16), experts=16)


def _mult16(n: int) -> int:
    return (n + 15) // 16 * 16


#: name -> (builder, width, layers)
MODELS = {"llama": (_llama, 512, 2), "gpt2": (_gpt2, 512, 2), "llama-2048": (_llama, 2048, 2), "moe": (_moe, 2048, 1)}


def _batches(n: int, batch: int, seq: int) -> list[torch.Tensor]:
    """``n`` batches of a fixed 4-successor Markov language over the first ``ACTIVE`` tokens of the vocabulary."""
    gen = torch.Generator().manual_seed(1234)
    succ = torch.randint(0, ACTIVE, (ACTIVE, 4), generator=gen)
    out = []
    for _ in range(n):
        tok = torch.randint(0, ACTIVE, (batch,), generator=gen)
        rows = [tok]
        for _ in range(seq - 1):
            tok = succ[tok, torch.randint(0, 4, (batch,), generator=gen)]
            rows.append(tok)
        out.append(torch.stack(rows, 1))
    return out


def _pairs(ids: torch.Tensor) -> torch.Tensor:
    """A sequence batch as (token, next token) rows, for the per-token MoE model."""
    return torch.stack([ids[:, :-1].reshape(-1), ids[:, 1:].reshape(-1)], 1)


def _loss(out: Any, batch: torch.Tensor) -> torch.Tensor:
    if isinstance(out, torch.Tensor):  # the MoE model: logits per (token, next) row
        return nn.functional.cross_entropy(out.float(), batch[:, 1])
    logits = out.logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _flops(model: nn.Module, batch: torch.Tensor) -> dict[str, int]:
    """Forward multiply-adds per Linear on one batch (rows x in x out), counted by forward hooks."""
    counts = {p: 0 for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    hooks = [m.register_forward_hook(lambda m, i, o, p=p: counts.__setitem__(
        p, counts[p] + i[0].numel() // m.in_features * m.in_features * m.out_features))
        for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    return counts


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}


def _hand(model: nn.Module) -> dict[str, list[str]]:
    """torchao's default, torchtitan's names, torchtitan's names + torchao's auto filter (tensorwise)."""
    from torchao.float8 import _auto_filter_for_recipe

    linears = _linears(model)
    fits = [p for p, m in linears.items() if m.in_features % 16 == 0 and m.out_features % 16 == 0]
    auto = _auto_filter_for_recipe("tensorwise", filter_fqns=list(TITAN_SKIP))
    names = [p for p in fits if not any(f in p for f in TITAN_SKIP)]
    return {"torchao": hand_filters(linears)["torchao default"], "titan-names": names,
            "titan-auto": [p for p in names if auto(linears[p], p)]}


def _with_fp8(policy: autoprec.Policy, fp8: dict[str, str]) -> autoprec.Policy:
    """``policy`` with exactly the Linears of ``fp8`` in FP8 (their recipes), every other FP8 entry BF16."""
    def entry(key: str, e: LayerEntry) -> LayerEntry:
        if key in fp8:
            return dataclasses.replace(e, precision="fp8", recipe=fp8[key])
        return dataclasses.replace(e, precision="bf16", recipe="") if e.precision == "fp8" else e
    return dataclasses.replace(policy, layers={k: entry(k, e) for k, e in policy.layers.items()})


def _train(model: nn.Module, batches: list[torch.Tensor], policy: autoprec.Policy | None,
           args: argparse.Namespace, tokens: int) -> tuple[list[float], float | None]:
    """Train ``model`` in place (AdamW), under ``policy`` (None: FP32), compiled where ``args.compile``: the per-step
    losses, and the tokens per second (``tokens`` a batch) of the steps after ``args.warmup`` (None: no such step)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    handle = policy.apply(model) if policy is not None else None
    if args.compile:
        torch._dynamo.reset()  # each assignment compiles afresh: no recompile limit reached across the runs
    step = torch.compile(model, backend=args.backend) if args.compile else model
    losses, timed = [], 0.0
    try:
        for i, batch in enumerate(batches):
            start = time.perf_counter()
            loss = _loss(step(batch), batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))  # waits for the device: the step is done
            timed += time.perf_counter() - start if i >= args.warmup else 0.0
    finally:
        if handle is not None:
            handle.remove()
    return losses, (tokens * (len(batches) - args.warmup) / timed if timed > 0 else None)


def _tune(model: nn.Module, batch: torch.Tensor, rows: int, args: argparse.Namespace) -> autoprec.Policy:
    profile = estimate("cuda") if args.device == "cpu" else None  # a GPU: its calibration (cached per machine)
    return autoprec.tune(model, batch, _loss, dtypes=["bf16", "fp8"], target="cuda", profile=profile,
                         train_batch_size=rows, n_trials=args.trials, verify_steps=args.verify_steps, held_out=0,
                         progress=False, measure_speed=False)


def _priced(model: nn.Module, batch: torch.Tensor, rows: int) -> Any:
    """The model's trace at ``rows`` batch rows: what the tuned policy was priced at (as tune prices it: the sizes
    that carry the batch are those a trace on half the rows changes)."""
    kind = batch.device.type
    half = trace(model, fewer_rows(batch, batch.shape[0] // 2), device_type=kind) if batch.shape[0] > 1 else None
    return rescaled(trace(model, batch, device_type=kind), batch.shape[0], rows, half)


def _modelled(priced: Any, policy: autoprec.Policy) -> float:
    """The modelled step of ``policy`` on the H100 estimate at the priced step, seconds."""
    assignment = {k: e.precision for k, e in policy.layers.items()}
    keys = {lay.key for lay in priced.layers}  # an expert no token was routed to at the tuning batch: no work
    recipes = {k: e.recipe for k, e in policy.layers.items() if e.precision == "fp8" and k in keys}
    return step_seconds(priced, estimate("cuda"), assignment, recipes)


def _assignments(model: nn.Module, policy: autoprec.Policy) -> dict[str, autoprec.Policy | None]:
    hand = _hand(model)
    bf16 = _with_fp8(policy, {})
    out: dict[str, autoprec.Policy | None] = {"fp32": None, "bf16": bf16}
    out.update({name: _with_fp8(policy, dict.fromkeys(keys, "tensorwise")) for name, keys in hand.items()})
    out["tuned"] = policy
    return out


def _fp8_of(policy: autoprec.Policy | None) -> dict[str, str]:
    return {} if policy is None else {k: e.recipe for k, e in policy.layers.items() if e.precision == "fp8"}


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    build, width, layers = MODELS[name]
    big = width >= 2048
    steps = args.big_steps if big else args.steps
    torch.manual_seed(args.seed)
    model = build(width, layers).to(args.device)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    seqs = _batches(steps + 1, args.batch, args.seq)
    batches = [(_pairs(b) if name == "moe" else b).to(args.device) for b in seqs]
    tune_batch, train = batches[-1], batches[:-1]
    rows = args.tokens if name == "moe" else max(1, args.tokens // args.seq)
    start = time.perf_counter()
    policy = _tune(model, tune_batch, rows, args)
    tune_s = time.perf_counter() - start
    priced = _priced(model, tune_batch, rows)
    flops = _flops(model, tune_batch)
    total = sum(flops.values())
    chosen = _assignments(model, policy)
    ref = _modelled(priced, chosen["bf16"])
    runs: dict[str, dict[str, Any]] = {}
    for assign in args.assignments:
        pol = chosen[assign]
        fp8 = _fp8_of(pol)
        row = {"fp8": sorted(fp8), "recipes": fp8, "fraction": sum(flops[p] for p in fp8) / total,
               "modelled_vs_bf16": None if pol is None else _modelled(priced, pol) / ref}
        same = next((a for a in runs if a not in ("fp32", "bf16") and runs[a]["fp8"] == row["fp8"]
                     and runs[a]["recipes"] == fp8), None) if fp8 else None
        if same is None and assign not in ("fp32", "bf16") and not fp8:
            same = "bf16" if "bf16" in runs else None  # no FP8 at all: the BF16 reference's run
        if same is not None:
            runs[assign] = {**runs[same], **row, "same_as": same}
            continue
        model.load_state_dict(init)
        start = time.perf_counter()
        losses, speed = _train(model, train, pol, args, tune_batch.shape[0] if name == "moe" else tune_batch.numel())
        runs[assign] = {**row, "losses": losses, "final": _final(losses), "seconds": time.perf_counter() - start,
                        "tokens_per_s": speed}
        logging.getLogger("fp8").info("%s %s: loss %.4f, %s tokens/s (%.0f s)", name, assign, runs[assign]["final"],
                                      _fmt(speed, ".0f"), runs[assign]["seconds"])
    model.load_state_dict(init)
    linears = {p: _linear_row(model, p, flops[p], policy, priced) for p in _linears(model)}
    return {"model": name, "width": width, "layers": layers, "seed": args.seed, "steps": len(train),
            "priced_rows": rows,
            "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
            "compiled": args.backend if args.compile else None,
            "priced_tokens": args.tokens, "tune_batch": list(tune_batch.shape), "tune_seconds": tune_s,
            "tuning_seconds": policy.stats.get("tuning_seconds"), "fp8_passes": policy.stats["fp8"]["passes"],
            "stages": policy.stats.get("stages"), "tune_assignments": policy.stats["fp8"]["assignments"],
            "verification": None if policy.verification is None else policy.verification.passed,
            "linears": linears, "runs": runs, "verdicts": _verdicts(linears, runs) if "tuned" in runs else None}


def _linear_row(model: nn.Module, path: str, flops: int, policy: autoprec.Policy, priced: Any) -> dict[str, Any]:
    entry = policy.layers.get(path)
    mod = model.get_submodule(path)
    traced = {lay.key for lay in priced.layers}
    price = (fp8_price(priced.layer(path), estimate("cuda"), entry.recipe or "tensorwise")
             if entry and path in traced else None)
    return {"shape": [mod.out_features, mod.in_features], "flops": flops,
            "precision": entry.precision if entry else "unseen", "recipe": entry.recipe if entry else "",
            "fp8": dict(entry.measured.get("fp8", {})) if entry else {}, "detail": entry.detail if entry else "",
            "pays": None if price is None else bool(price.pays), "price_note": None if price is None else price.note,
            "speedup": None if price is None or not math.isfinite(price.fp8) else price.bf16 / price.fp8}


def _final(losses: list[float]) -> float:
    tail = losses[-10:]
    return sum(tail) / len(tail)


def _safe_alone(fig: dict[str, float]) -> bool:
    return fig.get("forward_db", -1.0) >= 18.0 and fig.get("weight_grad_db", math.inf) >= 17.0


def _verdicts(linears: dict[str, dict[str, Any]], runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's targets, item by item, for the tuned assignment."""
    tuned, bf16 = runs["tuned"], runs.get("bf16")
    out = {"fp8_flops": {"met": tuned["fraction"] >= 0.8, "value": f"{100 * tuned['fraction']:.1f}% (>= 80%)"}}
    if bf16 is not None:  # the BF16 run's bound: 1% of its loss, or how far BF16 itself ended from FP32 if more
        gap, fp32 = tuned["final"] - bf16["final"], runs.get("fp32")
        chance = abs(bf16["final"] - fp32["final"]) if fp32 is not None else 0.0
        bound = max(TOLERANCE * bf16["final"], chance)
        out["loss"] = {"met": abs(gap) <= bound, "value": f"gap {gap:+.4f} vs bound {bound:.4f} (the larger of 1% "
                       f"of BF16's {bf16['final']:.4f} and BF16's own gap to FP32, {chance:.4f})"}
    special = [p for p in linears if any(f in p for f in TITAN_SKIP)]
    why = {p: ("fp8" if lin["precision"] == "fp8" else f"{lin['precision']}: " + _reason(lin)) for p, lin in
           linears.items() if p in special}
    # by measurement, not by name: the FP8 stage judged it (price or error), or the 16-bit search kept it FP32 by
    # its own measured error or price; autoprec has no name rule, so this fails only where neither stage decided
    out["head_router_by_measurement"] = {
        "met": all(lin["fp8"] or lin["precision"] == "fp32" for p, lin in linears.items() if p in special),
        "value": "; ".join(f"{p} {w}" for p, w in why.items())}
    left = [p for p, lin in linears.items() if lin["precision"] == "bf16" and lin["pays"] and _safe_alone(lin["fp8"])
            and "back to BF16" not in lin["detail"]]
    out["nothing_kept_safe_and_fast"] = {"met": not left, "value": ", ".join(left) or "none"}
    losing = [p for p, lin in linears.items() if lin["precision"] == "fp8" and not lin["pays"]]
    out["no_fp8_that_loses_time"] = {"met": not losing, "value": ", ".join(losing) or "none"}
    return out


def _reason(lin: dict[str, Any]) -> str:
    fig = lin["fp8"]
    if lin["precision"] == "fp32":
        return "FP32 by the 16-bit search (" + (lin["detail"][:80] or "no reason given") + ")"
    if not fig:
        return "not an FP8 candidate"
    if not fig.get("pays"):
        return lin["price_note"] or "no gain"
    fwd, wgrad = fig.get("forward_db", math.nan), fig.get("weight_grad_db", math.nan)
    return f"error (forward {fwd:.1f} dB, w-grad {wgrad:.1f} dB)"


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    for res in results:
        runs = res["runs"]
        where = res.get("device", "cpu")
        how = "FP8 and BF16 emulated on the CPU" if where == "cpu" else f"on {where}"
        print(f"\n### {res['model']}: width {res['width']}, {res['layers']} layer(s), seed {res.get('seed', 0)}, "
              f"{res['steps']} steps of "
              f"batch {res['tune_batch']}, priced at {res['priced_tokens']} tokens ({res['priced_rows']} rows) "
              f"on the H100 estimate ({how}{', compiled' if res.get('compiled') else ''})\n")
        print(f"tune: {res['tune_seconds']:.1f} s with FP8 candidates, {res['fp8_passes']} FP8-stage passes, "
              f"verification {'passed' if res['verification'] else res['verification']}\n")
        print("| assignment | Linears in FP8 | Linear FLOPs in FP8 | modelled step / BF16 | final loss | gap vs BF16 | "
              "gap vs FP32 | tokens/s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for a, r in runs.items():
            gaps = [f"{r['final'] - runs[ref]['final']:+.4f}" if ref in runs else "n/a" for ref in ("bf16", "fp32")]
            name = f"{a} (= {r['same_as']})" if "same_as" in r else a
            print(f"| {name} | {len(r['fp8'])}/{len(res['linears'])} | {100 * r['fraction']:.1f}% | "
                  f"{_fmt(r['modelled_vs_bf16'], '.3f')} | {r['final']:.4f} | {gaps[0]} | {gaps[1]} | "
                  f"{_fmt(r.get('tokens_per_s'), '.0f')} |")
        print("\n| Linear | shape (out, in) | tuned | fwd dB | w-grad dB | FP8 speedup at the step | why |")
        print("| --- | --- | --- | ---: | ---: | ---: | --- |")
        for p, lin in res["linears"].items():
            fig = lin["fp8"]
            why = "" if lin["precision"] == "fp8" else _reason(lin)
            print(f"| {p} | {tuple(lin['shape'])} | {lin['precision']} {lin['recipe']} | "
                  f"{_fmt(fig.get('forward_db'))} | {_fmt(fig.get('weight_grad_db'))} | "
                  f"{_fmt(lin['speedup'], '.2f')} | {why} |")
        if res["verdicts"]:
            print("\n| target | verdict | numbers |\n| --- | --- | --- |")
            for k, v in res["verdicts"].items():
                print(f"| {k} | {'met' if v['met'] else 'NOT met'} | {v['value']} |")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--assignments", nargs="+", default=ASSIGNMENTS, choices=ASSIGNMENTS)
    parser.add_argument("--steps", type=int, default=300, help="training steps at width 512")
    parser.add_argument("--big-steps", type=int, default=200, help="training steps at width 2048")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8192, help="the priced step's tokens")
    parser.add_argument("--trials", type=int, default=8, help="tune's n_trials")
    parser.add_argument("--verify-steps", type=int, default=8, help="tune's verify_steps")
    parser.add_argument("--width", type=int, default=None, help="override every model's width (tests)")
    parser.add_argument("--layers", type=int, default=None, help="override every model's layers (tests)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where tune probes and the runs train: cpu (FP8 and BF16 "
                        "emulated) or cuda (native FP8 on sm89+, tune prices with the GPU's calibration)")
    parser.add_argument("--compile", action="store_true", help="train each assignment under torch.compile (how "
                        "torchao's FP8 runs fast: its casts fused)")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend with --compile")
    parser.add_argument("--seed", type=int, default=0, help="the models' initialisation (the data stays the same): "
                        "another seed's FP32 and BF16 runs measure how far chance alone moves the final loss")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each run not timed for tokens/s")
    parser.add_argument("--merge", nargs="+", default=None, help="print and join these result files (runs split "
                        "over processes) instead of running")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "fp8.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("torchao").setLevel(logging.ERROR)
    if args.width or args.layers:
        for k, (b, w, n) in list(MODELS.items()):
            MODELS[k] = (b, args.width or w, args.layers or n)
    results = []
    if args.merge:  # the results of runs split over processes, in order
        for path in args.merge:
            with open(path) as fh:
                results += json.load(fh)["results"]
        for res in results:  # the verdicts as this version of the script judges them
            if "tuned" in res["runs"]:
                res["verdicts"] = _verdicts(res["linears"], res["runs"])
    for m in args.models if not args.merge else []:
        results.append(run_model(m, args))
        _write(args, results)  # after each model: a long run keeps what it finished
    print_tables(results, args)
    _write(args, results)
    return results


def _write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "torch": torch.__version__, "torchao": _torchao_version(),
                   "results": results}, fh, indent=1, default=str)


def _torchao_version() -> str:
    import torchao

    return torchao.__version__


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
