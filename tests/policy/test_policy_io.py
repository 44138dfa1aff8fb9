"""Policy files: exact save/load round trip, refusal to fit another model, and PolicyError for bad files."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

import autoprec
from autoprec.core import FIX as FIX_TEXT
from tests.helpers import cached
from tests.models import (
    CNN,
    MLP,
    call_model,
    mlp,
    rmsnorm_model,
    transformer_block,
    underflow_model,
    underflow_optimizer,
)


@cached
def tuned(name: str) -> autoprec.Policy:
    """A real tuned policy, once per module: bf16 on CPU, fp16+bf16 with exclusions, fp16 with a loss scale."""
    if name == "mlp_cpu":
        model, batch, loss_fn = mlp(batch_size=MLP_BATCH)
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
#: at 64 rows the pinned CPU profile finds BF16 slower for the mlp's Linears (an all-FP32 policy); at 512 it casts them
MLP_BATCH = 512
#: which policies have FP16 layers, so a GradScaler
SCALED = {"mlp_cpu": False, "rmsnorm_cuda": True, "underflow_fp16": True}


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
    factory = {"mlp_cpu": lambda: mlp(batch_size=MLP_BATCH), "rmsnorm_cuda": rmsnorm_model,
               "underflow_fp16": underflow_model}[name]
    model, batch, loss_fn = factory()
    assert policy.low_precision_fraction() > 0  # two 16-bit runs compared, not two FP32 ones
    outs = []
    for p in (policy, loaded):
        with torch.no_grad(), p.autocast(model):
            out = call_model(model, batch)
            outs.append(out if loss_fn is None else loss_fn(out, batch))
    assert torch.equal(outs[0], outs[1])
    with warnings.catch_warnings():  # a CUDA policy's scaler made for this CPU: DeviceWarning, tested elsewhere
        warnings.simplefilter("ignore", autoprec.DeviceWarning)
        s0, s1 = policy.grad_scaler("cpu"), loaded.grad_scaler("cpu")
    assert (s0 is None) == (s1 is None) == (not SCALED[name])
    if s0 is not None:
        assert s0.get_scale() == s1.get_scale() == policy.scaler.init_scale
        assert s0.get_growth_interval() == s1.get_growth_interval() == policy.scaler.growth_interval
        assert s0.get_backoff_factor() == s1.get_backoff_factor() == policy.scaler.backoff_factor


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


FIX = "; " + re.escape(FIX_TEXT)


def _layer(field, value):
    return _edit(lambda d: d["layers"]["fc1"].__setitem__(field, value))


def _scaler(field, value):
    return _edit(lambda d: d["scaler"].__setitem__(field, value))


def _ver(**fields):
    return _edit(lambda d: d["verification"].update(fields))


#: A corrupted file -> the message load must give: what is wrong (the record and field), the value
#: found, what is allowed, and the fix.
CORRUPTED = {
    "corrupt_json": (lambda: _text().replace('"layers": {', '"layers": {{', 1),
                     r"policy file '.*bad.json' is not valid JSON \(.*\): it may be truncated or corrupt; "
                     r"re-run autoprec.tune"),
    "truncated": (lambda: _text()[: len(_text()) // 2], r"is not valid JSON .*re-run autoprec.tune"),
    "empty": (lambda: "", r"is not valid JSON \(Expecting value at line 1\)"),
    "not_an_object": (lambda: "[1, 2, 3]", r"a policy is a JSON object, got list: is this a policy file\?"),
    "schema_version_3": (_edit(lambda d: d.__setitem__("schema_version", 3)),
                         r"unknown policy schema version 3: this autoprec reads versions 1, 2; re-run autoprec.tune"),
    "schema_version_missing": (_edit(lambda d: d.pop("schema_version")), r"unknown policy schema version None"),
    "precision_fp8": (_layer("precision", "fp8"), r"layer 'fc1': LayerEntry field 'recipe' is '' \(str\); "
                      r"allowed: one of 'tensorwise', 'rowwise', 'rowwise_with_gw_hp' \(an fp8 layer names its "
                      r"torchao recipe\)" + FIX),
    "precision_fp9": (_layer("precision", "fp9"), r"layer 'fc1': LayerEntry field 'precision' is 'fp9' \(str\); "
                      r"allowed: one of 'fp32', 'fp16', 'bf16', 'fp8'" + FIX),
    "recipe_on_bf16": (_layer("recipe", "rowwise"), r"layer 'fc1': LayerEntry field 'recipe' is 'rowwise' \(str\); "
                       r"allowed: '' for a (bf16|fp32|fp16) layer \(a recipe is FP8's\)" + FIX),
    "precision_missing": (_edit(lambda d: d["layers"]["fc1"].pop("precision")),
                          r"layer 'fc1': required fields \['precision'\] are missing" + FIX),
    "layer_not_object": (_edit(lambda d: d["layers"].__setitem__("fc1", "bf16")),
                         r"layer 'fc1': expected an object of LayerEntry fields, got a string" + FIX),
    "formats_fp4": (_edit(lambda d: d.__setitem__("formats", ["fp16", "fp4"])),
                    r"Policy field 'formats' is \['fp16', 'fp4'\] \(list\); allowed: a list of strings from "
                    r"'fp16', 'bf16', 'fp8'" + FIX),
    "unknown_policy_field": (_edit(lambda d: d.__setitem__("colour", "blue")),
                             r"policy: unknown fields \['colour'\]; a Policy has \['layers', .*\]" + FIX),
    "unknown_layer_field": (_layer("colour", "blue"),
                            r"layer 'fc1': unknown fields \['colour'\]; a LayerEntry has \['precision', .*\]" + FIX),
    "layers_not_object": (_edit(lambda d: d.__setitem__("layers", ["fc1", "norm"])),
                          r"Policy field 'layers' is \['fc1', 'norm'\] \(list\); allowed: an object of layer name -> entry" + FIX),
    "target_tpu": (_edit(lambda d: d.__setitem__("target", "tpu")),
                   r"Policy field 'target' is 'tpu' \(str\); allowed: one of 'cpu', 'cuda'" + FIX),
    "flops_string": (_layer("flops", "many"), r"layer 'fc1': LayerEntry field 'flops' is 'many' \(str\); "
                     r"allowed: an integer >= 0" + FIX),
    "flops_negative": (_layer("flops", -5), r"LayerEntry field 'flops' is -5 \(int\); allowed: an integer >= 0"),
    "flops_float": (_layer("flops", 1.5), r"LayerEntry field 'flops' is 1.5 \(float\); allowed: an integer"),
    "excluded_string": (_layer("excluded", "yes"), r"layer 'fc1': LayerEntry field 'excluded' is 'yes' \(str\); "
                        r"allowed: true or false \(a JSON boolean, not a string\)" + FIX),
    "kind_bad": (_layer("kind", "function"), r"LayerEntry field 'kind' is 'function' \(str\); allowed: one of "
                 r"'module', 'op'"),
    "hazards_string": (_layer("hazards", "pow"), r"LayerEntry field 'hazards' is 'pow' \(str\); allowed: a list "
                       r"of strings" + FIX),
    "detail_number": (_layer("detail", 3), r"LayerEntry field 'detail' is 3 \(int\); allowed: a string" + FIX),
    "out_absmax_negative": (_layer("out_absmax", -1.0), r"LayerEntry field 'out_absmax' is -1.0 \(float\); "
                            r"allowed: a number \(inf allowed, not NaN\) >= 0" + FIX),
    "measured_list": (_layer("measured", []), r"LayerEntry field 'measured' is \[\] \(list\); allowed: an object "
                      r"of format -> \{figure name: number\}" + FIX),
    "measured_figure_string": (_layer("measured", {"bf16": {"loss_err": "low"}}),
                               r"LayerEntry field \"measured\['bf16'\]\['loss_err'\]\" is 'low' \(str\); "
                               r"allowed: a number \(inf allowed, not NaN\)" + FIX),
    "scaler_init_scale_string": (_scaler("init_scale", "big"), r"scaler: ScalerSettings field 'init_scale' is "
                                 r"'big' \(str\); allowed: a finite number > 0" + FIX),
    "scaler_negative": (_scaler("init_scale", -1.0), r"ScalerSettings field 'init_scale' is -1.0 \(float\); "
                        r"allowed: a finite number > 0" + FIX),
    "scaler_backoff_above_1": (_scaler("backoff_factor", 1.5), r"ScalerSettings field 'backoff_factor' is 1.5 "
                               r"\(float\); allowed: a finite number > 0 and < 1" + FIX),
    "scaler_growth_interval_0": (_scaler("growth_interval", 0), r"ScalerSettings field 'growth_interval' is 0 "
                                 r"\(int\); allowed: an integer >= 1" + FIX),
    "scaler_unknown_field": (_scaler("enabled", True), r"scaler: unknown fields \['enabled'\]; a ScalerSettings "
                             r"has \['init_scale', 'growth_factor', 'backoff_factor', 'growth_interval'\]" + FIX),
    "handoff_string": (_edit(lambda d: d.__setitem__("handoff", {"fc1": "fc2"})),
                       r"Policy field \"handoff\['fc1'\]\" is 'fc2' \(str\); allowed: a list of strings" + FIX),
    "handoff_list": (_edit(lambda d: d.__setitem__("handoff", ["fc1"])),
                     r"Policy field 'handoff' is \['fc1'\] \(list\); allowed: an object of layer name -> list of "
                     r"layer names" + FIX),
    "tolerance_string": (_edit(lambda d: d.__setitem__("tolerance", {"loss": "tight"})),
                         r"Policy field \"tolerance\['loss'\]\" is 'tight' \(str\); allowed: a finite number > 0"
                         + FIX),
    "modules_number": (_edit(lambda d: d.__setitem__("modules", {"fc1": 3})),
                       r"Policy field 'modules' is \{'fc1': 3\} \(dict\); allowed: an object of string -> string"
                       + FIX),
    "stats_list": (_edit(lambda d: d.__setitem__("stats", [1])),
                   r"Policy field 'stats' is \[1\] \(list\); allowed: an object of name -> value" + FIX),
    "verification_passed_string": (_ver(passed="false"), r"verification: Verification field 'passed' is 'false' "
                                   r"\(str\); allowed: true or false \(a JSON boolean, not a string\)" + FIX),
    "verification_contradicts_itself": (_ver(passed=True, max_gap=0.9, bound=0.05, noise_floor=0.0),
                                        r"verification: Verification is marked passed but its loss gap \(0.9, "
                                        r"compiled 0\) exceeds its threshold 0.05 \(bound 0.05, noise floor 0\): the "
                                        r"record contradicts itself" + FIX),
    "verification_fp32_nan": (_ver(fp32_losses=[1.0, float("nan")]), r"Verification field 'fp32_losses' is "
                              r"\[1.0, nan\] \(list\); allowed: a list of finite numbers" + FIX),
    "verification_rounds_0": (_ver(rounds=0), r"Verification field 'rounds' is 0 \(int\); allowed: an integer >= 1"),
    "verification_steps_missing": (_edit(lambda d: d["verification"].pop("steps")),
                                   r"verification: required fields \['steps'\] are missing" + FIX),
}


@pytest.mark.parametrize("kind", list(CORRUPTED), ids=list(CORRUPTED))
def test_corrupted_policy_file_names_field_value_allowed_and_fix(kind, tmp_path):
    """Every corrupted field is refused by load with a PolicyError (a ValueError) whose message says which record
    and field, the value found, what is allowed and the fix; the file's path where the file is not a policy."""
    make, message = CORRUPTED[kind]
    path = tmp_path / "bad.json"
    path.write_text(make(), encoding="utf-8")
    with pytest.raises(autoprec.PolicyError, match=message) as info:
        autoprec.load(path)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("build,message", [
    (lambda: autoprec.LayerEntry("fp9"), r"^LayerEntry field 'precision' is 'fp9'"),
    (lambda: autoprec.LayerEntry("bf16", flops="many"), r"^LayerEntry field 'flops' is 'many'"),
    (lambda: autoprec.ScalerSettings(init_scale=0), r"^ScalerSettings field 'init_scale' is 0"),
    (lambda: autoprec.Policy(layers={"fc": "bf16"}), r"^Policy field \"layers\['fc'\]\" is 'bf16' \(str\); "
                                                     r"allowed: an autoprec.LayerEntry"),
    (lambda: autoprec.Policy(layers={}, target="tpu"), r"^Policy field 'target' is 'tpu'"),
    (lambda: autoprec.Verification(passed="false", steps=1, fp32_losses=(1.0,), policy_losses=(1.0,), max_gap=0.0,
                                   bound=0.05, skipped_steps=0, longest_skip_run=0, rounds=1),
     r"^Verification field 'passed' is 'false'"),
], ids=["precision", "flops", "init_scale", "layer_not_entry", "target", "passed_string"])
def test_records_built_in_code_are_checked_like_files(build, message):
    """One validation path: a record built in Python is refused with the same message a file gets."""
    with pytest.raises(autoprec.PolicyError, match=message + ".*" + FIX[2:]):
        build()


def test_a_legacy_fingerprint_field_is_read_and_dropped(tmp_path):
    """Files written before the fingerprint was removed still load (it was a digest of what load checks directly)."""
    data = json.loads(_text())
    data["fingerprint"] = "0123456789abcdef"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert autoprec.load(path) == tuned("rmsnorm_cuda")


def test_a_verification_written_before_the_flop_count_loads_as_not_measured(tmp_path):
    """Files written before ``nothing_cast`` and ``flops_by_dtype`` load: nothing counted (the report says so)."""
    data = json.loads(_text())
    del data["verification"]["nothing_cast"], data["verification"]["flops_by_dtype"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    old = autoprec.load(path)
    assert old.verification.nothing_cast is False and old.verification.measured_fraction is None
    assert "(not measured: a policy file from before the count)" in old.report()
    assert json.loads(old.report("json"))["low_precision_flop_fraction_measured"] is None


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




def test_grad_scaler_takes_the_training_device_and_warns_for_another():
    """grad_scaler(device): a CUDA policy's scaler made for this CPU says so (DeviceWarning); its own target does
    not warn; a device that is not one is an OptionError naming it."""
    cuda = autoprec.Policy(layers={"fc": autoprec.LayerEntry("fp16")}, target="cuda",
                           scaler=autoprec.ScalerSettings(init_scale=1024.0, growth_interval=100))
    with pytest.warns(autoprec.DeviceWarning, match=r"this policy was tuned for 'cuda' and its GradScaler is made "
                      r"for 'cpu'.*target='cpu'"):
        scaler = cuda.grad_scaler("cpu")
    assert scaler._device == "cpu" and scaler.get_scale() == 1024.0 and scaler.get_growth_interval() == 100
    if not torch.cuda.is_available():  # the default is the target where it exists, else this CPU (with the warning)
        with pytest.warns(autoprec.DeviceWarning):
            assert cuda.grad_scaler()._device == "cpu"
    cpu = autoprec.Policy(layers={"fc": autoprec.LayerEntry("fp16")}, target="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.grad_scaler()._device == "cpu" and cpu.grad_scaler(torch.device("cpu")).get_scale() == 65536.0
    with pytest.raises(autoprec.OptionError, match=r"grad_scaler\(device='tpu'\) is not a device: pass where"):
        cpu.grad_scaler("tpu")


def test_a_version_1_file_loads_unchanged(tmp_path):
    """Files written before FP8 (schema 1: no ``recipe`` field) load as the same policy, read as the current version."""
    policy = autoprec.Policy(layers={"fc1": autoprec.LayerEntry("bf16", flops=8), "fc2": autoprec.LayerEntry("fp32")},
                             target="cpu", formats=("bf16",))
    data = policy.to_dict()
    data["schema_version"] = 1
    for entry in data["layers"].values():
        del entry["recipe"]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    loaded = autoprec.load(path)
    assert loaded == policy and loaded.schema_version == 2 and loaded.recipes == {}


def test_fp8_entries_round_trip(tmp_path):
    """An fp8 entry keeps its recipe through the file; ``recipes`` lists the FP8 layers and their recipes."""
    policy = autoprec.Policy(layers={"fc1": autoprec.LayerEntry("fp8", recipe="rowwise", flops=8),
                                     "fc2": autoprec.LayerEntry("bf16", flops=2)}, target="cuda",
                             formats=("bf16", "fp8"))
    policy.save(tmp_path / "p.json")
    loaded = autoprec.load(tmp_path / "p.json")
    assert loaded == policy and loaded.recipes == {"fc1": "rowwise"}
    assert json.loads((tmp_path / "p.json").read_text())["layers"]["fc1"]["recipe"] == "rowwise"
    assert loaded.low_precision_fraction() == 1.0
