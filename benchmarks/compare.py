"""Side-by-side precision benchmark: FP32, blanket autocast FP16/BF16, leaf bisection, autoprec.

For each model, in one process:

* **fp32**: no autocast.
* **amp-fp16**: blanket ``torch.autocast("cpu", torch.float16)`` with a default ``GradScaler``.
* **amp-bf16**: blanket ``torch.autocast("cpu", torch.bfloat16)``.
* **bisect-fp16**: the segment bisection of onnxconverter-common's ``auto_convert_mixed_precision``
  over the leaf modules (``_bisection.py``), FP16, default ``GradScaler``.
* **autoprec-gpu**: ``autoprec.tune(target="cuda")`` (FP16 and BF16 allowed), with its tuned scaler,
  priced with the built-in GPU roofline *without* its per-call (launch, region) costs: these models
  are small (width 64) and on a real GPU launch-bound, where the estimate keeps everything FP32 for
  speed; this column shows the numerical decisions a GPU policy makes at sizes where 16-bit pays.
  ``--gpu-profile FILE`` prices it with a profile file instead (``autoprec calibrate`` on the GPU).
* **autoprec-cpu**: ``autoprec.tune(target="cpu")`` (BF16), the policy for this machine's speed.

Measured: fidelity on held-out batches against an FP64 copy of the model (loss relative error,
gradient relative L2 error, NaN/Inf), the share of matmul/conv/attention FLOPs that ran in 16-bit
(from the dtypes of the executed aten ops; autoprec's emulated FP16 on a CPU is recognised from
the op stream: operands freshly rounded through FP16, see ``_measure.PrecisionFlopCounter``), a short training run from identical weights and data (final-loss gap to
FP32, NaN/Inf, skipped steps), step time relative to FP32 (FP32, amp-bf16 and autoprec-cpu only:
FP16 has no fast CPU kernels), and the tuning cost of the bisection and of autoprec.

Run:  python benchmarks/compare.py [--quick] [--models gpt2 hazards ...] [--out results.json]
      python benchmarks/compare.py --from-json a.json b.json     # tables from saved results
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import sys
import time
import traceback
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _zoo
from _bisection import bisect
from _measure import (
    amp_variant,
    fidelity,
    fp32_variant,
    measure_flops,
    median,
    policy_variant,
    reference64,
    step_times,
    train,
)

import autoprec

VARIANTS = ("fp32", "amp-fp16", "amp-bf16", "bisect-fp16", "autoprec-gpu", "autoprec-cpu")
TIMED = ("fp32", "amp-bf16", "autoprec-cpu")
HERE = os.path.dirname(os.path.abspath(__file__))


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "autoprec": autoprec.__version__, "timing_threads": 1}


def gpu_profile(path: str | None = None) -> Any:
    """The profile that prices the GPU policy: a file, or the roofline estimate without per-call costs."""
    from autoprec.device import compute_bound

    return path if path is not None else compute_bound()


GPU_PROFILE: Any = None  # set by main


def _tune(spec: _zoo.Spec, target: str) -> tuple[Any, dict[str, Any]]:
    t0 = time.perf_counter()
    policy = autoprec.tune(spec.model, spec.tune[0], spec.tune[1], target=target, optimizer=spec.optimizer,
                           progress=False, profile=gpu_profile(GPU_PROFILE) if target == "cuda" else None)
    wall = time.perf_counter() - t0
    st = policy.stats
    ver = policy.verification
    return policy, {
        "seconds": round(wall, 2),
        "passes": int(st.get("probe_passes", 0) + st.get("search_passes", 0) + st.get("verify_passes", 0)),
        "probe_passes": st.get("probe_passes"), "search_passes": st.get("search_passes"),
        "verify_passes": st.get("verify_passes"), "trials": st.get("trials"),
        "layers": len(policy.layers), "excluded": sorted(policy.excluded()),
        "assignment_counts": {p: list(policy.assignment.values()).count(p) for p in ("fp32", "fp16", "bf16")},
        "policy_low_fraction": round(policy.low_precision_fraction(), 4),
        "verified": None if ver is None else ver.passed,
    }


def perturbed(model: torch.nn.Module, rel: float, seed: int = 1) -> torch.nn.Module:
    """A copy of ``model`` with every weight scaled by ``1 + rel * N(0, 1)``: FP32 training's own noise floor."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1 + rel * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    size = "quick" if args.quick else "default"
    spec = _zoo.build(name, size, heldout=args.heldout, train=args.train_batches)
    res: dict[str, Any] = {"model": name, "group": spec.group, "note": spec.note,
                           "params": sum(p.numel() for p in spec.model.parameters()), "variants": {}, "tuning": {},
                           "errors": {}}
    variants = {"fp32": fp32_variant(), "amp-fp16": amp_variant("fp16"), "amp-bf16": amp_variant("bf16")}
    clock = time.perf_counter()
    stages: dict[str, float] = {}
    res["stage_seconds"] = stages

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[stage] = round(stages.get(stage, 0.0) + now - clock, 2)
        clock = now

    # -- tuning: bisection baseline and autoprec, both on the tuning sample only
    try:
        b = bisect(spec.model, spec.tune, dtype="fp16")
        res["tuning"]["bisect-fp16"] = {"seconds": round(b.seconds, 2), "validations": b.validations,
                                        "passes": b.validations + 1, "fp32_layers": b.fp32_layers,
                                        "leaves": len(b.policy.layers), "final_validated": b.passed_final}
        variants["bisect-fp16"] = policy_variant("bisect-fp16", b.policy, default_scaler=True)
    except Exception as exc:  # noqa: BLE001 - a benchmark records failures and goes on
        res["errors"]["bisect-fp16"] = f"{type(exc).__name__}: {exc}"
    for vname, target in (("autoprec-gpu", "cuda"), ("autoprec-cpu", "cpu")):
        try:
            policy, info = _tune(spec, target)
            res["tuning"][vname] = info
            variants[vname] = policy_variant(vname, policy)
            if args.save_policies:
                os.makedirs(args.save_policies, exist_ok=True)
                policy.save(os.path.join(args.save_policies, f"{name}.{vname}.json"))
        except Exception as exc:  # noqa: BLE001
            res["errors"][vname] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()

    lap("tuning")
    # -- fidelity against FP64 on held-out samples, measured 16-bit FLOPs, training
    refs = [reference64(spec.model, s) for s in spec.heldout]
    fp32_final = None
    for vname in VARIANTS:
        v = variants.get(vname)
        if v is None:
            continue
        row: dict[str, Any] = {}
        try:
            fids = [fidelity(spec.model, s, v, r) for s, r in zip(spec.heldout, refs)]
            row["loss_err"] = max(f.loss_err for f in fids)
            row["grad_err"] = max(f.grad_err for f in fids)
            row["nonfinite"] = any(f.nonfinite for f in fids)
            row["scale_backoffs"] = max(f.backoffs for f in fids)
            lap("fidelity")
            row["flops"] = measure_flops(spec.model, spec.heldout[0], v)
            lap("flops")
            run = train(spec.model, spec.train, v, args.steps, spec.optimizer)
            lap("training")
            if vname == "fp32":
                fp32_final = run.final
                noise = train(perturbed(spec.model, 1e-6), spec.train, v, args.steps, spec.optimizer)
                res["train_noise_gap"] = abs(noise.final - fp32_final) / max(abs(fp32_final), 1e-30)
            row["train"] = {"final": run.final, "skipped": run.skipped, "nonfinite_steps": run.nonfinite_steps,
                            "steps_run": len(run.losses), "first": run.losses[0] if run.losses else math.nan,
                            "gap": (abs(run.final - fp32_final) / max(abs(fp32_final), 1e-30)
                                    if fp32_final is not None and math.isfinite(run.final) else math.inf),
                            "losses": [round(x, 6) for x in run.losses]}
        except Exception as exc:  # noqa: BLE001
            res["errors"][vname] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        res["variants"][vname] = row

    # -- CPU step time, FP32 vs BF16 variants, interleaved, one thread
    if args.rounds > 0:
        timed = [variants[n] for n in TIMED if n in variants]
        times = step_times(spec.model, spec.train, timed, rounds=args.rounds)
        base = median(times["fp32"])
        res["timing"] = {n: {"median_s": median(t), "ratio": median(t) / base, "n": len(t)} for n, t in times.items()}
        lap("timing")
    return res


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------

def _e(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "inf"
    return f"{x:.1e}"


def _fid(row: dict[str, Any], key: str) -> str:
    if not row or key not in row:
        return "-"
    cell = _e(row[key])
    return "**NaN/Inf**" if row.get("nonfinite") and not math.isfinite(row[key]) else cell


def _flops(row: dict[str, Any]) -> str:
    f = row.get("flops") if row else None
    if not f:
        return "-"
    h, b = round(100 * f["fp16"]), round(100 * f["bf16"])
    parts = ([f"{h}% h"] if h else []) + ([f"{b}% b"] if b else [])
    return " + ".join(parts) or "0%"


def _train(row: dict[str, Any]) -> str:
    t = row.get("train") if row else None
    if not t:
        return "-"
    if t["nonfinite_steps"] and t["skipped"] == 0:
        return f"**NaN** (step {t['steps_run'] - 1})"
    cell = "inf" if not math.isfinite(t["gap"]) else f"{100 * t['gap']:.2g}%"
    extra = []
    if t["skipped"]:
        extra.append(f"{t['skipped']} skip")
    if t["nonfinite_steps"]:
        extra.append(f"{t['nonfinite_steps']} NaN")
    return cell + (f" ({', '.join(extra)})" if extra else "")


def tables(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = []
    hdr = "| model | " + " | ".join(VARIANTS) + " |"
    sep = "| --- |" + " ---: |" * len(VARIANTS)

    def table(title: str, cell) -> None:
        out.extend([f"### {title}", "", hdr, sep])
        for r in results:
            out.append(f"| {r['model']} | " + " | ".join(cell(r["variants"].get(v, {})) for v in VARIANTS) + " |")
        out.append("")

    table("Loss relative error vs FP64 (held-out batches, max)", lambda row: _fid(row, "loss_err"))
    table("Gradient relative L2 error vs FP64 (held-out batches, max)", lambda row: _fid(row, "grad_err"))
    table("Matmul/conv/attention FLOPs that ran in 16-bit (measured from executed ops; h = FP16, b = BF16)",
          _flops)
    steps = meta.get("steps")
    out.extend([f"### Training, {steps} steps: final-loss gap to FP32 (skipped steps, NaN steps)", "",
                "`noise`: the gap of FP32 itself started from weights perturbed by 1e-6 (relative): "
                "gaps near it are training noise, not precision.", "",
                "| model | noise | " + " | ".join(VARIANTS[1:]) + " |", "| --- |" + " ---: |" * len(VARIANTS)])
    for r in results:
        nz = r.get("train_noise_gap")
        out.append(f"| {r['model']} | {'-' if nz is None else f'{100 * nz:.2g}%'} | "
                   + " | ".join(_train(r["variants"].get(v, {})) for v in VARIANTS[1:]) + " |")
    out.append("")

    out += ["### CPU step time relative to FP32 (1 thread, interleaved, median; < 1 is faster)", "",
            "| model | params | FP32 ms/step | amp-bf16 | autoprec-cpu |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        t = r.get("timing")
        if not t:
            continue
        cells = [f"{t[n]['ratio']:.2f}" if n in t else "-" for n in ("amp-bf16", "autoprec-cpu")]
        out.append(f"| {r['model']} | {r['params']:,} | {1e3 * t['fp32']['median_s']:.1f} | " + " | ".join(cells) + " |")
    out.append("")

    out += ["### Tuning cost (wall seconds on this machine / forward+backward passes / Optuna trials)", "",
            ("| model | bisect-fp16: s / validations | autoprec-gpu: s / passes / trials | "
             "autoprec-cpu: s / passes / trials | autoprec-gpu verified |"),
            "| --- | ---: | ---: | ---: | :---: |"]
    for r in results:
        tu = r["tuning"]
        b = tu.get("bisect-fp16")
        bc = f"{b['seconds']:.1f} / {b['validations']}" if b else "error"

        def ap(key: str, tu: dict[str, Any] = tu) -> str:
            a = tu.get(key)
            return f"{a['seconds']:.1f} / {a['passes']} / {a['trials']}" if a else "error"

        g = tu.get("autoprec-gpu")
        out.append(f"| {r['model']} | {bc} | {ap('autoprec-gpu')} | {ap('autoprec-cpu')} | "
                   f"{'-' if not g else ('yes' if g['verified'] else 'no')} |")
    out.append("")
    errs = [(r["model"], k, v) for r in results for k, v in r.get("errors", {}).items()]
    if errs:
        out += ["### Errors", ""] + [f"- {m} / {k}: {v}" for m, k, v in errs] + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["all"],
                   help=f"models or groups ({', '.join(_zoo.GROUPS)}); models: {', '.join(_zoo.ALL_MODELS)}")
    p.add_argument("--quick", action="store_true", help="smaller models, 20 training steps, 5 timing rounds")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 100; 20 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds per variant (default 20; 5 with --quick; 0 skips)")
    p.add_argument("--heldout", type=int, default=2, help="held-out batches for fidelity")
    p.add_argument("--train-batches", type=int, default=4, help="batches the training runs cycle through")
    p.add_argument("--out", default=None, help="JSON results path (default benchmarks/results/compare.json)")
    p.add_argument("--save-policies", default=None, help="folder to save the tuned policies in")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads outside the timing (default 1, for repeatable tuning times on a shared machine)")
    p.add_argument("--from-json", nargs="+", default=None, help="print the tables of saved result files and exit")
    p.add_argument("--gpu-profile", default=None,
                   help="a profile file for the GPU policy (default: the roofline without per-call costs)")
    args = p.parse_args(argv)
    global GPU_PROFILE
    GPU_PROFILE = args.gpu_profile
    if args.from_json:
        results, meta = [], {}
        for path in args.from_json:
            with open(path) as fh:
                data = json.load(fh)
            results += data["results"]
            meta = data["meta"]
        print(tables(results, meta))
        return results
    args.steps = args.steps if args.steps is not None else (20 if args.quick else 100)
    args.rounds = args.rounds if args.rounds is not None else (5 if args.quick else 20)
    logging.getLogger("autoprec").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    names = _zoo.expand(args.models)
    meta = {**machine(), "threads": args.threads, "steps": args.steps, "rounds": args.rounds, "heldout": args.heldout,
            "size": "quick" if args.quick else "default", "models": names}
    out_path = args.out or os.path.join(HERE, "results", "compare.json")
    results = []
    started = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        try:
            results.append(run_model(name, args))
        except ImportError as exc:
            print(f"[{name}] skipped: {exc}", file=sys.stderr)
            continue
        print(f"[{name}] done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as fh:
            json.dump({"meta": {**meta, "seconds": round(time.perf_counter() - started, 1)}, "results": results},
                      fh, indent=1, default=float)
    print(f"# Results ({meta['cpu']}, {meta['cores']} cores, torch {meta['torch']})\n")
    print(tables(results, meta))
    print(f"(JSON: {out_path}; {time.perf_counter() - started:.0f}s)")
    return results


if __name__ == "__main__":
    main()
