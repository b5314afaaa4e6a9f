"""The house's walls (docs/architecture.md), read from the source with ast: which room may import
which, that the decision path never imports a web framework, and that no module or function
grows past the size a reader can hold without a reason written beside it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"
WEB = ("fastapi", "starlette", "uvicorn")
FACES = ("service.api", "service.app", "service.cli")

MODULE_LINES = 400
FUNCTION_LINES = 60
REASON = "# long:"  # on the line above a long def (or its decorators), or in a long module's head


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            # `from service import x` imports the module service.x
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _room(room: str) -> list[Path]:
    where = SERVICE / room
    return sorted(where.rglob("*.py")) if where.is_dir() else [SERVICE / f"{room}.py"]


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _offenders(rooms: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for room in rooms
        for path in _room(room)
        for name in _imports(path)
        if _within(name, forbidden)
    ]


def test_the_rooms_exist() -> None:
    for room in ("decision", "guards", "ops", "cli", "api", "backends", "evidence"):
        assert (SERVICE / room / "__init__.py").is_file(), room


CORE = ("decision", "guards", "backends", "evidence", "ops", "schemas", "settings", "errors")


def test_the_decision_path_never_imports_a_web_framework_or_a_face() -> None:
    assert _offenders(CORE, WEB + FACES) == []


def test_guards_depend_on_nothing_but_the_schemas() -> None:
    project = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _room("guards")
        for name in _imports(path)
        if _within(name, ("service",)) and not _within(name, ("service.schemas", "service.guards"))
    ]
    assert project == []


def test_backends_know_nothing_of_decisions_or_guards() -> None:
    assert _offenders(("backends",), ("service.decision", "service.guards")) == []


def test_operations_never_reach_into_the_decision() -> None:
    assert _offenders(("ops", "evidence"), ("service.decision", "service.backends")) == []


def _python_files() -> list[Path]:
    return sorted([*SERVICE.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])


def test_the_walls_catch_an_offender(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from fastapi import FastAPI\nfrom service import app\n")
    assert set(_imports(bad)) >= {"fastapi", "service.app"}


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_readable(path: Path) -> None:
    source = path.read_text("utf-8")
    lines = source.splitlines()
    long: list[str] = []
    if len(lines) > MODULE_LINES and not any(REASON in line for line in lines[:20]):
        long.append(f"module: {len(lines)} lines")
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        if length > FUNCTION_LINES and REASON not in lines[first - 2]:
            long.append(f"{node.name} (line {node.lineno}): {length} lines")
    assert long == [], f"over {MODULE_LINES}/{FUNCTION_LINES} lines with no {REASON!r} reason"
