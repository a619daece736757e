"""Processes for the monitoring tests: `recsys flower` and `recsys worker` subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from shared.celery_app import app
from tests.conftest import recsys_command, wait_for


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def recsys_process(args: list[str], env: Mapping[str, str], log: Path
                   ) -> Iterator[subprocess.Popen[bytes]]:
    """`recsys ARGS` in a session of its own, stopped with its whole group afterwards."""
    with log.open("wb") as handle:
        process = subprocess.Popen([*recsys_command(), *args], env=dict(env),
                                   stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            yield process
        finally:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue


def wait_for_worker(queue: str, process: subprocess.Popen[bytes], log: Path,
                    timeout: float = 90) -> None:
    """Until the `<queue>@host` worker with this pid answers on the broker (another
    worker of the same name on a shared broker does not count)."""

    def ours() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the {queue} worker exited with {process.returncode}:\n"
                                 + log.read_text(errors="replace"))
        for reply in app.control.broadcast("stats", reply=True, timeout=1.0):
            for node, stats in reply.items():
                if node.startswith(f"{queue}@") and int(stats.get("pid", 0)) == process.pid:
                    return True
        return False

    wait_for(ours, timeout=timeout, interval=0.5, what=f"the {queue} worker to answer")
