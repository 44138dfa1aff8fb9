"""Applying a policy: regions, reversibility, autocast state, nesting, FP16 emulation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import autoprec
from autoprec import LayerEntry, Policy
from autoprec.core import module_signatures, op_name, unit_modules
from autoprec.runtime import Runtime


class Attn(nn.Module):
    """q/k/v Linears feeding functional ops in the module's own code."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.q(x) @ self.k(x).transpose(-1, -2)
        return torch.softmax(s, -1) @ self.v(x)


class Boom(nn.Module):
    """Raises inside its forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def _policy(model: nn.Module, assignment: dict[str, str]) -> Policy:
    return Policy(layers={k: LayerEntry(p) for k, p in assignment.items()}, modules=module_signatures(model))


def _hooks(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


class _Casts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.dtype != args[0].dtype:
            self.n += 1
        return out


def test_op_names_cover_methods_operators_and_in_place():
    """Torch-level functions map to the tracked base names the policy keys use."""
    assert op_name(torch.Tensor.index_add_) == ("index_add", True)
    assert op_name(torch.Tensor.__matmul__) == ("matmul", False)
    assert op_name(torch.nn.functional.softmax) == ("softmax", False)
    assert op_name(torch.Tensor.view) is None


def test_layer_dtypes_follow_policy_and_hand_back_input_dtype():
    """Each region computes in its precision and hands back FP32, so functional ops and hooks see one dtype."""
    torch.manual_seed(0)
    model = Attn()
    seen = {}
    for name in ("q", "k", "v"):
        getattr(model, name).register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o))
    policy = _policy(model, {"q": "bf16", "k": "fp32", "v": "bf16", "::matmul": "bf16", "::softmax": "fp32"})
    x = torch.randn(2, 4, 16)
    with policy.autocast(model):
        out = model(x)
    assert out.dtype == torch.float32
    # the region runs inside the module's forward: its hooks see the output handed back in FP32
    assert {k: v.dtype for k, v in seen.items()} == dict.fromkeys("qkv", torch.float32)
    with torch.no_grad():
        q16 = nn.functional.linear(x.bfloat16(), model.q.weight.bfloat16(), model.q.bias.bfloat16())
        assert torch.equal(seen["q"], q16.float())
        assert torch.equal(seen["k"], model.k(x))


def test_remove_restores_classes_exactly():
    """apply() swaps the classes of the layers it runs; remove() restores them and is idempotent."""
    model = Attn()
    before = [type(m) for m in model.modules()]
    handle = _policy(model, {"q": "bf16", "::softmax": "fp32"}).apply(model)
    assert type(model.q) is not nn.Linear and isinstance(model.q, nn.Linear)
    assert type(model.q).__name__ == "Linear"
    handle.remove()
    handle.remove()
    assert [type(m) for m in model.modules()] == before
    assert not any("_autoprec_spec" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("use_context", [True, False], ids=["context", "handle"])
def test_autocast_state_clean_after_exception_inside_module(use_context):
    """An exception inside a module leaves no autocast region or function mode open."""
    model = nn.Sequential(nn.Linear(4, 4), Boom())
    policy = _policy(model, {"0": "bf16", "1": "bf16"})
    if use_context:
        with pytest.raises(RuntimeError, match="boom"):
            with policy.autocast(model):
                model(torch.ones(1, 4))
    else:
        handle = policy.apply(model)
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.ones(1, 4))
        handle.remove()
    assert not torch.is_autocast_enabled("cpu")
    assert torch._C._is_torch_function_mode_enabled() is False
    # the model still runs normally afterwards
    assert nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.float32


def test_policy_layers_override_outer_autocast():
    """Inside a user's torch.autocast, FP32 layers stay FP32 and code outside layers follows the outer autocast."""
    torch.manual_seed(0)
    model = Attn()
    policy = _policy(model, {"q": "fp32", "k": "fp32", "v": "fp32", "::matmul": "fp32", "::softmax": "fp32",
                             "::matmul_1": "fp32"})
    x = torch.randn(2, 4, 16)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blanket = model(x)
        with policy.autocast(model):
            tuned = model(x)
        inner_state = torch.is_autocast_enabled("cpu")
    assert blanket.dtype == torch.bfloat16
    assert inner_state  # leaving the policy restored the outer autocast
    torch.testing.assert_close(tuned.float(), ref, rtol=1e-5, atol=1e-5)


def test_in_place_functional_op_in_region_writes_back():
    """An in-place accumulation run in a region writes its result into the caller's tensor."""

    class Agg(nn.Module):
        def forward(self, x, index):
            out = torch.zeros(3, x.shape[1])
            out.index_add_(0, index, x)
            return out

    model = nn.Sequential()
    agg = Agg()
    x = torch.randn(6, 4)
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    ref = agg(x, index)
    regions = Runtime(agg, {"::index_add": "bf16"}, units=[], device_type="cpu").install()
    try:
        got = agg(x, index)
    finally:
        regions.remove()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    assert not torch.equal(got, ref)  # it really ran in BF16
    del model


@pytest.mark.parametrize("shape", [(8, 16, 16), (3, 64, 32)], ids=["small", "wide"])
def test_fp16_emulation_matches_real_fp16_autocast(shape):
    """Emulated FP16 (FP16 operands, FP32 accumulation) matches real CPU FP16 autocast on small cases."""
    torch.manual_seed(0)
    n, k, m = shape
    lin = nn.Linear(k, m)
    x = torch.randn(n, k, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        real = lin(x)
    real.float().sum().backward()
    real_grad = x.grad.clone()
    x.grad = None
    regions = Runtime(lin, {"": "fp16"}, units=unit_modules(lin), device_type="cpu", emulate_fp16=True).install()
    try:
        emu = lin(x)
    finally:
        regions.remove()
    emu.sum().backward()
    assert real.dtype == torch.float16
    assert emu.dtype == torch.float32  # handed back in the input's dtype
    # identical up to one FP16 rounding of the result
    torch.testing.assert_close(emu, real.float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(x.grad, real_grad, rtol=2e-3, atol=2e-3)


def test_apply_rejects_a_device_it_cannot_run():
    """A model on an unsupported device type is a FormatError, not a silent fallback."""
    model = nn.Linear(2, 2).to("meta")
    policy = Policy(layers={"": LayerEntry("bf16")})
    with pytest.raises(autoprec.FormatError, match="meta"):
        policy.apply(model)


def test_fp32_op_entries_skip_the_function_mode_unless_an_outer_autocast_runs():
    """FP32 op entries cost no per-call Python work in plain FP32, but still hold under a caller's autocast."""
    torch.manual_seed(0)
    model = Attn()
    policy = _policy(model, {"q": "bf16", "::matmul": "fp32", "::softmax": "fp32", "::matmul_1": "fp32"})
    seen = []
    model.v.register_forward_hook(lambda m, a, o: seen.append(torch._C._is_torch_function_mode_enabled()))
    with policy.autocast(model):
        model(torch.randn(2, 4, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(2, 4, 16))
    assert seen == [False, True]


def test_hand_written_fp16_policy_still_gets_a_grad_scaler():
    """A policy with FP16 layers but no tuned scaler settings gets torch's default GradScaler, never None."""
    scaler = Policy(layers={"0": LayerEntry("fp16")}).grad_scaler()
    assert scaler is not None and scaler.get_scale() == 2.0 ** 16
    assert Policy(layers={"0": LayerEntry("bf16")}).grad_scaler() is None


def test_fp32_regions_act_only_where_they_change_something():
    """In a plain FP32 forward an FP32 entry casts nothing; it still lifts 16-bit inputs and undoes autocast."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    policy = _policy(model, {"0": "fp32", "2": "fp32"})
    x = torch.randn(2, 8)
    with policy.autocast(model):
        with _Casts() as casts:
            assert model(x).dtype == torch.float32
        assert casts.n == 0
        # a 16-bit input (the caller's own cast) is lifted to FP32 and handed back in its dtype
        low = x.bfloat16()
        out = model(low)
        assert out.dtype == torch.bfloat16
        with torch.no_grad():
            h = torch.relu(nn.functional.linear(low.float(), model[0].weight, model[0].bias).bfloat16())
            assert torch.equal(out, nn.functional.linear(h.float(), model[2].weight, model[2].bias).bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == torch.float32
            assert torch.equal(model(x), model[2](model[1](model[0](x))))


class Flow(nn.Module):
    """a -> views -> b; c -> flip (own code an output cannot follow) -> relu -> d; d's output leaves the model."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x).view(2, 4, 8).transpose(0, 1).reshape(-1, 8))
        return self.d(torch.relu(torch.flip(self.c(y), [0])))


class Residual(nn.Module):
    """b's and c's outputs reach d through elementwise code (relu, a residual add) only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.d(torch.relu(self.c(self.b(h))) + h)


def test_trace_follows_outputs_through_elementwise_code():
    """Elementwise code (activations, residual adds) passes a layer's output on: it follows the format."""
    from autoprec.trace import trace

    torch.manual_seed(0)
    tr = trace(Residual(), torch.randn(8, 8), device_type="cpu")
    assert tr.handoff == {"a": ("b", "d"), "b": ("c",), "c": ("d",)}


def test_outputs_through_a_residual_add_save_casts():
    """A 16-bit output handed into a residual add with an FP32 stream: fewer casts than handing it back."""
    import dataclasses

    from autoprec.trace import trace

    torch.manual_seed(0)
    model, x = Residual(), torch.randn(8, 8)
    tr = trace(model, x, device_type="cpu")
    policy = Policy(layers={"a": LayerEntry("fp32"), "b": LayerEntry("bf16"), "c": LayerEntry("bf16"),
                            "d": LayerEntry("bf16")}, modules=module_signatures(model), handoff=tr.handoff)
    outs = {}
    for name, p in (("handoff", policy), ("plain", dataclasses.replace(policy, handoff={}))):
        with p.autocast(model), _Casts() as casts:
            outs[name] = (model(x), casts.n)
    assert outs["handoff"][1] < outs["plain"][1]
    assert outs["handoff"][0].dtype == torch.float32
    torch.testing.assert_close(outs["handoff"][0], outs["plain"][0], rtol=2e-2, atol=2e-2)


def test_trace_hands_off_only_outputs_that_flow_into_layers():
    """The trace follows each layer's output through views into layers; other code or the model output stops it."""
    from autoprec.trace import trace

    torch.manual_seed(0)
    tr = trace(Flow(), torch.randn(8, 8), device_type="cpu")
    assert tr.handoff == {"a": ("b",), "b": ("c",)}


def test_handoff_saves_casts_with_identical_forward_values():
    """A 16-bit output handed straight to the next layers saves casts; the loss is bit-identical, gradients
    agree to BF16 rounding (a tensor feeding several layers sums their gradients in its own dtype)."""
    import dataclasses

    from autoprec.trace import trace
    from tests.models import transformer_block

    model, batch, loss_fn = transformer_block()
    handoff = trace(model, batch, device_type="cpu").handoff
    assert handoff["attn.q"] == ("attn::scaled_dot_product_attention",)
    policy = _policy(model, {"ln1": "fp32", "attn.q": "bf16", "attn.k": "bf16", "attn.v": "bf16",
                             "attn::scaled_dot_product_attention": "bf16", "attn.out": "bf16", "ln2": "fp32",
                             "mlp.fc1": "bf16", "mlp.fc2": "bf16"})
    policy = dataclasses.replace(policy, handoff=handoff)
    results = {}
    for name, p in (("handoff", policy), ("plain", dataclasses.replace(policy, handoff={}))):
        model.zero_grad()
        with p.autocast(model), _Casts() as casts:
            out = model(batch)
            loss = loss_fn(out, batch)
            loss.backward()
        results[name] = (out.dtype, loss.detach(), [q.grad.clone() for q in model.parameters()], casts.n)
    (dt_h, loss_h, grads_h, n_h), (dt_p, loss_p, grads_p, n_p) = results["handoff"], results["plain"]
    assert dt_h == dt_p == torch.float32
    assert torch.equal(loss_h, loss_p)
    for gh, gp in zip(grads_h, grads_p):
        torch.testing.assert_close(gh, gp, rtol=2e-2, atol=1e-4)
    assert n_h < n_p
    with torch.no_grad(), policy.autocast(model), _Casts() as casts:  # inference: no handoff
        model(batch)
    with torch.no_grad(), dataclasses.replace(policy, handoff={}).autocast(model), _Casts() as plain:
        model(batch)
    assert casts.n == plain.n


def test_fp32_layer_fed_a_16bit_output_still_hands_back_fp32():
    """A layer kept in FP32 that receives a handed-off BF16 tensor computes in FP32 and gives FP32 onwards."""
    torch.manual_seed(0)
    model = Flow()
    policy = Policy(layers={"a": LayerEntry("bf16"), "b": LayerEntry("fp32"), "c": LayerEntry("bf16"),
                            "d": LayerEntry("bf16")}, modules=module_signatures(model), handoff={"a": ("b",)})
    seen = {}
    model.b.register_forward_pre_hook(lambda m, a: seen.__setitem__("b in", a[0]))
    model.b.register_forward_hook(lambda m, a, o: seen.__setitem__("b out", o))
    model.a.register_forward_hook(lambda m, a, o: seen.__setitem__("a out", o.dtype))
    with policy.autocast(model):
        assert model(torch.randn(8, 8, requires_grad=True)).dtype == torch.float32
    assert seen["a out"] == torch.bfloat16 and seen["b in"].dtype == torch.bfloat16
    assert seen["b out"].dtype == torch.float32
    with torch.no_grad():  # b computed in FP32 from the handed BF16 values
        assert torch.equal(seen["b out"], model.b(seen["b in"].float()))


class _SoftmaxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.ln = nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(torch.softmax(torch.relu(self.lin(x)), -1))


def test_fp32_op_entry_lifts_16bit_inputs_without_an_outer_autocast():
    """An FP32 op entry fed 16-bit activations (FSDP2 param_dtype, a cast input) computes in FP32."""
    torch.manual_seed(0)
    model = _SoftmaxNet()
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    policy = _policy(model, {"lin": "bf16", "::softmax": "fp32", "ln": "fp32"})
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "softmax":
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with policy.autocast(model), Spy():
        model(x)
    assert seen == [torch.float32]


def test_fp32_layer_with_16bit_weights_names_the_fix():
    """An FP32 layer whose weights are 16-bit (a cast model, FSDP2 param_dtype) is a PolicyError naming fsdp_plan."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    policy = _policy(model, {"0": "bf16", "1": "fp32"})
    model[1].to(torch.bfloat16)
    with policy.autocast(model), pytest.raises(autoprec.PolicyError, match=r"layer '1' is FP32.*fsdp_plan"):
        model(torch.randn(2, 4))
