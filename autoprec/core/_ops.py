"""The op vocabulary: which torch calls are layers of their own, and which are numerical hazards.

Shared by the trace (which names layers), the cost model (which prices them) and the runtime (which
gives functional ops in a module's own code their precision).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any

__all__ = ["ALIASES", "AUTOCAST_GAPS", "CUDA_FP32_OPS", "CUDA_LISTS", "CUDA_LOWER_OPS", "CUDA_PROMOTE_OPS", "FFT_OPS",
           "HAZARD_OPS", "MATMUL_OPS", "fallback_cuda_lists", "hazard_of", "op_name", "torch_cuda_lists"]

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
#: weight they raise, so a 16-bit unit that may call them runs with its own weights cast to its format
#: (``autoprec.runtime``), and an op layer's region casts its operands. A function mode could not do it
#: under torch.compile: Dynamo hands no mode a function torch does not list as overridable
#: (``torch._grouped_mm``), and torch 2.13 compiles grouped_mm with BF16 operands only.
AUTOCAST_GAPS = frozenset({"bilinear", "grouped_mm"})

#: Torch-level names that are one op under another name.
ALIASES = {"_grouped_mm": "grouped_mm"}

#: CUDA autocast's op lists as the installed torch declares them: the ``AT_FORALL_*`` macros of its
#: ``include/ATen/autocast_mode.h``, which ``autocast_mode.cpp`` registers for CUDA (aten names, overloads
#: dropped; ``norm`` is the FP32 op with a different redispatch signature). Only out-of-place calls without
#: ``out=`` (and, for the FP32 ones, without ``dtype=``) autocast.
_MACROS = {"lower": ("LOWER_PRECISION_FP",), "fp32": ("FP32", "FP32_SET_OPT_DTYPE", "DIFFERENT_REDISPATCH_SIGNATURE"),
           "promote": ("PROMOTE",)}


def torch_cuda_lists(header: str | None = None) -> dict[str, frozenset[str]] | None:
    """CUDA autocast's ``lower``/``fp32``/``promote`` op lists read from torch's ``ATen/autocast_mode.h`` (the
    installed one by default), or None where the header is missing or has not every list.

    Example:
        >>> lists = torch_cuda_lists()
        >>> "mm" in lists["lower"], "exp" in lists["fp32"], "vdot" in lists["promote"]
        (True, True, True)
    """
    path = Path(header) if header else Path(importlib.util.find_spec("torch").origin).parent / _HEADER
    try:
        text = path.read_text()
    except OSError:
        return None
    lists = {}
    for rule, macros in _MACROS.items():
        bodies = [re.search(rf"#define AT_FORALL_{m}\(_\)((?:.*\\\n)*.*)", text) for m in macros]
        if None in bodies:
            return None
        lists[rule] = frozenset(n for b in bodies for n in re.findall(r"\b_\(\s*(?:ADD_NS\()?(\w+)", b.group(1)))
    return lists


_HEADER = "include/ATen/autocast_mode.h"


def fallback_cuda_lists(version: str) -> dict[str, frozenset[str]]:
    """CUDA autocast's lists as torch 2.13 declares them, for a torch that ships no header: ``rms_norm`` joined
    the FP32 list in torch 2.12 (it ran in the dtype that arrived before).

    Example:
        >>> "rms_norm" in fallback_cuda_lists("2.11.0")["fp32"], "rms_norm" in fallback_cuda_lists("2.13.0")["fp32"]
        (False, True)
    """
    fp32 = _FALLBACK_FP32 | ({"rms_norm"} if tuple(map(int, re.findall(r"\d+", version)[:2])) >= (2, 12) else set())
    return {"lower": _FALLBACK_LOWER, "fp32": frozenset(fp32), "promote": _FALLBACK_PROMOTE}


_FALLBACK_LOWER = frozenset({
    "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv",
    "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
})
_FALLBACK_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "group_norm", "frobenius_norm",
    "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d",
    "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_nearest3d",
    "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
    "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm", "sum", "norm",
})
_FALLBACK_PROMOTE = frozenset({"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler",
                               "index_put", "tensordot", "scatter_add"})

#: The installed torch's lists (its header's; :func:`fallback_cuda_lists` where it ships none)
CUDA_LISTS = torch_cuda_lists() or fallback_cuda_lists(importlib.metadata.version("torch"))

#: Torch functions off those lists (Python functions, dunders, the cuDNN kernels ``autocast_mode.cpp`` adds) whose
#: calls CUDA autocast treats by the rule of the aten ops they call: the recurrent layers and attention call
#: cuDNN's and SDPA's (lower); norm, normalize, softmin, cross_entropy, interpolate, ``**`` and ``scalar / x`` call
#: norm, softmax, log_softmax + nll_loss, upsample_*, pow and reciprocal (FP32); grid_sample calls grid_sampler.
_FUNCTIONS = {
    "lower": (MATMUL_OPS - {"bilinear"}) | {"cudnn_convolution", "cudnn_convolution_transpose"},
    "fp32": {"normalize", "softmin", "cross_entropy", "interpolate", "upsample", "upsample_nearest",
             "upsample_bilinear", "__pow__", "__rpow__", "__rdiv__", "__rtruediv__"},
    "promote": {"grid_sample"},
}
#: By the names the ops have as torch functions (``Tensor.__rtruediv__`` is called ``__rdiv__``).
#: Cast to the region's 16-bit format:
CUDA_LOWER_OPS = CUDA_LISTS["lower"] | _FUNCTIONS["lower"]
#: Computed in FP32 whatever the region's format (inputs cast up, the output FP32; an op that takes a dtype,
#: sum or softmax, computes in FP32 unless the call names one):
CUDA_FP32_OPS = CUDA_LISTS["fp32"] | _FUNCTIONS["fp32"]
#: Run in the widest floating dtype among their inputs:
CUDA_PROMOTE_OPS = CUDA_LISTS["promote"] | _FUNCTIONS["promote"]
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
