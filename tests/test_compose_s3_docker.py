"""`docker compose -f docker-compose.yml -f deploy/compose.s3.yml up` on a real Docker
engine: the artifacts in SeaweedFS's S3 gateway instead of the `models` volume, as the
README's "Several hosts" section runs it (with only the data sets mounted besides).

One compose project for the module: build, `up` until serve answers with the champion
bootstrap trained, the checks below on what the object store holds, and `down -v`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compose_stack import COMPOSE_FILES, PROJECT_DIR, Stack, compose_stack
from tests.conftest import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]

PROJECT = os.environ.get("RECSYS_COMPOSE_S3_TEST_PROJECT", "recsys-compose-s3-test")
S3_OVERRIDE = PROJECT_DIR / "deploy" / "compose.s3.yml"
CACHE = "/data/artifact-cache"  # DATA_PATH/artifact-cache: the cache every service shares
# What the store in the serve container says of each model_version row's artifact: its
# arrays and manifest as objects in the bucket, and their sizes.
STORED = """
import json, sys
from shared.artifacts import ARRAYS, MANIFEST, open_store
store = open_store()
print(json.dumps({"url": store.url, "objects": {
    f"{path}/{name}": store.client.head_object(Bucket=store.bucket,
                                               Key=store.key(f"{path}/{name}"))["ContentLength"]
    for path in sys.argv[1:] for name in (ARRAYS, MANIFEST)}}))
"""


@pytest.fixture(scope="module")
def stack(ml100k: Path, pytestconfig: pytest.Config) -> Iterator[Stack]:
    with compose_stack(ml100k, pytestconfig, PROJECT, [*COMPOSE_FILES, S3_OVERRIDE]) as stack:
        yield stack


def test_the_champion_is_stored_in_the_object_store_and_served_from_it(stack: Stack) -> None:
    served = stack.up_until_champion()
    assert served["variant"] == "champion" and served["items"], served

    paths = stack.sql("SELECT string_agg(artifact_path, ' ') FROM model_version").split()
    assert paths, "bootstrap registered no model"
    stored = json.loads(stack.compose("exec", "-T", "serve", "python", "-c", STORED,
                                      *paths).stdout)
    assert stored["url"] == "s3://recsys/artifacts"
    assert all(size > 0 for size in stored["objects"].values()), stored
    # Nothing went to the `models` volume: MODEL_PATH is the bucket.
    assert not stack.compose("exec", "-T", "serve", "find", "/models", "-type", "f").stdout

    # Serve on a host that never had the model: its cache emptied, then restarted, it
    # downloads the champion from the store and answers with the same version.
    stack.compose("exec", "-T", "serve", "sh", "-c", f"rm -rf {CACHE}/*")
    stack.compose("restart", "serve", timeout=300)
    again = wait_for(stack.champion, timeout=300, interval=3,
                     what="the restarted serve to answer with the champion")
    assert again["model_version"] == served["model_version"], (again, served)
    cached = stack.compose("exec", "-T", "serve", "find", CACHE, "-name", "arrays.npz").stdout
    assert any(path in cached for path in paths), cached
