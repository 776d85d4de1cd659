"""The package's module graph: no import cycles (function-level imports included), no private names
imported from another module, no module shadowed by a function of the same name."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

import pycompress as pc

PACKAGE_DIR = pathlib.Path(pc.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = ("pycompress",) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE_DIR.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, tree: ast.Module) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) of every pycompress import in the module, at any depth."""
    is_package = name in MODULES and (PACKAGE_DIR / pathlib.Path(*name.split(".")[1:]) / "__init__.py").exists()
    here = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "pycompress"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{anchor}.{base}" if base else anchor
            if base.split(".")[0] == "pycompress":
                out += [(base, a.name, node.lineno) for a in node.names]
    return out


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, tree in MODULES.items():
        for module, imported, _ in _imports(name, tree):
            submodule = f"{module}.{imported}" if imported else None
            target = submodule if submodule in MODULES or imported == "_C" else module  # _C: the extension
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def test_every_module_is_found():
    assert {"pycompress", "pycompress.conversion", "pycompress.io", "pycompress.nn", "pycompress.prune.api"} <= set(MODULES)


def test_no_import_cycles():
    graph = _edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _private_module_allowed(importer: str, module: str) -> bool:
    """A private module (``pycompress._native``, ``pycompress.ops._library``) serves the package it sits in."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_"):
            owner = ".".join(parts[:i])
            if not (importer == owner or importer.startswith(owner + ".")):
                return False
    return True


def test_no_private_imports_across_modules():
    bad = []
    for name, tree in MODULES.items():
        for module, imported, line in _imports(name, tree):
            submodule = f"{module}.{imported}" if imported else None
            if imported is not None and imported.startswith("_") and submodule not in MODULES and imported != "_C":
                bad.append(f"{name}:{line} imports private {imported} from {module}")
            target = submodule if submodule in MODULES or imported == "_C" else module
            if not _private_module_allowed(name, target):
                bad.append(f"{name}:{line} imports {target}, private to another package")
    assert bad == []


@pytest.mark.parametrize("function, module", [("convert", "conversion"), ("verify", "verification"),
                                              ("summary", "summaries"), ("export_program", "programs"),
                                              ("load_program", "programs"), ("compile_program", "programs"),
                                              ("load_compiled_program", "programs"), ("program_info", "programs")])
def test_public_functions_do_not_shadow_their_modules(function, module):
    assert callable(getattr(pc, function)) and not isinstance(getattr(pc, function), type(pc))
    assert importlib.import_module(f"pycompress.{module}").__dict__[function] is getattr(pc, function)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"pycompress.{function}")
