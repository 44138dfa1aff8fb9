"""tune verifies what it ships: the returned Policy, installed as a user installs it; wrapped models tune."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autoprec
from autoprec.runtime import installed
from tests.models import mlp


def _user_loop(model: nn.Module, policy: autoprec.Policy, batch, loss_fn, steps: int) -> list[float]:
    """The README's training loop: install once, Adam(lr=1e-3) as tune's default verification optimizer."""
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    with policy.apply(model):
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(model(batch), batch)
            losses.append(float(loss))
            loss.backward()
            opt.step()
    return losses


def test_verified_losses_are_those_of_the_returned_policy_in_a_users_loop():
    """The verification curve in the policy is reproduced, bit for bit, by training the returned policy."""
    model, batch, loss_fn = mlp(batch_size=256)
    policy = autoprec.tune(model, batch, loss_fn, target="cuda", dtypes=["bf16"], progress=False, verify_steps=5)
    assert policy.low_precision_fraction() > 0.5 and policy.verification.passed
    assert _user_loop(model, policy, batch, loss_fn, 5) == list(policy.verification.policy_losses)


def test_verify_compile_trains_the_policy_compiled_too():
    """verify_compile runs the shipped policy under torch.compile; aot_eager reproduces eager exactly."""
    model, batch, loss_fn = mlp(batch_size=256)
    policy = autoprec.tune(model, batch, loss_fn, target="cuda", dtypes=["bf16"], progress=False, verify_steps=4,
                           verify_compile="aot_eager")
    ver = policy.verification
    assert ver.compiled == "aot_eager" and ver.passed
    assert ver.compiled_losses == ver.policy_losses and len(ver.compiled_losses) == 4
    assert ver.compiled_max_gap == ver.max_gap
    again = autoprec.Policy.from_dict(policy.to_dict())
    assert again.verification == ver


def test_verify_compile_rejects_an_unknown_backend():
    """An unknown torch.compile backend is an OptionError naming the known ones."""
    model, batch, loss_fn = mlp()
    with pytest.raises(autoprec.OptionError, match=r"verify_compile='nope' must be None or a torch.compile backend"):
        autoprec.tune(model, batch, loss_fn, progress=False, verify_compile="nope")


@pytest.mark.parametrize("wrap", ["compile", "data-parallel", "installed-policy"])
def test_tune_accepts_wrapped_models(wrap):
    """tune on a wrapped model gives the bare model's keys, and leaves the wrapper as it was."""
    model, batch, loss_fn = mlp(batch_size=128)
    bare = autoprec.tune(model, batch, loss_fn, target="cuda", dtypes=["bf16"], progress=False, verify_steps=0)
    handle = None
    if wrap == "compile":
        wrapped = torch.compile(model, backend="aot_eager")
    elif wrap == "data-parallel":
        wrapped = nn.DataParallel(model)
    else:
        wrapped, handle = model, bare.apply(model)
    policy = autoprec.tune(wrapped, batch, loss_fn, target="cuda", dtypes=["bf16"], progress=False, verify_steps=0)
    assert policy.assignment == bare.assignment and policy.modules == bare.modules
    if handle is not None:  # the caller's installed policy still runs
        assert installed(model.fc1)
        handle.remove()
