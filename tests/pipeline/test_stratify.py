"""`recsys pipeline --stratify`: the random protocol cut per item on embedded defaults."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from tests.conftest import recsys_command
from tests.ingest.test_embedded import embedded_env


def test_pipeline_cuts_per_item_with_stratify_item(tmp_path: Path, ml100k: Path) -> None:
    env = embedded_env(tmp_path, DATA_SOURCE=str(ml100k))
    done = subprocess.run([*recsys_command(), "pipeline", "--stages", "ingest,transform",
                           "--stratify", "item", "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    snapshot = json.loads(done.stdout.strip().splitlines()[-1])["snapshot"]
    (manifest_path,) = [p for p in tmp_path.rglob("*.json") if snapshot[:12] in p.read_text()
                        and '"stratify": "item"' in p.read_text()]
    manifest = json.loads(manifest_path.read_text())
    assert manifest["split"]["params"]["stratify"] == "item"
    counts = manifest["counts"]
    assert counts["train"] + counts["test"] == 100_000
    # round(0.75 x count) per item, summed over ml-100k's items
    per_item = np.bincount(np.loadtxt(ml100k / "u.data", dtype=np.int64)[:, 1])
    expected = sum(max(round(0.75 * n), 1) for n in per_item if n)
    assert counts["train"] == expected


def test_pipeline_names_a_bad_stratify(tmp_path: Path) -> None:
    done = subprocess.run([*recsys_command(), "pipeline", "--stages", "transform",
                           "--stratify", "movie"], cwd=tmp_path,
                          env=embedded_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--stratify 'movie' is not one of user, item" in done.stderr
