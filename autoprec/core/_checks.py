"""Up-front checks of what a caller hands to ``tune``: each failure is a typed error naming the fix.

Everything here runs before any long work: at most one forward (with its loss) per batch.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..errors import AutoprecError, BatchError, ModelError, OptionError
from ._batch import LossFn, call_model, compute_loss

__all__ = ["check_options", "check_model", "check_batch", "check_batches", "check_storage"]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_options(*, tolerance: Any, grad_tolerance: Any, verify_tolerance: Any, verify_steps: Any, n_trials: Any,
                  headroom: Any, seed: Any, progress: Any, optimizer: Any, verify_compile: Any = None,
                  strict: Any = False, share_roles: Any = True, measure_speed: Any = None,
                  held_out: Any = 0.25, train_batch_size: Any = None) -> None:
    """Raise :class:`OptionError` for an option of the wrong kind or out of range.

    Example:
        >>> check_options(tolerance=0.01, grad_tolerance=0.05, verify_tolerance=0.05, verify_steps=-1,
        ...               n_trials=30, headroom=8.0, seed=0, progress=True, optimizer=None)
        Traceback (most recent call last):
        ...
        autoprec.errors.OptionError: verify_steps=-1 must be a non-negative integer (0 skips verification)
    """
    for name, value in (("tolerance", tolerance), ("grad_tolerance", grad_tolerance),
                        ("verify_tolerance", verify_tolerance), ("headroom", headroom)):
        if not _number(value) or not math.isfinite(value) or value <= 0:
            raise OptionError(f"{name}={value!r} must be a positive number")
    if headroom < 1:
        raise OptionError(f"headroom={headroom!r} must be at least 1 (1 = fit the observed maximum exactly)")
    if not isinstance(verify_steps, int) or isinstance(verify_steps, bool) or verify_steps < 0:
        raise OptionError(f"verify_steps={verify_steps!r} must be a non-negative integer (0 skips verification)")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise OptionError(f"n_trials={n_trials!r} must be a positive integer")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise OptionError(f"seed={seed!r} must be a non-negative integer")
    for name, value in (("progress", progress), ("strict", strict), ("share_roles", share_roles)):
        if not isinstance(value, bool):
            raise OptionError(f"{name}={value!r} must be True or False")
    if measure_speed is not None and not isinstance(measure_speed, bool):
        raise OptionError(f"measure_speed={measure_speed!r} must be True, False or None (None: on, unless "
                          "$AUTOPREC_MEASURE_SPEED is 0)")
    if not _number(held_out) or not 0 <= held_out < 1:
        raise OptionError(f"held_out={held_out!r} must be a fraction in [0, 1): the share of the batches (or of "
                          "one batch's rows) the policy is checked on and not tuned on; 0 switches the check off")
    if train_batch_size is not None and (not isinstance(train_batch_size, int) or isinstance(train_batch_size, bool)
                                         or train_batch_size < 1):
        raise OptionError(f"train_batch_size={train_batch_size!r} must be the rows of your real training step (an "
                          "integer of at least 1), or None to price the tuning batch as given")
    if optimizer is not None and not callable(optimizer):
        raise OptionError(f"optimizer={optimizer!r} must be a callable params -> torch.optim.Optimizer, "
                          "e.g. lambda p: torch.optim.AdamW(p, lr=1e-3)")
    if verify_compile is not None:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if not isinstance(verify_compile, str) or verify_compile not in backends:
            raise OptionError(f"verify_compile={verify_compile!r} must be None or a torch.compile backend: "
                              f"one of {sorted(backends)}")


def check_storage(storage: Any) -> None:
    """Open an Optuna storage (an RDB URL, ``"journal:PATH"`` or a storage object) now, so a bad one
    fails before the probe, not after it.

    Example:
        >>> check_storage(None) is None
        True
        >>> check_storage("mysql://x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        autoprec.errors.OptionError: storage='mysql://x' cannot be opened (...); use an Optuna storage URL such as 'sqlite:///study.db' in an existing folder, or 'journal:/path/to/study.log'
    """
    if storage is None:
        return
    import optuna

    from ..search._storage import open_storage

    if isinstance(storage, optuna.storages.BaseStorage):
        return
    if not isinstance(storage, str):
        raise OptionError(f"storage={storage!r} must be an Optuna storage URL such as 'sqlite:///study.db', "
                          "'journal:/path/to/study.log' or an optuna storage object")
    opened = open_storage(storage)  # a journal spec is checked here (OptionError naming the problem)
    try:
        optuna.storages.get_storage(opened)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/optuna raise many kinds for a bad URL
        raise OptionError(f"storage={storage!r} cannot be opened ({type(exc).__name__}: {str(exc)[:160]}); "
                          "use an Optuna storage URL such as 'sqlite:///study.db' in an existing folder, or "
                          "'journal:/path/to/study.log'") from None


def check_model(model: Any) -> torch.device:
    """The device of an FP32 model with trainable floating parameters, or :class:`ModelError`.

    Example:
        >>> check_model(torch.nn.Linear(2, 2)).type
        'cpu'
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"tune needs a torch.nn.Module, got {type(model).__name__}")
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise ModelError(f"{len(meta)} parameter(s) or buffer(s) of {type(model).__name__} are on the 'meta' device "
                         f"({', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''}): they hold no values, and "
                         "autoprec measures the model's real weights, on any target; materialise them first: "
                         "model.to_empty(device='cpu'), then initialise or load the weights "
                         "(model.load_state_dict(...)), then tune")
    floating = [p for p in model.parameters() if p.is_floating_point()]
    if not floating:
        raise ModelError(f"{type(model).__name__} has no floating-point parameters: there is nothing to tune; "
                         "pass the module whose weights are trained")
    if not any(p.requires_grad for p in floating):
        raise ModelError(f"every floating parameter of {type(model).__name__} has requires_grad=False: autoprec "
                         "measures training (gradients); unfreeze the parameters you train")
    if any(p.dtype != torch.float32 for p in floating):
        raise ModelError("tune expects an FP32 model (autoprec decides where 16-bit runs); "
                         f"found parameters of {sorted({str(p.dtype) for p in floating})}: call model.float() first")
    devices = {p.device for p in floating}
    if len(devices) > 1:
        raise ModelError(f"the model's parameters lie on several devices {sorted(map(str, devices))}: "
                         "tune a model on one device")
    return devices.pop()


def check_batch(model: nn.Module, batch: Any, loss_fn: LossFn | None, index: int) -> None:
    """One FP32 forward and loss: the batch fits, the loss is a finite scalar that depends on the model.

    A non-finite loss from a batch that holds NaN or Inf is a :class:`BatchError` naming each such
    tensor by its path (``batch['pixel_values']``, ``batches[0][1]``); a model that masks them (a
    finite loss) is accepted.

    Example:
        >>> check_batch(torch.nn.Linear(2, 1), torch.ones(3, 3), None, 0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        autoprec.errors.BatchError: the model cannot take batch 0 (RuntimeError: mat1 and mat2 shapes cannot be multiplied (3x3 and 2x1)); pass what the model takes: ...
    """
    nonfinite = _nonfinite(batch, index)
    try:
        out = call_model(model, batch)
    except Exception as exc:  # noqa: BLE001 - any failure here is the batch's
        raise BatchError(f"the model cannot take batch {index} ({type(exc).__name__}: {str(exc)[:200]}); "
                         "pass what the model takes: a tensor, a tuple of positional arguments, "
                         "or a dict of keyword arguments") from exc
    try:
        loss = compute_loss(out, batch, loss_fn)
    except AutoprecError:
        raise
    except Exception as exc:  # noqa: BLE001 - a loss_fn that fails is the caller's to fix
        raise BatchError(f"loss_fn failed on batch {index} ({type(exc).__name__}: {str(exc)[:200]}); it is "
                         "called as loss_fn(output, batch) and must return a scalar tensor") from exc
    if not bool(torch.isfinite(loss)):
        if nonfinite:  # the batch's NaN/Inf, not the model, is what broke the loss
            raise BatchError(f"{_which(index)} holds non-finite values ({'; '.join(nonfinite)}), and the FP32 loss "
                             f"on it is {float(loss.detach())}: autoprec measures each format's error against FP32 "
                             "on it, and a NaN or Inf leaves nothing to compare; clean the data first (drop those "
                             "samples, or replace the values: torch.nan_to_num), or mask them in the model so that "
                             "the loss stays finite")
        raise ModelError(f"the FP32 loss on batch {index} is {float(loss.detach())}: autoprec cannot tune a model "
                         "that is broken in FP32; fix the model or the batch first")
    if not loss.requires_grad:
        raise BatchError(f"the loss on batch {index} does not depend on the model's trainable parameters "
                         "(it has no grad_fn): compute it from the model's output, without .detach() or .item()")


def _which(index: int) -> str:
    """How the caller names batch ``index`` of tune's list: ``batch``, then ``batches=``'s entries."""
    return "the batch" if index == 0 else f"batch {index} (batches[{index - 1}])"


def _tensors(batch: Any, path: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in ``batch`` with its path in it: ``batch[1]``, ``batch['pixel_values']``."""
    if isinstance(batch, torch.Tensor):
        yield path, batch
    elif depth < 16 and isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from _tensors(value, f"{path}[{key!r}]", depth + 1)
    elif depth < 16 and isinstance(batch, (list, tuple)):
        for i, value in enumerate(batch):
            yield from _tensors(value, f"{path}[{i}]", depth + 1)


def _nonfinite(batch: Any, index: int) -> list[str]:
    """``'batch[1]: 3 NaN and 0 Inf of 256 values'`` for each floating tensor of the batch that holds any.

    Example:
        >>> _nonfinite({"ids": torch.ones(2, dtype=torch.long), "x": torch.tensor([1.0, float("nan")])}, 0)
        ["batch['x']: 1 NaN and 0 Inf of 2 values"]
        >>> _nonfinite([torch.ones(1), torch.tensor([float("inf")])], 2)
        ['batches[1][1]: 0 NaN and 1 Inf of 1 values']
    """
    found = []
    for path, t in _tensors(batch, "batch" if index == 0 else f"batches[{index - 1}]"):
        if t.is_meta:
            raise BatchError(f"{path} is on the 'meta' device: it holds no values; pass a batch of real data")
        if t.is_floating_point() or t.is_complex():  # an integer tensor cannot hold NaN or Inf
            nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
            if nan or inf:
                found.append(f"{path}: {nan} NaN and {inf} Inf of {t.numel()} values")
    return found


def check_batches(batches: Iterable[Any] | None) -> None:
    """``batches=`` must be an iterable of batches.

    Example:
        >>> check_batches(torch.ones(1))
        Traceback (most recent call last):
        ...
        autoprec.errors.BatchError: batches=tensor([1.]) takes an iterable of batches (a list), not a Tensor
    """
    if batches is None:
        return
    if isinstance(batches, (torch.Tensor, dict, str, bytes)) or not isinstance(batches, Iterable):
        raise BatchError(f"batches={batches!r:.40} takes an iterable of batches (a list), "
                         f"not a {type(batches).__name__}")
