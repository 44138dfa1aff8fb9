"""Hazard models whose danger shows only on some batches of one distribution (issue 25).

Each factory returns an :class:`UnseenCase`: the model, ``draw(seed) -> batch`` (fresh batches of one
distribution; a batch is a tuple ``(x, y)`` that carries its own target, so the same
``loss_fn(output, batch)`` works on any batch and on any subset of its rows; the model's
``forward(x, y=None)`` ignores ``y``), ``loss_fn`` and ``careful``: the hand-written policy a careful
engineer would write, ``{layer key: "fp32" | "bf16"}`` over autoprec's layer keys (module paths,
``path::op`` for functional ops). Keys the careful policy does not name are left FP32.

In each model a 16-bit rounding of a *producer* (a layer whose output looks harmless) is amplified by a
*consumer* (a saturated softmax, a top-k route, a division by a small standard deviation) only on the
rows where a margin is small; such rows are rare, so a batch may or may not hold one:

* :func:`unscaled_attention_case` -- q.k^T without 1/sqrt(d), logits up to ~1e5 (|max| 1.1e5-1.7e5 per batch): a rounding of 2^-11-2^-9 in
  the embedding or in q/k moves a logit by ~10-100, which flips a saturated softmax's winner where the
  top two logits of a row are that close.
* :func:`router_case` -- a top-2 router whose 2nd and 3rd scores nearly tie on some tokens: a rounding
  of the router's input or output picks another expert for those tokens.
* :func:`small_variance_case` -- a Linear whose output has a mean of ~100 (its bias) and, on a few
  rows (their input scaled by 1e-3), a standard deviation of ~0.03, then a LayerNorm: BF16 spacing at 100
  is 0.5, so the rounding erases those rows' variance and the norm divides the rounding by it.

The model weights come from ``seed``; batches from ``draw(seed)`` are independent of them. Construction
does not disturb the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from tests.models import _seeded  # fork the CPU RNG and seed it: building never disturbs the caller's

__all__ = ["UNSEEN_FACTORIES", "UnseenCase", "router_case", "small_variance_case", "unscaled_attention_case"]


@dataclass(frozen=True)
class UnseenCase:
    """One hazard model: ``draw(seed)`` makes a batch ``(x, y)``; ``loss_fn(output, batch)``; ``careful``
    is the hand-written policy ``{layer key: precision}`` (unnamed keys FP32); ``note`` what makes it
    hazardous."""

    name: str
    model: nn.Module
    draw: Callable[[int], Any]
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]
    careful: dict[str, str]
    note: str = ""


def _mse(output: torch.Tensor, batch: Any) -> torch.Tensor:
    """MSE of the output against the batch's own target ``batch[1]`` (in FP32: the hazard is the model's)."""
    return F.mse_loss(output.float(), batch[1])


def _ce(output: torch.Tensor, batch: Any) -> torch.Tensor:
    """Cross-entropy of the output against the batch's labels ``batch[1]``."""
    return F.cross_entropy(output.float(), batch[1])


# ---------------------------------------------------------------------------------------------
# a. unscaled attention, a saturated softmax
# ---------------------------------------------------------------------------------------------

class UnscaledAttention(nn.Module):
    """embed -> q, k, v -> softmax(q @ k^T) (no 1/sqrt(d)) @ v -> out; one head."""

    def __init__(self, d_in: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        h = self.embed(x)
        scores = torch.matmul(self.q(h), self.k(h).transpose(-2, -1))  # no 1/sqrt(d): logits ~1e4-1e5
        attn = torch.softmax(scores, dim=-1)
        return self.out(torch.matmul(attn, self.v(h)))


def unscaled_attention_case(seed: int = 0, batch_size: int = 8, seq_len: int = 32, d_in: int = 128,
                            dim: int = 256, x_scale: float = 130.0) -> UnseenCase:
    """Unscaled attention whose logits reach ~1e5 (inputs N(0, ``x_scale``^2)): the softmax is saturated,
    and a row's winner flips where its top two logits are closer than the rounding of q.k^T's operands.

    Example:
        >>> case = unscaled_attention_case()
        >>> x, y = case.draw(1)
        >>> tuple(case.model(x).shape), tuple(y.shape)
        ((8, 32, 256), (8, 32, 256))
    """
    with _seeded(seed):
        model = UnscaledAttention(d_in, dim).train()

    def draw(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 + s)
        x = torch.randn(batch_size, seq_len, d_in, generator=g) * x_scale
        return x, torch.randn(batch_size, seq_len, dim, generator=g)

    careful = {"embed": "fp32", "q": "fp32", "k": "fp32", "::matmul": "fp32", "::softmax": "fp32",
               "v": "bf16", "::matmul_1": "bf16", "out": "bf16"}
    return UnseenCase("unscaled_attention", model, draw, _mse, careful,
                      "q.k^T unscaled, logits ~1e4-1e5, saturated softmax")


# ---------------------------------------------------------------------------------------------
# b. a top-2 router whose 2nd and 3rd scores nearly tie on some tokens
# ---------------------------------------------------------------------------------------------

class Router(nn.Module):
    """embed -> router scores -> top-2 -> softmax over the chosen (/ ``temperature``) -> gated experts -> head."""

    def __init__(self, d_in: int, dim: int, experts: int, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.embed = nn.Linear(d_in, dim)
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts))
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        h = self.embed(x)
        top, idx = torch.topk(self.router(h), 2, dim=-1)
        gates = torch.softmax(top / self.temperature, dim=-1)
        mixed = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            w = (gates * (idx == e)).sum(-1, keepdim=True)  # 0 where expert e is not chosen
            mixed = mixed + w * expert(h)
        return self.head(mixed)


def router_case(seed: int = 0, tokens: int = 256, d_in: int = 64, dim: int = 128, experts: int = 32,
                router_scale: float = 100.0, temperature: float = 100.0, offset: float = 16.0) -> UnseenCase:
    """A top-2 router whose scores are ~1e2-1e3 (its weights x ``router_scale``); the gates are a softmax
    over the two chosen scores / ``temperature``, so the 2nd expert's gate is large and a flip of the
    2nd and 3rd choices changes the output. The embedding's output carries a constant ``offset`` (the
    router's bias takes it back out, so FP32 scores are those without it): its 16-bit rounding is that of
    numbers ~``offset``, not of the spread the scores come from, and the smallest 2nd/3rd margin of a
    batch (~0.1) is within it on some batches and not on others.

    Example:
        >>> case = router_case()
        >>> x, y = case.draw(1)
        >>> tuple(case.model(x).shape), tuple(y.shape)
        ((256, 128), (256, 128))
    """
    with _seeded(seed):
        model = Router(d_in, dim, experts, temperature).train()
        with torch.no_grad():
            model.router.weight.mul_(router_scale)
            model.router.bias.mul_(router_scale)
            model.embed.bias.add_(offset)  # h = offset + spread: the router's bias takes the offset back out
            model.router.bias.sub_(model.router.weight.sum(1) * offset)

    def draw(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(20_000 + s)
        x = torch.randn(tokens, d_in, generator=g) * 4.0
        return x, torch.randn(tokens, dim, generator=g)

    careful = {"embed": "fp32", "router": "fp32", "::softmax": "fp32", "head": "bf16",
               **{f"experts.{e}": "bf16" for e in range(experts)}}
    return UnseenCase("router", model, draw, _mse, careful, "top-2 of 32 router, 2nd/3rd scores nearly tie")


# ---------------------------------------------------------------------------------------------
# c. a normalisation by a small variance
# ---------------------------------------------------------------------------------------------

class SmallVariance(nn.Module):
    """inp -> producer (bias ~``offset``) -> LayerNorm -> head."""

    def __init__(self, d_in: int, dim: int, classes: int, offset: float) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, dim, bias=False)  # a quiet input gives a quiet producer output
        self.producer = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():
            self.producer.bias.fill_(offset)

    def forward(self, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        return self.head(self.norm(self.producer(torch.relu(self.inp(x)))))


def small_variance_case(seed: int = 0, batch_size: int = 256, d_in: int = 128, dim: int = 256, classes: int = 10,
                        offset: float = 100.0, x_scale: float = 30.0, spread: float = 2.0) -> UnseenCase:
    """A Linear whose output is ``offset`` plus a spread that follows its input's scale, then a LayerNorm; each
    row's input scale is log-normal (``exp(spread * N(0, 1))``), so every batch has quiet rows, some quieter
    than others: their standard deviation is ~0.01-0.1 on a mean of ~100, and the LayerNorm divides the
    producer's rounding by it. In FP16 (spacing 0.0625 at 100) the quietest row of ``draw(0)`` (the batch
    the benchmark tunes on) loses 0.23 of its normalised output (RMS), that of 8 of ``draw(1..20)``
    more than 0.5, up to 1.07 (``tests/verify/test_unseen_hazards.py`` checks the count in FP64).

    Example:
        >>> case = small_variance_case()
        >>> x, y = case.draw(1)
        >>> tuple(case.model(x).shape), tuple(y.shape)
        ((256, 10), (256,))
    """
    with _seeded(seed):
        model = SmallVariance(d_in, dim, classes, offset).train()

    def draw(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(30_001 + s)
        x = torch.randn(batch_size, d_in, generator=g) * x_scale
        x = x * torch.exp(spread * torch.randn(batch_size, 1, generator=g))
        return x, torch.randint(0, classes, (batch_size,), generator=g)

    careful = {"inp": "bf16", "producer": "fp32", "norm": "fp32", "head": "bf16"}
    return UnseenCase("small_variance", model, draw, _ce, careful,
                      "mean ~100, a log-normal spread per row (quiet rows: std ~0.01-0.1), then LayerNorm")


UNSEEN_FACTORIES: dict[str, Callable[..., UnseenCase]] = {
    "unscaled_attention": unscaled_attention_case,
    "router": router_case,
    "small_variance": small_variance_case,
}
