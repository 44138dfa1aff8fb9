"""Bad input: a clear AutoprecError subclass that names the bad value and the fix, raised before any
long work (the model and loss_fn ran at most twice), never a bare assert or a library's own error.

test_tune_core.py checks tolerance=-1, dtypes=["fp8"] and target="tpu" by type; test_isolation.py
that the model is untouched after a wrong batch, a non-scalar loss and NaN; test_policy_io.py bad
policy files and policies for another model one difference at a time. Here: every case, its message,
and how early it is raised.
"""

from __future__ import annotations

import ast
import math
import pathlib
from typing import Any, Callable

import pytest
import torch
from torch import nn

import autoprec
from autoprec import LayerEntry, Policy
from autoprec.core import module_signatures
from tests.models import MLP, mlp, scatter_gnn

PACKAGE = pathlib.Path(autoprec.__file__).resolve().parent
QUICK = {"progress": False, "verify_steps": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------
# the exception tree
# ---------------------------------------------------------------------------

BUILTIN = {"BatchError": ValueError, "ModelError": ValueError, "OptionError": ValueError,
           "PolicyError": ValueError, "ProfileError": ValueError, "FormatError": RuntimeError,
           "RankError": RuntimeError, "VerificationError": RuntimeError, "GuardError": RuntimeError}


@pytest.mark.parametrize("name", list(BUILTIN), ids=list(BUILTIN))
def test_every_error_is_an_autoprec_error_and_its_builtin(name):
    """Each class is exported, derives from AutoprecError and from the builtin it is, and catches as both."""
    cls = getattr(autoprec, name)
    assert name in autoprec.__all__
    assert issubclass(cls, autoprec.AutoprecError) and issubclass(cls, BUILTIN[name])
    for catch in (autoprec.AutoprecError, BUILTIN[name], Exception):
        with pytest.raises(catch):
            raise cls("x")
    assert not issubclass(cls, (KeyboardInterrupt, SystemExit, AssertionError))


def test_exception_tree_is_exactly_the_documented_one():
    """No other AutoprecError subclass is exported: callers can rely on the nine documented ones; the warnings
    share one root too (a UserWarning)."""
    exported = {n for n in autoprec.__all__ if isinstance(getattr(autoprec, n), type)
                and issubclass(getattr(autoprec, n), autoprec.AutoprecError)}
    assert exported == set(BUILTIN) | {"AutoprecError"}
    assert autoprec.AutoprecError.__bases__ == (Exception,)
    warns = {n for n in autoprec.__all__ if isinstance(getattr(autoprec, n), type)
             and issubclass(getattr(autoprec, n), Warning)}
    assert warns == {"AutoprecWarning", "DeviceWarning", "GuardWarning", "VerificationWarning"}
    assert autoprec.AutoprecWarning.__bases__ == (UserWarning,)
    assert all(issubclass(getattr(autoprec, n), autoprec.AutoprecWarning) for n in warns)


def _asserts(path: pathlib.Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]


def test_no_assert_statements_in_the_package():
    """No ``assert`` statement anywhere in autoprec (docstring doctests are text, not statements): python -O
    would skip it, and a failed one is a bare AssertionError instead of a clear error."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    found = {str(f.relative_to(PACKAGE.parent)): lines for f in files if (lines := _asserts(f))}
    assert found == {}, f"assert statements at {found}"


def test_assert_scanner_finds_asserts_but_not_doctests(tmp_path):
    """The scanner above sees a real assert and ignores one inside a docstring example."""
    f = tmp_path / "m.py"
    f.write_text('def f(x):\n    """\n    >>> assert f(1) == 1\n    """\n    assert x > 0\n    return x\n')
    assert _asserts(f) == [5]


# ---------------------------------------------------------------------------
# tune: bad input, with counters on the model and the loss
# ---------------------------------------------------------------------------


class Counted:
    """A real model from tests/models.py whose forward calls (also in tune's private copy) are counted."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls = [0]
        calls = self.calls  # a closure, not a module attribute: deep copies of the model share it
        model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))


def counted_loss(fn: Callable[[Any, Any], Any]):
    calls = [0]

    def loss(out, batch):
        calls[0] += 1
        return fn(out, batch)

    loss.calls = calls
    return loss


def _mlp_parts():
    model, batch, ce = mlp()
    return model, batch, ce


def _frozen():
    model, batch, ce = mlp()
    return model.requires_grad_(False), batch, ce


def _nan(scale: float):
    model, batch, ce = mlp()
    with torch.no_grad():
        if math.isnan(scale):
            model.fc2.weight[0, 0] = float("nan")
        else:
            model.fc1.weight.mul_(scale)
    return model, batch, ce


def _meta():
    model, batch, ce = mlp()
    return model.to("meta"), batch, ce


def _with(batch: torch.Tensor, value: float, at=(0, 0)) -> torch.Tensor:
    batch = batch.clone()
    batch[at] = value
    return batch


def _gnn_parts():
    return scatter_gnn(num_nodes=50, hub_fan_in=100, num_random_edges=100)


def _no_params():
    _, batch, ce = mlp()
    return nn.Sequential(nn.ReLU(), nn.Flatten()), batch, ce


def _dtype(dtype):
    def make():
        model, batch, ce = mlp()
        return model.to(dtype), batch.to(dtype), ce
    return make




# name -> (make model/batch/loss, edit -> tune args, expected error, substrings the message must contain)
# edit(model, batch, loss) returns (model, batch, loss_fn, kwargs)
CASES: dict[str, tuple] = {
    # the batch
    "batch_wrong_shape": (_mlp_parts, lambda m, b, f: (m, b[:, :7], f, {}), autoprec.BatchError,
                          ["batch 0", "64x7", "pass what the model takes"]),
    "batch_wrong_key": (_mlp_parts, lambda m, b, f: (m, {"inputs": b}, f, {}), autoprec.BatchError,
                        ["batch 0", "'inputs'", "dict of keyword arguments"]),
    "batch_integer_tensor": (_mlp_parts, lambda m, b, f: (m, b.long(), f, {}), autoprec.BatchError,
                             ["batch 0", "Long", "pass what the model takes"]),
    "extra_batch_wrong_shape": (_mlp_parts, lambda m, b, f: (m, b, f, {"batches": [b, b[:, :3]]}),
                                autoprec.BatchError, ["batch 2", "64x3"]),
    "batch_nan": (_mlp_parts, lambda m, b, f: (m, _with(b, float("nan")), f, {}), autoprec.BatchError,
                  ["the batch holds non-finite values (batch: 1 NaN and 0 Inf of 8192 values)", "FP32 loss on it is nan",
                   "torch.nan_to_num", "mask them in the model"]),
    "batch_inf_in_a_dict": (_mlp_parts, lambda m, b, f: (m, {"x": _with(b, float("-inf"), (3, 1))}, f, {}),
                            autoprec.BatchError, ["batch['x']: 0 NaN and 1 Inf of 8192 values"]),
    "batch_nan_in_a_tuple": (_gnn_parts, lambda m, b, f: (m, (_with(b[0], float("nan")), b[1]), f, {}),
                             autoprec.BatchError, ["(batch[0]: 1 NaN and 0 Inf of 800 values)"]),
    "extra_batch_nan": (_mlp_parts, lambda m, b, f: (m, b, f, {"batches": [b, _with(b, float("nan"), (5, 5))]}),
                        autoprec.BatchError, ["batch 2 (batches[1]) holds non-finite values (batches[1]: 1 NaN"]),
    "batch_on_meta": (_mlp_parts, lambda m, b, f: (m, b.to("meta"), f, {}), autoprec.BatchError,
                      ["batch is on the 'meta' device", "real data"]),
    # the model
    "model_without_float_params": (_no_params, lambda m, b, f: (m, b, f, {}), autoprec.ModelError,
                                   ["Sequential", "no floating-point parameters"]),
    "model_fp16_params": (_dtype(torch.float16), lambda m, b, f: (m, b, f, {}), autoprec.ModelError,
                          ["torch.float16", "model.float()"]),
    "model_bf16_params": (_dtype(torch.bfloat16), lambda m, b, f: (m, b, f, {}), autoprec.ModelError,
                          ["torch.bfloat16", "model.float()"]),
    "model_nan_in_fp32": (lambda: _nan(float("nan")), lambda m, b, f: (m, b, f, {}), autoprec.ModelError,
                          ["nan", "broken in FP32", "fix the model or the batch"]),
    "model_overflows_in_fp32": (lambda: _nan(1e38), lambda m, b, f: (m, b, f, {}), autoprec.ModelError,
                                ["broken in FP32"]),
    "model_on_meta": (_meta, lambda m, b, f: (m, b, f, {}), autoprec.ModelError,
                      ["'meta' device", "fc1.weight", "no values", "model.to_empty(device='cpu')", "load_state_dict"]),
    "model_on_meta_target_cpu": (_meta, lambda m, b, f: (m, b, f, {"target": "cpu"}), autoprec.ModelError,
                                 ["'meta' device", "on any target", "model.to_empty(device='cpu')"]),
    "model_is_a_function": (_mlp_parts, lambda m, b, f: (lambda x: m(x), b, f, {}), autoprec.ModelError,
                            ["function", "torch.nn.Module"]),
    "model_is_none": (_mlp_parts, lambda m, b, f: (None, b, f, {}), autoprec.ModelError,
                      ["NoneType", "torch.nn.Module"]),
    "model_is_a_class": (_mlp_parts, lambda m, b, f: (MLP, b, f, {}), autoprec.ModelError,
                         ["type", "torch.nn.Module"]),
    # the loss
    "loss_not_scalar": (_mlp_parts, lambda m, b, f: (m, b, lambda out, batch: out.float().square().mean(1), {}),
                        autoprec.BatchError, ["(64,)", "loss.mean()"]),
    "loss_python_float": (_mlp_parts, lambda m, b, f: (m, b, lambda out, batch: float(f(out, batch)), {}),
                          autoprec.BatchError, ["float", "scalar tensor"]),
    "loss_integer_tensor": (_mlp_parts, lambda m, b, f: (m, b, lambda out, batch: out.argmax().reshape(()), {}),
                            autoprec.BatchError, ["floating scalar tensor"]),
    "loss_none": (_mlp_parts, lambda m, b, f: (m, b, lambda out, batch: None, {}), autoprec.BatchError,
                  ["NoneType"]),
    # options
    "tolerance_zero": (_mlp_parts, lambda m, b, f: (m, b, f, {"tolerance": 0}), autoprec.OptionError,
                       ["tolerance=0", "positive number"]),
    "tolerance_negative": (_mlp_parts, lambda m, b, f: (m, b, f, {"tolerance": -0.1}), autoprec.OptionError,
                           ["tolerance=-0.1", "positive number"]),
    "tolerance_string": (_mlp_parts, lambda m, b, f: (m, b, f, {"tolerance": "0.01"}), autoprec.OptionError,
                         ["tolerance='0.01'", "positive number"]),
    "grad_tolerance_nan": (_mlp_parts, lambda m, b, f: (m, b, f, {"grad_tolerance": float("nan")}),
                           autoprec.OptionError, ["grad_tolerance=nan", "positive number"]),
    "grad_tolerance_inf": (_mlp_parts, lambda m, b, f: (m, b, f, {"grad_tolerance": float("inf")}),
                           autoprec.OptionError, ["grad_tolerance=inf", "positive number"]),
    "verify_tolerance_zero": (_mlp_parts, lambda m, b, f: (m, b, f, {"verify_tolerance": 0.0}),
                              autoprec.OptionError, ["verify_tolerance=0.0"]),
    "verify_steps_negative": (_mlp_parts, lambda m, b, f: (m, b, f, {"verify_steps": -1}), autoprec.OptionError,
                              ["verify_steps=-1", "non-negative integer"]),
    "verify_steps_float": (_mlp_parts, lambda m, b, f: (m, b, f, {"verify_steps": 2.5}), autoprec.OptionError,
                           ["verify_steps=2.5", "non-negative integer"]),
    "n_trials_string": (_mlp_parts, lambda m, b, f: (m, b, f, {"n_trials": "x"}), autoprec.OptionError,
                        ["n_trials='x'", "positive integer"]),
    "n_trials_negative": (_mlp_parts, lambda m, b, f: (m, b, f, {"n_trials": -3}), autoprec.OptionError,
                          ["n_trials=-3"]),
    "headroom_below_one": (_mlp_parts, lambda m, b, f: (m, b, f, {"headroom": 0.5}), autoprec.OptionError,
                           ["headroom=0.5", "at least 1"]),
    "headroom_nan": (_mlp_parts, lambda m, b, f: (m, b, f, {"headroom": float("nan")}), autoprec.OptionError,
                     ["headroom=nan"]),
    "dtypes_fp8": (_mlp_parts, lambda m, b, f: (m, b, f, {"dtypes": ["fp8"]}), autoprec.OptionError,
                   ["['fp8']", "without bf16", "dtypes=['bf16', 'fp8']"]),
    "dtypes_fp8_cpu_target": (_mlp_parts, lambda m, b, f: (m, b, f, {"dtypes": "bf16,fp8"}), autoprec.FormatError,
                              ["fp8 for target 'cpu'", "no FP8 GEMMs", "target='cuda'"]),
    "dtypes_fp4": (_mlp_parts, lambda m, b, f: (m, b, f, {"dtypes": ["bf16", "fp4"]}), autoprec.OptionError,
                   ["unknown precision 'fp4' in dtypes", "'fp16' and/or 'bf16'", "'fp8' beside 'bf16'"]),
    "dtypes_int8_dtype": (_mlp_parts, lambda m, b, f: (m, b, f, {"dtypes": [torch.int8]}), autoprec.OptionError,
                          ["torch.int8", "bfloat16"]),
    "dtypes_none_entry": (_mlp_parts, lambda m, b, f: (m, b, f, {"dtypes": [None]}), autoprec.OptionError,
                          ["None"]),
    "target_tpu": (_mlp_parts, lambda m, b, f: (m, b, f, {"target": "tpu"}), autoprec.OptionError,
                   ["'tpu'", "'cpu' or 'cuda'"]),
    "target_mps": (_mlp_parts, lambda m, b, f: (m, b, f, {"target": "mps"}), autoprec.OptionError,
                   ["'mps'", "'cpu' or 'cuda'"]),
    "target_int": (_mlp_parts, lambda m, b, f: (m, b, f, {"target": 5}), autoprec.OptionError,
                   ["target device 5"]),
    "batches_single_tensor": (_mlp_parts, lambda m, b, f: (m, b, f, {"batches": b}), autoprec.BatchError,
                              ["batches=", "list"]),
    "all_params_frozen": (
        _frozen, lambda m, b, f: (m, b, f, {}), autoprec.ModelError, ["requires_grad"]),
    "loss_constant": (
        _mlp_parts, lambda m, b, f: (m, b, lambda out, batch: torch.tensor(1.0), {}), autoprec.BatchError,
        ["loss", "grad"]),
    "loss_detached": (
        _mlp_parts, lambda m, b, f: (m, b, lambda out, batch: f(out.detach(), batch), {}), autoprec.BatchError,
        ["loss", "grad"]),
    "loss_fn_wrong_signature": (
        _mlp_parts, lambda m, b, f: (m, b, lambda out: out.float().mean(), {}), autoprec.BatchError,
        ["loss_fn", "(output, batch)"]),
    "dtypes_only_fp32": (
        _mlp_parts, lambda m, b, f: (m, b, f, {"dtypes": ["fp32"]}), autoprec.OptionError, ["fp32", "16-bit"]),
    "dtypes_empty": (
        _mlp_parts, lambda m, b, f: (m, b, f, {"dtypes": []}), autoprec.OptionError, ["dtypes", "16-bit"]),
    "dtypes_not_iterable": (
        _mlp_parts, lambda m, b, f: (m, b, f, {"dtypes": 16}), autoprec.OptionError, ["dtypes=16"]),
    "tolerance_bool": (
        _mlp_parts, lambda m, b, f: (m, b, f, {"tolerance": True}), autoprec.OptionError, ["tolerance=True"]),
    "verify_steps_bool": (
        _mlp_parts, lambda m, b, f: (m, b, f, {"verify_steps": True}), autoprec.OptionError, ["verify_steps=True"]),
    "seed_string": (
        _mlp_parts, lambda m, b, f: (m, b, f, {"seed": "x"}), autoprec.OptionError, ["seed='x'"]),
    "seed_float": (
        _mlp_parts, lambda m, b, f: (m, b, f, {"seed": 1.5}), autoprec.OptionError, ["seed=1.5"]),
    "storage_not_a_url": (
        _mlp_parts, lambda m, b, f: (m, b, f, {"storage": "study.db"}), autoprec.OptionError, ["storage="]),
    "storage_in_missing_dir": (
        _mlp_parts, lambda m, b, f: (m, b, f, {"storage": "sqlite:////nonexistent/dir/study.db"}),
        autoprec.OptionError, ["/nonexistent/dir/study.db"]),
    "optimizer_not_callable": (
        _mlp_parts, lambda m, b, f: (m, b, f, {"optimizer": 5}), autoprec.OptionError, ["optimizer=5"]),
    "batches_not_iterable": (
        _mlp_parts, lambda m, b, f: (m, b, f, {"batches": 5}), autoprec.BatchError, ["batches=5"]),
}



def _run(make, edit):
    model, batch, loss = make()
    counted = Counted(model)
    loss_fn = counted_loss(loss)
    target, batch, loss_fn2, kwargs = edit(model, batch, loss_fn)
    if loss_fn2 is not loss_fn:
        loss_fn2 = counted_loss(loss_fn2)
    kw = {**QUICK, **kwargs}
    with pytest.raises(Exception) as info:
        autoprec.tune(target, batch, loss_fn2, **kw)
    return info.value, counted.calls[0], loss_fn2.calls[0], _n_batches(kwargs)


def _n_batches(kwargs) -> int:
    extra = kwargs.get("batches")
    return 1 + (len(extra) if isinstance(extra, list) else 0)


def _check(exc, model_calls, loss_calls, expected, fragments, n_batches=1):
    assert isinstance(exc, expected), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    # raised before any long work: at most the batch check's forward per batch (and the loss on it), plus one
    assert model_calls <= n_batches + 1 and loss_calls <= n_batches + 1, (model_calls, loss_calls)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_raises_a_clear_error_early(case):
    """The documented error class, a message naming the bad value and the fix, and no long work first."""
    make, edit, expected, fragments = CASES[case]
    exc, model_calls, loss_calls, n_batches = _run(make, edit)
    _check(exc, model_calls, loss_calls, expected, fragments, n_batches)


def test_model_nan_is_reported_as_broken_in_fp32_not_as_a_precision_problem():
    """A model NaN in FP32 is the model's fault: ModelError, before a single 16-bit pass."""
    make, edit, _expected, _fragments = CASES["model_nan_in_fp32"]
    exc, model_calls, loss_calls, _ = _run(make, edit)
    assert type(exc) is autoprec.ModelError and isinstance(exc, ValueError)
    assert model_calls == 1 and loss_calls == 1
    assert "FP32" in str(exc) and "fp16" not in str(exc).lower() and "bf16" not in str(exc).lower()


# ---------------------------------------------------------------------------
# policies and models that do not fit
# ---------------------------------------------------------------------------


def _mlp_policy(model: nn.Module) -> Policy:
    return Policy(layers={"fc1": LayerEntry("bf16"), "fc2": LayerEntry("bf16"), "fc3": LayerEntry("fp32")},
                  modules=module_signatures(model))


class Renamed(nn.Module):
    """MLP with fc1 wider, fc2 renamed to hidden, and an extra fc4."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(128, 512)
        self.hidden = nn.Linear(512, 256)
        self.fc3 = nn.Linear(256, 10)
        self.fc4 = nn.Linear(10, 10)

    def forward(self, x):
        return self.fc4(self.fc3(self.hidden(self.fc1(x))))


def test_policy_for_another_model_lists_missing_extra_and_changed_at_once(tmp_path):
    """One message names every difference: the missing layer, the extra ones, and the changed shapes."""
    _mlp_policy(MLP()).save(tmp_path / "p.json")
    policy = autoprec.load(tmp_path / "p.json")
    with pytest.raises(autoprec.PolicyError) as info:
        policy.apply(Renamed())
    message = str(info.value)
    assert "missing from the model: fc2" in message
    assert "not in the policy: fc4, hidden" in message
    assert "changed: fc1 (Linear[weight(256, 128),bias(256,)] -> Linear[weight(512, 128),bias(512,)])" in message
    assert "autoprec.tune" in message


def test_policy_naming_a_layer_the_model_lacks_raises(tmp_path):
    """An edited policy whose key matches no layer of the model (a typo) is a PolicyError naming the key."""
    policy = _mlp_policy(MLP())
    data = policy.to_dict()
    data["layers"]["fcl"] = data["layers"].pop("fc1")  # 'fcl' for 'fc1'
    edited = Policy.from_dict(data)
    with pytest.raises(autoprec.PolicyError, match="fcl"):
        edited.apply(MLP()).remove()


def test_hand_written_policy_naming_unknown_layers_raises():
    """A hand-written policy (no module signatures) that names layers the model lacks is refused too."""
    with pytest.raises(autoprec.PolicyError, match="encoder.fc"):
        Policy(layers={"encoder.fc": LayerEntry("bf16")}).apply(MLP()).remove()


def test_policy_with_unknown_precision_is_refused_when_built(tmp_path):
    """A Policy built in code with precision 'fp8' is refused at once, not at the next forward or load."""
    with pytest.raises(autoprec.PolicyError, match="fp8"):
        Policy(layers={"fc1": LayerEntry("fp8")}, modules=module_signatures(MLP()))


@pytest.mark.parametrize("how", ["apply", "autocast"])
def test_policy_applied_to_a_non_module_raises_a_clear_error(how):
    """Applying a policy to something that is not an nn.Module is an AutoprecError naming what it got."""
    policy = _mlp_policy(MLP())
    with pytest.raises(autoprec.AutoprecError, match="str"):
        if how == "apply":
            policy.apply("model")
        else:
            with policy.autocast("model"):
                pass


@pytest.mark.parametrize("path", [None, 987654], ids=["none", "bad_fd"])
def test_load_with_a_non_path_raises_policy_error(path):
    """load() of something that is not a path is a PolicyError naming it."""
    with pytest.raises(autoprec.PolicyError):
        autoprec.load(path)


class _TwoInputs(nn.Module):
    """Takes (x, ids); with ``mask``, NaN entries of x become 0 before the linear layer."""

    def __init__(self, mask: bool) -> None:
        super().__init__()
        self.fc, self.mask = nn.Linear(8, 2), mask

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nan_to_num(x) if self.mask else x) + ids.float().unsqueeze(1)


def _nan_and_ids() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    return x, torch.arange(4)


def test_a_model_that_masks_non_finite_inputs_is_accepted():
    """A batch with NaN that the model masks gives a finite loss: check_batch lets it through."""
    from autoprec.core import check_batch

    assert check_batch(_TwoInputs(mask=True), _nan_and_ids(), None, 0) is None


def test_integer_tensors_are_never_named_non_finite():
    """Only floating tensors are checked: the integer ids beside a NaN tensor are not in the message."""
    with pytest.raises(autoprec.BatchError) as info:
        autoprec.tune(_TwoInputs(mask=False), _nan_and_ids(), progress=False, verify_steps=0)
    assert "(batch[0]: 1 NaN and 0 Inf of 32 values)" in str(info.value)
    assert "batch[1]" not in str(info.value)
