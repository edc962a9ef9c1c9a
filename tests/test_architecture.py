"""The package's structural rules (README, "Contributing"), checked on its source so that they stay true:
no import cycle, no private name used across modules, one place that knows the LoRA layer classes and one
that dispatches on a method name, short files and functions."""

from __future__ import annotations

import ast

import pytest

from support.architecture import (
    SOURCE,
    file_lengths,
    foreign_private_calls,
    functions,
    import_cycles,
    read_package,
)

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
LORA_LAYER_CLASSES = {"LoraLinear", "LoraConv1D", "LoraConv2d", "LoraEmbedding", "LoraQuantLinear"}


@pytest.fixture(scope="module")
def modules():
    return read_package()


def test_the_reader_sees_the_whole_package(modules):
    assert len(modules) == len(list(SOURCE.rglob("*.py")))
    assert {"lorakit", "lorakit.inject", "lorakit.layers", "lorakit.train.loop"} <= set(modules)
    assert "lorakit.layers" in modules["lorakit.inject"].imports  # a relative import resolved to its module


def test_no_import_cycles(modules):
    assert import_cycles(modules) == []


def test_no_private_names_imported_across_modules(modules):
    assert [p for m in modules.values() for p in m.private_imports] == []


def test_no_private_methods_called_across_modules(modules):
    assert foreign_private_calls(modules) == []


def test_files_are_short(modules):
    assert {path: n for path, n in file_lengths(modules).items() if n > MAX_FILE_LINES} == {}


def test_functions_are_short(modules):
    assert [(name, n) for name, n in functions(modules) if n > MAX_FUNCTION_LINES] == []


def test_only_layers_knows_the_lora_layer_classes(modules):
    """Code outside `lorakit.layers` works through the `LoraLayer` interface, never a concrete layer type."""
    users = {
        module.name: sorted({n.id for n in ast.walk(module.tree) if isinstance(n, ast.Name)} & LORA_LAYER_CLASSES)
        for module in modules.values()
        if not module.name.startswith("lorakit.layers") and module.name != "lorakit"
    }
    assert {name: used for name, used in users.items() if used} == {}


def test_only_the_method_registry_compares_method_names(modules):
    """`method == "lora"`-style branches belong to `lorakit.methods`, the one place that dispatches on them."""
    branches = []
    for module in modules.values():
        if module.name.startswith("lorakit.methods"):
            continue
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if "lora" in constants:
                    branches.append(f"{module.name}:{node.lineno}")
    assert branches == []


def test_test_files_have_unique_names():
    """Test folders are not packages, so pytest imports test files by their bare name: two files with the same
    name in different folders stop the whole run at collection."""
    names = [path.name for path in (SOURCE.parents[1] / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
