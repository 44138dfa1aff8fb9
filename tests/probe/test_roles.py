"""Structure sharing in the probe (``autoprec.probe._roles``): roles of repeated blocks are probed as groups, split where
a member differs, and ``tune`` decides every layer as it does probing each layer alone, in fewer passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprec
from autoprec.probe import Runner, Sharing, probe, role_of, roles
from autoprec.probe._roles import probe_groups
from autoprec.trace import trace
from tests.helpers import cached, forward_backward, rel_errors
from tests.models import HAZARD_FACTORIES
from tests.models_coverage import looped_moe


class _Block(nn.Module):
    """Pre-LN residual MLP block whose input passes through a fixed ``gain`` before ``fc1``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.register_buffer("gain", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x) * self.gain)))


class _Stack(nn.Module):
    def __init__(self, depth: int, dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def outlier_stack(seed: int = 0, *, depth: int = 6, dim: int = 128, outlier: int | None = 3, batch: int = 256):
    """``(model, batch, loss_fn)``: residual MLP blocks; at depth ``outlier`` fc1's input is scaled by 1e5 and its
    weight by 1e-5, so that FP32 computes what the other depths do but FP16 overflows casting that input."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Stack(depth, dim)
        if outlier is not None:
            with torch.no_grad():
                model.blocks[outlier].gain.fill_(1e5)
                model.blocks[outlier].fc1.weight.mul_(1e-5)
            # frozen: Adam's steps (~lr, whatever the weight's scale) on a 1e-5 weight fed 1e5 inputs make FP32
            # training itself blow up (loss 1.7 -> 4.5e6 in one step), and no policy can be verified against that
            model.blocks[outlier].fc1.weight.requires_grad_(False)
        torch.manual_seed(seed)
        x, y = torch.randn(batch, dim), torch.randn(batch, 1)
    return model, x, lambda out, b: F.mse_loss(out.float(), y)


def gpt2(seed: int = 0, *, blocks: int = 4, width: int = 64, vocab: int = 1000):
    """``(model, batch, loss_fn)``: a random-init GPT-2 from a transformers config (no dropout), batch 2 x 32 tokens."""
    tf = pytest.importorskip("transformers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=blocks, n_embd=width, n_head=max(1, width // 64),
                                                 vocab_size=vocab, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                                 attn_pdrop=0.0)).float().train()
        torch.manual_seed(seed)
        ids = torch.randint(0, vocab, (2, 32))
    return model, {"input_ids": ids, "labels": ids.clone()}, lambda out, b: out.loss


def small_looped_moe(seed: int = 0):
    """``(model, batch, loss_fn)``: the looped mixture of experts (4 expert MLPs in an ``nn.ModuleList``), small."""
    model, x = looped_moe(seed, width=32, hidden=64)
    return model, x, lambda out, b: out.float().pow(2).mean()


MODELS = {**HAZARD_FACTORIES, "outlier_stack": outlier_stack, "gpt2": gpt2, "looped_moe": small_looped_moe}
GROUPED = ("outlier_stack", "gpt2", "looped_moe")  # the models with roles


@cached
def tuned(name: str, share: bool, verify_steps: int = 0) -> autoprec.Policy:
    """One tune per (model, sharing, verify steps), for CUDA (emulated here) in FP16 and BF16."""
    model, batch, loss_fn = MODELS[name]()
    return autoprec.tune(model, batch, loss_fn, target="cuda", dtypes=["fp16", "bf16"], progress=False,
                         verify_steps=verify_steps, share_roles=share)


def _probe(model, batch, loss_fn, share):
    tr = trace(model, batch, device_type="cpu")
    cands = [lay.key for lay in tr.layers if lay.flops > 0 or lay.hazards]
    runner = Runner(model, loss_fn, tr, device_type="cpu", emulate_fp16=True, emulate_cuda=True, seed=0)
    return probe(runner, [batch], cands, ("fp16", "bf16"), share=share), tr, cands


def test_roles_group_equal_patterns_of_equal_shapes():
    """Layers whose keys differ only in block indices form a role; different shapes or a different class do not."""
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(3)), nn.Linear(8, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    tr = trace(model, torch.ones(2, 8), device_type="cpu")
    assert roles(tr, [lay.key for lay in tr.layers]) == {"*": ("0", "1", "2"), "*#2": ("4", "5")}
    assert roles(tr, ["0", "3"]) == {}
    assert role_of("transformer.h.10.attn::scaled_dot_product_attention") == \
        "transformer.h.*.attn::scaled_dot_product_attention"


def test_roles_group_layers_whose_rows_differ_only():
    """Layers fed different row counts (experts given their routed tokens) are one role; any other dimension that
    differs, a tensor of one dimension that differs, or another call count keeps them apart."""

    class Rows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.ModuleList(nn.Linear(8, 8) for _ in range(7))
            self.pre = nn.ModuleList(nn.LayerNorm(8) for _ in range(2))
            self.sm = nn.ModuleList(nn.Softmax(0) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.fc[0](x[:3]), self.fc[1](x[:5])                # rows differ: one role
            c, d = self.fc[2](x[:2].view(2, 1, 8)), self.fc[3](x[:4].view(2, 2, 8))  # second dimension differs
            e = self.fc[4](self.fc[4](x[:1]))                             # called twice
            f = self.sm[0](x[0]).sum() + self.sm[1](x[0, :4]).sum()      # one dimension: sizes differ
            return a.sum() + b.sum() + c.sum() + d.sum() + e.sum() + f.sum() + self.pre[0](x).sum() + \
                self.pre[1](x[:6]).sum() + self.fc[5](x[:7]).sum() + self.fc[6](x).sum()

    tr = trace(Rows(), torch.randn(8, 8), device_type="cpu")
    assert roles(tr, [lay.key for lay in tr.layers]) == {"fc.*": ("fc.0", "fc.1", "fc.5", "fc.6"),
                                                          "pre.*": ("pre.0", "pre.1")}


@pytest.mark.parametrize("unrouted", [0, 1])
def test_looped_experts_are_one_role_whatever_their_count(unrouted):
    """A ModuleList of expert MLPs run on their routed tokens: each expert Linear's role holds every expert that ran,
    the router is probed alone, and 4 and 8 experts give the same probe groups."""
    plans = {}
    for experts in (4, 8):
        model, x = looped_moe(experts=experts, unrouted=unrouted, width=32, hidden=64)
        tr = trace(model, x, device_type="cpu")
        cands = [lay.key for lay in tr.layers if lay.flops > 0 or lay.hazards]
        groups = roles(tr, cands)
        ran = experts - unrouted
        assert groups == {"experts.*.up": tuple(f"experts.{e}.up" for e in range(ran)),
                          "experts.*.down": tuple(f"experts.{e}.down" for e in range(ran))}
        plans[experts] = [name for name, _ in probe_groups(cands, groups)]
    assert plans[4] == plans[8] == ["inp", "router", "experts.*.up", "experts.*.down", "out"]


def test_outlier_depth_is_probed_alone_and_the_rest_as_groups():
    """FP16 overflows at one depth: that fc1 is measured alone (non-finite), its role's other members as groups;
    in BF16 (no overflow) the whole role shares one measurement."""
    model, batch, loss_fn = outlier_stack()
    pr, _, cands = _probe(model, batch, loss_fn, Sharing())
    alone = pr.get("blocks.3.fc1", "fp16")
    assert alone.members == 1 and alone.group == "" and (alone.nonfinite > 0 or not alone.finite)
    others = {i: pr.get(f"blocks.{i}.fc1", "fp16") for i in (0, 1, 2, 4, 5)}
    assert all(m.group == "blocks.*.fc1" and m.finite and m.nonfinite == 0 for m in others.values())
    assert {i: m.members for i, m in others.items()} == {0: 3, 1: 3, 2: 3, 4: 2, 5: 2}  # before and after it
    assert {pr.get(f"blocks.{i}.fc1", "bf16").members for i in range(6)} == {6}
    assert pr.passes < 1 + 2 * len(cands)


def test_group_measurement_bounds_the_members_own_errors():
    """Where a role's measurement stands for its members, it is at least each member's own gradient error."""
    model, batch, loss_fn = gpt2()
    shared, _, _ = _probe(model, batch, loss_fn, Sharing())
    alone, _, cands = _probe(model, batch, loss_fn, None)
    grouped = [(k, f) for (k, f), m in shared.measurements.items() if m.members > 1]
    assert grouped, "GPT-2's roles were not probed as groups"
    # the group stands for a member only well inside the bound (a quarter of it), so it need not bound the
    # member's error to the last bit: a member within 1.25x of its group's figure is still 3.2x inside the bound
    over = {(k, f): (alone.get(k, f).grad_err, shared.get(k, f).grad_err) for k, f in grouped
            if alone.get(k, f).grad_err > 1.25 * shared.get(k, f).grad_err}
    assert not over, over
    for k, f in grouped:
        assert alone.get(k, f).full_width == shared.get(k, f).full_width, (k, f)
    assert shared.passes <= 0.4 * alone.passes, (shared.passes, alone.passes)


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_sharing_gives_the_per_layer_decisions_in_fewer_passes(name):
    """``tune`` with sharing assigns every layer the format it gets when each layer is probed alone, with no more
    probe passes (fewer where the model repeats a block). Exact on any CPU: a member whose role is not clearly
    inside the bound is measured alone, so a layer near the bound is decided on the same figure both ways."""
    shared, alone = tuned(name, True), tuned(name, False)
    assert shared.assignment == alone.assignment
    assert {k: e.reason for k, e in shared.layers.items()} == {k: e.reason for k, e in alone.layers.items()}
    if name in GROUPED:
        assert shared.stats["probe_passes"] < alone.stats["probe_passes"]
    else:
        assert shared.stats["probe_passes"] == alone.stats["probe_passes"]


def test_outlier_decisions_name_the_overflow_and_the_shared_bound():
    """The outlier depth's fc1 is refused FP16 for overflow, measured alone; a grouped member's evidence says its
    figures are a bound from its role (in the detail and the ``shared`` figure)."""
    policy = tuned("outlier_stack", True)
    entry = policy.layers["blocks.3.fc1"]
    assert entry.precision != "fp16" and "fp16:" in entry.detail and "non-finite" in entry.detail, entry.detail
    assert "shared" not in entry.measured["fp16"]
    member = policy.layers["blocks.0.fc1"]
    assert member.precision == "fp16" and member.reason == "cast"
    assert member.measured["bf16"]["shared"] == 6.0 and member.measured["fp16"]["shared"] == 3.0
    assert "layers of role blocks.*.fc1 cast at once" in member.detail, member.detail
    assert "roles of repeated blocks probed as groups" in policy.report()
    assert "roles of repeated blocks" not in tuned("outlier_stack", False).report()


@pytest.mark.parametrize("name", ["outlier_stack", "gpt2"], ids=["outlier_stack", "gpt2"])
def test_shared_policy_within_tolerance_on_a_held_out_batch(name):
    """The verified policy tuned with sharing stays finite and within its own bound on a batch tune never saw."""
    policy = tuned(name, True, verify_steps=5)
    model, _, _ = MODELS[name]()
    _, batch, loss_fn = MODELS[name](seed=1)
    ref_loss, ref_grad = forward_backward(model, batch, loss_fn)
    loss, grad = forward_backward(model, batch, loss_fn, policy=policy)
    loss_err, grad_err, finite = rel_errors(loss, grad, ref_loss, ref_grad)
    assert finite
    assert loss_err <= policy.tolerance["loss"] and grad_err <= policy.tolerance["grad"], (loss_err, grad_err)
    assert policy.verification is not None and policy.verification.passed
