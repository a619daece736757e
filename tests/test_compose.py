"""docker-compose.yml runs real `recsys` commands with real settings (checked without Docker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml
from dotenv import dotenv_values
from typer.testing import CliRunner

from recsys.cli import app as cli_app
from recsys.stack import (
    app_services,
    compose_services,
    depends_on,
    interpolated_names,
    is_one_shot,
    service_command,
)
from shared.celery_app import ServiceQueue
from shared.settings import Settings, setting_names

PROJECT = Path(__file__).resolve().parents[1]
COMPOSE = PROJECT / "docker-compose.yml"
PORTS_OVERRIDE = PROJECT / "deploy" / "compose.ports.yml"
DATASETS_OVERRIDE = PROJECT / "deploy" / "compose.datasets.yml"
S3_OVERRIDE = PROJECT / "deploy" / "compose.s3.yml"
ENV_EXAMPLE = PROJECT / ".env.example"
DOCKERFILE = PROJECT / "Dockerfile"
INFRA = {"postgres", "rabbitmq", "redis"}
# Names an app service may set in `environment:` that are not product settings. Empty on
# purpose: anything else the image needs (PYTHONUNBUFFERED, ...) belongs in the Dockerfile.
NON_SETTING_ENV: set[str] = set()


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    # Interpolated from an empty environment: the defaults written in the file.
    return compose_services(COMPOSE, env={})


@pytest.fixture(scope="module")
def apps(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return app_services(services=services)


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


# The app services that run the Dockerfile's `serve` target (no training libraries).
SERVE_IMAGE_SERVICES = {"serve", "flower", "beat", "policy", "migrate"}


def test_app_services_run_the_project_images(services: dict, apps: dict) -> None:
    assert INFRA <= set(services)
    assert {"migrate", "ingest"} <= set(apps)
    assert not INFRA & set(apps)
    for name, spec in apps.items():
        assert spec["build"]["dockerfile"] == "Dockerfile", name
    targets = {name: spec["build"].get("target") for name, spec in apps.items()}
    assert {name for name, target in targets.items() if target} == SERVE_IMAGE_SERVICES
    assert set(targets.values()) == {None, "serve"}
    # One tag per target: the full image (the Dockerfile's last stage) and the serve one.
    images = {target: {apps[name]["image"] for name in apps if targets[name] == target}
              for target in (None, "serve")}
    assert all(len(tags) == 1 for tags in images.values()), images
    assert images[None] != images["serve"]


def test_every_long_running_service_has_a_healthcheck(services: dict) -> None:
    """`docker compose ps` shows the health of every service that keeps running."""
    running = [name for name, spec in services.items() if not is_one_shot(spec)]
    assert {"serve", "flower", "beat", "policy", "prometheus", "dashboard"} <= set(running)
    for name in running:
        test = (services[name].get("healthcheck") or {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name} has no healthcheck"


def app_service_names() -> list[str]:
    return sorted(app_services(COMPOSE, env={}))


@pytest.mark.parametrize("name", app_service_names())
def test_command_is_a_real_recsys_subcommand(name: str, apps: dict) -> None:
    args = service_command(apps[name])
    assert args, f"service {name} has no command"
    result = CliRunner().invoke(cli_app, [*args, "--help"])
    assert result.exit_code == 0, f"`recsys {' '.join(args)} --help` failed:\n{result.output}"

    # --help exits before arguments are checked, so also parse them as click would.
    group = typer.main.get_command(cli_app)
    context = click.Context(group, info_name="recsys")
    command: click.Command = group
    rest = list(args)
    while isinstance(command, click.Group) and rest:
        sub = command.get_command(context, rest[0])
        assert sub is not None, f"service {name}: `{rest[0]}` is no recsys subcommand"
        command, rest = sub, rest[1:]
    assert not isinstance(command, click.Group), f"service {name}: {args} names a group"
    parsed = command.make_context(command.name or "", rest, parent=context)
    if command.name == "worker":
        assert parsed.params["service"] in {q.value for q in ServiceQueue}, name


@pytest.mark.parametrize("name", app_service_names())
def test_environment_sets_only_settings(name: str, apps: dict) -> None:
    names = set(apps[name].get("environment") or {})
    unknown = names - setting_names() - NON_SETTING_ENV
    assert not unknown, f"service {name} sets {sorted(unknown)}, which no setting reads"


@pytest.mark.parametrize("name", app_service_names())
def test_environment_defaults_are_valid_settings(name: str, apps: dict) -> None:
    env = apps[name]["environment"]
    settings = Settings(**{key.lower(): value for key, value in env.items()})
    assert settings.database_url.startswith("postgresql")
    assert settings.broker_url.startswith("amqp://")
    assert settings.redis_url.startswith("redis://")
    assert not settings.embedded


def test_every_interpolated_variable_is_in_env_example() -> None:
    example = dotenv_values(ENV_EXAMPLE)
    interpolated = set().union(*(interpolated_names(path) for path in (
        COMPOSE, PORTS_OVERRIDE, DATASETS_OVERRIDE, S3_OVERRIDE)))
    missing = interpolated - set(example)
    assert not missing, f".env.example lacks {sorted(missing)}"
    # And nothing stale: each entry is interpolated by compose or read as a setting.
    stale = set(example) - interpolated - setting_names()
    assert not stale, f".env.example lists {sorted(stale)}, which nothing reads"


def test_servers_have_healthchecks(services: dict) -> None:
    expected = {"postgres": "pg_isready",
                "rabbitmq": "rabbitmq-diagnostics -q check_port_connectivity",
                "redis": "redis-cli ping"}
    for name, probe in expected.items():
        check = services[name].get("healthcheck")
        assert check, f"{name} has no healthcheck"
        test = check["test"]
        text = " ".join(test[1:]) if isinstance(test, list) else test
        assert probe in text, f"{name} healthcheck {test!r} does not run {probe}"


def test_server_images_and_volumes(services: dict) -> None:
    assert services["postgres"]["image"] == "postgres:16"
    assert services["rabbitmq"]["image"] == "rabbitmq:3-management"
    assert services["redis"]["image"] == "redis:7"
    declared = set(raw_compose()["volumes"])
    for name in ("postgres", "rabbitmq"):
        assert any(str(v).split(":")[0] in declared for v in services[name]["volumes"]), name


def test_migrate_is_one_shot(apps: dict) -> None:
    migrate = apps["migrate"]
    assert raw_compose()["services"]["migrate"]["restart"] == "no"  # a string, not YAML false
    assert is_one_shot(migrate)
    assert service_command(migrate) == ["db", "upgrade"]
    assert depends_on(migrate) == {"postgres": "service_healthy"}


def test_ingest_worker_waits_for_migrate_and_servers(apps: dict) -> None:
    ingest = apps["ingest"]
    assert service_command(ingest) == ["worker", "ingest"]
    assert not is_one_shot(ingest)
    needs = depends_on(ingest)
    assert needs["migrate"] == "service_completed_successfully"
    assert needs["rabbitmq"] == "service_healthy"


def test_every_worker_waits_for_migrate(apps: dict) -> None:
    workers = [name for name, spec in apps.items() if service_command(spec)[:1] == ["worker"]]
    assert "ingest" in workers
    for name in workers:
        assert depends_on(apps[name]).get("migrate") == "service_completed_successfully", name


@pytest.mark.parametrize("name", app_service_names())
def test_paths_are_volumes(name: str, apps: dict) -> None:
    spec = apps[name]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in spec["volumes"]}
    declared = set(raw_compose()["volumes"])
    assert spec["environment"]["DATA_PATH"] in mounts
    model_volume = mounts.get(spec["environment"]["MODEL_PATH"])
    assert model_volume in declared, "MODEL_PATH must be a named volume"


def test_dockerfile_builds_the_recsys_image() -> None:
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines()]
    # The full image is the last stage (what a plain `docker build` makes), on the
    # runtime stage that the serve target shares.
    assert "FROM python:3.11-slim AS runtime" in lines
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) >= 2 and stages[-1] == "FROM runtime", stages
    assert "FROM runtime AS serve" in stages
    runtime = text.split("\nFROM runtime\n")[-1]
    # The compiler and headers stay in the build stage; the runtime has the shared libraries.
    assert "libcholmod3" in runtime and "libgomp1" in runtime
    assert "gcc" not in runtime and "-dev" not in runtime
    # Dependencies (the lock) before the code, so a code change keeps their layers cached.
    assert text.index("COPY requirements.lock") < text.index("COPY shared")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}, "the image must run as a non-root user"
    assert 'ENTRYPOINT ["recsys"]' in lines


def test_only_the_uis_are_published_and_on_loopback(services: dict) -> None:
    """Postgres, AMQP and Redis stay inside the compose network unless the ports override
    is asked for; every published port, UI or override, is bound to 127.0.0.1."""
    published = {name: [str(p) for p in spec.get("ports") or []]
                 for name, spec in services.items() if spec.get("ports")}
    targets = {name: {p.split(":")[-1] for p in ports} for name, ports in published.items()}
    assert targets == {"rabbitmq": {"15672"}, "serve": {"8000"}, "flower": {"5555"},
                       "dashboard": {"8050"}, "prometheus": {"9090"}}
    override = yaml.safe_load(PORTS_OVERRIDE.read_text())["services"]
    assert {name: [p.split(":")[-1] for p in spec["ports"]] for name, spec in override.items()
            } == {"postgres": ["5432"], "rabbitmq": ["5672"], "redis": ["6379"]}
    for ports in [*published.values(), *(s["ports"] for s in override.values())]:
        assert all(p.startswith("127.0.0.1:") for p in ports), ports


def test_bootstrap_is_one_shot_after_the_workers(apps: dict) -> None:
    bootstrap = apps["bootstrap"]
    assert raw_compose()["services"]["bootstrap"]["restart"] == "no"
    assert is_one_shot(bootstrap) and service_command(bootstrap) == ["bootstrap"]
    needs = depends_on(bootstrap)
    assert needs["migrate"] == "service_completed_successfully"
    assert needs["rabbitmq"] == needs["redis"] == "service_healthy"
    workers = {name for name, spec in apps.items() if service_command(spec)[:1] == ["worker"]}
    assert workers == {q.value for q in ServiceQueue}
    assert all(needs[name] == "service_started" for name in workers)
    # Serve does not wait for it: it answers 503 until model.promoted brings the champion.
    assert "bootstrap" not in depends_on(apps["serve"])


def test_datasets_override_mounts_into_the_ingest_worker() -> None:
    override = yaml.safe_load(DATASETS_OVERRIDE.read_text())["services"]
    assert list(override) == ["ingest"]
    (mount,) = override["ingest"]["volumes"]
    assert mount.startswith("${DATASETS_DIR:?") and mount.endswith(":/datasets:ro")


def test_s3_override_points_every_app_service_at_the_object_store(apps: dict) -> None:
    override = compose_services(S3_OVERRIDE, env={})
    assert override["s3"]["command"][0] == "mini" and "healthcheck" in override["s3"]
    assert set(override) == set(apps) | {"s3"}
    for name in apps:
        environment = override[name]["environment"]
        assert environment["S3_ENDPOINT_URL"] == "http://s3:8333", name
        assert "s3" in depends_on(override[name]), name
        settings = Settings(**{k.lower(): v for k, v in environment.items()})
        assert settings.model_path == "s3://recsys/artifacts"
    # Without the override nothing changes: the `models` volume stays the store.
    assert all(apps[name]["environment"]["MODEL_PATH"] == "/models" for name in apps)


def test_every_worker_pings_its_own_node(apps: dict) -> None:
    """`docker compose ps` shows every worker's health: a Celery ping of its node name."""
    workers = {name: spec for name, spec in apps.items() if service_command(spec)[:1] == ["worker"]}
    assert set(workers) == {q.value for q in ServiceQueue}
    for name, spec in workers.items():
        kind, command = spec["healthcheck"]["test"]
        assert kind == "CMD-SHELL", name
        # Interpolation leaves `$HOSTNAME` for the container's shell: the node is
        # `<queue>@<hostname>`, as `recsys worker` names it.
        assert "celery -A shared.celery_app:app inspect ping" in command, name
        assert f"-d {name}@$HOSTNAME" in command, name


def test_stop_lets_a_worker_finish_its_task(apps: dict) -> None:
    """SIGTERM reaches Celery (init) for a warm shutdown, with time to finish the task."""
    for name, spec in apps.items():
        if service_command(spec)[:1] == ["worker"]:
            assert spec["init"] is True, name
            minutes = spec["stop_grace_period"]
            assert minutes.endswith("m") and int(minutes[:-1]) >= 1, (name, minutes)
