"""How autoprec's tuning cost grows with model depth.

Tunes a stack of ``depth`` pre-LN residual MLP blocks (LayerNorm -> Linear -> GELU -> Linear, plus
the residual add) for depths 4 -> 64 and prints, per depth, the layers, the forward+backward passes
(probe, search, verification), the Optuna trials, the wall time, and the time per pass; then fits
``y = c * depth^k`` by least squares in log-log space and prints the exponent ``k`` for passes and
for wall time.

Passes are what autoprec's algorithm controls: the probe runs an FP32 reference and then, probing
each candidate layer alone, one pass per layer and format; the search at most ``n_trials`` (30)
passes, verification a fixed ``2 x verify_steps``. With structure sharing (``tune``'s default,
:mod:`autoprec.probe._roles`) the blocks' layers are probed as one group per role and format, split only
where a group is not clearly inside the bound, so the probe's passes stop growing with depth where
the groups hold; the column "probe alone" is what probing every layer alone costs (``1 + candidates
x formats``, by construction). Each pass runs the whole model, whose cost also grows linearly with
depth, so wall time grows as passes x time per pass: towards k ~ 2 once the per-pass cost is no
longer dominated by fixed overhead.

Runs on one thread by default (``--threads``), so that other load on a shared machine does not
turn OpenMP's waiting into the measurement.

The default policy target is a GPU in BF16 (``--target cuda --dtypes bf16``), tuned on this CPU: at
this width the CPU cost model rightly finds no gain in BF16 and the search would have nothing to
search; the GPU target exercises every stage with one candidate format per layer.

With ``--gpt2`` it tunes GPT-2 shapes instead (``blocks x width``, vocabulary 50257, batch 2 x 128
tokens, random init, dropout off, ``target="cuda"`` with its default formats FP16 and BF16, default
settings otherwise), each in a fresh process (after a throwaway tune of a tiny model, so that the
libraries tune loads are resident before the measurement), and prints per shape: tuning time as a multiple of one
plain FP32 forward+backward, the passes of each stage, the process's peak RSS during ``tune`` above
the RSS before it (the caller's model already loaded) as a multiple of the FP32 parameter bytes,
and the same for three plain FP32 training steps with ``Adam`` (measured in a process of its own),
which is what the user's own training holds.

Run:  python benchmarks/scaling.py [--quick] [--depths 4 8 16 32 64] [--target cpu|cuda] [--dtypes bf16 fp16]
      python benchmarks/scaling.py --gpt2 [2x128 4x256 6x384 8x512 12x768]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import write_json  # noqa: E402
from probe_cost import _hwm, _hwm_reset  # noqa: E402

import autoprec

HERE = os.path.dirname(os.path.abspath(__file__))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def make(depth: int, dim: int, batch: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, Any]:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(*[Block(dim) for _ in range(depth)], nn.LayerNorm(dim), nn.Linear(dim, 10))
    x = torch.randn(batch, dim, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y)

    return model, x, loss_fn


def plain_pass_seconds(model: nn.Module, x: torch.Tensor, loss_fn: Any, n: int = 5) -> float:
    """Median time of one plain FP32 forward+backward (no autoprec), for comparison with ms/pass."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        loss_fn(model(x), x).backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return sorted(times)[n // 2]


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else math.nan


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = slope * x + intercept``; returns (slope, intercept)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((a - mx) ** 2 for a in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / den if den else math.nan
    return slope, my - slope * mx


GPT2_SHAPES = ["2x128", "4x256", "6x384", "8x512", "12x768"]


def gpt2(shape: str, vocab: int = 50257) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A random-init GPT-2 of ``shape`` (``blocks x width``, dropout off) and a batch of 2 x 128 tokens."""
    import transformers as tf

    blocks, width = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    config = tf.GPT2Config(n_layer=blocks, n_embd=width, n_head=max(1, width // 64), vocab_size=vocab,
                           n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = tf.GPT2LMHeadModel(config).float().train()
    ids = torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids.clone()}


def gpt2_step(shape: str, vocab: int) -> dict[str, Any]:
    """Plain FP32 training of one shape (own process): fwd+bwd seconds, peak RSS of three Adam steps."""
    model, batch = gpt2(shape, vocab)
    before = _hwm_reset()  # memory first, from the state tune starts in: no earlier pass freed memory to reuse
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
    peak = max(0, _hwm() - before) / 2 ** 20
    del opt
    model, batch = gpt2(shape, vocab)  # the initial weights again, for the timing
    times = []
    for _ in range(4):  # the first is a warm-up
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return {"params": sum(p.numel() for p in model.parameters()), "plain_s": sorted(times[1:])[1],
            "step_peak_mb": peak}


def gpt2_tune(shape: str, vocab: int, verify_steps: int) -> dict[str, Any]:
    """One whole ``tune(..., target="cuda")`` of a shape (own process): seconds, passes, peak memory."""
    # a throwaway tune of a tiny model first: the libraries tune loads (torch.export, Optuna, ...) are
    # resident memory of their own, paid once per process, not the model's
    tiny, tx, tloss = make(1, 16, 4)
    autoprec.tune(tiny, tx, tloss, target="cuda", verify_steps=2, progress=False)
    model, batch = gpt2(shape, vocab)
    before = _hwm_reset()
    t0 = time.perf_counter()
    policy = autoprec.tune(model, batch, target="cuda", progress=False, verify_steps=verify_steps)
    secs = time.perf_counter() - t0
    st = policy.stats
    return {"tune_s": secs, "tune_peak_mb": max(0, _hwm() - before) / 2 ** 20,
            "peak_by_stage_mb": st["peak_memory_mb_by_stage"], "probe_passes": st["probe_passes"],
            "search_passes": st["search_passes"], "verify_passes": st["verify_passes"], "trials": st["trials"],
            "candidates": st["candidates"], "layers": len(policy.layers),
            "low_fraction": policy.low_precision_fraction(),
            "stage_seconds": {k: v["seconds"] for k, v in st["stages"].items()}}


def gpt2_main(shapes: list[str], threads: int, out: str, vocab: int = 50257, verify_steps: int = 20) -> dict[str, Any]:
    """The GPT-2 table: each shape's plain step and whole tune in fresh processes."""
    def run(flag: str, shape: str) -> dict[str, Any]:
        cmd = [sys.executable, os.path.abspath(__file__), flag, shape, "--threads", str(threads), "--vocab", str(vocab),
               "--verify-steps", str(verify_steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if res.returncode:
            raise SystemExit(f"{flag} {shape} failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    rows = []
    print("| shape | params | FP32 MiB | plain fwd+bwd s | tune s | tune / plain | probe passes (candidates) | "
          "search passes | verify passes | tune peak RSS / params | Adam step peak RSS / params | 16-bit FLOPs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in shapes:
        row = {"shape": shape, **run("--one-step", shape), **run("--one-tune", shape)}
        row["param_mb"] = 4 * row["params"] / 2 ** 20
        row["tune_vs_plain"] = row["tune_s"] / row["plain_s"]
        rows.append(row)
        print(f"| {shape} | {row['params'] / 1e6:.1f}M | {row['param_mb']:.0f} | {row['plain_s']:.2f} | "
              f"{row['tune_s']:.0f} | {row['tune_vs_plain']:.0f} | {row['probe_passes']} ({row['candidates']}) | "
              f"{row['search_passes']} | {row['verify_passes']} | {row['tune_peak_mb'] / row['param_mb']:.1f}x | "
              f"{row['step_peak_mb'] / row['param_mb']:.1f}x | {100 * row['low_fraction']:.0f}% |", flush=True)
    if len(rows) >= 2:
        blocks = [int(r["shape"].split("x")[0]) for r in rows]
        k = fit_exponent(blocks, [r["probe_passes"] for r in rows])
        print(f"\nprobe passes ~ blocks^{k:.2f}")
    else:
        k = math.nan
    result = {"model": "gpt2", "vocab": vocab, "batch": [2, 128], "target": "cuda", "threads": threads,
              "verify_steps": verify_steps,
              "rows": rows, "probe_passes_exponent": k, "torch": torch.__version__, "cores": os.cpu_count()}
    return write_json(out, result)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=None, help="block counts (default 4 8 16 32 64)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine, 2 threads under other load "
                        "made single runs 10-80x slower)")
    p.add_argument("--target", default="cuda", choices=["cpu", "cuda"],
                   help="policy target whose cost model the search uses")
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16"],
                   help="candidate formats (FP16 is emulated on a CPU)")
    p.add_argument("--verify-steps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="depths 2 4 8 16")
    p.add_argument("--gpt2", nargs="*", metavar="SHAPE", default=None,
                   help=f"GPT-2 shapes instead of the MLP stack (default {' '.join(GPT2_SHAPES)})")
    p.add_argument("--vocab", type=int, default=50257, help="GPT-2 vocabulary (with --gpt2)")
    p.add_argument("--one-step", help=argparse.SUPPRESS)  # internal: one GPT-2 shape's plain training
    p.add_argument("--one-tune", help=argparse.SUPPRESS)  # internal: one GPT-2 shape's tune
    p.add_argument("--out", default=None, help="JSON output (default results/scaling.json, scaling_gpt2.json)")
    args = p.parse_args(argv)
    if args.one_step or args.one_tune:
        torch.set_num_threads(args.threads)
        logging.getLogger("autoprec").setLevel(logging.WARNING)
        print(json.dumps(gpt2_step(args.one_step, args.vocab) if args.one_step
                         else gpt2_tune(args.one_tune, args.vocab, args.verify_steps)))
        return {}
    if args.gpt2 is not None:
        return gpt2_main(args.gpt2 or GPT2_SHAPES, args.threads,
                         args.out or os.path.join(HERE, "results", "scaling_gpt2.json"), args.vocab, args.verify_steps)
    args.out = args.out or os.path.join(HERE, "results", "scaling.json")
    depths = args.depths or ([2, 4, 8, 16] if args.quick else [4, 8, 16, 32, 64])
    # the GPU target is priced with the roofline without per-call costs, as at sizes where 16-bit pays:
    # with the estimate's launch costs these width-128 blocks stay FP32 and there would be no search
    from autoprec.device import compute_bound
    profile = compute_bound() if args.target == "cuda" else None
    logging.getLogger("autoprec").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    # one throwaway run first: imports and first-call costs (torch.export, Optuna) are not depth's
    warm_model, warm_x, warm_loss = make(1, args.dim, args.batch)
    autoprec.tune(warm_model, warm_x, warm_loss, target=args.target, dtypes=args.dtypes, verify_steps=2,
                  progress=False, profile=profile)

    rows = []
    print("| blocks | layers | passes (probe+search+verify) | probe alone | trials | seconds | ms/pass | "
          "plain FP32 fwd+bwd ms | 16-bit FLOPs |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for depth in depths:
        model, x, loss_fn = make(depth, args.dim, args.batch)
        t0 = time.perf_counter()
        policy = autoprec.tune(model, x, loss_fn, target=args.target, dtypes=args.dtypes,
                               verify_steps=args.verify_steps, progress=False, profile=profile)
        secs = time.perf_counter() - t0
        st = policy.stats
        passes = st["probe_passes"] + st["search_passes"] + st["verify_passes"]
        row = {"blocks": depth, "layers": len(policy.layers), "passes": passes, "probe_passes": st["probe_passes"],
               "search_passes": st["search_passes"], "verify_passes": st["verify_passes"], "trials": st["trials"],
               "seconds": secs, "ms_per_pass": 1e3 * secs / max(passes, 1),
               "low_fraction": policy.low_precision_fraction(),
               "probe_passes_alone": 1 + st["candidates"] * len(policy.formats)}
        row["plain_ms"] = 1e3 * plain_pass_seconds(model, x, loss_fn)
        rows.append(row)
        print(f"| {depth} | {row['layers']} | {passes} ({st['probe_passes']}+{st['search_passes']}+"
              f"{st['verify_passes']}) | {row['probe_passes_alone']} | {st['trials']} | {secs:.1f} | {row['ms_per_pass']:.1f} | "
              f"{row['plain_ms']:.1f} | {100 * row['low_fraction']:.0f}% |", flush=True)
    xs = [r["blocks"] for r in rows]
    k_passes = fit_exponent(xs, [r["passes"] for r in rows])
    k_probe = fit_exponent(xs, [r["probe_passes"] for r in rows])
    k_time = fit_exponent(xs, [r["seconds"] for r in rows])
    k_pass_time = fit_exponent(xs, [r["ms_per_pass"] for r in rows])
    tail = rows[-3:] if len(rows) >= 4 else rows
    k_tail = {key: fit_exponent([r["blocks"] for r in tail], [r[key] for r in tail])
              for key in ("passes", "probe_passes", "seconds", "ms_per_pass")}
    slope, icept = linear_fit([r["layers"] for r in rows], [r["passes"] for r in rows])
    print()
    print(f"fitted exponent (y ~ blocks^k), all depths: passes k = {k_passes:.2f}, probe passes k = {k_probe:.2f}, "
          f"wall time k = {k_time:.2f}, time per pass k = {k_pass_time:.2f}")
    print(f"fitted exponent, largest {len(tail)} depths: passes k = {k_tail['passes']:.2f}, probe passes "
          f"k = {k_tail['probe_passes']:.2f}, wall time k = {k_tail['seconds']:.2f}, "
          f"time per pass k = {k_tail['ms_per_pass']:.2f}")
    print(f"passes ~ {icept:.0f} + {slope:.2f} x layers")
    result = {"target": args.target, "dtypes": args.dtypes, "threads": args.threads, "dim": args.dim, "batch": args.batch, "verify_steps": args.verify_steps,
              "rows": rows, "exponents": {"passes": k_passes, "probe_passes": k_probe, "seconds": k_time,
                                          "ms_per_pass": k_pass_time},
              "exponents_largest": k_tail, "passes_linear_fit": {"per_layer": slope, "intercept": icept},
              "torch": torch.__version__, "cores": os.cpu_count()}
    return write_json(args.out, result)


if __name__ == "__main__":
    main()
