"""The examples run (reduced sizes), and the public surface is curated and documented."""

from __future__ import annotations

import importlib.util
import inspect
import pathlib

import pytest

import autoprec

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs(capsys):
    """examples/quickstart.py tunes, reports, saves, loads and trains."""
    policy = _load("quickstart").main(small=True)
    out = capsys.readouterr().out
    assert "# autoprec policy report" in out and "step 2: loss" in out
    assert policy.verification is not None and policy.verification.passed


def test_public_surface_is_sorted_and_documented():
    """__all__ is sorted, and every public callable has a docstring with an example."""
    assert list(autoprec.__all__) == sorted(autoprec.__all__)
    for name in autoprec.__all__:
        obj = getattr(autoprec, name)
        doc = inspect.getdoc(obj) or ""
        assert doc, name
        if inspect.isfunction(obj):
            assert ">>>" in doc, f"{name} has no runnable example"
    for name, member in inspect.getmembers(autoprec.Policy, inspect.isfunction):
        if not name.startswith("_"):
            assert ">>>" in (inspect.getdoc(member) or ""), f"Policy.{name} has no runnable example"


@pytest.mark.parametrize("cls", [autoprec.BatchError, autoprec.ModelError, autoprec.OptionError,
                                 autoprec.PolicyError, autoprec.FormatError], ids=lambda c: c.__name__)
def test_errors_share_one_root_and_their_builtin(cls):
    """Every autoprec error is an AutoprecError and the builtin it is."""
    assert issubclass(cls, autoprec.AutoprecError)
    assert issubclass(cls, ValueError) or issubclass(cls, RuntimeError)
