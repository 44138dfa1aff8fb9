"""Policy files: exact save/load round trip, refusal to fit another model, and PolicyError for bad files."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch

import autoprec
from tests.models import CNN, MLP, mlp, rmsnorm_model, transformer_block, underflow_model, underflow_optimizer


@functools.lru_cache(maxsize=None)
def tuned(name: str) -> autoprec.Policy:
    """A real tuned policy, once per module: bf16 on CPU, fp16+bf16 with exclusions, fp16 with a loss scale."""
    if name == "mlp_cpu":
        model, batch, loss_fn = mlp()
        return autoprec.tune(model, batch, loss_fn, progress=False, verify_steps=5)
    if name == "rmsnorm_cuda":
        model, batch, loss_fn = rmsnorm_model()
        return autoprec.tune(model, batch, loss_fn, dtypes=["fp16", "bf16"], target="cuda", progress=False,
                             verify_steps=5)
    if name == "underflow_fp16":
        model, batch, loss_fn = underflow_model()
        return autoprec.tune(model, batch, loss_fn, dtypes=["fp16"], target="cuda", optimizer=underflow_optimizer,
                             progress=False, verify_steps=5)
    raise KeyError(name)


POLICIES = ["mlp_cpu", "rmsnorm_cuda", "underflow_fp16"]


# ---------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", POLICIES, ids=POLICIES)
def test_save_load_round_trip_is_exact(name, tmp_path):
    """``load(save(policy)) == policy`` field by field, and a second save writes the identical JSON text."""
    policy = tuned(name)
    first = tmp_path / "a.autoprec.json"
    policy.save(first)
    loaded = autoprec.load(first)
    assert loaded == policy
    assert loaded.layers == policy.layers
    assert loaded.verification == policy.verification
    assert loaded.scaler == policy.scaler
    assert loaded.stats == policy.stats
    assert loaded.handoff == policy.handoff
    second = tmp_path / "b.autoprec.json"
    loaded.save(second)
    assert second.read_text(encoding="utf-8") == first.read_text(encoding="utf-8")
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("name", POLICIES, ids=POLICIES)
def test_loaded_policy_runs_like_the_original(name, tmp_path):
    """A loaded policy gives the same loss as the tuned one on the model it was tuned on, and the same scaler."""
    policy = tuned(name)
    policy.save(tmp_path / "p.json")
    loaded = autoprec.load(tmp_path / "p.json")
    factory = {"mlp_cpu": mlp, "rmsnorm_cuda": rmsnorm_model, "underflow_fp16": underflow_model}[name]
    model, batch, loss_fn = factory()
    outs = []
    for p in (policy, loaded):
        with torch.no_grad(), p.autocast(model):
            out = model(**batch) if isinstance(batch, dict) else model(batch)
            outs.append(out if loss_fn is None else loss_fn(out, batch))
    assert torch.equal(outs[0], outs[1])
    s0, s1 = policy.grad_scaler("cpu"), loaded.grad_scaler("cpu")
    assert (s0 is None) == (s1 is None)
    if s0 is not None:
        assert s0.get_scale() == s1.get_scale()


# ---------------------------------------------------------------------------
# a policy for another model
# ---------------------------------------------------------------------------

OTHER_MODELS = {
    # same architecture, another hidden size: every Linear changed shape
    "mlp_hidden128": (lambda: MLP(hidden=128), {"changed": ["fc1", "fc2", "fc3"]}),
    # another architecture: the mlp's layers are missing, the CNN's are extra
    "cnn": (lambda: CNN(), {"missing": ["fc1", "fc2", "fc3"], "extra": ["conv1", "bn1", "conv2"]}),
    # another architecture sharing no leaf name either
    "transformer_block": (lambda: transformer_block()[0], {"missing": ["fc1"], "extra": ["attn.q", "mlp.fc1"]}),
}


def _hooks(model):
    return [(name, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()]


@pytest.mark.parametrize("how", ["apply", "autocast"], ids=["apply", "autocast"])
@pytest.mark.parametrize("other", list(OTHER_MODELS), ids=list(OTHER_MODELS))
def test_policy_for_another_model_raises(other, how, tmp_path):
    """A loaded mlp policy put on another model raises PolicyError naming the missing, extra and changed layers."""
    tuned("mlp_cpu").save(tmp_path / "mlp.json")
    policy = autoprec.load(tmp_path / "mlp.json")
    make, expect = OTHER_MODELS[other]
    model = make()
    before = _hooks(model)
    with pytest.raises(autoprec.PolicyError) as info:
        if how == "apply":
            policy.apply(model)
        else:
            with policy.autocast(model):
                pytest.fail("the block must not run")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    if "missing" in expect:
        assert "missing from the model" in message
    if "extra" in expect:
        assert "not in the policy" in message
    if "changed" in expect:
        assert "changed" in message
        assert "Linear[weight(256, 128),bias(256,)] -> Linear[weight(128, 128),bias(128,)]" in message
    for layer in sum(expect.values(), []):
        assert layer in message, (layer, message)
    assert _hooks(model) == before  # nothing was left installed


def test_policy_fits_a_fresh_copy_of_its_model(tmp_path):
    """The same architecture with other weights (another seed) fits the policy: only structure is checked."""
    tuned("mlp_cpu").save(tmp_path / "mlp.json")
    policy = autoprec.load(tmp_path / "mlp.json")
    model, batch, _ = mlp(seed=1)
    handle = policy.apply(model)
    try:
        assert model(batch).dtype == torch.float32
    finally:
        handle.remove()


# ---------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------


def _text() -> str:
    return json.dumps(tuned("rmsnorm_cuda").to_dict(), indent=2, sort_keys=True)


def _edit(fn):
    def make():
        data = json.loads(_text())
        fn(data)
        return json.dumps(data)
    return make


def _set_precision(name):
    def edit(data):
        data["layers"]["fc1"]["precision"] = name
    return edit


BAD_FILES = {
    "corrupt_json": lambda: _text().replace('"layers": {', '"layers": {{', 1),
    "truncated": lambda: _text()[: len(_text()) // 2],
    "empty": lambda: "",
    "not_an_object": lambda: "[1, 2, 3]",
    "schema_version_2": _edit(lambda d: d.__setitem__("schema_version", 2)),
    "schema_version_missing": _edit(lambda d: d.pop("schema_version")),
    "precision_fp8": _edit(_set_precision("fp8")),
    "precision_missing": _edit(lambda d: d["layers"]["fc1"].pop("precision")),
    "formats_fp8": _edit(lambda d: d.__setitem__("formats", ["fp16", "fp8"])),
    "unknown_policy_field": _edit(lambda d: d.__setitem__("colour", "blue")),
    "unknown_layer_field": _edit(lambda d: d["layers"]["fc1"].__setitem__("colour", "blue")),
    "layers_not_object": _edit(lambda d: d.__setitem__("layers", ["fc1", "norm"])),
    "target_tpu": _edit(lambda d: d.__setitem__("target", "tpu")),
}


@pytest.mark.parametrize("kind", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_policy_file_raises_policy_error(kind, tmp_path):
    """A corrupt, truncated, unknown-version or unknown-precision file raises PolicyError (a ValueError)."""
    path = tmp_path / "bad.json"
    path.write_text(BAD_FILES[kind](), encoding="utf-8")
    with pytest.raises(autoprec.PolicyError) as info:
        autoprec.load(path)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, autoprec.AutoprecError)
    assert str(info.value)


def test_missing_file_raises_policy_error(tmp_path):
    """A missing file raises PolicyError (a ValueError) naming the path, not FileNotFoundError."""
    path = tmp_path / "nowhere" / "policy.json"
    with pytest.raises(autoprec.PolicyError) as info:
        autoprec.load(path)
    assert isinstance(info.value, ValueError)
    assert not isinstance(info.value, OSError)
    assert "policy.json" in str(info.value)


def test_binary_file_raises_policy_error(tmp_path):
    """A file that is not UTF-8 text (e.g. a checkpoint saved by mistake) raises PolicyError."""
    path = tmp_path / "model.pt"
    torch.save({"w": torch.randn(4, 4)}, path)
    with pytest.raises(autoprec.PolicyError):
        autoprec.load(path)


WRONG_TYPES = {
    "flops_string": _edit(lambda d: d["layers"]["fc1"].__setitem__("flops", "many")),
    "scaler_init_scale_string": _edit(lambda d: d["scaler"].__setitem__("init_scale", "big")),
    "excluded_string": _edit(lambda d: d["layers"]["norm"].__setitem__("excluded", "yes")),
    "hazards_string": _edit(lambda d: d["layers"]["norm"].__setitem__("hazards", "pow")),
    "scaler_negative": _edit(lambda d: d["scaler"].__setitem__("init_scale", -1.0)),
    "handoff_string": _edit(lambda d: d.__setitem__("handoff", {"fc1": "fc2"})),
    "handoff_list": _edit(lambda d: d.__setitem__("handoff", ["fc1"])),
}


@pytest.mark.parametrize("kind", list(WRONG_TYPES), ids=list(WRONG_TYPES))
def test_wrongly_typed_value_raises_policy_error_at_load(kind, tmp_path):
    """A field of the wrong type (a string where a number belongs) is refused by load with PolicyError."""
    path = tmp_path / "bad.json"
    path.write_text(WRONG_TYPES[kind](), encoding="utf-8")
    with pytest.raises(autoprec.PolicyError):
        policy = autoprec.load(path)
        policy.low_precision_fraction()
        policy.grad_scaler("cpu")


@pytest.mark.parametrize("field,value,text", [
    ("flops", "x", "field 'flops' = 'x' is not an integer"),
    ("excluded", "no", "field 'excluded' = 'no' is not true/false"),
    ("measured", [], "field 'measured' = [] is not an object"),
], ids=["flops", "excluded", "measured"])
def test_a_field_of_the_wrong_type_is_named_with_its_value(field, value, text):
    """A per-field type error names the layer, the field, the value and the expected kind."""
    data = {"schema_version": 1, "layers": {"fc": {"precision": "bf16", field: value}}}
    with pytest.raises(autoprec.PolicyError, match=re.escape(f"layer 'fc': {text}")):
        autoprec.Policy.from_dict(data)
