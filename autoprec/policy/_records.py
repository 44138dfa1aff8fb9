"""The records a policy is made of: one layer's entry, the GradScaler settings, the verification.

Plain frozen data. Each checks its own fields when built (:mod:`autoprec.core._fields`), in code or
from a file, so a policy written by hand is held to the same rules as one read from JSON.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from ..core._fields import (
    FIX,
    bad,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_numbers,
    check_str,
    check_str_map,
    check_strings,
)
from ..core._formats import PRECISIONS
from ..core._fp8 import FP8_RECIPES
from ..errors import PolicyError

__all__ = ["BACK_OFFS", "LOW_DTYPES", "NOISE_MULTIPLE", "HeldOut", "LayerEntry", "ScalerSettings", "StepSpeed", "Verification",
           "low_fraction"]


@dataclass(frozen=True)
class LayerEntry:
    """One layer of a policy. Its fields are checked when it is built (:class:`PolicyError`).

    Example:
        >>> LayerEntry("bf16", flops=10).precision
        'bf16'
        >>> LayerEntry("fp8", recipe="rowwise").recipe
        'rowwise'
        >>> LayerEntry("fp8")
        Traceback (most recent call last):
        ...
        autoprec.errors.PolicyError: LayerEntry field 'recipe' is '' (str); allowed: one of 'tensorwise', 'rowwise', 'rowwise_with_gw_hp' (an fp8 layer names its torchao recipe); correct it (in the policy file, or the code that built the record) or re-run autoprec.tune for a new policy

    ``"fp8"`` is for a Linear's GEMMs (forward and both backward) in FP8 with a torchao ``recipe``; the rest of
    the layer runs in its BF16 region. Other precisions have no recipe.
    """

    precision: str
    reason: str = "cast"           # "cast", or why the layer is FP32
    detail: str = ""               # measured evidence
    excluded: bool = False         # FP32 for a numerical reason measured on this layer
    kind: str = "module"           # "module" | "op"
    op: str = ""
    hazards: tuple[str, ...] = ()
    flops: int = 0                 # forward matmul/conv FLOPs per step
    out_absmax: float = 0.0        # FP32 reference: largest |output|, over all tuning batches
    grad_absmax: float = 0.0       # FP32 reference: largest |gradient| reaching its output
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # format -> probe figures
    recipe: str = ""               # fp8: torchao's recipe; "" otherwise

    def __post_init__(self) -> None:
        r = "LayerEntry"
        check_choice(r, "precision", self.precision, PRECISIONS + ("fp8",))
        if self.precision == "fp8":
            if self.recipe not in FP8_RECIPES:
                raise bad(r, "recipe", self.recipe, "one of " + ", ".join(map(repr, FP8_RECIPES))
                          + " (an fp8 layer names its torchao recipe)")
            if self.kind != "module":
                raise bad(r, "precision", self.precision, "fp8 only for a module (a Linear's GEMMs), not an op entry")
        elif self.recipe != "":
            raise bad(r, "recipe", self.recipe, f"'' for a {self.precision} layer (a recipe is FP8's)")
        for name in ("reason", "detail", "op"):
            check_str(r, name, getattr(self, name))
        check_bool(r, "excluded", self.excluded)
        check_choice(r, "kind", self.kind, ("module", "op"))
        object.__setattr__(self, "hazards", check_strings(r, "hazards", self.hazards))
        check_int(r, "flops", self.flops)
        for name in ("out_absmax", "grad_absmax"):
            object.__setattr__(self, name, check_number(r, name, getattr(self, name), finite=False))
        figures = "an object of format -> {figure name: number}"
        object.__setattr__(self, "measured", check_str_map(r, "measured", self.measured, lambda fmt, v: check_str_map(
            r, f"measured[{fmt!r}]", v, lambda k, x: check_number(r, f"measured[{fmt!r}][{k!r}]", x, low=None,
                                                                      finite=False), figures), figures))


@dataclass(frozen=True)
class ScalerSettings:
    """GradScaler settings for FP16 layers, checked when built.

    Example:
        >>> ScalerSettings(init_scale=1024.0).growth_interval
        2000
    """

    init_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        r = "ScalerSettings"
        object.__setattr__(self, "init_scale", check_number(r, "init_scale", self.init_scale, strict=True))
        object.__setattr__(self, "growth_factor", check_number(r, "growth_factor", self.growth_factor, low=1.0))
        object.__setattr__(self, "backoff_factor", check_number(r, "backoff_factor", self.backoff_factor,
                                                                strict=True, high=1.0))
        check_int(r, "growth_interval", self.growth_interval, low=1)


#: the reasons of layers moved to FP32 by a back-off (not measured to fail alone): autoprec.verify._held_out, autoprec.verify
BACK_OFFS = ("held-out back-off", "verification back-off")

#: A policy passes verification when its loss gap is within ``max(bound, NOISE_MULTIPLE * noise_floor)``.
NOISE_MULTIPLE = 2.0


@dataclass(frozen=True)
class Verification:
    """Short training runs from identical weights and data: FP32 against the policy.

    ``noise_floor`` is the gap between the FP32 run and FP32 from weights rounded to the policy's
    16-bit format (0 where it was not needed: measured only when the gap exceeds ``bound``); the
    verdict compares ``max_gap`` with :attr:`threshold`. A record that contradicts itself (passed
    with a gap over the threshold) is refused.

    ``nothing_cast`` marks a policy with no layer in 16-bit: its last round had nothing to compare
    (no policy run, ``policy_losses`` empty), so it passes without having verified anything; where
    ``rounds`` > 1 the earlier rounds compared cast policies and backed them off (see ``note``).
    ``flops_by_dtype`` is what ran, not what the policy predicts: the forward matmul-class FLOPs of
    one step of the verified policy's run, by operand dtype at dispatch (:class:`autoprec.trace._flops.DtypeFlops`);
    empty where none ran (nothing cast, or a file written before the field).

    Example:
        >>> v = Verification(passed=True, steps=2, fp32_losses=(2.0, 1.0), policy_losses=(2.0, 1.1),
        ...                  max_gap=0.05, bound=0.05, skipped_steps=0, longest_skip_run=0, rounds=1)
        >>> v.threshold
        0.05
        >>> Verification(passed=True, steps=2, fp32_losses=(2.0, 1.0), policy_losses=(2.0, 1.0), max_gap=0.0,
        ...              bound=0.05, skipped_steps=0, longest_skip_run=0, rounds=1,
        ...              flops_by_dtype={"bfloat16": 3, "float32": 1}).measured_fraction
        0.75
    """

    passed: bool
    steps: int
    fp32_losses: tuple[float, ...]
    policy_losses: tuple[float, ...]
    max_gap: float                 # max |policy - fp32| / |fp32 loss at step 0|
    bound: float                   # the bound asked for (tune's verify_tolerance)
    skipped_steps: int
    longest_skip_run: int
    rounds: int                    # verification rounds (1 + back-offs)
    note: str = ""
    compiled: str = ""             # the torch.compile backend of the compiled run, "" where none ran
    compiled_losses: tuple[float, ...] = ()
    compiled_max_gap: float = 0.0
    noise_floor: float = 0.0       # FP32 from 16-bit-rounded weights against FP32, same measure as max_gap
    nothing_cast: bool = False     # the policy casts no layer: its last round compared nothing
    flops_by_dtype: dict[str, int] = field(default_factory=dict)  # operand dtype -> forward FLOPs that ran

    def __post_init__(self) -> None:
        r = "Verification"
        check_bool(r, "passed", self.passed)
        for name, low in (("steps", 0), ("skipped_steps", 0), ("longest_skip_run", 0), ("rounds", 1)):
            check_int(r, name, getattr(self, name), low=low)
        object.__setattr__(self, "fp32_losses", check_numbers(r, "fp32_losses", self.fp32_losses))
        for name in ("policy_losses", "compiled_losses"):
            object.__setattr__(self, name, check_numbers(r, name, getattr(self, name), finite=False))
        for name in ("max_gap", "compiled_max_gap", "noise_floor"):
            object.__setattr__(self, name, check_number(r, name, getattr(self, name), finite=False))
        object.__setattr__(self, "bound", check_number(r, "bound", self.bound, strict=True))
        check_str(r, "note", self.note)
        check_str(r, "compiled", self.compiled)
        check_bool(r, "nothing_cast", self.nothing_cast)
        object.__setattr__(self, "flops_by_dtype", check_str_map(
            r, "flops_by_dtype", self.flops_by_dtype, lambda k, v: check_int(r, f"flops_by_dtype[{k!r}]", v),
            "an object of dtype name -> FLOP count (a non-negative integer)"))
        if self.passed and (self.max_gap > self.threshold or (self.compiled and self.compiled_max_gap > self.threshold)):
            raise PolicyError(f"Verification is marked passed but its loss gap ({self.max_gap:g}, compiled "
                              f"{self.compiled_max_gap:g}) exceeds its threshold {self.threshold:g} (bound "
                              f"{self.bound:g}, noise floor {self.noise_floor:g}): the record contradicts itself; {FIX}")

    @property
    def threshold(self) -> float:
        """The gap the verdict allows: the bound, or twice the measured noise floor where that is larger."""
        return max(self.bound, NOISE_MULTIPLE * self.noise_floor)

    @property
    def measured_fraction(self) -> float | None:
        """Share of :attr:`flops_by_dtype` whose operands were 16-bit or narrower; None where nothing was counted."""
        return low_fraction(self.flops_by_dtype)


#: dtype names of 16 bits or fewer, as :class:`autoprec.trace._flops.DtypeFlops` writes them
LOW_DTYPES = frozenset({"float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"})


def low_fraction(flops_by_dtype: dict[str, int]) -> float | None:
    """The share of FLOPs counted under a 16-bit (or narrower) dtype; None for no FLOPs.

    Example:
        >>> low_fraction({"bfloat16": 1, "float32": 3}), low_fraction({})
        (0.25, None)
    """
    total = sum(flops_by_dtype.values())
    return sum(v for k, v in flops_by_dtype.items() if k in LOW_DTYPES) / total if total else None


@dataclass(frozen=True)
class StepSpeed:
    """What one training step costs with the policy, against FP32 and blanket ``torch.autocast``.

    ``source`` is ``"measured"`` where ``tune`` timed real training steps (forward, backward and
    the optimizer's step) of the model on its tuning batch, on the device it tunes for: ``seconds``
    holds each variant's step time in every interleaved round (``"fp32"``, ``"autocast bf16"``,
    ``"policy"``, and the alternatives the policy was raced against). Otherwise it is
    ``"modelled"`` and ``seconds`` is empty. ``modelled`` is the device profile's figure for the
    policy's step time over FP32's (``profile`` names where that profile comes from), so that
    measured against modelled shows the calibration's error on this model.

    ``blanket`` says, per format, why every layer in that format (blanket autocast) is not
    numerically safe here: the first layer the probe found failing in it and why, or the error of
    all layers cast together; ``""`` where it is safe (every layer alone and all together within
    the bound; "not shown safe: ..." where verification had to back the policy off). ``chosen``
    names the assignment that ships (``"search"``: the search's own; else the alternative measured
    clearly faster). ``note`` says how the figures were taken.

    Example:
        >>> s = StepSpeed("measured", modelled=0.66,
        ...               seconds={"fp32": (0.05, 0.046, 0.047), "policy": (0.04, 0.041, 0.05)})
        >>> s.median("policy"), round(s.ratio("policy", "fp32"), 3), round(s.spread("fp32"), 6)
        (0.041, 0.872, 0.002)
    """

    source: str                    # "measured" | "modelled"
    modelled: float                # modelled policy step time / FP32 step time (device profile)
    profile: str = ""              # where the profile behind ``modelled`` comes from
    seconds: dict[str, tuple[float, ...]] = field(default_factory=dict)  # variant -> step seconds per round
    blanket: dict[str, str] = field(default_factory=dict)  # format -> why blanket is not safe ("" = safe)
    chosen: str = "search"
    note: str = ""

    def __post_init__(self) -> None:
        r = "StepSpeed"
        check_choice(r, "source", self.source, ("measured", "modelled"))
        object.__setattr__(self, "modelled", check_number(r, "modelled", self.modelled))
        for name in ("profile", "chosen", "note"):
            check_str(r, name, getattr(self, name))
        times = "an object of variant -> list of step seconds (finite, > 0; at least one)"

        def rounds(name: str, v: object) -> tuple[float, ...]:
            out = check_numbers(r, f"seconds[{name!r}]", v)
            if not out or min(out) <= 0:
                raise bad(r, f"seconds[{name!r}]", v, times)
            return out
        object.__setattr__(self, "seconds", check_str_map(r, "seconds", self.seconds, rounds, times))
        object.__setattr__(self, "blanket", check_str_map(r, "blanket", self.blanket))

    def median(self, variant: str) -> float:
        """Median step seconds of ``variant`` over its rounds."""
        return statistics.median(self.seconds[variant])

    def spread(self, variant: str) -> float:
        """Half the range of ``variant``'s rounds: the figure's +- in seconds."""
        times = self.seconds[variant]
        return (max(times) - min(times)) / 2

    def ratio(self, variant: str, base: str) -> float:
        """``variant``'s median step time over ``base``'s (< 1: ``variant`` is faster)."""
        return self.median(variant) / self.median(base)


@dataclass(frozen=True)
class HeldOut:
    """The shipped policy checked on data its decisions were not made on (see :mod:`autoprec.verify._held_out`).

    ``held`` says what was held out (``"2 of 8 rows"``, ``"1 of 4 batches"``); ``skipped`` why nothing
    was (then the figures are 0). ``loss_err``/``grad_err``: the shipped policy's errors against FP32 on
    the held-out data. ``first_loss_err``/``first_grad_err``: the searched policy's on the held-out data,
    before any back-off (equal to the shipped figures where nothing was backed off), and
    ``tuning_loss_err``/``tuning_grad_err`` its errors on the tuning data, as the search measured them;
    ``margin``: how many times its held-out error exceeds its tuning error (at least 1), the margin the
    check calibrated;
    ``backed_off``: the layers put back in FP32, in the order they were; ``rounds``: held-out passes of a
    policy (1 + back-offs).

    Example:
        >>> h = HeldOut("2 of 8 rows", loss_err=0.001, grad_err=0.01, tuning_loss_err=0.001, tuning_grad_err=0.008,
        ...             first_loss_err=0.001, first_grad_err=0.01, bound_loss=0.01, bound_grad=0.05)
        >>> h.passed, h.margin
        (True, 1.25)
    """

    held: str
    skipped: str = ""
    loss_err: float = 0.0
    grad_err: float = 0.0
    tuning_loss_err: float = 0.0
    tuning_grad_err: float = 0.0
    first_loss_err: float = 0.0
    first_grad_err: float = 0.0
    bound_loss: float = 0.01
    bound_grad: float = 0.05
    backed_off: tuple[str, ...] = ()
    rounds: int = 1

    def __post_init__(self) -> None:
        r = "HeldOut"
        check_str(r, "held", self.held)
        check_str(r, "skipped", self.skipped)
        for name in ("loss_err", "grad_err", "tuning_loss_err", "tuning_grad_err", "first_loss_err", "first_grad_err"):
            object.__setattr__(self, name, check_number(r, name, getattr(self, name), finite=False))
        for name in ("bound_loss", "bound_grad"):
            object.__setattr__(self, name, check_number(r, name, getattr(self, name), strict=True))
        object.__setattr__(self, "backed_off", check_strings(r, "backed_off", self.backed_off))
        check_int(r, "rounds", self.rounds, low=1)

    @property
    def passed(self) -> bool:
        """Whether the shipped policy is within both bounds on the held-out data (True where nothing was held out)."""
        return self.skipped != "" or (self.loss_err <= self.bound_loss and self.grad_err <= self.bound_grad)

    @property
    def margin(self) -> float:
        """The search's policy's held-out error over its tuning error (the larger ratio of loss and gradients, >= 1)."""
        ratios = [h / t for h, t in ((self.first_loss_err, self.tuning_loss_err),
                                     (self.first_grad_err, self.tuning_grad_err)) if t > 0]
        return round(max([1.0, *ratios]), 3)
