"""The shim's public surface: every public module says what it exports
(``__all__``), docs/architecture.md lists the modules, and nothing outside
the shim (the pipeline, tasks.py) imports anything else: not ``_internal``,
not a name a module does not export."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import terminai_shim

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def _public_modules() -> list[str]:
    found = []
    for info in pkgutil.walk_packages(terminai_shim.__path__, "terminai_shim."):
        if "._internal" in info.name or info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        if not info.ispkg:
            found.append(info.name)
    return sorted(found)


def test_every_public_module_says_what_it_exports():
    for name in _public_modules():
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{name} has no __all__"
        assert [n for n in exported if not hasattr(module, n)] == [], name


def test_the_architecture_lists_every_public_module():
    doc = (REPO / "docs/architecture.md").read_text()
    line = next(line for line in doc.splitlines() if line.startswith("| `shim/terminai_shim/` |"))
    listed = set(re.findall(r"`([a-z0-9_.]+)`", line))
    for name in _public_modules():
        short = name.removeprefix("terminai_shim.")
        assert short in listed or short.split(".")[0] in listed, f"docs/architecture.md does not list {short}"


def _imports_from_outside() -> list[tuple[str, int, str, list[str]]]:
    files = [REPO / "tasks.py", *sorted((REPO / "release").rglob("*.py"))]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("terminai_shim"):
                found.append((str(path.relative_to(REPO)), node.lineno, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("terminai_shim"):
                        found.append((str(path.relative_to(REPO)), node.lineno, alias.name, []))
    return found


def test_nothing_outside_the_shim_imports_what_it_does_not_export():
    seen = _imports_from_outside()
    assert seen, "the pipeline imports the shim's layout at least: the scan found nothing"
    wrong = []
    for where, line, module, names in seen:
        if "_internal" in module.split("."):
            wrong.append(f"{where}:{line}: {module} is the shim's detail")
            continue
        imported = importlib.import_module(module)
        for name in names:
            if importlib.util.find_spec(f"{module}.{name}") if hasattr(imported, "__path__") else False:
                continue  # a submodule
            if name not in getattr(imported, "__all__", ()):
                wrong.append(f"{where}:{line}: {module}.{name} is not in its __all__")
    assert wrong == []
