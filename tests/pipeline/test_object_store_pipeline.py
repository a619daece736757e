"""The pipeline with MODEL_PATH=s3://...: one host trains and registers, another with an
empty cache of its own serves the champion, and no artifact touches a local MODEL_PATH."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shared.object_store import object_store
from tests.conftest import recsys_command
from tests.servers import PrivateSeaweedFS

API_KEY = "object-store-test-key"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_trains_into_the_object_store_and_another_host_serves_it(
        use_settings, tmp_path: Path, ml100k: Path, pg_url: str,  # type: ignore[no-untyped-def]
        s3_server: PrivateSeaweedFS, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/recsys"
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("BROKER_URL", "REDIS_URL")}
    env.update(s3_server.env, DATABASE_URL=pg_url, MODEL_PATH=url, DATA_SOURCE=str(ml100k),
               DATA_PATH=str(trainer / "data"))
    built = subprocess.run([*recsys_command(), "pipeline", "--stages", "all", "--algorithms",
                            "popular,ease", "--trials", "1", "--json"], cwd=trainer, env=env,
                           capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    champion = json.loads(built.stdout.strip().splitlines()[-1])["champion"]
    stored = {o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=s3_bucket, Prefix="recsys/")["Contents"]}
    assert {k.split("/")[1] for k in stored} == {"snapshots", "models"}
    # The trainer's host kept what it wrote in its cache, under DATA_PATH by default.
    assert list((trainer / "data" / "artifact-cache" / s3_bucket).rglob("arrays.npz"))

    from services.serve.app import create_app

    server_cache = tmp_path / "server-cache"
    use_settings(DATABASE_URL=pg_url, MODEL_PATH=url, API_KEY=API_KEY,
                 ARTIFACT_CACHE_PATH=str(server_cache), **s3_server.env)
    with TestClient(create_app(), headers={"X-API-Key": API_KEY}) as client:
        ready = client.get("/readyz").json()
        assert ready["models"] == {"champion": champion["version"]}, ready
        answer = client.get("/recommendations/1", params={"k": 5}).json()
        assert answer["model_version"] == champion["version"] and len(answer["items"]) == 5
    # Serve downloaded the champion and its snapshot into its own cache, once.
    object_store(url).settle()
    assert len(list(server_cache.rglob("arrays.npz"))) == 2
    assert not (tmp_path / "models").exists() and not (trainer / "models").exists()
