"""Calibration: bounded, cached per machine, read back from profile files that are validated on load."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import autoprec
from autoprec.device import (
    cache_dir,
    calibrate,
    estimate,
    load_profile,
    machine,
    profile_from_dict,
    profile_to_dict,
    save_profile,
    shape_key,
    with_layers,
)
from autoprec.trace import trace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = 1e-3  # seconds: only the minimal set of figures gets measured
PINNED_CPU = os.path.join(ROOT, "tests", "data", "cpu_profile.json")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty calibration cache, and no pinned profile: tune calibrates for real."""
    monkeypatch.setenv("AUTOPREC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("AUTOPREC_PROFILE", raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_profile():
    """One bounded calibration, shared by the tests that only read it."""
    return calibrate("cpu", dtypes=["bf16"], seconds=TINY, cache=False)


def test_calibration_is_bounded_by_its_budget(tiny_profile):
    """Out of time, each ladder stops at its two smallest sizes; every figure is still there, positive."""
    p = tiny_profile
    assert [len(c.flops) for c in p.curves] == [2, 2, 2]
    assert p.formats == ("fp32", "bf16") and p.origin == "calibrated"
    assert all(t > 0 for c in p.curves for s in c.seconds.values() for t in s)
    assert set(p.elementwise) == {"pointwise", "norm", "softmax", "accumulation"}
    assert p.cast["bf16"] > 0 and p.region["bf16"] >= 0


def test_calibration_records_the_machine(tiny_profile):
    """Device name, capability (BF16 support as torch sees it), torch version and threads are recorded."""
    name, capability = machine(torch.device("cpu"))
    bf16 = torch.cpu._is_avx512_bf16_supported()
    assert tiny_profile.device == name and tiny_profile.capability == capability
    assert f"avx512_bf16 {'yes' if bf16 else 'no'}" in capability
    assert tiny_profile.torch_version == torch.__version__ and tiny_profile.threads == torch.get_num_threads()


def test_calibration_leaves_global_state_alone():
    """The global RNG, thread count, grad mode and autocast state are as they were."""
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    with torch.no_grad():
        calibrate("cpu", seconds=TINY, cache=False)
        assert not torch.is_grad_enabled()
    assert torch.equal(rng, torch.get_rng_state()) and torch.get_num_threads() == threads
    assert not torch.is_autocast_enabled("cpu")


def test_calibration_is_cached_per_machine(cache, monkeypatch):
    """The first call measures and writes the cache; the second reads it (measures nothing); another
    thread count is another machine configuration."""
    first = calibrate("cpu", seconds=TINY)
    files = os.listdir(cache)
    assert len(files) == 1 and first.seconds > 0 and first.source == str(cache / files[0])
    again = calibrate("cpu", seconds=TINY)
    assert again.seconds == 0 and profile_to_dict(again) == profile_to_dict(first)
    both = calibrate("cpu", dtypes=["fp16"], seconds=TINY)  # a format the cache lacks: measured with the others
    assert both.seconds > 0 and both.formats == ("fp32", "fp16", "bf16") and len(os.listdir(cache)) == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads != 1 else 2)
    try:
        calibrate("cpu", seconds=TINY)
    finally:
        torch.set_num_threads(threads)
    assert len(os.listdir(cache)) == 2


def test_a_fresh_calibration_replaces_the_cached_one(cache):
    """``fresh=True`` (``autoprec calibrate --fresh``) measures although a profile is cached, and the next tune's
    calibration reads the new one: a profile measured on a busy machine is not kept for good."""
    first = calibrate("cpu", seconds=TINY)
    fresh = calibrate("cpu", seconds=TINY, fresh=True)
    assert fresh.seconds > 0 and fresh.source == first.source and len(os.listdir(cache)) == 1
    again = calibrate("cpu", seconds=TINY)
    assert again.seconds == 0 and profile_to_dict(again) == profile_to_dict(fresh)


@pytest.mark.parametrize("var", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
def test_a_onednn_isa_limit_is_another_machine_configuration(monkeypatch, var):
    """A oneDNN ISA limit (AVX512_CORE: no AVX512-BF16/AMX kernels, BF16 matmuls far slower) is part of the
    capability and of the cache key: a calibration measured under one limit is never reused under another."""
    from autoprec.device import cache_file
    cpu = torch.device("cpu")
    for v in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(v, raising=False)
    plain, plain_file = machine(cpu)[1], cache_file(cpu)
    monkeypatch.setenv(var, "ALL")  # oneDNN's default: the same configuration
    assert (machine(cpu)[1], cache_file(cpu)) == (plain, plain_file)
    monkeypatch.setenv(var, "avx512_core")
    limited, limited_file = machine(cpu)[1], cache_file(cpu)
    assert limited == f"{plain}, oneDNN max ISA AVX512_CORE" and limited_file != plain_file
    monkeypatch.setenv(var, "AVX2")
    assert cache_file(cpu) not in (plain_file, limited_file)


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    """AUTOPREC_CACHE_DIR wins; else XDG_CACHE_HOME/autoprec; else ~/.cache/autoprec."""
    monkeypatch.setenv("AUTOPREC_CACHE_DIR", str(tmp_path / "a"))
    assert cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("AUTOPREC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg" / "autoprec")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == str(tmp_path / "home" / ".cache" / "autoprec")


def test_a_damaged_cache_is_measured_again(cache, caplog):
    """A cache file that does not validate is never trusted: a warning, a new calibration, a good file."""
    calibrate("cpu", seconds=TINY)
    path = cache / os.listdir(cache)[0]
    path.write_text('{"autoprec_device_profile": 1, "target": "cpu"}')
    with caplog.at_level(logging.WARNING, logger="autoprec.calibration"):
        p = calibrate("cpu", seconds=TINY)
    assert p.seconds > 0 and "ignoring the calibration cache" in caplog.text
    load_profile(path)  # rewritten whole


def _four_linears() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 8))
    tr = trace(model, torch.randn(32, 64), device_type="cpu")
    return model, [lay for lay in tr.layers if lay.flops > 0]


def test_model_layers_are_timed_at_their_shapes_once():
    """with_layers times each layer shape once, in every format the profile prices; a second call times
    nothing."""
    model, heavy = _four_linears()
    pinned = load_profile(PINNED_CPU)
    p = with_layers(pinned, heavy, dict(model.named_modules()), device=torch.device("cpu"), seconds=5.0, cache=False)
    assert len(heavy) == 4 and len(p.layers) == 3  # the two 128 x 128 Linears share one shape
    assert set(p.layers) == {shape_key(lay) for lay in heavy}
    assert all(set(v) == {"fp32", "fp16", "bf16"} for v in p.layers.values())
    assert with_layers(p, heavy, dict(model.named_modules()), device=torch.device("cpu"), cache=False) is p


def test_a_format_far_slower_on_the_curve_is_not_timed_at_large_shapes():
    """A format the profile's curve prices at more than 16x FP32 for a layer (CPU FP16 without kernels) is
    not timed at that layer's shape: only FP32 is, and the curve keeps pricing the format."""
    model, heavy = _four_linears()
    data = profile_to_dict(load_profile(PINNED_CPU))
    for c in data["curves"]:
        c["seconds"]["fp16"] = [100 * t for t in c["seconds"]["fp32"]]
    slow = profile_from_dict(data)
    p = with_layers(slow, heavy, dict(model.named_modules()), device=torch.device("cpu"), seconds=5.0, cache=False)
    assert len(p.layers) == 3 and all(set(v) == {"fp32", "bf16"} for v in p.layers.values())


def test_tune_calibrates_where_it_tunes_and_caches_the_model_shapes(cache):
    """Without a profile, a CPU-target tune calibrates this machine, times the model's layers at their
    shapes, records where its figures came from, and the next tune of the model measures nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 8))
    x = torch.randn(256, 64)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    policy = autoprec.tune(model, x, progress=False, verify_steps=0)
    assert torch.equal(rng, torch.get_rng_state()) and torch.get_num_threads() == threads
    st = policy.stats
    assert st["profile_origin"] == "calibrated" and st["calibration_seconds"] > 0
    assert (st["device"], st["capability"]) == machine(torch.device("cpu"))
    cached = load_profile(cache / os.listdir(cache)[0])
    assert len(cached.layers) == 2  # the two Linears
    again = autoprec.tune(model, x, progress=False, verify_steps=0)
    assert again.stats["calibration_seconds"] == 0
    # each Linear's decision stands on its own timings, whichever way this CPU decides it
    timed = {"0": cached.layers["Linear|256x64|256x128|4194304|8320"],
             "2": cached.layers["Linear|256x128|256x8|524288|1032"]}
    for key, t in timed.items():
        e = policy.layers[key]
        assert e.reason in ("cast", "no gain"), (key, e.reason)
        if e.reason == "no gain":  # the step times in each format, measured here at this layer's shape
            assert re.search(r"step time fp32 [\d.]+ [mu]?s, bf16 [\d.]+ [mu]?s", e.detail), e.detail
            assert "measured at this layer's shape" in e.detail and "calibrated here" in e.detail
        else:  # cast for speed: its BF16 time alone, before the region's and the casts' costs, beats FP32
            assert t["bf16"] < t["fp32"], (key, t)


def test_profile_file_round_trips(tmp_path, tiny_profile):
    """A saved profile loads back with the same figures, marked as coming from that file."""
    path = tmp_path / "p.json"
    save_profile(tiny_profile, path)
    back = load_profile(path)
    assert profile_to_dict(back) == profile_to_dict(tiny_profile)
    assert back.origin == "file" and back.source == str(path)


BAD = {
    "version": (lambda d: d.update(autoprec_device_profile=2),
                r"field 'autoprec_device_profile' is 2; allowed: 1"),
    "target": (lambda d: d.update(target="tpu"), r"field 'target' is 'tpu'; allowed: 'cpu' or 'cuda'"),
    "negative cast": (lambda d: d["cast"].update(bf16=-1.0),
                      r"field 'cast.bf16' is -1.0; allowed: a finite number > 0"),
    "unknown field": (lambda d: d.update(speed={"bf16": 2.0}), r"field 'speed' is .*; allowed: only the fields"),
    "sizes not ascending": (lambda d: d["curves"][0]["flops"].__setitem__(1, 1.0),
                            r"field 'curves\[0\].flops' .*allowed: strictly ascending"),
    "time decreases": (lambda d: d["curves"][0]["seconds"]["fp32"].__setitem__(3, 1e-9),
                       r"field 'curves\[0\].seconds.fp32' .*allowed: times that do not decrease"),
    "fp32 missing": (lambda d: d["curves"][0]["seconds"].pop("fp32"),
                     r"field 'curves\[0\].seconds' is \['bf16', 'fp16'\]; allowed: the formats \['fp32'"),
    "elementwise class missing": (lambda d: d["elementwise"].pop("norm"),
                                  r"field 'elementwise' .*allowed: exactly the classes"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_profile_files_fail_clearly(tmp_path, case):
    """Each defect is a ProfileError naming the field, the value found, what is allowed, and the fix."""
    spoil, message = BAD[case]
    data = profile_to_dict(estimate("cuda"))
    spoil(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(autoprec.ProfileError, match=message) as info:
        load_profile(path)
    assert "fix: re-run `autoprec calibrate --out FILE`" in str(info.value)


def test_unreadable_profile_files_fail_clearly(tmp_path):
    """A missing file and a file that is not JSON are ProfileErrors that say what to pass."""
    with pytest.raises(autoprec.ProfileError, match=r"does not exist: pass the path of a file written by"):
        load_profile(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(autoprec.ProfileError, match=r"is not readable JSON .*re-run `autoprec calibrate"):
        load_profile(tmp_path / "x.json")


def test_tune_uses_a_profile_file_for_its_target_only(tmp_path):
    """profile= takes a file for the target's device kind; a file for another target, one without the
    formats asked for, or a value of the wrong kind is refused before any work."""
    from tests.models import mlp

    model, batch, loss_fn = mlp(batch_size=64)
    gpu = tmp_path / "gpu.json"
    save_profile(estimate("cuda"), gpu)
    policy = autoprec.tune(model, batch, loss_fn, target="cuda", profile=str(gpu), progress=False, verify_steps=0)
    assert policy.stats["profile_origin"] == "file" and str(gpu) in policy.stats["profile"]
    with pytest.raises(autoprec.ProfileError, match=r"is for target 'cuda', but the policy is tuned for 'cpu'"):
        autoprec.tune(model, batch, loss_fn, profile=str(gpu), progress=False)
    bf16_only = tmp_path / "bf16.json"
    data = profile_to_dict(estimate("cuda"))
    for c in data["curves"]:
        del c["seconds"]["fp16"]
    for per in data["elementwise"].values():
        del per["fp16"]
    del data["cast"]["fp16"], data["region"]["fp16"]
    bf16_only.write_text(json.dumps(data))
    with pytest.raises(autoprec.ProfileError, match=r"has no figures for \['fp16'\] .*pass dtypes=\['bf16'\]"):
        autoprec.tune(model, batch, loss_fn, target="cuda", dtypes=["fp16"], profile=str(bf16_only), progress=False)
    with pytest.raises(autoprec.OptionError, match=r"profile=3 must be the path of a device profile file"):
        autoprec.tune(model, batch, loss_fn, profile=3, progress=False)


def test_a_bad_profile_in_the_environment_names_the_variable(monkeypatch, tmp_path):
    """AUTOPREC_PROFILE naming a missing file is a ProfileError that names the variable and the way out."""
    from tests.models import mlp

    monkeypatch.setenv("AUTOPREC_PROFILE", str(tmp_path / "gone.json"))
    model, batch, loss_fn = mlp(batch_size=16)
    with pytest.raises(autoprec.ProfileError, match=r"\$AUTOPREC_PROFILE: device profile .*gone.json' does not "
                                                    r"exist.*unset AUTOPREC_PROFILE to calibrate here"):
        autoprec.tune(model, batch, loss_fn, progress=False)


def test_cuda_target_from_a_cpu_uses_the_estimate_and_says_so(monkeypatch):
    """Without a profile file, a CUDA target tuned from a CPU is priced by the built-in estimate; the
    policy's stats and report say it is one."""
    from tests.models import mlp

    monkeypatch.delenv("AUTOPREC_PROFILE", raising=False)
    model, batch, loss_fn = mlp(batch_size=64)
    policy = autoprec.tune(model, batch, loss_fn, target="cuda", progress=False, verify_steps=0)
    assert policy.stats["profile_origin"] == "estimate"
    assert "an estimate, not measured on the device" in policy.report()


def test_cli_calibrate_writes_a_profile_that_tune_reads(tmp_path, cache):
    """`autoprec calibrate --out` prints the figures and writes a profile; a bad --profile exits 3."""
    out = tmp_path / "here.json"
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, "-m", "autoprec", "calibrate", "--seconds", "0.001", "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "| matmul" in run.stdout and f"wrote {out}" in run.stdout
    assert load_profile(out).target == "cpu"
    (tmp_path / "bad.json").write_text("[]")
    factory = tmp_path / "f.py"
    factory.write_text("import torch\ndef make():\n    return torch.nn.Linear(4, 4), torch.randn(8, 4)\n")
    run = subprocess.run([sys.executable, "-m", "autoprec", "tune", f"{factory}:make", "--out", "p.json",
                          "--profile", "bad.json", "--quiet"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 3 and "ProfileError" in run.stderr and "field '(top level)'" in run.stderr
    run = subprocess.run([sys.executable, "-m", "autoprec", "tune", f"{factory}:make", "--out", "p.json",
                          "--profile", str(out), "--quiet", "--verify-steps", "0"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"speed figures: profile file {out}" in run.stdout
