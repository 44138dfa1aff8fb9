"""Reported against measured 16-bit share of the matmul-class FLOPs, for every test and benchmark model.

For each model this tunes a policy (``--targets cuda cpu``: a GPU-target BF16 policy, and this CPU's
policy) and compares ``policy.low_precision_fraction()`` with what runs: one forward with the policy
installed under a dispatch mode that counts each matmul-class op's FLOPs (torch's flop registry with
autoprec's formulas) by the dtype of its operands (``tests/flopcount.py``). It also lists the FLOPs
the trace could not attribute to a layer (``policy.unseen``). Counts, not times: the same on any
machine and under any load. The GPU-target policies are priced with the GPU roofline without its
per-call costs (as ``compare.py`` does): these models are small and launch-bound on a real GPU, where
the estimate keeps them FP32, which would leave nothing to count. FP16 policies are left out: on a CPU FP16 is emulated in FP32 (the
dtype a counter sees is not the format the policy stands for).

Models: ``tests/models.py`` (``FACTORIES``), ``benchmarks/_zoo.py`` (``ALL_MODELS`` but its hazard
models, which are those of ``tests/models.py``), ``tests/models_coverage.py`` (``BUILDERS``) and
from transformers Mamba (its slow path: a Python scan) and Mixtral with grouped-mm and with eager
(looping) experts.

Run:  python benchmarks/flop_coverage.py [--models mlp gpt2 lstm] [--targets cuda cpu]
Writes benchmarks/results/flop_coverage.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _zoo  # noqa: E402
import torch  # noqa: E402

import autoprec  # noqa: E402
from autoprec.core import call_model  # noqa: E402
from autoprec.device import compute_bound  # noqa: E402
from tests import models as test_models  # noqa: E402
from tests.flopcount import DtypeFlops  # noqa: E402
from tests.models_coverage import BUILDERS  # noqa: E402

Build = Callable[[], tuple[torch.nn.Module, Any, Any]]


def _mixtral(experts: str) -> Build:
    def build() -> tuple[torch.nn.Module, Any, Any]:
        from transformers import MixtralConfig, MixtralForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            cfg = MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                num_experts_per_tok=2, max_position_embeddings=128)
            cfg._experts_implementation = experts
            ids = torch.randint(0, 256, (4, 32))
            return MixtralForCausalLM(cfg).train(), {"input_ids": ids, "labels": ids}, None
    return build


def _mamba() -> tuple[torch.nn.Module, Any, Any]:
    from transformers import MambaConfig, MambaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MambaForCausalLM(MambaConfig(vocab_size=256, hidden_size=128, state_size=8, num_hidden_layers=2,
                                             expand=2, conv_kernel=4))
        ids = torch.randint(0, 256, (4, 32))
        return model.train(), {"input_ids": ids, "labels": ids}, None


def _catalogue() -> dict[str, tuple[str, Build]]:
    out: dict[str, tuple[str, Build]] = {}
    for name, factory in test_models.FACTORIES.items():
        out[name] = ("tests/models.py", lambda f=factory: f())
    for name in _zoo.HF_MODELS + _zoo.GNN_MODELS:
        def zoo(name: str = name) -> tuple[torch.nn.Module, Any, Any]:
            spec = _zoo.build(name)
            return spec.model, spec.tune[0], spec.tune[1]
        out[name] = ("benchmarks/_zoo.py", zoo)
    for name, builder in BUILDERS.items():
        out[name] = ("tests/models_coverage.py", lambda b=builder: (*b(), None))
    out["mamba"] = ("transformers", _mamba)
    out["mixtral_grouped_mm"] = ("transformers", _mixtral("grouped_mm"))
    out["mixtral_eager"] = ("transformers", _mixtral("eager"))
    return out


def measured(policy: autoprec.Policy, model: torch.nn.Module, batch: Any) -> tuple[float, int]:
    """The 16-bit share of the forward matmul-class FLOPs as they run with ``policy``, and their total."""
    with torch.enable_grad(), policy.autocast(model), DtypeFlops() as counter:
        call_model(model, batch)
    return counter.low_fraction(), sum(counter.flops.values())


def row(name: str, source: str, build: Build, target: str) -> dict:
    model, batch, loss_fn = build()
    kw = {"target": "cpu"} if target == "cpu" else {"target": "cuda", "dtypes": ["bf16"], "profile": compute_bound()}
    started = time.perf_counter()
    policy = autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=0, **kw)
    seconds = time.perf_counter() - started
    fraction, flops = measured(policy, model, batch)
    reported = policy.low_precision_fraction()
    return {"model": name, "source": source, "target": target, "reported": round(reported, 4),
            "measured": round(fraction, 4), "gap": round(abs(reported - fraction), 4),
            "flops_measured": flops, "flops_traced": sum(e.flops for e in policy.layers.values())
            + sum(policy.unseen.values()), "unseen": dict(policy.unseen), "opaque": sorted(policy.opaque),
            "layers": len(policy.layers), "candidates": policy.stats["candidates"],
            "tuning_seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| model | source | target | reported | measured | gap | FLOPs unseen | layers |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        unseen = sum(r["unseen"].values())
        share = f"{unseen / r['flops_traced']:.1%}" if r["flops_traced"] else "-"
        lines.append(f"| {r['model']} | {r['source']} | {r['target']} | {r['reported']:.4f} | {r['measured']:.4f} "
                     f"| {r['gap']:.4f} | {share} | {r['layers']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    catalogue = _catalogue()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(catalogue), choices=list(catalogue), metavar="MODEL")
    parser.add_argument("--targets", nargs="+", default=["cuda", "cpu"], choices=["cuda", "cpu"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "flop_coverage.json"))
    args = parser.parse_args(argv)
    logging.getLogger("autoprec").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    for target in args.targets:
        for name in args.models:
            source, build = catalogue[name]
            rows.append(row(name, source, build, target))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"torch": torch.__version__, "results": rows}, fh, indent=2)
        fh.write("\n")
    return rows


if __name__ == "__main__":
    main()
