"""A GNN whose scatter-add breaks under blanket FP16, and the report that explains what autoprec kept in FP32.

The model is a hand-written message-passing network (no torch_geometric needed): each layer
transforms node features with a Linear and sums the messages into their destination nodes with
``index_add_``. The graph has a few *hub* nodes that receive thousands of edges, as real graphs
(citations, social networks) do. Their neighbourhood sums exceed FP16's largest value (65504), so
in FP16 the accumulation overflows to Inf. autoprec probes every layer, finds that, and keeps the
accumulation in FP32 while the Linears may still run in 16-bit. The report lists the evidence.

Run:  python examples/gnn_scatter.py [--small]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import autoprec


class SumConv(nn.Module):
    """messages = relu(lin(x))[src]; out[dst] += messages (a scatter-add written in this module's code)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index
        msg = F.relu(self.lin(x))[src]
        out = torch.zeros(x.shape[0], msg.shape[1], dtype=msg.dtype, device=msg.device)
        return out.index_add_(0, dst, msg)  # the hazard: hub sums exceed FP16's range


class GNN(nn.Module):
    def __init__(self, dim_in: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.conv1 = SumConv(dim_in, hidden)
        self.conv2 = SumConv(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x, edge_index)
        h = self.conv2(h / h.detach().amax().clamp_min(1.0), edge_index)  # rescale between layers
        return self.head(h)


def hub_graph(nodes: int, hubs: int, fan_in: int, random_edges: int, dim: int, seed: int = 0):
    """Random node features in [0, 8) and a graph whose first ``hubs`` nodes each receive ``fan_in`` edges."""
    g = torch.Generator().manual_seed(seed)
    x = 8 * torch.rand(nodes, dim, generator=g)
    hub_dst = torch.arange(hubs).repeat_interleave(fan_in)
    hub_src = torch.randint(hubs, nodes, (hubs * fan_in,), generator=g)
    src = torch.cat([hub_src, torch.randint(0, nodes, (random_edges,), generator=g)])
    dst = torch.cat([hub_dst, torch.randint(hubs, nodes, (random_edges,), generator=g)])
    labels = torch.randint(0, 4, (nodes,), generator=g)
    return x, torch.stack([src, dst]), labels


def main(small: bool = False) -> autoprec.Policy:
    torch.manual_seed(0)
    nodes, fan_in, dim = (500, 20_000, 32) if small else (2000, 25_000, 64)
    x, edge_index, labels = hub_graph(nodes, hubs=4, fan_in=fan_in, random_edges=4 * nodes, dim=dim)
    model = GNN(dim, 64 if small else 128, 4)

    def loss_fn(out: torch.Tensor, batch) -> torch.Tensor:
        return F.cross_entropy(out.float(), labels)

    with torch.no_grad():
        hub_sum = model.conv1(x, edge_index).abs().max().item()
    print(f"largest FP32 neighbourhood sum in conv1: {hub_sum:.4g} (FP16 max is 65504)")

    # 1. what blanket FP16 autocast does to it (on this CPU, as a GPU would: index_add_ runs in FP16)
    with torch.autocast("cpu", dtype=torch.float16):
        blanket = loss_fn(model(x, edge_index), None)
    print(f"blanket FP16 autocast loss: {blanket.item()}")

    # 2. tune for a GPU (FP16 and BF16 allowed); on a CPU, FP16 layers are emulated as tensor cores run them
    policy = autoprec.tune(model, (x, edge_index), loss_fn, target="cuda", verify_steps=5 if small else 20,
                           progress=not small)
    print(policy.report())

    # 3. the policy runs: same batch, loss finite and close to FP32
    with policy.autocast(model):
        loss = loss_fn(model(x, edge_index), None)
    fp32 = loss_fn(model(x, edge_index), None)
    print(f"FP32 loss {fp32.item():.6f}; with the policy {loss.item():.6f}")
    return policy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="a reduced size that runs in seconds")
    main(parser.parse_args().small)
