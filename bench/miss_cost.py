"""What a cache miss costs in scoring, per algorithm, against the EASE and ALS it blends.

On a miss serve scores the user's history (``Recommender.score_user``: item-based models
and fold-in) and ranks every item with the seen ones banned (``services.serve.recommend.
rank``). This times exactly those two calls, in this process, for the same users of
ml-100k's train split under each model fitted with its defaults: the part of a miss that
depends on the algorithm (history read, cache store and HTTP are the same for all). Each
figure is the fastest of ``--repeats`` passes over the users (load only adds time), and
the ratios are against EASE and ALS measured in the same run.

    python bench/miss_cost.py [--data ../shared/datasets/ml-100k] [--users 500]
                              [--algorithms ease,als,ease_als] [--repeats 5]

Last line: {"users", "ms": {algorithm: ms per miss}, "ratio_vs_ease": {...},
"ratio_vs_als": {...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

K = 10


def miss_ms(model, train, users: np.ndarray, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Milliseconds per user of score_user + rank, the fastest of ``repeats`` passes."""
    from services.serve.recommend import rank

    rows = [(int(u), train.indices[train.indptr[u]:train.indptr[u + 1]].astype(np.int64),
             train.data[train.indptr[u]:train.indptr[u + 1]]) for u in users]
    fastest = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for user, items, values in rows:
            rank(model.score_user(user, items, values), items, None, K)
        fastest = min(fastest, time.perf_counter() - started)
    return 1000.0 * fastest / max(len(rows), 1)


def main(argv: list[str] | None = None) -> dict:
    from bench.quality import load_ratings
    from services.train.algorithms import fit_algorithm
    from shared.features import IdIndex, interactions_csr

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2]
                        / "shared" / "datasets" / "ml-100k")
    parser.add_argument("--users", type=int, default=500, help="users timed (seeded draw)")
    parser.add_argument("--algorithms", default="ease,als,ease_als")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    algorithms = [a for a in args.algorithms.split(",") if a]
    if not {"ease", "als"} <= set(algorithms):
        parser.error("--algorithms must include ease and als (the baselines)")
    frame = load_ratings(args.data, 0)
    users, items = IdIndex.from_values(frame["user_id"]), IdIndex.from_values(frame["movie_id"])
    train = interactions_csr(frame, users, items)
    chosen = np.sort(np.random.default_rng(args.seed).choice(
        train.shape[0], min(args.users, train.shape[0]), replace=False))
    ms = {}
    for name in algorithms:
        model = fit_algorithm(name, train, None, seed=args.seed)
        model.prepare_serving()
        ms[name] = round(miss_ms(model, train, chosen, args.repeats), 4)
        print(f"{name:10} {ms[name]:8.3f} ms per miss (score_user + rank)", flush=True)
    result = {"users": int(chosen.size), "ms": ms,
              "ratio_vs_ease": {n: round(v / ms["ease"], 3) for n, v in ms.items()},
              "ratio_vs_als": {n: round(v / ms["als"], 3) for n, v in ms.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
