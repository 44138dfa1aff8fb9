"""FP8 per Linear, measured, beside the hand rules: which Linears of a Llama-like and a GPT-2-like stack train in FP8,
the fraction of Linear FLOPs that makes, and the loss after a short training run against BF16 and FP32.

Everything runs on this CPU with torchao's FP8 emulated (``Float8LinearConfig(emulate=True)``: FP8's casts, scales
and rounding, not its speed), the rest of the model in its BF16 region (below); recipe ``tensorwise`` unless
``--recipe``.

Models (random init, dropout off, vocabulary 2048, a learnable synthetic language over its first 128 tokens: each
has 4 possible successors drawn once from a fixed generator, so the loss falls from ln 2048 = 7.6 through
ln 128 = 4.9 towards ln 4 = 1.4):

- ``llama``: ``transformers.LlamaForCausalLM``, width 512, intermediate 1376, 8 heads, 2 key/value heads (Llama 3's
  grouped-query shape: ``k_proj``/``v_proj`` are 512 -> 128), untied head;
- ``gpt2``: ``transformers.GPT2LMHeadModel``, width 512, its ``Conv1D`` layers rebuilt as ``nn.Linear`` (the same
  product; torchao converts only ``nn.Linear``), head tied to the embedding.

Per Linear: ``autoprec.probe.fp8_errors`` (forward, weight-gradient and input-gradient SQNR relative to BF16, loss
change) and ``Fp8Error.judge`` (>= 18 dB forward, >= 17 dB weight gradient: torchao's ``Float8Linear`` test), at
init and again on the weights after the BF16 run. Assignments, each trained ``--steps`` steps (AdamW, lr 2e-3,
batch ``--batch`` x ``--seq`` tokens, the same batches and init for every run):

- ``fp32``, ``bf16``: no FP8 (the references);
- ``torchao``: ``convert_to_float8_training``'s default, every ``nn.Linear``;
- ``titan-names``: torchtitan's ``module_filter_fn`` with its Llama filter (skip FQNs containing ``output``, here
  ``lm_head``, and ``router.gate``; dims divisible by 16), ``torchtitan/components/quantization/utils.py``;
- ``titan-auto``: the same names with ``auto_filter_small_kn``, which torchtitan
  (``torchtitan/components/quantization/float8.py``) hands to torchao's ``_auto_filter_for_recipe`` (called here
  as is): for tensorwise a Linear stays BF16 when ``K <= 4096 and N <= 1024`` (H100 speed thresholds);
- ``measured``: the Linears whose FP8 error passes the judge at init.

The loss is the mean training loss of the last 10 steps; "gap" is that minus the reference's. An assignment that
puts the same Linears in FP8 as an earlier one is not trained again (its row says so). On a CPU without fast BF16
kernels (``torch.cpu._is_avx512_bf16_supported()`` False; BF16 matmuls are then 5-16x slower than FP32 here) the
BF16 region is emulated at the Linears' GEMMs (:class:`Bf16Gemms`: BF16-rounded operands and results, FP32
accumulation; attention and the other ops in FP32), in the probe and in the runs alike.

Run:  python benchmarks/fp8.py [--models llama gpt2] [--steps 30] [--width 512] [--layers 2] [--batch 4 --seq 32]
Writes benchmarks/results/fp8.json (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from autoprec.probe import fp8_errors, fp8_linears, linear_paths

VOCAB = 2048
ACTIVE = 128  # the tokens the language uses: a short run learns their frequencies, then their successors
LR = 2e-3
ASSIGNMENTS = ["fp32", "bf16", "torchao", "titan-names", "titan-auto", "measured"]


def _llama(width: int, layers: int) -> nn.Module:
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=_mult16(width * 8 // 3),
                         num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                         num_key_value_heads=max(1, width // 256), max_position_embeddings=512,
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


class Bf16Gemms(TorchFunctionMode):
    """BF16 at the Linears' GEMMs, emulated in FP32 for a CPU without fast BF16: the operands and the output of
    ``F.linear`` rounded to BF16 (as autocast's casts do), FP32 accumulation; in the backward the casts' gradients
    round the incoming gradient, the input gradient and the weight gradient to BF16 the same way. Other ops FP32."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is nn.functional.linear:
            args = tuple(_round(a) for a in args)
            kwargs = {k: _round(v) for k, v in kwargs.items()}
            return _round(func(*args, **kwargs))
        return func(*args, **kwargs)


def _round(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
        return t.to(torch.bfloat16).float()
    return t


def _bf16_region() -> contextlib.AbstractContextManager:
    """The BF16 region: autocast where this CPU has fast BF16 kernels, else :class:`Bf16Gemms`."""
    if torch.cpu._is_avx512_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return Bf16Gemms()


def _mult16(n: int) -> int:
    return (n + 15) // 16 * 16


MODELS = {"llama": _llama, "gpt2": _gpt2}


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


def _loss(out: Any, ids: torch.Tensor) -> torch.Tensor:
    logits = out.logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _call(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return _loss(model(input_ids=ids), ids)


def _flops(model: nn.Module, ids: torch.Tensor) -> dict[str, int]:
    """Forward multiply-adds per Linear on one batch (rows x in x out), counted by forward hooks."""
    counts: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, p=p: counts.__setitem__(
        p, counts.get(p, 0) + i[0].numel() // m.in_features * m.in_features * m.out_features))
        for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return counts


def _titan(model: nn.Module, recipe: str, auto: bool) -> list[str]:
    """torchtitan's choice: its FQN filter (``output`` -> here ``lm_head``, ``router.gate``), with or without
    torchao's auto filter by shape."""
    from torchao.float8 import _auto_filter_for_recipe

    fqns = ["lm_head", "output", "router.gate"]
    if auto:
        keep = _auto_filter_for_recipe(recipe, filter_fqns=fqns)
    else:  # torchtitan/components/quantization/utils.py: module_filter_fn
        def keep(mod: nn.Module, fqn: str) -> bool:
            dims16 = mod.weight.shape[0] % 16 == 0 and mod.weight.shape[1] % 16 == 0
            return dims16 and not any(f in fqn for f in fqns)
    return [p for p in linear_paths(model) if keep(model.get_submodule(p), p)]


def _train(model: nn.Module, batches: list[torch.Tensor], mode: str, fp8: list[str], recipe: str) -> list[float]:
    """Train ``model`` in place: FP32, or BF16 autocast with the Linears at ``fp8`` in FP8; the per-step losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    region = fp8_linears(model, fp8, recipe=recipe) if fp8 else contextlib.nullcontext()
    losses = []
    with region:
        for ids in batches:
            with _bf16_region() if mode != "fp32" else contextlib.nullcontext():
                loss = _call(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return losses


def _probe(model: nn.Module, ids: torch.Tensor, recipe: str) -> dict[str, dict[str, Any]]:
    errors = fp8_errors(model, ids, lambda out, b: _loss(out, b), recipe=recipe, region=_bf16_region)
    return {p: {"forward_db": e.forward_db, "weight_grad_db": e.weight_grad_db, "input_grad_db": e.input_grad_db,
                "loss_rel": e.loss_rel, "seconds": e.seconds, "passed": e.judge().passed, "reason": e.judge().reason}
            for p, e in errors.items()}


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    base = MODELS[name](args.width, args.layers)
    init = {k: v.clone() for k, v in base.state_dict().items()}
    batches = _batches(args.steps, args.batch, args.seq)
    probe_ids = _batches(args.steps + 1, args.batch, args.seq)[-1]
    start = time.perf_counter()
    at_init = _probe(base, probe_ids, args.recipe)
    probe_s = time.perf_counter() - start
    flops = _flops(base, probe_ids)
    chosen = {"fp32": [], "bf16": [], "torchao": linear_paths(base),
              "titan-names": _titan(base, args.recipe, auto=False), "titan-auto": _titan(base, args.recipe, auto=True),
              "measured": [p for p, r in at_init.items() if r["passed"]]}
    runs = {}
    for assign in args.assignments:
        same = next((a for a in runs if a not in ("fp32", "bf16") and runs[a]["fp8"] == chosen[assign]), None)
        if same is not None and chosen[assign]:  # the same Linears in FP8: the same run (deterministic)
            runs[assign] = {**runs[same], "same_as": same}
            continue
        base.load_state_dict(init)
        start = time.perf_counter()
        losses = _train(base, batches, "fp32" if assign == "fp32" else "bf16", chosen[assign], args.recipe)
        runs[assign] = {"fp8": chosen[assign], "losses": losses, "final": _final(losses),
                        "fraction": sum(flops[p] for p in chosen[assign]) / sum(flops.values()),
                        "seconds": time.perf_counter() - start}
        if assign == "bf16":
            after = _probe(base, probe_ids, args.recipe)
        logging.getLogger("fp8").info("%s %s: %.4f", name, assign, runs[assign]["final"])
    shapes = {p: list(base.get_submodule(p).weight.shape) for p in linear_paths(base)}
    return {"model": name, "linears": {p: {"shape": shapes[p], "flops": flops[p], "init": at_init[p],
                                           "trained": after[p] if "bf16" in runs else None} for p in shapes},
            "runs": runs, "probe_seconds": probe_s, "probe_seconds_per_linear": probe_s / len(shapes)}


def _final(losses: list[float]) -> float:
    tail = losses[-10:]
    return sum(tail) / len(tail)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    for res in results:
        runs = res["runs"]
        print(f"\n### {res['model']}: width {args.width}, {args.layers} layers, {args.steps} steps of "
              f"{args.batch} x {args.seq} tokens, recipe {args.recipe} (FP8 emulated on the CPU)\n")
        print("| assignment | Linears in FP8 | Linear FLOPs in FP8 | final loss | gap vs BF16 | gap vs FP32 |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for a, r in runs.items():
            gaps = [f"{r['final'] - runs[ref]['final']:+.4f}" if ref in runs else "n/a" for ref in ("bf16", "fp32")]
            name = f"{a} (= {r['same_as']})" if "same_as" in r else a
            print(f"| {name} | {len(r['fp8'])}/{len(res['linears'])} | {100 * r['fraction']:.1f}% | "
                  f"{r['final']:.4f} | {gaps[0]} | {gaps[1]} |")
        print(f"\nprobe: {res['probe_seconds']:.1f} s, {res['probe_seconds_per_linear']:.2f} s per Linear\n")
        print("| Linear | shape (out, in) | fwd dB | w-grad dB | in-grad dB | loss rel | judge | after BF16 run | "
              "titan-auto |")
        print("| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |")
        titan = set(runs.get("titan-auto", {}).get("fp8", []))
        for p, lin in res["linears"].items():
            i, t = lin["init"], lin["trained"]
            after = "n/a" if t is None else ("pass" if t["passed"] else f"FAIL {_fmt(t['forward_db'])}/"
                                             f"{_fmt(t['weight_grad_db'])}")
            print(f"| {p} | {tuple(lin['shape'])} | {_fmt(i['forward_db'])} | {_fmt(i['weight_grad_db'])} | "
                  f"{_fmt(i['input_grad_db'])} | {i['loss_rel']:.1e} | {'pass' if i['passed'] else 'FAIL'} | "
                  f"{after} | {'fp8' if p in titan else 'bf16'} |")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--assignments", nargs="+", default=ASSIGNMENTS, choices=ASSIGNMENTS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--recipe", default="tensorwise", choices=["tensorwise", "rowwise"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "fp8.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("torchao").setLevel(logging.ERROR)
    results = [run_model(m, args) for m in args.models]
    print_tables(results, args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "torch": torch.__version__, "torchao": _torchao_version(),
                   "results": results}, fh, indent=1)
    return results


def _torchao_version() -> str:
    import torchao

    return torchao.__version__


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
