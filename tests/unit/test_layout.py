"""The repository's layering: the benchmark and the dev servers import nothing from tests/,
and the ledger and Redis cores import nothing from Dagster.

``bench/`` runs outside pytest and ``devservers/`` is shared by the test session and the
benchmark, so neither may depend on the test suite's modules (issue 11, item 8). Under
``resources/`` only the two Dagster resources import Dagster (issue 11, item 2); that the
core really runs without it is proven in ``tests/services/test_dagster_free_core.py``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INDEPENDENT_OF_TESTS = ("bench", "devservers")
# The only modules of resources/ that may import Dagster: the resources' configuration.
DAGSTER_RESOURCES = ("resources/ledger/metrics_store.py", "resources/live/redis_counters.py")


def _is_tests(module: str) -> bool:
    return module == "tests" or module.startswith("tests.")


def _is_dagster(module: str) -> bool:
    return module.split(".")[0] == "dagster" or module.startswith("dagster_")


def imports_of_tests(source: str, wanted: Callable[[str], bool] = _is_tests) -> list[str]:
    """Modules that ``source`` imports and ``wanted`` picks (default: of ``tests``):
    ``import``/``from`` statements at any depth, and ``importlib.import_module`` /
    ``__import__`` calls with a literal name."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if wanted(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and wanted(node.module):
                found.append(node.module)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                name in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and wanted(first.value)
            ):
                found.append(first.value)
    return found


@pytest.mark.parametrize("package", INDEPENDENT_OF_TESTS)
def test_package_imports_nothing_from_tests(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    offenders = {
        str(path.relative_to(REPO)): found
        for path in files
        if (found := imports_of_tests(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}, f"{package}/ must not import from tests/: {offenders}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from tests.servers import free_port", ["tests.servers"]),
        ("import tests.flowkit as kit", ["tests.flowkit"]),
        ("def f():\n    from tests import httpfixture", ["tests"]),
        ("importlib.import_module('tests.flowkit')", ["tests.flowkit"]),
        ("from devservers import start_redis\nimport testsuite\nfrom . import tests", []),
    ],
)
def test_imports_of_tests_finds_every_form(source: str, expected: list[str]) -> None:
    assert imports_of_tests(source) == expected


def test_only_the_two_resources_import_dagster_under_resources() -> None:
    files = sorted((REPO / "resources").rglob("*.py"))
    importing = {
        str(path.relative_to(REPO))
        for path in files
        if imports_of_tests(path.read_text(encoding="utf-8"), _is_dagster)
    }
    assert importing == set(DAGSTER_RESOURCES), (
        "resources/ is the Dagster-free core: put Dagster code in the resource modules"
        f" {DAGSTER_RESOURCES} or in flow_assets/, not in {importing - set(DAGSTER_RESOURCES)}"
    )


def test_dagster_imports_are_found_in_every_form() -> None:
    source = "import dagster as dg\nfrom dagster._core import x\nimport dagsterish\n"
    assert imports_of_tests(source, _is_dagster) == ["dagster", "dagster._core"]
