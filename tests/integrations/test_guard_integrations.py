"""autoprec.guard inside a Lightning Trainer and a Hugging Face Trainer (skipped without the framework)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprec
from autoprec import LayerEntry, Policy
from autoprec.core import module_signatures
from autoprec.runtime import installed
from tests import models
from tests.models import GROWTH, growing_model, mlp

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, EVERY = 60, 4
HALF = 48  # the checkpoint's step: the guard acts at step 40 (grow's |out| x 8 passes 65504 between steps 36 and 40)
assert GROWTH ** EVERY < 8  # the growth between two reads is less than the headroom: a read comes before an overflow


def _policy(model: nn.Module, layers: dict[str, str]) -> Policy:
    """A CUDA policy for ``model`` written by hand (its FP16 layers emulated on this CPU), BF16 allowed."""
    return Policy(layers={k: LayerEntry(p) for k, p in layers.items()}, target="cuda", formats=("fp16", "bf16"),
                  modules=module_signatures(model))


def _growing():
    """The growing model, its batch and loss, and a policy with its growing layer in FP16."""
    net, x, loss_fn = growing_model()
    return net, x, loss_fn, _policy(net, {"fc": "fp32", "grow": "fp16", "norm": "fp32", "head": "fp32"})


def _growing_gradient():
    """tests.models.GrowingGradient (its gradient into ``mid`` grows 1.5x a step), its batch, a loss against a fixed
    target, and a policy with ``mid`` in FP16: the scaler skips steps, then collapses, unless ``mid`` is promoted."""
    torch.manual_seed(0)
    net = models.GrowingGradient(1.5, 8, 16)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 4, generator=g)
    return net, x, lambda out, batch: F.mse_loss(out, y), _policy(net, {"fc": "fp32", "mid": "fp16", "head": "fp32"})


def _watched_the_scaler(guard, scaler) -> None:
    """The guard watched ``scaler`` (the trainer's own) and promoted ``mid`` on its gradient, reading the scaler."""
    assert guard.scaler is scaler and scaler is not None
    mid = [e for e in guard.events if e.layer == "mid"]
    assert [(e.old, e.new) for e in mid] == [("fp16", "bf16")] and guard.policy.assignment["mid"] == "bf16"
    assert "grad" in mid[0].evidence and "scaler skipped " in mid[0].evidence  # the scaler's reading: only when watched


def _benign():
    """An MLP all in FP16: nothing in it grows."""
    net, x, loss_fn = mlp()
    return net, x, loss_fn, _policy(net, {"fc1": "fp16", "fc2": "fp16", "fc3": "fp16"})


# -- Lightning ----------------------------------------------------------------------------------
def _lightning_fit(net, x, loss_fn, callback, steps, ckpt_path=None, plugins=None, optimizer=torch.optim.SGD):
    """Fit ``net`` (held as ``self.model``) ``steps`` steps on ``x``; the LightningModule and its losses."""
    L = pytest.importorskip("lightning")

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = net
            self.losses: list[float] = []

        def training_step(self, b, i):
            loss = loss_fn(self.model(b), b)
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return optimizer(self.parameters(), lr=0.01 if optimizer is torch.optim.SGD else 1e-3)

    lit = Lit()
    loader = torch.utils.data.DataLoader([x] * steps, batch_size=None)
    trainer = L.Trainer(accelerator="cpu", callbacks=[callback], max_steps=steps, logger=False, plugins=plugins,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, loader, ckpt_path=ckpt_path)
    return trainer, lit


def test_lightning_callback_promotes_the_growing_layer():
    """AutoprecGuard in a Lightning fit promotes the growing FP16 layer to BF16 and the run stays finite."""
    pytest.importorskip("lightning")
    from autoprec.integrations.lightning import AutoprecGuard

    net, x, loss_fn, policy = _growing()
    callback = AutoprecGuard(policy, every=EVERY)
    trainer, lit = _lightning_fit(net, x, loss_fn, callback, STEPS)
    g = callback.guard
    assert trainer.global_step == STEPS and len(lit.losses) == STEPS and all(map(math.isfinite, lit.losses))
    assert [(e.layer, e.action, e.old, e.new) for e in g.events] == [("grow", "adapt", "fp16", "bf16")]
    assert g.events[0].step % EVERY == 0 and g.policy.assignment["grow"] == "bf16"
    assert g.state_dict()["step"] == STEPS  # one guard.step per training batch
    assert not installed(net.grow)  # taken off at fit end


def test_lightning_checkpoint_resumes_with_the_revised_policy(tmp_path):
    """A Lightning checkpoint carries the guard's state: the resumed fit runs the revised policy with its events."""
    pytest.importorskip("lightning")
    from autoprec.integrations.lightning import AutoprecGuard

    net, x, loss_fn, policy = _growing()
    first = AutoprecGuard(policy, every=EVERY)
    trainer, _ = _lightning_fit(net, x, loss_fn, first, HALF)
    assert first.guard.events, "the first half should already have promoted the layer"
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    net2, _, _, _ = _growing()
    second = AutoprecGuard(policy, every=EVERY)
    _, lit = _lightning_fit(net2, x, loss_fn, second, STEPS, ckpt_path=str(tmp_path / "half.ckpt"))
    assert second.guard.events == first.guard.events and second.guard.policy == first.guard.policy
    assert second.guard.state_dict()["step"] == STEPS and all(map(math.isfinite, lit.losses))


def test_lightning_callback_watches_the_precision_plugins_scaler():
    """Under "16-mixed" the guard watches Lightning's own GradScaler (the precision plugin's): the FP16 layer whose
    gradient grows is promoted with the scaler's reading in its evidence, and the run stays finite. (On a CPU the
    Trainer turns precision="16-mixed" into "bf16-mixed": the plugin "16-mixed" makes is passed by hand.)"""
    pytest.importorskip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision

    from autoprec.integrations.lightning import AutoprecGuard

    net, x, loss_fn, policy = _growing_gradient()
    callback = AutoprecGuard(policy, every=EVERY)
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    trainer, lit = _lightning_fit(net, x, loss_fn, callback, 40, plugins=[plugin], optimizer=torch.optim.Adam)
    _watched_the_scaler(callback.guard, trainer.precision_plugin.scaler)
    assert all(map(math.isfinite, lit.losses))


def test_lightning_callback_on_a_benign_model_does_nothing():
    """AutoprecGuard on an MLP all in FP16: no event, the policy given stays in force."""
    pytest.importorskip("lightning")
    from autoprec.integrations.lightning import AutoprecGuard

    net, x, loss_fn, policy = _benign()
    callback = AutoprecGuard(policy, every=EVERY)
    _lightning_fit(net, x, loss_fn, callback, 40)
    assert callback.guard.events == [] and callback.guard.policy is policy


def test_lightning_callback_refuses_a_non_policy():
    """AutoprecGuard names what it needs when given a file name."""
    pytest.importorskip("lightning")
    from autoprec.integrations.lightning import AutoprecGuard

    with pytest.raises(autoprec.OptionError, match="needs an autoprec.Policy, got str: pass autoprec.load"):
        AutoprecGuard("model.autoprec.json")


# -- Hugging Face -------------------------------------------------------------------------------
class _WithLoss(nn.Module):
    """The Trainer's convention: forward returns the loss."""

    def __init__(self, net: nn.Module, loss_fn) -> None:
        super().__init__()
        self.model, self.loss_fn = net, loss_fn

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.loss_fn(self.model(x), x)}


def _hf_train(tmp_path, net, x, loss_fn, callback, steps, *, resume=None, scaler=None, **options):
    """``steps`` Trainer steps on the whole of ``x`` each (``options``: more ``TrainingArguments``); the Trainer."""
    T = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    n = x.shape[0]
    options = {"save_strategy": "no", "optim": "sgd", "learning_rate": 0.01, **options}
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=n,
                               lr_scheduler_type="constant", report_to=[],
                               use_cpu=True, logging_strategy="no", **options)
    data = [{"x": x[i]} for i in range(n)] * steps
    trainer = T.Trainer(model=_WithLoss(net, loss_fn), args=args, train_dataset=data, callbacks=[callback])
    if scaler is not None:  # what fp16=True makes on a GPU (Accelerate makes none on a CPU): it scales and steps
        trainer.accelerator.scaler = scaler
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_hf_callback_promotes_the_growing_layer(tmp_path):
    """AutoprecGuardCallback in transformers.Trainer promotes the growing FP16 layer to BF16 and takes it off after."""
    pytest.importorskip("transformers")
    from autoprec.integrations.hf import AutoprecGuardCallback

    net, x, loss_fn, policy = _growing()
    callback = AutoprecGuardCallback(policy, every=EVERY)
    trainer = _hf_train(tmp_path, net, x, loss_fn, callback, STEPS)
    g = callback.guard
    assert trainer.state.global_step == STEPS and g.state_dict()["step"] == STEPS
    assert [(e.layer, e.action, e.old, e.new) for e in g.events] == [("grow", "adapt", "fp16", "bf16")]
    assert g.policy.assignment["grow"] == "bf16"
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert not installed(net.grow)


@pytest.mark.parametrize("rebuilt", [False, True], ids=["kept", "rebuilt"])
def test_hf_checkpoint_resumes_with_the_revised_policy(tmp_path, rebuilt):
    """A Trainer checkpoint carries the guard's state: a new Trainer resumed from it runs the revised policy with
    the first run's events, step count and watch history (rebuilt: restore_callback_states_from_checkpoint=True,
    where the Trainer replaces the callback by one built from its saved state)."""
    pytest.importorskip("transformers")
    from autoprec.integrations.hf import AutoprecGuardCallback

    net, x, loss_fn, policy = _growing()
    first = AutoprecGuardCallback(policy, every=EVERY)
    _hf_train(tmp_path, net, x, loss_fn, first, HALF, save_strategy="steps", save_steps=HALF)
    assert first.guard.events, "the first half should already have promoted the layer"
    assert (tmp_path / f"checkpoint-{HALF}" / "trainer_state.json").is_file()
    net2, _, _, _ = _growing()  # fresh weights: the checkpoint brings the trained ones back
    second = AutoprecGuardCallback(policy, every=EVERY)
    trainer = _hf_train(tmp_path, net2, x, loss_fn, second, STEPS, resume=True, save_strategy="steps", save_steps=HALF,
                        restore_callback_states_from_checkpoint=rebuilt)
    resumed = [c for c in trainer.callback_handler.callbacks if isinstance(c, AutoprecGuardCallback)]
    assert len(resumed) == 1 and (resumed[0] is second) is not rebuilt
    g = resumed[0].guard
    assert g.events == first.guard.events and g.policy == first.guard.policy and g.policy.assignment["grow"] == "bf16"
    state = g.state_dict()
    assert state["step"] == STEPS and state["watch"]["reads"] == STEPS // EVERY  # the count went on, not again
    assert all(torch.isfinite(p).all() for p in net2.parameters())
    assert not installed(net2.grow)


def test_hf_callback_watches_the_trainers_scaler(tmp_path):
    """With the Trainer's own GradScaler (Accelerate's, as fp16=True makes on a GPU; set by hand on this CPU) the
    guard watches it: the FP16 layer whose gradient grows is promoted with the scaler's reading in its evidence."""
    pytest.importorskip("transformers")
    from autoprec.integrations.hf import AutoprecGuardCallback

    net, x, loss_fn, policy = _growing_gradient()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    callback = AutoprecGuardCallback(policy, every=EVERY)
    trainer = _hf_train(tmp_path, net, x, loss_fn, callback, 40, scaler=scaler, max_grad_norm=0.0,
                        optim="adamw_torch", learning_rate=1e-3)  # Adam: the growing gradient moves no weight far
    assert trainer.optimizer.scaler is scaler  # the prepared optimizer steps with it
    _watched_the_scaler(callback.guard, scaler)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_hf_callback_on_a_benign_model_does_nothing(tmp_path):
    """AutoprecGuardCallback on an MLP all in FP16: no event, the policy given stays in force."""
    pytest.importorskip("transformers")
    from autoprec.integrations.hf import AutoprecGuardCallback

    net, x, loss_fn, policy = _benign()
    callback = AutoprecGuardCallback(policy, every=EVERY)
    _hf_train(tmp_path, net, x, loss_fn, callback, 40)
    assert callback.guard.events == [] and callback.guard.policy is policy


def test_hf_callback_refuses_the_fp32_check_it_cannot_run():
    """The HF Trainer hands callbacks no batch: asking its guard callback for the FP32 check is refused, with why."""
    pytest.importorskip("transformers")
    from autoprec.integrations.hf import AutoprecGuardCallback

    with pytest.raises(autoprec.OptionError, match=r"AutoprecGuardCallback\(check_every=5\): the Trainer hands its "
                       r"callbacks no batch, and the FP32 check runs the model on one; leave check_every out"):
        AutoprecGuardCallback(Policy(layers={"0": LayerEntry("fp16")}), check_every=5)
    assert AutoprecGuardCallback(Policy(layers={})).options["check_every"] == 0
