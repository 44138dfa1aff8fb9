"""Held-out error of tuned policies: do tune's decisions hold on batches it did not see? (issue 25)

For each hazard model of ``tests/models_unseen.py`` (and, with ``--zoo``, benign models of
``tests/models.py``: an MLP, a transformer block, a CNN) this tunes on one batch (``draw(0)``), then on
``--batches`` fresh batches of the same distribution (``draw(1..N)``) measures the policy's loss and
gradient errors against FP32 (relative error of the loss; relative L2 of all parameter gradients; the
same model run with the policy applied and without, ``tests/helpers.py``'s ``forward_backward``), and
reports their max and median and how many batches exceed tune's bounds (``tolerance``,
``grad_tolerance``: 0.01 and 0.05 by default). Next to it: tune's own measured errors on its batch
(``policy.stats["measured_loss_err"]``, ``["measured_grad_err"]``), the tuning time, the 16-bit share
of matmul FLOPs (``policy.low_precision_fraction()``) of the tuned policy, of the careful hand-written
policy and of blanket BF16 (every layer with FLOPs 16-bit), and the careful policy's own held-out errors.

Target ``cuda`` (the default; FP16 emulated on this CPU) is priced with the built-in roofline without
per-call costs (what the test suite pins: every 16-bit matmul layer pays, however small);
``--target cpu`` prices with ``--profile`` or autoprec's default. Step timing is off (``measure_speed=False``).
Options of ``tune`` that this version lacks are not passed: the same script measures before and after a
change to ``tune`` (``held_out=`` is passed when ``tune`` accepts it: ``--held-out``).

Run:  python benchmarks/held_out.py [--zoo] [--hf] [--always-pays] [--batches 20] [--target cuda|cpu] [--models NAME ...]
Writes benchmarks/results/held_out.json (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the models live in tests/
    sys.path.insert(0, _ROOT)

import autoprec
from autoprec import LayerEntry, Policy
from autoprec.core import compute_loss
from tests import models as TM
from tests.helpers import forward_backward, rel_errors
from tests.models_unseen import UNSEEN_FACTORIES, UnseenCase

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# benign models as cases: weights and data of tests/models.py, fresh batches from other seeds
# ---------------------------------------------------------------------------------------------

def _zoo_case(name: str) -> UnseenCase:
    """A benign model of ``tests/models.py`` as a case: its batch of seed ``s`` and its target (label) as
    ``(x, y)``; no careful policy beyond blanket BF16 (every layer with FLOPs 16-bit)."""
    factory = TM.SAFE_FACTORIES[name]
    model, _, _ = factory(seed=0)

    def draw(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, x, lf = factory(seed=1 + s)
        target = lf.__closure__[0].cell_contents  # the factory's target / labels tensor
        return x, target

    def loss_fn(out: torch.Tensor, batch: Any) -> torch.Tensor:
        y = batch[1]
        if y.dtype == torch.long:
            return torch.nn.functional.cross_entropy(out.float(), y)
        return torch.nn.functional.mse_loss(out.float(), y)

    return UnseenCase(name, _Ignore(model), draw, loss_fn, {"*": "bf16"}, "benign")


class _Ignore(torch.nn.Module):
    """Wraps a one-input model so that it takes the batch ``(x, y)`` and ignores ``y``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        return self.inner(x)


ZOO = ("mlp", "transformer_block", "cnn")
HF = ("gpt2", "bert", "llama", "vit")


def _hf_case(name: str, n: int) -> UnseenCase:
    """A benchmark model of ``benchmarks/_zoo.py`` (random-init transformers, ``"quick"`` size) as a case:
    ``draw(0)`` its tuning sample, ``draw(s)`` its held-out sample ``s``; the model's own loss; careful:
    blanket BF16."""
    sys.path.insert(0, HERE)
    import _zoo

    spec = _zoo.build(name, "quick", heldout=n)
    samples = [spec.tune, *spec.heldout]

    def draw(s: int) -> Any:
        return samples[s][0]

    own = samples[0][1] or (lambda out, batch: compute_loss(out, batch, None))  # the model's own loss
    return UnseenCase(name, spec.model, draw, own, {"*": "bf16"}, "benign (benchmarks/_zoo.py)")


# ---------------------------------------------------------------------------------------------
# policies and errors
# ---------------------------------------------------------------------------------------------

def assigned(policy: Policy, careful: dict[str, str]) -> Policy:
    """``policy`` with its layers' precisions replaced by ``careful`` (unnamed keys FP32; ``{"*": p}``:
    every layer with FLOPs in ``p``): its FLOP counts are the tuned policy's, so fractions compare."""
    unknown = sorted(set(careful) - set(policy.layers) - {"*"})
    if unknown:
        raise KeyError(f"careful policy names {unknown}, not layer keys of the tuned policy: {sorted(policy.layers)}")

    def precision(key: str, entry: LayerEntry) -> str:
        if "*" in careful:
            return careful["*"] if entry.flops else "fp32"
        return careful.get(key, "fp32")

    layers = {k: dataclasses.replace(e, precision=precision(k, e), reason="cast", excluded=False)
              for k, e in policy.layers.items()}
    return dataclasses.replace(policy, layers=layers)


def blanket_fraction(policy: Policy) -> float:
    """16-bit FLOP fraction of blanket BF16: every layer with FLOPs 16-bit (unseen FLOPs stay FP32)."""
    return assigned(policy, {"*": "bf16"}).low_precision_fraction()


def held_out_errors(case: UnseenCase, policy: Policy, seeds: list[int]) -> list[tuple[float, float]]:
    """(loss relative error, gradient relative L2 error) of ``policy`` against FP32 on each batch
    ``case.draw(s)``; non-finite results are ``inf``."""
    out = []
    for s in seeds:
        batch = case.draw(s)
        ref = forward_backward(case.model, batch, case.loss_fn)
        got = forward_backward(case.model, batch, case.loss_fn, policy=policy)
        loss_err, grad_err, _ = rel_errors(*got, *ref)
        out.append((loss_err, grad_err))
    return out


def summary(errs: list[tuple[float, float]], loss_bound: float, grad_bound: float) -> dict[str, Any]:
    """Max, median and count over the bound of the loss and gradient errors."""
    loss, grad = [e[0] for e in errs], [e[1] for e in errs]
    return {"loss_max": max(loss), "loss_median": statistics.median(loss),
            "loss_over": sum(v > loss_bound for v in loss),
            "grad_max": max(grad), "grad_median": statistics.median(grad),
            "grad_over": sum(v > grad_bound for v in grad), "grad": grad, "loss": loss}


# ---------------------------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------------------------

def tune_options(target: str, profile: Any, held_out: Any) -> dict[str, Any]:
    """The options passed to ``tune``: only those its signature has."""
    params = inspect.signature(autoprec.tune).parameters
    opts: dict[str, Any] = {"target": target, "progress": False, "measure_speed": False, "profile": profile}
    if held_out is not None:
        opts["held_out"] = held_out
    return {k: v for k, v in opts.items() if k in params}


def measure(case: UnseenCase, opts: dict[str, Any], n: int) -> dict[str, Any]:
    """Tune ``case`` on ``draw(0)`` and measure the policies on ``draw(1..n)``."""
    t0 = time.perf_counter()
    policy = autoprec.tune(case.model, case.draw(0), case.loss_fn, **opts)
    wall = time.perf_counter() - t0
    careful = assigned(policy, case.careful)
    loss_bound, grad_bound = policy.tolerance["loss"], policy.tolerance["grad"]
    seeds = list(range(1, n + 1))
    row = {"model": case.name, "note": case.note, "layers": len(policy.layers),
           "tune_loss_err": policy.stats["measured_loss_err"], "tune_grad_err": policy.stats["measured_grad_err"],
           "tuning_seconds": policy.stats["tuning_seconds"], "wall_seconds": round(wall, 2),
           "fraction": policy.low_precision_fraction(), "careful_fraction": careful.low_precision_fraction(),
           "blanket_fraction": blanket_fraction(policy), "loss_bound": loss_bound, "grad_bound": grad_bound,
           "verified": None if policy.verification is None else policy.verification.passed,
           "assignment": dict(policy.assignment), "careful": dict(careful.assignment),
           "policy": summary(held_out_errors(case, policy, seeds), loss_bound, grad_bound),
           "careful_policy": summary(held_out_errors(case, careful, seeds), loss_bound, grad_bound)}
    held = getattr(policy, "held_out", None)  # tune's own held-out check, where this version has one
    if held is not None:
        row["tune_held_out"] = dataclasses.asdict(held)
    row["amplified"] = sorted(k for k, e in policy.layers.items() if e.reason == "amplified")
    row["probe_passes"] = policy.stats.get("probe_passes")
    row["held_out_passes"] = policy.stats.get("held_out_passes", 0)
    return row


def _print_row(r: dict[str, Any], n: int) -> None:
    p, c = r["policy"], r["careful_policy"]
    print(f"| {r['model']} | {r['tune_grad_err']:.3g} | {r['tune_loss_err']:.3g} | {p['grad_max']:.3g} | "
          f"{p['grad_median']:.3g} | {p['grad_over']}/{n} | {p['loss_max']:.3g} | {p['loss_over']}/{n} | "
          f"{c['grad_max']:.3g} | {c['grad_over']}/{n} | {r['fraction']:.3f} | {r['careful_fraction']:.3f} | "
          f"{r['blanket_fraction']:.3f} | {r['tuning_seconds']:.1f} |", flush=True)


def cases(names: list[str], zoo: bool, hf: bool = False, n: int = 20) -> list[Callable[[], UnseenCase]]:
    """Factories of the cases to run, in order."""
    out: list[Callable[[], UnseenCase]] = [UNSEEN_FACTORIES[m] for m in names]
    if zoo:
        out += [lambda z=z: _zoo_case(z) for z in ZOO]
    if hf:
        out += [lambda z=z: _hf_case(z, n) for z in HF]
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(UNSEEN_FACTORIES), choices=list(UNSEEN_FACTORIES))
    p.add_argument("--zoo", action="store_true", help="also the benign MLP, transformer block and CNN")
    p.add_argument("--hf", action="store_true", help="also the benchmark transformers (GPT-2, BERT, Llama, ViT; "
                   "quick size, their held-out samples)")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--target", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--profile", default=None, help="a profile file (default: cuda: the roofline without "
                   "per-call costs; cpu: autoprec's default)")
    p.add_argument("--held-out", default=None, help="passed as tune(held_out=...) where tune has it "
                   "(a number is passed as a float)")
    p.add_argument("--always-pays", action="store_true", help="cuda: price casts as free too, so that every "
                   "16-bit layer pays at any size (the small benchmark transformers cast nothing otherwise)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results", "held_out.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = args.profile
    if profile is None and args.target == "cuda":
        from autoprec.device import compute_bound, roofline, save_profile

        profile = os.path.join(tempfile.mkdtemp(), "cuda_no_call_costs.json")
        priced = (roofline(fp32_flops=19.5e12, low_speedup=8.0, bandwidth=1e18, launch=0.0, region=0.0,
                           device="GPU roofline, free casts: every 16-bit layer pays") if args.always_pays
                  else compute_bound(device="test GPU: roofline, no per-call costs"))
        save_profile(priced, profile)
    held = args.held_out
    if held is not None:
        try:
            held = float(held)
        except ValueError:
            pass
    opts = tune_options(args.target, profile, held)
    n = args.batches
    print("| model | tune's grad err | tune's loss err | held-out grad err max | median | over bound | "
          "held-out loss err max | over bound | careful: grad err max | over | 16-bit fraction | careful | "
          "blanket BF16 | tuning s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for make in cases(args.models, args.zoo, args.hf, n):
        rows.append(measure(make(), opts, n))
        _print_row(rows[-1], n)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"rows": rows, "batches": n, "target": args.target, "threads": args.threads,
                   "tune_options": {k: v for k, v in opts.items() if k != "profile"},
                   "profile": ("roofline, no per-call costs" + (", free casts" if args.always_pays else ""))
                   if args.profile is None and args.target == "cuda" else args.profile, "torch": torch.__version__}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
