"""The op vocabulary: which torch calls are layers of their own, and which are numerical hazards.

Shared by the trace (which names layers), the cost model (which prices them) and the runtime (which
gives functional ops in a module's own code their precision).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ALIASES", "AUTOCAST_GAPS", "CUDA_FP32_OPS", "CUDA_LOWER_OPS", "CUDA_PROMOTE_OPS", "FFT_OPS", "HAZARD_OPS",
           "MATMUL_OPS", "hazard_of", "op_name"]

#: The matmul/conv family: they carry almost all FLOPs (their formulas: torch's flop registry and
#: :mod:`autoprec.trace._flops`). Recurrent layers and whole attention calls are one op each here. FP8
#: matmuls (``_scaled_mm``) are not: their operands and FP32 scales are in the formats they must be,
#: a region's casts would break them; they run in the module that calls them (a unit such as
#: torchao's ``Float8Linear``) and their FLOPs are counted there.
MATMUL_OPS = frozenset({
    "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "einsum", "bilinear", "mv", "addmv",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "scaled_dot_product_attention", "multi_head_attention_forward", "grouped_mm",
    "lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
})

#: Matmul-class ops that autocast (CPU and CUDA) leaves alone: fed a 16-bit activation and an FP32
#: weight they raise, so a 16-bit region casts their floating operands itself. Under torch.compile,
#: Dynamo hands no function mode a function torch does not list as overridable (``torch._grouped_mm``):
#: there that cast cannot happen (and torch 2.13 compiles grouped_mm with BF16 operands only).
AUTOCAST_GAPS = frozenset({"bilinear", "grouped_mm"})

#: Torch-level names that are one op under another name.
ALIASES = {"_grouped_mm": "grouped_mm"}

#: CUDA autocast's op lists (torch's ``aten/src/ATen/autocast_mode.h`` and ``autocast_mode.cpp``, torch 2.13),
#: by the names the ops have as torch functions (``Tensor.__rtruediv__`` is called ``__rdiv__``). Only
#: out-of-place calls without ``out=`` (and, for the FP32 ones, without ``dtype=``) autocast.
#: Cast to the region's 16-bit format:
CUDA_LOWER_OPS = (MATMUL_OPS - {"bilinear"}) | frozenset({
    "addmv", "addr", "mv", "chain_matmul", "linalg_multi_dot", "linalg_vecdot", "prelu", "conv_tbc",
    "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
})
#: Computed in FP32 whatever the region's format (inputs cast up, the output FP32):
CUDA_FP32_OPS = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "__rdiv__", "__rtruediv__", "softplus", "layer_norm", "rms_norm",
    "group_norm", "norm", "normalize", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "cross_entropy", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
    # with an optional dtype: FP32 unless the call names a dtype
    "prod", "softmax", "log_softmax", "softmin", "cumprod", "cumsum", "sum", "linalg_vector_norm",
    "linalg_matrix_norm",
})
#: Run in the widest floating dtype among their inputs:
CUDA_PROMOTE_OPS = frozenset({"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sample", "index_put",
                              "scatter_add", "tensordot"})
#: torch.fft's transforms: cuFFT runs FP16 (power-of-two sizes) but not BF16; the CPU runs neither.
FFT_OPS = frozenset(f"fft_{k}{n}" for k in ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft") for n in ("", "2", "n"))

#: Known numerical hazards, by op, and the class the report names for them.
HAZARD_OPS: dict[str, str] = {
    **{op: "accumulation" for op in ("index_add", "scatter_add", "scatter_reduce", "index_reduce",
                                       "index_put", "embedding_bag", "segment_reduce", "bincount")},
    **{op: "softmax" for op in ("softmax", "log_softmax", "logsumexp")},
    **{op: "variance/norm" for op in ("layer_norm", "group_norm", "batch_norm", "rms_norm", "instance_norm",
                                       "var", "std", "var_mean", "std_mean", "norm", "normalize")},
    **{op: "exp/log/pow" for op in ("exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "pow",
                                     "rsqrt", "sqrt", "reciprocal")},
    **{op: "long reduction" for op in ("sum", "mean", "cumsum", "prod", "cumprod", "nansum", "avg_pool1d",
                                        "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                                        "adaptive_avg_pool3d")},
    **{op: "position/trig" for op in ("sin", "cos", "tan", "sinc")},
    **{op: "route" for op in ("topk", "argmax", "argmin", "sort", "argsort", "kthvalue")},
    **{op: "loss" for op in ("cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss",
                             "huber_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits",
                             "kl_div", "ctc_loss", "poisson_nll_loss", "gaussian_nll_loss",
                             "cosine_embedding_loss", "margin_ranking_loss", "triplet_margin_loss")},
}

_TRACKED = MATMUL_OPS | frozenset(HAZARD_OPS)


def op_name(func: Any) -> tuple[str, bool] | None:
    """``(base name, in_place)`` of a torch function (or its name), or None for an untracked one.

    Example:
        >>> import torch
        >>> op_name(torch.Tensor.index_add_)
        ('index_add', True)
    """
    name = func if isinstance(func, str) else getattr(func, "__name__", None)
    if not isinstance(name, str):
        return None
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name in ("rmatmul", "rpow"):
            name = name[1:]
        elif name in ("imatmul", "ipow"):
            return (name[1:], True) if name[1:] in _TRACKED else None
    in_place = name.endswith("_")
    base = ALIASES.get(name, name.rstrip("_"))
    if base not in _TRACKED:
        return None
    return base, in_place


def hazard_of(op: str) -> str | None:
    """The hazard class of an op name, or None.

    Example:
        >>> hazard_of("scatter_add")
        'accumulation'
    """
    return HAZARD_OPS.get(op)
