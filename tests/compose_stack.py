"""A compose project of the checkout on a real Docker engine, for the tests that run
`docker compose up` (tests/test_compose_docker.py, tests/test_compose_s3_docker.py): its
commands, host ports of its own, and what it measured.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for

PROJECT_DIR = Path(__file__).resolve().parents[1]
# The app's compose file with only the data sets mounted (deploy/compose.datasets.yml).
COMPOSE_FILES = [PROJECT_DIR / "docker-compose.yml",
                 PROJECT_DIR / "deploy" / "compose.datasets.yml"]
API_KEY = "compose-test-key"
FLOWER = ("admin", "compose-test-flower")
COUNTED = ("movie", "rating", "ingest_batch", "feedback", "model_version")
BOOTSTRAP_TIMEOUT = 1800.0  # build-free: the pipeline on ml-100k through the workers


def engine_problem() -> str | None:
    """Why no Docker engine with Compose v2 can run here, or None when one can."""
    if shutil.which("docker") is None:
        return "no `docker` command"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine answers `docker info`"
    version = subprocess.run(["docker", "compose", "version", "--short"],
                             capture_output=True, text=True)
    if version.returncode != 0 or not version.stdout.strip().lstrip("v").startswith("2"):
        return "no Docker Compose v2 (`docker compose`)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    """The compose project: its commands, its host ports and what it measured."""

    project: str
    files: list[Path]
    env: dict[str, str]
    ports: dict[str, int]
    config: pytest.Config
    figures: dict[str, float] = field(default_factory=dict)

    def argv(self, *args: str) -> list[str]:
        """The `docker compose` command line of this project with `args`."""
        files = [arg for path in self.files for arg in ("-f", str(path))]
        return ["docker", "compose", "-p", self.project, *files, *args]

    def compose(self, *args: str, timeout: float = 600, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.argv(*args), env=self.env, cwd=PROJECT_DIR,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            pytest.fail(f"`docker compose {' '.join(args)}` exited {result.returncode}:\n"
                        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def sql(self, query: str) -> str:
        """One value from the compose Postgres, through psql in its container."""
        return self.compose("exec", "-T", "postgres", "psql", "-U", "recsys", "-d", "recsys",
                            "-tAc", query).stdout.strip()

    def counts(self) -> dict[str, int]:
        return {table: int(self.sql(f"SELECT count(*) FROM {table}")) for table in COUNTED}

    def champion(self) -> dict[str, Any] | None:
        """The list serve answers for user 1 once a champion is loaded, else None."""
        try:
            response = httpx.get(self.url("serve", "/recommendations/1"), timeout=10)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def services(self) -> list[dict[str, Any]]:
        """`docker compose ps --all` as dicts (Compose prints one JSON object per line)."""
        text = self.compose("ps", "--all", "--format", "json").stdout.strip()
        if text.startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def note(self, name: str, seconds: float) -> None:
        self.figures[name] = round(seconds, 1)
        self.say({"compose_test": name, "seconds": round(seconds, 1)})

    def say(self, line: dict[str, Any]) -> None:
        """A JSON line on the terminal, past pytest's output capture."""
        with self.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
            self.config.pluginmanager.getplugin("terminalreporter").write_line(json.dumps(line))

    def up_until_champion(self, figure: str = "up_to_champion") -> dict[str, Any]:
        started = time.monotonic()
        self.compose("up", "-d", timeout=900)

        def served_or_failed() -> dict[str, Any] | None:
            served = self.champion()
            if served is None:
                failed = [s for s in self.services() if s["Service"] in {"migrate", "bootstrap"}
                          and s["State"] == "exited" and s["ExitCode"] != 0]
                if failed:
                    logs = self.compose("logs", "--tail", "120", failed[0]["Service"]).stdout
                    pytest.fail(f"{failed[0]['Service']} exited {failed[0]['ExitCode']}:\n{logs}")
            return served

        served = wait_for(served_or_failed, timeout=BOOTSTRAP_TIMEOUT, interval=5,
                          what="serve to answer with a champion (bootstrap: `docker compose "
                          f"-p {self.project} logs bootstrap`)")
        self.note(figure, time.monotonic() - started)
        return served


def images(project: str) -> dict[str, str]:
    """The tags of the two images a project builds: its own, so that two checkouts or two
    test modules on one engine neither share containers nor retag each other's images."""
    return {"RECSYS_IMAGE": f"{project}:full", "RECSYS_SERVE_IMAGE": f"{project}:serve"}


@contextmanager
def compose_stack(ml100k: Path, config: pytest.Config, project: str,
                  files: list[Path]) -> Iterator[Stack]:
    """A built compose project on host ports of its own; `down -v` after, whatever happens."""
    problem = engine_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"{problem}: CI runs the Docker tests (.ci/run installs the engine "
                        "and Compose v2, then builds the stand-in images)", pytrace=False)
        pytest.skip(f"{problem}; these tests need a Docker engine")
    ports = {"serve": free_port(), "flower": free_port(), "prometheus": free_port(),
             "rabbitmq": free_port()}
    env = {**os.environ,
           "SERVE_PORT": str(ports["serve"]), "FLOWER_PORT": str(ports["flower"]),
           "PROMETHEUS_PORT": str(ports["prometheus"]),
           "RABBITMQ_MANAGEMENT_PORT": str(ports["rabbitmq"]),
           "DATASETS_DIR": str(ml100k.parent), "DATA_SOURCE": f"/datasets/{ml100k.name}",
           "API_KEY": API_KEY, "FLOWER_USER": FLOWER[0], "FLOWER_PASSWORD": FLOWER[1],
           **images(project)}
    # Compose gives shell variables precedence over the checkout's .env; drop the other
    # names .env.example lists, so a developer's .env cannot reach this project's ports.
    for name in ("POSTGRES_PORT", "RABBITMQ_PORT", "REDIS_PORT"):
        env.pop(name, None)
    ports["dashboard"] = free_port()  # published on loopback like the other UIs
    env["DASHBOARD_PORT"] = str(ports["dashboard"])
    stack = Stack(project=project, files=files, env=env, ports=ports, config=config)
    stack.compose("down", "-v", "--remove-orphans", timeout=300)  # a previous run's leftovers
    try:
        started = time.monotonic()
        stack.compose("build", timeout=3000)
        stack.note("build", time.monotonic() - started)
        for tag in images(project).values():  # the size `docker image ls` shows (decimal MB)
            size = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", tag],
                                  capture_output=True, text=True, check=True).stdout
            stack.say({"compose_test": "image", "tag": tag, "mb": round(int(size) / 1e6)})
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", timeout=300, check=False)
        stack.say({"compose_test": "figures", **stack.figures})
