"""Offline quality on the published MovieLens 100K table's own protocol, over five seeds.

Microsoft Recommenders' ML-100K table (its benchmark notebook) splits 75/25 with
``python_stratified_split(..., filter_by="item")`` and measures the top 10. Per seed this
runs the pipeline's own steps on ``u.data``: the snapshot's canonical row order and
``random`` split (item-stratified, that seed), the validation pair carved from train only,
then the train stage itself (``train_many``: every default algorithm tuned on the
validation pair with its trial cap, fitted on train, stored as an artifact in a scratch
``MODEL_PATH``), and each stored model read back and measured once on test. Prints per
algorithm the mean and standard deviation over the seeds of nDCG@10, P@10, R@10 and MAP
(Recommenders' ``map``, not 1.2.1's ``map_at_k``) beside the published rows, then one
JSON object; every model's ``ndcg@10_ratio`` is against most-popular in the same run.

    python bench/quality.py [--data ../shared/datasets/ml-100k] [--seeds 42,1,2,3,4]
                            [--trials N] [--algorithms a,b] [--users N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

K = 10
METRICS = ("ndcg@10", "precision@10", "recall@10", "map")
# Recommenders' README table for MovieLens 100K (python_stratified_split by item, k=10).
PUBLISHED = {
    "BiVAE": {"ndcg@10": 0.475077, "precision@10": 0.411771, "recall@10": 0.219145,
              "map": 0.146126},
    "BPR (cornac)": {"ndcg@10": 0.441997, "precision@10": 0.388229, "recall@10": 0.212522,
                     "map": 0.132478},
    "LightGCN": {"ndcg@10": 0.419846, "precision@10": 0.379626, "recall@10": 0.144336,
                 "map": 0.088526},
    "NCF": {"ndcg@10": 0.396118, "precision@10": 0.347296, "recall@10": 0.180775,
            "map": 0.107720},
    "SAR": {"ndcg@10": 0.382461, "precision@10": 0.330753, "recall@10": 0.176385,
            "map": 0.110591},
}


def load_ratings(data: Path, users: int) -> pd.DataFrame:
    """u.data in the snapshot's canonical order; with ``users``, only the first ones."""
    from services.transform.snapshot import canonical_order

    path = data / "u.data"
    if not path.is_file():
        raise SystemExit(f"--data {data}: no u.data there (expected an ml-100k directory)")
    frame = pd.read_csv(path, sep="\t", names=["user_id", "movie_id", "rating", "rated_at"])
    frame = canonical_order(frame)
    if users:
        kept = np.sort(frame["user_id"].unique())[:users]
        frame = frame[frame["user_id"].isin(kept)].reset_index(drop=True)
    return frame


def write_snapshot(frame: pd.DataFrame, seed: int) -> dict[str, Any]:
    """The snapshot arrays train reads (id maps, the four CSR parts), stored as an
    artifact like transform's, for the split of ``seed``."""
    from shared.artifacts import csr_to_arrays, write_artifact
    from shared.features import IdIndex, interactions_csr
    from shared.splits import random_split, validation_split

    split = random_split(frame, ratio=0.75, seed=seed, stratify="item")
    validation = validation_split(split.train, like=split.spec)
    users, items = IdIndex.from_values(frame["user_id"]), IdIndex.from_values(frame["movie_id"])
    arrays: dict[str, np.ndarray] = {"user_ids": users.ids.astype(np.int64),
                                     "item_ids": items.ids.astype(np.int64)}
    parts = {"train": split.train, "test": split.test, "validation_train": validation.train,
             "validation_test": validation.test}
    for name, part in parts.items():
        arrays.update(csr_to_arrays(name, interactions_csr(part, users, items)))
    manifest = {"kind": "snapshot", "split": {"policy": split.spec.policy,
                                              "params": split.spec.params}}
    ref = write_artifact("snapshots", arrays, manifest)
    return {"snapshot_id": f"quality-seed-{seed}", "artifact_path": ref.path,
            "sha256": ref.sha256}


def run_seed(frame: pd.DataFrame, seed: int, algorithms: list[str] | None,
             trials: int | None) -> dict[str, dict[str, float]]:
    """Train stage on one seed's snapshot, then each stored model measured on test."""
    from services.train.training import load_snapshot, train_many
    from shared.artifacts import read_artifact
    from shared.recommenders import evaluate_model, from_arrays
    from shared.settings import get_settings

    os.environ["SEED"] = str(seed)
    get_settings.cache_clear()
    snapshot = write_snapshot(frame, seed)
    data = load_snapshot(snapshot)
    train, test = data.matrix("train"), data.matrix("test")
    figures: dict[str, dict[str, float]] = {}
    for result in train_many(snapshot, algorithms, tune=True, n_trials=trials):
        if result.get("skipped"):  # the tuning budget left it no time for its final fit
            continue
        arrays, _ = read_artifact(result["artifact_path"], result["sha256"])
        model = from_arrays(arrays)
        measured = evaluate_model(model, train, test, (K,))
        figures[result["algorithm"]] = {
            "ndcg@10": measured["ndcg@10"], "precision@10": measured["precision@10"],
            "recall@10": measured["recall@10"], "map": measured["map@10"],
            "tuning_seconds": (result["tuning"] or {}).get("seconds", 0.0),
            "trials_run": (result["tuning"] or {}).get("trials_run", 0)}
        print(f"  seed {seed:>2} {result['algorithm']:15} nDCG@10 {measured['ndcg@10']:.4f} "
              f"P@10 {measured['precision@10']:.4f}  ({result['seconds']:.0f} s)", flush=True)
    return figures


def summarise(per_seed: list[dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of every metric per algorithm over the seeds."""
    rows = []
    for name in per_seed[0]:
        row: dict[str, Any] = {"algorithm": name}
        for metric in METRICS:
            values = [seed[name][metric] for seed in per_seed]
            row[f"{metric}_mean"] = round(statistics.fmean(values), 6)
            row[f"{metric}_sd"] = round(statistics.stdev(values), 6) if len(values) > 1 else 0.0
        row["trials_run"] = sum(int(seed[name]["trials_run"]) for seed in per_seed)
        row["tuning_seconds"] = round(sum(seed[name]["tuning_seconds"] for seed in per_seed), 1)
        rows.append(row)
    popular = next((r for r in rows if r["algorithm"] == "popular"), None)
    for row in rows:
        row["ndcg@10_ratio"] = (round(row["ndcg@10_mean"] / popular["ndcg@10_mean"], 4)
                                if popular and popular["ndcg@10_mean"] else None)
    return sorted(rows, key=lambda r: -r["ndcg@10_mean"])


def print_table(models: list[dict[str, Any]]) -> None:
    print(f"\n{'algorithm':17} {'nDCG@10':>17} {'P@10':>17} {'R@10':>17} {'MAP':>17}")
    for row in models:
        cells = [f"{row[f'{m}_mean']:.4f} ± {row[f'{m}_sd']:.4f}" for m in METRICS]
        print(f"{row['algorithm']:17} " + " ".join(f"{c:>17}" for c in cells))
    print("published (Recommenders, one run)")
    for name, row in PUBLISHED.items():
        print(f"{name:17} " + " ".join(f"{row[m]:>17.4f}" for m in METRICS))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2]
                        / "shared" / "datasets" / "ml-100k")
    parser.add_argument("--seeds", default="42,1,2,3,4")
    parser.add_argument("--trials", type=int, default=None,
                        help="trial cap per algorithm (each algorithm's own when omitted)")
    parser.add_argument("--algorithms", default=None,
                        help="comma-separated (the pipeline's default list when omitted)")
    parser.add_argument("--users", type=int, default=0,
                        help="keep only the first N users (a smoke run); 0 keeps all")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if not seeds:
        parser.error("--seeds: give at least one seed")
    if args.trials is not None and args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    algorithms = args.algorithms.split(",") if args.algorithms else None

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recsys-quality-") as scratch:
        os.environ["MODEL_PATH"] = scratch
        frame = load_ratings(args.data, args.users)
        print(f"{len(frame)} ratings, seeds {seeds}, item-stratified 75/25, k={K}", flush=True)
        per_seed = [run_seed(frame, seed, algorithms, args.trials) for seed in seeds]
    models = summarise(per_seed)
    print_table(models)
    best = models[0]
    result = {
        "protocol": {"policy": "random", "ratio": 0.75, "stratify": "item", "k": K,
                     "validation": "carved from each seed's train only",
                     "trials": args.trials or "each algorithm's own cap",
                     "ratings": len(frame)},
        "seeds": seeds,
        "champion": {"algorithm": best["algorithm"], "ndcg@10_mean": best["ndcg@10_mean"],
                     "ndcg@10_sd": best["ndcg@10_sd"],
                     "precision@10_mean": best["precision@10_mean"],
                     "map_mean": best["map_mean"], "recall@10_mean": best["recall@10_mean"]},
        "models": models,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
