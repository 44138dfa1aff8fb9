"""Structure sharing on the benchmark models: probe passes, decisions and held-out error, with and without.

For each model (``_zoo.build(name, size)``) this tunes twice for a GPU (``target="cuda"``, FP16 and
BF16, emulated on this CPU, priced like ``compare.py``'s autoprec-gpu column: the built-in roofline
without per-call costs), once with ``share_roles=True`` (the default: roles of repeated blocks
probed as groups first, :mod:`autoprec.probe._roles`) and once with every layer probed alone, and reports:

- the probe passes of each, and the roles the trace found;
- whether every layer got the same precision and reason both ways (the layers that differ, if any);
- the held-out fidelity of each policy (loss relative error, gradient relative L2 error against an
  FP64 copy of the model, on held-out batches the tune never saw: the worst over them).

Both tunes verify (``--verify-steps``, 20 by default: what ``tune`` does), so the policies compared
are the ones a user would get.

Run:  python benchmarks/sharing.py [--models transformers vision gnn hazards] [--size default|large|quick]
Writes benchmarks/results/sharing.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _zoo
from _measure import fidelity, policy_variant, reference64
from compare import gpu_profile

import autoprec

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(name: str, size: str, verify_steps: int) -> dict[str, Any]:
    """Both tunes of one model and their figures."""
    spec = _zoo.build(name, size, heldout=2)
    refs = [reference64(spec.model, s) for s in spec.heldout]
    row: dict[str, Any] = {"model": name}
    policies = {}
    for share in (True, False):
        t0 = time.perf_counter()
        pol = autoprec.tune(spec.model, spec.tune[0], spec.tune[1], target="cuda", dtypes=["fp16", "bf16"],
                            optimizer=spec.optimizer, progress=False, verify_steps=verify_steps,
                            profile=gpu_profile(None), share_roles=share)
        tag = "shared" if share else "alone"
        policies[share] = pol
        fids = [fidelity(spec.model, s, policy_variant(tag, pol), r) for s, r in zip(spec.heldout, refs)]
        row[tag] = {"seconds": round(time.perf_counter() - t0, 2), "probe_passes": pol.stats["probe_passes"],
                    "low_fraction": round(pol.low_precision_fraction(), 4),
                    "verified": None if pol.verification is None else pol.verification.passed,
                    "heldout_loss_err": max(f.loss_err for f in fids),
                    "heldout_grad_err": max(f.grad_err for f in fids),
                    "heldout_nonfinite": any(f.nonfinite for f in fids)}
    a, b = policies[True], policies[False]
    row["layers"] = len(a.layers)
    row["shared_members"] = sum(any(f.get("shared", 1.0) > 1 for f in e.measured.values()) for e in a.layers.values())
    row["differing"] = [k for k in a.layers if (a.layers[k].precision, a.layers[k].reason)
                        != (b.layers[k].precision, b.layers[k].reason)]
    row["tolerance"] = a.tolerance
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["transformers", "vision", "gnn", "hazards"])
    p.add_argument("--size", default="default", choices=["quick", "default", "large"])
    p.add_argument("--verify-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results", "sharing.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | layers | layers measured in a group | probe passes alone | shared | same decisions | "
          "held-out loss err alone / shared | grad err alone / shared | verified alone / shared |")
    print("| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |")
    for name in _zoo.expand(args.models):
        r = measure(name, args.size, args.verify_steps)
        rows.append(r)
        a, s = r["alone"], r["shared"]
        same = "yes" if not r["differing"] else "NO: " + ", ".join(r["differing"])
        print(f"| {name} | {r['layers']} | {r['shared_members']} | {a['probe_passes']} | {s['probe_passes']} | "
              f"{same} | "
              f"{a['heldout_loss_err']:.2e} / {s['heldout_loss_err']:.2e} | "
              f"{a['heldout_grad_err']:.2e} / {s['heldout_grad_err']:.2e} | {a['verified']} / {s['verified']} |",
              flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"rows": rows, "size": args.size, "threads": args.threads, "torch": torch.__version__,
                   "target": "cuda (emulated on this CPU)", "verify_steps": args.verify_steps}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
