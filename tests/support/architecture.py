"""The package's shape, read from its source with `ast` (nothing is imported): the import graph, import
cycles, private names used across modules, file and function lengths.

`tests/test_architecture.py` holds the package to its rules with it; run this file to print the figures:

    .venv/bin/python tests/support/architecture.py
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "lorakit"
SOURCE = Path(__file__).resolve().parents[2] / "src" / PACKAGE


@dataclass
class Module:
    name: str  # dotted, e.g. "lorakit.train.loop"
    path: Path
    tree: ast.Module
    imports: set[str] = field(default_factory=set)  # lorakit modules it imports, at any depth of the file
    private_imports: list[str] = field(default_factory=list)  # "lorakit.x._name" imported from another module


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.name.split(".")
    if module.path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def read_package(root: Path = SOURCE) -> dict[str, Module]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        module = Module(_module_name(path), path, ast.parse(path.read_text(), str(path)))
        modules[module.name] = module
    for module in modules.values():
        _collect_imports(module, modules)
    return modules


def _collect_imports(module: Module, modules: dict[str, Module]) -> None:
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            module.imports |= {a.name for a in node.names if a.name in modules and a.name != module.name}
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            if not target.startswith(PACKAGE):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                dependency = submodule if submodule in modules else target
                if dependency != module.name:
                    module.imports.add(dependency)
                    module.imports |= _parents_run_first(module.name, dependency, modules)
                if alias.name.startswith("_") and not alias.name.startswith("__") and dependency != module.name:
                    module.private_imports.append(f"{target}.{alias.name}")


def _parents_run_first(importer: str, dependency: str, modules: dict[str, Module]) -> set[str]:
    """Importing `lorakit.quant.linear` runs `lorakit.quant`'s `__init__` first, unless the importer lives inside
    `lorakit.quant` (then that package is already being imported): those packages are dependencies too."""
    parts = dependency.split(".")
    parents = {".".join(parts[:i]) for i in range(2, len(parts))}
    return {p for p in parents if p in modules and not importer.startswith(p + ".") and p != importer}


def import_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), function-level imports included.

    A package importing its own submodules (`lorakit.quant` → `lorakit.quant.nf4`) is an edge like any
    other; a submodule importing its parent package back is what makes such a group a cycle.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for dep in sorted(modules[name].imports):
            if dep not in index:
                visit(dep)
                low[name] = min(low[name], low[dep])
            elif dep in stack:
                low[name] = min(low[name], index[dep])
        if low[name] == index[name]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == name:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(modules)))
    for name in sorted(modules):
        if name not in index:
            visit(name)
    return cycles


def _private_definitions(modules: dict[str, Module]) -> dict[str, set[str]]:
    """Private function, method and class names by the module that defines them."""
    defined: dict[str, set[str]] = {}
    for module in modules.values():
        for node in ast.walk(module.tree):
            is_definition = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if is_definition and node.name.startswith("_") and not node.name.startswith("__"):
                defined.setdefault(node.name, set()).add(module.name)
    return defined


def foreign_private_calls(modules: dict[str, Module]) -> list[str]:
    """`obj._name(...)` where `obj` is not self/cls/super() and `_name` is defined only in other modules."""
    defined = _private_definitions(modules)
    found = []
    for module in modules.values():
        for node in ast.walk(module.tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner, attr = node.func.value, node.func.attr
            if attr not in defined or module.name in defined[attr]:
                continue
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            found.append(f"{module.name}:{node.lineno} calls .{attr}() of {sorted(defined[attr])}")
    return found


def functions(modules: dict[str, Module]) -> Iterator[tuple[str, int]]:
    """("lorakit/x.py:name", length in lines) of every function and method."""
    for module in modules.values():
        where = module.path.relative_to(SOURCE.parent)
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{where}:{node.name}", (node.end_lineno or node.lineno) - node.lineno + 1


def file_lengths(modules: dict[str, Module]) -> dict[str, int]:
    return {str(m.path.relative_to(SOURCE.parent)): len(m.path.read_text().splitlines()) for m in modules.values()}


def report(modules: dict[str, Module]) -> str:
    lengths = file_lengths(modules)
    longest = sorted(functions(modules), key=lambda item: -item[1])
    lines = [
        f"modules: {len(modules)}, lines: {sum(lengths.values())}",
        f"files over 400 lines: {sorted((n, k) for k, n in lengths.items() if n > 400)}",
        f"functions over 60 lines: {[f for f in longest if f[1] > 60]}",
        f"longest functions: {longest[:5]}",
        f"import cycles: {import_cycles(modules)}",
        f"private imports across modules: {[p for m in modules.values() for p in m.private_imports]}",
        f"private calls across modules: {foreign_private_calls(modules)}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(read_package()))
