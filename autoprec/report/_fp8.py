"""The report's FP8 section: which Linears train their GEMMs in FP8 and which stayed BF16, why (error or no gain),
and the tuned choice beside torchao's default and torchtitan's filter, each priced and measured the same way
(``policy.stats["fp8"]``, written by :mod:`autoprec.tuning._fp8`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._facts import num
from ._sections import Section, Table, Text

if TYPE_CHECKING:
    from ..policy._policy import Policy

__all__ = ["fp8_line", "fp8_section"]


def fp8_line(policy: Policy) -> str | None:
    """The header's FP8 line: Linears in FP8, their share of the matmul/conv FLOPs, the recipes; None without FP8.

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> p = Policy(layers={"fc": LayerEntry("fp8", recipe="rowwise", flops=6), "head": LayerEntry("bf16", flops=2)},
        ...            formats=("bf16", "fp8"))
        >>> print(fp8_line(p))
        FP8 GEMMs: 1 Linear, 75.0% of the matmul/conv FLOPs (rowwise 1)
    """
    fp8 = {k: e for k, e in policy.layers.items() if e.precision == "fp8"}
    if "fp8" not in policy.formats and not fp8:
        return None
    total = sum(e.flops for e in policy.layers.values()) + sum(policy.unseen.values())
    share = f"{100 * sum(e.flops for e in fp8.values()) / total:.1f}%" if total else "-"
    by: dict[str, int] = {}
    for e in fp8.values():
        by[e.recipe] = by.get(e.recipe, 0) + 1
    recipes = ", ".join(f"{r} {n}" for r, n in sorted(by.items()))
    return (f"FP8 GEMMs: {len(fp8)} Linear{'' if len(fp8) == 1 else 's'}, {share} of the matmul/conv FLOPs"
            + (f" ({recipes})" if recipes else ""))


def _db(figures: dict[str, float], name: str) -> str:
    v = figures.get(name)
    return "-" if v is None else f"{v:.1f}"


def _why(detail: str) -> str:
    mark = "stays bf16, fp8 "
    return detail.split(mark, 1)[1] if mark in detail else ""


def _rows(policy: Policy) -> tuple[tuple[str, ...], ...]:
    rows = []
    for key, e in policy.layers.items():
        fig = e.measured.get("fp8")
        if fig is None and e.precision != "fp8":
            continue
        fig = fig or {}
        fmt = f"fp8 ({e.recipe})" if e.precision == "fp8" else e.precision
        bf16, fp8 = fig.get("bf16_seconds"), fig.get("fp8_seconds")
        speed = "-" if not bf16 or fp8 is None or fp8 <= 0 else f"{bf16 / fp8:.2f}x"
        rows.append((f"`{key}`", fmt, _db(fig, "forward_db"), _db(fig, "weight_grad_db"), speed,
                     _why(e.detail) if e.precision != "fp8" else "measured within the bounds, faster"))
    return tuple(rows)


def _side_by_side(assignments: dict[str, Any]) -> Table:
    rows = []
    for name, a in assignments.items():
        grad = a.get("grad_db", math.inf)
        rows.append((name, str(len(a.get("fp8_layers", ()))), f"{100 * a.get('fp8_flops', 0.0):.1f}%",
                     num(a.get("modelled_ratio", 1.0)), num(a.get("loss_rel", 0.0)),
                     "-" if grad == math.inf else f"{grad:.1f}"))
    return Table(("assignment", "Linears in FP8", "Linear FLOPs in FP8", "modelled step / FP32",
                  "loss change vs BF16 policy", "gradient SQNR (dB)"), tuple(rows), right=(1, 2, 3, 4, 5))


def fp8_section(policy: Policy) -> Section | None:
    """The FP8 section, or None where FP8 was not tried.

    Example:
        >>> from autoprec.policy import Policy, LayerEntry
        >>> p = Policy(layers={"fc": LayerEntry("fp8", recipe="tensorwise", flops=6)}, formats=("bf16", "fp8"))
        >>> fp8_section(p).title
        'FP8 (GEMMs of Linears, torchao)'
    """
    line = fp8_line(policy)
    if line is None:
        return None
    lead = Text(f"{line}. A BF16 Linear goes FP8 when FP8 is priced faster at the step and, alone, keeps output SQNR "
                ">= 18 dB and weight-gradient SQNR >= 17 dB against the BF16 policy (torchao's own test bounds), and "
                "with all of them in FP8 the loss stays within the tolerance"
                + ("; measured with FP8 emulated on a CPU (numerics, not speed)." if policy.emulated else "."))
    blocks: list[Any] = [lead, Table(("layer", "format", "forward SQNR (dB)", "weight-grad SQNR (dB)",
                                      "BF16 / FP8 GEMM time", "why"), _rows(policy), right=(2, 3, 4))]
    side = policy.stats.get("fp8", {}).get("assignments") if isinstance(policy.stats.get("fp8"), dict) else None
    if isinstance(side, dict) and side:
        blocks += [Text("Side by side on the same batch: torchao's default converts every Linear; torchtitan's filter "
                        "skips the output head and the router and torchao's auto filter drops small shapes; the loss "
                        "change is one pass's against the BF16 policy, the step is modelled on the profile above."),
                   _side_by_side(side)]
    return Section("FP8 (GEMMs of Linears, torchao)", tuple(blocks))
