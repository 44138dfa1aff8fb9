"""Lightning and Hugging Face Trainer paths, a few real steps on CPU (skipped without the framework)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoprec
from tests.models import transformer_block
from tests.observe import record_precision


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("target", ["cpu", "cuda"], ids=["bf16-policy", "fp16-policy-with-scaler"])
def test_lightning_trainer_runs_the_policy(target):
    """AutoprecPrecision runs the policy's regions (and its GradScaler for FP16) in a real Lightning Trainer."""
    L = pytest.importorskip("lightning")
    from autoprec.integrations.lightning import AutoprecPrecision

    net, batch, loss_fn = transformer_block(batch_size=8)
    policy = autoprec.tune(net, batch, loss_fn, target=target, progress=False, verify_steps=3)
    assert ("fp16" in policy.assignment.values()) == (target == "cuda")
    seen = record_precision(net.mlp.fc1)

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = net

        def training_step(self, b, i):
            return loss_fn(self.model(b), b)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    if target == "cuda" and not torch.cuda.is_available():  # a GPU policy tried out on this CPU: said so
        with pytest.warns(autoprec.DeviceWarning, match="tuned for 'cuda' and its GradScaler is made for 'cpu'"):
            plugin = AutoprecPrecision(policy)
    else:
        plugin = AutoprecPrecision(policy)
    assert (plugin.scaler is not None) == (target == "cuda")
    loader = torch.utils.data.DataLoader([batch] * 3, batch_size=None)  # the whole batch each step
    trainer = L.Trainer(accelerator="cpu", plugins=[plugin], max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Lit(), loader)
    assert trainer.global_step == 3
    assert seen and set(seen) == {policy.layers["mlp.fc1"].precision}  # the layer ran in the policy's precision
    assert not autoprec.runtime.installed(net.mlp.fc1)  # taken off at teardown
    if plugin.scaler is not None:
        assert plugin.scaler.get_scale() <= policy.scaler.init_scale
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_hf_trainer_runs_the_policy(tmp_path):
    """AutoprecCallback applies the policy for the duration of transformers.Trainer.train() and removes it."""
    T = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from autoprec.integrations.hf import AutoprecCallback

    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=4)
    model = T.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 256, (8, 32))
    policy = autoprec.tune(model, {"input_ids": ids, "labels": ids}, progress=False, verify_steps=3)
    assert policy.low_precision_fraction() > 0.5
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                               report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no")
    seen = record_precision(model.transformer.h[0].mlp.c_fc)
    before = _hooks(model)
    callback = AutoprecCallback(policy)
    trainer = T.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    result = trainer.train()
    assert trainer.state.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    precision = policy.layers["transformer.h.0.mlp.c_fc"].precision
    assert seen and set(seen) == {precision}
    assert _hooks(model) == before
    assert not any(autoprec.runtime.installed(m) for m in model.modules())  # the policy is off again
