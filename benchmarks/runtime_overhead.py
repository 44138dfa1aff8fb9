"""What the runtime costs per step: installing a policy, entering its context, and each layer it runs.

Models of tiny layers (Linear(8, 8), ReLU, LayerNorm(8) per block) make the runtime's own Python
work visible: per step it is a few microseconds per layer, next to kernels that take as long.

Columns, per model size (modules in the model), one thread, medians of interleaved repetitions:

* ``first apply ms``: ``policy.apply(model)`` the first time (checks the model, makes the plan);
* ``context ms``: entering and leaving ``with policy.autocast(model)`` again (the plan is cached:
  one class swap per patched module each way);
* ``fp32 layer us``: forward time per layer with an all-FP32 policy installed, minus the same
  forward without a policy (what an FP32 layer pays: one Python call);
* ``bf16 layer us`` and ``autocast block us``: forward time per layer with an all-BF16 policy,
  and with each layer wrapped in its own ``with torch.autocast(...)`` block and casts by hand
  (what the issue bounds the 16-bit layer's cost by).

And on a 12-layer HF GPT-2 (width 64, 2 x 32 tokens, random init), one training forward: the Python calls it
makes (``sys.setprofile``: every Python frame entered; the same count on any CPU) and its median time, without
autoprec, under blanket ``torch.autocast`` BF16, and with three policies: every layer BF16 (the op entries in
the model's own code too: attention's SDPA, the loss), the module entries only in BF16, every layer FP32.
On a GPU, where a GPT-2 small step takes 10-20 ms, each call is host time the GPU may wait for.

Run: ``python benchmarks/runtime_overhead.py [--sizes 200 800 3000] [--repeats 30]``; writes
``benchmarks/results/runtime_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from autoprec import LayerEntry, Policy  # noqa: E402
from autoprec.core import module_signatures  # noqa: E402


class _AutocastBlock(nn.Module):
    """One layer inside its own ``with torch.autocast`` block, input cast down, output cast back."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x.bfloat16()).float()


def _model(modules: int) -> nn.Sequential:
    blocks = max(1, (modules - 1) // 4)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.LayerNorm(8)) for _ in range(blocks)])


def _policy(model: nn.Module, precision: str) -> Policy:
    sig = module_signatures(model)
    return Policy(layers={k: LayerEntry(precision) for k in sig}, modules=sig)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def measure(modules: int, repeats: int) -> dict[str, float]:
    """One row of the table for a model of about ``modules`` modules."""
    model = _model(modules)
    n_modules = len(list(model.modules()))
    n_layers = len(module_signatures(model))
    x = torch.randn(2, 8)
    p32, p16 = _policy(model, "fp32"), _policy(model, "bf16")
    t = time.perf_counter()
    p16.apply(model).remove()
    first = 1e3 * (time.perf_counter() - t)

    def context() -> None:
        with p16.autocast(model):
            pass

    blocks = nn.Sequential(*[_AutocastBlock(m) for block in model for m in block])
    rows: dict[str, list[float]] = {k: [] for k in ("context", "plain", "fp32", "bf16", "autocast")}
    with torch.no_grad():
        for _ in range(max(3, repeats // 10)):  # interleaved rounds, each a median of its own
            rows["context"].append(_median_ms(context, 10))
            rows["plain"].append(_median_ms(lambda: model(x), 10))
            with p32.apply(model):
                rows["fp32"].append(_median_ms(lambda: model(x), 10))
            with p16.apply(model):
                rows["bf16"].append(_median_ms(lambda: model(x), 10))
            rows["autocast"].append(_median_ms(lambda: blocks(x), 10))
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"modules": n_modules, "layers": n_layers, "first_apply_ms": round(first, 2),
            "context_ms": round(med["context"], 3),
            "fp32_layer_us": round(1e3 * (med["fp32"] - med["plain"]) / n_layers, 2),
            "plain_layer_us": round(1e3 * med["plain"] / n_layers, 2),
            "bf16_layer_us": round(1e3 * med["bf16"] / n_layers, 2),
            "autocast_block_us": round(1e3 * med["autocast"] / n_layers, 2)}


def python_calls(fn) -> int:
    """The Python calls ``fn()`` makes: every Python frame entered (``sys.setprofile``'s "call" events)."""
    n = 0

    def count(frame, event, arg):
        nonlocal n
        n += event == "call"

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n


def gpt2_case(width: int = 64, vocab: int = 512, rows: int = 2, seq: int = 32) -> tuple[nn.Module, dict, object]:
    """A 12-layer HF GPT-2 (random init, dropout off), a batch with labels, and its trace."""
    import transformers

    from autoprec.trace import trace

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=12, n_embd=width, n_head=max(1, width // 16), vocab_size=vocab,
                                  n_positions=seq, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, vocab, (rows, seq))
    batch = {"input_ids": ids, "labels": ids}
    return model, batch, trace(model, batch, device_type="cpu")


def policy_of(model: nn.Module, tr, precision: str, ops: bool = True) -> Policy:
    """Every traced layer in ``precision`` (``ops=False``: the module entries only), with the trace's handoff."""
    return Policy(layers={x.key: LayerEntry(precision) for x in tr.layers if ops or "::" not in x.key},
                  modules=module_signatures(model), handoff=tr.handoff)


def gpt2_calls(repeats: int) -> list[dict]:
    """Python calls and median ms of one GPT-2 training forward per variant (see the module docstring)."""
    import contextlib

    model, batch, tr = gpt2_case()

    def policy(precision: str, ops: bool) -> Policy:
        return policy_of(model, tr, precision, ops)

    variants = {"no autoprec": (contextlib.nullcontext, None),
                "blanket autocast bf16": (lambda: torch.autocast("cpu", dtype=torch.bfloat16), None),
                "policy: every layer bf16": (contextlib.nullcontext, policy("bf16", True)),
                "policy: modules bf16": (contextlib.nullcontext, policy("bf16", False)),
                "policy: every layer fp32": (contextlib.nullcontext, policy("fp32", True))}
    rows = []
    for name, (context, pol) in variants.items():
        handle = pol.apply(model) if pol is not None else None
        try:
            with context():
                model(**batch)
                calls = python_calls(lambda: model(**batch))
                ms = statistics.median(_median_ms(lambda: model(**batch), 5) for _ in range(max(1, repeats // 5)))
        finally:
            if handle is not None:
                handle.remove()
        rows.append({"variant": name, "python_calls": calls, "ms": round(ms, 2)})
    blanket = rows[1]["python_calls"]
    for row in rows:
        row["calls_vs_autocast"] = round(row["python_calls"] / blanket, 3)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 800, 3000])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "runtime_overhead.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(n, args.repeats) for n in args.sizes]
    header = ("modules", "layers", "first_apply_ms", "context_ms", "plain_layer_us", "fp32_layer_us",
              "bf16_layer_us", "autocast_block_us")
    print(f"# runtime overhead, {_cpu_name()}, torch {torch.__version__}, 1 thread")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    gpt2 = gpt2_calls(args.repeats)
    print(f"\n# one training forward of a 12-layer GPT-2 (width 64, 2 x 32 tokens), {_cpu_name()}, 1 thread")
    print("| variant | Python calls | calls / blanket autocast | ms (median) |")
    print("|---|---:|---:|---:|")
    for row in gpt2:
        print(f"| {row['variant']} | {row['python_calls']} | {row['calls_vs_autocast']} | {row['ms']} |")
    result = {"cpu": _cpu_name(), "torch": torch.__version__,
              "bf16_native": bool(torch.cpu._is_avx512_bf16_supported()), "rows": rows, "gpt2": gpt2}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
