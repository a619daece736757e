"""The online window's computation against one bare SQL aggregate over the same tables.

Generates `--impressions` served items (default 1,000,000, in lists of 10) and `--feedback`
events (default 50,000; most answer a list by request id, some only by user and item) in a
scratch Postgres database, then times, in one run, `window_figures` (what `eval.online`
computes) and a bare join-and-count over the same rows. The ratio is ours / bare.

    python bench/online_window.py [--impressions N] [--feedback N] [--repeat R]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from services.eval.online import window_figures  # noqa: E402
from shared.db.session import engine_for, migrate  # noqa: E402

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
BARE_SQL = """
SELECT i.model_version, i.variant, count(*), count(f.id)
FROM impression i LEFT JOIN feedback f
  ON f.request_id = i.request_id AND f.movie_id = i.movie_id
WHERE i.served_at >= :start AND i.served_at < :end AND i.position <= :k
GROUP BY i.model_version, i.variant
"""


@contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A fresh migrated database, dropped afterwards."""
    with common.scratch_database(admin_url, "online") as database:
        scratch = database.render_as_string(hide_password=False)
        try:
            migrate(scratch)
            yield scratch
        finally:
            engine_for(scratch).dispose()


def generate(url: str, impressions: int, feedback: int, seed: int) -> dt.datetime:
    """COPY seeded impressions and feedback in; returns the end of the data's hour."""
    rng = np.random.default_rng(seed)
    lists = impressions // 10
    users = rng.integers(1, 50_000, lists)
    seconds = np.sort(rng.integers(0, 3600, lists))
    variants = np.where(rng.random(lists) < 0.2, "challenger", "champion")
    rows = io.StringIO()
    served_items = np.empty((lists, 10), dtype=np.int64)
    for n in range(lists):
        served = (START + dt.timedelta(seconds=int(seconds[n]))).isoformat()
        version = 2 if variants[n] == "challenger" else 1
        served_items[n] = rng.choice(20_000, 10, replace=False) + 1
        for position, movie in enumerate(served_items[n], start=1):
            rows.write(f"r{n}\t{users[n]}\t{movie}\t{position}\t{version}\t{variants[n]}\t"
                       f"model\t{served}\n")
    events = io.StringIO()
    picked = rng.integers(0, lists, feedback)
    for n, (list_no, position) in enumerate(zip(picked, rng.integers(1, 11, feedback),
                                                strict=True)):
        at = (START + dt.timedelta(seconds=int(seconds[list_no]) + 30)).isoformat()
        kind = ("click", "watch", "rating", "view")[n % 4]
        value = "4" if kind == "rating" else "\\N"
        request = f"r{list_no}" if n % 5 else "\\N"  # a fifth match by user and item only
        movie = served_items[list_no, position - 1]
        events.write(f"e{n}\t{users[list_no]}\t{movie}\t{kind}\t{value}\t{request}\t{at}\n")
    raw = engine_for(url).raw_connection()
    try:
        with raw.cursor() as cursor:
            rows.seek(0)
            cursor.copy_expert("COPY impression (request_id, user_id, movie_id, position, "
                               "model_version, variant, source, served_at) FROM STDIN", rows)
            events.seek(0)
            cursor.copy_expert("COPY feedback (event_id, user_id, movie_id, type, value, "
                               "request_id, occurred_at) FROM STDIN", events)
            cursor.execute("ANALYZE impression; ANALYZE feedback")
        raw.commit()
    finally:
        raw.close()
    return START + dt.timedelta(hours=1)


def time_bare(url: str, start: dt.datetime, end: dt.datetime, k: int) -> float:
    with engine_for(url).connect() as conn:
        clock = time.perf_counter()
        conn.execute(text(BARE_SQL), {"start": start, "end": end, "k": k}).all()
        return time.perf_counter() - clock


def time_ours(url: str, start: dt.datetime, end: dt.datetime, k: int) -> float:
    clock = time.perf_counter()
    window_figures(start, end, k, 3600, engine_for(url))
    return time.perf_counter() - clock


def measure(database_url: str, impressions: int, feedback: int, seed: int, repeat: int
            ) -> tuple[float, float]:
    """(ours, bare) best seconds over `repeat` runs on freshly generated data."""
    with scratch_database(database_url) as url:
        end = generate(url, impressions, feedback, seed)
        start, k = end - dt.timedelta(hours=1), 10
        time_ours(url, start, end, k)  # warm the buffers once for both
        ours = min(time_ours(url, start, end, k) for _ in range(repeat))
        bare = min(time_bare(url, start, end, k) for _ in range(repeat))
    return ours, bare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=1_000_000)
    parser.add_argument("--feedback", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--database-url",
                        default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)
    ours, bare = measure(args.database_url, args.impressions, args.feedback, args.seed,
                         args.repeat)
    ratio = ours / bare
    print(f"online window over {args.impressions:,} impressions and {args.feedback:,} "
          f"feedback events: {ours * 1000:.0f} ms; bare aggregate {bare * 1000:.0f} ms; "
          f"ratio {ratio:.2f} (target <= 3: {'met' if ratio <= 3 else 'missed'})")
    print(json.dumps({"impressions": args.impressions, "feedback": args.feedback,
                      "online_window_seconds": round(ours, 4), "bare_seconds": round(bare, 4),
                      "online_window_ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
