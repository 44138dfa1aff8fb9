"""The benchmarks' code paths, run tiny: the GPU benchmark's TF32 switch (its whole run, tiny on the CPU, is
``tests/test_gpu_run.py``'s dry run of ``benchmarks/gpu/run.sh``; CI has no GPU), the compile benchmark on one quick
model with the fast ``aot_eager`` backend."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_tf32_flag_is_guarded_and_switching_it_between_variants_recompiles_nothing(one_thread):
    """What the TF32 variants rely on: Dynamo guards ``allow_tf32`` (a call under the other setting compiles its
    own graph, never runs the one compiled under the first), and calls interleaved under both settings reuse
    those two graphs; ``tf32_matmuls`` restores the flag, also on an exception."""
    import gpu_speed
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    fn = torch.compile(model, backend="aot_eager")

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]
    before, start = torch.backends.cuda.matmul.allow_tf32, graphs()
    with gpu_speed.tf32_matmuls(False):
        fn(x).sum().backward()
    with gpu_speed.tf32_matmuls(True):
        fn(x).sum().backward()
    assert graphs() - start == 2
    for _ in range(3):
        for on in (False, True):
            with gpu_speed.tf32_matmuls(on):
                assert torch.backends.cuda.matmul.allow_tf32 is on
                fn(x).sum().backward()
    assert graphs() - start == 2 and torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(RuntimeError, match="inside"), gpu_speed.tf32_matmuls(not before):
        raise RuntimeError("inside")
    assert torch.backends.cuda.matmul.allow_tf32 == before
    torch._dynamo.reset()


def test_compiled_tf32_variant_runs_tf32_matmuls_on_cuda():
    """On a GPU, under Inductor: the graph compiled and run under ``tf32_matmuls(True)`` rounds its matmul to TF32
    (error against FP64 far above strict FP32's), the one under ``tf32_matmuls(False)`` does not, each matches
    eager under the same setting, and switching between them compiles nothing again."""
    import gpu_speed
    import torch
    from torch._dynamo.utils import counters

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(1024, 1024, device="cuda", generator=g) for _ in range(2))
    ref = (a.double() @ b.double()).float()
    fn = torch.compile(lambda a, b: torch.relu(a @ b) - torch.relu(-(a @ b)))  # a matmul and a fused epilogue
    err = {}
    for round_ in range(2):
        for on in (False, True):
            with gpu_speed.tf32_matmuls(on):
                out, eager = fn(a, b), a @ b
            err[on] = ((out - ref).abs().max() / ref.abs().max()).item()
            assert torch.allclose(out, eager, rtol=0, atol=1e-3 * ref.abs().max().item()), on
        if round_ == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # the second round reused both graphs
    assert err[False] < 1e-5 and err[True] > 1e-4, err  # strict FP32 ~1e-7 here, TF32 (10-bit mantissa) ~1e-3
    torch._dynamo.reset()


def test_gpu_speed_refuses_cuda_without_a_gpu():
    """Asked for the GPU run on a machine without one, it says so instead of timing something else."""
    import gpu_speed
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        gpu_speed.main(["--models", "gpt2"])


def test_compile_speed_times_every_variant_and_counts_graph_breaks(tmp_path):
    """The whole compile benchmark, tiny: six variants with finite positive step times, graph-break and
    recompile counts; the policy adds no graph break to the model's own."""
    import compile_speed

    out = tmp_path / "compile_speed.json"
    compile_speed.main(["--models", "gpt2", "--size", "quick", "--repeats", "2", "--steps", "1", "--warmup", "1",
                        "--backend", "aot_eager", "--out", str(out)])
    saved = json.loads(out.read_text())
    meta = saved["meta"]
    assert meta["cpu"] and isinstance(meta["avx512_bf16"], bool) and meta["backend"] == "aot_eager"
    [r] = saved["results"]
    assert r["model"] == "gpt2" and set(r["variants"]) == set(compile_speed.VARIANTS)
    for name, v in r["variants"].items():
        assert math.isfinite(v["median_s"]) and v["median_s"] > 0 and v["n"] == 2, name
        assert isinstance(v["graph_breaks"], int) and v["graph_breaks"] >= 0, name
        if v["mode"] == "compiled":  # it compiled on the first step, and never again
            assert v["new_graphs_first_step"] >= 1 and v["recompiles"] == 0 and v["compile_s"] > 0, name
    v = r["variants"]
    assert v["policy-compiled"]["graph_breaks"] == v["fp32-compiled"]["graph_breaks"]
    assert v["amp-bf16-eager"]["ratio_amp_bf16_same_mode"] == 1.0
    target = r["target"]
    assert isinstance(target["met"], bool) and target["policy_compiled_vs_amp_bf16_compiled"] > 0
    q1, median, q3 = target["paired_ratio_quartiles"]
    assert 0 < q1 <= median <= q3


def test_coverage_table_compares_reported_and_measured(tmp_path, capsys, one_thread):
    """The coverage benchmark tunes, counts at dispatch, prints the table and writes the rows it printed."""
    import flop_coverage

    out = tmp_path / "flop_coverage.json"
    rows = flop_coverage.main(["--models", "mlp", "rnn", "--targets", "cuda", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == rows
    assert [r["model"] for r in rows] == ["mlp", "rnn"]
    for r in rows:
        assert r["flops_measured"] == r["flops_traced"] > 0
        assert r["gap"] == round(abs(r["reported"] - r["measured"]), 4) <= 0.02
    assert "| rnn | tests/models_coverage.py | cuda |" in capsys.readouterr().out

def test_calibrate_benchmark_writes_the_profile_and_the_named_kernels(tmp_path):
    """benchmarks/calibrate.py, at the smallest budget: a valid profile and every named kernel timed in each
    format, as the READMEs cite them."""
    import calibrate

    from autoprec.device import profile_from_dict

    out = tmp_path / "calibrate.json"
    result = calibrate.main(["--seconds", "0.001", "--rounds", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert profile_from_dict(saved["profile"]).formats == ("fp32", "bf16")
    assert len(saved["kernels_ms"]) == 6
    assert all(set(v) == {"fp32", "bf16"} and min(v.values()) > 0 for v in saved["kernels_ms"].values())
    assert "avx512_bf16" in saved["meta"]["capability"]

def test_probe_cost_times_pass_and_errors_and_the_probe(tmp_path):
    """The probe-cost benchmark, on the smallest GPT-2 shape: per-pass times, the whole probe's passes and peak."""
    import probe_cost

    out = tmp_path / "probe_cost.json"
    rows = probe_cost.main(["--shapes", "2x128", "--samples", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and [r["shape"] for r in rows] == ["2x128"]
    r = rows[0]
    assert r["samples"] == 2 and min(r["plain_ms"], r["pass_ms"], r["errors_ms"]) > 0
    assert r["probe_passes"] == 1 + 2 * r["candidates"] and math.isfinite(r["probe_peak_rss_mb"])


def test_probe_cost_counts_passes_with_and_without_sharing(tmp_path):
    """``--passes``: the shared probe's passes against ``1 + candidates x 2``, and tune decides alike both ways."""
    import probe_cost

    out = tmp_path / "probe_passes.json"
    rows = probe_cost.main(["--passes", "2x128", "--decide", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and [r["shape"] for r in rows] == ["2x128"]
    r = rows[0]
    assert r["roles"] == 8 and r["passes_alone"] == 1 + 2 * r["candidates"]
    assert r["passes_shared"] < r["passes_alone"] and r["tune_probe_passes_shared"] == r["passes_shared"]
    assert r["tune_probe_passes_alone"] == r["passes_alone"]
    assert r["same_decisions"] is True and r["differing"] == []


def test_sharing_benchmark_compares_both_tunes(tmp_path, one_thread):
    """The sharing benchmark tunes a two-block GPT-2 both ways: same decisions, fewer probe passes, held-out figures."""
    import sharing

    out = tmp_path / "sharing.json"
    rows = sharing.main(["--models", "gpt2", "--verify-steps", "2", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    r = rows[0]
    assert r["differing"] == [] and r["shared_members"] > 0
    assert r["shared"]["probe_passes"] < r["alone"]["probe_passes"]
    for tag in ("shared", "alone"):
        assert not r[tag]["heldout_nonfinite"] and math.isfinite(r[tag]["heldout_loss_err"])


def test_scaling_gpt2_tunes_each_shape_in_a_fresh_process(tmp_path):
    """``scaling.py --gpt2`` on two tiny shapes: passes per stage, time against a plain pass, peak memory rows."""
    import scaling

    out = tmp_path / "scaling_gpt2.json"
    result = scaling.main(["--gpt2", "1x32", "2x32", "--vocab", "64", "--verify-steps", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result)) and saved["vocab"] == 64 and saved["verify_steps"] == 2
    rows = saved["rows"]
    assert [r["shape"] for r in rows] == ["1x32", "2x32"]
    for r in rows:
        assert r["verify_passes"] == 4 and r["probe_passes"] >= 1 and r["tune_s"] > 0 and r["plain_s"] > 0
        assert all(math.isfinite(r[k]) for k in ("tune_peak_mb", "step_peak_mb"))
        assert set(r["peak_by_stage_mb"]) >= {"probe", "verify"}
    assert rows[1]["candidates"] > rows[0]["candidates"]  # a deeper model, more layers


def test_step_ratio_sets_measured_beside_modelled(tmp_path, one_thread):
    """The step-ratio benchmark tunes a small BERT with timing on and writes both ratios and every variant's step."""
    import step_ratio

    out = tmp_path / "step_ratio.json"
    rows = step_ratio.main(["--models", "bert-128", "--verify-steps", "1", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == rows
    r = rows[0]
    assert {"fp32", "autocast bf16", "policy"} <= set(r["step_ms"]) and r["rounds"] >= 3
    assert r["measured_ratio"] is not None and r["modelled_ratio"] > 0
    assert r["speed_lines"][0].startswith("policy step time ")


def test_long_run_trains_every_variant_of_every_model_and_writes_the_curves(tmp_path, one_thread, capsys):
    """``long_run.py --quick``: five variants per model in the JSON it returns, a guard row with its actions and
    overhead, a loss per step per variant, the printed table, and the PNG where matplotlib is installed."""
    import long_run

    out = tmp_path / "long_run.json"
    rows = long_run.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["steps"] == 20 and saved["every"] == 5
    assert [(r["model"], r["variant"]) for r in rows] == [(m, v) for m in long_run.MODELS for v in long_run.VARIANTS]
    for r in rows:
        assert r["steps"] == 20 and r["step_ms"] > 0 and isinstance(r["guard_actions"], list)
        assert (r["skipped_steps"] is None) == (r["final_scale"] is None)  # a scaler, or neither
        assert (r["skipped_steps"] is None) == (r["variant"] in ("fp32", "amp-bf16")) or r["model"] == "offset"
        assert f"| {r['model']} | {r['hazard']} | {r['variant']} |" in printed
        if r["variant"] == "guard":
            assert {"overhead_pct", "timed_steps"} <= set(r)
    assert set(saved["losses"]) == set(long_run.MODELS)
    assert all(len(c) == 20 for curves in saved["losses"].values() for c in curves.values())
    assert (tmp_path / "long_run.png").exists() == (saved["png"] == "long_run.png")


def test_guard_overhead_times_the_guard_beside_the_policy_on_gpt2_and_llama(tmp_path, capsys):
    """``guard_overhead.py --quick``: per model every variant timed, eager and compiled overheads with the issue's
    bound and a verdict, the FP32 check's cost, one host read per 50 steps, nothing recompiled; the JSON holds what
    it returns."""
    import guard_overhead

    out = tmp_path / "guard_overhead.json"
    result = guard_overhead.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["meta"]["every"] == 50 and result["meta"]["check_every_default"] == 500
    assert [r["model"] for r in result["models"]] == ["gpt2", "llama"]
    for r in result["models"]:
        assert set(r["median_ms"]) == {"policy", "guard", "guard+check", "policy-compiled", "guard-compiled"}
        assert all(ms > 0 for ms in r["median_ms"].values()) and r["rounds"] == 2 and r["layers_bf16"] > 0
        for mode, bound in (("eager", 2.0), ("compiled", 1.0)):
            o = r[f"overhead_{mode}"]
            assert o["bound_pct"] == bound and o["verdict"] in ("met", "missed", "not resolved")
            assert o["ci95_pct"][0] <= o["median_pct"] <= o["ci95_pct"][1]
        assert {"check_ms", "check_amortized_pct", "check_forward_ratio"} <= set(r)
        assert r["syncs_per_50_steps"] == 1 and r["graphs_compiled_in_timed_rounds"] == 0
        assert f"| {r['model']} | {r['median_ms']['policy']} | {r['median_ms']['guard']} |" in printed
    assert [row["width"] for row in result["rows"]] == [32]


def test_train_step_prices_gpt2_at_the_tuning_batch_and_at_the_training_step(tmp_path, capsys):
    """``train_step.py`` on a one-block GPT-2 with a small vocabulary: two tunes for CUDA on the default estimate,
    the second priced at ``train_batch_size``; the JSON holds both rows, the table prints them."""
    import train_step

    out = tmp_path / "train_step.json"
    result = train_step.main(["--shape", "1x64", "--vocab", "64", "--verify-steps", "0", "--train-rows", "64",
                              "--out", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result)) and [r["train_batch_size"] for r in saved["rows"]] == [None, 64]
    assert all("H100" in r["device"] and 0 <= r["low_fraction"] <= 1 and r["matmul_layers"] > 0 for r in saved["rows"])
    assert "| train_batch_size=64 (8192 tokens) |" in printed and "| 2 x 128 tokens (as given) |" in printed
    assert os.environ.get("AUTOPREC_PROFILE")  # the suite's pin is back for the tests after it


def test_fp8_cost_tables_the_crossover_and_llama_shapes(tmp_path, capsys):
    """benchmarks/fp8_cost.py: the smallest square Linear where FP8 pays shrinks as the tokens grow, and Llama 3 8B's
    wide Linears pay at 8192 tokens where its narrow k/v projections gain little."""
    import fp8_cost

    out = tmp_path / "fp8_cost.json"
    result = fp8_cost.main(["--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    sides = [v for v in result["crossover_square"]["tensorwise"].values()]
    assert all(sides) and sides == sorted(sides, reverse=True)
    llama = result["llama3_8b"]
    assert all(llama[n][r]["pays"] for n in ("wq", "w1", "w2", "output") for r in fp8_cost.FP8_COST_RECIPES)
    assert llama["wk"]["tensorwise"]["speedup"] < llama["wq"]["tensorwise"]["speedup"]
    assert "| wk | 4096 x 1024 |" in capsys.readouterr().out
