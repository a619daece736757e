"""The artifact store in a real S3-compatible server (SeaweedFS's gateway, started here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from shared.artifacts import (
    ArtifactError,
    arrays_to_csr,
    csr_to_arrays,
    read_artifact,
    read_manifest,
    write_artifact,
)
from shared.object_store import object_store
from tests.servers import PrivateSeaweedFS


@pytest.fixture
def store(use_settings, s3_server: PrivateSeaweedFS, s3_bucket: str,  # type: ignore[no-untyped-def]
          tmp_path: Path) -> str:
    """MODEL_PATH on the S3 server, this host's cache under tmp_path/host-a."""
    url = f"s3://{s3_bucket}/recsys"
    use_settings(MODEL_PATH=url, ARTIFACT_CACHE_PATH=str(tmp_path / "host-a"), **s3_server.env)
    return url


def other_host(use_settings, tmp_path: Path, name: str = "host-b") -> Path:  # type: ignore[no-untyped-def]
    """The settings of a host with an empty cache of its own; that cache's directory."""
    cache = tmp_path / name
    use_settings(ARTIFACT_CACHE_PATH=str(cache))
    return cache


def test_round_trip_through_the_store(store: str, use_settings, tmp_path: Path,  # type: ignore[no-untyped-def]
                                      s3_server: PrivateSeaweedFS, s3_bucket: str) -> None:
    matrix = sp.random(20, 30, density=0.2, format="csr", random_state=3, dtype=np.float32)
    arrays = {"ids": np.arange(5), "names": np.array(["a", "bé"]), **csr_to_arrays("m", matrix)}
    ref = write_artifact("models", arrays, {"algorithm": "x"})
    assert write_artifact("models", arrays, {"algorithm": "x"}) == ref
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=s3_bucket, Prefix="recsys/")["Contents"]}
    assert keys == {f"recsys/{ref.path}/arrays.npz", f"recsys/{ref.path}/manifest.json"}
    cache = other_host(use_settings, tmp_path)
    loaded, manifest = read_artifact(ref.path, ref.sha256)
    assert manifest["algorithm"] == "x" and manifest["sha256"] == ref.sha256
    assert (arrays_to_csr("m", loaded) != matrix).nnz == 0
    assert loaded["names"].tolist() == ["a", "bé"]
    assert read_manifest(ref.path)["arrays"]["ids"] == {"dtype": "int64", "shape": [5]}
    object_store(store).settle()  # the cache's copy is written behind the read
    assert (cache / s3_bucket / "recsys" / ref.path / "arrays.npz").exists()
    assert not (tmp_path / "models").exists()  # nothing on a local MODEL_PATH


def test_a_cached_artifact_is_not_downloaded_again(store: str, use_settings, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                   s3_server: PrivateSeaweedFS,
                                                   s3_bucket: str) -> None:
    ref = write_artifact("models", {"w": np.arange(1000.0)}, {})
    other_host(use_settings, tmp_path)
    first, _ = read_artifact(ref.path, ref.sha256)
    # Gone from the store: only this host's cache can still answer.
    s3_server.client().delete_object(Bucket=s3_bucket, Key=f"recsys/{ref.path}/arrays.npz")
    again, _ = read_artifact(ref.path, ref.sha256)
    assert np.array_equal(first["w"], again["w"])
    other_host(use_settings, tmp_path, "host-c")
    with pytest.raises(ArtifactError, match=rf"artifact {store}/{ref.path}/arrays.npz is missing"):
        read_artifact(ref.path, ref.sha256)


def test_a_tampered_object_is_refused(store: str, use_settings, tmp_path: Path,  # type: ignore[no-untyped-def]
                                      s3_server: PrivateSeaweedFS, s3_bucket: str) -> None:
    ref = write_artifact("models", {"w": np.ones(100)}, {})
    key = f"recsys/{ref.path}/arrays.npz"
    client = s3_server.client()
    data = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    data[-40] ^= 0xFF
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))
    cache = other_host(use_settings, tmp_path)
    with pytest.raises(ArtifactError, match=r"checksum mismatch \(expected sha256 .*refusing"):
        read_artifact(ref.path, ref.sha256)
    assert not list(cache.rglob("arrays.npz*"))  # nothing damaged left in the cache
    with pytest.raises(ArtifactError, match="refusing to load a modified artifact"):
        read_artifact(ref.path, "0" * 64)


def test_a_damaged_cached_copy_is_fetched_again(store: str, use_settings,  # type: ignore[no-untyped-def]
                                                tmp_path: Path, s3_bucket: str) -> None:
    ref = write_artifact("models", {"w": np.arange(50)}, {})
    cached = tmp_path / "host-a" / s3_bucket / "recsys" / ref.path / "arrays.npz"
    cached.write_bytes(cached.read_bytes() + b"damaged")
    loaded, _ = read_artifact(ref.path, ref.sha256)
    assert loaded["w"].tolist() == list(range(50))
    object_store(store).settle()
    assert not cached.read_bytes().endswith(b"damaged")


def test_a_large_artifact_goes_up_in_parts(store: str, use_settings,  # type: ignore[no-untyped-def]
                                           s3_server: PrivateSeaweedFS, s3_bucket: str,
                                           tmp_path: Path) -> None:
    use_settings(ARTIFACT_PART_MB="5")
    factors = np.random.default_rng(7).random((3 * 2**20 // 8 * 4,))  # 12 MiB of float64
    ref = write_artifact("models", {"f": factors}, {})
    head = s3_server.client().head_object(Bucket=s3_bucket, Key=f"recsys/{ref.path}/arrays.npz")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload's ETag counts its parts
    other_host(use_settings, tmp_path)
    assert np.array_equal(read_artifact(ref.path, ref.sha256)[0]["f"], factors)


def test_missing_bucket_names_the_url(use_settings, s3_server: PrivateSeaweedFS,  # type: ignore[no-untyped-def]
                                      tmp_path: Path) -> None:
    use_settings(MODEL_PATH="s3://no-such-bucket-here/models", **s3_server.env)
    message = (r"artifact store s3://no-such-bucket-here/models: bucket 'no-such-bucket-here' "
               rf"does not exist at {s3_server.endpoint}")
    with pytest.raises(ArtifactError, match=message):
        write_artifact("models", {"w": np.ones(3)}, {})
    with pytest.raises(ArtifactError, match=message):
        read_artifact("models/00/" + "0" * 64, "0" * 64)


def test_wrong_credentials_name_the_url_not_the_secret(store: str, use_settings,  # type: ignore[no-untyped-def]
                                                       s3_server: PrivateSeaweedFS) -> None:
    use_settings(AWS_SECRET_ACCESS_KEY="not-the-secret-key")
    with pytest.raises(ArtifactError, match=rf"artifact store {store}: credentials refused at "
                       r".*check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as caught:
        write_artifact("models", {"w": np.ones(3)}, {})
    assert "not-the-secret-key" not in str(caught.value)


def test_unreachable_endpoint_names_the_url(store: str, use_settings) -> None:  # type: ignore[no-untyped-def]
    from tests.servers import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    use_settings(S3_ENDPOINT_URL=endpoint)
    with pytest.raises(ArtifactError, match=rf"artifact store {store}: endpoint {endpoint} "
                                            "unreachable"):
        write_artifact("models", {"w": np.ones(3)}, {})


def test_bad_store_urls_are_refused_naming_the_variable(use_settings) -> None:  # type: ignore[no-untyped-def]
    from shared.settings import SettingsError

    with pytest.raises(SettingsError, match=r"MODEL_PATH: .*s3://bucket/prefix"):
        use_settings(MODEL_PATH="gs://bucket/models")
    with pytest.raises(SettingsError, match=r"MODEL_PATH: .*names a bucket"):
        use_settings(MODEL_PATH="s3:///models")
    with pytest.raises(SettingsError, match=r"S3_ENDPOINT_URL: .*http://"):
        use_settings(S3_ENDPOINT_URL="127.0.0.1:8333")


def test_a_local_directory_stays_the_default(use_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    use_settings()
    ref = write_artifact("models", {"w": np.ones(3)}, {})
    assert (tmp_path / "models" / ref.path / "arrays.npz").exists()
    assert not (tmp_path / "data" / "artifact-cache").exists()
    shutil.rmtree(tmp_path / "models")
    with pytest.raises(ArtifactError, match="is missing"):
        read_artifact(ref.path, ref.sha256)
