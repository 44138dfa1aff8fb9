"""Helpers shared by several test modules (no test module imports another): forward/backward
errors against FP32, one-op policy units, the caller-state snapshot of the isolation tests, and
cached tuned policies handed out as private copies."""

from __future__ import annotations

import copy
import functools
import math
import random
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autoprec import LayerEntry, Policy
from autoprec.core import call_model
from autoprec.policy import scaler_for

__all__ = ["CPU_AUTOCAST_FP32", "FP32_OPS", "NATIVE_OPS", "assert_same", "cached", "count_syncs", "forward_backward",
           "rel_errors", "seed_globals", "snapshot", "unit_out"]

T = TypeVar("T")


def cached(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` computed once per arguments (a tune is costly), each caller getting its own deep copy: a test that
    changes what it got (a policy's layers dict, its stats) cannot change what the next test sees."""
    once = functools.lru_cache(maxsize=None)(fn)

    @functools.wraps(fn)
    def copied(*args: Any, **kwargs: Any) -> T:
        return copy.deepcopy(once(*args, **kwargs))

    return copied


def count_syncs(monkeypatch: Any) -> dict[str, int]:
    """Count the calls that copy a tensor to the host (``item``, ``tolist``, ``bool``, ``float``, ``int``) from
    now until ``monkeypatch`` undoes it: ``counts["n"]``."""
    counts = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: Any, _original: Any = original, **k: Any) -> Any:
            counts["n"] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


# -- errors against FP32 (test_tune_hazards, test_roles) ---------------------------------------
def forward_backward(model, batch, loss_fn, *, blanket=None, policy=None):
    """One forward+backward: plain FP32, under blanket CPU autocast to ``blanket``, or under ``policy``.

    Returns ``(loss, flat parameter gradient)`` in float64, gradients unscaled.
    """
    model.zero_grad(set_to_none=True)
    scaler = scaler_for(policy, "cpu") if policy is not None else None  # a CUDA policy, emulated here
    if policy is not None:
        ctx = policy.autocast(model)
    else:
        ctx = torch.autocast("cpu", dtype=blanket or torch.bfloat16, enabled=blanket is not None)
    with ctx:
        out = call_model(model, batch)
        loss = out if loss_fn is None else loss_fn(out, batch)
    scale = scaler.get_scale() if scaler is not None else 1.0
    (loss.float() * scale).backward()
    grad = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).detach().double().flatten() / scale
                      for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return loss.detach().double(), grad


def rel_errors(loss, grad, ref_loss, ref_grad):
    """(loss relative error, gradient relative L2 error, all finite)."""
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
    if not finite:
        return math.inf, math.inf, False
    return (float((loss - ref_loss).abs() / ref_loss.abs()),
            float((grad - ref_grad).norm() / ref_grad.norm()), True)


# -- one op run as a one-layer policy's unit (test_emulation, test_cuda_emulation) ---------------
def _policy(layers: dict[str, str], target: str) -> Policy:
    return Policy(layers={k: LayerEntry(p) for k, p in layers.items()}, target=target)


class _Op(nn.Module):
    """A leaf module that runs one function on its input."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def unit_out(fn, x: torch.Tensor, precision: str, target: str) -> torch.Tensor:
    """The raw output of ``fn`` run as a one-layer policy's unit (its output handed back is cast; take it inside)."""
    seen = {}

    def keep(y):
        seen["out"] = y
        return y

    model = nn.Sequential(_Op(lambda t: keep(fn(t))))
    with _policy({"0": precision}, target).autocast(model):
        model(x)
    return seen["out"]


FP32_OPS = {  # one op each, on a positive input: the reference is the op in FP32 on the rounded input
    "pow": lambda x: x.pow(2), "__pow__": lambda x: x ** 2, "rsqrt": torch.rsqrt,
    "exp": torch.exp, "log": torch.log, "sum": lambda x: x.sum(-1),
    "softmax": lambda x: F.softmax(x, -1), "log_softmax": lambda x: x.log_softmax(-1),
    "layer_norm": lambda x: F.layer_norm(x, x.shape[-1:]), "rms_norm": lambda x: F.rms_norm(x, x.shape[-1:]),
    "cumsum": lambda x: x.cumsum(-1), "mse_loss": lambda x: F.mse_loss(x, torch.zeros_like(x)),
    "rdiv": lambda x: 1.0 / x,
}
CPU_AUTOCAST_FP32 = {"mse_loss"}  # CPU autocast lifts it as well (in a BF16 region; FP16 ones run emulated)
NATIVE_OPS = {"relu": torch.relu, "mean": lambda x: x.mean(-1), "sqrt": lambda x: x.abs().sqrt(),
              "sin": torch.sin, "pow_in_place": lambda x: x.clone().pow_(2),
              "sum_with_dtype": lambda x: x.sum(-1, dtype=x.dtype)}


# -- what tune must leave alone (test_isolation, test_interrupt_resume) -------------------------
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(model):
    """Everything about the caller's model and the global state that tune must leave alone."""
    return {
        "state": {k: (v.dtype, tuple(v.shape), bits(v)) for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "param_ids": {n: id(p) for n, p in model.named_parameters()},
        "param_ptrs": {n: p.data_ptr() for n, p in model.named_parameters()},
        "buffer_ids": {n: id(b) for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else (id(p.grad), bits(p.grad)) for n, p in model.named_parameters()},
        "hooks": {n: {d: [(k, id(v)) for k, v in getattr(m, d).items()] for d in HOOK_DICTS if hasattr(m, d)}
                  for n, m in model.named_modules()},
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "modules": [(n, id(m)) for n, m in model.named_modules()],
        "torch_rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state(),
    }


def assert_same(before, after):
    for key in ("training", "requires_grad", "param_ids", "param_ptrs", "buffer_ids", "hooks", "attrs", "modules"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for k, (dtype, shape, bits) in before["state"].items():
        d2, s2, b2 = after["state"][k]
        assert (d2, s2) == (dtype, shape), k
        assert torch.equal(b2, bits), f"state_dict[{k!r}] changed"
    assert after["grads"].keys() == before["grads"].keys()
    for k, g in before["grads"].items():
        g2 = after["grads"][k]
        assert (g is None) == (g2 is None), k
        if g is not None:
            assert g2[0] == g[0], f"{k}.grad was replaced"
            assert torch.equal(g2[1], g[1]), f"{k}.grad changed"
    assert torch.equal(after["torch_rng"], before["torch_rng"])
    assert after["py_rng"] == before["py_rng"]
    b_np, a_np = before["np_rng"], after["np_rng"]
    assert a_np[0] == b_np[0] and np.array_equal(a_np[1], b_np[1]) and a_np[2:] == b_np[2:]
    assert not torch.is_autocast_enabled("cpu")
    assert torch.is_grad_enabled()


def seed_globals():
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    torch.rand(7)  # a state that is not just-seeded
    random.random()
    np.random.rand(3)
