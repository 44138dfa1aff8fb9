"""The hazard models of ``tests/models_unseen.py`` (issue 25): their danger shows on some batches of one
distribution and not on others.

What holds on any CPU: the FP32 runs are finite, a draw is the same for the same seed, the careful
hand-written policy stays within tune's gradient bound on 20 fresh batches (its 16-bit layers are ones
no margin depends on; its errors are 7-15x under the bound), and the hazard itself, checked in FP64:
rounding the producer's output to FP16 flips a route (a softmax winner, a top-2 set) or wipes out a
row's variance on some of ``draw(1..20)`` and not on ``draw(0)``. And tune's own policy, tuned on
``draw(0)``, holds on those batches with a 16-bit fraction at least 0.9 of the careful policy's (issue 25:
the producers of an amplifying op are measured against it, :mod:`autoprec.probe._amplify`; the margins are large
by construction: a flip or a wiped row is an error of order 1, the bound 0.05).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autoprec
from autoprec import LayerEntry, Policy
from tests.helpers import forward_backward, rel_errors
from tests.models_unseen import UNSEEN_FACTORIES, UnseenCase

NAMES = sorted(UNSEEN_FACTORIES)
FRESH = range(1, 21)
GRAD_BOUND = 0.05  # tune's default grad_tolerance


def _case(name: str) -> UnseenCase:
    return UNSEEN_FACTORIES[name]()


def _grad_errors(case: UnseenCase, policy: Policy) -> list[float]:
    out = []
    for s in FRESH:
        batch = case.draw(s)
        ref = forward_backward(case.model, batch, case.loss_fn)
        out.append(rel_errors(*forward_backward(case.model, batch, case.loss_fn, policy=policy), *ref)[1])
    return out


@pytest.mark.parametrize("name", NAMES)
def test_fp32_run_is_finite_and_draw_is_deterministic(name, one_thread):
    case = _case(name)
    a, b, other = case.draw(3), case.draw(3), case.draw(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], other[0])
    loss, grad = forward_backward(case.model, a, case.loss_fn)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all()) and float(grad.norm()) > 0
    half = tuple(t[: len(t) // 2] for t in a)  # the loss works on any subset of a batch's rows
    assert bool(torch.isfinite(case.loss_fn(case.model(*half), half)))


@pytest.mark.parametrize("name", NAMES)
def test_careful_policy_holds_on_fresh_batches(name, one_thread):
    case = _case(name)
    careful = Policy(layers={k: LayerEntry(p) for k, p in case.careful.items()}, target="cuda")
    assert "bf16" in careful.assignment.values() and "fp32" in careful.assignment.values()
    errs = _grad_errors(case, careful)
    assert max(errs) < GRAD_BOUND, errs


# -- the hazard, in FP64: what rounding the producer's output to FP16 does downstream --------------

def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().double()


def _attention_flips(case: UnseenCase, seed: int) -> int:
    m = case.model.double()
    with torch.no_grad():
        h = m.embed(case.draw(seed)[0].double())

        exact = (m.q(h) @ m.k(h).transpose(-2, -1)).argmax(-1)
        h = _fp16(h)  # embed, q and k in FP16: each output rounded
        rounded = (_fp16(m.q(h)) @ _fp16(m.k(h)).transpose(-2, -1)).argmax(-1)
        return int((exact != rounded).sum())


def _router_flips(case: UnseenCase, seed: int) -> int:
    m = case.model.double()
    with torch.no_grad():
        h = m.embed(case.draw(seed)[0].double())

        def chosen(h: torch.Tensor) -> torch.Tensor:
            return torch.topk(m.router(h), 2, dim=-1).indices.sort(-1).values
        return int((chosen(h) != chosen(_fp16(h))).any(-1).sum())


def _variance_wiped(case: UnseenCase, seed: int) -> int:
    m = case.model.double()
    with torch.no_grad():
        p = m.producer(torch.relu(m.inp(case.draw(seed)[0].double())))
        norm = torch.nn.functional.layer_norm
        err = (norm(_fp16(p), p.shape[-1:]) - norm(p, p.shape[-1:])).norm(dim=-1) / p.shape[-1] ** 0.5
        return int((err > 0.5).sum())


HAZARD = {"unscaled_attention": _attention_flips, "router": _router_flips, "small_variance": _variance_wiped}


@pytest.mark.parametrize("name", NAMES)
def test_hazard_shows_on_some_fresh_batches_and_not_on_the_first(name):
    case = _case(name)
    hit = [HAZARD[name](case, s) for s in FRESH]
    assert HAZARD[name](case, 0) == 0
    assert 2 <= sum(n > 0 for n in hit) <= 18, hit  # some batches, not all: what a tuner on one batch misses


# -- tune's own policy on fresh batches: issue 25 -----------------------------------------------

def _with(policy: Policy, careful: dict[str, str]) -> Policy:
    layers = {k: dataclasses.replace(e, precision=careful.get(k, "fp32")) for k, e in policy.layers.items()}
    return dataclasses.replace(policy, layers=layers)



@pytest.mark.parametrize("name", NAMES)
def test_tuned_policy_holds_on_fresh_batches(name, one_thread):
    case = _case(name)
    policy = autoprec.tune(case.model, case.draw(0), case.loss_fn, target="cuda", progress=False)
    errs = _grad_errors(case, policy)
    assert max(errs) <= policy.tolerance["grad"], errs
    assert policy.low_precision_fraction() >= 0.9 * _with(policy, case.careful).low_precision_fraction()
