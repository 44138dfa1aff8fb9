"""FP8 for the GEMMs of an ``nn.Linear``: torchao's recipes, its config for a device, and the functional FP8 linear
the runtime and the probe run.

torchao (the ``autoprec[fp8]`` extra) does the work: its ``Float8LinearConfig`` recipes and the autograd function
``Float8Linear.forward`` calls, so a layer trains exactly as torchao's ``Float8Linear`` trains it, through the
runtime's class swap instead of a module swap. Where the device has no FP8 GEMMs (a CPU, a GPU before sm89) torchao
emulates them (``emulate=True``): the casts, scales and rounding are FP8's, the products are not fast.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import torch

from ..errors import FormatError, OptionError

__all__ = ["FP8_RECIPES", "Fp8Gemms", "float8", "fp8_gemms", "fp8_linear", "fp8_ready"]

#: torchao's training recipes (``Float8LinearConfig.from_recipe_name``); each emulates on the CPU (torchao 0.18)
FP8_RECIPES: tuple[str, ...] = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
_MISSING = ("FP8 needs torchao, which is not installed: pip install 'autoprec[fp8]' (torchao>=0.18), "
            "or leave 'fp8' out of the formats")


def float8() -> tuple[Any, Any, Any]:
    """torchao's ``Float8LinearConfig``, ``Float8Linear`` and the autograd function its forward calls, or a
    :class:`FormatError` naming the extra.

    Example:
        >>> try:
        ...     name = float8()[1].__name__
        ... except FormatError:  # torchao is not installed
        ...     name = "Float8Linear"
        >>> name
        'Float8Linear'
    """
    quiet = logging.getLogger("torchao")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its CUDA kernels' libraries fail to load on a CPU build, and it says so
    try:
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args
    except ImportError as e:
        raise FormatError(_MISSING) from e
    finally:
        quiet.setLevel(level)
    return Float8LinearConfig, Float8Linear, matmul_with_hp_or_float8_args


def fp8_ready() -> bool:
    """Whether torchao is installed, so that FP8 can run here.

    Example:
        >>> isinstance(fp8_ready(), bool)
        True
    """
    try:
        float8()
    except FormatError:
        return False
    return True


def check_recipe(recipe: str) -> str:
    """``recipe`` when it is one of :data:`FP8_RECIPES`, else an :class:`OptionError` naming them.

    Example:
        >>> check_recipe("rowwise")
        'rowwise'
    """
    if recipe not in FP8_RECIPES:
        raise OptionError(f"unknown FP8 recipe {recipe!r}: use one of {', '.join(FP8_RECIPES)}")
    return recipe


def native_fp8(device: torch.device) -> bool:
    """Whether ``device`` runs FP8 GEMMs in hardware (CUDA sm89 and later).

    Example:
        >>> native_fp8(torch.device("cpu"))
        False
    """
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def config(recipe: str, device: torch.device) -> Any:
    """torchao's config for ``recipe``, emulated unless ``device`` has FP8 GEMMs (:func:`native_fp8`).

    Example:
        >>> try:
        ...     emulated = config("tensorwise", torch.device("cpu")).emulate
        ... except FormatError:  # torchao is not installed
        ...     emulated = True
        >>> emulated
        True
    """
    check_recipe(recipe)
    config_cls = float8()[0]
    return dataclasses.replace(config_cls.from_recipe_name(recipe), emulate=not native_fp8(device))


@dataclasses.dataclass(frozen=True, eq=False)
class Fp8Gemms:
    """What one FP8 Linear runs with: the recipe, torchao's config, its GEMM configs (``LinearMMConfig``) and the
    autograd function (held here: the import is no work for ``torch.compile`` to trace at each call)."""

    recipe: str
    config: Any
    mm_config: Any
    function: Any


@functools.lru_cache(maxsize=32)
def _gemms(recipe: str, emulate: bool) -> Fp8Gemms:
    config_cls, float8_linear, function = float8()
    cfg = dataclasses.replace(config_cls.from_recipe_name(recipe), emulate=emulate)
    with torch.device("meta"):  # torchao builds the GEMM configs in __init__: one shape-less module, no storage
        shell = float8_linear(16, 16, bias=False, config=cfg)
    return Fp8Gemms(recipe, cfg, shell.linear_mm_config, function)


def fp8_gemms(recipe: str, device: torch.device) -> Fp8Gemms:
    """The FP8 configuration a Linear on ``device`` runs ``recipe`` with (emulated without FP8 GEMMs).

    Example:
        >>> try:
        ...     recipe = fp8_gemms("rowwise", torch.device("cpu")).recipe
        ... except FormatError:  # torchao is not installed
        ...     recipe = "rowwise"
        >>> recipe
        'rowwise'
    """
    float8()  # torchao still importable (a cached config outlives an uninstall, or a test that hides it)
    return _gemms(check_recipe(recipe), not native_fp8(device))


def fp8_linear(gemms: Fp8Gemms, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with its forward and both backward GEMMs in FP8, as torchao's
    ``Float8Linear.forward`` computes it: ``x`` in the high precision the output takes (BF16 in a region), the
    weight the FP32 master, cast per the recipe; the bias added in the output's dtype. Autocast must be off.

    Example:
        >>> w, x = torch.randn(16, 32), torch.randn(4, 32, dtype=torch.bfloat16)
        >>> try:
        ...     y = fp8_linear(fp8_gemms("tensorwise", x.device), w, None, x)
        ... except FormatError:  # torchao is not installed
        ...     y = torch.empty(4, 16, dtype=torch.bfloat16)
        >>> y.shape, y.dtype
        (torch.Size([4, 16]), torch.bfloat16)
    """
    out = gemms.function.apply(x, weight.t(), gemms.mm_config, gemms.config)
    return out if bias is None else out + bias.to(out.dtype)
