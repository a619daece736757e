"""Hosts that share no disk: the workers and serve in network namespaces of their own.

Each "host" is a network namespace with one veth pair (iproute2) and a private mount
namespace in which a fresh tmpfs hides every other host's directory: its DATA_PATH and
artifact cache start empty and nothing it writes is seen elsewhere. It reaches Postgres,
RabbitMQ, Redis and the S3 gateway only over its veth address (socat forwards each port
there). One host runs the ingest, transform and train workers, another the registry and
eval workers and the pipeline command, a third serve: serve answers with the champion
and a promotion hot-swaps it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.celery_app import ServiceQueue, app
from tests.conftest import purge_service_queues, recsys_command, wait_for
from tests.servers import PrivateSeaweedFS, free_port

API_KEY = "hosts-test-key"


class Host:
    """A network namespace joined to this one by a veth pair, `10.231.<n>.1` here and
    `10.231.<n>.2` inside, whose processes each see only their own tmpfs under `root`."""

    def __init__(self, name: str, subnet: int, root: Path, tag: str, logs: Path) -> None:
        self.name, self.root, self.logs = name, root, logs
        self.namespace = f"rs-{tag}-{name}"
        self.outer, self.inner = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
        self.veth = f"rs{tag}{subnet}"
        self.home = root / name  # exists only inside this host's tmpfs
        self.processes: list[subprocess.Popen[bytes]] = []

    def up(self) -> None:
        for argv in (["ip", "netns", "add", self.namespace],
                     ["ip", "link", "add", f"{self.veth}h", "type", "veth", "peer", "name",
                      f"{self.veth}n"],
                     ["ip", "link", "set", f"{self.veth}n", "netns", self.namespace],
                     ["ip", "addr", "add", f"{self.outer}/24", "dev", f"{self.veth}h"],
                     ["ip", "link", "set", f"{self.veth}h", "up"],
                     ["ip", "netns", "exec", self.namespace, "ip", "addr", "add",
                      f"{self.inner}/24", "dev", f"{self.veth}n"],
                     ["ip", "netns", "exec", self.namespace, "ip", "link", "set",
                      f"{self.veth}n", "up"],
                     ["ip", "netns", "exec", self.namespace, "ip", "link", "set", "lo", "up"]):
            subprocess.run(argv, check=True, capture_output=True, timeout=30)

    def forward(self, port: int) -> None:
        """Loopback's `port` reachable from inside at `outer:port`, and only there."""
        self.processes.append(subprocess.Popen(
            ["socat", f"TCP-LISTEN:{port},bind={self.outer},fork,reuseaddr",
             f"TCP:127.0.0.1:{port}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True))

    def argv(self, *command: str) -> list[str]:
        script = 'mount -t tmpfs tmpfs "$1" && mkdir -p "$2" && cd "$2" && shift 2 && exec "$@"'
        return ["ip", "netns", "exec", self.namespace, "unshare", "--mount",
                "--propagation", "private", "sh", "-c", script, "sh", str(self.root),
                str(self.home), *command]

    def start(self, env: dict[str, str], *command: str) -> subprocess.Popen[bytes]:
        # The log is this side's file, written through the descriptor the host inherits.
        with (self.logs / f"{self.name}-{len(self.processes)}.log").open("wb") as log:
            process = subprocess.Popen(self.argv(*command), env=env, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    def run(self, env: dict[str, str], *command: str, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*command), env=env, capture_output=True, text=True,
                              timeout=timeout)

    def down(self) -> None:
        # Newest first: the workers and serve stop while their forwarded ports still work.
        for process in reversed(self.processes):
            if process.poll() is None:  # the main process only: a worker's warm shutdown
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", f"{self.veth}h"], capture_output=True, timeout=30)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[dict[str, Host]]:
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root (ip netns add)", pytrace=False)
    tag, base = uuid.uuid4().hex[:5], 16 + uuid.uuid4().int % 200
    root = Path(tempfile.mkdtemp(prefix="recsys-hosts-"))
    made = {name: Host(name, base + i, root, tag, tmp_path)
            for i, name in enumerate(("trainer", "registrar", "server"))}
    try:
        for host in made.values():
            host.up()
        yield made
    finally:
        for host in made.values():
            host.down()
        leftovers = list(root.iterdir())
        root.rmdir()
        # Whatever the hosts wrote lived in their own tmpfs: none of it reached this disk.
        assert leftovers == []


def there(url: str, host: Host) -> str:
    return url.replace("127.0.0.1", host.outer)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_workers_and_serve_on_hosts_without_a_shared_disk(
        hosts: dict[str, Host], use_settings, pg_url: str, broker_url: str,  # type: ignore[no-untyped-def]
        redis_url: str, ml100k: Path, s3_server: PrivateSeaweedFS, s3_bucket: str) -> None:
    use_settings(DATABASE_URL=pg_url, BROKER_URL=broker_url, REDIS_URL=redis_url)
    purge_service_queues()
    base = {k: v for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "MODEL_PATH", "DATA_PATH")}
    ports = (5432, 5672, 6379, s3_server.port)
    envs = {}
    for name, host in hosts.items():
        for port in ports:
            host.forward(port)
        envs[name] = {**base, **s3_server.env, "DATABASE_URL": there(pg_url, host),
                      "BROKER_URL": there(broker_url, host),
                      "REDIS_URL": there(redis_url, host),
                      "S3_ENDPOINT_URL": there(s3_server.endpoint, host),
                      "MODEL_PATH": f"s3://{s3_bucket}/artifacts",
                      "DATA_PATH": str(host.home / "data"), "API_KEY": API_KEY,
                      "MODEL_POLL_SECONDS": "0"}  # serve swaps on the event alone

    # Each host sees its own empty directory and none of the others, nor loopback's servers.
    for name, host in hosts.items():
        seen = host.run(envs[name], "sh", "-c", 'ls -A "$0"; ls -A .', str(host.root))
        assert seen.returncode == 0 and seen.stdout.split() == [name], seen
        probe = host.run(envs[name], sys.executable, "-c", "import socket; "
                         "socket.create_connection(('127.0.0.1', 5432), 3)", timeout=30)
        assert probe.returncode != 0  # Postgres only over the veth address

    for queue in ("ingest", "transform", "train"):
        hosts["trainer"].start(envs["trainer"], *recsys_command(), "worker", queue)
    for queue in ("registry", "eval"):
        hosts["registrar"].start(envs["registrar"], *recsys_command(), "worker", queue)
    wanted = {q.value for q in ServiceQueue}
    wait_for(lambda: wanted <= {n.split("@")[0] for reply in app.control.ping(timeout=1.0)
                                for n in reply}, timeout=120, what="the five workers")

    built = hosts["registrar"].run(
        envs["registrar"], *recsys_command(), "pipeline", "--stages", "all", "--source",
        str(ml100k), "--algorithms", "popular,ease", "--trials", "1", "--json", timeout=800)
    assert built.returncode == 0, built.stderr[-3000:]
    summary = json.loads(built.stdout.strip().splitlines()[-1])
    champion = summary["champion"]["version"]
    other = next(m["version"] for m in summary["models"] if m["version"] != champion)

    host_logs = hosts["server"].logs
    port = free_port()
    serve = hosts["server"].start(envs["server"], *recsys_command(), "serve", "--host",
                                  hosts["server"].inner, "--port", str(port), "--workers", "1")
    url = f"http://{hosts['server'].inner}:{port}"

    def model_version() -> int | None:
        try:
            answer = httpx.get(f"{url}/recommendations/1", params={"k": 5}, timeout=5)
        except httpx.HTTPError:
            return None
        return answer.json().get("model_version") if answer.status_code == 200 else None

    wait_for(lambda: model_version() == champion, timeout=120,
             what=f"serve on its own host to answer with champion v{champion} (serve "
                  f"{'running' if serve.poll() is None else 'exited'}, logs in {host_logs})")
    moved = httpx.post(f"{url}/models/{other}/promote", json={"reason": "hosts"},
                       headers={"X-API-Key": API_KEY}, timeout=60)
    assert moved.status_code in (200, 202), moved.text
    wait_for(lambda: model_version() == other, timeout=120,
             what=f"serve to hot-swap to v{other} on model.promoted")
    stored = {o["Key"].split("/")[1] for o in s3_server.client().list_objects_v2(
        Bucket=s3_bucket, Prefix="artifacts/")["Contents"]}
    assert stored == {"snapshots", "models"}
