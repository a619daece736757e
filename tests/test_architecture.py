"""The layout's rule: a service never imports another service; `shared/` imports none."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists())


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("service", SERVICES)
def test_service_imports_no_other_service(service: str) -> None:
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / "services" / service).rglob("*.py")
        for name in imported_modules(path)
        if name.startswith("services.") and not name.startswith(f"services.{service}")
    }
    assert not offenders, sorted(offenders)


def test_shared_imports_no_service_except_the_cli_and_task_registry() -> None:
    # The CLI and the Celery app's task import are the entry points that assemble services.
    allowed = {"cli.py", "cli_batch.py", "cli_loop.py", "cli_models.py", "cli_stack.py",
               "celery_app.py"}
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / "shared").rglob("*.py") if path.name not in allowed
        for name in imported_modules(path) if name.startswith("services")
    }
    assert not offenders, sorted(offenders)
