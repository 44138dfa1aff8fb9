"""The public surface is curated and documented; errors share one root."""

from __future__ import annotations

import inspect

import pytest

import autoprec


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
                                 autoprec.PolicyError, autoprec.ProfileError, autoprec.FormatError],
                         ids=lambda c: c.__name__)
def test_errors_share_one_root_and_their_builtin(cls):
    """Every autoprec error is an AutoprecError and the builtin it is."""
    assert issubclass(cls, autoprec.AutoprecError)
    assert issubclass(cls, ValueError) or issubclass(cls, RuntimeError)


def test_every_doctest_shows_expected_output():
    """A docstring example that prints nothing checks nothing but that it runs: each one shows a result."""
    import doctest
    import importlib
    import pkgutil

    finder, silent, seen = doctest.DocTestFinder(), [], set()
    for info in pkgutil.walk_packages(autoprec.__path__, "autoprec."):
        if info.name.endswith("__main__"):
            continue
        for test in finder.find(importlib.import_module(info.name)):
            if test.examples and test.name not in seen:
                seen.add(test.name)
                if not any(ex.want.strip() for ex in test.examples):
                    silent.append(test.name)
    assert len(seen) > 60 and silent == []
