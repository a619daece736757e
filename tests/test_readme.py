"""The README is the contract with a new user: its first commands and its settings table."""

from __future__ import annotations

from pathlib import Path

from shared.settings import setting_names

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_first_commands_are_demo_and_test() -> None:
    first_block = README.split("```sh", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == [
        "make demo", "make test"]


def test_every_setting_is_documented() -> None:
    missing = sorted(name for name in setting_names() if f"`{name}`" not in README)
    assert not missing, f"settings missing from the README: {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci.splitlines()[-1]
