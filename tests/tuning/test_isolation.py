"""``autoprec.tune`` leaves the caller's model and the global state as they were, on success and on failure."""

from __future__ import annotations

import pytest
import torch

import autoprec
from tests.helpers import assert_same, seed_globals, snapshot
from tests.models import cnn, mlp, transformer_block, unscaled_attention

# these models are too small for BF16 to pay on a CPU (the CPU target keeps them FP32, "no gain"); tuned
# for a GPU target, their layers go to BF16, so that tune really installs and runs 16-bit regions
GPU_BF16 = {"target": "cuda", "dtypes": ["bf16"]}


# ---------------------------------------------------------------------------
# the caller's model, with state a careless tuner would disturb
# ---------------------------------------------------------------------------


def _mlp_train():
    return mlp()


def _cnn_eval():
    model, batch, loss_fn = cnn()
    return model.eval(), batch, loss_fn


def _cnn_train():
    return cnn()  # train-mode BatchNorm: any forward on the caller's model moves its running stats


def _transformer_block():
    return transformer_block()


MODELS = {"mlp_train": _mlp_train, "cnn_eval": _cnn_eval, "cnn_train": _cnn_train,
          "transformer_block": _transformer_block}

# a batch the model cannot take: the feature/channel dimension is wrong
WRONG_BATCH = {
    "mlp_train": lambda x: x[:, :7],
    "cnn_eval": lambda x: x[:, :1],
    "cnn_train": lambda x: x[:, :1],
    "transformer_block": lambda x: x[..., :7],
}


class Calls:
    """Counts hook calls (a caller's own hook with side effects)."""

    def __init__(self):
        self.n = 0

    def forward(self, module, args, output):
        self.n += 1

    def pre(self, module, args):
        self.n += 1

    def backward(self, module, grad_in, grad_out):
        self.n += 1


def prepare(name):
    """A model from tests/models.py with grads set, a frozen parameter and hooks of every kind registered."""
    model, batch, loss_fn = MODELS[name]()
    params = list(model.parameters())
    params[-1].requires_grad_(False)  # a frozen parameter (e.g. a head being fine-tuned around)
    out = model(batch)
    loss_fn(out, batch).backward()  # every trainable parameter now carries a .grad
    with torch.no_grad():
        params[0].grad.mul_(3.0)  # grads that are not what any fresh pass would give
    calls = Calls()
    leaves = [m for m in model.modules() if next(m.children(), None) is None and list(m.parameters())]
    model.register_forward_pre_hook(calls.pre)
    leaves[0].register_forward_hook(calls.forward)
    leaves[-1].register_full_backward_hook(calls.backward)
    return model, batch, loss_fn, calls


# ---------------------------------------------------------------------------
# failure points
# ---------------------------------------------------------------------------


def _interrupt_after(loss_fn, n):
    """``loss_fn`` that raises KeyboardInterrupt on its n-th call (Ctrl-C while tune runs)."""
    count = [0]

    def wrapped(out, batch):
        count[0] += 1
        if count[0] >= n:
            raise KeyboardInterrupt
        return loss_fn(out, batch)

    return wrapped


def _interrupting_optimizer(params):
    raise KeyboardInterrupt  # the optimizer is built only when verification starts


def _nan_weight(model):
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")


# name -> (edit(model, batch, loss_fn, model_name) -> (batch, loss_fn, extra kwargs), expected exception)
FAILURES = {
    "ok": (lambda m, b, f, n: (b, f, {}), None),
    "wrong_batch_shape": (lambda m, b, f, n: (WRONG_BATCH[n](b), f, {}), autoprec.BatchError),
    "nonscalar_loss": (lambda m, b, f, n: (b, lambda out, batch: out.float().square().flatten(1).mean(1), {}),
                       autoprec.BatchError),
    "nan_in_fp32": (lambda m, b, f, n: (_nan_weight(m), b, f, {})[1:], autoprec.ModelError),
    "interrupt_in_probe": (lambda m, b, f, n: (b, _interrupt_after(f, 3), {}), KeyboardInterrupt),
    "interrupt_in_verify": (lambda m, b, f, n: (b, f, {"optimizer": _interrupting_optimizer}), KeyboardInterrupt),
}


@pytest.mark.parametrize("failure", list(FAILURES), ids=list(FAILURES))
@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_tune_leaves_model_and_globals_unchanged(name, failure):
    """After tune returns or raises, the caller's weights, grads, flags, hooks and the global RNGs are as before."""
    model, batch, loss_fn, calls = prepare(name)
    edit, expected = FAILURES[failure]
    batch, loss_fn, kwargs = edit(model, batch, loss_fn, name)
    seed_globals()
    before = snapshot(model)
    if expected is None:
        policy = autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=3, **GPU_BF16, **kwargs)
        assert policy.low_precision_fraction() > 0
    else:
        with pytest.raises(expected):
            autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=3, **GPU_BF16, **kwargs)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_model_still_works_after_tune(name):
    """After tune, the caller's model gives bit-identical outputs and its hooks still fire."""
    model, batch, loss_fn, calls = prepare(name)
    with torch.no_grad():
        ref = model(batch)
    fired = calls.n
    autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=3)
    n = calls.n
    with torch.no_grad():
        out = model(batch)
    assert torch.equal(out, ref)
    assert calls.n > n >= fired  # the caller's hooks are still installed on the caller's model


def test_autocast_state_restored_inside_caller_autocast():
    """Tuning inside a caller's own autocast block leaves that block's autocast state as it was."""
    model, batch, loss_fn = mlp()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=3)
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_tune_under_no_grad_works_and_restores_grad_mode():
    """Tuning under ``torch.no_grad()`` works and leaves grad mode off, as the caller set it."""
    model, batch, loss_fn = mlp()
    with torch.no_grad():
        policy = autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=3, **GPU_BF16)
        assert not torch.is_grad_enabled()
    assert policy.low_precision_fraction() > 0


CALLER_AUTOCAST = {"mlp-bf16": (mlp, torch.bfloat16, GPU_BF16),
                   "unscaled_attention-fp16": (unscaled_attention, torch.float16,
                                               {"dtypes": ["fp16", "bf16"], "target": "cuda"})}


@pytest.mark.parametrize("case", list(CALLER_AUTOCAST), ids=list(CALLER_AUTOCAST))
def test_tune_inside_caller_autocast_measures_against_fp32(case):
    """Tuning inside a caller's autocast block gives the same policy as outside it: the reference is FP32."""
    factory, dtype, kwargs = CALLER_AUTOCAST[case]
    model, batch, loss_fn = factory()
    outside = autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=3, **kwargs)
    with torch.autocast("cpu", dtype=dtype):
        inside = autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=3, **kwargs)
    assert inside.layers == outside.layers
    assert inside.verification == outside.verification


def test_optuna_verbosity_unchanged():
    """Tune does not change the caller's global Optuna logging verbosity."""
    optuna = pytest.importorskip("optuna")
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        model, batch, loss_fn = mlp()
        autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=0)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(old)
