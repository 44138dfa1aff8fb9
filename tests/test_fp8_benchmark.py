"""``benchmarks/fp8.py`` at a tiny size: the tuned assignment from ``autoprec.tune`` beside the hand filters, their
FLOP shares, modelled steps and losses, the target verdicts, the JSON."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torchao")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_fp8_benchmark_compares_the_assignments(tmp_path, capsys):
    """torchao's default is every Linear, torchtitan's names keep the head and the router, and the tuned assignment
    is tune's policy: at width 64 no Linear pays on the H100 estimate, so tune puts none in FP8 (each saying no
    gain) while torchao's default is modelled slower than BF16; each run's throughput is timed."""
    import fp8

    out = tmp_path / "fp8.json"
    results = fp8.main(["--models", "llama", "moe", "--width", "64", "--layers", "1", "--steps", "2", "--big-steps",
                        "2", "--batch", "2", "--seq", "16", "--threads", "1", "--warmup", "1", "--trials", "2",
                        "--verify-steps", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(results, default=str)) and saved["torchao"]
    llama, moe = results
    runs = llama["runs"]
    assert list(runs) == fp8.ASSIGNMENTS
    assert runs["torchao"]["fraction"] == 1.0 and runs["fp32"]["fraction"] == runs["bf16"]["fraction"] == 0.0
    assert "lm_head" not in runs["titan-names"]["fp8"] and len(runs["titan-names"]["fp8"]) == 7
    assert runs["titan-auto"]["fp8"] == []  # width 64: every Linear under torchao's tensorwise size thresholds
    assert runs["tuned"]["fp8"] == sorted(p for p, lin in llama["linears"].items() if lin["precision"] == "fp8") == []
    assert runs["tuned"]["modelled_vs_bf16"] == 1.0 < runs["torchao"]["modelled_vs_bf16"]
    assert "tuned" in llama["tune_assignments"] and llama["fp8_passes"] >= 1
    head = llama["linears"]["lm_head"]
    assert head["precision"] == "bf16" and head["fp8"]["pays"] == 0.0 and "no gain" in head["price_note"]
    assert llama["verdicts"]["no_fp8_that_loses_time"]["met"] and not llama["verdicts"]["fp8_flops"]["met"]
    assert "router" not in moe["runs"]["titan-names"]["fp8"] and "head" not in moe["runs"]["titan-names"]["fp8"]
    assert "router" in moe["verdicts"]["head_router_by_measurement"]["value"]
    assert all(math.isfinite(r["final"]) for res in results for r in res["runs"].values())
    assert all(r["tokens_per_s"] > 0 for r in runs.values()) and llama["device"] == "cpu" and not llama["compiled"]
    printed = capsys.readouterr().out
    assert "| torchao | 8/8 | 100.0% |" in printed and "| tuned (= bf16) | 0/8 | 0.0% | 1.000 |" in printed
