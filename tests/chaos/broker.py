"""A private RabbitMQ node for outage tests: its own node name, ports and data directory,
so stopping it touches nobody else's broker. Messages on durable queues survive its
restarts (same data directory), as on a real broker restart."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

RABBITMQ_SBIN = Path("/usr/lib/rabbitmq/bin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def rabbitmq_available() -> bool:
    return (RABBITMQ_SBIN / "rabbitmq-server").exists()


class PrivateBroker:
    """`start()`, `stop()` (the outage), `start()` again, `close()` at the end."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="recsys-rabbit-"))
        self.node = f"recsys-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = _free_port()
        self.dist_port = _free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        (self.root / "enabled_plugins").write_text("[].\n")  # no management plugin
        (self.root / "rabbitmq-env.conf").write_text("")  # not the machine's node settings
        (self.root / "home").mkdir()
        self.env = {
            **os.environ,
            "HOME": str(self.root / "home"),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_PID_FILE": str(self.root / "rabbit.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def _ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(RABBITMQ_SBIN / "rabbitmqctl"), "-n", self.node, *args],
                              env=self.env, capture_output=True, timeout=timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 90) -> None:
        """Start the node and return once it accepts AMQP connections."""
        if self.running:
            return
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen([str(RABBITMQ_SBIN / "rabbitmq-server")], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private RabbitMQ {self.node} did not start:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)
        self._ctl("await_startup", timeout=timeout)

    def stop(self, timeout: float = 60) -> None:
        """Stop the node (as an operator's restart does) and wait until it is gone."""
        if not self.running:
            return
        assert self.process is not None
        self._ctl("stop", timeout=timeout)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait(10)

    def close(self) -> None:
        """Stop the node for good and remove its data."""
        try:
            self.stop()
        finally:
            if self.running:
                assert self.process is not None
                os.killpg(self.process.pid, 9)
                self.process.wait(10)
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "server.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
