"""Stage 3 on its own: ``autoprec.search.search`` over a real trace and a real probe of tiny models.

The probe, its Runner and the ``measure`` callable are built the way :func:`autoprec.tune` builds them
(``autoprec.tuning._tune._tune``): every layer with matmul work is a candidate, the rest are skipped, and
``measure`` runs one forward+backward under an assignment against the probe's FP32 reference. Where a
property must hold exactly on every CPU, the test chooses what decides it: a bound far from the measured
errors (orders of magnitude), a ``headroom`` or a profile that settles it, or a hand-built ``measure`` whose
errors grow with the number of layers cast, so that which ``k`` is feasible is the test's choice.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprec.device import compute_bound, layer_cost, load_profile, roofline
from autoprec.device._costs import cost_note
from autoprec.probe import Runner, probe, relative_errors
from autoprec.search import Decision, SearchResult, Tolerance, search
from autoprec.search._decisions import fmt_err
from autoprec.trace import trace

PINNED_CPU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "cpu_profile.json")
#: a CUDA profile where every 16-bit matmul layer pays, however small (no per-call costs, free casts), and each
#: layer's saving grows with its FLOPs: decisions are numerical, and casting one more layer always saves time
ALWAYS_PAYS = roofline(fp32_flops=19.5e12, low_speedup=8.0, bandwidth=1e18, launch=0.0, region=0.0,
                       device="test GPU: every 16-bit layer faster")
LINEARS = ("fc1", "fc2", "fc3", "head")

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """fc1 -> act1 -> fc2 -> act2 -> fc3 -> act3 -> head: four Linear layers and three Tanh layers (no matmul work,
    no hazard: skipped by the probe, as tune skips them)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.head = nn.Linear(32, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 8)
        self.act1, self.act2, self.act3 = nn.Tanh(), nn.Tanh(), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act3(self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))))


class Overflow(nn.Module):
    """``big`` (weights x 1e5) puts outputs of ~1e5 into a tanh: past FP16's 65504, nowhere near BF16's max."""

    def __init__(self) -> None:
        super().__init__()
        self.big, self.head = nn.Linear(8, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.big.weight.mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.big(x)))


class Tied(nn.Module):
    """enc and dec share one weight; the batch's scale decides whether enc's FP16 output overflows."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


class Logits(nn.Module):
    """emb, then q and k scaled so that attention logits reach ~1e3 (no 1/sqrt(d)) into a softmax, and v."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.q, self.k, self.v = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        with torch.no_grad():
            self.q.weight.mul_(6.0)
            self.k.weight.mul_(6.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)


class Setup:
    """A model's trace, its probe and tune's ``measure``, built as :func:`autoprec.tune` builds them."""

    def __init__(self, model: nn.Module, batch: torch.Tensor, formats: tuple[str, ...], *, target: str = "cuda") -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            self.target = torch.randn(call_shape(model, batch))
        self.batch = batch
        self.trace = trace(model, batch, device_type="cpu")
        candidates = [lay.key for lay in self.trace.layers if lay.flops > 0 or lay.hazards]
        skipped = {lay.key: "no matmul/conv work to speed up and no known hazard"
                   for lay in self.trace.layers if lay.key not in candidates}
        self.runner = Runner(model, self.loss, self.trace, device_type="cpu", emulate_fp16=True,
                             emulate_cuda=target == "cuda", seed=0)
        self.probe = probe(self.runner, [batch], candidates, formats, skipped=skipped)
        self.calls: list[dict[str, str]] = []

    def loss(self, out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out.float(), self.target)

    def measure(self, assignment: dict[str, str]) -> tuple[float, float, bool]:
        """One forward+backward under ``assignment`` against the probe's FP32 reference (tune's ``measure``)."""
        self.calls.append(dict(assignment))
        ref_loss, ref_grads = self.probe.reference
        scale = self.probe.loss_scale if "fp16" in assignment.values() else 1.0
        loss, grads = self.runner.run(self.batch, dict(assignment), scale=scale)
        return relative_errors(loss, grads, ref_loss, ref_grads, reuse=True)

    def search(self, measure=None, **kw) -> SearchResult:
        kw = {"profile": ALWAYS_PAYS, "tolerance": Tolerance(), **kw}
        return search(self.trace, self.probe, measure or self.measure, **kw)


def call_shape(model: nn.Module, batch: torch.Tensor) -> torch.Size:
    with torch.no_grad():
        return model(batch).shape


def seeded(cls: type[nn.Module], *shape: int, scale: float = 1.0) -> tuple[nn.Module, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls().train(), torch.randn(*shape) * scale


_NETS: dict[tuple[str, ...], Setup] = {}


def net(formats: tuple[str, ...] = ("bf16",)) -> Setup:
    """The probed :class:`Net` (probed once per formats: the probe does not change)."""
    if formats not in _NETS:
        _NETS[formats] = Setup(*seeded(Net, 16, 32), formats)
    setup = _NETS[formats]
    setup.calls.clear()
    return setup


def counted(order: tuple[str, ...], per_layer: float, calls: list[int]):
    """A measure whose gradient error is ``per_layer`` times the number of ``order``'s layers cast."""

    def measure(assignment: dict[str, str]) -> tuple[float, float, bool]:
        n = sum(assignment[k] != "fp32" for k in order)
        calls.append(n)
        return 0.0, per_layer * n, True

    return measure


# -- layers pinned to FP32 before the study -------------------------------------------------------------------------
def test_overflow_pins_the_layer_with_the_count_and_the_fp32_range():
    """``big``'s FP16 outputs of ~1e5 are infinite: FP32, reason "overflow", excluded, the count and FP32's max."""
    s = Setup(*seeded(Overflow, 32, 8), ("fp16",))
    res = s.search(tolerance=Tolerance(1.0, 1.0))
    m, rng = s.probe.get("big", "fp16"), s.probe.ranges["big"]
    assert m.nonfinite > 0 and rng.out_absmax > 65504
    text = f"fp16: {m.nonfinite} non-finite outputs (FP32 |out| max {rng.out_absmax:.4g})"
    assert res.decisions["big"] == Decision("big", "fp32", "overflow", text, excluded=True)
    assert res.unsafe == {"fp16": {"big": f"overflow: {text}"}}
    assert res.order == ("head",) and s.calls and all(a["big"] == "fp32" for a in s.calls)


def test_a_format_refused_for_overflow_leaves_the_others_open_and_is_named_unsafe():
    """With BF16 probed too, ``big`` is open in BF16 (no range limit near 1e5) and says FP16 was refused; ``unsafe``
    lists FP16's refusal only."""
    s = Setup(*seeded(Overflow, 32, 8), ("fp16", "bf16"))
    res = s.search(tolerance=Tolerance(1.0, 1.0))
    m = s.probe.get("big", "fp16")
    refusal = f"fp16: {m.nonfinite} non-finite outputs (FP32 |out| max {s.probe.ranges['big'].out_absmax:.4g})"
    assert res.unsafe == {"fp16": {"big": f"overflow: {refusal}"}}
    assert "big" in res.order and res.decisions["big"].precision == "bf16"
    assert res.decisions["big"].detail == f"bf16: {fmt_err(s.probe.get('big', 'bf16'))}; refused {refusal}"


def test_range_pins_a_layer_whose_fp32_max_times_headroom_passes_the_format_max():
    """``headroom`` is the search's: at 1e6 every Linear's FP32 max (~1) times it passes 65504 in FP16; at 8, none."""
    s = net(("fp16",))
    res = s.search(headroom=1e6)
    for key in LINEARS:
        absmax = s.probe.ranges[key].out_absmax
        assert 65504 / 1e6 < absmax < 65504 / 8
        text = f"fp16: FP32 |out| max {absmax:.4g} x headroom 1e+06 exceeds 6.55e+04"
        assert res.decisions[key] == Decision(key, "fp32", "range", text, excluded=True)
        assert res.unsafe["fp16"][key] == f"range: {text}"
    assert res.order == () and res.k == 0 and s.calls == []  # nothing open: no pass measured
    assert set(s.search(headroom=8.0).order) == set(LINEARS)


@pytest.mark.parametrize("tol, reason", [(Tolerance(1e-9, 1.0), "error at loss"),
                                         (Tolerance(1.0, 1e-9), "error at gradients")], ids=["loss", "gradients"])
def test_a_layer_over_the_bound_alone_is_pinned_with_its_errors(tol, reason):
    """A bound of 1e-9 at the loss or at the gradients: each Linear whose own BF16 error passes it is pinned with its
    measured errors and the bound in the text, the others stay open. BF16 errors here are ~1e-3 at the gradients
    and up to ~1e-5 at the loss, where one layer's rounding may also leave the FP32 loss unchanged (0): the head,
    whose rounding reaches the loss directly, is over it on any CPU."""
    s = net()
    res = s.search(tolerance=tol)
    over = 0
    for key in LINEARS:
        m = s.probe.get(key, "bf16")
        assert m.amp == 0.0  # no amplifying op in this model
        err, bound = (m.loss_err, tol.loss) if reason == "error at loss" else (m.grad_err, tol.grad)
        if err > bound:
            over += 1
            text = f"bf16: {fmt_err(m)} > bound 1e-09"
            assert res.decisions[key] == Decision(key, "fp32", reason, text, excluded=True)
            assert res.unsafe["bf16"][key] == f"{reason}: {text}"
        else:
            assert key in res.order and key not in res.unsafe.get("bf16", {})
    assert s.probe.get("head", "bf16").loss_err > 1e-6 and res.decisions["head"].reason == reason
    assert over == len(res.unsafe["bf16"]) and len(res.order) == 4 - over
    if reason == "error at gradients":
        assert over == 4 and res.k == 0 and res.assignment == dict.fromkeys(res.decisions, "fp32")


def test_no_gain_on_the_pinned_cpu_profile_is_not_a_numerical_refusal():
    """On the pinned CPU profile, these small Linears are slower in BF16: "no gain", not excluded, the cost note
    in the text, nothing in ``unsafe``; the skipped tanh ops say why they were not probed."""
    s = net()
    cpu = load_profile(PINNED_CPU)
    res = s.search(profile=cpu)
    layers = {lay.key: lay for lay in s.trace.layers}
    for key in LINEARS:
        assert layer_cost(layers[key], "bf16", cpu) > layer_cost(layers[key], "fp32", cpu)
        note = cost_note(layers[key], ("bf16",), cpu)
        assert res.decisions[key] == Decision(key, "fp32", "no gain", f"bf16: not faster: {note}", excluded=False)
    skipped = [k for k in res.decisions if k not in LINEARS]
    assert skipped == ["act1", "act2", "act3"]
    for key in skipped:
        text = f"{s.probe.skipped[key]}; {cost_note(layers[key], ('bf16',), cpu)}"
        assert res.decisions[key] == Decision(key, "fp32", "no gain", text, excluded=False)
    assert res.unsafe == {} and res.order == () and res.k == 0 and res.trials == 1
    assert res.cost == res.cost_fp32 and res.history == ((0, res.cost_fp32, 0.0, 0.0),)


def test_amplified_pins_a_layer_whose_rounding_grows_in_the_softmax():
    """q and k in BF16 move logits of ~1e3 by far more than a nat (amplification 2 at the softmax, the bound 0.05):
    "amplified", excluded, with the probe's sentence; v feeds no amplifying op and is open."""
    s = Setup(*seeded(Logits, 4, 16, 16, scale=4.0), ("bf16",))
    res = s.search()
    for key in ("q", "k"):
        m = s.probe.get(key, "bf16")
        assert m.amp == 2.0 and m.amp_at == "::softmax"
        text = f"bf16: {m.amplified()} > bound 0.05"
        assert res.decisions[key].reason == "amplified" and res.decisions[key].excluded
        assert res.decisions[key].detail.startswith(text)
        assert res.unsafe["bf16"][key].startswith(f"amplified: {text}")
    assert "v" in res.order and "v" not in res.unsafe.get("bf16", {})


# -- the order, and tied layers ------------------------------------------------------------------------------------
def test_open_layers_are_ordered_by_error_per_unit_of_cost_saved():
    """The order is ascending in (measured error as a fraction of the bound) / (modelled FP32 - BF16 time); the head,
    with an eighth of fc2's FLOPs, saves least and comes last."""
    s = net()
    res = s.search()
    layers = {lay.key: lay for lay in s.trace.layers}

    def key(k: str) -> float:
        m = s.probe.get(k, "bf16")
        saved = layer_cost(layers[k], "fp32", ALWAYS_PAYS) - layer_cost(layers[k], "bf16", ALWAYS_PAYS)
        return Tolerance().score(m.loss_err, m.grad_err) / saved

    assert sorted(res.order) == sorted(LINEARS) and res.order[-1] == "head"
    ratios = [key(k) for k in res.order]
    assert ratios == sorted(ratios)


def test_tied_layers_move_together():
    """enc and dec share a weight: one unit, adjacent in the order; every measured assignment gives both one format."""
    s = Setup(*seeded(Tied, 16, 16), ("bf16",))
    assert s.trace.tied == (("dec", "enc"),)
    res = s.search(tolerance=Tolerance(1.0, 1.0))
    assert sorted(res.order) == ["dec", "enc", "head"] and abs(res.order.index("dec") - res.order.index("enc")) == 1
    assert s.calls and all(a["enc"] == a["dec"] for a in s.calls)
    assert res.decisions["enc"].precision == res.decisions["dec"].precision == "bf16"  # all within a bound of 1
    # three units (the pair, head): k counts units, so casting everything is k = 2
    assert res.k == 2 and max(k for k, *_ in res.history) == 2


def test_a_tied_layer_follows_its_partner_pinned_for_overflow():
    """With a batch of ~1e5, enc overflows in FP16; dec, fine alone, shares its weight: "tied weights", excluded."""
    s = Setup(*seeded(Tied, 16, 16, scale=1e5), ("fp16",))
    res = s.search(tolerance=Tolerance(1.0, 1.0))
    assert res.decisions["enc"].reason == "overflow"
    assert res.decisions["dec"] == Decision("dec", "fp32", "tied weights",
                                            "shares a parameter with enc, which must stay FP32", excluded=True)
    assert "dec" not in res.order and "dec" not in res.unsafe.get("fp16", {})


# -- picking k -----------------------------------------------------------------------------------------------------
def test_the_cheapest_feasible_assignment_wins_and_wider_ones_are_combined_error():
    """A bound set between the greedy guess's second and third layer (quadrature sum of the probe's errors), and a
    measure feasible with at most 2 layers cast: the study measures k = 2 (the guess) and 4 (all), and picks 2,
    the cheapest measured within the bound; the other two layers are "combined error", excluded."""
    s = net()
    order = s.search(tolerance=Tolerance(1.0, 1.0)).order
    errs = [s.probe.get(k, "bf16").grad_err for k in order]
    grad = (math.hypot(*errs[:2]) + math.hypot(*errs[:3])) / 2  # the greedy guess is 2 layers under this bound
    assert max(errs) < grad and max(s.probe.get(k, "bf16").loss_err for k in order) < 0.01
    calls: list[int] = []
    res = s.search(counted(order, 0.45 * grad, calls), tolerance=Tolerance(1.0, grad))
    assert res.order == order and res.k == 2 and calls[:2] == [2, 4]
    assert sorted(calls) == sorted(k for k, *_ in res.history if k) and len(set(calls)) == len(calls)  # once each k
    for key in order[:2]:
        m = s.probe.get(key, "bf16")
        assert res.decisions[key] == Decision(key, "bf16", "cast", f"bf16: {fmt_err(m)}")
    for key in order[2:]:
        text = f"alone in bf16: {fmt_err(s.probe.get(key, 'bf16'))}; casting it too put the measured total over the bound"
        assert res.decisions[key] == Decision(key, "fp32", "combined error", text, excluded=True)
    assert (res.loss_err, res.grad_err) == (0.0, 0.45 * grad * 2)
    history = {k: rest for k, *rest in res.history}
    assert [k for k, *_ in res.history] == sorted(history)
    for k, (cost, loss_err, grad_err) in history.items():
        assert (loss_err, grad_err) == (0.0, 0.45 * grad * k)
    costs = [history[k][0] for k in sorted(history)]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)  # each cast layer saves time
    assert res.cost == history[2][0] < res.cost_fp32
    # the Tanh layers around the two cast Linears join them (BF16 elementwise work is cheaper on this profile)
    assert set(order[:2]) == {"fc2", "fc3"}  # fc1 and head save half and an eighth of their time: 2x apart at least
    assert res.assignment == {**dict.fromkeys(res.decisions, "fp32"),
                              **dict.fromkeys(("act1", "fc2", "act2", "fc3", "act3"), "bf16")}
    assert res.decisions["act1"].detail.startswith("joins its neighbours in bf16; no matmul/conv work")
    assert res.decisions["act3"].detail.startswith("follows: its inputs come in bf16 from fc3, handed over uncast; ")
    # the runner-up: the next cheapest k measured within the bound, if the study measured one
    below = [k for k in history if k < 2]
    assert (res.runner_up == {}) == (not below)
    if below:
        assert [k for k in order if res.runner_up[k] == "bf16"] == list(order[:max(below)])


def test_all_layers_cast_where_every_assignment_is_within_the_bound():
    """A measure within the bound everywhere: the greedy guess is all four layers, measured first, and wins; the
    runner-up is the widest other assignment measured (it casts a prefix of the order)."""
    s = net()
    order = s.search(tolerance=Tolerance(1.0, 1.0)).order
    calls: list[int] = []
    res = s.search(counted(LINEARS, 0.0, calls))
    assert res.k == 4 and calls[0] == 4 and res.order == order
    assert all(res.decisions[k] == Decision(k, "bf16", "cast", f"bf16: {fmt_err(s.probe.get(k, 'bf16'))}")
               for k in LINEARS)
    others = [k for k, *_ in res.history if k != 4]
    assert others and res.runner_up  # 5 trials over k in 0..4: the study measured another k
    assert [k for k in order if res.runner_up[k] == "bf16"] == list(order[:max(others)])


def test_non_finite_assignments_are_infeasible():
    """A measure that is non-finite with more than one layer cast: the greedy guess (all four) and every wider k are
    out, and the pick is the cheapest finite one measured; the layers after it are "combined error"."""
    s = net()
    order = s.search(tolerance=Tolerance(1.0, 1.0)).order

    def measure(a: dict[str, str]) -> tuple[float, float, bool]:
        n = sum(a[k] != "fp32" for k in order)
        return (0.0, 0.0, True) if n <= 1 else (math.inf, math.inf, False)

    res = s.search(measure)
    finite = [k for k, _, loss_err, _ in res.history if math.isfinite(loss_err)]
    assert set(finite) <= {0, 1} and 4 in {k for k, *_ in res.history}
    assert res.k == max(finite, default=0) and [k for k in order if res.decisions[k].precision == "bf16"] == [
        *order[:res.k]]
    assert all(res.decisions[k].reason == "combined error" and res.decisions[k].excluded for k in order[res.k:])


# -- determinism and progress --------------------------------------------------------------------------------------
def test_the_same_inputs_and_seed_give_the_same_result():
    s = net()
    first = s.search(tolerance=Tolerance(1e-4, 4e-3), seed=7)
    second = s.search(tolerance=Tolerance(1e-4, 4e-3), seed=7)
    assert first == second and first.trials == 5 and len(first.history) >= 2


@pytest.mark.parametrize("n_trials, plan", [(30, 5), (3, 3)])
def test_progress_states_the_plan_then_counts_each_trial(n_trials, plan):
    """``progress(0, n)`` before the first trial, then ``(i, n)`` after trial i; n is min(n_trials, open moves + 1)."""
    s = net()
    seen: list[tuple[int, int]] = []
    res = s.search(n_trials=n_trials, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, plan) for i in range(plan + 1)] and res.trials == plan


def test_compute_bound_is_the_cuda_roofline_the_suite_pins():
    """The conftest's CUDA profile, passed directly: without per-call costs the inner Linears are open."""
    s = net()
    res = s.search(profile=compute_bound())
    assert {"fc2", "fc3"} <= set(res.order)


def test_the_study_key_reads_a_few_kb_of_the_gradients_whatever_their_size():
    """The stored study's key pins the FP32 gradients by a fingerprint computed where they are: its bytes grow with
    the number of gradients, not their size (a 4M-element gradient gives 1027 FP64 figures); BF16 gradients work;
    a change anywhere shows in the sum."""
    from autoprec.search._search import FINGERPRINT_SAMPLES, grad_fingerprint

    big = torch.randn(4 * 2 ** 20, generator=torch.Generator().manual_seed(0))
    assert len(grad_fingerprint([big, None])) == 8 * (3 + FINGERPRINT_SAMPLES)
    assert len(grad_fingerprint([big.bfloat16()])) == 8 * (3 + FINGERPRINT_SAMPLES)
    moved = big.clone()
    moved[1] += 1.0  # not a sampled element
    assert grad_fingerprint([moved]) != grad_fingerprint([big]) and grad_fingerprint([big]) == grad_fingerprint([big])
