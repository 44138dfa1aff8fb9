"""Every example runs at its reduced size and shows what it promises."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch

import autoprec

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs(capsys):
    """examples/quickstart.py tunes, reports, saves, loads and trains."""
    policy = _load("quickstart").main(small=True)
    out = capsys.readouterr().out
    assert "# autoprec policy report" in out and "step 2: loss" in out
    assert policy.verification is not None and policy.verification.passed


def test_tune_cnn_runs(capsys):
    """examples/tune_cnn.py tunes a CNN for the CPU, prints the report and trains with policy.apply."""
    policy = _load("tune_cnn").main(small=True)
    out = capsys.readouterr().out
    assert "# autoprec policy report" in out
    assert "step 2: loss" in out
    assert policy.target == "cpu" and set(policy.assignment.values()) <= {"fp32", "bf16"}
    convs = {k: e for k, e in policy.layers.items() if e.op == "Conv2d"}
    assert len(convs) == 5
    # priced with the suite's pinned profile of a native-BF16 CPU (conftest.py): at this size the larger
    # convolutions pay in BF16, and every one kept FP32 says by how much BF16 would have been slower
    assert policy.low_precision_fraction() > 0.5
    assert {k for k, e in convs.items() if e.precision == "bf16"} >= {"res.0.0", "res.1.0"}
    for e in convs.values():
        assert e.precision == "bf16" or (e.reason == "no gain" and "not faster" in e.detail), e
    assert policy.verification is not None and policy.verification.passed
    assert policy.grad_scaler() is None  # BF16 only: no loss scaling


#: the GPU-policy examples try their policy on this CPU when there is no GPU, and say so
ON_CPU = pytest.mark.filterwarnings("error::autoprec.DeviceWarning" if torch.cuda.is_available()
                                    else "ignore::autoprec.DeviceWarning")


@ON_CPU
def test_tune_transformers_saves_a_loadable_policy(tmp_path, capsys):
    """examples/tune_transformers.py tunes a small-config transformers model and saves its policy."""
    pytest.importorskip("transformers")
    path = tmp_path / "llama.autoprec.json"
    policy = _load("tune_transformers").main(small=True, out=str(path))
    out = capsys.readouterr().out
    assert path.exists() and f"saved {path}" in out
    assert autoprec.load(path) == policy
    assert any(k.startswith("model.layers.0.") for k in policy.layers)  # the model's own module names


@ON_CPU
def test_train_with_policy_trains(capsys):
    """examples/train_with_policy.py loads a saved GPU policy, installs it and trains with its GradScaler."""
    if torch.cuda.is_available():
        losses = _load("train_with_policy").main(small=True)
    else:
        with pytest.warns(autoprec.DeviceWarning, match="tuned for 'cuda' and its GradScaler is made for 'cpu'"):
            losses = _load("train_with_policy").main(small=True)
    out = capsys.readouterr().out
    assert "policy:" in out and "GradScaler" in out
    assert losses and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


@ON_CPU
def test_train_with_policy_accepts_a_policy_file(tmp_path, capsys):
    """The --policy path: a policy saved for the example's model is loaded and used as is."""
    module = _load("train_with_policy")
    first = module.main(small=True)
    # a policy file that fits: every layer FP32 except the first Linear in BF16, no scaler
    model = module.make_model(32)
    names = [n for n, m in model.named_modules() if n and next(m.children(), None) is None]
    policy = autoprec.Policy(layers={n: autoprec.LayerEntry("bf16" if n == "0" else "fp32") for n in names})
    path = tmp_path / "hand.autoprec.json"
    policy.save(path)
    losses = module.main(small=True, policy_path=str(path))
    out = capsys.readouterr().out
    assert "GradScaler not needed" in out
    assert len(losses) == len(first) and all(math.isfinite(x) for x in losses)


def test_gnn_scatter_report_names_the_overflowing_accumulation(capsys):
    """examples/gnn_scatter.py: blanket FP16 gives NaN, the policy keeps the hub scatter-add in FP32."""
    policy = _load("gnn_scatter").main(small=True)
    out = capsys.readouterr().out
    assert "blanket FP16 autocast loss: nan" in out
    assert "## Layers kept in FP32 for a numerical reason" in out
    excluded = policy.excluded()
    assert "conv1::index_add" in excluded
    assert "accumulation" in excluded["conv1::index_add"].hazards
    assert "conv1::index_add" in out
    assert policy.verification is not None and policy.verification.passed


@ON_CPU
def test_train_with_policy_compiled_trains_like_eager(capsys):
    """--compile: the installed policy under torch.compile (Inductor) trains as it does eagerly, up to the
    rounding of Inductor's fusions."""
    module = _load("train_with_policy")
    eager = module.main(small=True)
    compiled = module.main(small=True, compile=True)
    assert len(compiled) == len(eager) and all(math.isfinite(x) for x in compiled)
    assert max(abs(a - b) / abs(a) for a, b in zip(eager, compiled)) < 1e-3
