"""``tune(dtypes=["bf16", "fp8"])``: FP8 per Linear, decided by measurement and price. A Linear fed massive
activations stays BF16 by its measured SQNR (not by name), small GEMMs stay BF16 by the cost model, the policy
with FP8 entries saves, loads, applies and trains, and the options that cannot work say why."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from torch import nn

import autoprec
from autoprec import FormatError, OptionError
from autoprec.device._estimates import compute_bound
from autoprec.search._records import Decision
from autoprec.verify._verify import _back_off
from tests.models_fp8 import cheap_casts, fp8_loss, outlier_mlp, tune_fp8


@pytest.fixture(scope="module")
def tuned():
    pytest.importorskip("torchao")
    model = outlier_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    policy = tune_fp8(model, cheap_casts())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the caller's model untouched
    return model, policy


def test_the_outlier_linear_stays_bf16_by_measurement(tuned):
    """Every Linear pays here; the one behind the massive channels misses 18 dB and stays BF16, the others go FP8
    with the fastest recipe that passes (tensorwise), and the hand filters' choices are measured beside it."""
    _, policy = tuned
    fp8 = {k for k, e in policy.layers.items() if e.precision == "fp8"}
    assert fp8 == {"0", "2", "7", "9"}, {k: (e.precision, e.detail) for k, e in policy.layers.items()}
    assert policy.recipes == dict.fromkeys(["0", "2", "7", "9"], "tensorwise")
    kept = policy.layers["5"]
    assert kept.precision == "bf16" and "stays bf16, fp8 error: 5: forward SQNR" in kept.detail
    assert kept.measured["fp8"]["forward_db"] < 18.0 and kept.measured["fp8"]["passed"] == 0.0
    assert all(policy.layers[k].measured["fp8"]["forward_db"] >= 18.0 for k in fp8)
    sides = policy.stats["fp8"]["assignments"]
    assert sides["torchao default"]["fp8_layers"] == ["0", "2", "5", "7", "9"]
    assert sides["tuned"]["fp8_layers"] == ["0", "2", "7", "9"]
    assert sides["tuned"]["loss_rel"] < sides["torchao default"]["loss_rel"]
    assert policy.formats == ("bf16", "fp8") and policy.verification.passed


def test_small_gemms_stay_bf16_by_price():
    """On the compute-bound roofline, whose FP8 casts cost memory traffic, no Linear of a 256-wide MLP at 64 rows
    saves more than its casts cost: all stay BF16, each saying so, and no FP8 pass runs for them."""
    pytest.importorskip("torchao")
    policy = tune_fp8(outlier_mlp(), compute_bound(), verify_steps=0)
    linears = ["0", "2", "5", "7", "9"]
    assert all(policy.layers[k].precision == "bf16" for k in linears)
    assert all("stays bf16, fp8 no gain:" in policy.layers[k].detail for k in linears)
    assert all(policy.layers[k].measured["fp8"]["pays"] == 0.0 for k in linears)
    assert "forward_db" not in policy.layers["2"].measured["fp8"]
    assert policy.stats["fp8"]["passes"] == 2  # the BF16 reference and torchao's default (the others: none in FP8)


def test_the_policy_saves_loads_applies_and_trains(tuned, tmp_path):
    """The FP8 entries survive the file; applied, the policy trains (Adam, ten steps) with FP32 masters."""
    model, policy = tuned
    policy.save(tmp_path / "p.json")
    loaded = autoprec.load(tmp_path / "p.json")
    assert loaded.recipes == policy.recipes and loaded.assignment == policy.assignment
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(64, 64)
    losses = []
    handle = loaded.apply(model)
    try:
        for _ in range(10):
            opt.zero_grad()
            loss = fp8_loss(model(x), x)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        handle.remove()
    assert losses[-1] < losses[0] and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_verification_moves_fp8_layers_to_bf16_first():
    """A failing verification round moves every FP8 layer to BF16 (its recipe dropped) before backing off any layer
    to FP32."""
    decisions = {"a": Decision("a", "fp8", "cast", "d", recipe="rowwise"), "b": Decision("b", "bf16", "cast"),
                 "c": Decision("c", "fp8", "cast", recipe="tensorwise")}
    note = _back_off(decisions, ["b", "a", "c"], [], {"a": "bf16", "c": "bf16"}, rounds=1, gap=0.2, threshold=0.05,
                     skip_run=0)
    assert note == "moved 2 FP8 layer(s) to BF16 after round 1"
    assert {k: (d.precision, d.recipe) for k, d in decisions.items()} == {
        "a": ("bf16", ""), "b": ("bf16", ""), "c": ("bf16", "")}
    assert "moved from fp8 to bf16 by verification round 1" in decisions["a"].detail


@pytest.mark.parametrize("dtypes,target,error,message", [
    (["fp8"], "cuda", OptionError, (r"dtypes=\['fp8'\] names fp8 without bf16: an FP8 layer runs its GEMMs in FP8 and "
                                    r"the rest of its region in BF16; pass dtypes=\['bf16', 'fp8'\]")),
    (["bf16", "fp8"], "cpu", FormatError, (r"fp8 for target 'cpu': a CPU has no FP8 GEMMs, so FP8 can only cost time "
                                           r"there; tune for target='cuda'")),
], ids=["without-bf16", "cpu-target"])
def test_fp8_options_that_cannot_work_say_why(dtypes, target, error, message):
    model = outlier_mlp()
    with pytest.raises(error, match=message):
        autoprec.tune(model, torch.randn(8, 64), fp8_loss, dtypes=dtypes, target=target, progress=False)


def test_fp8_without_torchao_names_the_extra(monkeypatch):
    for name in ["torchao", "torchao.float8", "torchao.float8.float8_linear"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(FormatError, match=r"FP8 needs torchao, which is not installed: pip install 'autoprec\[fp8\]'"):
        autoprec.tune(outlier_mlp(), torch.randn(8, 64), fp8_loss, dtypes="bf16,fp8", target="cuda", progress=False)


def _moe_fp8(experts: int) -> autoprec.Policy:
    from tests.models_coverage import looped_moe

    model, batch = looped_moe(experts=experts, width=64, hidden=128)
    return autoprec.tune(model, batch[:2], lambda out, b: out.float().square().mean(), dtypes=["bf16", "fp8"],
                         target="cuda", profile=cheap_casts(), progress=False, n_trials=4, verify_steps=0, held_out=0)


def test_looped_experts_are_measured_in_fp8_as_one_role():
    """The experts of a ModuleList MoE share a role: FP8 measures each role in one pass per recipe, so 4 and 8 experts
    cost the same FP8 passes; each expert Linear gets its own verdict (FP8, or BF16 with the measured error)."""
    pytest.importorskip("torchao")
    four, eight = _moe_fp8(4), _moe_fp8(8)
    assert four.stats["fp8"]["passes"] == eight.stats["fp8"]["passes"]
    for policy, n in ((four, 4), (eight, 8)):
        experts = [k for k in policy.layers if k.startswith("experts.") and "forward_db" in
                   policy.layers[k].measured.get("fp8", {})]
        assert len(experts) == 2 * n, sorted(policy.layers)
        assert all(policy.layers[k].precision == "fp8" or "stays bf16, fp8 error: " in policy.layers[k].detail
                   for k in experts)
        assert any(policy.layers[k].precision == "fp8" for k in experts)


def test_fp8_layers_together_must_hold_on_held_out_data_too():
    """Two massive input channels in the last quarter of the rows. Decided on all rows, the input Linear fails FP8
    alone. With that quarter held out, it passes alone on the rest and goes back to BF16 when judged again on the
    held-out rows; the last Linear stays FP8 either way."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(64, 64)
    x[48:, [3, 17]] = 2.0 ** 12  # the last quarter: tune's held_out=0.25 holds them out
    runs = {h: tune_fp8(model, cheap_casts(), batch=x, held_out=h, verify_steps=0,
                        loss_fn=lambda out, b: out.float().square().mean()) for h in (0.0, 0.25)}
    assert "stays bf16, fp8 error: 0: weight-gradient SQNR" in runs[0.0].layers["0"].detail
    entry = runs[0.25].layers["0"]
    assert entry.precision == "bf16" and entry.measured["fp8"]["forward_db"] >= 18.0
    assert re.search(r"stays bf16, fp8 error: 0: weight-gradient SQNR [0-9.]+ dB < 17.0 dB on the held-out batch$",
                     entry.detail), entry.detail
    assert runs[0.0].layers["4"].precision == "fp8" and runs[0.25].layers["4"].precision == "fp8"
