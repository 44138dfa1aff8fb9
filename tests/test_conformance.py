"""Conformance: the properties every (model x target x runtime mode) combination satisfies, whatever the model,
the target tuned for or the way the policy is run (in the style of Optuna's ``tests/samplers_tests/test_samplers.py``).

One policy per (model, target) is tuned once for the module (``target="cuda"`` is emulated on a CPU); each runtime
mode then runs it once on a fresh copy of the model (forward, backward, one SGD step), recording what every
property below reads:

* ``apply``: ``policy.apply(model)`` installed for the step, then ``handle.remove()``;
* ``autocast``: the step inside ``with policy.autocast(model):``;
* ``compiled``: ``policy.apply`` then ``torch.compile(model, backend="aot_eager", fullgraph=True)``, through a
  Dynamo compile counter (one frame, no graph break).

No bound depends on the CPU: losses are compared with the FP32 loss through the policy's own verification
bound, and the three modes with one another bit for bit (the runtime is one code path; aot_eager runs the
eager kernels: see ``tests/runtime/test_compile.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import autoprec
from autoprec.trace import trace
from tests import models as TM

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # the models' losses close over a fixed target: tune's held-out split tries a part, and keeps the batch
              pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")]

#: small enough to tune in about a second each, large enough that the pinned CPU profile casts some layers
MODELS: dict[str, Callable[[], TM.ModelSpec]] = {
    "mlp": lambda: TM.mlp(batch_size=256),
    "cnn": lambda: TM.cnn(batch_size=8),
    "transformer_block": lambda: TM.transformer_block(batch_size=4, seq_len=32),
}
TARGETS = ("cpu", "cuda")
MODES = ("apply", "autocast", "compiled")
LR = 1e-2


@dataclasses.dataclass
class Tuned:
    name: str
    target: str
    policy: autoprec.Policy
    fp32_out: torch.Tensor
    fp32_loss: float


@dataclasses.dataclass
class Run:
    """What one forward, backward and SGD step of a fresh model under the policy left behind."""

    tuned: Tuned
    mode: str
    out: torch.Tensor
    loss: torch.Tensor
    grads: dict[str, torch.Tensor | None]
    trainable: list[str]
    params_while_installed: bool        # the caller's parameters bit-identical (and FP32) with the policy on
    swapped: set[str]                   # the modules whose class was swapped while installed
    classes_restored: bool
    hooks_left: int
    modes_left: bool                    # a TorchFunctionMode or autocast still on after removal
    stepped: dict[str, torch.Tensor]    # the parameters after the SGD step
    before: dict[str, torch.Tensor]
    frames: int = 0                     # Dynamo frames compiled (compiled mode)


@pytest.fixture(scope="module", params=[(m, t) for m in MODELS for t in TARGETS],
                ids=[f"{m}-{t}" for m in MODELS for t in TARGETS])
def tuned(request) -> Tuned:
    name, target = request.param
    model, batch, loss_fn = MODELS[name]()
    policy = autoprec.tune(model, batch, loss_fn, target=target, verify_steps=3, progress=False)
    fresh, batch, loss_fn = MODELS[name]()
    with torch.no_grad():
        out = TM.call_model(fresh, batch)
        loss = float(loss_fn(out, batch))
    return Tuned(name, target, policy, out, loss)


@pytest.fixture(scope="module", params=MODES)
def run(request, tuned: Tuned) -> Run:
    return _run(tuned, request.param)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = dict(model.named_parameters())
    return now.keys() == before.keys() and all(
        now[n].dtype == torch.float32 and torch.equal(now[n], before[n]) for n in before)


def _run(tuned: Tuned, mode: str) -> Run:
    model, batch, loss_fn = MODELS[tuned.name]()
    before = _snapshot(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    counter = CompileCounterWithBackend("aot_eager")
    dynamo.reset()
    handle = None
    try:
        if mode == "autocast":
            ctx = tuned.policy.autocast(model)
            ctx.__enter__()
        else:
            handle = tuned.policy.apply(model)
        runner: Any = torch.compile(model, backend=counter, fullgraph=True) if mode == "compiled" else model
        model.zero_grad(set_to_none=True)
        out = TM.call_model(runner, batch)
        loss = loss_fn(out, batch)
        loss.backward()
        swapped = {n for n, m in model.named_modules() if type(m) is not classes[n]}
        kept = _same(model, before)
    finally:
        if mode == "autocast":
            ctx.__exit__(None, None, None)
        elif handle is not None:
            handle.remove()
        dynamo.reset()
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float32]
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return Run(tuned=tuned, mode=mode, out=out.detach(), loss=loss.detach(), grads=grads, trainable=trainable,
               params_while_installed=kept, swapped=swapped,
               classes_restored={n: type(m) for n, m in model.named_modules()} == classes,
               hooks_left=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                              for m in model.modules()),
               modes_left=torch._C._is_torch_function_mode_enabled() or torch.is_autocast_enabled("cpu"),
               stepped=_snapshot(model), before=before, frames=counter.frame_count)


_APPLY: dict[tuple[str, str], Run] = {}


def _apply_run(tuned: Tuned) -> Run:
    """The same policy run by ``apply``: the reference the other modes must equal bit for bit."""
    key = (tuned.name, tuned.target)
    if key not in _APPLY:
        _APPLY[key] = _run(tuned, "apply")
    return _APPLY[key]


# -- properties of the policy (whatever the mode) ------------------------------------------------------------------
def test_policy_json_round_trips(tuned, tmp_path):
    """save then load gives an equal policy; so does to_dict then from_dict; the file is the same when saved again."""
    path = tmp_path / "p.json"
    tuned.policy.save(path)
    loaded = autoprec.load(path)
    assert loaded == tuned.policy
    assert autoprec.Policy.from_dict(tuned.policy.to_dict()) == tuned.policy
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


def test_policy_names_every_traced_layer_and_its_target(tuned):
    """The policy's layers are the trace's, in its order; its target and emulation are what tune was asked for."""
    model, batch, _ = MODELS[tuned.name]()
    keys = [lay.key for lay in trace(model, batch, device_type="cpu").layers]
    policy = tuned.policy
    assert list(policy.layers) == keys
    assert set(policy.assignment.values()) <= {"fp32", *policy.formats}
    assert policy.target == tuned.target
    assert policy.emulated == (tuned.target == "cuda" and not torch.cuda.is_available())
    policy.check(model)


def test_policy_is_verified_within_its_own_bound(tuned):
    """Verification passed and its recorded gap is within the bound it records (the tolerance asked for); a policy
    that casts nothing says so and ran no steps."""
    v = tuned.policy.verification
    cast = [k for k, p in tuned.policy.assignment.items() if p != "fp32"]
    assert v is not None and v.passed
    assert v.nothing_cast == (not cast) and v.steps == (0 if v.nothing_cast else 3), (cast, v)
    assert v.bound == tuned.policy.tolerance["verify"]
    assert 0 <= v.max_gap <= v.threshold
    assert all(math.isfinite(x) for x in (*v.fp32_losses, *v.policy_losses))


def test_policy_casts_a_layer(tuned):
    """Every model here is large enough that its policy casts a layer (the pinned profiles make it pay), so the
    properties below compare a cast run, not FP32 with itself."""
    assert any(p != "fp32" for p in tuned.policy.assignment.values()), tuned.policy.assignment
    assert 0 < tuned.policy.low_precision_fraction() <= 1


def test_report_renders(tuned):
    """The Markdown report opens with its title and names every layer; JSON and HTML render too."""
    md = tuned.policy.report("md")
    assert md.startswith("# autoprec policy report")
    assert all(f"`{k}`" in md for k in tuned.policy.layers if k.split("::")[0]), md
    assert tuned.policy.report("json").lstrip().startswith("{")
    assert "<html" in tuned.policy.report("html").lower()


# -- properties of every (model, target, mode) -------------------------------------------------------------------
def test_installing_keeps_the_callers_parameters(run):
    """With the policy installed (and a forward and backward run), every parameter is the caller's, FP32, bit-identical."""
    assert run.params_while_installed


def test_removing_restores_the_model_exactly(run):
    """After removal every module has its own class again, no hook is left, no mode or autocast is on; while installed,
    the modules swapped were exactly the cast layers' modules or their owners (none where nothing is cast)."""
    assert run.classes_restored and run.hooks_left == 0 and not run.modes_left
    cast = {k for k, p in run.tuned.policy.assignment.items() if p != "fp32"}
    if not cast:
        return
    owners = {k.split("::")[0] for k in cast}
    assert owners <= run.swapped, (owners, run.swapped)


def test_outputs_are_finite_fp32_and_within_the_verified_bound(run):
    """The model's output is FP32 and finite; the loss's gap to FP32's, relative to it, is within the verification bound."""
    assert run.out.dtype == torch.float32 and run.out.shape == run.tuned.fp32_out.shape
    assert torch.isfinite(run.out).all()
    gap = abs(float(run.loss) - run.tuned.fp32_loss) / abs(run.tuned.fp32_loss)
    if all(p == "fp32" for p in run.tuned.policy.assignment.values()):
        assert gap == 0.0 and torch.equal(run.out, run.tuned.fp32_out)
    assert gap <= run.tuned.policy.verification.threshold, (gap, run.tuned.policy.verification)


def test_modes_agree_bit_for_bit(run):
    """autocast and compiled (aot_eager) give apply's output, loss and gradients exactly."""
    ref = _apply_run(run.tuned)
    assert torch.equal(run.out, ref.out), (run.out - ref.out).abs().max().item()
    assert torch.equal(run.loss, ref.loss), (run.loss.item(), ref.loss.item())
    assert run.grads.keys() == ref.grads.keys()
    for n, g in run.grads.items():
        assert (g is None) == (ref.grads[n] is None), n
        assert g is None or torch.equal(g, ref.grads[n]), (n, (g - ref.grads[n]).abs().max().item())


def test_one_training_step_has_finite_gradients_on_every_parameter(run):
    """Every trainable FP32 parameter gets a finite, FP32 gradient; the SGD step changes the weights and keeps them finite."""
    assert run.trainable == list(run.grads)
    for n in run.trainable:
        g = run.grads[n]
        assert g is not None, n
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), n
        assert torch.isfinite(run.stepped[n]).all(), n
    assert any(not torch.equal(run.stepped[n], run.before[n]) for n in run.trainable)


def test_compiled_mode_has_no_graph_break(run):
    """Under torch.compile(fullgraph=True) the policy's model is one frame, forward and backward (eager modes compile none)."""
    assert run.frames == (1 if run.mode == "compiled" else 0)
