"""FP8 layers at run time (``apply`` with ``"fp8"`` entries): values are torchao's ``Float8Linear`` on the BF16 input
bit for bit, gradients reach the FP32 masters, ``remove`` restores, ``torch.compile`` adds no graph break,
activation checkpointing recomputes the same values, and a policy that names a non-Linear, a bad recipe or a
missing torchao says so."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import autoprec
from autoprec import FormatError, PolicyError
from autoprec.core import module_signatures


@pytest.fixture
def torchao():
    return pytest.importorskip("torchao")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))


def policy_for(model: nn.Module, entries: dict[str, tuple[str, str]], target: str = "cpu") -> autoprec.Policy:
    layers = {k: autoprec.LayerEntry(p, recipe=r) for k, (p, r) in entries.items()}
    return autoprec.Policy(layers=layers, target=target, modules=module_signatures(model), formats=("bf16", "fp8"))


def reference(model: nn.Sequential, x: torch.Tensor, recipe: str) -> torch.Tensor:
    """The same computation by hand: layer 2 torchao's Float8Linear on the BF16 input, the rest BF16 autocast."""
    from autoprec.core._fp8 import config, float8

    fp8 = float8()[1].from_float(model[2], config=config(recipe, x.device))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[1](model[0](x))
        with torch.autocast("cpu", enabled=False):
            h = fp8(h.to(torch.bfloat16))
        return model[4](model[3](h)).float()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_an_fp8_layer_computes_what_torchao_computes(torchao, recipe):
    """Values and FP32 master gradients equal the hand-written BF16 + Float8Linear step, bit for bit."""
    model, x = mlp(), torch.randn(8, 32)
    policy = policy_for(model, {"0": ("bf16", ""), "2": ("fp8", recipe), "4": ("bf16", "")})
    want = reference(model, x, recipe)
    want.square().mean().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    handle = policy.apply(model)
    try:
        got = model(x)
        got.float().square().mean().backward()
    finally:
        handle.remove()
    assert torch.equal(got.float(), want)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), want_grads))
    assert type(model[2]) is nn.Linear and model(x).dtype == torch.float32


def test_fp8_differs_from_bf16_and_remove_restores(torchao):
    """The FP8 layer really runs in FP8 (its output differs from the BF16 policy's), and after ``remove`` the
    model computes its FP32 values again."""
    model, x = mlp(), torch.randn(8, 32)
    fp32 = model(x)
    outs = {}
    for name, entry in {"bf16": ("bf16", ""), "fp8": ("fp8", "tensorwise")}.items():
        with policy_for(model, {"2": entry}).autocast(model):
            outs[name] = model(x)
    assert not torch.equal(outs["bf16"], outs["fp8"])
    assert torch.equal(model(x), fp32)


def test_training_with_fp8_layers_tracks_fp32(torchao):
    """Thirty SGD steps towards a teacher with every Linear in FP8: the loss falls as FP32's does (within 5% of
    FP32's at every step), the parameters stay FP32."""
    model, x = mlp(), torch.randn(64, 32)
    with torch.no_grad():
        y = nn.Linear(32, 16)(x)
    policy = policy_for(model, {k: ("fp8", "tensorwise") for k in ("0", "2", "4")})
    start = {k: v.clone() for k, v in model.state_dict().items()}
    curves = []
    for run in ("fp32", "fp8"):
        model.load_state_dict(start)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        handle = policy.apply(model) if run == "fp8" else None
        losses = []
        try:
            for _ in range(30):
                opt.zero_grad()
                loss = (model(x).float() - y).square().mean()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        finally:
            if handle is not None:
                handle.remove()
        curves.append(losses)
    fp32, fp8 = curves
    assert fp8[-1] < 0.5 * fp8[0], fp8
    assert all(abs(a - b) <= 0.05 * a for a, b in zip(fp32, fp8)), (fp32, fp8)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _breaks(model: nn.Module, x: torch.Tensor) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(x).graph_break_count


def test_compile_adds_no_graph_break_and_matches_eager(torchao):
    """Under ``torch.compile`` an fp8 policy breaks the graph no more than the same policy in BF16 (none), and the
    compiled step (aot_eager, fullgraph) gives eager's values and gradients."""
    model, x = mlp(), torch.randn(8, 32)
    bf16 = policy_for(model, {k: ("bf16", "") for k in ("0", "2", "4")})
    fp8 = policy_for(model, {"0": ("bf16", ""), "2": ("fp8", "tensorwise"), "4": ("fp8", "rowwise")})
    counts = {}
    for name, policy in {"bf16": bf16, "fp8": fp8}.items():
        with policy.autocast(model):
            counts[name] = _breaks(model, x)
    assert counts == {"bf16": 0, "fp8": 0}
    handle = fp8.apply(model)
    try:
        eager = model(x)
        eager.float().sum().backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        got.float().sum().backward()
    finally:
        handle.remove()
    assert torch.equal(got, eager)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), want))


def test_activation_checkpointing_recomputes_in_fp8(torchao):
    """A checkpointed block with an fp8 layer gives the gradients of the same block run without checkpointing."""
    model, x = mlp(), torch.randn(8, 32, requires_grad=True)
    policy = policy_for(model, {"0": ("bf16", ""), "2": ("fp8", "rowwise"), "4": ("bf16", "")})
    grads = []
    handle = policy.apply(model)
    try:
        for ckpt in (False, True):
            model.zero_grad(set_to_none=True)
            x.grad = None
            out = checkpoint(model, x, use_reentrant=False) if ckpt else model(x)
            out.float().square().mean().backward()
            grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters()])
    finally:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_fp8_on_a_layer_that_is_no_linear_is_refused(torchao):
    """The message names the layer, what it is and the fix."""
    model = mlp()
    policy = policy_for(model, {"1": ("fp8", "tensorwise")})
    with pytest.raises(PolicyError, match=r"layer '1' is fp8 in the policy, but here it is a GELU: FP8 runs the "
                                          r"GEMMs of an nn.Linear; make the layer bf16 in the policy"):
        policy.apply(model)
    assert type(model[1]) is nn.GELU and model(torch.randn(2, 32)).dtype == torch.float32


def test_applying_fp8_without_torchao_names_the_extra(monkeypatch):
    """Without torchao, ``apply`` raises FormatError naming ``autoprec[fp8]`` and leaves the model alone."""
    for name in ["torchao", "torchao.float8", "torchao.float8.float8_linear"]:
        monkeypatch.setitem(sys.modules, name, None)
    model = mlp()
    policy = policy_for(model, {"2": ("fp8", "tensorwise")})
    with pytest.raises(FormatError, match=r"FP8 needs torchao, which is not installed: pip install 'autoprec\[fp8\]'"):
        policy.apply(model)
    x = torch.randn(2, 32)
    assert type(model[2]) is nn.Linear and model(x).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 GEMMs (sm89+)")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_on_an_fp8_gpu_the_layer_runs_torchaos_native_fp8_gemms(torchao, recipe):
    """On an sm89+ GPU the FP8 layer is not emulated: its output and FP32 master gradients are those of torchao's
    native Float8Linear on the BF16 input, bit for bit."""
    from autoprec.core._fp8 import config, float8

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(256, 512)).cuda(), torch.randn(1024, 256, device="cuda")
    cfg = config(recipe, x.device)
    assert not cfg.emulate
    handle = policy_for(model, {"0": ("fp8", recipe)}, target="cuda").apply(model)
    try:
        got = model(x)
        got.square().mean().backward()
    finally:
        handle.remove()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    want = float8()[1].from_float(model[0], config=cfg)(x.to(torch.bfloat16)).float()
    want.square().mean().backward()
    assert torch.equal(got, want)
    assert all(torch.equal(a, p.grad) for a, p in zip(got_grads, model.parameters()))
