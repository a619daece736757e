"""The in-process caches of several serve workers kept in step by the feedback journal."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from services.serve.cache import MemoryCache, journal_path
from shared.settings import get_settings


def test_feedback_noted_by_one_worker_reaches_the_others(use_settings) -> None:  # type: ignore[no-untyped-def]
    """Two caches on one DATA_PATH, as two uvicorn workers: what one learns, the other
    knows at its next look, whichever call that is."""
    use_settings()
    first, second = MemoryCache(get_settings()), MemoryCache(get_settings())
    try:
        _recent, epoch, ok = asyncio.run(second.auser_state(7))
        assert ok and epoch == ""
        asyncio.run(second.aput("k:7:a", b"list", 7, epoch))
        assert second.get("k:7:a") == b"list"
        # A list computed by `second` before the feedback, stored after it: refused.
        _recent, stale_epoch, _ok = asyncio.run(second.auser_state(7))
        first.note_feedback({7: {50: 1.0, 51: None}})
        assert second.get("k:7:a") is None
        asyncio.run(second.aput("k:7:b", b"stale", 7, stale_epoch))
        assert second.get("k:7:b") is None
        recent, fresh_epoch, ok = asyncio.run(second.auser_state(7))
        assert ok and recent == {50: 1.0, 51: None} and fresh_epoch != stale_epoch
        asyncio.run(second.aput("k:7:b", b"fresh", 7, fresh_epoch))
        assert second.get("k:7:b") == b"fresh"
        # Another user's lists are left alone; a view never erases an earlier rating.
        asyncio.run(first.aput("k:8:a", b"other", 8, ""))
        second.note_feedback({7: {50: None}})
        assert first.get("k:8:a") == b"other"
        assert asyncio.run(first.auser_state(7))[0] == {50: 1.0, 51: None}
        # A worker started later learns the recent feedback from the journal.
        third = MemoryCache(get_settings())
        assert asyncio.run(third.auser_state(7))[0] == {50: 1.0, 51: None}
        third.close()
    finally:
        first.close()
        second.close()


def test_an_unreadable_journal_turns_the_cache_off(use_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Without the journal a cached list could be stale: nothing is answered from the
    cache or stored in it, and readiness says why."""
    use_settings()
    cache = MemoryCache(get_settings())
    try:
        cache.put("pop:1", b"popular")
        assert cache.get("pop:1") == b"popular"
        with sqlite3.connect(journal_path(get_settings())) as connection:
            connection.execute("DROP TABLE recent_feedback")
        assert cache.get("pop:1") is None
        _recent, _epoch, ok = asyncio.run(cache.auser_state(3))
        assert not ok
        healthy, detail = cache.ping()
        assert not healthy and str(journal_path(get_settings())) in detail
    finally:
        cache.close()


def test_old_rows_are_pruned(use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings(CACHE_TTL="100", CACHE_TTL_JITTER="0", RECENT_FEEDBACK_TTL="60")
    cache = MemoryCache(get_settings())
    try:
        assert cache.journal.horizon == 101  # the longer of the list and feedback TTLs
        cache.journal.append({1: {10: 5.0}}, now=1_000.0)
        cache.journal.append({2: {20: 5.0}}, now=2_000.0)
        assert [row[1] for row in cache.journal.since(0)] == [2]
    finally:
        cache.close()
