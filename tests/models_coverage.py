"""Tiny random-init models whose matmul work autoprec used not to see: recurrent layers,
``nn.MultiheadAttention``, grouped-mm experts, a per-time-step scan loop, bilinear and einsum.

Each builder returns ``(model, batch)``; the batch is a tensor (positional input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


class LSTMModel(nn.Module):
    """A 2-layer LSTM and a head: the LSTM carries ~96% of the matmul FLOPs."""

    def __init__(self, cell: str = "LSTM") -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(32, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def lstm(seed: int = 0, cell: str = "LSTM") -> tuple[nn.Module, torch.Tensor]:
    _seed(seed)
    return LSTMModel(cell), torch.randn(8, 12, 32)


class AttentionModel(nn.Module):
    """``nn.TransformerEncoderLayer`` followed by a bare ``nn.MultiheadAttention`` (cross-attending the input)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.attn(h, x, x, need_weights=False)[0]


def attention(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    _seed(seed)
    return AttentionModel(), torch.randn(4, 16, 64)


class GroupedExperts(nn.Module):
    """Experts with stacked weights (torchtitan's layout): tokens sorted by expert, run by ``F.grouped_mm``."""

    def __init__(self, width: int, hidden: int, experts: int) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(experts, width, hidden) / width ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, width) / hidden ** 0.5)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return F.grouped_mm(F.gelu(F.grouped_mm(x, self.up, offs=offs)), self.down, offs=offs)


class MoEModel(nn.Module):
    """A top-1 routed mixture of experts between two Linears; the experts carry most of the FLOPs."""

    def __init__(self, width: int = 128, hidden: int = 512, experts: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.router = nn.Linear(width, experts)
        self.experts = GroupedExperts(width, hidden, experts)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).reshape(-1, x.shape[-1])
        weight, expert = self.router(h).softmax(-1).max(-1)
        order = expert.argsort()
        offs = torch.bincount(expert, minlength=self.experts.up.shape[0]).cumsum(0).to(torch.int32)
        y = torch.empty_like(h).index_copy(0, order, self.experts(h[order], offs))
        return self.out(h + y * weight[:, None]).reshape(x.shape)


def moe(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    _seed(seed)
    return MoEModel(), torch.randn(8, 64, 128)


class Expert(nn.Module):
    """One expert MLP of a looped mixture of experts."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class LoopedMoEModel(nn.Module):
    """The older MoE code path: a top-1 router and an ``nn.ModuleList`` of expert MLPs run in a Python loop, each
    on the tokens routed to it (so each expert sees its own token count; one routed no token is not called)."""

    def __init__(self, width: int = 128, hidden: int = 512, experts: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList([Expert(width, hidden) for _ in range(experts)])
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).reshape(-1, x.shape[-1])
        weight, top1 = self.router(h).softmax(-1).max(-1)
        y = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            idx = (top1 == e).nonzero().squeeze(-1)
            if idx.numel():
                y[idx] = expert(h[idx]).to(y.dtype)
        return self.out(h + y * weight[:, None]).reshape(x.shape)


def looped_moe(seed: int = 0, experts: int = 4, unrouted: int = 0, width: int = 128,
               hidden: int = 512) -> tuple[nn.Module, torch.Tensor]:
    """The looped MoE; the last ``unrouted`` experts get a router bias that routes them no token (never called)."""
    _seed(seed)
    model = LoopedMoEModel(width, hidden, experts)
    if unrouted:
        with torch.no_grad():
            model.router.bias[experts - unrouted:] = -1e4
    return model, torch.randn(8, 64, width)


class ScanMixer(nn.Module):
    """A Mamba-style fallback scan: one ``torch.matmul`` per time step, from one line of code."""

    def __init__(self, width: int = 256, state: int = 8) -> None:
        super().__init__()
        self.in_proj = nn.Linear(width, 2 * width)
        self.x_proj = nn.Linear(width, 2 * state)
        self.out_proj = nn.Linear(width, width)
        self.decay = nn.Parameter(torch.rand(width, state) * 0.5 + 0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, gate = self.in_proj(x).chunk(2, dim=-1)
        b, c = self.x_proj(u).chunk(2, dim=-1)
        h = x.new_zeros(x.shape[0], u.shape[-1], b.shape[-1])
        ys = []
        for t in range(x.shape[1]):
            h = h * self.decay + u[:, t, :, None] * b[:, t, None, :]
            ys.append(torch.matmul(h, c[:, t, :, None]).squeeze(-1))
        return self.out_proj(torch.stack(ys, dim=1) * F.silu(gate))


class ScanModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = ScanMixer()
        self.head = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mixer(x))


def scan(seed: int = 0, seq_len: int = 16) -> tuple[nn.Module, torch.Tensor]:
    _seed(seed)
    return ScanModel(), torch.randn(8, seq_len, 256)


class BilinearEinsum(nn.Module):
    """``nn.Bilinear`` and an ``einsum`` in the model's own code."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.bilinear = nn.Bilinear(32, 32, 32)
        self.mix = nn.Parameter(torch.randn(32, 32) / 32 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return torch.einsum("btd,de->bte", self.bilinear(h, x), self.mix)


def bilinear_einsum(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    _seed(seed)
    return BilinearEinsum(), torch.randn(8, 16, 32)


BUILDERS = {"lstm": lstm, "gru": lambda seed=0: lstm(seed, "GRU"), "rnn": lambda seed=0: lstm(seed, "RNN"),
            "attention": attention, "moe": moe, "scan": scan, "bilinear_einsum": bilinear_einsum}
