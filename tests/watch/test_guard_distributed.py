"""autoprec.guard under torch.distributed (two gloo ranks): the ranks read the same figures and act alike."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import autoprec
from autoprec import LayerEntry, Policy
from autoprec.watch._watch import Watch
from tests.models import FP16_MAX
from tests.ranks import WORLD, run_ranks

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

STEPS, EVERY, HOT = 8, 2, 5  # rank 1's batches from step HOT on are scaled by SCALE; the reads come at 2, 4, 6, 8
SCALE = 1e4
HEADROOM = 8.0
POLICY = Policy(layers={"fc": LayerEntry("fp16"), "norm": LayerEntry("fp32"), "head": LayerEntry("fp32")},
                target="cuda", formats=("fp16", "bf16"))


class Net(nn.Module):
    """fc (FP16 in the policy) -> LayerNorm -> head: the norm keeps the loss in scale whatever fc's input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.fc(x)))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank its own batch; rank 1's from step HOT on scaled by SCALE (its fc output then passes
    65504 / headroom, rank 0's never comes near it)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 8, generator=g)
    if rank == 1 and step >= HOT:
        x = x * SCALE
    return x, torch.randn(8, 1, generator=g)


def _wrap(model: nn.Module, wrapper: str, on: str) -> tuple[nn.Module, nn.Module]:
    """(the module trained, the module the guard gets): DDP's wrapper and it or the model inside it, or
    the FSDP2-sharded model twice."""
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model)
        return ddp, (ddp if on == "wrapper" else model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    return sharded, sharded


def _guarded(rank: int, wrapper: str, on: str) -> dict:
    torch.manual_seed(0)
    model = Net()
    trained, target = _wrap(model, wrapper, on)
    g = autoprec.guard(target, POLICY, every=EVERY, headroom=HEADROOM)
    swapped = type(model.fc) is not nn.Linear
    opt = torch.optim.SGD(trained.parameters(), lr=0.01)
    losses = []
    for step in range(1, STEPS + 1):
        x, y = _batch(rank, step)
        loss = F.mse_loss(trained(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        g.step(loss, x)
    local = g.state_dict()["watch"]  # this rank's own figures since the layer's last reset
    g.remove()
    w = Watch(["a", "b"], "cpu")  # the read's combination: the largest |out| of any rank, the sum of the counts
    w.table.copy_(torch.tensor([[1.0 + rank, 2.0 * rank, 0.0, 0.0], [5.0 - rank, 1.0, 0.0, 0.0]]))
    combined = w.read()
    params = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    return {"events": [e.to_dict() for e in g.events], "assignment": g.policy.assignment, "swapped": swapped,
            "local": dict(zip(local["layers"], local["table"])), "losses": losses, "combined": combined,
            "params": {k: v.detach().clone() for k, v in params.items()}}


@pytest.mark.parametrize("wrapper, on", [("ddp", "wrapper"), ("ddp", "inner"), ("fsdp2", "model")],
                         ids=["ddp-wrapper", "ddp-inner", "fsdp2"])
def test_one_ranks_overflow_promotes_the_layer_on_every_rank_at_the_same_step(tmp_path, wrapper, on):
    """Only rank 1's fc output passes the trigger; the read combines the ranks, so both promote fc at the same step."""
    r0, r1 = run_ranks(_guarded, tmp_path, wrapper, on)
    assert r0["swapped"] and r1["swapped"], "the guard's policy did not reach the layers"
    # by construction: rank 1's own figures pass the trigger, rank 0's stay far below it
    assert r1["local"]["fc"][0] * HEADROOM > FP16_MAX > 100 * r0["local"]["fc"][0] * HEADROOM
    first_read_after = (HOT + EVERY - 1) // EVERY * EVERY
    for r in (r0, r1):
        assert [(e["step"], e["layer"], e["action"], e["old"], e["new"]) for e in r["events"]] == [
            (first_read_after, "fc", "adapt", "fp16", "bf16")]
        assert r["assignment"] == {"fc": "bf16", "norm": "fp32", "head": "fp32"}
        assert all(map(math.isfinite, r["losses"]))
    assert r0["combined"] == r1["combined"] == {"a": (2.0, 2), "b": (5.0, 2)}
    assert r0["events"] == r1["events"]  # the same evidence: the combined figures
    assert r0["losses"] != r1["losses"]  # each rank had its own data
    for key, p in r0["params"].items():
        assert torch.equal(p, r1["params"][key]), f"{key} differs across ranks"
