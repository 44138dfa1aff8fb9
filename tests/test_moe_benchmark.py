"""``benchmarks/moe.py`` at a tiny size: the grouped-GEMM block, the looped experts and a Mixtral, their 16-bit shares,
the experts' formats, the JSON and the table."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_moe_benchmark_measures_the_experts_in_bf16(tmp_path, capsys):
    """Every model's experts tuned BF16 for CUDA; the looped experts probed in as many passes as the grouped block;
    blanket autocast's grouped_mm failure is a result, not a crash."""
    import moe as bench

    known = bench.builders(32)
    models = ["moe", "looped"] + (["mixtral-eager"] if "mixtral-eager" in known else [])
    out = tmp_path / "moe.json"
    rows = bench.main(["--models", *models, "--width", "32", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(rows))
    by = {r["model"]: r for r in rows}
    assert list(by) == models
    assert all(r["experts_format"] == "bf16" and r["experts_share"] > 0.5 for r in rows), rows
    assert by["moe"]["policy"] > 0.9 and by["looped"]["policy"] > 0.9
    assert by["moe"]["blanket"].startswith("fails: ") and by["looped"]["blanket"] == 1.0
    assert by["looped"]["experts_layers"] == 8 and by["looped"]["probe_passes"] == by["moe"]["probe_passes"]
    assert all(r["router_format"] in ("fp32", "bf16") for r in rows)
    assert "| looped | " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--models", "nope", "--out", str(out)])
