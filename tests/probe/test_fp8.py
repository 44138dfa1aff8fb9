"""FP8 per Linear, measured (``autoprec.probe.fp8_errors``): an outlier Linear fails the judge, benign ones pass, the
model is left as it was, and a missing torchao names the ``autoprec[fp8]`` extra."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from autoprec import FormatError, OptionError
from autoprec.probe import FP8_RECIPES, fp8_errors, fp8_linears, linear_paths
from tests.models_fp8 import GAIN, Massive


@pytest.fixture
def torchao():
    return pytest.importorskip("torchao")


def outlier_model() -> nn.Sequential:
    """``3`` reads the massive channels through weights ``1/GAIN`` as small (its output is ordinary), so an FP8
    scale sized for them (per tensor or per row) leaves the other channels a few subnormal steps or zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), Massive(64), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))
    with torch.no_grad():
        model[3].weight[:, [3, 17]] /= GAIN
    return model


def _loss(out, batch):
    return out.float().square().mean()


@pytest.mark.parametrize("recipe", FP8_RECIPES, ids=FP8_RECIPES)
def test_the_outlier_linear_fails_and_the_benign_ones_pass(torchao, recipe):
    """Scaled per tensor or per row, the Linear behind the massive channels misses 18 dB forward; the others pass."""
    model = outlier_model()
    errors = fp8_errors(model, torch.randn(32, 32), _loss, recipe=recipe)
    assert sorted(errors) == ["0", "3", "5"]
    verdicts = {p: e.judge() for p, e in errors.items()}
    assert not verdicts["3"].passed and "3: forward SQNR" in verdicts["3"].reason, verdicts["3"]
    assert errors["3"].forward_db < 15.0 and min(errors["0"].forward_db, errors["5"].forward_db) > 24.0
    assert verdicts["0"].passed and verdicts["5"].passed, verdicts
    assert errors["0"].input_grad_db is None and errors["5"].input_grad_db > 17.0
    assert all(e.recipe == recipe and e.seconds > 0 for e in errors.values())


def test_the_model_is_left_as_it_was(torchao):
    """Modules, parameters, buffers, ``.grad`` and the training flag are the same after the probe."""
    model = outlier_model()
    model[5].weight.grad = torch.full_like(model[5].weight, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    fp8_errors(model, torch.randn(8, 32), _loss, ["3", "5"])
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[0].weight.grad is None and bool((model[5].weight.grad == 7.0).all()) and model.training


def test_fp8_linears_swaps_for_the_block_and_restores_on_error(torchao):
    """Inside the block the Linear runs torchao's Float8Linear on the same Parameter; an exception restores it."""
    model = outlier_model()
    weight = model[5].weight
    with pytest.raises(RuntimeError, match="boom"), fp8_linears(model, ["5"], recipe="rowwise"):
        assert type(model[5].inner).__name__ == "Float8Linear" and model[5].inner.weight is weight
        raise RuntimeError("boom")
    assert type(model[5]) is nn.Linear and model[5].weight is weight


def test_a_path_that_is_no_linear_or_an_unknown_recipe_is_named(torchao):
    """A wrong path lists the candidates; a wrong recipe lists the recipes."""
    model = outlier_model()
    with pytest.raises(OptionError, match=r"not nn.Linear paths of the model: \['1'\]; FP8 candidates are "
                                          r"\['0', '3', '5'\]"):
        fp8_errors(model, torch.randn(4, 32), _loss, ["1"])
    with pytest.raises(OptionError, match="unknown FP8 recipe 'delayed': use one of tensorwise, rowwise"):
        fp8_errors(model, torch.randn(4, 32), _loss, recipe="delayed")
    assert linear_paths(model) == ["0", "3", "5"]


def test_a_missing_torchao_names_the_extra(monkeypatch):
    """Without torchao the probe and the swap raise FormatError naming ``autoprec[fp8]``."""
    for name in ["torchao", "torchao.float8", "torchao.float8.float8_linear"]:
        monkeypatch.setitem(sys.modules, name, None)
    model = outlier_model()
    message = r"FP8 needs torchao, which is not installed: pip install 'autoprec\[fp8\]' \(torchao>=0.18\)"
    with pytest.raises(FormatError, match=message):
        fp8_errors(model, torch.randn(4, 32), _loss)
    with pytest.raises(FormatError, match=message), fp8_linears(model, ["0"]):
        pass
    assert type(model[0]) is nn.Linear


def test_an_fp8_linear_returns_the_dtype_an_nn_linear_would(torchao):
    """BF16 under autocast, the input's dtype outside it (a region that emulates BF16 in FP32)."""
    model = outlier_model()
    with fp8_linears(model, ["0"]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model[0](torch.randn(2, 32)).dtype == torch.bfloat16
        assert model[0](torch.randn(2, 32)).dtype == torch.float32
