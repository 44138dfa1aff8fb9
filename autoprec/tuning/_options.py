"""The records ``autoprec.tune`` hands its stages: the checked options, the passes each stage ran, the stats.

:class:`TuneOptions` is what ``tune`` resolved from its keyword arguments (formats, target, tolerances,
budgets) after checking them; the stages read it instead of a score of keyword parameters.
:class:`TuneStats` is ``policy.stats`` as a record: :meth:`TuneStats.as_dict` gives the plain dict a
policy file keeps, in a fixed key order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..probe._training import OptimizerFactory
from ..search._records import Tolerance

__all__ = ["Passes", "TuneOptions", "TuneStats"]


@dataclass(frozen=True)
class TuneOptions:
    """The options of one ``tune`` call, checked and resolved: what its stages read.

    Example:
        >>> import torch
        >>> from autoprec.probe._training import default_optimizer
        >>> from autoprec.search import Tolerance
        >>> o = TuneOptions(formats=("bf16",), target="cuda", device=torch.device("cpu"), tol=Tolerance(0.01, 0.05),
        ...                 verify_tolerance=0.05, verify_steps=20, optimizer=default_optimizer, n_trials=30,
        ...                 storage=None, headroom=8.0, seed=0, verify_compile=None, share_roles=True, timing=False)
        >>> o.device_type, o.emulated
        ('cpu', True)
    """

    formats: tuple[str, ...]          # the 16-bit formats allowed (autoprec.core._formats.check_formats)
    target: str                       # the device the policy is for: "cpu" or "cuda"
    device: torch.device              # the device the model is on: where tuning runs
    tol: Tolerance                    # the bounds at the loss and the gradients
    verify_tolerance: float           # the bound on the loss-curve gap in verification
    verify_steps: int                 # training steps per verification run (0: no verification)
    optimizer: OptimizerFactory       # the verification optimizer (autoprec.probe._training.default_optimizer)
    n_trials: int                     # Optuna trials at most
    storage: Any                      # the Optuna study's storage, or None
    headroom: float                   # the range margin
    seed: int
    verify_compile: str | None        # a torch.compile backend verification also trains with
    share_roles: bool                 # probe repeated blocks' roles as groups first
    timing: bool                      # time real training steps (the tuning device is the target)
    rows: int | None = None           # the tuning batch's rows (its tensors' shared leading size), if any
    train_batch_size: int | None = None  # the real training step's rows: layers are priced at that step
    fp8: bool = False                 # "fp8" allowed too: Linears' GEMMs in FP8 where measured safe and faster

    @property
    def device_type(self) -> str:
        """``"cpu"`` or ``"cuda"``: where the passes run."""
        return self.device.type

    @property
    def emulated(self) -> bool:
        """A CUDA policy measured on a CPU: every pass runs CUDA autocast's rules."""
        return self.device.type == "cpu" and self.target == "cuda"


@dataclass(frozen=True)
class Passes:
    """The forward+backward passes (or training steps) each stage ran on this rank.

    Example:
        >>> Passes(probe=12, search=30, verify=40, held_out=0).search
        30
    """

    probe: int
    search: int
    verify: int
    held_out: int


@dataclass(frozen=True)
class TuneStats:
    """``policy.stats`` as a record; :meth:`as_dict` is the dict the policy keeps, its keys in this order.

    Example:
        >>> s = TuneStats(tuning_seconds=1.0, probe_passes=3, search_passes=4, verify_passes=0,
        ...               held_out_passes=0, world_size=1, trials=4, headroom=8.0, candidates=2, probe_roles=0,
        ...               probe_shared=0, probe_measurements=2, measured_loss_err=0.001, measured_grad_err=0.01,
        ...               modelled_cost_ratio=0.5, fx_route="fx", fx_nodes=5, loss_scale_suggested=1.0,
        ...               scaler_trials=0, scaler_predicted_skip_rate=0.0, fp32_grad_absmax=1.0, device="cpu",
        ...               capability="", profile_origin="estimate", profile="estimate", calibration_seconds=0.0,
        ...               priced_rows=None, format_speed={"bf16": 2.0}, progress={"stages": {}})
        >>> list(s.as_dict())[:3], list(s.as_dict())[-2:]
        (['tuning_seconds', 'probe_passes', 'search_passes'], ['format_speed', 'stages'])
    """

    tuning_seconds: float
    probe_passes: int
    search_passes: int
    verify_passes: int
    held_out_passes: int
    world_size: int                   # the passes above are this rank's (autoprec.distributed._ranks)
    trials: int
    headroom: float                   # the range margin the probe and search used (autoprec.guard checks with it)
    candidates: int
    probe_roles: int
    probe_shared: int                 # rows that are a role's bound
    probe_measurements: int
    measured_loss_err: float
    measured_grad_err: float
    modelled_cost_ratio: float        # of the policy that ships
    fx_route: str
    fx_nodes: int
    loss_scale_suggested: float
    scaler_trials: int
    scaler_predicted_skip_rate: float
    fp32_grad_absmax: float
    device: str
    capability: str
    profile_origin: str
    profile: str
    calibration_seconds: float
    priced_rows: int | None           # the batch rows the costs were priced at (train_batch_size), else None
    format_speed: Mapping[str, Any]   # modelled FP32 step time of the matmul/conv layers over each format's (< 1: slower)
    progress: Mapping[str, Any]       # the progress bars' summary: stages (passes, time, peak memory), the meter's peak

    def as_dict(self) -> dict[str, Any]:
        """The plain dict ``policy.stats`` is: the fields in order, then the progress summary's keys."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "progress"}
        out.update(self.progress)
        return out
