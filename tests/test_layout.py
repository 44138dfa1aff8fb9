"""The package's shape: the public surface pinned, stage sub-packages that re-export their public names, and no
import cycle among the package's modules."""

from __future__ import annotations

import ast
import importlib
import pathlib

import autoprec
from autoprec.cli import _parser

ROOT = pathlib.Path(autoprec.__file__).parent

PUBLIC = ["AutoprecError", "AutoprecWarning", "BatchError", "DeviceProfile", "DeviceWarning", "FormatError", "Guard",
          "GuardError", "GuardEvent", "GuardWarning", "Handle", "HeldOut", "LayerEntry", "ModelError", "OptionError",
          "Policy", "PolicyError", "ProfileError", "RankError", "ScalerSettings", "StepSpeed", "Verification",
          "VerificationError", "VerificationWarning", "calibrate", "fsdp_plan", "guard", "load", "load_profile", "tune"]

#: the stage sub-packages, in the order data flows (a package imports only from those before it; see ARCHITECTURE.md)
STAGES = ["core", "policy", "runtime", "trace", "distributed", "probe", "device", "search", "report", "verify",
          "tuning", "watch", "integrations"]


def test_the_public_surface_is_pinned():
    """``autoprec.__all__`` and the CLI's commands are exactly these: a change to either is a change of the API."""
    assert autoprec.__all__ == PUBLIC
    assert all(callable(getattr(autoprec, n)) for n in PUBLIC)
    commands = next(a for a in _parser()._actions if a.dest == "command" or getattr(a, "choices", None))
    assert sorted(commands.choices) == ["calibrate", "diff", "report", "tune"]


def test_autoprec_tune_is_the_function():
    """``autoprec.tune`` is the function, not a module it shadows; the orchestration lives in ``autoprec.tuning``."""
    assert callable(autoprec.tune) and autoprec.tune.__module__ == "autoprec.tuning._tune"
    assert not (ROOT / "tune.py").exists()


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports_at_import_time(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The package's modules ``name`` imports when it is imported: module-level statements, including those under
    ``if TYPE_CHECKING:`` (a type-only cycle is still a cycle a reader must untangle); imports inside functions are
    deferred on purpose (``Policy.apply`` reaching the runtime) and do not count."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names]
                found.update(s for s in subs if s in modules)
                if target in modules and not all(s in modules for s in subs):
                    found.add(target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)
    visit(tree.body)
    found.discard(name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := walk(w)):
                return found
        state[v] = 2
        stack.pop()
        return None
    for v in sorted(graph):
        if v not in state and (found := walk(v)):
            return found
    return None


def test_no_import_cycle_among_the_modules():
    """Module by module, the imports that run at import time form no cycle."""
    modules = _modules()
    graph = {m: _imports_at_import_time(m, p, modules) for m, p in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_stage_packages_import_only_earlier_stages():
    """Package by package the same graph has no cycle either, and follows the stage order of ARCHITECTURE.md."""
    modules = _modules()
    order = {p: i for i, p in enumerate(STAGES)}
    late = []
    for m, p in modules.items():
        parts = m.split(".")
        if len(parts) < 2 or parts[1] not in order:
            continue
        for dep in _imports_at_import_time(m, p, modules):
            dp = dep.split(".")
            if len(dp) >= 2 and dp[1] in order and order[dp[1]] > order[parts[1]]:
                late.append(f"{m} imports {dep}")
    assert not late, late
    assert sorted(STAGES) == sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())


def test_each_stage_package_re_exports_its_public_names():
    """A sub-package's ``__init__`` only re-exports (no code of its own), its private modules are ``_x.py``, and
    every name in its ``__all__`` is importable from it."""
    for pkg in STAGES:
        init = ROOT / pkg / "__init__.py"
        tree = ast.parse(init.read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        if pkg != "integrations":  # integrations imports its frameworks on first use (a module __getattr__)
            assert all(isinstance(n, (ast.ImportFrom, ast.Assign)) for n in body), pkg
        assert all(p.name.startswith("_") for p in (ROOT / pkg).glob("*.py")) or pkg == "integrations", pkg
        module = importlib.import_module(f"autoprec.{pkg}")
        assert all(hasattr(module, n) for n in module.__all__), pkg
        assert module.__doc__, pkg


def test_no_string_registry_behind_the_policys_methods():
    """``Policy.apply``/``autocast``/``report`` import their stage explicitly: no registry filled by import side
    effects, so they work whichever modules were imported first."""
    source = (ROOT / "policy" / "_policy.py").read_text()
    assert "register_stage" not in source and "_STAGES" not in source


def test_the_tests_mirror_the_packages():
    """Each stage package has its tests in ``tests/<package>/``; no test module imports another test module (shared
    helpers live in ``tests/models.py``, ``tests/helpers.py`` and the like)."""
    tests = pathlib.Path(__file__).resolve().parent
    have = {p.name for p in tests.iterdir() if (p / "__init__.py").exists()}
    assert set(STAGES) <= have, sorted(set(STAGES) - have)
    assert have <= set(STAGES), sorted(have - set(STAGES))
    for path in tests.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = node.module
            elif isinstance(node, ast.Import):
                module = node.names[0].name
            else:
                continue
            own = ".".join(path.relative_to(tests.parent).with_suffix("").parts)
            assert not (module.split(".")[-1].startswith("test_") and module != own), f"{path.name} imports {module}"


def test_every_dotted_reference_in_the_code_and_docs_resolves():
    """Each ``autoprec.<package>.<name>`` the docstrings, tests, benchmarks and READMEs mention exists: a move
    that leaves a reference behind fails here, not in a reader's hands."""
    import re

    repo = ROOT.parent
    import dataclasses

    packages = [p for p in STAGES if p != "integrations"]  # its frameworks load on first use; a test asks for a missing one
    pattern = re.compile(r"autoprec\.(?:" + "|".join(packages) + r")(?:\.[A-Za-z_]\w*)+")
    files = [*ROOT.rglob("*.py"), *(repo / "tests").rglob("*.py"), *(repo / "benchmarks").glob("*.py"),
             *(repo / "examples").glob("*.py"), repo / "README.md", repo / "benchmarks" / "README.md"]
    missing = set()
    for path in files:
        if not path.exists():
            continue
        for ref in set(pattern.findall(path.read_text())):
            parts = ref.split(".")
            obj = importlib.import_module(".".join(parts[:2]))
            for i, part in enumerate(parts[2:], start=2):
                if hasattr(obj, part):
                    obj = getattr(obj, part)
                    continue
                if dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}:
                    break  # a field with a default factory: no class attribute, but documented
                try:
                    obj = importlib.import_module(".".join(parts[: i + 1]))
                except ImportError:
                    missing.add(f"{path.relative_to(repo)}: {ref}")
                    break
    assert not missing, sorted(missing)


def test_the_readme_layout_table_names_every_module():
    """README's "How the code is laid out" names each stage package and each of its modules: the table stays the
    map of the code."""
    readme = (ROOT.parent / "README.md").read_text()
    section = readme.split("## How the code is laid out", 1)[1]
    for pkg in STAGES:
        assert f"`{pkg}/`" in section, pkg
        for path in (ROOT / pkg).glob("*.py"):
            if path.name != "__init__.py":
                assert f"`{path.stem}`" in section, f"{pkg}/{path.name}"
