"""What one probe pass costs on GPT-2 shapes: the forward+backward, the error computation, the whole probe.

For each GPT-2 shape (random init, dropout off, ``blocks x width``, batch ``2 x 128`` tokens) it builds
the probe's runner as ``tune(..., target="cuda")`` does on this CPU (CUDA autocast emulated, BF16 and
FP16), then, interleaved over a sample of candidate layers:

- ``plain``: one FP32 forward+backward of the model without autoprec;
- ``pass``: one probe pass (``Runner.run``: the layer in 16-bit, the rest FP32, the gradients handed back);
- ``errors``: the per-pass error computation (``autoprec.probe.relative_errors``) against the FP32 reference;

the peak RSS of those sampled passes above the RSS before them (model, trace and FP32 reference in
place; the peak is reset with Linux's ``/proc/self/clear_refs`` in this benchmark's own process); and,
for every shape but ``12x768``, the whole probe over every candidate in both formats: wall time, passes,
and its peak RSS above the RSS before it (each shape runs in a fresh subprocess).

With ``--tune SHAPE`` it also runs the whole ``autoprec.tune(..., target="cuda")`` on that shape (in a
fresh process) and prints its time and peak memory per stage (``policy.stats``), and the process's
peak RSS above the RSS before ``tune`` (VmHWM), as a multiple of the FP32 parameter bytes.

With ``--passes SHAPE ...`` it counts instead the probe passes with and without structure sharing
(:mod:`autoprec.probe._roles`): the shared probe is run, the probe without sharing costs ``1 + candidates x 2``
passes by construction (each layer alone in each format). With ``--decide`` it also runs ``tune``
(``verify_steps=0``, priced by the launch-free roofline, as the tests do) with and without sharing
and compares every layer's decision; do this on ``12x64`` (12 blocks as GPT-2 small, narrow): at
12 x 768 the probe without sharing takes minutes.

Run:  python benchmarks/probe_cost.py [--shapes 2x128 6x384] [--large] [--samples 8] [--threads 1] [--tune 6x384]
      (--large adds 12x768 with the full 50257-token vocabulary, per-pass figures only)
      python benchmarks/probe_cost.py --passes 12x64 12x768 --decide   (passes with and without sharing)
Writes benchmarks/results/probe_cost.json (``--out``; ``--passes``: probe_passes.json).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

import torch

SHAPES = {"2x128": (2, 128, 1000), "4x256": (4, 256, 1000), "6x384": (6, 384, 1000),
          "12x64": (12, 64, 1000), "12x768": (12, 768, 50257)}


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_reset() -> int:
    """Reset this process's peak RSS (VmHWM) to its RSS now (Linux ``clear_refs``); return that RSS."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _rss()


def _hwm() -> int:
    with open("/proc/self/status") as fh:
        return next(1024 * int(line.split()[1]) for line in fh if line.startswith("VmHWM"))


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _gpt2(shape: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A random-init GPT-2 of ``shape`` (no dropout) and a batch of 2 x 128 token ids."""
    import transformers as tf

    blocks, width, vocab = SHAPES[shape]
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=blocks, n_embd=width, n_head=max(1, width // 64),
                                             vocab_size=vocab, n_positions=128, resid_pdrop=0.0,
                                             embd_pdrop=0.0, attn_pdrop=0.0)).float().train()
    return model, torch.randint(0, vocab, (2, 128))


def measure(shape: str, samples: int, full_probe: bool) -> dict[str, Any]:
    """All figures of one shape (run in its own process)."""
    import autoprec.probe._probe as P
    from autoprec.probe import Runner, probe, relative_errors
    from autoprec.trace import trace

    model, ids = _gpt2(shape)
    batch = {"input_ids": ids, "labels": ids.clone()}
    params = sum(p.numel() for p in model.parameters())
    tr = trace(model, batch, device_type="cpu")
    candidates = [lay.key for lay in tr.layers if lay.flops > 0 or lay.hazards]
    formats = ("bf16", "fp16")
    runner = Runner(model, None, tr, device_type="cpu", emulate_fp16=True, emulate_cuda=True, seed=0)
    ref_loss, ref_grads = runner.run(batch, {})
    # as the probe calls it: where relative_errors() can overwrite the pass's gradients and take the reference's
    # norm once (autoprec after issue 14), it does; earlier versions take neither
    fused = "reuse" in inspect.signature(relative_errors).parameters
    kw = {"reuse": True, "ref_norm": P.grad_norm(ref_grads, ref_loss)} if fused else {}
    before = _hwm_reset()  # the trace's own peak is not the passes'
    step = max(1, len(candidates) // samples)
    picked = candidates[::step][:samples]
    plain, passes, errs = [], [], []
    for i, key in enumerate(picked):  # interleaved: plain, pass, errors
        fmt = formats[i % 2]
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        plain.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, grads = runner.run(batch, {key: fmt})
        passes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        relative_errors(loss, grads, ref_loss, ref_grads, **kw)
        errs.append(time.perf_counter() - t0)
        del loss, grads
    blocks, width, vocab = SHAPES[shape]
    row: dict[str, Any] = {
        "shape": shape, "blocks": blocks, "width": width, "vocab": vocab, "params": params,
        "param_mb": 4 * params / 2 ** 20, "candidates": len(candidates), "samples": len(picked),
        "plain_ms": 1e3 * _median(plain), "pass_ms": 1e3 * _median(passes), "errors_ms": 1e3 * _median(errs)}
    row["errors_vs_plain"] = row["errors_ms"] / row["plain_ms"]
    row["passes_peak_rss_mb"] = max(0, _hwm() - before) / 2 ** 20  # above the model, its trace and a reference
    if full_probe:
        del ref_loss, ref_grads
        before = _hwm_reset()
        runner.passes = 0
        t0 = time.perf_counter()
        pr = probe(runner, [batch], candidates, formats)
        row["probe_s"] = time.perf_counter() - t0
        row["probe_passes"] = pr.passes
        row["probe_vs_plain"] = row["probe_s"] / (pr.passes * row["plain_ms"] / 1e3)
        row["probe_peak_rss_mb"] = max(0, _hwm() - before) / 2 ** 20
    return row


def measure_tune(shape: str) -> dict[str, Any]:
    """One whole tune of a shape (run in its own process): seconds, passes and peak memory, per stage."""
    import autoprec

    model, ids = _gpt2(shape)
    param_mb = 4 * sum(p.numel() for p in model.parameters()) / 2 ** 20
    before = _hwm_reset()
    t0 = time.perf_counter()
    policy = autoprec.tune(model, {"input_ids": ids, "labels": ids.clone()}, target="cuda", progress=False)
    secs = time.perf_counter() - t0
    peak = _hwm()
    st = policy.stats
    return {"shape": shape, "param_mb": param_mb, "tune_s": secs, "peak_rss_mb": max(0, peak - before) / 2 ** 20,
            "stats_peak_mb": st.get("peak_memory_mb"), "stats_peak_by_stage_mb": st.get("peak_memory_mb_by_stage"),
            "stages": st.get("stages"), "passes": {k: st[k] for k in ("probe_passes", "search_passes", "verify_passes")}}


def measure_passes(shape: str, decide: bool) -> dict[str, Any]:
    """Probe passes of one shape with and without sharing (run in its own process); with ``decide``,
    whether ``tune`` decides every layer alike both ways."""
    import autoprec
    from autoprec.device import compute_bound
    from autoprec.probe import Runner, Sharing, probe, roles
    from autoprec.trace import trace

    model, ids = _gpt2(shape)
    batch = {"input_ids": ids, "labels": ids.clone()}
    tr = trace(model, batch, device_type="cpu")
    candidates = [lay.key for lay in tr.layers if lay.flops > 0 or lay.hazards]
    formats = ("fp16", "bf16")
    runner = Runner(model, None, tr, device_type="cpu", emulate_fp16=True, emulate_cuda=True, seed=0)
    t0 = time.perf_counter()
    pr = probe(runner, [batch], candidates, formats, share=Sharing())  # tune's default bounds
    row: dict[str, Any] = {"shape": shape, "candidates": len(candidates), "roles": len(roles(tr, candidates)),
                           "passes_alone": 1 + len(candidates) * len(formats), "passes_shared": pr.passes,
                           "shared_probe_s": time.perf_counter() - t0,
                           "measured_as_group": sum(m.members > 1 for m in pr.measurements.values())}
    row["shared_vs_alone"] = row["passes_shared"] / row["passes_alone"]
    if decide:
        prof = compute_bound(device="launch-free roofline")
        got = {}
        for share in (True, False):
            pol = autoprec.tune(model, batch, target="cuda", dtypes=list(formats), progress=False, verify_steps=0,
                                profile=prof, share_roles=share)
            got[share] = pol
            row[f"tune_probe_passes_{'shared' if share else 'alone'}"] = pol.stats["probe_passes"]
        same = {k: (e.precision, e.reason) == (got[False].layers[k].precision, got[False].layers[k].reason)
                for k, e in got[True].layers.items()}
        row["same_decisions"] = all(same.values())
        row["differing"] = [k for k, v in same.items() if not v]
        row["cast_16bit"] = sum(e.precision != "fp32" for e in got[True].layers.values())
        row["layers"] = len(same)
    return row


def main_passes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``--passes`` table."""
    rows = []
    print("| shape | candidates | roles | probe passes alone | shared | shared / alone | same decisions (16-bit) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for shape in args.passes:
        cmd = [sys.executable, os.path.abspath(__file__), "--one-passes", shape, "--threads", str(args.threads)]
        cmd += ["--decide"] if args.decide and shape != "12x768" else []
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        rows.append(r)
        same = (f"{'yes' if r['same_decisions'] else 'NO: ' + ', '.join(r['differing'])} "
                f"({r['cast_16bit']} of {r['layers']})") if "same_decisions" in r else "-"
        print(f"| {shape} | {r['candidates']} | {r['roles']} | {r['passes_alone']} | {r['passes_shared']} | "
              f"{r['shared_vs_alone']:.1%} | {same} |", flush=True)
    out = args.out if args.out != _DEFAULT_OUT else os.path.join(HERE, "results", "probe_passes.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"rows": rows, "threads": args.threads, "torch": torch.__version__, "formats": ["fp16", "bf16"],
                   "target": "cuda (emulated on this CPU)", "batch": "2 x 128 tokens"}, fh, indent=1)
    return rows


_DEFAULT_OUT = os.path.join(HERE, "results", "probe_cost.json")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["2x128", "4x256", "6x384"], choices=sorted(SHAPES))
    p.add_argument("--large", action="store_true", help="add 12x768 (vocab 50257), per-pass figures only")
    p.add_argument("--samples", type=int, default=8, help="candidate layers timed per shape")
    p.add_argument("--no-probe", action="store_true", help="per-pass figures only (no whole probe)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tune", choices=sorted(SHAPES), help="also run a whole tune of this shape")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one shape, print its JSON row
    p.add_argument("--one-tune", help=argparse.SUPPRESS)  # internal: tune one shape, print its JSON row
    p.add_argument("--passes", nargs="+", choices=sorted(SHAPES), help="count probe passes with and without sharing")
    p.add_argument("--decide", action="store_true", help="with --passes: compare tune's decisions both ways")
    p.add_argument("--one-passes", help=argparse.SUPPRESS)  # internal: count one shape, print its JSON row
    p.add_argument("--out", default=_DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one_passes:
        print(json.dumps(measure_passes(args.one_passes, args.decide)))
        return []
    if args.passes:
        return main_passes(args)
    if args.one_tune:
        print(json.dumps(measure_tune(args.one_tune)))
        return []
    if args.one:
        full = not args.no_probe and args.one != "12x768"
        print(json.dumps(measure(args.one, args.samples, full)))
        return []
    shapes = list(args.shapes) + (["12x768"] if args.large and "12x768" not in args.shapes else [])
    rows = []
    print("| shape | params | candidates | plain fwd+bwd ms | probe pass ms | errors ms | errors / plain | "
          "sampled passes' peak RSS MiB | probe s (passes) | probe / (passes x plain) | probe peak RSS MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in shapes:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", shape, "--samples", str(args.samples),
               "--threads", str(args.threads)] + (["--no-probe"] if args.no_probe else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(r)
        probe_s = f"{r['probe_s']:.1f} ({r['probe_passes']})" if "probe_s" in r else "-"
        ratio = f"{r['probe_vs_plain']:.2f}" if "probe_s" in r else "-"
        peak = f"{r['probe_peak_rss_mb']:.0f}" if "probe_s" in r else "-"
        print(f"| {shape} | {r['params'] / 1e6:.1f}M | {r['candidates']} | {r['plain_ms']:.0f} | {r['pass_ms']:.0f} | "
              f"{r['errors_ms']:.1f} | {r['errors_vs_plain']:.3f} | {r['passes_peak_rss_mb']:.0f} | {probe_s} | {ratio} | {peak} |", flush=True)
    tuned = None
    if args.tune:
        cmd = [sys.executable, os.path.abspath(__file__), "--one-tune", args.tune, "--threads", str(args.threads)]
        tuned = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"\nwhole tune of {args.tune} ({tuned['param_mb']:.0f} MiB of FP32 parameters): {tuned['tune_s']:.1f} s, "
              f"passes {tuned['passes']}, process peak RSS {tuned['peak_rss_mb']:.0f} MiB above the start "
              f"({tuned['peak_rss_mb'] / tuned['param_mb']:.1f}x the parameter bytes)")
        if tuned["stages"]:
            print("\n| stage | done / planned | seconds | peak MiB above the start |\n| --- | ---: | ---: | ---: |")
            by = tuned["stats_peak_by_stage_mb"]
            if "copy" in by:
                print(f"| copy | - | - | {by['copy']:.0f} |")
            for name, v in tuned["stages"].items():
                print(f"| {name} | {v['done']} / {v['planned']} {v['unit']} | {v['seconds']:.1f} | "
                      f"{v.get('peak_memory_mb', float('nan')):.0f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"rows": rows, "tune": tuned, "threads": args.threads, "torch": torch.__version__, "cores": os.cpu_count(),
                   "formats": ["bf16", "fp16"], "target": "cuda (emulated on this CPU)"}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
