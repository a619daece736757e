"""The serve image (the Dockerfile's `serve` target) leaves out the distributions that
deploy/serve-image-excludes.txt names: what its services run must not need them.

Checked without Docker: in a fresh interpreter that cannot import the excluded
distributions' modules, the commands that compose runs from that image import, and the
migration runs for real.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from packaging.utils import canonicalize_name

from tests.test_lock import LOCK, pins

PROJECT = Path(__file__).resolve().parents[1]
EXCLUDES = PROJECT / "deploy" / "serve-image-excludes.txt"
# What `recsys serve`, `recsys flower` (Celery's flower command on shared.celery_app),
# `recsys beat` and `recsys policy` import before they take requests or events.
SERVE_IMAGE_MODULES = ["recsys.cli", "recsys.cli_loop", "services.serve.app",
                       "services.eval.policy", "services.eval.ab", "shared.celery_app",
                       "flower.command", "celery.apps.beat"]

# Run as `python -c`: argv[1] the blocked top-level modules (JSON), then what to import;
# `--recsys ARGS...` runs the command line instead.
BLOCKED_RUN = """
import importlib, importlib.abc, json, sys

blocked = set(json.loads(sys.argv[1]))


class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is not in the serve image")


sys.meta_path.insert(0, Blocked())
if sys.argv[2] == "--recsys":
    from recsys.cli import main

    sys.argv = ["recsys", *sys.argv[3:]]
    main()
else:
    for module in sys.argv[2:]:
        importlib.import_module(module)
"""


def excluded() -> list[str]:
    lines = [line.strip() for line in EXCLUDES.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def blocked_modules() -> list[str]:
    """The top-level modules the excluded distributions install."""
    names = {canonicalize_name(name) for name in excluded()}
    return sorted(module for module, dists in importlib.metadata.packages_distributions().items()
                  if any(canonicalize_name(dist) in names for dist in dists))


def run_blocked(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, json.dumps(blocked_modules()),
                           *args], cwd=PROJECT, capture_output=True, text=True, timeout=300,
                          env=env)


def test_every_excluded_distribution_is_locked() -> None:
    locked = pins(LOCK)
    unknown = [name for name in excluded() if canonicalize_name(name) not in locked]
    assert not unknown, f"{EXCLUDES.name} names {unknown}, which {LOCK.name} does not pin"
    # The libraries the exclusion is for are really kept out.
    assert {"sansa", "numba", "llvmlite", "pyarrow", "matplotlib"} <= set(blocked_modules())


def test_the_serve_image_services_import_without_the_excluded_distributions() -> None:
    result = run_blocked(*SERVE_IMAGE_MODULES)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_blocking_is_real() -> None:
    result = run_blocked("services.train.tasks")
    assert result.returncode != 0 and "is not in the serve image" in result.stderr


def test_the_migration_runs_without_the_excluded_distributions(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env.update(DATA_PATH=str(tmp_path / "data"), MODEL_PATH=str(tmp_path / "models"),
               DATABASE_URL="")
    result = run_blocked("--recsys", "db", "upgrade", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
