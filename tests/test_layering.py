"""The product apart from its harness: nothing under xfgate/ imports the test harness
(xfgate_lab), the benchmarks or the tests, and no operator-facing command carries a test hook."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import xfgate
from xfgate.cli import build_parser

PRODUCT = Path(xfgate.__file__).parent
HARNESS_PACKAGES = ("xfgate_lab", "bench", "tests")
TEST_HOOKS = ("owners-json", "owners_json", "lab")


def imported_modules(tree: ast.Module) -> list[str]:
    """Every module an `import` or `from ... import` names, at any depth (lazy imports too).
    Relative imports stay inside the package and are skipped."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def harness_imports(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in imported_modules(tree):
            if name.split(".")[0] in HARNESS_PACKAGES:
                found.append(f"{path.relative_to(root.parent)}: imports {name}")
    return found


def parser_names(parser: argparse.ArgumentParser, path: str = "xfgate") -> list[str]:
    """Every subcommand and option of the parser tree, as 'xfgate run --block-uid'."""
    names = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                names.append(f"{path} {name}")
                names += parser_names(sub, f"{path} {name}")
        else:
            names += [f"{path} {opt}" for opt in action.option_strings]
    return names


def is_test_hook(name: str) -> bool:
    last = name.rsplit(" ", 1)[-1].lstrip("-")
    return last in TEST_HOOKS


def test_the_product_never_imports_the_harness() -> None:
    modules = list(PRODUCT.rglob("*.py"))
    assert len(modules) > 20  # the walk really sees the product
    assert harness_imports(PRODUCT) == []


def test_the_check_sees_a_lazy_import() -> None:
    tree = ast.parse("def f():\n    from xfgate_lab.static_source import StaticOwnerSource\n")
    assert imported_modules(tree) == ["xfgate_lab.static_source"]


def test_no_product_command_carries_a_test_hook() -> None:
    names = parser_names(build_parser())
    assert "xfgate run" in names and "xfgate run --block-uid" in names  # the walk sees options
    assert [n for n in names if is_test_hook(n)] == []
