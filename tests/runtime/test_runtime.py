"""The runtime where people train: wrapped models, activation checkpointing, threads, install cost, copies."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import autoprec
from autoprec import LayerEntry, Policy
from autoprec.core import canonical_modules, class_name, module_signatures
from autoprec.runtime import installed
from autoprec.trace import trace
from tests.models import transformer_block
from tests.observe import record_precision


class Stack(nn.Module):
    """Transformer blocks, optionally run under activation checkpointing."""

    def __init__(self, blocks: list[nn.Module], mode: str | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x) if self.mode is None else checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return x


def _stack() -> tuple[Stack, torch.Tensor, Policy]:
    torch.manual_seed(0)
    block, batch, _ = transformer_block()
    model = Stack([copy.deepcopy(block) for _ in range(2)])
    tr = trace(model, batch, device_type="cpu")
    policy = Policy(layers={lay.key: LayerEntry("fp32" if lay.hazards else "bf16") for lay in tr.layers},
                    modules=module_signatures(model), handoff=dict(tr.handoff))
    return model, batch, policy


def _grads(model: nn.Module, batch: torch.Tensor, policy: Policy) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = batch.clone().requires_grad_(True)
    with policy.apply(model):
        loss = model(x).float().square().mean()
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()] + [x.grad]


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpoint_recomputes_in_the_policys_precision(mode):
    """Gradients under activation checkpointing equal the same policy's without it, bit for bit."""
    model, batch, policy = _stack()
    assert any(e.precision == "bf16" for e in policy.layers.values()) and "::" in "".join(policy.layers)
    ref_loss, ref = _grads(copy.deepcopy(model), batch, policy)
    ckpt = copy.deepcopy(model)
    ckpt.mode = mode
    loss, got = _grads(ckpt, batch, policy)
    plain_loss, plain = _grads(copy.deepcopy(model), batch, Policy(layers={}))
    assert torch.equal(loss, ref_loss)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(ref, plain))  # the policy really changed the numbers


def test_hf_gradient_checkpointing_recomputes_in_the_policys_precision():
    """HF gradient_checkpointing_enable() gives the same gradients as the same policy without it."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    ids = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    tr = trace(model, batch, device_type="cpu")
    policy = Policy(layers={lay.key: LayerEntry("fp32" if lay.hazards else "bf16") for lay in tr.layers},
                    modules=module_signatures(model), handoff=dict(tr.handoff))
    grads = {}
    for name in ("plain", "checkpointed"):
        m = copy.deepcopy(model)
        if name == "checkpointed":
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with policy.apply(m):
            m(**batch).loss.backward()
        grads[name] = [p.grad for p in m.parameters() if p.grad is not None]
    assert len(grads["plain"]) == len(grads["checkpointed"]) > 0
    for a, b in zip(grads["plain"], grads["checkpointed"]):
        assert torch.equal(a, b)


def _wrapped(kind: str, model: nn.Module) -> nn.Module:
    if kind == "compile":
        return torch.compile(model, backend="aot_eager")
    if kind == "data-parallel":
        return nn.DataParallel(model)
    if kind == "checkpoint-wrapper":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Linear))
        return model
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["compile", "data-parallel", "checkpoint-wrapper"])
def test_policy_fits_wrapped_models(kind):
    """A policy made on the bare model applies to it wrapped: names match modulo the wrappers' prefixes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    policy = Policy(layers={"0": LayerEntry("bf16"), "2": LayerEntry("fp32")}, modules=module_signatures(model))
    x = torch.randn(4, 8)
    with policy.autocast(model):
        ref = model(x)
    wrapped = _wrapped(kind, copy.deepcopy(model))
    raw = [name for name, _ in wrapped.named_modules()]
    assert any(w in "".join(raw) for w in ("_orig_mod", "module", "_checkpoint_wrapped_module"))
    assert list(canonical_modules(wrapped)) == ["", "0", "1", "2"]
    assert module_signatures(wrapped) == policy.modules
    seen = record_precision(canonical_modules(wrapped)["0"])
    policy.check(wrapped)
    with policy.autocast(wrapped):
        got = wrapped(x)
    assert seen == ["bf16"]
    assert torch.equal(got, ref)


def test_policy_made_on_a_wrapped_model_fits_the_bare_one():
    """Keys are canonical both ways: a policy checked against a DataParallel model fits the model inside."""
    model = nn.Sequential(nn.Linear(4, 4))
    policy = Policy(layers={"0": LayerEntry("bf16")}, modules=module_signatures(nn.DataParallel(model)))
    assert policy.modules == {"0": "Linear[weight(4, 4),bias(4,)]"}
    policy.check(model)


def test_an_entry_that_matches_no_module_is_an_error_naming_it():
    """A renamed module must not silently drop an exclusion: the unmatched key is named."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    policy = Policy(layers={"0": LayerEntry("bf16"), "norm": LayerEntry("fp32", "overflow", excluded=True)})
    with pytest.raises(autoprec.PolicyError, match="layers naming modules the model does not have: norm"):
        policy.apply(model)
    inner = Policy(layers={"": LayerEntry("bf16")})
    with pytest.raises(autoprec.PolicyError, match="module entries that name modules with children"):
        inner.apply(model)


def test_applying_twice_is_an_error_and_leaves_the_first_in_place():
    """A second policy on a model that runs one is refused, and the first keeps running."""
    model = nn.Sequential(nn.Linear(4, 4))
    first = Policy(layers={"0": LayerEntry("bf16")})
    with first.apply(model):
        with pytest.raises(autoprec.PolicyError, match="already runs on this model"):
            Policy(layers={"0": LayerEntry("fp32")}).apply(model)
        assert installed(model[0])
        seen = record_precision(model[0])
        model(torch.randn(2, 4))
        assert seen == ["bf16"]  # the first policy still runs
    assert not installed(model[0]) and type(model[0]) is nn.Linear


def test_installed_model_copies_and_pickles_as_the_plain_model():
    """deepcopy and pickle of a model with a policy give the plain model: no autoprec class, no settings."""
    model = nn.Sequential(nn.Linear(4, 4))
    with Policy(layers={"0": LayerEntry("bf16")}).apply(model):
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(clone[0]) is nn.Linear and not installed(clone[0])
            assert torch.equal(clone[0].weight, model[0].weight)
        assert class_name(model[0]) == "Linear" and type(model[0]) is not nn.Linear


def test_instance_level_forward_patch_is_respected():
    """A module whose forward is patched on the instance (as accelerate does) still gets its region."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lin = model[0]
    original = lin.forward
    lin.forward = lambda x: original(x) * 2.0
    x = torch.randn(2, 4)
    seen = []
    lin.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    with Policy(layers={"0": LayerEntry("bf16")}).apply(model):
        got = model(x)
    assert lin.forward.__name__ == "<lambda>"  # restored
    with torch.no_grad():
        want = nn.functional.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()).float() * 2.0
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2) and got.dtype == torch.float32


def test_install_cost_is_one_plan_then_one_swap_per_module(monkeypatch):
    """The first apply walks the model once; entering the context again reuses the plan: work O(modules)."""
    import autoprec.runtime._apply as apply_mod
    import autoprec.runtime._runtime as runtime_mod

    blocks = 750  # 3001 modules
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4)) for _ in range(blocks)])
    assert len(list(model.modules())) == 3001
    sig = module_signatures(model)
    policy = Policy(layers={k: LayerEntry("bf16" if k.endswith(".0") else "fp32") for k in sig}, modules=sig)
    walks, patches = [], []
    real_walk, real_patch = apply_mod.canonical_modules, runtime_mod._patch
    monkeypatch.setattr(apply_mod, "canonical_modules", lambda *a, **k: walks.append(1) or real_walk(*a, **k))
    monkeypatch.setattr(runtime_mod, "_patch", lambda *a: patches.append(1) or real_patch(*a))
    for _ in range(3):
        with policy.autocast(model):
            pass
    assert len(walks) == 1  # one plan, cached for this model and policy
    assert len(patches) == 3 * len(sig)  # one swap per leaf with an entry, per entry into the context
    model[0][0] = nn.Linear(4, 4)  # a module replaced: the cached plan is stale and is made again
    with policy.autocast(model):
        assert installed(model[0][0])
    assert len(walks) == 2


_THREADS = textwrap.dedent("""
    import threading, torch, sys
    sys.path.insert(0, {root!r})
    from tests.models import transformer_block
    from autoprec import LayerEntry, Policy
    from autoprec.core import module_signatures
    from autoprec.trace import trace
    torch.manual_seed(0)
    model, batch, _ = transformer_block()
    tr = trace(model, batch, device_type="cpu")
    policy = Policy(layers={{l.key: LayerEntry("fp32" if l.hazards else "bf16") for l in tr.layers}},
                    modules=module_signatures(model))
    assert any("::" in k for k in policy.layers)
    handle = policy.apply(model)
    with torch.no_grad():
        ref = model(batch)
    errors, results = [], []
    def work():
        try:
            for _ in range({n}):
                with torch.no_grad():
                    results.append(torch.equal(model(batch), ref))
                assert not torch.is_autocast_enabled("cpu")
                assert torch._C._len_torch_function_stack() == 0
        except BaseException as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    handle.remove()
    print(len(results), all(results), errors)
""")


def test_threads_run_one_model_with_a_policy_cleanly():
    """4 threads x 40 forwards of one model with a policy: identical outputs, no state left, clean exit."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for _ in range(2):  # the old runtime aborted at exit in 4 of 6 runs
        done = subprocess.run([sys.executable, "-c", _THREADS.format(root=root, n=40)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split("\n")[-2] == "160 True []"


def test_importing_autoprec_does_not_load_dynamo():
    """`import autoprec` leaves torch._dynamo (seconds to import) to those who compile."""
    done = subprocess.run([sys.executable, "-c", "import sys, autoprec; print('torch._dynamo' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_forward_hooks_see_the_handoffs_16_bit_tensors():
    """README: a layer that hands its BF16 output on uncast shows it to its own forward hook and to the next
    layer's hooks; a layer whose output leaves the model hands back FP32, and so does the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(8, 16)
    tr = trace(model, x, device_type="cpu")
    assert dict(tr.handoff) == {"0": ("1",), "1": ("2",), "2": ("3",), "3": ("4",)}
    policy = Policy(layers={k: LayerEntry("bf16" if k in ("0", "2", "4") else "fp32") for k in "01234"},
                    modules=module_signatures(model), handoff=dict(tr.handoff))
    seen: dict[str, tuple[torch.dtype, torch.dtype]] = {}
    for name in "01234":
        model[int(name)].register_forward_hook(lambda m, args, out, name=name: seen.update({name: (args[0].dtype,
                                                                                              out.dtype)}))
    with policy.autocast(model):
        y = model(x)
    f32, b16 = torch.float32, torch.bfloat16
    assert seen == {"0": (f32, b16), "1": (b16, f32), "2": (f32, b16), "3": (b16, f32), "4": (f32, f32)}
    assert y.dtype == f32
