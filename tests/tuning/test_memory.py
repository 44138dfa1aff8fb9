"""Tuning holds one set of weights: a private model on the caller's storage, snapshots off the device, nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from autoprec.probe import Snapshot
from autoprec.tuning import private_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_private_model_shares_the_callers_storage_not_its_objects():
    """The private model's parameters and buffers alias the caller's storage; modules, Parameters and .grad are its own."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    work = private_model(model)
    for (n, p), q in zip(model.named_parameters(), work.parameters()):
        assert q is not p and q.data_ptr() == p.data_ptr(), n
    for b, c in zip(model.buffers(), work.buffers()):
        assert c is not b and c.data_ptr() == b.data_ptr()
    work(torch.randn(8, 4)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(q.grad is not None for q in work.parameters())


def test_private_model_keeps_tied_weights_tied():
    """A weight shared by two modules is one Parameter in the private model too."""
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    work = private_model(nn.Sequential(emb, head))
    assert work[0].weight is work[1].weight and work[0].weight is not emb.weight


@pytest.mark.parametrize("spill", [True, False], ids=["file", "host-memory"])
def test_snapshot_restores_bit_for_bit(spill):
    """Values of every dtype and layout come back exactly, into the same storage, as often as asked."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 7, generator=g), torch.randn(6, 3, generator=g).t(),  # non-contiguous
               torch.randn(9, generator=g).bfloat16(), torch.tensor(3.5), torch.arange(4), torch.ones(2, dtype=torch.bool)]
    before = [t.clone() for t in tensors]
    ptrs = [t.data_ptr() for t in tensors]
    with Snapshot(tensors, spill=spill) as snap:
        assert snap.where == ("file" if spill else "host memory")
        assert snap.nbytes == sum(t.numel() * t.element_size() for t in tensors)
        for _ in range(2):
            for t in tensors:
                t.zero_() if t.dtype != torch.bool else t.logical_not_()
            snap.restore()
            assert all(torch.equal(a, b) for a, b in zip(tensors, before))
            assert [t.data_ptr() for t in tensors] == ptrs
        path = snap._path
    assert path is None or not os.path.exists(path)  # closing removes the file


def test_snapshot_release_and_fresh_make_the_tensors_again():
    """``release`` lets the tensors go; ``fresh`` rebuilds them with their shape, stride, dtype and values."""
    t = [torch.randn(3, 4), torch.randn(4, 3).t()]
    expect = [x.clone() for x in t]
    snap = Snapshot(t)
    snap.release()
    assert snap.tensors == []
    again = snap.fresh()
    snap.close()
    assert [x.stride() for x in again] == [x.stride() for x in expect]
    assert all(torch.equal(a, b) for a, b in zip(again, expect))


def test_a_cpu_snapshot_is_written_to_a_file():
    """On the CPU the snapshot leaves the process's memory: a file of exactly the tensors' bytes."""
    w = [torch.randn(256, 256), torch.randn(256)]
    with Snapshot(w) as snap:
        assert snap.where == "file" and os.path.getsize(snap._path) == snap.nbytes


_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import torch
    from torch import nn
    import autoprec

    def live_bytes():
        gc.collect()
        seen = {}
        for o in gc.get_objects():
            if type(o) in (torch.Tensor, nn.Parameter) and o.device.type == "cpu":
                s = o.untyped_storage()
                seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return sum(seen.values())

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(512, 512), nn.ReLU())], nn.Linear(512, 4))
    x = torch.randn(8, 512)
    params = sum(p.numel() * 4 for p in model.parameters())
    peak = [0]

    def hook(mod, args):  # the private model carries the caller's hooks: this runs in every pass and step
        peak[0] = max(peak[0], live_bytes())

    base = live_bytes()
    model.register_forward_pre_hook(hook)
    policy = autoprec.tune(model, x, target="cuda", dtypes=["bf16"], verify_steps=3, n_trials=4, progress=False)
    after = live_bytes()
    print(json.dumps({"params": params, "base": base, "peak": peak[0], "after": after,
                      "verify_passes": policy.stats["verify_passes"]}))
""")


def test_tune_holds_one_set_of_weights_and_leaves_nothing_behind():
    """In a fresh interpreter, the tensors alive in any pass or training step of tune never exceed the caller's
    weights plus one training step's gradients and Adam state (4x the weights, no private copy, no reference
    gradients beside a training run), and after tune exactly what was alive before is alive."""
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["verify_passes"] > 0  # the training runs happened
    assert r["after"] == r["base"], r  # nothing tune made outlives it
    # weights 1x + gradients 1x + Adam's two moments 2x, and the batch and small tensors on top
    assert r["peak"] <= 4 * r["params"] + 2 ** 20, {k: v / r["params"] for k, v in r.items()}
