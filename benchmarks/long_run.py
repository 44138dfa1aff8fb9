"""Long runs: hazards that appear only after training starts, trained with and without ``autoprec.guard``.

Each model trains a few hundred steps on the CPU, on one fixed batch, from the same weights, with
five variants run in lockstep (step ``i`` of every variant, then step ``i + 1``):

* ``fp32``: no mixed precision (the reference);
* ``amp-fp16``: blanket ``torch.autocast("cpu", torch.float16)`` and a default ``GradScaler``;
* ``amp-bf16``: blanket ``torch.autocast("cpu", torch.bfloat16)``;
* ``policy``: the model's hand-written policy alone (``policy.apply(model)``, ``policy.grad_scaler()``);
  the FP16 layers of a ``target="cuda"`` policy are emulated on this CPU with CUDA's numerics;
* ``guard``: the same policy installed by ``autoprec.guard(model, policy, loss_fn, scaler=..., every=...)``,
  ``guard.step(loss, batch)`` after each optimizer step.

The models (built here or in ``tests/models.py``; nothing is downloaded):

* ``growing`` (hazard: range): ``tests/models.py``'s growing layer, its output multiplied by 1.04 per
  training forward (a LayerNorm keeps the loss in scale): FP16 is fine at step 0 and overflows near
  step 250. 1.04**50 < 8 (the headroom), so a read every 50 steps comes before the overflow.
* ``offset`` (hazard: error that grows with the step count): a layer computing ``W(x + c) - Wc`` (exact in
  real arithmetic) with ``c`` growing by 1 per training forward: in 16 bits ``x + c`` loses ``x``'s low bits, an
  error that grows with ``c`` while every output stays small: no range gives it away; the guard's FP32
  check of the loss (``check_every``, here at every read by default) is what can catch it.
* ``gradient`` (hazard: the scaler): an identity in the forward whose backward multiplies the gradient by
  1.06**step (a loss weight that grows; Adam is invariant to it, so FP32 trains as usual): the FP16
  layer's gradients overflow again and again and the GradScaler halves its scale each time. The guard's
  gradient and scaler watch should promote the layer once its unscaled gradient passes 65504 / headroom
  or the scale collapses, and reset the scaler.
* ``mlp``, ``gpt2`` (benign): ``tests/models.py``'s MLP with every Linear in FP16, and a 2-layer GPT-2
  from a config (transformers, skipped when missing) with every ``Conv1D`` in FP16; the guard should
  never act.

Per row: the final loss (mean of the last 10 steps) and its gap to FP32's (relative), the non-finite
steps (and the first), the scaler's skipped steps and final scale, the guard's actions (step, layer,
old -> new), and for ``guard`` the step-time overhead over ``policy`` alone: the median of their
interleaved per-step times over the steps before the guard acted and before the policy run's first
non-finite loss (both runs then run the same precision); measured on this CPU, one thread, noisy.
A PNG of the loss curves marks the guard's actions (matplotlib; skipped with a note when missing).

Run: ``python benchmarks/long_run.py [--steps 300] [--every 50] [--check-every 50] [--models growing offset ...]``,
``--quick`` for a 20-step smoke run; writes ``benchmarks/results/long_run.json`` and ``long_run.png``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(_HERE), _HERE):  # the hazard models live in tests/models.py
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _measure import loss_of, write_json  # noqa: E402
from runtime_overhead import _cpu_name  # noqa: E402

import autoprec  # noqa: E402
from autoprec import LayerEntry, Policy  # noqa: E402
from autoprec.core import call_model  # noqa: E402
from tests.models import Growing, GrowingGradient, mlp  # noqa: E402

VARIANTS = ("fp32", "amp-fp16", "amp-bf16", "policy", "guard")
RESULTS = os.path.join(_HERE, "results")


@dataclass
class Case:
    name: str
    hazard: str
    model: nn.Module
    batch: Any
    loss_fn: Callable[[Any, Any], torch.Tensor] | None
    policy: Policy
    optimizer: Callable[[Any], torch.optim.Optimizer]


def _cuda_policy(layers: dict[str, str]) -> Policy:
    """A CUDA policy written by hand (its FP16 layers emulated on this CPU), BF16 allowed."""
    return Policy(layers={k: LayerEntry(p) for k, p in layers.items()}, target="cuda", formats=("fp16", "bf16"))


def _mse(target: torch.Tensor) -> Callable[[Any, Any], torch.Tensor]:
    return lambda out, batch: F.mse_loss(out.float(), target)


# -- the models --------------------------------------------------------------------------------

class SlowGrowing(nn.Module):
    """fc -> ReLU -> grow -> LayerNorm -> head; each training forward multiplies ``grow.gain`` by ``growth``."""

    def __init__(self, growth: float, dim: int = 32):
        super().__init__()
        self.growth = growth
        self.fc, self.grow, self.norm, self.head = nn.Linear(16, dim), Growing(dim), nn.LayerNorm(dim), nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.grow.gain.mul_(self.growth)
        return self.head(self.norm(self.grow(F.relu(self.fc(x)))))


class Offset(nn.Module):
    """``W(x + c) - W c``: ``x @ W.T`` in real arithmetic, a difference of two large nearly-equal terms in 16 bits."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))
        self.register_buffer("offset", torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x + self.offset, self.weight) - self.offset * self.weight.sum(1)


class OffsetModel(nn.Module):
    """fc -> ReLU -> acc -> head; each training forward adds ``rate`` to ``acc.offset``."""

    def __init__(self, rate: float, dim: int = 32):
        super().__init__()
        self.rate = rate
        self.fc, self.acc, self.head = nn.Linear(16, dim), Offset(dim), nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.acc.offset.add_(self.rate)
        return self.head(F.relu(self.acc(F.relu(self.fc(x)))))


def growing() -> Case:
    torch.manual_seed(0)
    model, x, target = SlowGrowing(1.04), torch.randn(32, 16), torch.randn(32, 4)
    return Case("growing", "range grows", model.train(), x, _mse(target),
                _cuda_policy({"fc": "fp32", "grow": "fp16", "norm": "fp32", "head": "fp32"}),
                lambda ps: torch.optim.SGD(ps, lr=0.01))


def offset() -> Case:
    torch.manual_seed(0)
    model, x, target = OffsetModel(1.0), torch.randn(32, 16), torch.randn(32, 4)
    return Case("offset", "error grows", model.train(), x, _mse(target),
                _cuda_policy({"fc": "fp32", "acc": "bf16", "head": "fp32"}),
                lambda ps: torch.optim.SGD(ps, lr=0.01))


def gradient() -> Case:
    torch.manual_seed(0)
    model, x, target = GrowingGradient(1.06, 16, 32), torch.randn(256, 16), torch.randn(256, 4)
    return Case("gradient", "gradients grow", model.train(), x, _mse(target),
                _cuda_policy({"fc": "fp32", "mid": "fp16", "head": "fp32"}),
                lambda ps: torch.optim.Adam(ps, lr=1e-3))


def benign_mlp() -> Case:
    model, x, loss_fn = mlp(batch_size=256)
    return Case("mlp", "benign", model, x, loss_fn, _cuda_policy({"fc1": "fp16", "fc2": "fp16", "fc3": "fp16"}),
                lambda ps: torch.optim.Adam(ps, lr=1e-4))


def gpt2() -> Case | None:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("# gpt2 skipped: transformers is not installed (pip install 'autoprec[benchmarks]')")
        return None
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=64,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 256, (8, 32))
    layers = {f"transformer.h.{i}.{m}": "fp16" for i in range(2)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    return Case("gpt2", "benign", model, {"input_ids": ids, "labels": ids}, None, _cuda_policy(layers),
                lambda ps: torch.optim.Adam(ps, lr=2e-4))


MODELS: dict[str, Callable[[], Case | None]] = {
    "growing": growing, "offset": offset, "gradient": gradient, "mlp": benign_mlp, "gpt2": gpt2}


# -- training ----------------------------------------------------------------------------------

class _Run:
    """One variant of one case: its own copy of the model, optimizer, scaler and precision."""

    def __init__(self, case: Case, variant: str, every: int, check_every: int):
        self.case, self.variant = case, variant
        self.model = copy.deepcopy(case.model)
        self.opt = case.optimizer([p for p in self.model.parameters() if p.requires_grad])
        self.scaler, self.guard, self.handle, self.dtype = None, None, None, None
        if variant.startswith("amp-"):
            self.dtype = torch.float16 if variant == "amp-fp16" else torch.bfloat16
            self.scaler = torch.amp.GradScaler("cpu") if variant == "amp-fp16" else None
        elif variant in ("policy", "guard"):
            with warnings.catch_warnings():  # a CUDA policy's scaler made for this CPU: said once here
                warnings.simplefilter("ignore")
                self.scaler = case.policy.grad_scaler("cpu")
            if variant == "policy":
                self.handle = case.policy.apply(self.model)
            else:
                self.guard = autoprec.guard(self.model, case.policy, case.loss_fn, scaler=self.scaler, every=every,
                                            check_every=check_every)
        self.losses: list[float] = []
        self.times: list[float] = []
        self.skipped = 0

    def step(self) -> None:
        """One training step, timed; a scaler step that lowers the scale or sees a non-finite loss is skipped."""
        batch, t0 = self.case.batch, time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=self.dtype) if self.dtype is not None else nullcontext()
        with ctx:
            loss = loss_of(call_model(self.model, batch), batch, self.case.loss_fn)
        if self.scaler is not None:
            before = self.scaler.get_scale()
            self.scaler.scale(loss.float()).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.float().backward()
            self.opt.step()  # as a plain loop does: a non-finite loss poisons the weights
        if self.guard is not None:
            self.guard.step(loss, batch)
        value = float(loss.detach())
        self.times.append(time.perf_counter() - t0)
        self.losses.append(value)
        if self.scaler is not None:
            self.skipped += int(self.scaler.get_scale() < before or not math.isfinite(value))

    def close(self) -> None:
        for h in (self.handle, self.guard):
            if h is not None:
                h.remove()


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _sig(x: float | None, digits: int = 5) -> float | None:
    return None if _finite(x) is None else float(f"{x:.{digits}g}")


def _final(losses: list[float]) -> float:
    tail = losses[-10:]
    return sum(tail) / len(tail)


def _overhead(policy: _Run, guard: _Run, events: list[Any]) -> dict[str, Any]:
    """Guard over policy: medians of their interleaved step times while both ran the same precision."""
    first_bad = next((i for i, v in enumerate(policy.losses) if not math.isfinite(v)), len(policy.losses))
    end = min([first_bad] + [e.step - 1 for e in events])
    start = min(3, end // 4)  # the first steps warm up
    a, g = policy.times[start:end], guard.times[start:end]
    if len(a) < 3:
        return {"overhead_pct": None, "timed_steps": len(a)}
    ma, mg = statistics.median(a), statistics.median(g)
    return {"policy_ms": round(1e3 * ma, 3), "guard_ms": round(1e3 * mg, 3),
            "overhead_pct": round(100 * (mg / ma - 1), 1), "timed_steps": len(a)}


def run_case(case: Case, steps: int, every: int,
             check_every: int) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """Train every variant of ``case`` in lockstep; its rows and loss curves."""
    runs = [_Run(case, v, every, check_every) for v in VARIANTS]
    try:
        for _ in range(steps):
            for r in runs:
                r.step()
    finally:
        for r in runs:
            r.close()
    by = {r.variant: r for r in runs}
    ref = _final(by["fp32"].losses)
    events = by["guard"].guard.events
    rows = []
    for r in runs:
        final = _final(r.losses)
        bad = [i + 1 for i, v in enumerate(r.losses) if not math.isfinite(v)]
        row = {"model": case.name, "hazard": case.hazard, "variant": r.variant, "steps": steps,
               "final_loss": _sig(final), "gap_vs_fp32": _sig((final - ref) / abs(ref), 3) if math.isfinite(final)
               else None, "nonfinite_steps": len(bad), "first_nonfinite": bad[0] if bad else None,
               "skipped_steps": r.skipped if r.scaler is not None else None,
               "final_scale": _sig(r.scaler.get_scale(), 6) if r.scaler is not None else None,
               "guard_actions": [], "step_ms": round(1e3 * statistics.median(r.times), 3)}
        if r.variant == "guard":
            row["guard_actions"] = [{"step": e.step, "layer": e.layer, "old": e.old, "new": e.new,
                                     "evidence": e.evidence} for e in events]
            row.update(_overhead(by["policy"], r, events))
        rows.append(row)
    return rows, {r.variant: [_sig(v) for v in r.losses] for r in runs}


# -- the table and the figure ------------------------------------------------------------------

def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.2f}%" if pct else f"{x:g}"


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of ``rows``."""
    head = ("model", "hazard", "variant", "final loss", "gap vs FP32", "non-finite steps (first)",
            "skipped steps", "final scale", "guard actions (step: layer old->new)", "guard overhead")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        nonfinite = f"{r['nonfinite_steps']} ({r['first_nonfinite']})" if r["nonfinite_steps"] else "0"
        final = "non-finite" if r["final_loss"] is None else f"{r['final_loss']:.4g}"
        gap = "non-finite" if r["final_loss"] is None else _fmt(r["gap_vs_fp32"], pct=True)
        actions = "; ".join(f"{a['step']}: {a['layer']} {a['old']}->{a['new']}" for a in r["guard_actions"])
        if r["variant"] != "guard":
            actions, over = "", ""
        else:
            actions = actions or "none"
            over = "-" if r.get("overhead_pct") is None else f"{r['overhead_pct']:+.1f}% ({r['timed_steps']} steps)"
        lines.append("| " + " | ".join([r["model"], r["hazard"], r["variant"], final, gap, nonfinite,
                                         _fmt(r["skipped_steps"]), _fmt(r["final_scale"]), actions, over]) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, dict[str, list]], rows: list[dict[str, Any]], path: str) -> str | None:
    """A PNG of every model's loss curves, the guard's actions marked; None (and a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# no PNG: matplotlib is not installed (pip install matplotlib)")
        return None
    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    styles = {"fp32": ("k", "-", 2.5), "amp-fp16": ("tab:red", ":", 1.5), "amp-bf16": ("tab:orange", ":", 1.5),
              "policy": ("tab:blue", "--", 1.5), "guard": ("tab:green", "-", 1.2)}
    for ax, name in zip(axes[0], names):
        for variant, losses in curves[name].items():
            color, ls, lw = styles[variant]
            ys = [math.nan if v is None else v for v in losses]
            ax.plot(range(1, len(ys) + 1), ys, color=color, ls=ls, lw=lw, label=variant)
            bad = next((i + 1 for i, v in enumerate(losses) if v is None), None)
            if bad is not None:
                ax.plot([bad], [ys[bad - 2] if bad > 1 else 1.0], "x", color=color, ms=9, mew=2)
        for row in rows:
            if row["model"] == name and row["variant"] == "guard":
                for a in row["guard_actions"]:
                    ax.axvline(a["step"], color="tab:green", lw=0.8, alpha=0.7)
                    ax.annotate(f"guard: {a['layer']} {a['old']}->{a['new']}", (a["step"], 0.97),
                                xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                                fontsize=7, color="tab:green")
        hazard = next(r["hazard"] for r in rows if r["model"] == name)
        ax.set(title=f"{name} ({hazard})", xlabel="step", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (x: first non-finite)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--check-every", type=int, default=None,
                        help="the guard's FP32 check every N steps (default: at every read, --every; 0: off)")
    parser.add_argument("--quick", action="store_true", help="20 steps, every=5: a smoke run")
    parser.add_argument("--out", default=os.path.join(RESULTS, "long_run.json"))
    parser.add_argument("--png", default=None, help="default: the JSON's path with .png")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.every = 20, 5
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list]] = {}
    for name in args.models:
        case = MODELS[name]()
        if case is None:
            continue
        t = time.perf_counter()
        check = args.every if args.check_every is None else args.check_every
        case_rows, curves[name] = run_case(case, args.steps, args.every, check)
        rows += case_rows
        print(f"# {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    print(f"# long runs, {_cpu_name()}, torch {torch.__version__}, 1 thread, {args.steps} steps, "
          f"guard every={args.every}; overhead: guard vs policy alone, medians of interleaved steps (noisy)")
    print(table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    png = plot(curves, rows, args.png or os.path.splitext(args.out)[0] + ".png")
    write_json(args.out, {"cpu": _cpu_name(), "torch": torch.__version__, "threads": 1, "steps": args.steps,
                          "every": args.every, "png": png and os.path.basename(png), "rows": rows,
                          "losses": curves})
    return rows


if __name__ == "__main__":
    main()
