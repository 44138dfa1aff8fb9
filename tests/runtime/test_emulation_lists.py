"""The CUDA emulation's op lists against the installed torch's: its dispatcher, its header and its test lists."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from autoprec.core._ops import AUTOCAST_GAPS, fallback_cuda_lists, torch_cuda_lists
from autoprec.runtime import rule_of
from tests.helpers import unit_out

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32


class _Reached(Exception):
    """The op arrived below autocast: the probe stops it there."""


class _Probe(torch.Tensor):
    """A tensor on a CUDA device without storage (a CPU build makes it too): CUDA autocast acts on it, and what
    reaches its ``__torch_dispatch__`` (the casts, then the op with the arguments autocast passed) is recorded."""

    @staticmethod
    def __new__(cls, dtype: torch.dtype, events: list):
        t = torch.Tensor._make_wrapper_subclass(cls, (2, 2), dtype=dtype, device="cuda")
        t.events = events
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            args[0].events.append(kwargs["dtype"])
            return _Probe(kwargs["dtype"], args[0].events)
        tensor = next(a for a in pytree.tree_leaves(args) if isinstance(a, _Probe))
        tensor.events.append((str(func), [a for a in pytree.tree_leaves((args, kwargs)) if not isinstance(a, _Probe)]))
        raise _Reached


_VALUES = {"int": 1, "float": 1.0, "number": 1, "Optional[number]": 1, "bool": False, "str": "fro",
           "List[int]": [1], "Optional[List[int]]": [1], "List[Optional[Tensor]]": [None]}


def _events(op, dtypes: list[torch.dtype], enabled: bool) -> list:
    """What reaches the probes when ``op`` runs on its required arguments, floating ones of ``dtypes`` in turn."""
    events: list = []
    dtypes_left, args = iter(dtypes), []
    for a in op._schema.arguments:
        if a.has_default_value() or a.kwarg_only:
            break
        kind = str(a.type)
        if kind in ("Tensor", "Optional[Tensor]"):
            args.append(_Probe(next(dtypes_left), events))
        elif kind == "List[Tensor]":
            args.append([_Probe(next(dtypes_left), events), _Probe(next(dtypes_left), events)])
        else:
            args.append(_VALUES[kind])
    torch._C.set_autocast_enabled("cuda", enabled)
    try:
        op(*args)
    except _Reached:
        pass
    except RuntimeError as e:  # after autocast acted: a kernel a CPU build lacks (softmax with a dtype)
        if "unsafe to autocast" in str(e):
            return ["refuse"]
        events.append(str(e)[:60])
    return events


def _dispatcher_rule(name: str) -> str | None:
    """How the installed torch's CUDA autocast kernel for an aten op treats its inputs, seen on probes."""
    packet, _, overload = name.split("::")[1].partition(".")
    op = getattr(getattr(torch.ops.aten, packet), overload or "default")
    acts = {f"{k}": _events(op, d, True) != _events(op, d, False)
            for k, d in (("B", [F16] * 6), ("C", [F16] + [F32] * 5))}
    on = _events(op, [F32] * 6, True)
    if on == ["refuse"]:
        return "refuse"
    if F16 in on:
        return "lower"  # FP32 inputs cast down
    if acts["B"]:
        return "fp32"  # FP16 inputs cast up (or a dtype=float passed)
    return "promote" if acts["C"] else None  # mixed inputs made one


@pytest.fixture()
def cuda_autocast():
    enabled, dtype = torch._C.is_autocast_enabled("cuda"), torch._C.get_autocast_dtype("cuda")
    torch._C.set_autocast_dtype("cuda", F16)
    yield
    torch._C.set_autocast_enabled("cuda", enabled)
    torch._C.set_autocast_dtype("cuda", dtype)


def _cuda_registrations() -> list[str]:
    return sorted(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA"))


@pytest.mark.filterwarnings("ignore")
def test_every_op_cuda_autocast_registers_has_the_rule_its_kernel_applies(cuda_autocast):
    """Each aten op the installed torch's dispatcher has a CUDA autocast kernel for: the emulation's rule for it is
    what that kernel does to probe tensors (bilinear, which a region casts itself, aside)."""
    names = _cuda_registrations()
    assert len(names) > 100 and "aten::mm" in names
    seen = {n: _dispatcher_rule(n) for n in names if n.split("::")[1].split(".")[0] not in AUTOCAST_GAPS}
    assert {n: rule_of(n.split("::")[1].split(".")[0]) for n in seen} == seen


def test_the_fallback_lists_are_the_installed_headers():
    """Where torch ships no ATen/autocast_mode.h the fallback stands in: for the installed torch it is the header."""
    header = torch_cuda_lists()
    assert header is not None, "torch ships include/ATen/autocast_mode.h in its wheels"
    assert fallback_cuda_lists(importlib.metadata.version("torch")) == header


def test_a_header_without_the_lists_gives_none(tmp_path):
    (tmp_path / "autocast_mode.h").write_text("#define AT_FORALL_FP32(_) _(exp)\n")
    assert torch_cuda_lists(str(tmp_path / "autocast_mode.h")) is None
    assert torch_cuda_lists(str(tmp_path / "missing.h")) is None


def test_rms_norm_joined_the_fp32_list_in_torch_2_12():
    assert "rms_norm" not in fallback_cuda_lists("2.11.0")["fp32"]
    assert "rms_norm" in fallback_cuda_lists("2.12.0+cu126")["fp32"]


def _torch_test_lists() -> dict[str, list[str]]:
    """The op names of torch's own CUDA autocast test lists (``AutocastTestLists``; read, as importing it needs
    expecttest and building it a GPU)."""
    path = Path(torch.__file__).parent / "testing/_internal/autocast_test_lists.py"
    cls = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)
               and n.name == "AutocastTestLists")
    lists = {}
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute) and isinstance(node.value,
                                                                                                       ast.List):
            lists[node.targets[0].attr] = [e.elts[0].value for e in node.value.elts if isinstance(e, ast.Tuple)]
    return lists


_TEST_LIST_RULES = {"torch_fp16": "lower", "nn_fp16": "lower", "linalg_fp16": "lower", "methods_fp16": "lower",
                    "torch_fp32": "fp32", "nn_fp32": "fp32", "methods_fp32": "fp32",
                    "torch_need_autocast_promote": "promote", "banned": "refuse"}


def test_rules_are_torchs_autocast_test_lists():
    """Every op torch's CUDA autocast tests name (torch functions, methods, F and linalg) has that list's rule."""
    lists = _torch_test_lists()
    expected = {name: rule for key, rule in _TEST_LIST_RULES.items() for name in lists[key]
                if name not in AUTOCAST_GAPS}
    assert len(expected) > 80
    assert {name: rule_of(name) for name in expected} == expected


# -- the ops the issue names, run in an emulated 16-bit region ----------------------------------
def test_vdot_promotes():
    """vdot of a BF16 activation and an FP32 vector runs in FP32, as CUDA autocast promotes it (the CPU raises)."""
    w = torch.randn(8)
    x = torch.randn(8)
    out = unit_out(lambda t: torch.vdot(t, w), x, "bf16", "cuda")
    assert out.dtype == F32
    torch.testing.assert_close(out, torch.vdot(x.to(B16).float(), w))


@pytest.mark.parametrize("name", ["nuclear_norm", "frobenius_norm"])
def test_matrix_norms_run_in_fp32(name):
    """nuclear_norm and frobenius_norm in a BF16 region compute in FP32 on the rounded input, as on CUDA."""
    fn = (lambda t: torch.nuclear_norm(t)) if name == "nuclear_norm" else (lambda t: torch.frobenius_norm(t, (0, 1)))
    x = torch.randn(4, 4)
    out = unit_out(fn, x, "bf16", "cuda")
    assert out.dtype == F32
    torch.testing.assert_close(out, fn(x.to(B16).float()))


@pytest.mark.filterwarnings("ignore")
def test_rms_norm_runs_as_the_installed_torchs_cuda_autocast(cuda_autocast):
    """F.rms_norm in a BF16 region: FP32 where the installed torch's CUDA autocast computes it in FP32 (2.12 on),
    BF16 where it runs in the dtype that arrives."""
    lifted = _dispatcher_rule("aten::rms_norm") == "fp32"
    assert lifted == (tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 12))
    out = unit_out(lambda t: F.rms_norm(t, (8,)), torch.randn(2, 8), "bf16", "cuda")
    assert out.dtype == (F32 if lifted else B16)
