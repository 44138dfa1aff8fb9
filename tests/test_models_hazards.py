"""Prove that the hazards built into ``tests/models.py`` are real under blanket CPU autocast.

On CPU, autocast only casts matmul/conv/linear-type ops to the low-precision dtype;
softmax, pow, index_put_ etc. then run in whatever dtype arrives, which is how FP16 /
BF16 values reach them under blanket autocast.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from tests.models import (
    FACTORIES,
    FP16_MAX,
    SAFE_FACTORIES,
    call_model,
    rmsnorm_model,
    rotary_model,
    scatter_gnn,
    underflow_model,
    underflow_optimizer,
    unscaled_attention,
)

FP16, BF16 = torch.float16, torch.bfloat16


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _to_fp32(obj):
    if torch.is_tensor(obj) and obj.is_floating_point():
        return obj.float()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_fp32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_fp32(v) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def fp32_island(*modules):
    """Run the given submodules in FP32 (autocast off, float inputs) inside a blanket autocast."""
    for module in modules:
        orig = module.forward

        def forward(*args, _orig=orig, **kwargs):
            with torch.autocast("cpu", enabled=False):
                return _orig(*_to_fp32(args), **_to_fp32(kwargs))

        module.forward = forward
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def run(spec, dtype=None, islands=()):
    """Forward + backward of ``(model, batch, loss_fn)``; autocast to ``dtype`` if given.

    Returns ``(output, loss, flat_grad, model)``; all float64 except the output.
    """
    model, batch, loss_fn = spec
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or BF16, enabled=dtype is not None):
        with fp32_island(*[model.get_submodule(name) for name in islands]):
            out = call_model(model, batch)
    loss = out if loss_fn is None else loss_fn(out, batch)
    loss.backward()
    grad = torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
        for p in model.parameters()
    ])
    return out.detach(), loss.detach().double(), grad, model


def rel_err(x, ref):
    """Relative L2 error; inf when ``x`` is not finite."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - ref).norm() / ref.norm()).item()


def compare(factory, dtype, islands=(), **kwargs):
    """Loss / grad / output relative errors of blanket ``dtype`` autocast vs FP32."""
    out32, loss32, grad32, _ = run(factory(**kwargs))
    out, loss, grad, _ = run(factory(**kwargs), dtype, islands)
    return {
        "loss": rel_err(loss, loss32),
        "grad": rel_err(grad, grad32),
        "out": rel_err(out, out32),
        "finite": bool(torch.isfinite(loss) and torch.isfinite(grad).all()),
    }


# ---------------------------------------------------------------------------
# all models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FACTORIES), ids=list(FACTORIES))
def test_fp32_reference_is_finite_and_has_gradients(name):
    """In FP32 every model gives a finite loss and finite, non-zero gradients for every parameter."""
    _, loss, _, model = run(FACTORIES[name]())
    assert loss.dim() == 0 and torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().max() > 0, pname


@pytest.mark.parametrize("name", list(FACTORIES), ids=list(FACTORIES))
def test_factories_are_deterministic_and_leave_global_rng_alone(name):
    """Same seed gives identical weights and batch, another seed differs, and the global RNG is untouched."""
    state = torch.get_rng_state()
    m0, b0, _ = FACTORIES[name](seed=0)
    m0b, b0b, _ = FACTORIES[name](seed=0)
    m1, _, _ = FACTORIES[name](seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    s0, s0b, s1 = m0.state_dict(), m0b.state_dict(), m1.state_dict()
    assert all(torch.equal(s0[k], s0b[k]) for k in s0)
    assert not all(torch.equal(s0[k], s1[k]) for k in s0)
    leaves = lambda b: list(b.values()) if isinstance(b, dict) else list(b) if isinstance(b, tuple) else [b]
    assert all(torch.equal(x, y) for x, y in zip(leaves(b0), leaves(b0b)))


@pytest.mark.parametrize("name", list(SAFE_FACTORIES), ids=list(SAFE_FACTORIES))
def test_safe_model_blanket_bf16_is_close_to_fp32(name):
    """Blanket BF16 autocast on a safe model gives a tiny loss error and a small gradient error."""
    err = compare(SAFE_FACTORIES[name], BF16)
    assert err["finite"]
    assert err["loss"] < 1e-3, err
    assert err["grad"] < 0.1, err


# ---------------------------------------------------------------------------
# 1. scatter GNN
# ---------------------------------------------------------------------------


def _hub_sums(spec, dtype=None):
    """Raw (pre 1/sqrt(deg)) neighbourhood sums of the hub node in conv1 and conv2."""
    model, batch, _ = spec
    deg0 = (batch[1][1] == 0).sum().double()
    caps = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: caps.__setitem__(n, o[0].detach()))
        for n in ("conv1", "conv2")
    ]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or BF16, enabled=dtype is not None):
            call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: caps[n].double() * deg0.sqrt() for n in ("conv1", "conv2")}, int(deg0)


def test_scatter_gnn_hub_sum_exceeds_fp16_max_in_fp32():
    """In FP32 the hub has thousands of in-edges and its neighbourhood sums exceed 65504 in both layers."""
    sums, deg0 = _hub_sums(scatter_gnn())
    assert deg0 >= 5000
    for name, s in sums.items():
        assert s.max() > FP16_MAX, name


@pytest.mark.parametrize("aggr", ["index_put", "index_add", "scatter_add"],
                         ids=["index_put", "index_add", "scatter_add"])
def test_scatter_gnn_blanket_fp16_overflows(aggr):
    """Blanket FP16: the hub's FP16 aggregation overflows to inf and loss/gradients become non-finite."""
    sums, _ = _hub_sums(scatter_gnn(aggr=aggr), FP16)
    assert torch.isinf(sums["conv1"]).any()
    err = compare(scatter_gnn, FP16, aggr=aggr)
    assert not err["finite"]


def test_scatter_gnn_blanket_bf16_accumulation_loses_hub_sum():
    """Blanket BF16: the hub's running index_put_ sum stagnates, giving large loss and gradient errors."""
    sums32, _ = _hub_sums(scatter_gnn())
    sums16, _ = _hub_sums(scatter_gnn(), BF16)
    for name in ("conv1", "conv2"):
        assert rel_err(sums16[name], sums32[name]) > 0.5, name
    err = compare(scatter_gnn, BF16)
    assert err["finite"]
    assert err["loss"] > 0.2 and err["grad"] > 0.2, err


def test_scatter_gnn_index_add_accumulates_in_fp32_on_cpu():
    """On CPU index_add_/scatter_add_ accumulate in FP32 internally, so only index_put_ shows the BF16 hazard."""
    for aggr in ("index_add", "scatter_add"):
        err = compare(scatter_gnn, BF16, aggr=aggr)
        assert err["loss"] < 0.02 and err["grad"] < 0.05, (aggr, err)


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_scatter_gnn_fp32_message_passing_fixes_it(dtype):
    """Running conv1/conv2 (the aggregating modules) in FP32 inside blanket autocast removes the hazard."""
    err = compare(scatter_gnn, dtype, islands=("conv1", "conv2"))
    assert err["finite"]
    assert err["loss"] < 0.02 and err["grad"] < 0.05, err


# ---------------------------------------------------------------------------
# 2. RMSNorm
# ---------------------------------------------------------------------------


def test_rmsnorm_activations_square_past_fp16_max():
    """The activations entering the RMSNorm have |x| > 256, so x**2 exceeds 65504."""
    model, x, _ = rmsnorm_model()
    with torch.no_grad():
        h = model.fc1(x)
    assert h.abs().max() > 256
    assert (h.pow(2) > FP16_MAX).float().mean() > 0.3


def test_rmsnorm_blanket_fp16_breaks():
    """Blanket FP16: x.pow(2) overflows in the hand-written RMSNorm, the norm collapses, errors are huge."""
    model, x, _ = rmsnorm_model()
    with torch.no_grad(), torch.autocast("cpu", dtype=FP16):
        h = model.fc1(x)
        assert h.dtype == FP16 and torch.isinf(h.pow(2)).any()
    err = compare(rmsnorm_model, FP16)
    assert (not err["finite"]) or (err["loss"] > 0.1 and err["grad"] > 0.5), err


def test_rmsnorm_blanket_bf16_is_fine():
    """Blanket BF16 has the range for x**2, so the RMSNorm model stays close to FP32."""
    err = compare(rmsnorm_model, BF16)
    assert err["finite"] and err["loss"] < 1e-2 and err["grad"] < 0.05, err


def test_rmsnorm_fp32_norm_fixes_fp16():
    """Keeping only the `norm` module in FP32 makes blanket FP16 close to FP32."""
    err = compare(rmsnorm_model, FP16, islands=("norm",))
    assert err["finite"] and err["loss"] < 1e-2 and err["grad"] < 0.05, err


# ---------------------------------------------------------------------------
# 3. Unscaled attention
# ---------------------------------------------------------------------------


def test_unscaled_attention_scores_exceed_fp16_max_in_fp32():
    """In FP32 some unscaled attention scores exceed 65504 while ordinary-token scores stay moderate."""
    model, x, _ = unscaled_attention()
    attn = model.attn
    b, t, d = x.shape
    with torch.no_grad():
        q = attn.q(x).view(b, t, attn.heads, -1).transpose(1, 2)
        k = attn.k(x).view(b, t, attn.heads, -1).transpose(1, 2)
        scores = q @ k.transpose(-2, -1)
    assert scores.abs().max() > FP16_MAX
    # ordinary queries whose score against the sink key overflows +65504 (these rows turn NaN in FP16)
    assert (scores[..., 1:, 0] > FP16_MAX).sum() >= 4
    assert scores[..., 1:, 1:].abs().max() < 1000  # ordinary tokens: softmax not saturated


def test_unscaled_attention_blanket_fp16_gives_nan():
    """Blanket FP16: scores overflow to inf and softmax returns NaN."""
    out, loss, grad, _ = run(unscaled_attention(), FP16)
    assert torch.isnan(out).any(-1).float().mean() > 0.1  # >10% of token rows are NaN
    assert not torch.isfinite(loss)


def test_unscaled_attention_blanket_bf16_is_fine():
    """Blanket BF16 has the range for the large scores and stays close to FP32."""
    err = compare(unscaled_attention, BF16)
    assert err["finite"] and err["loss"] < 1e-2 and err["grad"] < 0.05, err


# ---------------------------------------------------------------------------
# 4. Rotary embedding
# ---------------------------------------------------------------------------


def test_rotary_positions_not_representable_in_bf16():
    """Integer positions above 256 are not exact in BF16 but are exact in FP16 up to 2048."""
    _, batch, _ = rotary_model()
    pos = batch["positions"].float()
    assert len(pos) >= 2048
    assert torch.equal(pos.half().float(), pos)
    assert not torch.equal(pos.bfloat16().float(), pos)


def test_rotary_bf16_error_large_fp16_error_small():
    """Blanket BF16 ruins the rotary angles (large output/loss error); blanket FP16 stays close to FP32."""
    e16 = compare(rotary_model, FP16)
    e_bf = compare(rotary_model, BF16)
    assert e16["finite"] and e_bf["finite"]
    assert e16["out"] < 0.01 and e_bf["out"] > 0.05, (e16, e_bf)
    assert e16["loss"] < 0.001 and e_bf["loss"] > 0.003, (e16, e_bf)
    assert e_bf["grad"] > 3 * e16["grad"], (e16, e_bf)


def test_rotary_fp32_rope_fixes_bf16():
    """Keeping only the `rope` module in FP32 brings blanket BF16 back to ordinary BF16 error."""
    err = compare(rotary_model, BF16, islands=("rope",))
    assert err["out"] < 0.01 and err["loss"] < 0.005, err


# ---------------------------------------------------------------------------
# 5. Gradient underflow
# ---------------------------------------------------------------------------


def _train(dtype=None, init_scale=2.0 ** 16, steps=20):
    model, batch, loss_fn = underflow_model()
    assert loss_fn is None
    opt = underflow_optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    losses, first_grads = [], None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype or FP16, enabled=dtype is not None):
            loss = call_model(model, batch)
        losses.append(loss.item())
        if dtype is None:
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grads = [p.grad.clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
        first_grads = first_grads or grads
    return losses, first_grads, scaler


def test_underflow_fp32_trains():
    """FP32 with the recommended optimizer clearly reduces the (tiny) loss within 20 steps."""
    losses, grads, _ = _train(None)
    assert all(g.abs().max() > 0 for g in grads)
    assert losses[-1] < 0.5 * losses[0]


def test_underflow_fp16_default_gradscaler_does_not_train():
    """Blanket FP16 + GradScaler defaults: every gradient underflows to zero and the loss never moves."""
    losses, grads, scaler = _train(FP16)
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert scaler.get_scale() == 2.0 ** 16  # no inf seen, so the scale never backs off (nor grows in 20 steps)
    assert losses[-1] == losses[0]


def test_underflow_fp16_with_huge_loss_scale_trains():
    """The failure is pure underflow: FP16 with GradScaler(init_scale=2**40) gets gradients and trains."""
    losses, grads, _ = _train(FP16, init_scale=2.0 ** 40)
    assert all(g.abs().max() > 0 for g in grads)
    assert losses[-1] < 0.5 * losses[0]
