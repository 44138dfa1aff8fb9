"""What a policy costs an eager forward in Python calls: counted, on a 12-layer HF GPT-2, against blanket autocast.

On a GPU a step of GPT-2 small takes 10-20 ms; each Python call the runtime adds is host time the GPU may wait
for. Counted with ``sys.setprofile`` (every Python frame entered), not timed: the count is the same on any CPU.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from autoprec.runtime import _apply, _runtime

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
from runtime_overhead import gpt2_case, policy_of, python_calls  # noqa: E402  (the benchmark's model and count)

transformers = pytest.importorskip("transformers")

#: the issue's bound: a GPT-2 policy's eager forward at most 1.3x blanket autocast's Python calls
BOUND = 1.3


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_case(width=32, vocab=128, rows=2, seq=16)


def _forward_calls(model, batch, context) -> int:
    with context():
        model(**batch)  # the first call builds what later calls reuse (the plan, HF's caches)
        return python_calls(lambda: model(**batch))


@pytest.mark.parametrize("precision,ops", [("bf16", True), ("bf16", False), ("fp32", True)],
                         ids=["every-layer-bf16", "modules-only-bf16", "every-layer-fp32"])
def test_a_gpt2_policy_costs_at_most_1_3x_blanket_autocasts_python_calls(gpt2, precision, ops):
    """Every layer in BF16 (the op entries too: attention and the loss in the model's own code), module entries
    only, or all FP32: each forward's Python calls within 1.3x of ``torch.autocast``'s over the whole model."""
    model, batch, tr = gpt2
    policy = policy_of(model, tr, precision, ops)
    assert ops == any("::" in k for k in policy.assignment)
    blanket = _forward_calls(model, batch, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    with policy.apply(model):
        ours = _forward_calls(model, batch, torch.enable_grad)
    assert ours <= BOUND * blanket, (ours, blanket, ours / blanket)


def test_attention_own_code_runs_under_autocast_alone_with_the_modes_values(gpt2, monkeypatch):
    """The 12 attention modules' own code (a BF16 SDPA entry handed on to c_proj) runs under autocast alone,
    without a function mode: the loss and every gradient are bit for bit those of the mode's op regions."""
    model, batch, tr = gpt2

    def run() -> tuple[list[str], torch.Tensor, list[torch.Tensor]]:
        policy = policy_of(model, tr, "bf16")  # a policy of its own: a plan of its own
        model.zero_grad()
        with policy.apply(model):
            covered = sorted(spec.path for _, spec in _apply._PLANS[model].plan if spec.covered is not None)
            loss = model(**batch).loss
            loss.backward()
        return covered, loss.detach(), [p.grad.clone() for p in model.parameters()]

    covered, loss, grads = run()
    assert covered == sorted(f"transformer.h.{i}.attn" for i in range(12)), covered
    monkeypatch.setattr(_runtime, "AUTOCAST_COVERS", {})  # every own code through the mode again
    mode_covered, mode_loss, mode_grads = run()
    assert mode_covered == []
    assert torch.equal(loss, mode_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, mode_grads))


def test_autocast_covers_only_ops_the_cpus_autocast_casts():
    """Each op the CPU's cover list names comes out of ``torch.autocast("cpu", bfloat16)`` in BF16 from FP32 inputs
    (if torch stops casting one, the cover would change numerics: this fails)."""
    import torch.nn.functional as F

    a, b, x = torch.randn(3, 4), torch.randn(4, 4), torch.randn(1, 2, 4, 4)
    calls = {"linear": lambda: F.linear(a, b), "matmul": lambda: a @ b, "mm": lambda: torch.mm(a, b),
             "bmm": lambda: torch.bmm(a[None], b[None]), "einsum": lambda: torch.einsum("ij,jk->ik", a, b),
             "prelu": lambda: F.prelu(a, torch.ones(1)),
             "scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(x, x, x),
             "conv1d": lambda: F.conv1d(x[:, :, 0], torch.randn(2, 2, 1)),
             "conv2d": lambda: F.conv2d(x, torch.randn(2, 2, 1, 1)),
             "conv3d": lambda: F.conv3d(x[None], torch.randn(2, 1, 1, 1, 1)),
             "conv_transpose1d": lambda: F.conv_transpose1d(x[:, :, 0], torch.randn(2, 2, 1)),
             "conv_transpose2d": lambda: F.conv_transpose2d(x, torch.randn(2, 2, 1, 1)),
             "conv_transpose3d": lambda: F.conv_transpose3d(x[None], torch.randn(1, 1, 1, 1, 1))}
    assert set(calls) == _runtime.AUTOCAST_COVERS["cpu"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes = {name: call().dtype for name, call in calls.items()}
    assert dtypes == dict.fromkeys(calls, torch.bfloat16)
