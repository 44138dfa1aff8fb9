"""Models torch.export cannot capture whole: tune completes, the policy names what was opaque, and
the policy applies and trains.

Covered here (test_tune_core.py has the basic ``if h.mean().item() > c`` branch in a child module):
data-dependent control flow on a tensor's truth value and a data-dependent loop; ``.item()`` used
as a Python number (capturable) and as a slice length (not); custom ``torch.autograd.Function``\\ s
in a leaf and in a non-leaf's own code, capturable ones and a NumPy-backed one that is not; an
untraceable *leaf*; and an untraceable root module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import autoprec

W = 256  # wide enough that BF16 is modelled as faster than FP32 on a CPU target


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------
# the untraceable parts
# ---------------------------------------------------------------------------


class BranchOnTensor(nn.Module):
    """Own code branches on a tensor's truth value (``if tensor:``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:
            h = torch.softmax(h, -1) * W
        else:
            h = torch.tanh(h)
        return self.fc2(h)


class DataDependentLoop(nn.Module):
    """Own code loops a data-dependent number of times."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        while h.abs().max() > 1.0:
            h = h * 0.5
        return self.fc2(h)


class ItemAsNumber(nn.Module):
    """``.item()`` used as a Python number in arithmetic: torch.export captures this."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h / (1.0 + h.abs().max().item()))


class ItemAsLength(nn.Module):
    """``.item()`` turned into a Python int that sizes a slice: not capturable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        n = int((h[0] > 0).sum().item()) // 2 + 1
        h = torch.cat([torch.softmax(h[:, :n], -1), h[:, n:]], -1)
        return self.fc2(h)


class MatmulFn(torch.autograd.Function):
    """A custom matmul with a hand-written backward (which, like many, assumes one dtype throughout)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        return g @ w.t(), x.reshape(-1, x.shape[-1]).t() @ g.reshape(-1, g.shape[-1])


class NumpyTanh(torch.autograd.Function):
    """A "custom kernel" computed outside torch (NumPy): export cannot see through it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.from_numpy(np.tanh(x.detach().float().cpu().numpy())).to(x.dtype)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return g * (1 - y.to(g.dtype) ** 2)


class FnLeaf(nn.Module):
    """A leaf whose forward is a custom autograd.Function (capturable)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(W, W) / W ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MatmulFn.apply(x, self.weight)


class FnInOwnCode(nn.Module):
    """A non-leaf whose own code calls a custom autograd.Function (capturable) and a softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(W, W)
        self.w2 = nn.Parameter(torch.randn(W, W) / W ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(MatmulFn.apply(self.fc(x), self.w2), -1) * W


class NumpyLeaf(nn.Module):
    """A leaf whose forward runs a NumPy-backed autograd.Function: an untraceable leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(W, W) / W ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NumpyTanh.apply(x @ self.weight)


class NumpyInOwnCode(nn.Module):
    """A non-leaf whose own code runs a NumPy-backed autograd.Function between two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(NumpyTanh.apply(self.fc1(x)))


class BranchingLeaf(nn.Module):
    """A leaf (no children) with data-dependent control flow: an untraceable leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(W, W) / W ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return torch.relu(y) if y.mean() > 0 else y * 0.5


class BranchingRoot(nn.Module):
    """The root module's own code is data-dependent (the opaque key is the root, ``""``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc1, self.fc2 = nn.Linear(W, W), nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.inp(x))
        if (h > 0).sum().item() > h.numel() // 4:
            h = torch.softmax(h, -1) * W
        return self.fc2(h)


def _wrapped(middle: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(W, W), middle, nn.Linear(W, W))


# name -> (model factory, opaque module paths expected, layer keys expected in the policy)
CASES = {
    "branch_on_tensor": (lambda: _wrapped(BranchOnTensor()), {"1"}, {"0", "1.fc1", "1.fc2", "2"}),
    "data_dependent_loop": (lambda: _wrapped(DataDependentLoop()), {"1"}, {"0", "1.fc1", "1.fc2", "2"}),
    "item_as_number": (lambda: _wrapped(ItemAsNumber()), set(), {"0", "1.fc1", "1.fc2", "2"}),
    "item_as_length": (lambda: _wrapped(ItemAsLength()), {"1"}, {"0", "1.fc1", "1.fc2", "2"}),
    "autograd_fn_in_leaf": (lambda: _wrapped(FnLeaf()), set(), {"0", "1", "2"}),
    "autograd_fn_in_own_code": (lambda: _wrapped(FnInOwnCode()), set(), {"0", "1.fc", "1::matmul", "1::softmax", "2"}),
    "numpy_fn_in_leaf": (lambda: _wrapped(NumpyLeaf()), {"1"}, {"0", "1", "2"}),
    "numpy_fn_in_own_code": (lambda: _wrapped(NumpyInOwnCode()), {"1"}, {"0", "1.fc1", "1.fc2", "2"}),
    "untraceable_leaf": (lambda: _wrapped(BranchingLeaf()), {"1"}, {"0", "1", "2"}),
    "untraceable_root": (lambda: BranchingRoot(), {""}, {"inp", "fc1", "fc2"}),
}


def _make(name: str) -> tuple[nn.Module, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CASES[name][0]()
        batch = torch.randn(128, W)
    return model.train(), batch


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


_TUNED: dict[str, autoprec.Policy] = {}


def tuned(name: str) -> autoprec.Policy:
    if name not in _TUNED:
        model, batch = _make(name)
        # a GPU target: on the CPU profile layers this small gain nothing from BF16 and stay FP32
        _TUNED[name] = autoprec.tune(model, batch, lambda out, b: _loss(out), progress=False, verify_steps=3,
                                     target="cuda", dtypes=["bf16"])
    return _TUNED[name]


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_tune_completes_and_names_what_was_opaque(name):
    """tune finishes; policy.opaque and the report name exactly the parts FX could not capture, with why."""
    policy = tuned(name)
    _, opaque, keys = CASES[name]
    assert set(policy.opaque) == opaque
    assert keys <= set(policy.layers), sorted(policy.layers)
    assert all(reason.strip() for reason in policy.opaque.values())
    report = policy.report()
    if opaque:
        assert policy.stats["fx_route"] == "torch.export per module"
        assert "Opaque to FX" in report
        for path in opaque - {""}:
            assert f"`{path}`: {policy.opaque[path]}" in report
        for path in opaque:  # the own code of an opaque non-leaf is not split into op layers
            if path not in keys:
                assert not any(k.startswith(f"{path}::") for k in policy.layers)
    else:
        assert policy.stats["fx_route"] == "torch.export"
        assert "Opaque to FX" not in report
    assert policy.verification is not None and policy.verification.passed
    assert policy.low_precision_fraction() > 0  # the capturable Linears around it are still tuned


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_policy_applies_and_trains(name, tmp_path):
    """The (saved and reloaded) policy installs on a fresh copy of the model and trains with finite losses."""
    tuned(name).save(tmp_path / "p.json")
    policy = autoprec.load(tmp_path / "p.json")
    model, batch = _make(name)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    with policy.autocast(model):
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            loss = _loss(model(batch))
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)), losses
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not torch._C._is_torch_function_mode_enabled() and not torch.is_autocast_enabled("cpu")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_custom_function_whose_backward_cannot_take_bf16_is_kept_fp32_with_evidence():
    """A custom Function leaf whose hand-written backward fails in BF16 stays FP32, and the evidence says why."""
    entry = tuned("autograd_fn_in_leaf").layers["1"]
    assert entry.precision == "fp32" and entry.excluded
    assert entry.reason == "cannot run" and "bf16" in entry.detail and "dtype" in entry.detail


def test_untraceable_leaf_is_one_layer_with_its_own_precision():
    """An untraceable leaf is one layer as a whole: a precision of its own, measured like any other."""
    policy = tuned("untraceable_leaf")
    entry = policy.layers["1"]
    assert entry.kind == "module" and entry.flops > 0
    assert "bf16" in entry.measured
    m, tol = entry.measured["bf16"], policy.tolerance
    within = m["loss_err"] <= tol["loss"] and m["grad_err"] <= tol["grad"]
    # BF16 exactly when its measured error is within the bound and the cost model gives it a gain
    assert (entry.precision == "bf16") == (within and entry.reason != "no gain"), (entry, tol)
    if entry.precision == "fp32":
        assert entry.reason == "no gain" if within else entry.excluded, entry


def test_opaque_root_is_named_in_the_report():
    """An opaque root module is named readably in the report, as ``(root)`` like in the Formats table."""
    report = tuned("untraceable_root").report()
    section = report[report.index("## Opaque to FX"):]
    assert "- ``:" not in section
    assert "(root)" in section.split("## Formats")[0]


def test_tune_of_untraceable_model_is_silent_without_progress(capfd):
    """With progress=False, tuning a model with untraceable parts writes nothing to stdout or stderr."""
    model, batch = _make("untraceable_leaf")
    autoprec.tune(model, batch, lambda out, b: _loss(out), progress=False, verify_steps=0)
    out, err = capfd.readouterr()
    assert out == "" and err == "", err[:500]
