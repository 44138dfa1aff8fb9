"""``benchmarks/fp8.py`` at a tiny size: the three FP8 assignments, their FLOP fractions and losses, the JSON."""

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
    """torchao's default is every Linear, torchtitan's names keep the head, the measured set is the judged one."""
    import fp8

    out = tmp_path / "fp8.json"
    results = fp8.main(["--models", "llama", "--width", "64", "--layers", "1", "--steps", "2", "--batch", "2",
                        "--seq", "16", "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(results)) and saved["torchao"]
    runs = results[0]["runs"]
    assert list(runs) == fp8.ASSIGNMENTS
    assert runs["torchao"]["fraction"] == 1.0 and runs["fp32"]["fraction"] == runs["bf16"]["fraction"] == 0.0
    assert "lm_head" not in runs["titan-names"]["fp8"] and len(runs["titan-names"]["fp8"]) == 7
    assert runs["titan-auto"]["fp8"] == []  # width 64: every Linear under torchao's tensorwise size thresholds
    linears = results[0]["linears"]
    assert runs["measured"]["fp8"] == [p for p, lin in linears.items() if lin["init"]["passed"]]
    assert all(math.isfinite(r["final"]) for r in runs.values())
    assert "| torchao | 8/8 | 100.0% |" in capsys.readouterr().out
