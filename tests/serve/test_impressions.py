"""The impression logger's batching: full batches while lists pour in, the rest on the
timer, nothing lost when a send fails."""

from __future__ import annotations

import threading
import time
from typing import Any

from services.serve.impressions import ImpressionLogger


class Recorder:
    """A sender that keeps each batch it was handed; fails while `failing` is set."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.failing = False
        self.lock = threading.Lock()

    def __call__(self, lists: list[dict[str, Any]]) -> None:
        if self.failing:
            raise ConnectionError("broker unreachable")
        with self.lock:
            self.batches.append(lists)

    def sizes(self) -> list[int]:
        with self.lock:
            return [len(b) for b in self.batches]


def log_lists(logger: ImpressionLogger, start: int, count: int) -> None:
    for i in range(start, start + count):
        logger.log(f"r{i}", i, b"1,2,3", 7, "champion", "model")


def test_a_full_batch_ships_at_once_and_the_rest_waits_for_the_timer() -> None:
    sender = Recorder()
    logger = ImpressionLogger(sender, flush_seconds=1.5, batch=100)
    logger.start()
    try:
        log_lists(logger, 0, 250)
        deadline = time.monotonic() + 1.0
        while sum(sender.sizes()) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Woken by full batches: only whole batches go, the 50 left wait for the timer.
        assert sender.sizes() == [100, 100]
        deadline = time.monotonic() + 5.0
        while sum(sender.sizes()) < 250 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sender.sizes() == [100, 100, 50]
    finally:
        logger.close()
    sent = [item for batch in sender.batches for item in batch]
    assert [item["request_id"] for item in sent] == [f"r{i}" for i in range(250)]
    assert sent[0] == {"request_id": "r0", "user_id": 0, "items": "1,2,3",
                       "model_version": 7, "variant": "champion", "source": "model",
                       "served_at": sent[0]["served_at"]}


def test_a_failed_send_keeps_the_lists_for_the_next_flush_in_order() -> None:
    sender = Recorder()
    logger = ImpressionLogger(sender, flush_seconds=60, batch=10)  # no thread: flush by hand
    log_lists(logger, 0, 25)
    sender.failing = True
    assert logger.flush() == 0
    sender.failing = False
    assert logger.flush(partial=False) == 20  # whole batches only
    assert logger.flush() == 5
    assert [item["request_id"] for batch in sender.batches for item in batch] == [
        f"r{i}" for i in range(25)]


def test_close_ships_what_is_left() -> None:
    sender = Recorder()
    logger = ImpressionLogger(sender, flush_seconds=60, batch=1000)
    logger.start()
    log_lists(logger, 0, 7)
    logger.close()
    assert sender.sizes() == [7]
