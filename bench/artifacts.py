"""Artifact store and load of a 25M-scale model: the S3 store against bare boto3.

Starts a SeaweedFS S3 gateway of its own on loopback (tests/servers.py) and stores a
model of MovieLens-25M's shape (162,541 x 64 and 59,047 x 64 float32 factors; `--users`
and `--items` shrink it) through the artifact store (`MODEL_PATH=s3://...`: npz, sha256,
multipart upload, manifest, this host's cache), then loads it on a host with an empty
cache (download with sha256 and the cache file's write beside it, arrays viewing the
verified bytes). The baseline, in the same run against the same
server: bare boto3 put and get of the same npz bytes from memory, the faster of
`put_object`/`upload_fileobj` and of `get_object`/`download_fileobj` (no hashing, no
file, no parsing). Also the same store and load in a local directory, and a load from
the cache. Medians of `--repeats` runs, each to a fresh prefix and cache. Last line:
{"bytes", "put_ratio", "get_ratio", "cached_get_ms", "put_ms", "get_ms", "bare_put_ms",
 "bare_get_ms", "local_put_ms", "local_get_ms", "users", "items", "repeats"}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import PrivateSeaweedFS, private_seaweedfs  # noqa: E402

FACTORS = 64
BUCKET = "recsys-bench"


def model_arrays(users: int, items: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"user_factors": rng.standard_normal((users, FACTORS), dtype=np.float32),
            "item_factors": rng.standard_normal((items, FACTORS), dtype=np.float32),
            "item_ids": np.arange(1, items + 1, dtype=np.int64)}


def timed(action: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Milliseconds `action(*args, **kwargs)` took, and what it returned."""
    started = time.perf_counter()
    result = action(*args, **kwargs)
    return (time.perf_counter() - started) * 1000, result


def use(**env: str) -> None:
    """Make `env` the settings in force, and the store they name ready (its client made
    before any timing: a process makes it once)."""
    from shared.artifacts import open_store
    from shared.settings import get_settings

    os.environ.update(env)
    get_settings.cache_clear()
    open_store()


def get_bytes(client: Any, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def one_run(arrays: dict[str, np.ndarray], client: Any, transfer: Any, work: Path,
            run: int) -> tuple[dict[str, float], int]:
    """Each way's milliseconds for one run to a fresh prefix and caches; the npz's size."""
    from shared.artifacts import read_artifact, write_artifact

    ms: dict[str, float] = {}
    use(MODEL_PATH=f"s3://{BUCKET}/run-{run}", ARTIFACT_CACHE_PATH=str(work / f"writer-{run}"))
    ms["put"], ref = timed(write_artifact, "models", arrays, {})
    reader = work / f"reader-{run}"
    use(ARTIFACT_CACHE_PATH=str(reader))  # another host: its cache is empty
    ms["get"], _ = timed(read_artifact, ref.path, ref.sha256)
    ms["cached_get"], _ = timed(read_artifact, ref.path, ref.sha256)

    data = (reader / BUCKET / f"run-{run}" / ref.path / "arrays.npz").read_bytes()
    key = f"bare-{run}/arrays.npz"
    ms["bare_put"] = min(
        timed(client.put_object, Bucket=BUCKET, Key=key, Body=data)[0],
        timed(client.upload_fileobj, io.BytesIO(data), BUCKET, key, Config=transfer)[0])
    ms["bare_get"] = min(
        timed(get_bytes, client, key)[0],
        timed(client.download_fileobj, BUCKET, key, io.BytesIO(), Config=transfer)[0])

    local = work / f"local-{run}"
    use(MODEL_PATH=str(local))
    ms["local_put"], local_ref = timed(write_artifact, "models", arrays, {})
    ms["local_get"], _ = timed(read_artifact, local_ref.path, local_ref.sha256)
    for folder in (work / f"writer-{run}", reader, local):
        shutil.rmtree(folder, ignore_errors=True)
    return ms, len(data)


def measure(arrays: dict[str, np.ndarray], server: PrivateSeaweedFS, work: Path,
            repeats: int) -> dict[str, float]:
    """Medians over `repeats` runs of every way, in milliseconds, and the npz's bytes."""
    from boto3.s3.transfer import TransferConfig

    from shared.settings import get_settings

    part = get_settings().artifact_part_mb * 2**20  # the store's own part size
    transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                              max_concurrency=8)
    client = server.client()
    runs = []
    for run in range(repeats):
        ms, size = one_run(arrays, client, transfer, work, run)
        runs.append(ms)
    medians = {f"{name}_ms": round(statistics.median(r[name] for r in runs), 1)
               for name in runs[0]}
    return {"bytes": size, **medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=162_541)
    parser.add_argument("--items", type=int, default=59_047)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Scratch directory (a temporary one by default); emptied after.")
    args = parser.parse_args()
    for name in ("users", "items", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    arrays = model_arrays(args.users, args.items, args.seed)
    work = Path(tempfile.mkdtemp(prefix="recsys-bench-artifacts-", dir=args.workdir))
    try:
        with private_seaweedfs() as server:
            os.environ.update(server.env, DATA_PATH=str(work / "data"))
            server.create_bucket(BUCKET)
            result = measure(arrays, server, work, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(put_ratio=round(result["put_ms"] / result["bare_put_ms"], 2),
                  get_ratio=round(result["get_ms"] / result["bare_get_ms"], 2),
                  users=args.users, items=args.items, repeats=args.repeats)
    megabytes = result["bytes"] / 2**20
    print(f"model: {args.users:,} x {FACTORS} + {args.items:,} x {FACTORS} float32, "
          f"{megabytes:.1f} MiB npz; medians of {args.repeats} runs")
    print(f"store put: {result['put_ms']} ms (bare boto3 {result['bare_put_ms']} ms, local "
          f"directory {result['local_put_ms']} ms): ratio {result['put_ratio']}")
    print(f"store get, empty cache: {result['get_ms']} ms (bare boto3 {result['bare_get_ms']} "
          f"ms, local directory {result['local_get_ms']} ms): ratio {result['get_ratio']}")
    print(f"store get, cached: {result['cached_get_ms']} ms")
    keys = ("bytes", "put_ratio", "get_ratio", "cached_get_ms", "put_ms", "get_ms",
            "bare_put_ms", "bare_get_ms", "local_put_ms", "local_get_ms", "users", "items",
            "repeats")
    print(json.dumps({key: result[key] for key in keys}))


if __name__ == "__main__":
    main()
