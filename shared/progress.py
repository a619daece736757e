"""Progress of long work in this process, shown by whoever listens (the CLI on a terminal).

Workers report progress as Celery task state; in embedded mode the same reports reach the
command line through these listeners.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Listener = Callable[[str, dict[str, Any]], None]
_listeners: list[Listener] = []


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Receive every `report` made while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def report(stage: str, meta: dict[str, Any]) -> None:
    for listener in list(_listeners):
        listener(stage, meta)
