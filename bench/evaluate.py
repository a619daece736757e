"""Offline evaluation at MovieLens-25M size: every test user, and a seeded sample.

Builds a generated snapshot (162,541 users x 59,047 items, 25,000,095 interactions with a
long-tailed item popularity, split 75/25 per user) and a 64-factor model of the same shape,
stored as artifacts, then in a fresh process each:
- the eval service's `measure_on_snapshot` over every test user (top-20, every metric);
- the bare part: numpy top-10 of every test user from the same factors, train items masked;
- the same evaluation on a seeded sample of users, with its 95% confidence intervals.
Prints each stage's wall time and peak RSS, then one JSON object as its last line:
{"users", "items", "rows", "seconds", "bare_seconds", "ratio", "peak_rss_mb",
 "bound_mb", "sample_users", "sample_seconds", "sample_ndcg@10", "sample_ndcg@10_ci95",
 "ndcg@10"}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import bare_top_k  # noqa: E402

FACTORS = 64
K = 10


def generate(users: int, items: int, rows: int, seed: int) -> tuple[sp.csr_matrix,
                                                                   sp.csr_matrix]:
    """Train and test interaction matrices: per-user counts and item popularity long-tailed."""
    rng = np.random.default_rng(seed)
    activity = rng.pareto(1.2, users) + 1.0
    per_user = np.maximum(np.round(activity / activity.sum() * rows), 1).astype(np.int64)
    per_user = np.minimum(per_user, items // 2)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.9
    popularity /= popularity.sum()
    # Popular items repeat within a user: draw more than asked, keep `rows` distinct cells.
    user_of = np.repeat(np.arange(users, dtype=np.int32), np.ceil(per_user * 1.8).astype(int))
    item_of = rng.choice(items, size=user_of.size, p=popularity).astype(np.int32)
    cells = np.unique(user_of.astype(np.int64) * items + item_of)
    cells = np.sort(rng.choice(cells, size=min(rows, cells.size), replace=False))
    matrix = sp.csr_matrix((np.full(cells.size, 4.0, np.float32),
                            ((cells // items).astype(np.int32), (cells % items).astype(np.int32))),
                           shape=(users, items))
    draws = rng.random(matrix.nnz)
    test_cells = draws > 0.75
    train = sp.csr_matrix((matrix.data[~test_cells],
                           (np.repeat(np.arange(users), np.diff(matrix.indptr))[~test_cells],
                            matrix.indices[~test_cells])), shape=matrix.shape)
    test = sp.csr_matrix((matrix.data[test_cells],
                          (np.repeat(np.arange(users), np.diff(matrix.indptr))[test_cells],
                           matrix.indices[test_cells])), shape=matrix.shape)
    return train, test


def build(workdir: Path, users: int, items: int, rows: int, seed: int) -> dict[str, str]:
    """The snapshot and model artifacts under `workdir`; returns their paths and checksums."""
    os.environ["MODEL_PATH"] = str(workdir / "models")
    from shared.artifacts import csr_to_arrays, write_artifact
    from shared.features import Weighting
    from shared.recommenders import FactorModel

    train, test = generate(users, items, rows, seed)
    arrays = {"user_ids": np.arange(1, users + 1, dtype=np.int64),
              "item_ids": np.arange(1, items + 1, dtype=np.int64),
              **csr_to_arrays("train", train), **csr_to_arrays("test", test)}
    snapshot = write_artifact("snapshots", arrays, {"kind": "snapshot"})
    rng = np.random.default_rng(seed + 1)
    model = FactorModel("als", Weighting(),
                        rng.standard_normal((users, FACTORS), dtype=np.float32) * 0.1,
                        rng.standard_normal((items, FACTORS), dtype=np.float32) * 0.1, 0.01, 1.0)
    model_arrays = {**model.to_arrays(), "user_ids": arrays["user_ids"],
                    "item_ids": arrays["item_ids"]}
    artifact = write_artifact("models", model_arrays, {"kind": "model"})
    return {"snapshot": snapshot.path, "snapshot_sha": snapshot.sha256,
            "model": artifact.path, "model_sha": artifact.sha256,
            "nnz": str(train.nnz + test.nnz)}


def stage(mode: str, refs: dict[str, str], sample: int) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    from services.eval.offline import measure_on_snapshot
    from shared.artifacts import arrays_to_csr, read_artifact

    arrays, _ = read_artifact(refs["snapshot"], refs["snapshot_sha"])
    record = {"artifact_path": refs["model"], "sha256": refs["model_sha"]}
    started = time.perf_counter()
    result: dict[str, float] = {}
    if mode == "bare":
        model, _ = read_artifact(refs["model"], refs["model_sha"])
        user_factors, item_factors = model["user_factors"], model["item_factors"]
        train, test = arrays_to_csr("train", arrays), arrays_to_csr("test", arrays)
        users = np.flatnonzero(np.diff(test.indptr))
        bare_top_k(user_factors, item_factors, train, users, K)
    else:
        measured = measure_on_snapshot(record, arrays, [K, 20], sample=sample)
        result["ndcg@10"] = measured["metrics"]["ndcg@10"]
        if "intervals" in measured:
            low, high = measured["intervals"]["ndcg@10"]
            result["ci95"] = (high - low) / 2
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's VmHWM (ru_maxrss would count the parent's pages from before exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_stage(mode: str, refs: dict[str, str], workdir: Path, sample: int = 0
              ) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--stage", mode, "--refs", json.dumps(refs),
         "--sample", str(sample), "--workdir", str(workdir)],
        capture_output=True, text=True, env={**os.environ, "MODEL_PATH": str(workdir / "models")})
    if done.returncode != 0:
        raise SystemExit(f"{mode} stage failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=162_541)
    parser.add_argument("--items", type=int, default=59_047)
    parser.add_argument("--ratings", type=int, default=25_000_095)
    parser.add_argument("--sample-users", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--stage", choices=("evaluate", "bare", "sample"), default=None)
    parser.add_argument("--refs", default=None)
    parser.add_argument("--sample", type=int, default=0)
    args = parser.parse_args()
    if args.stage:
        result = stage("bare" if args.stage == "bare" else "evaluate", json.loads(args.refs),
                       args.sample)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        workdir = Path(scratch)
        clock = time.perf_counter()
        refs = build(workdir, args.users, args.items, args.ratings, args.seed)
        print(f"generated {args.users:,} users x {args.items:,} items, {int(refs['nnz']):,} "
              f"interactions in {time.perf_counter() - clock:.1f} s")
        full = run_stage("evaluate", refs, workdir)
        print(f"evaluate every test user: {full['seconds']:.2f} s, peak RSS "
              f"{full['peak_rss_mb']:.0f} MB, nDCG@10 {full['ndcg@10']:.4f}")
        bare = run_stage("bare", refs, workdir)
        print(f"bare numpy top-{K} of every test user: {bare['seconds']:.2f} s, peak RSS "
              f"{bare['peak_rss_mb']:.0f} MB")
        sampled = run_stage("sample", refs, workdir, args.sample_users)
        print(f"evaluate {args.sample_users:,} sampled users: {sampled['seconds']:.2f} s, "
              f"nDCG@10 {sampled['ndcg@10']:.4f} ± {sampled.get('ci95', 0.0):.4f}")
        nnz = int(refs["nnz"])
        # What evaluation holds: the splits (12 bytes an interaction, twice over while the
        # CSRs are rebuilt), the model, users x k results and one 2**24-cell score block.
        bound = (24 * nnz + 4 * FACTORS * (args.users + args.items)
                 + 12 * 20 * args.users + 3 * 4 * (1 << 24)) / 2**20
        print(f"bound on evaluation memory beyond the interpreter: {bound:.0f} MB")
        print(json.dumps({
            "users": args.users, "items": args.items, "rows": nnz,
            "seconds": round(full["seconds"], 3), "bare_seconds": round(bare["seconds"], 3),
            "ratio": round(full["seconds"] / bare["seconds"], 3),
            "peak_rss_mb": round(full["peak_rss_mb"], 1), "bound_mb": round(bound, 1),
            "sample_users": args.sample_users, "sample_seconds": round(sampled["seconds"], 3),
            "sample_ndcg@10": round(sampled["ndcg@10"], 6),
            "sample_ndcg@10_ci95": round(sampled.get("ci95", 0.0), 6),
            "ndcg@10": round(full["ndcg@10"], 6)}))


if __name__ == "__main__":
    main()
