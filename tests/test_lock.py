"""The lock files cover pyproject's dependencies, so the venv and the image cannot drift."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = Path(__file__).resolve().parents[1]
LOCK = PROJECT / "requirements.lock"
TEST_LOCK = PROJECT / "requirements-test.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def pins(path: Path) -> dict[str, str]:
    """name -> exact version, for every `name==version` line of a lock file."""
    found = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"{path.name} line {number} is not an exact pin: {line!r}"
        found[canonicalize_name(match[1])] = match[2]
    return found


def requirements(group: str | None = None) -> list[Requirement]:
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    listed = project["optional-dependencies"][group] if group else project["dependencies"]
    return [Requirement(text) for text in listed]


def test_runtime_lock_pins_every_dependency_within_pyproject_bounds() -> None:
    locked = pins(LOCK)
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{LOCK.name} lacks {requirement.name}: run `make lock`"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={locked[name]}, outside pyproject's "
            f"{requirement.specifier}: run `make lock`")


def test_test_lock_adds_the_test_extras_at_the_runtime_versions() -> None:
    runtime, test = pins(LOCK), pins(TEST_LOCK)
    differ = {name: (version, test.get(name)) for name, version in runtime.items()
              if test.get(name) != version}
    assert not differ, f"{TEST_LOCK.name} disagrees with {LOCK.name}: {differ}"
    for requirement in requirements("test"):
        name = canonicalize_name(requirement.name)
        assert name in test, f"{TEST_LOCK.name} lacks {requirement.name}: run `make lock`"
        assert requirement.specifier.contains(test[name], prereleases=True), name


def test_make_and_the_image_install_the_locks() -> None:
    makefile = (PROJECT / "Makefile").read_text()
    assert "pip install --quiet -r $(TEST_LOCK)" in makefile
    assert "pip install --quiet --no-deps -e ." in makefile
    dockerfile = (PROJECT / "Dockerfile").read_text()
    assert "COPY requirements.lock " in dockerfile
    assert "install --no-deps -r /tmp/requirements.lock" in dockerfile
