"""Small, deterministic PyTorch test models for ``autoprec``.

Every factory takes a ``seed`` and returns ``(model, batch, loss_fn)``:

* ``model`` is an ordinary ``nn.Module`` (in train mode) whose submodules have
  stable qualified names (``conv1.lin``, ``attn.q``, ``rope`` ...), so precision
  can be assigned per module and per functional op inside a module's forward.
* ``batch`` is what the model takes: a tensor (``model(batch)``), a tuple of
  positional args (``model(*batch)``) or a dict of kwargs (``model(**batch)``).
  Use :func:`call_model` (autoprec's own, re-exported) to apply a model to a batch.
* ``loss_fn(output, batch) -> scalar tensor``, or ``None`` when the model
  returns its own scalar loss. Loss functions cast the output to float32 first,
  so a hazard always comes from the model, never from the loss.

Construction does not disturb the global RNG (it runs under ``fork_rng``), and
the same seed always gives bit-identical weights and data.

Hazard models (blanket autocast breaks them; see ``tests/test_models_hazards.py``):

* :func:`scatter_gnn` -- hub node whose neighbourhood sum exceeds 65504
  (FP16 overflow) and whose BF16 running sum stagnates (BF16 accumulation).
* :func:`rmsnorm_model` -- hand-written RMSNorm whose ``x.pow(2)`` overflows in FP16.
* :func:`unscaled_attention` -- attention without 1/sqrt(d) and one token with a
  massive activation: scores exceed 65504, FP16 softmax gives NaN.
* :func:`rotary_model` -- rotary angles from a ``positions @ inv_freq`` matmul over
  2048 positions: BF16 cannot hold the positions/angles, FP16 can.
* :func:`underflow_model` (+ :func:`underflow_optimizer`) -- tiny loss scale, so FP16
  gradients underflow even with ``GradScaler`` defaults; FP32 trains.
* :func:`growing_model` -- a layer whose output grows by :data:`GROWTH` with every training
  forward until it passes 65504: FP16 is fine at step 0 and overflows mid-run (``autoprec.guard``).

Safe models (blanket BF16 autocast is fine): :func:`mlp`, :func:`cnn`,
:func:`transformer_block`.

:func:`fno` (a Fourier neural operator) has FFT layers, which the CPU runs in FP32 only and cuFFT in
FP16 (power-of-two sizes) but not BF16; it is not in ``FACTORIES``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from autoprec.core import call_model

Batch = Any
LossFn = Optional[Callable[[Any, Batch], torch.Tensor]]
ModelSpec = Tuple[nn.Module, Batch, LossFn]

FP16_MAX = 65504.0

__all__ = [
    "FP16_MAX",
    "GrowingGradient",
    "OpGrowingModel",
    "op_growing_model",
    "call_model",
    "unverifiable_tanh",
    "scatter_gnn",
    "rmsnorm_model",
    "unscaled_attention",
    "rotary_model",
    "underflow_model",
    "underflow_optimizer",
    "growing_model",
    "GROWTH",
    "UNDERFLOW_LOSS_SCALE",
    "mlp",
    "cnn",
    "transformer_block",
    "fno",
    "HAZARD_FACTORIES",
    "SAFE_FACTORIES",
    "FACTORIES",
    # modules
    "GraphConv",
    "ScatterGNN",
    "RMSNorm",
    "RMSNormModel",
    "UnscaledAttention",
    "UnscaledAttentionModel",
    "Rotary",
    "RotaryModel",
    "UnderflowModel",
    "Growing",
    "GrowingModel",
    "MLP",
    "CNN",
    "SelfAttention",
    "FeedForward",
    "TransformerBlock",
    "SpectralConv2d",
    "FNO",
]


class _seeded:
    """Context manager: fork the CPU RNG, seed it, restore it on exit."""

    def __init__(self, seed: int):
        self.seed = seed
        self._ctx = None

    def __enter__(self):
        self._ctx = torch.random.fork_rng(devices=[])
        self._ctx.__enter__()
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _mse_loss_fn(target: torch.Tensor) -> Callable[[torch.Tensor, Batch], torch.Tensor]:
    def loss_fn(output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.mse_loss(output.float(), target)

    return loss_fn


def _ce_loss_fn(labels: torch.Tensor) -> Callable[[torch.Tensor, Batch], torch.Tensor]:
    def loss_fn(output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(output.float(), labels)

    return loss_fn


# ---------------------------------------------------------------------------
# 1. Scatter-based GNN with a high fan-in hub
# ---------------------------------------------------------------------------

AGGREGATIONS = ("index_put", "index_add", "scatter_add")


class GraphConv(nn.Module):
    """Message passing layer: ``relu(lin(x))`` messages, sum aggregation, 1/sqrt(deg) scaling.

    The aggregation is done in this module's own forward (not in a leaf module),
    in whatever dtype the messages arrive in:

    * ``"index_put"`` (default): ``agg.index_put_((dst,), msg, accumulate=True)``.
      On CPU this accumulates element by element *in the tensor's dtype*, so in
      BF16 the hub's running sum stagnates (adding ~20 to ~8192 rounds to 0) and in
      FP16 it overflows to inf. (This is also how GPU atomic scatter-adds behave.)
    * ``"index_add"`` / ``"scatter_add"``: ``Tensor.index_add_`` / ``Tensor.scatter_add_``.
      On CPU (torch 2.13) these accumulate in float32 internally and only round the
      final sum, so they overflow in FP16 but lose only final-rounding precision in BF16.
    """

    def __init__(self, in_dim: int, out_dim: int, aggr: str = "index_put"):
        super().__init__()
        if aggr not in AGGREGATIONS:
            raise ValueError(f"aggr must be one of {AGGREGATIONS}, got {aggr!r}")
        self.lin = nn.Linear(in_dim, out_dim)
        self.aggr = aggr

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index[0], edge_index[1]
        msg = torch.relu(self.lin(x))[src]  # (E, C), positive
        agg = msg.new_zeros(x.shape[0], msg.shape[1])
        if self.aggr == "index_put":
            agg = agg.index_put_((dst,), msg, accumulate=True)
        elif self.aggr == "index_add":
            agg = agg.index_add_(0, dst, msg)
        else:
            agg = agg.scatter_add_(0, dst[:, None].expand_as(msg), msg)
        deg = torch.bincount(dst, minlength=x.shape[0]).clamp_(min=1)
        norm = deg.to(torch.float32).rsqrt().to(agg.dtype)
        return agg * norm[:, None]


class ScatterGNN(nn.Module):
    def __init__(self, in_dim: int = 16, hidden: int = 32, out_dim: int = 8, aggr: str = "index_put"):
        super().__init__()
        self.conv1 = GraphConv(in_dim, hidden, aggr)
        self.conv2 = GraphConv(hidden, hidden, aggr)
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x, edge_index)
        h = self.conv2(h, edge_index)
        return self.head(h)


def scatter_gnn(
    seed: int = 0,
    num_nodes: int = 1000,
    hub_fan_in: int = 6000,
    num_random_edges: int = 4000,
    aggr: str = "index_put",
) -> ModelSpec:
    """2-layer sum-aggregation GNN on a random graph whose node 0 is a hub.

    Batch: ``(x, edge_index)`` with ``x`` (num_nodes, 16) uniform in [0, 60) and
    ``edge_index`` (2, E) = (src, dst); node 0 receives ``hub_fan_in`` edges.
    In FP32 the hub's neighbourhood sums reach ~1e5 (> 65504) in both layers.
    Loss: MSE against a fixed random target (the hub row dominates it).
    """
    with _seeded(seed):
        model = ScatterGNN(aggr=aggr)
        x = torch.rand(num_nodes, 16) * 60.0
        hub_src = torch.randint(1, num_nodes, (hub_fan_in,))
        hub_dst = torch.zeros(hub_fan_in, dtype=torch.long)
        rnd_src = torch.randint(0, num_nodes, (num_random_edges,))
        rnd_dst = torch.randint(1, num_nodes, (num_random_edges,))
        edge_index = torch.stack([torch.cat([hub_src, rnd_src]), torch.cat([hub_dst, rnd_dst])])
        edge_index = edge_index[:, torch.randperm(edge_index.shape[1])].contiguous()
        target = torch.randn(num_nodes, 8) * 10.0
    return model.train(), (x, edge_index), _mse_loss_fn(target)


# ---------------------------------------------------------------------------
# 2. Hand-written RMSNorm
# ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RMSNormModel(nn.Module):
    def __init__(self, in_dim: int = 64, hidden: int = 128, out_dim: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.norm = RMSNorm(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


def rmsnorm_model(seed: int = 0, batch_size: int = 32) -> ModelSpec:
    """Linear -> hand-written RMSNorm -> Linear; ``fc1`` outputs have |x| ~ 300-1000.

    ``x.pow(2)`` therefore exceeds 65504 in FP16 (inf -> rsqrt 0 / NaN), while BF16
    has the range. Batch: tensor (batch_size, 64) with std 500. Loss: MSE vs random target.
    """
    with _seeded(seed):
        model = RMSNormModel()
        x = torch.randn(batch_size, 64) * 500.0
        target = torch.randn(batch_size, 16)
    return model.train(), x, _mse_loss_fn(target)


# ---------------------------------------------------------------------------
# 3. Attention without 1/sqrt(d) scaling
# ---------------------------------------------------------------------------


class UnscaledAttention(nn.Module):
    """Multi-head self-attention, scores = q @ k^T with NO 1/sqrt(d) scaling."""

    def __init__(self, dim: int = 64, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1)  # no 1/sqrt(d)
        attn = torch.softmax(scores, dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(y)


class UnscaledAttentionModel(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 2):
        super().__init__()
        self.attn = UnscaledAttention(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def unscaled_attention(
    seed: int = 0, batch_size: int = 2, seq_len: int = 32, dim: int = 64, sink_scale: float = 15000.0
) -> ModelSpec:
    """Unscaled attention block; token 0 of every sequence carries a massive activation.

    Ordinary tokens are N(0, 1.5^2), so their scores are O(1-10) and the FP32 softmax is
    not saturated (q/k get real gradients). Token 0 (an "attention sink" with a massive
    activation, as seen in LLMs) is scaled by ``sink_scale``, so scores in its row and
    column reach ~1e5-1e9 > 65504: in FP16 they become +-inf and softmax yields NaN.
    BF16 has the range and stays close to FP32. Batch: tensor (B, T, D). Loss: MSE.
    """
    with _seeded(seed):
        model = UnscaledAttentionModel(dim)
        x = torch.randn(batch_size, seq_len, dim) * 1.5
        x[:, 0] = torch.randn(batch_size, dim).clamp(-2.5, 2.5) * sink_scale
        target = torch.randn(batch_size, seq_len, dim)
    return model.train(), x, _mse_loss_fn(target)


# ---------------------------------------------------------------------------
# 4. Rotary position embedding with a matmul-computed angle table
# ---------------------------------------------------------------------------


class Rotary(nn.Module):
    """Rotary embedding; angles = ``positions[:, None].float() @ inv_freq[None, :]``.

    Under autocast that matmul runs in the low-precision dtype: BF16 (8-bit mantissa)
    rounds positions above 256 and angles ~30-100 to multiples of 0.25-0.5 rad, while
    FP16 holds integer positions up to 2048 exactly and angles to ~0.03 rad.
    """

    def __init__(self, dim: int, max_freq: float = 0.05, min_freq: float = 0.005):
        super().__init__()
        n = dim // 2
        expo = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
        inv_freq = max_freq * (min_freq / max_freq) ** expo
        self.register_buffer("inv_freq", inv_freq.to(torch.float32))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None].float() @ self.inv_freq[None, :]  # (T, dim/2)
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RotaryModel(nn.Module):
    def __init__(self, in_dim: int = 256, dim: int = 256, out_dim: int = 256, max_freq: float = 0.05,
                 min_freq: float = 0.005):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.rope = Rotary(dim, max_freq, min_freq)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.out(self.rope(self.proj(x), positions))


def rotary_model(seed: int = 0, seq_len: int = 2048, max_freq: float = 0.05, min_freq: float = 0.005,
                 target_noise: float = 1.0) -> ModelSpec:
    """Linear -> rotary embedding over ``seq_len`` positions -> Linear.

    Batch: dict ``{"x": (1, seq_len, 256), "positions": arange(seq_len)}``.
    Angles reach ``(seq_len - 1) * max_freq`` (~100 rad by default): BF16 ruins the
    rotation, FP16 stays close to FP32. Loss: MSE against a target equal to the FP32
    output plus ``target_noise`` * std noise (a model near convergence), so the loss and
    its gradients are sensitive to the rotation error.
    """
    with _seeded(seed):
        model = RotaryModel(max_freq=max_freq, min_freq=min_freq)
        x = torch.randn(1, seq_len, 256)
        positions = torch.arange(seq_len)
        with torch.no_grad():
            ref = model(x, positions)
        target = ref + target_noise * ref.std() * torch.randn_like(ref)
    return model.train(), {"x": x, "positions": positions}, _mse_loss_fn(target)


# ---------------------------------------------------------------------------
# 5. Gradient underflow under FP16 + GradScaler defaults
# ---------------------------------------------------------------------------

UNDERFLOW_LOSS_SCALE = 1e-12


class UnderflowModel(nn.Module):
    """MLP that returns its own loss: ``mse(out.float(), target) * loss_scale``.

    With ``loss_scale=1e-12`` the gradient w.r.t. the (FP16 under autocast) output is
    ~1e-15; even multiplied by GradScaler's default 2**16 it is ~1e-10, far below the
    smallest FP16 subnormal (6e-8), so every FP16 activation gradient flushes to 0.
    """

    def __init__(self, in_dim: int = 256, hidden: int = 256, out_dim: int = 64,
                 loss_scale: float = UNDERFLOW_LOSS_SCALE):
        super().__init__()
        self.loss_scale = loss_scale
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.tanh(self.fc1(x)))
        return F.mse_loss(out.float(), target) * self.loss_scale


def underflow_model(seed: int = 0, batch_size: int = 256) -> ModelSpec:
    """MLP returning ``1e-12 * MSE`` (loss_fn is None). Batch: dict ``{"x", "target"}``.

    Train it with :func:`underflow_optimizer`: FP32 learns, blanket FP16 autocast +
    ``torch.amp.GradScaler("cpu")`` defaults gets all-zero gradients and does not.
    """
    with _seeded(seed):
        model = UnderflowModel()
        x = torch.randn(batch_size, 256)
        w = torch.randn(256, 64) / math.sqrt(256)
        target = torch.tanh(x @ w) * 2.0
    return model.train(), {"x": x, "target": target}, None


def underflow_optimizer(params) -> torch.optim.Optimizer:
    """Recommended optimizer for :func:`underflow_model`: Adam with eps far below the ~1e-15 grads."""
    return torch.optim.Adam(params, lr=1e-2, eps=1e-30)


# ---------------------------------------------------------------------------
# 5b. An activation that grows with training (autoprec.guard)
# ---------------------------------------------------------------------------

GROWTH = 1.25  # the growing layer's output scale, per training forward


class Growing(nn.Module):
    """A leaf ``x @ W.T * gain``: the product with ``gain`` runs in the layer's precision."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))
        self.register_buffer("gain", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) * self.gain


class _Amplify(torch.autograd.Function):
    """The identity forward; backward multiplies the gradient by ``gain``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gain)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        (gain,) = ctx.saved_tensors
        return grad * gain.to(grad.dtype), None


class GrowingGradient(nn.Module):
    """fc -> ReLU -> mid -> ReLU -> amplify -> head: ``amplify`` is the identity forward and multiplies the
    gradient by ``gain`` backward; each training forward multiplies ``gain`` by ``growth``, so the gradient
    into ``mid``'s output grows by ``growth`` per step while every forward value stays small."""

    def __init__(self, growth: float, in_dim: int = 8, dim: int = 16) -> None:
        super().__init__()
        self.growth = growth
        self.fc, self.mid, self.head = nn.Linear(in_dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 4)
        self.register_buffer("gain", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.gain.mul_(self.growth)
        return self.head(_Amplify.apply(F.relu(self.mid(F.relu(self.fc(x)))), self.gain))


class GrowingModel(nn.Module):
    """fc -> ReLU -> grow -> LayerNorm -> head; each training forward multiplies ``grow.gain`` by
    :data:`GROWTH`, so ``grow``'s output passes 65504 after a few dozen steps while the LayerNorm
    keeps the loss (and FP32 training) unchanged in scale."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.fc = nn.Linear(16, dim)
        self.grow = Growing(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.grow.gain.mul_(GROWTH)
        return self.head(self.norm(self.grow(F.relu(self.fc(x)))))


class OpGrowingModel(nn.Module):
    """:class:`GrowingModel` with its growing product as a functional op in the root's own code
    (``F.linear(h, weight * gain)``: the policy's layer ``"::linear"``), not a module."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.fc = nn.Linear(16, dim)
        self.weight = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))
        self.register_buffer("gain", torch.tensor(1.0))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.gain.mul_(GROWTH)
        return self.head(self.norm(F.linear(F.relu(self.fc(x)), self.weight * self.gain)))


def op_growing_model(seed: int = 0, batch_size: int = 32) -> ModelSpec:
    """:class:`OpGrowingModel`. Batch: tensor (32, 16). Loss: MSE against a fixed target."""
    with _seeded(seed):
        model = OpGrowingModel()
        x = torch.randn(batch_size, 16)
        target = torch.randn(batch_size, 4)
    return model.train(), x, _mse_loss_fn(target)


def growing_model(seed: int = 0, batch_size: int = 32) -> ModelSpec:
    """:class:`GrowingModel`. Batch: tensor (32, 16). Loss: MSE against a fixed target."""
    with _seeded(seed):
        model = GrowingModel()
        x = torch.randn(batch_size, 16)
        target = torch.randn(batch_size, 4)
    return model.train(), x, _mse_loss_fn(target)


# ---------------------------------------------------------------------------
# 6. Safe models (blanket BF16 autocast is fine)
# ---------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, in_dim: int = 128, hidden: int = 256, out_dim: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        x = F.gelu(self.fc2(x))
        return self.fc3(x)


def mlp(seed: int = 0, batch_size: int = 64) -> ModelSpec:
    """3-layer GELU MLP 128-256-256-10. Batch: tensor (64, 128). Loss: cross-entropy."""
    with _seeded(seed):
        model = MLP()
        x = torch.randn(batch_size, 128)
        labels = torch.randint(0, 10, (batch_size,))
    return model.train(), x, _ce_loss_fn(labels)


def unverifiable_tanh(depth: int = 12) -> tuple[nn.Module, torch.Tensor]:
    """``depth`` x (Linear(64, 64), Tanh) whose weights and batch are BF16 values (exactly representable), for
    a verification built to fail: FP32 training from weights rounded to BF16 is then the FP32 run itself, so the
    noise floor is exactly 0 on every CPU, and any BF16 layer left in the policy leaves a loss gap over it."""
    with _seeded(0):
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(64, 64), nn.Tanh()]
        model = nn.Sequential(*layers)
        x = torch.randn(128, 64).bfloat16().float()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model, x


class CNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def cnn(seed: int = 0, batch_size: int = 16) -> ModelSpec:
    """3x (Conv2d + BatchNorm2d + ReLU) + avg-pool + Linear. Batch: tensor (16, 3, 16, 16). Loss: CE.

    Note: in train mode BatchNorm updates its running stats on every forward.
    """
    with _seeded(seed):
        model = CNN()
        x = torch.randn(batch_size, 3, 16, 16)
        labels = torch.randint(0, 10, (batch_size,))
    return model.train(), x, _ce_loss_fn(labels)


class SelfAttention(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int = 128, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, dim: int = 128, heads: int = 4, mlp_hidden: int = 512):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def transformer_block(seed: int = 0, batch_size: int = 4, seq_len: int = 32) -> ModelSpec:
    """Pre-LN block, dim 128, 4 heads, SDPA attention, GELU MLP 512. Batch: (4, 32, 128). Loss: MSE."""
    with _seeded(seed):
        model = TransformerBlock()
        x = torch.randn(batch_size, seq_len, 128)
        target = torch.randn(batch_size, seq_len, 128)
    return model.train(), x, _mse_loss_fn(target)


# ---------------------------------------------------------------------------
# Fourier neural operator (FFT layers; not in FACTORIES)
# ---------------------------------------------------------------------------


class SpectralConv2d(nn.Module):
    """FNO spectral convolution: rfft2, a learned complex multiply on the ``modes`` lowest frequencies
    of both corners, irfft2. The complex weights are stored as real pairs and multiplied with real
    einsums, so the layer runs in any floating dtype the FFTs return (cuFFT: FP16 as ``complex32``)."""

    def __init__(self, channels: int, modes: int):
        super().__init__()
        self.modes = modes
        scale = 1.0 / (channels * channels)
        self.weight = nn.Parameter(scale * torch.randn(2, channels, channels, modes, modes, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.modes
        x_ft = torch.view_as_real(torch.fft.rfft2(x))
        out = torch.zeros(*x_ft.shape[:2], h, w // 2 + 1, 2, dtype=x_ft.dtype)
        out[:, :, :m, :m] = _complex_mul(x_ft[:, :, :m, :m], self.weight[0])
        out[:, :, -m:, :m] = _complex_mul(x_ft[:, :, -m:, :m], self.weight[1])
        return torch.fft.irfft2(torch.view_as_complex(out), s=(h, w))


def _complex_mul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    def mix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bixy,ioxy->boxy", x, y)
    re = mix(a[..., 0], w[..., 0]) - mix(a[..., 1], w[..., 1])
    im = mix(a[..., 0], w[..., 1]) + mix(a[..., 1], w[..., 0])
    return torch.stack([re, im], dim=-1)


class FNOBlock(nn.Module):
    def __init__(self, channels: int, modes: int):
        super().__init__()
        self.spectral = SpectralConv2d(channels, modes)
        self.skip = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.spectral(x) + self.skip(x))


class FNO(nn.Module):
    def __init__(self, channels: int = 8, modes: int = 6, depth: int = 2):
        super().__init__()
        self.lift = nn.Conv2d(1, channels, 1)
        self.blocks = nn.ModuleList(FNOBlock(channels, modes) for _ in range(depth))
        self.proj = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lift(x)
        for block in self.blocks:
            x = block(x)
        return self.proj(x)


def fno(seed: int = 0, batch_size: int = 4, size: int = 32) -> ModelSpec:
    """2-D Fourier neural operator: lift, two spectral+skip blocks, projection. Batch: (4, 1, size, size).
    Loss: MSE against a smoothed copy of the input. cuFFT runs FP16 transforms at power-of-two sizes only."""
    with _seeded(seed):
        model = FNO()
        x = torch.randn(batch_size, 1, size, size)
        target = F.avg_pool2d(x, 3, stride=1, padding=1)
    return model.train(), x, _mse_loss_fn(target)


HAZARD_FACTORIES: Dict[str, Callable[..., ModelSpec]] = {
    "scatter_gnn": scatter_gnn,
    "rmsnorm_model": rmsnorm_model,
    "unscaled_attention": unscaled_attention,
    "rotary_model": rotary_model,
    "underflow_model": underflow_model,
}

SAFE_FACTORIES: Dict[str, Callable[..., ModelSpec]] = {
    "mlp": mlp,
    "cnn": cnn,
    "transformer_block": transformer_block,
}

FACTORIES: Dict[str, Callable[..., ModelSpec]] = {**HAZARD_FACTORIES, **SAFE_FACTORIES}
