"""Stage 1 on its own: ``autoprec.trace.trace`` on small real models gives the documented layers (leaf module paths,
``module::op`` for functional ops in a module's own code, ordinals for repeats), op kinds, forward FLOPs equal to
hand-computed ones, the hazards each hazard model of ``tests/models.py`` is built around, the handoff flows, what
FX could not capture (opaque), and leaves the model as it found it.

Tuning models FX cannot capture is in ``test_untraceable.py``; FLOPs outside every layer (``unseen``) and the
kernels torch's FLOP registry lacks are in ``test_coverage.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprec.trace import Trace, trace
from tests import models as TM

pytestmark = pytest.mark.usefixtures("one_thread")


def _traced(model: nn.Module, batch) -> Trace:
    return trace(model, batch, device_type="cpu")


def _by_key(tr: Trace) -> dict:
    return {lay.key: lay for lay in tr.layers}


# -- layer keys, op kinds and FLOPs -------------------------------------------------------------------------------
def test_mlp_layers_are_its_linears_with_2_b_in_out_flops():
    """Three Linears: leaf paths as keys, op ``Linear``, FLOPs 2*B*in*out each, shapes and sizes as run; the GELUs
    in the root's own code are no layers (they follow the format that arrives), so each Linear hands off to the next."""
    b = 8
    model, x, _ = TM.mlp(batch_size=b)
    tr = _traced(model, x)
    assert [lay.key for lay in tr.layers] == ["fc1", "fc2", "fc3"]
    dims = {"fc1": (128, 256), "fc2": (256, 256), "fc3": (256, 10)}
    for lay in tr.layers:
        i, o = dims[lay.key]
        assert (lay.kind, lay.op, lay.ops, lay.hazards, lay.calls, lay.opaque) == \
            ("module", "Linear", ("linear",), (), 1, False)
        assert lay.flops == 2 * b * i * o, lay
        assert (lay.in_shapes, lay.out_shapes) == (((b, i),), ((b, o),))
        assert (lay.in_numel, lay.out_numel, lay.param_numel) == (b * i, b * o, i * o + o)
    assert tr.flops_total == 2 * b * (128 * 256 + 256 * 256 + 256 * 10)
    assert tr.units == ("fc1", "fc2", "fc3")
    assert tr.handoff == {"fc1": ("fc2",), "fc2": ("fc3",)}  # fc3's output is the model's: it escapes
    assert (tr.opaque, tr.unseen, tr.tied, tr.fx_route) == ({}, {}, (), "torch.export")
    assert len(tr.fingerprint) == 16


def test_cnn_conv_flops_and_the_roots_own_pooling_op():
    """Conv2d FLOPs are 2*B*Cout*Hout*Wout*Cin*k*k (stride 2 quarters the output); BatchNorm is a ``variance/norm``
    layer; the pooling in the root's own code is the op layer ``::adaptive_avg_pool2d`` (a ``long reduction``)."""
    b = 2
    model, x, _ = TM.cnn(batch_size=b)
    tr = _traced(model, x)
    layers = _by_key(tr)
    assert list(layers) == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "::adaptive_avg_pool2d", "fc"]
    assert layers["conv1"].flops == 2 * b * 32 * 16 * 16 * 3 * 3 * 3
    assert layers["conv2"].flops == 2 * b * 64 * 8 * 8 * 32 * 3 * 3
    assert layers["conv3"].flops == 2 * b * 64 * 8 * 8 * 64 * 3 * 3
    assert layers["conv2"].out_shapes == ((b, 64, 8, 8),)
    assert layers["fc"].flops == 2 * b * 64 * 10
    assert all(layers[k].flops == 0 for k in ("bn1", "bn2", "bn3", "::adaptive_avg_pool2d"))
    assert (layers["conv1"].op, layers["conv1"].ops, layers["conv1"].hazards) == ("Conv2d", ("conv2d",), ())
    assert (layers["bn1"].op, layers["bn1"].hazards) == ("BatchNorm2d", ("variance/norm",))
    pool = layers["::adaptive_avg_pool2d"]
    assert (pool.kind, pool.op, pool.ops, pool.hazards, pool.param_numel) == \
        ("op", "adaptive_avg_pool2d", ("adaptive_avg_pool2d",), ("long reduction",), 0)
    assert (pool.in_shapes, pool.out_shapes) == (((b, 64, 8, 8),), ((b, 64, 1, 1),))
    assert tr.handoff == {"conv1": ("bn1",), "bn1": ("conv2",), "conv2": ("bn2",), "bn2": ("conv3",),
                          "conv3": ("bn3",), "bn3": ("::adaptive_avg_pool2d",), "::adaptive_avg_pool2d": ("fc",)}


def test_transformer_block_attention_is_an_op_layer_of_its_module():
    """SDPA in ``SelfAttention``'s own code is ``attn::scaled_dot_product_attention`` (two matmuls: 4*B*H*T*T*d
    FLOPs); the residual adds are no layers, so what feeds the residual stream (attn.out, mlp.fc2) hands off nothing."""
    b, t, h, dim = 2, 8, 4, 128
    model, x, _ = TM.transformer_block(batch_size=b, seq_len=t)
    tr = _traced(model, x)
    layers = _by_key(tr)
    sdpa = "attn::scaled_dot_product_attention"
    assert list(layers) == ["ln1", "attn.q", "attn.k", "attn.v", sdpa, "attn.out", "ln2", "mlp.fc1", "mlp.fc2"]
    assert (layers[sdpa].kind, layers[sdpa].op, layers[sdpa].hazards) == ("op", "scaled_dot_product_attention", ())
    assert layers[sdpa].in_shapes == ((b, h, t, dim // h),) * 3
    assert layers[sdpa].flops == 2 * 2 * b * h * t * t * (dim // h)
    assert layers["mlp.fc1"].flops == 2 * b * t * dim * 512
    assert layers["ln1"].hazards == ("variance/norm",)
    assert tr.handoff == {"ln1": ("attn.k", "attn.q", "attn.v"), "attn.q": (sdpa,), "attn.k": (sdpa,),
                          "attn.v": (sdpa,), sdpa: ("attn.out",), "ln2": ("mlp.fc1",), "mlp.fc1": ("mlp.fc2",)}


def test_repeated_functional_ops_get_ordinals():
    """Two matmuls in one module's own code are ``attn::matmul`` and ``attn::matmul_1``, both of op ``matmul``."""
    model, x, _ = TM.unscaled_attention(batch_size=2, seq_len=8)
    layers = _by_key(_traced(model, x))
    assert list(layers) == ["attn.q", "attn.k", "attn.v", "attn::matmul", "attn::softmax", "attn::matmul_1", "attn.out"]
    assert layers["attn::matmul"].op == layers["attn::matmul_1"].op == "matmul"
    assert layers["attn::matmul"].flops == layers["attn::matmul_1"].flops == 2 * 2 * 2 * 8 * 8 * 32


# -- hazards ------------------------------------------------------------------------------------------------------
def test_hazard_models_name_their_hazard():
    """Each hazard model's documented hazard is on the layer that runs it: RMSNorm's ``x.pow(2)`` and mean, the
    unscaled attention's softmax, the GNN's ``index_put`` accumulation (and its degree ``rsqrt``), the rotary angles."""
    model, x, _ = TM.rmsnorm_model(batch_size=4)
    norm = _by_key(_traced(model, x))["norm"]
    assert (norm.kind, norm.op, norm.hazards) == ("module", "RMSNorm", ("exp/log/pow", "long reduction"))
    assert norm.ops == ("pow", "mean", "add", "rsqrt", "mul")

    model, x, _ = TM.unscaled_attention(batch_size=1, seq_len=4)
    hazards = {k: lay.hazards for k, lay in _by_key(_traced(model, x)).items() if lay.hazards}
    assert hazards == {"attn::softmax": ("softmax",)}

    model, batch, _ = TM.scatter_gnn(num_nodes=20, hub_fan_in=30, num_random_edges=20)
    tr = _traced(model, batch)
    hazards = {k: lay.hazards for k, lay in _by_key(tr).items() if lay.hazards}
    assert hazards == {"conv1::index_put": ("accumulation",), "conv1::rsqrt": ("exp/log/pow",),
                       "conv2::index_put": ("accumulation",), "conv2::rsqrt": ("exp/log/pow",)}
    # bincount runs on integers only: no layer
    assert not any("bincount" in lay.key for lay in tr.layers)
    assert tr.layer("conv1::index_put").in_shapes == ((20, 32), (50, 32))

    model, batch, _ = TM.rotary_model(seq_len=16)
    rope = _by_key(_traced(model, batch))["rope"]
    assert rope.hazards == ("position/trig",) and "matmul" in rope.ops
    assert rope.flops == 2 * 16 * 1 * 128  # positions (16, 1) @ inv_freq (1, 128)


def test_safe_models_have_no_matmul_hazard():
    """The safe models' hazards are only their norms and pooling: no Linear, Conv2d or attention is hazardous."""
    for factory, kwargs in ((TM.mlp, {"batch_size": 2}), (TM.cnn, {"batch_size": 2}),
                            (TM.transformer_block, {"batch_size": 1, "seq_len": 4})):
        model, x, _ = factory(**kwargs)
        for lay in _traced(model, x).layers:
            if lay.op in ("Linear", "Conv2d", "scaled_dot_product_attention"):
                assert lay.hazards == (), lay


# -- opaque code --------------------------------------------------------------------------------------------------
class _Gate(nn.Module):
    """A leaf with data-dependent control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w
        return torch.relu(y) if y.mean() > 0 else y * 0.5


class _Branch(nn.Module):
    """A non-leaf whose own code branches on a tensor and runs a softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > -1e9:
            h = torch.softmax(h, -1)
        return h


def test_opaque_leaf_is_one_layer_and_opaque_own_code_has_no_op_layers():
    """An opaque leaf is one layer (``opaque=True``, its class as its op, its matmul's FLOPs counted); an opaque
    parent's softmax is no layer while its child Linear is; both are named with torch.export's reason."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, x = nn.Sequential(nn.Linear(8, 8), _Gate(), _Branch(), nn.Linear(8, 4)), torch.randn(4, 8)
    tr = _traced(model, x)
    assert tr.fx_route == "torch.export per module"
    assert set(tr.opaque) == {"1", "2"}
    assert all("data-dependent" in why for why in tr.opaque.values()), tr.opaque
    assert [lay.key for lay in tr.layers] == ["0", "1", "2.fc", "3"]
    gate = tr.layer("1")
    assert (gate.opaque, gate.op, gate.ops, gate.flops) == (True, "_Gate", ("_Gate",), 2 * 4 * 8 * 8)
    assert not any(lay.opaque for lay in tr.layers if lay.key != "1")
    assert tr.handoff == {"0": ("1",), "1": ("2.fc",)}  # 2.fc's output goes into opaque code: it escapes
    with pytest.raises(KeyError):
        tr.layer("2::softmax")


# -- a transformers model -----------------------------------------------------------------------------------------
def test_gpt2_keys_conv1d_flops_and_tied_embedding():
    """A one-layer GPT-2: HF's Conv1D leaves count 2*B*T*in*out, attention is ``transformer.h.0.attn::
    scaled_dot_product_attention``, the tied lm_head and wte are one group, embeddings take no floating input."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg).train()
        ids = torch.randint(0, 64, (2, 8))
    tr = _traced(model, {"input_ids": ids, "use_cache": False})
    layers = _by_key(tr)
    h = "transformer.h.0."
    assert list(layers) == ["transformer.wte", "transformer.wpe", "transformer.drop", h + "ln_1", h + "attn.c_attn",
                            h + "attn::scaled_dot_product_attention", h + "attn.c_proj", h + "attn.resid_dropout",
                            h + "ln_2", h + "mlp.c_fc", h + "mlp.act", h + "mlp.c_proj", h + "mlp.dropout",
                            "transformer.ln_f", "lm_head"]
    assert layers[h + "attn.c_attn"].op == "Conv1D" and layers[h + "attn.c_attn"].flops == 2 * 2 * 8 * 32 * 96
    assert layers[h + "mlp.c_proj"].flops == 2 * 2 * 8 * 128 * 32
    assert layers["lm_head"].flops == 2 * 2 * 8 * 32 * 64
    assert layers[h + "attn::scaled_dot_product_attention"].flops == 2 * 2 * 2 * 2 * 8 * 8 * 16
    assert layers["transformer.wte"].in_shapes == () and layers["transformer.wte"].out_shapes == ((2, 8, 32),)
    assert layers[h + "mlp.act"].hazards == ("exp/log/pow",)  # NewGELU's pow(x, 3)
    assert tr.tied == (("lm_head", "transformer.wte"),)
    assert tr.handoff[h + "attn.c_attn"] == (h + "attn::scaled_dot_product_attention",)
    assert "lm_head" not in tr.handoff and tr.opaque == {}


# -- the model and the world as found -----------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_model_left_unchanged(training):
    """Parameters bit-identical, the mode as it was, the classes its own, no hook (module or global) left, the
    same model traced twice gives the same trace."""
    model, x, _ = TM.transformer_block(batch_size=1, seq_len=4)
    model.train(training)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    classes = {n: type(m) for n, m in model.named_modules()}
    first = _traced(model, x)
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(torch.equal(p, params[n]) and p.dtype == torch.float32 for n, p in model.named_parameters())
    assert all(m.training == training for m in model.modules())
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks
    assert not torch._C._is_torch_function_mode_enabled() and not torch.is_autocast_enabled("cpu")
    assert _traced(model, x) == first


def test_rng_untouched_by_a_model_without_randomness():
    """Tracing a model that draws no random numbers leaves the global RNG where it was."""
    model, x, _ = TM.mlp(batch_size=2)
    state = torch.get_rng_state()
    _traced(model, x)
    assert torch.equal(torch.get_rng_state(), state)


def test_rng_untouched_by_a_model_with_dropout():
    """Tracing a model with a train-mode Dropout leaves the global RNG where it was (``the model is run, never
    changed``: the caller's next dropout mask must not depend on whether it traced)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, x = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 4)).train(), torch.randn(4, 8)
    state = torch.get_rng_state()
    _traced(model, x)
    assert torch.equal(torch.get_rng_state(), state)


def test_batchnorm_buffers_untouched():
    """Tracing a train-mode CNN leaves its BatchNorm running statistics and batch counts as they were."""
    model, x, _ = TM.cnn(batch_size=2)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    _traced(model, x)
    changed = sorted(n for n, b in model.named_buffers() if not torch.equal(b, buffers[n]))
    assert changed == [], changed
