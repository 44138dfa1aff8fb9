"""Policies in real two-process training on the CPU (gloo): DDP, FSDP2, FSDP2 with 16-bit parameters.

Each test starts two worker processes with :func:`tests.ranks.run_ranks` and asserts in the parent.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import autoprec
from autoprec import LayerEntry, Policy
from autoprec.core import module_signatures
from tests.ranks import WORLD, run_ranks

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

STEPS = 5
_SPEC = "_autoprec_spec"


# -- the model --------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm MLP block: LayerNorm -> Linear -> GELU -> Linear, with a residual."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    """Linear in, two blocks, LayerNorm, Linear head."""

    def __init__(self, d_in: int = 8, d: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _policy(assignment: dict[str, str]) -> Policy:
    return Policy(layers={k: LayerEntry(p) for k, p in assignment.items()}, modules=module_signatures(Net()))


# FP16 Linears in the blocks (so the policy needs a GradScaler), BF16 input layer, FP32 norms/head
FP16_POLICY = {"inp": "bf16", "blocks.0.norm": "fp32", "blocks.0.fc1": "fp16", "blocks.0.fc2": "fp16",
               "blocks.1.norm": "fp32", "blocks.1.fc1": "fp16", "blocks.1.fc2": "bf16",
               "norm": "fp32", "head": "fp32"}
# BF16 and FP32 only, one FP16 Linear (emulated on the CPU) to run inside FSDP2's gathered weights
FSDP_POLICY = {"inp": "bf16", "blocks.0.norm": "fp32", "blocks.0.fc1": "bf16", "blocks.0.fc2": "bf16",
               "blocks.1.norm": "fp32", "blocks.1.fc1": "fp16", "blocks.1.fc2": "bf16",
               "norm": "fp32", "head": "fp32"}
# FP32 LayerNorms and an FP32 Linear head among BF16 Linears: the FP32 ones need fsdp_plan
MIXED_POLICY = {"inp": "bf16", "blocks.0.norm": "fp32", "blocks.0.fc1": "bf16", "blocks.0.fc2": "bf16",
                "blocks.1.norm": "fp32", "blocks.1.fc1": "bf16", "blocks.1.fc2": "bf16",
                "norm": "fp32", "head": "fp32"}


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, x[:, :1].sin() + 0.1 * torch.randn(n, 1, generator=g)


def _train_mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    """``steps`` AdamW steps on an MSE loss; the loss before each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _spec_holders(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if _SPEC in m.__dict__]


def _ddp_train(rank: int, policy: Policy | None) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _net()
    ddp = DDP(model)
    handle = policy.apply(ddp) if policy is not None else None
    scaler = policy.grad_scaler() if policy is not None else None
    swapped = (type(model.blocks[0].fc1) is not nn.Linear) and _SPEC in model.blocks[0].fc1.__dict__
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    x, y = _data(100 + rank, 16)  # different data per rank
    losses, scales = [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(ddp(x), y)
        losses.append(loss.item())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        else:
            loss.backward()
            opt.step()
    if handle is not None:
        handle.remove()
    return {"losses": losses, "scales": scales, "swapped": swapped,
            "scaler": type(scaler).__name__, "scaler_enabled": scaler is not None and scaler.is_enabled(),
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _ddp(rank: int, policy: Policy) -> dict:
    return {"policy": _ddp_train(rank, policy), "fp32": _ddp_train(rank, None)}


def test_ddp_fp16_policy_with_grad_scaler(tmp_path):
    """DDP with an FP16 policy and its GradScaler: ranks stay identical, the policy changes the result."""
    policy = _policy(FP16_POLICY)
    r0, r1 = run_ranks(_ddp, tmp_path, policy)
    for r in (r0, r1):
        run = r["policy"]
        assert run["swapped"], "the policy did not reach the modules inside DDP (keys without 'module.')"
        assert run["scaler"] == "GradScaler" and run["scaler_enabled"]
        assert len(run["scales"]) == STEPS and all(s > 0 for s in run["scales"])
        assert all(torch.isfinite(torch.tensor(run["losses"] + r["fp32"]["losses"])))
    assert r0["policy"]["scales"] == r1["policy"]["scales"]  # same gradients on both ranks -> same skips
    assert r0["policy"]["losses"] != r1["policy"]["losses"]  # each rank had its own data
    for key, p0 in r0["policy"]["params"].items():
        assert torch.equal(p0, r1["policy"]["params"][key]), f"{key} differs across ranks"
        assert torch.equal(r0["fp32"]["params"][key], r1["fp32"]["params"][key])
    start = _net().state_dict()
    diffs = {k: (p - r0["fp32"]["params"][k]).abs().max().item() for k, p in r0["policy"]["params"].items()}
    moved = {k: (p - start[k]).abs().max().item() for k, p in r0["policy"]["params"].items()}
    assert max(moved.values()) > 1e-3, "no optimizer step was taken (every step skipped by the scaler?)"
    assert max(diffs.values()) > 1e-6, "the policy run equals the FP32 run: the policy did not run"
    assert max(diffs.values()) < 1e-2, f"the policy run strays far from the FP32 run: {diffs}"
    # the losses of the first step (same weights) differ only by 16-bit rounding
    for r in (r0, r1):
        first, ref = r["policy"]["losses"][0], r["fp32"]["losses"][0]
        assert first != ref and abs(first - ref) < 1e-2 * abs(ref)


# -- FSDP2, parameters in FP32 ----------------------------------------------------------------
def _fsdp2(rank: int, policy: Policy, order: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _net()
    handle = policy.apply(model) if order == "apply_first" else None
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if handle is None:
        handle = policy.apply(model)
    fsdp_class = type(model.blocks[0]).__name__
    holders = _spec_holders(model)
    x, y = _data(7, 32)  # the same batch on each rank: the averaged gradient is one process's gradient
    losses = _train_mse(model, x, y, STEPS)
    handle.remove()
    left = _spec_holders(model)
    with torch.no_grad():
        after = model(x)  # the model without the policy, in plain FP32
    params = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    return {"losses": losses, "holders": holders, "left": left, "fsdp_class": fsdp_class,
            "after": after, "params": {k: v.detach().clone() for k, v in params.items()}}


@pytest.mark.parametrize("order", ["apply_first", "shard_first"])
def test_fsdp2_policy_matches_one_process(tmp_path, order, one_thread):
    """FSDP2 (FP32 parameters), policy applied before or after fully_shard: trains as one process does."""
    policy = _policy(FSDP_POLICY)
    r0, r1 = run_ranks(_fsdp2, tmp_path, policy, order)
    # the same policy in one process on the same batch
    model = _net()
    x, y = _data(7, 32)
    with torch.no_grad():
        fp32_loss = F.mse_loss(model(x), y).item()
    with policy.autocast(model):
        ref = _train_mse(model, x, y, STEPS)
    assert ref[0] != fp32_loss and ref[0] == pytest.approx(fp32_loss, rel=1e-2)  # the policy's 16-bit rounding
    for r in (r0, r1):
        assert r["fsdp_class"].startswith("FSDP")
        assert sorted(r["holders"]) == sorted(FSDP_POLICY), "the policy did not reach every layer"
        assert r["left"] == [], f"modules still carrying {_SPEC} after remove(): {r['left']}"
        assert all(torch.isfinite(torch.tensor(r["losses"])))
        assert r["losses"][-1] < r["losses"][0]
        assert r["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert r0["losses"] == r1["losses"]
    for key, p in r0["params"].items():
        assert torch.equal(p, r1["params"][key]), f"{key} differs across ranks"
        torch.testing.assert_close(p, model.state_dict()[key], rtol=1e-5, atol=1e-6)
    # after remove(): the forward is the plain FP32 forward of the trained weights
    plain = Net()
    plain.load_state_dict(r0["params"])
    with torch.no_grad():
        expected = plain(x)
    for r in (r0, r1):
        torch.testing.assert_close(r["after"], expected, rtol=1e-5, atol=1e-6)


def test_fsdp2_with_fp8_layers_matches_one_process(tmp_path, one_thread):
    """FSDP2 with the blocks' Linears in FP8 (torchao's GEMMs, emulated on the CPU): each rank trains as one process
    does with the same policy, and both ranks end with the same weights."""
    pytest.importorskip("torchao")
    layers = {k: LayerEntry("fp8", recipe="rowwise" if k.endswith("fc2") else "tensorwise") if ".fc" in k
              else LayerEntry(p) for k, p in FSDP_POLICY.items()}
    policy = Policy(layers=layers, modules=module_signatures(Net()), formats=("bf16", "fp8"))
    r0, r1 = run_ranks(_fsdp2, tmp_path, policy, "shard_first")
    model = _net()
    x, y = _data(7, 32)
    with policy.autocast(model):
        ref = _train_mse(model, x, y, STEPS)
    bf16 = _net()
    with _policy(FSDP_POLICY).autocast(bf16):
        ref_bf16 = _train_mse(bf16, x, y, STEPS)
    assert ref[0] != ref_bf16[0]  # FP8 really ran
    for r in (r0, r1):
        assert sorted(r["holders"]) == sorted(FSDP_POLICY) and r["left"] == []
        assert r["losses"][-1] < r["losses"][0]
        assert r["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-7)
    for key, p in r0["params"].items():
        assert torch.equal(p, r1["params"][key]), f"{key} differs across ranks"


# -- FSDP2 with 16-bit parameters: fsdp_plan --------------------------------------------------
def _fsdp2_bf16(rank: int, policy: Policy) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    x, y = _data(11 + rank, 16)
    out: dict[str, Any] = {}

    # without the plan: the FP32 layers get BF16 parameters, and the runtime refuses
    model = _net()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=bf16)
    fully_shard(model, mesh=mesh, mp_policy=bf16)
    with policy.apply(model):
        try:
            model(x)
            out["error"] = None
        except autoprec.PolicyError as exc:
            out["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - the wrong error is a result to report
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["wrong_type"] = True

    # with the plan: each FP32 layer its own FP32 unit, made before the BF16 units around it
    model = _net()
    plan = autoprec.fsdp_plan(policy, model)
    out["plan"] = list(plan)
    for module in plan.values():
        fully_shard(module, mesh=mesh, mp_policy=fp32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=bf16)
    fully_shard(model, mesh=mesh, mp_policy=bf16)
    seen: dict[str, list] = {}

    def watch(name: str) -> Callable:
        def hook(m: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen.setdefault(name, []).append(
                (type(m.weight).__name__, m.weight.dtype, args[0].dtype, output.dtype))
        return hook

    # prepended: runs before FSDP2's own post-forward hook reshards the unit's parameters
    model.head.register_forward_hook(watch("head"), prepend=True)
    model.blocks[0].norm.register_forward_hook(watch("blocks.0.norm"), prepend=True)
    model.blocks[0].fc1.register_forward_hook(watch("blocks.0.fc1"), prepend=True)
    with policy.apply(model):
        out["losses"] = _train_mse(model, x, y, 3)
    out["seen"] = {k: [(t, str(w), str(i), str(o)) for t, w, i, o in v] for k, v in seen.items()}
    return out


def test_fsdp2_bf16_params_need_fsdp_plan(tmp_path):
    """FSDP2 gathering BF16 parameters: FP32 layers raise a PolicyError without fsdp_plan, and run in FP32 with it."""
    policy = _policy(MIXED_POLICY)
    for r in run_ranks(_fsdp2_bf16, tmp_path, policy):
        assert not r.get("wrong_type"), r["error"]
        assert r["error"] is not None, "an FP32 layer ran on BF16 parameters without an error"
        assert "'blocks.0.norm'" in r["error"] and "fsdp_plan" in r["error"] and "bfloat16" in r["error"]
        assert r["plan"] == ["blocks.0.norm", "blocks.1.norm", "norm", "head"]
        assert len(r["losses"]) == 3 and all(torch.isfinite(torch.tensor(r["losses"])))
        for name in ("head", "blocks.0.norm"):  # FP32 layers: FP32 weights (gathered, not sharded), FP32 in and out
            assert r["seen"][name] and all(s == ("Parameter", "torch.float32", "torch.float32", "torch.float32")
                                           for s in r["seen"][name]), (name, r["seen"][name])
        # a BF16 layer inside a BF16 unit really gets BF16 weights: the MixedPrecisionPolicy is in force
        assert r["seen"]["blocks.0.fc1"] and all(s[1] == "torch.bfloat16" for s in r["seen"]["blocks.0.fc1"]), (
            r["seen"]["blocks.0.fc1"])
