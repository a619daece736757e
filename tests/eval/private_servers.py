"""A RabbitMQ and a Postgres of a test's own, on free ports, that it may stop and start.

The shared servers on 5672 and 5432 serve every other test at the same time, so an
outage is staged on private instances: data in a temporary directory, nothing left
running after the block.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pika
import pika.exceptions
import psycopg2

from shared.events import pika_parameters
from tests.conftest import port_open, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_user(user: str, folder: Path) -> list[str]:
    """The command prefix that runs a server as `user` when the tests run as root (neither
    server runs as root), having given it `folder`."""
    if os.geteuid() != 0:
        return []
    shutil.chown(folder, user)
    return ["runuser", "-u", user, "--"]


class PrivateRabbitMQ:
    """`rabbitmq-server` with its own node name, ports, database and logs, no plugins."""

    def __init__(self) -> None:
        self.folder = folder = Path(tempfile.mkdtemp(prefix="recsys-rabbitmq-"))
        self._as = _as_user("rabbitmq", folder)
        self.port, self.dist_port = free_port(), free_port()
        self.node = f"recsystest{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n")
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq-env.conf").write_text("")
        self.env = {**os.environ, "RABBITMQ_NODENAME": self.node,
                    "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_DIST_PORT": str(self.dist_port),
                    "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
                    "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
                    "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(folder / "log"),
                    "RABBITMQ_SERVER_START_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}"}
        self.process: subprocess.Popen[bytes] | None = None

    def _answers(self) -> bool:
        try:
            pika.BlockingConnection(pika_parameters(self.url)).close()
        except pika.exceptions.AMQPError:
            return False
        return True

    def start(self) -> None:
        log = (self.folder / "server.log").open("ab")
        self.process = subprocess.Popen([*self._as, "/usr/lib/rabbitmq/bin/rabbitmq-server"],
                                        env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self.process.poll() is not None or self._answers(), timeout=120,
                 interval=0.5, what=f"the private RabbitMQ on port {self.port} to answer")
        assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        wait_for(lambda: not port_open(self.port), timeout=30,
                 what=f"the private RabbitMQ on port {self.port} to stop")


@contextmanager
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    server = PrivateRabbitMQ()
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


def _bin(name: str) -> str:
    versions = sorted(Path("/usr/lib/postgresql").iterdir(), key=lambda p: int(p.name))
    return str(versions[-1] / "bin" / name)


class PrivatePostgres:
    """A cluster of its own (initdb into a temporary directory), trust auth, on a free port."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="recsys-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"
        self._as = _as_user("postgres", self.folder)
        subprocess.run([*self._as, _bin("initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True,
                       timeout=120)

    def _answers(self) -> bool:
        try:
            psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True

    def start(self) -> None:
        subprocess.run([*self._as, _bin("pg_ctl"), "-D", str(self.data), "-l",
                        str(self.folder / "server.log"), "-w", "-o",
                        f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1",
                        "start"], check=True, capture_output=True, timeout=120)
        wait_for(self._answers, timeout=60, what=f"the private Postgres on {self.port}")

    def stop(self) -> None:
        subprocess.run([*self._as, _bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                        "stop"], check=False, capture_output=True, timeout=120)
        wait_for(lambda: not port_open(self.port), timeout=60,
                 what=f"the private Postgres on {self.port} to stop")


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)
