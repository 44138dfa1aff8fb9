"""The public surface is curated and documented; errors share one root."""

from __future__ import annotations

import inspect
import os
import pathlib
import subprocess
import sys
import textwrap

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


def _fresh(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter that imports this checkout's autoprec."""
    root = str(pathlib.Path(autoprec.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_integrations_are_attributes_imported_on_first_use():
    """After `import autoprec`, autoprec.integrations.hf/.lightning work, and neither framework loads before."""
    res = _fresh("""
        import sys, autoprec
        assert not {"transformers", "lightning"} & set(sys.modules), "a framework was imported eagerly"
        policy = autoprec.Policy(layers={})
        print(type(autoprec.integrations.hf.AutoprecCallback(policy)).__name__)
        print(type(autoprec.integrations.lightning.AutoprecPrecision(policy)).__name__)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["AutoprecCallback", "AutoprecPrecision"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        autoprec.integrations.nothing  # noqa: B018
    assert not hasattr(autoprec, "nothing")


@pytest.mark.parametrize("module,framework,extra", [("hf", "transformers", "hf"), ("lightning", "lightning", "lightning")],
                         ids=["hf", "lightning"])
def test_a_missing_framework_names_the_extra_to_install(module, framework, extra):
    """Without the framework, the integration's ImportError says which autoprec extra installs it."""
    res = _fresh(f"""
        import sys, autoprec
        sys.modules[{framework!r}] = None   # as if it were not installed
        try:
            autoprec.integrations.{module}
        except ImportError as exc:
            print(exc)
    """)
    assert res.returncode == 0, res.stderr
    assert f"autoprec.integrations.{module} needs" in res.stdout
    assert f'pip install "autoprec[{extra}]"' in res.stdout
