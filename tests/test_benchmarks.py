"""The GPU benchmark's code path, run tiny on the CPU (CI has no GPU; the real run needs one)."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_gpu_speed_runs_every_variant_and_reports_the_target(tmp_path, one_thread):
    """All four variants train and are timed; the verdict follows from the medians it reports."""
    import gpu_speed

    out = tmp_path / "gpu_speed.json"
    rows = gpu_speed.main(["--device", "cpu", "--size", "tiny", "--rounds", "2", "--warmup", "1",
                           "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["model"] for r in saved["results"]] == ["gpt2", "resnet50"]
    for r in rows:
        t = {v: r["timing"][v]["median_s"] for v in gpu_speed.VARIANTS}
        assert all(x > 0 and r["timing"][v]["n"] == 2 for v, x in t.items())
        assert r["policy_vs_autocast"] == pytest.approx(t["autoprec"] / min(t["amp-bf16"], t["amp-fp16"]))
        assert r["meets_target"] == (r["policy_vs_autocast"] <= 1.05 and t["fp32"] / t["autoprec"] >= 1.5)
        assert r["policy"]["verified"] is True and r["policy"]["passes"] > 0


def test_gpu_speed_refuses_cuda_without_a_gpu():
    """Asked for the GPU run on a machine without one, it says so instead of timing something else."""
    import gpu_speed
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        gpu_speed.main(["--models", "gpt2"])
