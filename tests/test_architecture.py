"""The code's shape, held in CI: the layer contract, a clean type check, and the size limits of classes and functions.

The contract lives in pyproject.toml (`[tool.importlinter]`); README's "Architecture" section draws it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"
MAX_CLASS_LINES = 200
MAX_FUNCTION_LINES = 40


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(600)
def test_every_layer_imports_only_the_layers_below_it() -> None:
    pytest.importorskip("importlinter", reason="import-linter is in the [test] extra")
    result = _run("-c", "import sys; from importlinter.cli import lint_imports_command; "
                        "sys.argv = ['lint-imports', '--no-cache']; lint_imports_command()")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.timeout(600)
def test_mypy_finds_no_error_in_the_gateway() -> None:
    pytest.importorskip("mypy", reason="mypy is in the [test] extra")
    result = _run("-m", "mypy", "gateway")
    assert result.returncode == 0, result.stdout + result.stderr


def _definitions() -> list[tuple[str, ast.AST, int]]:
    """Every class and function of the package, with where it is and how many lines it spans."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                found.append((where, node, node.end_lineno - node.lineno + 1))
    return found


def test_no_class_is_over_200_lines() -> None:
    over = [f"{where} ({lines} lines)" for where, node, lines in _definitions()
            if isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES]
    assert not over, "split these classes by job:\n" + "\n".join(over)


def test_no_function_is_over_40_lines() -> None:
    over = [f"{where} ({lines} lines)" for where, node, lines in _definitions()
            if not isinstance(node, ast.ClassDef) and lines > MAX_FUNCTION_LINES]
    assert not over, "split these functions:\n" + "\n".join(over)
