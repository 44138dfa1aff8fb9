"""The cost model's structure, whatever the profile's figures: monotone in size, casts cost, slower is never chosen."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import autoprec
from autoprec.device import (
    Curve,
    DeviceProfile,
    StepCost,
    estimate,
    layer_cost,
    load_profile,
    monotone,
    profile_from_dict,
    profile_to_dict,
    save_profile,
    shape_key,
)
from autoprec.trace import Layer, trace

PINNED_CPU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "cpu_profile.json")


def _linear(rows: int, width: int, out: int | None = None) -> Layer:
    out = out or width
    return Layer("fc", "module", "Linear", (), ("linear",), ((rows, width),), ((rows, out),),
                 flops=2 * rows * width * out, in_numel=rows * width, out_numel=rows * out, work_numel=rows * out,
                 param_numel=width * out + out, calls=1)


def _elementwise(rows: int, op: str = "LayerNorm", ops: tuple[str, ...] = ("layer_norm",),
                 hazards: tuple[str, ...] = ("variance/norm",)) -> Layer:
    n = rows * 256
    return Layer("m", "module", op, hazards, ops, ((rows, 256),), ((rows, 256),), flops=0, in_numel=n,
                 out_numel=n, work_numel=n, param_numel=512 if op == "LayerNorm" else 0, calls=1)


def _scaled(profile: DeviceProfile, fmt: str, factor: float) -> DeviceProfile:
    """``profile`` with every figure of ``fmt`` ``factor`` times its FP32 figure: a CPU without that format's
    kernels (the Xeon without AVX512-BF16 of ENVIRONMENT.md measured BF16 3-5x slower than FP32 everywhere)."""
    d = profile_to_dict(profile)
    for c in d["curves"]:
        c["seconds"][fmt] = [t * factor for t in c["seconds"]["fp32"]]
    for per in d["elementwise"].values():
        per[fmt] = [t * factor for t in per["fp32"]]
    for per in d["layers"].values():
        if fmt in per:
            per[fmt] = per["fp32"] * factor
    return profile_from_dict(d, source=f"{profile.source} with {fmt} at {factor:g}x FP32")


PROFILES = {"pinned-cpu": lambda: load_profile(PINNED_CPU), "cuda-estimate": lambda: estimate("cuda"),
            "cpu-slow-bf16": lambda: _scaled(load_profile(PINNED_CPU), "bf16", 3.0)}


@pytest.mark.parametrize("name", list(PROFILES))
@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16"])
def test_cost_grows_with_size(name, fmt):
    """More rows or a wider layer never costs less, in any format, under any profile."""
    profile = PROFILES[name]()
    for make in (lambda n: _linear(n, 256), lambda n: _linear(64, n), _elementwise):
        costs = [layer_cost(make(n), fmt, profile) for n in (8, 32, 128, 512, 2048, 8192)]
        assert costs == sorted(costs), (make, costs)


@pytest.mark.parametrize("name", list(PROFILES))
@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_casting_costs_more_than_not_casting(name, fmt):
    """A 16-bit region's casts add to its step time; so does the region itself, over the same work in FP32."""
    profile = PROFILES[name]()
    for layer in (_linear(512, 256), _elementwise(512), _elementwise(512, "GELU", ("gelu",), ())):
        assert layer_cost(layer, fmt, profile, casts=True) > layer_cost(layer, fmt, profile, casts=False)
    # an op that a 16-bit region computes in FP32 anyway (a loss on either device) only adds its casts
    loss = _elementwise(512, "mse_loss", ("mse_loss",), ("loss",))
    assert layer_cost(loss, fmt, profile) > layer_cost(loss, "fp32", profile)


@given(st.lists(st.floats(1e-7, 10.0), min_size=1, max_size=12))
@settings(max_examples=60, deadline=None)
def test_measured_curves_are_made_monotone(times):
    """Noisy ladder times become the closest non-decreasing sequence, as long as the input, bounded by it."""
    out = monotone(times)
    assert len(out) == len(times)
    assert all(b >= a * (1 - 1e-9) for a, b in zip(out, out[1:]))
    assert min(times) * (1 - 1e-9) <= min(out) and max(out) <= max(times) * (1 + 1e-9)


@given(st.floats(1.0, 1e12), st.floats(1.0, 1e12))
@settings(max_examples=60, deadline=None)
def test_curve_interpolation_is_monotone(a, b):
    """Between, below and beyond the measured sizes, more FLOPs never take less time."""
    curve = Curve("matmul", (1e3, 1e6, 1e9), {"fp32": (1e-5, 2e-5, 9e-3)})
    lo, hi = sorted((a, b))
    assert curve.at("fp32", lo) <= curve.at("fp32", hi) * (1 + 1e-9)


def test_a_layer_measured_at_its_shape_is_priced_by_that_measurement():
    """The figure measured at the layer's own shape wins over the curve, in both directions."""
    profile = load_profile(PINNED_CPU)
    lin = _linear(1024, 256)
    assert layer_cost(lin, "bf16", profile) < layer_cost(lin, "fp32", profile)  # the curve: BF16 faster here
    slow = dataclasses.replace(profile, layers={shape_key(lin): {"fp32": 1e-3, "bf16": 5e-3}})
    assert layer_cost(lin, "bf16", slow) > layer_cost(lin, "fp32", slow)
    assert layer_cost(lin, "fp32", slow) == pytest.approx(1e-3)


def test_cuda_autocast_fp32_ops_gain_nothing_in_16_bit():
    """CUDA autocast runs layer_norm/softmax in FP32 inside any region: such a layer only pays the region,
    while a ReLU handed 16-bit inputs moves half the bytes (once that outweighs its region's own cost)."""
    cuda = estimate("cuda")
    for rows in (4096, 65536):
        ln, relu = _elementwise(rows), _elementwise(rows, "ReLU", ("relu",), ())
        assert layer_cost(ln, "bf16", cuda) > layer_cost(ln, "fp32", cuda)
        assert layer_cost(ln, "bf16", cuda, casts=False) >= layer_cost(ln, "fp32", cuda)
    assert layer_cost(relu, "bf16", cuda, casts=False) < layer_cost(relu, "fp32", cuda)


def test_cuda_estimate_charges_each_call():
    """The per-call (launch) term: at tiny sizes a 16-bit region costs more than it saves on a GPU, at large
    sizes tensor cores win; the report names the profile an estimate."""
    cuda = estimate("cuda")
    assert layer_cost(_linear(8, 16), "fp16", cuda) > layer_cost(_linear(8, 16), "fp32", cuda)
    assert layer_cost(_linear(4096, 1024), "fp16", cuda) < layer_cost(_linear(4096, 1024), "fp32", cuda)
    assert cuda.origin == "estimate" and "estimate" in cuda.describe()


def _wide(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)), torch.randn(1024, 256)


@pytest.mark.parametrize("dtypes", [None, ["bf16"]], ids=["default", "explicit-bf16"])
def test_a_format_measured_slower_is_never_chosen_for_speed(tmp_path, dtypes):
    """On a profile where BF16 measures 3x slower (a CPU without native BF16), the CPU policy is FP32
    throughout, every layer says what each format costs and where the figure came from, and the
    report states the slowdown; on the profile it was scaled from, the same layers run in BF16."""
    model, x = _wide()
    fast = autoprec.tune(model, x, progress=False, verify_steps=0, dtypes=dtypes)
    assert fast.layers["0"].precision == fast.layers["2"].precision == "bf16"
    path = tmp_path / "no-native-bf16.json"
    save_profile(_scaled(load_profile(PINNED_CPU), "bf16", 3.0), path)
    policy = autoprec.tune(model, x, progress=False, verify_steps=0, dtypes=dtypes, profile=str(path))
    assert set(policy.assignment.values()) == {"fp32"}
    assert policy.excluded() == {}  # no numerical reason: speed
    for key in ("0", "2"):
        e = policy.layers[key]
        assert e.reason == "no gain"
        assert "step time fp32" in e.detail and "bf16" in e.detail and str(path) in e.detail
    speed = policy.stats["format_speed"]["bf16"]
    assert speed["speed"] < 1 and speed["faster"] == 0 and speed["layers"] == 2
    assert policy.stats["profile_origin"] == "file"
    report = policy.report()
    assert "x slower)" in report and "Layers kept in FP32 for speed" in report


@pytest.mark.parametrize("stats", [{"profile_origin": "file", "format_speed": {"bf16": None}},
                                   {"profile_origin": 3}, {"profile_origin": "file", "format_speed": [1]},
                                   {"profile_origin": "file", "format_speed": {"bf16": {"speed": float("nan")}}}],
                         ids=["null-format", "origin-not-text", "speeds-not-a-map", "nan-speed"])
def test_report_renders_device_stats_it_did_not_write(stats):
    """A policy file's stats are free-form: device lines not of the shape tune writes are left out, never a crash."""
    policy = autoprec.Policy(layers={"fc": autoprec.LayerEntry("bf16")}, stats=stats)
    report = policy.report()
    assert "x the FP32 speed" not in report
    assert ("speed figures" in report) == isinstance(stats["profile_origin"], str)


def _keyed(layer: Layer, key: str) -> Layer:
    return dataclasses.replace(layer, key=key)


def _chain() -> tuple[list[Layer], dict[str, tuple[str, ...]]]:
    """Linear -> LayerNorm -> GELU -> Linear, 4096 rows of 256, each handing its output to the next."""
    layers = [_keyed(_linear(4096, 256), "fc1"), _keyed(_elementwise(4096), "norm"),
              _keyed(_elementwise(4096, "GELU", ("gelu",), ()), "act"), _keyed(_linear(4096, 256), "fc2")]
    return layers, {"fc1": ("norm",), "norm": ("act",), "act": ("fc2",)}


@pytest.mark.parametrize("name", list(PROFILES))
def test_step_cost_prices_casts_per_edge(name):
    """A cast is paid on an edge whose ends run in different formats and at the model's own edges: layers
    without edges cost what layer_cost says with their casts; a 16-bit chain pays one cast in and one out."""
    profile = PROFILES[name]()
    layers, handoff = _chain()
    alone = StepCost(layers, {}, profile)
    edges = StepCost(layers, handoff, profile)
    n = 4096 * 256
    for a in ({k.key: "fp32" for k in layers}, {"fc1": "bf16", "norm": "fp32", "act": "fp32", "fc2": "bf16"},
              {k.key: "bf16" for k in layers}):
        assert alone.total(a) == pytest.approx(sum(layer_cost(lay, a[lay.key], profile) for lay in layers))
    matmuls_only = {"fc1": "bf16", "norm": "fp32", "act": "fp32", "fc2": "bf16"}
    assert edges.cast_numel({k.key: "fp32" for k in layers}) == 0
    assert edges.cast_numel(matmuls_only) == 4 * n        # fc1 in, norm in (up), fc2 in (down), fc2 out
    assert edges.cast_numel({k.key: "bf16" for k in layers}) == 2 * n   # fc1 in, fc2 out
    assert edges.cast_numel({**matmuls_only, "norm": "bf16"}) == 4 * n  # the cast only moves to act's input
    # one 16-bit layer alone pays its casts as layer_cost prices them
    lone = {"fc1": "bf16", "norm": "fp32", "act": "fp32", "fc2": "fp32"}
    assert edges.of("fc1", lone) + edges.of("norm", lone) - edges.body("norm", "fp32") == pytest.approx(
        layer_cost(layers[0], "bf16", profile))


def _norm_chain(norm: type[nn.Module] = nn.LayerNorm, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 1024), norm(1024), nn.GELU(), nn.Linear(1024, 256)), torch.randn(1024, 256)


class _ShiftedNorm(nn.LayerNorm):
    """A LayerNorm of its input plus 512: in BF16 the shift swallows the input's fraction (the probe excludes it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + 512.0)


def test_cheap_layers_between_16bit_layers_join_them():
    """On a profile where BF16 matmuls pay, the LayerNorm and GELU between two BF16 Linears run BF16 too (the
    norm is not faster alone, but in FP32 it would cost the casts on both its edges); the modelled casts drop,
    and no decision is a numerical exclusion."""
    model, x = _norm_chain()
    policy = autoprec.tune(model, x, progress=False, verify_steps=0)
    assert policy.assignment == {"0": "bf16", "1": "bf16", "2": "bf16", "3": "bf16"}
    assert [policy.layers[k].reason for k in "0123"] == ["cast"] * 4
    assert policy.layers["1"].detail.startswith("joins its neighbours in bf16")
    assert policy.layers["2"].detail.startswith("follows")
    assert policy.excluded() == {}
    tr = trace(model, x, device_type="cpu")
    edges = StepCost(tr.layers, tr.handoff, load_profile(PINNED_CPU))
    matmuls_only = {**policy.assignment, "1": "fp32", "2": "fp32"}
    assert edges.cast_numel(policy.assignment) < edges.cast_numel(matmuls_only)
    assert edges.total(policy.assignment) < edges.total(matmuls_only)


def test_a_norm_the_probe_excludes_never_joins():
    """The same chain with a norm that BF16 breaks: the norm stays FP32 as a numerical exclusion with the
    probe's evidence; the GELU after it gains nothing in BF16 (the cast only moves) and says so, not excluded."""
    model, x = _norm_chain(_ShiftedNorm)
    policy = autoprec.tune(model, x, progress=False, verify_steps=0)
    assert policy.layers["0"].precision == policy.layers["3"].precision == "bf16"
    norm, act = policy.layers["1"], policy.layers["2"]
    assert norm.precision == "fp32" and norm.excluded and norm.reason.startswith("error at")
    assert "variance/norm" in norm.detail and "bound" in norm.detail
    assert act.precision == "fp32" and act.reason == "no gain" and not act.excluded
    assert "step time fp32" in act.detail
    assert set(policy.excluded()) == {"1"}


def test_nothing_joins_where_bf16_is_slower(tmp_path):
    """On a profile where BF16 runs 3x slower than FP32, the chain stays FP32 throughout, for speed ("no gain",
    with each format's cost), never as a numerical exclusion or a combined error."""
    model, x = _norm_chain()
    path = tmp_path / "no-native-bf16.json"
    save_profile(_scaled(load_profile(PINNED_CPU), "bf16", 3.0), path)
    policy = autoprec.tune(model, x, progress=False, verify_steps=0, profile=str(path))
    assert set(policy.assignment.values()) == {"fp32"}
    assert policy.excluded() == {}
    for e in policy.layers.values():
        assert e.reason == "no gain" and "step time fp32" in e.detail
