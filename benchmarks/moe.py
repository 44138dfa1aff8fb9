"""Mixtures of experts tuned for a CUDA target: how much of their matmul work runs in 16-bit, and where the experts are.

Each model is tuned with ``autoprec.tune(model, batch, target="cuda", dtypes=["bf16"], verify_steps=0)`` on this CPU,
priced with the compute-bound roofline profile (:func:`autoprec.device.compute_bound`, no per-call costs: every
16-bit matmul is faster, so the numerical decisions, not the size of these tiny models, decide). Then, per model:

- ``policy``: the share of the forward matmul-class FLOPs that ran with 16-bit operands while the tuned policy ran
  (counted per ATen op by ``tests/flopcount.DtypeFlops``, a policy for CUDA emulated on this CPU);
- ``blanket``: the same share under ``torch.autocast("cpu", torch.bfloat16)`` over the whole forward, or the error
  it fails with;
- ``experts``: the experts' share of the model's matmul FLOPs (the policy's layers under an ``experts`` module) and
  the formats they got; ``router``: the router's format (``router``, or transformers' ``mlp.gate``);
- ``seconds``: ``tune``'s own ``tuning_seconds``.

Models (random init):

- ``moe``: ``tests/models_coverage.moe()``, a top-1 routed block with grouped-GEMM experts (``F.grouped_mm`` over
  stacked weights), 8 x 64 tokens of width 128;
- ``looped``: ``tests/models_coverage.looped_moe()``, the same routing with an ``nn.ModuleList`` of 4 expert MLPs run
  in a Python loop on their routed tokens (``looped-8``: 8 experts);
- ``mixtral-<impl>``, ``qwen3-<impl>``: ``MixtralForCausalLM`` and ``Qwen3MoeForCausalLM`` from tiny configs (2 layers,
  width ``--width``, 4 experts, top-2, 2 x 16 tokens), experts run as ``grouped_mm``, ``batched_mm`` or ``eager``
  (``config._experts_implementation``), where the installed transformers has them.

Run:  python benchmarks/moe.py [--models moe looped ...] [--width 128] [--threads 2]
Writes benchmarks/results/moe.json (``--out``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from typing import Any, Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _measure import write_json

import autoprec
from autoprec.core import call_model
from autoprec.device import compute_bound, save_profile
from tests.flopcount import DtypeFlops, measured_fraction
from tests.models_coverage import looped_moe, moe

IMPLS = ("grouped_mm", "batched_mm", "eager")
OUT = os.path.join(HERE, "results", "moe.json")


def _hf(family: str, impl: str, width: int) -> tuple[torch.nn.Module, Any]:
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": 64, "hidden_size": width, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "num_experts_per_tok": 2, "max_position_embeddings": 32}
    if family == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=2 * width, num_local_experts=4, **common)
        cls = tf.MixtralForCausalLM
    else:
        cfg = tf.Qwen3MoeConfig(moe_intermediate_size=2 * width, intermediate_size=2 * width, num_experts=4,
                                decoder_sparse_step=1, head_dim=width // 2, **common)
        cls = tf.Qwen3MoeForCausalLM
    cfg._experts_implementation = impl
    ids = torch.randint(0, 64, (2, 16))
    return cls(cfg).train(), {"input_ids": ids, "labels": ids}


def builders(width: int) -> dict[str, Callable[[], tuple[torch.nn.Module, Any]]]:
    """Every model the benchmark knows, by name (the transformers ones only where they can be built)."""
    out: dict[str, Callable[[], tuple[torch.nn.Module, Any]]] = {
        "moe": moe, "looped": looped_moe, "looped-8": lambda: looped_moe(experts=8)}
    try:
        import transformers as tf
    except ImportError:
        return out
    for family, config in (("mixtral", "MixtralConfig"), ("qwen3", "Qwen3MoeConfig")):
        if hasattr(tf, config) and hasattr(tf.PretrainedConfig(), "_experts_implementation"):
            for impl in IMPLS:
                out[f"{family}-{impl}"] = lambda f=family, i=impl: _hf(f, i, width)
    return out


def _blanket(model: torch.nn.Module, batch: Any) -> float | str:
    try:
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16), DtypeFlops() as counter:
            call_model(model, batch)
    except Exception as exc:  # noqa: BLE001 - a blanket autocast that cannot run is a result
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return counter.low_fraction()


def _formats(entries: list[Any]) -> str:
    return "/".join(sorted({e.precision for e in entries})) or "-"


def run_one(name: str, build: Callable[[], tuple[torch.nn.Module, Any]]) -> dict[str, Any]:
    """Tune one model for CUDA and measure it (see the module docstring)."""
    model, batch = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = autoprec.tune(model, batch, target="cuda", dtypes=["bf16"], progress=False, verify_steps=0,
                               measure_speed=False)
    ours = measured_fraction(policy, model, lambda: call_model(model, batch))
    experts = [e for k, e in policy.layers.items() if "experts" in k.split(".")]
    routers = [e for k, e in policy.layers.items() if k.split(".")[-1] in ("router", "gate")]
    total = sum(e.flops for e in policy.layers.values()) + sum(policy.unseen.values())
    return {"model": name, "policy": ours, "blanket": _blanket(model, batch),
            "experts_share": sum(e.flops for e in experts) / total if total else 0.0,
            "experts_format": _formats(experts), "experts_layers": len(experts), "router_format": _formats(routers),
            "probe_passes": policy.stats["probe_passes"], "seconds": policy.stats["tuning_seconds"]}


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    head = ("| model | 16-bit share, policy | blanket `torch.autocast(bf16)` | experts' FLOP share | experts "
            "| router | probe passes | tuning s |")
    out = [head, "|---|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        blanket = r["blanket"] if isinstance(r["blanket"], str) else f"{r['blanket']:.3f}"
        out.append(f"| {r['model']} | {r['policy']:.3f} | {blanket} | {r['experts_share']:.3f} | "
                   f"{r['experts_format']} ({r['experts_layers']} layers) | {r['router_format']} | "
                   f"{r['probe_passes']} | {r['seconds']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns the rows it wrote."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=None, help="default: every model that can be built")
    ap.add_argument("--width", type=int, default=128, help="hidden size of the transformers models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("autoprec").setLevel(logging.ERROR)
    known = builders(args.width)
    names = args.models or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown or unavailable models {unknown}; known here: {list(known)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cuda_compute_bound.json")
        save_profile(compute_bound(device="roofline, no per-call costs"), path)
        old = os.environ.get("AUTOPREC_PROFILE")
        os.environ["AUTOPREC_PROFILE"] = path
        try:
            rows = [run_one(n, known[n]) for n in names]
        finally:
            os.environ.pop("AUTOPREC_PROFILE") if old is None else os.environ.__setitem__("AUTOPREC_PROFILE", old)
    print(table(rows))
    write_json(args.out, {"torch": torch.__version__, "threads": args.threads, "width": args.width,
                          "profile": "autoprec.device.compute_bound, CUDA target", "results": rows})
    return rows


if __name__ == "__main__":
    main()
