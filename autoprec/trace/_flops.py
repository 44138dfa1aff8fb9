"""FLOP formulas for the matmul-class kernels that :mod:`torch.utils.flop_counter` has none for.

Registered the way torch registers its own (:func:`torch.utils.flop_counter.register_flop_formula`),
once, at import, and only for ops the registry lacks: so :class:`~torch.utils.flop_counter.FlopCounterMode`
(which the trace runs) and any dispatch-level counter that reads the registry see recurrent layers
(CPU ``mkldnn_rnn_layer``, CUDA ``_cudnn_rnn``, ROCm ``miopen_rnn``), ``_grouped_mm``,
``nn.Bilinear`` (``_trilinear``), the CPU attention kernel, and the fused ``nn.MultiheadAttention``
and ``nn.TransformerEncoderLayer`` fast paths. Forward FLOPs, 2 per multiply-add, as torch counts.

:class:`DtypeFlops` counts those FLOPs by operand dtype as a model runs: verification runs it over
one forward of the policy, so the 16-bit share a report gives is what ran, beside the prediction.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from ..runtime._casts import emulating

__all__ = ["DtypeFlops", "dispatch_flops", "registered"]

aten = torch.ops.aten


def _prod(shape: Any) -> int:
    return math.prod(int(d) for d in shape)


def _tokens(x: torch.Tensor) -> int:
    """Time steps x batch of a recurrent input (packed or padded: every position is run)."""
    return _prod(x.shape[:-1])


def _rnn_flops(x: torch.Tensor, weights: list[torch.Tensor]) -> int:
    # every layer and direction runs its input and hidden matrices over all positions
    return 2 * _tokens(x) * sum(w.numel() for w in weights if isinstance(w, torch.Tensor) and w.dim() == 2)


def _mkldnn_rnn_layer(input, weight0, weight1, *args, out_val=None, **kwargs) -> int:
    return _rnn_flops(input, [weight0, weight1])


def _cudnn_rnn(input, weight, *args, out_val=None, **kwargs) -> int:
    return _rnn_flops(input, list(weight))


def _grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    if len(a_shape) == 2 and len(b_shape) == 2:  # groups along K: (M, K_total) x (K_total, N)
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * _prod(out_shape) * a_shape[-1]


def _trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim, *args, out_shape=None, **kwargs) -> int:
    shapes = []
    for shape, expand in ((i1, expand1), (i2, expand2), (i3, expand3)):
        full = list(shape)
        for d in sorted(expand):
            full.insert(d, 1)
        shapes.append(full)
    return 2 * _prod(torch.broadcast_shapes(*shapes))


def _attention(q_shape, k_shape, v_shape) -> int:
    """QK^T and AV of one attention call: (..., L, E) queries against (..., S, E) keys and (..., S, Ev) values."""
    return 2 * _prod(q_shape[:-1]) * k_shape[-2] * (q_shape[-1] + v_shape[-1])


def _sdpa(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention(q_shape, k_shape, v_shape)


def _mha(q, k, v, embed_dim: int, num_head: int, qkv_w, qkv_b, proj_w, *args, out_shape=None, **kwargs) -> int:
    lq, lk = _prod(q[:-1]), _prod(k[:-1])
    batch = _prod(q[:-2]) if len(q) > 2 else 1
    proj = 2 * embed_dim * embed_dim * (2 * lq + 2 * lk)           # q, k, v and output projections
    return proj + 2 * batch * q[-2] * k[-2] * 2 * embed_dim         # QK^T and AV over all heads


def _encoder_layer(src, embed_dim: int, num_heads: int, qkv_w, qkv_b, proj_w, proj_b, use_gelu, norm_first, eps,
                   nw1, nb1, nw2, nb2, ffn_w1, *args, out_val=None, **kwargs) -> int:
    if src.is_nested:  # TransformerEncoder's padded fast path: per-sequence lengths
        return sum(_encoder_layer(t, embed_dim, num_heads, qkv_w, qkv_b, proj_w, proj_b, use_gelu, norm_first,
                                  eps, nw1, nb1, nw2, nb2, ffn_w1) for t in src.unbind())
    shape = src.shape
    attn = _mha(shape, shape, shape, embed_dim, num_heads, None, None, None)
    return attn + 2 * 2 * _prod(shape[:-1]) * ffn_w1.numel()


_FORMULAS: dict[str, tuple[Callable, bool]] = {
    "mkldnn_rnn_layer": (_mkldnn_rnn_layer, True),
    "_cudnn_rnn": (_cudnn_rnn, True),
    "miopen_rnn": (_cudnn_rnn, True),
    "_grouped_mm": (_grouped_mm, False),
    "_scaled_grouped_mm": (_grouped_mm, False),
    "_trilinear": (_trilinear, False),
    "_scaled_dot_product_flash_attention_for_cpu": (_sdpa, False),
    "_scaled_dot_product_fused_attention_overrideable": (_sdpa, False),
    "_native_multi_head_attention": (_mha, False),
    "_transformer_encoder_layer_fwd": (_encoder_layer, True),
}


def _register() -> tuple[str, ...]:
    done = []
    for name, (formula, raw) in _FORMULAS.items():
        target = getattr(aten, name, None)
        if target is None or target in flop_counter.flop_registry:  # this torch lacks it, or counts it itself
            continue
        flop_counter.register_flop_formula(target, get_raw=raw)(formula)
        done.append(name)
    return tuple(done)


_REGISTERED = _register()


def registered() -> tuple[str, ...]:
    """The ATen ops whose FLOP formula autoprec registered (those torch had none for).

    Example:
        >>> "mkldnn_rnn_layer" in registered()
        True
    """
    return _REGISTERED


def dispatch_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """Forward FLOPs of one dispatched ATen op by the flop registry (torch's and autoprec's); 0 if none.

    For a ``TorchDispatchMode`` that counts matmul-class work as it runs.

    Example:
        >>> a, b = torch.ones(4, 8), torch.ones(8, 2)
        >>> dispatch_flops(torch.ops.aten.mm.default, (a, b), {}, a @ b)
        128
    """
    formula = flop_counter.flop_registry.get(getattr(func, "_overloadpacket", func))
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=out))


class DtypeFlops(TorchDispatchMode):
    """Count forward matmul-class FLOPs by operand dtype as ops dispatch: what the kernels ran in.

    Each ATen op that the flop registry prices (:func:`dispatch_flops`) counts under the dtype of its
    first floating operand, after autocast and autoprec's regions have cast it. ``flops`` maps the
    dtype's name (``"bfloat16"``, ``"float32"``) to its FLOPs. An FP16 op of a GPU policy emulated on
    a CPU (FP16-rounded operands in an FP32 kernel, :func:`autoprec.runtime._casts.emulated`) counts as FP16:
    it is what the GPU runs.

    Example:
        >>> lin = torch.nn.Linear(8, 4)
        >>> with DtypeFlops() as count, torch.autocast("cpu", dtype=torch.bfloat16):
        ...     _ = lin(torch.ones(2, 8))
        >>> count.flops
        {'bfloat16': 128}
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        n = dispatch_flops(func, args, kwargs, out)
        if n:
            dtype = next((t.dtype for t in pytree.tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
            if dtype == torch.float32 and emulating() is not None:  # 16-bit as a GPU runs it, emulated on a CPU
                dtype = emulating()
            name = str(dtype).removeprefix("torch.")
            self.flops[name] = self.flops.get(name, 0) + n
        return out
