"""The layout's direction: recsys/ (the command line and the local process runner) composes
the services; a service never imports another service nor recsys; `shared/` imports neither.

Every import counts, at module level or inside a function, absolute or relative, and so
does a string naming a module (`importlib.import_module("services.x")`, a uvicorn factory
path): a lazy import is still an import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists())
# A string that reads as a dotted path into one of the project's packages (counted only
# when that module exists: "recsys.events" is the exchange's name, not a module).
MODULE_PATH = re.compile(r"^(?:recsys|services|shared)(?:\.\w+)+(?::\w+)?$")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str, root: Path) -> bool:
    where = root.joinpath(*dotted.split("."))
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module the file imports or names as a dotted path, relative imports resolved."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            dotted = node.value.split(":", 1)[0]
            if MODULE_PATH.match(node.value) and is_module(dotted, root):
                names.add(dotted)
    return names


def offenders(package: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for path in package.rglob("*.py")
        for name in imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


def test_the_checker_sees_lazy_relative_and_string_imports(tmp_path: Path) -> None:
    # A checker that finds nothing proves nothing: each form of import must be caught.
    probe = tmp_path / "services" / "serve" / "probe.py"
    probe.parent.mkdir(parents=True)
    (tmp_path / "services" / "eval").mkdir()
    (tmp_path / "services" / "eval" / "tasks.py").touch()
    probe.write_text("import shared.db\n"
                     "def f():\n    from services.train import tasks\n"
                     "from .. import registry\n"
                     "from ..ingest.readers import RatingsReader\n"
                     "FACTORY = 'services.eval.tasks:app'\n"
                     "EXCHANGE = 'services.events'\n")
    assert imported_modules(probe, tmp_path) >= {
        "shared.db", "services.train", "services.train.tasks", "services.registry",
        "services.ingest.readers", "services.eval.tasks"}
    assert "services.events" not in imported_modules(probe, tmp_path)
    assert "shared.celery_app" in imported_modules(ROOT / "services" / "train" / "tasks.py")


@pytest.mark.parametrize("service", SERVICES)
def test_service_imports_no_other_service_nor_the_command_line(service: str) -> None:
    others = tuple(f"services.{name}" for name in SERVICES if name != service)
    assert not offenders(ROOT / "services" / service, (*others, "recsys")), \
        "a service reaches another by task name or event"


def test_shared_imports_no_service_nor_the_command_line() -> None:
    assert not offenders(ROOT / "shared", ("services", "recsys")), \
        "shared/ is the library underneath the services; recsys/ composes them"
