"""Policies in real two-process training on the CPU (gloo): DDP, FSDP2, FSDP2 with 16-bit parameters.

Each test starts two worker processes (from a fork server that has imported this module once, so
a worker starts in well under a second); each worker writes its results to a file, and the test
asserts in the parent. A worker that fails stops the other one; a hang fails the test at its
deadline instead of blocking the run.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import multiprocessing.connection
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import autoprec
from autoprec import LayerEntry, Policy
from autoprec.trace import module_signatures

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
DEADLINE_S = 120.0        # per test: a hung collective fails the test here
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


# -- running two processes --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(scenario: Callable[..., dict], rank: int, port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    if "GLOO_SOCKET_IFNAME" not in os.environ:  # gloo on the loopback device, whatever the hostname says
        names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
        for lo in ("lo", "lo0"):
            if lo in names:
                os.environ["GLOO_SOCKET_IFNAME"] = lo
                break
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        try:
            result = scenario(rank, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _run(scenario: Callable[..., dict], tmp_path: Path, *args: Any) -> list[dict]:
    """Run ``scenario(rank, *args)`` in two gloo processes; their results, by rank."""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([__name__])  # import torch and autoprec once, not per worker
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(scenario, rank, port, str(tmp_path), args), daemon=True)
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    timed_out = False
    try:
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it in a collective until gloo's timeout
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            multiprocessing.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=left)
    finally:
        alive = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
    errors = "\n".join(f"rank {r}:\n{(tmp_path / f'rank{r}.err').read_text()}"
                       for r in range(WORLD) if (tmp_path / f"rank{r}.err").exists())
    assert not timed_out, f"ranks {alive} still running after {DEADLINE_S:.0f} s (a hang?)\n{errors}"
    assert not errors, errors
    assert all(p.exitcode == 0 for p in procs), f"workers' exit codes: {[p.exitcode for p in procs]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


# -- DDP --------------------------------------------------------------------------------------
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
    r0, r1 = _run(_ddp, tmp_path, policy)
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
    r0, r1 = _run(_fsdp2, tmp_path, policy, order)
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
    for r in _run(_fsdp2_bf16, tmp_path, policy):
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
