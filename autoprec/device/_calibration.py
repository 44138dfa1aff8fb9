"""Calibrate where you tune: measure the device's speeds per format, bounded in time, cached per machine.

:func:`calibrate` measures what the cost model (:mod:`autoprec.device._costs`) prices, on the device
(``cuda:N``: that GPU, its events and its synchronize), with the intra-op threads the caller has set,
forward+backward, formats interleaved. Each figure is a throughput: seconds per call of calls
launched back to back between two events, one synchronize per sample, as a training step launches
its kernels (see :mod:`autoprec.device._timing`):

* matmul, conv and attention kernels along a ladder of sizes (each under ``torch.autocast`` with
  its input already in the format and FP32 weights, as the runtime runs a layer), up to 8192-wide
  GEMMs on a GPU and 1024 on a CPU (:func:`ladders`);
* elementwise work (pointwise, norm, softmax, scatter accumulation) at two sizes, giving a cost
  per call (the dispatcher on a CPU, the kernel launch on a GPU) and per element, and the cost of
  a cast per element;
* the runtime's own overhead per 16-bit region (:class:`autoprec.runtime.Runtime` on tiny layers);
* on a GPU with FP8 tensor cores (sm_89+), FP8 GEMMs (``torch._scaled_mm``) along the matmul ladder: the
  matmul curve's ``"fp8"`` entry (:mod:`autoprec.device._fp8_timing`), which prices FP8 Linears
  (:func:`autoprec.device.fp8_price`); elsewhere none.

:func:`with_layers` adds a model's own layers, timed at their own shapes. Both stop at a time
budget: what is left unmeasured is priced from the curves, and the cost notes say which. Results
are cached in ``$AUTOPREC_CACHE_DIR``, else ``$XDG_CACHE_HOME/autoprec``, else
``~/.cache/autoprec``, one file per machine (device name, capability, torch version, threads).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core._formats import from_dtype, to_dtype
from ..errors import AutoprecError, OptionError, ProfileError
from ..trace._trace import Layer
from . import _timing as timing
from ._costs import DeviceProfile, layer_cost, shape_key
from ._estimates import CPU_FP32_OPS, CUDA_FP32_OPS, estimate
from ._files import load_profile, save_profile
from ._fp8_timing import fp8_capable, with_fp8
from ._timing import GIVE_UP, Clock, pinned

__all__ = ["cache_dir", "cache_file", "calibrate", "fp32_kind", "ladders", "machine", "resolve_profile", "with_layers"]

log = logging.getLogger("autoprec.calibration")

#: Square GEMM sides, conv channels, attention sequence lengths of the ladders, smallest first. A GPU
#: climbs further: its 16-bit gain grows with the size up to where the tensor cores are busy, and
#: beyond its largest measured size a curve is priced at that size's throughput.
_GEMM = (32, 64, 128, 256, 512, 1024)
_CONV = (8, 16, 32, 64, 128)
_ATTN = (32, 64, 128, 256, 512)
_CUDA_GEMM = _GEMM + (2048, 4096, 8192)
_CUDA_CONV = _CONV + (256, 512)
_CUDA_ATTN = _ATTN + (1024, 2048, 4096)


def ladders(device_type: str) -> tuple[tuple[str, tuple[int, ...], float], ...]:
    """The kernels :func:`calibrate` times on a ``device_type``, in order: ``(kind, sizes, share)``, where
    ``share`` is the part of the budget left after the elementwise work that this ladder and those
    before it may use together (matmul 60%, then attention and conv 20% each). Each ladder stops at
    its part of the budget, after its two smallest sizes.

    Example:
        >>> [sizes[-1] for kind, sizes, share in ladders("cpu")], [sizes[-1] for _, sizes, _ in ladders("cuda")]
        ([1024, 512, 128], [8192, 4096, 512])
    """
    if device_type == "cuda":
        return ("matmul", _CUDA_GEMM, 0.6), ("attention", _CUDA_ATTN, 0.8), ("conv", _CUDA_CONV, 1.0)
    return ("matmul", _GEMM, 0.6), ("attention", _ATTN, 0.8), ("conv", _CONV, 1.0)


def cache_dir() -> str:
    """Where calibrations are cached: ``$AUTOPREC_CACHE_DIR``, ``$XDG_CACHE_HOME/autoprec`` or ``~/.cache/autoprec``.

    Example:
        >>> import os
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"AUTOPREC_CACHE_DIR": "/tmp/ap-cache"}):
        ...     cache_dir()
        '/tmp/ap-cache'
    """
    if os.environ.get("AUTOPREC_CACHE_DIR"):
        return os.environ["AUTOPREC_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "autoprec")


def machine(device: torch.device) -> tuple[str, str]:
    """``(device name, capability)`` of a CPU or CUDA device. The capability names which FP32 runs here, as
    the speed of "fp32" depends on it: on CUDA, matmuls strict or on TF32 (``allow_tf32``, PyTorch's default
    strict) and cuDNN convolutions (default TF32); on a CPU, a ``float32_matmul_precision`` other than
    ``"highest"``. It is part of the calibration cache's key, the profile and the report.

    Example:
        >>> name, capability = machine(torch.device("cpu"))
        >>> ("avx512_bf16 yes" in capability) == torch.cpu._is_avx512_bf16_supported()
        True
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return torch.cuda.get_device_name(device), f"sm_{major}{minor}, {fp32_kind('cuda')}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), name)
    except OSError:
        pass
    bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    cap = torch.backends.cpu.get_cpu_capability()
    out = f"{cap}, avx512_bf16 {'yes' if bf16 else 'no'}, amx {'yes' if amx else 'no'}"
    # oneDNN's ISA limit (read by oneDNN when it starts): AVX512_CORE turns off its AVX512-BF16 and AMX
    # kernels, and BF16 matmuls then run 5x slower than FP32 on a CPU that has both. Another configuration.
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if isa and isa.strip().upper() != "ALL":
        out += f", oneDNN max ISA {isa.strip().upper()}"
    kind = fp32_kind("cpu")
    return name, out + (f", {kind}" if kind else "")


def fp32_kind(device_type: str) -> str:
    """Which FP32 matmuls (and, on CUDA, convolutions) run in this process, in words; "" on a CPU at
    PyTorch's default precision.

    Example:
        >>> fp32_kind("cpu")  # PyTorch's default: "highest"
        ''
        >>> fp32_kind("cuda")  # PyTorch's defaults, whether or not a GPU is here
        'FP32 matmuls strict, convolutions TF32'
    """
    if device_type == "cuda":
        matmul = "TF32" if torch.backends.cuda.matmul.allow_tf32 else "strict"
        conv = "TF32" if torch.backends.cudnn.allow_tf32 else "strict"
        return f"FP32 matmuls {matmul}, convolutions {conv}"
    precision = torch.get_float32_matmul_precision()
    return "" if precision == "highest" else f"FP32 matmul precision {precision}"


def _key(device: torch.device) -> tuple[str, str, str]:
    name, capability = machine(device)
    ident = f"{name}|{capability}|{torch.__version__}|{torch.get_num_threads()}"
    return name, capability, hashlib.sha256(ident.encode()).hexdigest()[:16]


def cache_file(device: torch.device) -> str:
    return os.path.join(cache_dir(), f"{device.type}-{_key(device)[2]}.json")


def _store(profile: DeviceProfile, path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_profile(profile, path)
    except OSError as exc:  # a read-only home: calibrate again next time, and say so
        log.warning("could not write the calibration cache %s (%s): set AUTOPREC_CACHE_DIR to a writable "
                    "directory to keep it", path, exc)


def _cached(device: torch.device) -> DeviceProfile | None:
    path = cache_file(device)
    if not os.path.exists(path):
        return None
    try:
        return load_profile(path, origin="calibrated")
    except AutoprecError as exc:  # a damaged cache is measured again, never trusted
        log.warning("ignoring the calibration cache %s: %s", path, exc)
        return None


def _device(device: str | torch.device) -> torch.device:
    """The device to calibrate, with its index (``cuda``: the current CUDA device), or :class:`OptionError`."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"calibrate device {str(device)!r} is not supported: use 'cpu' or 'cuda'")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError(f"calibrate device {str(device)!r}: this process sees no CUDA device; calibrate "
                              "on the GPU machine, or pass device='cpu'")
        if device.index is not None and device.index >= count:
            raise OptionError(f"calibrate device {str(device)!r}: this process sees {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}; pass one of those")
    return pinned(device)


def calibrate(device: str | torch.device = "cpu", *, dtypes: Iterable[str] = ("bf16",), seconds: float = 3.0,
              cache: bool = True, fresh: bool = False) -> DeviceProfile:
    """Measure the device profile of ``device`` for FP32 and ``dtypes`` (or read it from the cache).

    ``device``: ``"cpu"``, ``"cuda"`` (the current CUDA device) or ``"cuda:N"``; every tensor, event and
    synchronize of the measuring is on that device, and its name and capability key the cache.
    ``seconds`` bounds the measuring: the ladders stop at the budget (their two smallest sizes are
    always measured). The result is cached per machine unless ``cache=False``; a cached profile
    measures nothing (``profile.seconds`` is 0). ``fresh=True`` measures even where a cached profile
    exists and replaces it (one measured while the machine was busy, say: every later ``tune`` here
    prices formats with the cache).

    Example:
        >>> import autoprec
        >>> p = autoprec.calibrate("cpu", seconds=0.5, cache=False)
        >>> p.origin, p.formats
        ('calibrated', ('fp32', 'bf16'))
    """
    device = _device(device)
    if not isinstance(seconds, (int, float)) or not seconds > 0:
        raise OptionError(f"calibrate seconds={seconds!r} must be a positive number of seconds, e.g. 3.0")
    names = {from_dtype(to_dtype(d)) for d in ([dtypes] if isinstance(dtypes, str) else dtypes)}
    formats = ("fp32",) + tuple(f for f in ("fp16", "bf16") if f in names)
    found = _cached(device) if cache and not fresh else None
    fp8 = fp8_capable(device)
    if found is not None:
        if set(formats) <= set(found.formats) and (found.fp8 or not fp8):  # a cache from before FP8 is measured again
            return found
        formats = tuple(f for f in ("fp32", "fp16", "bf16") if f in set(formats) | set(found.formats))
    started = time.perf_counter()
    clock = Clock(device, started + seconds)
    gen = torch.Generator().manual_seed(0)
    name, capability, _ = _key(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        region = timing.region(formats, clock, device, gen)
        elementwise, cast = timing.elementwise(formats, clock, device, gen)
        end, curves = clock.deadline, []
        remaining = max(end - time.perf_counter(), 0.0)
        for kind, sizes, share in ladders(device.type):
            clock.deadline = end - remaining * (1.0 - share)  # matmul 60% of what is left, then 20%, 20%
            curves.append(timing.curve(kind, sizes, formats, clock, device, gen))
    profile = DeviceProfile(
        target=device.type, device=name, capability=capability, origin="calibrated", curves=tuple(curves),
        elementwise=elementwise, cast=cast, region=region,
        full_width_ops=CUDA_FP32_OPS if device.type == "cuda" else CPU_FP32_OPS,
        torch_version=torch.__version__, threads=torch.get_num_threads())
    if fp8:  # FP8 GEMMs along the matmul ladder, a tenth of the budget more (one round each at least)
        clock.deadline = time.perf_counter() + 0.1 * seconds
        with torch.random.fork_rng(devices=[device]):
            profile = with_fp8(profile, clock, device, gen)
    took = time.perf_counter() - started
    profile = _replace(profile, seconds=took)
    log.info("calibrated %s (%s) in %.2fs: %d timed steps", name, capability, took, clock.timed)
    if cache:
        path = cache_file(device)
        _store(profile, path)
        profile = _replace(profile, source=path)
    return profile


def _replace(profile: DeviceProfile, **kw: Any) -> DeviceProfile:
    return dataclasses.replace(profile, **kw)


def with_layers(profile: DeviceProfile, layers: Iterable[Layer], modules: Mapping[str, nn.Module], *,
                device: torch.device, seconds: float = 1.0, cache: bool = True) -> DeviceProfile:
    """``profile`` plus the given layers timed at their own shapes (largest FLOPs first, until ``seconds``).

    The modules are copied (the model is never run for this); layers already in the profile, and
    layers whose step cannot be made from their shapes, are not timed. ``profile.seconds`` grows by
    the time spent.

    Example:
        >>> import autoprec
        >>> from autoprec.trace import trace
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> tr = trace(m, torch.randn(32, 64), device_type="cpu")
        >>> p = with_layers(autoprec.calibrate(seconds=0.3, cache=False), tr.layers, {"0": m[0]},
        ...                 device=torch.device("cpu"), cache=False)
        >>> p.layers[shape_key(tr.layers[0])]["fp32"] > 0  # seconds, forward+backward at its shape
        True
    """
    started, device = time.perf_counter(), pinned(device)
    todo = sorted((lay for lay in layers if shape_key(lay) not in profile.layers), key=lambda lay: -lay.flops)
    if not todo:
        return profile
    clock = Clock(device, started + seconds)
    gen = torch.Generator().manual_seed(0)
    measured = dict(profile.layers)
    formats = profile.formats
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        for lay in todo:
            if clock.left() <= 0:
                break
            key = shape_key(lay)
            if key in measured:
                continue
            mod = modules.get(lay.key) if lay.kind == "module" else None
            try:
                mod = copy.deepcopy(mod) if mod is not None else None
                steps = {f: timing.layer_step(lay, mod, f, device, gen) for f in formats}
                if any(s is None for s in steps.values()):
                    continue
                # a format the curve already finds far slower is not timed at a large shape (CPU FP16)
                steps = {f: s for f, s in steps.items() if f == "fp32" or _affordable(profile, lay, f)}
                measured[key] = clock.fastest(steps, reps=5, slice_s=min(0.2, max(clock.left(), 0.0)))
            except Exception as exc:  # noqa: BLE001 - a layer that cannot run on made-up inputs is modelled
                log.debug("layer %s not timed at its shape (%s): priced from the curves", lay.key, exc)
    took = time.perf_counter() - started
    log.info("timed %d layer shapes in %.2fs", len(measured) - len(profile.layers), took)
    out = _replace(profile, layers=measured, seconds=profile.seconds + took)
    if cache and profile.origin == "calibrated":
        _store(out, cache_file(device))
    return out


def _affordable(profile: DeviceProfile, layer: Layer, fmt: str) -> bool:
    return layer_cost(layer, fmt, profile) <= GIVE_UP * max(layer_cost(layer, "fp32", profile), 1e-4)


def resolve_profile(profile: Any, *, target: str, device: torch.device, formats: Sequence[str]) -> DeviceProfile:
    """The profile a tuning run prices with.

    ``profile``: a :class:`DeviceProfile`, or the path of a profile file; None: the first file in
    ``$AUTOPREC_PROFILE`` (paths separated by ``os.pathsep``) for ``target``, else a calibration of
    the device tuned on when it is the target's kind (a CPU is always there to calibrate), else the
    built-in estimate (CUDA tuned from a CPU). It must price every format in ``formats``.

    Example:
        >>> import autoprec
        >>> gpu = estimate("cuda")
        >>> resolve_profile(gpu, target="cuda", device=torch.device("cpu"), formats=("fp16", "bf16")).origin
        'estimate'
        >>> resolve_profile(gpu, target="cpu", device=torch.device("cpu"), formats=("bf16",))
        Traceback (most recent call last):
        ...
        autoprec.errors.ProfileError: the device profile 'built-in H100 estimate (public figures; FP32 matmuls strict, 67 TFLOP/s)' is for target 'cuda', but the policy is tuned for 'cpu': pass target='cuda', or a profile calibrated on a cpu device
    """
    if isinstance(profile, DeviceProfile):
        found = profile
    elif isinstance(profile, (str, os.PathLike)):
        found = load_profile(profile)
    elif profile is not None:
        raise OptionError(f"profile={profile!r} must be the path of a device profile file (from `autoprec "
                          "calibrate --out FILE`), an autoprec DeviceProfile, or None to calibrate here")
    else:
        env = [p for p in os.environ.get("AUTOPREC_PROFILE", "").split(os.pathsep) if p]
        try:
            files = [load_profile(p) for p in env]
        except ProfileError as exc:
            raise ProfileError(f"$AUTOPREC_PROFILE: {exc} (or unset AUTOPREC_PROFILE to calibrate here)") from None
        found = next((p for p in files if p.target == target), None)
        if found is None:
            if target == "cpu" or device.type == target:
                found = calibrate("cpu" if target == "cpu" else device, dtypes=formats)
            else:
                found = estimate(target)
    if found.target != target:
        raise ProfileError(f"the device profile {found.source or found.device!r} is for target {found.target!r}, "
                           f"but the policy is tuned for {target!r}: pass target={found.target!r}, or a profile "
                           f"calibrated on a {target} device")
    missing = [f for f in formats if f not in found.formats]
    if missing:
        raise ProfileError(f"the device profile {found.source or found.device!r} has no figures for {missing} "
                           f"(it prices {list(found.formats)}): re-run `autoprec calibrate --dtypes "
                           f"{','.join(formats)}` on the device, or pass dtypes={list(found.formats[1:])}")
    return found
