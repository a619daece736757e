"""The artifact store in an S3-compatible object store (`MODEL_PATH=s3://bucket/prefix`).

boto3 talks to AWS S3, MinIO, SeaweedFS or Ceph alike (`S3_ENDPOINT_URL` for the others),
and its transfer manager splits a large upload into parallel multipart parts. Each host
keeps a read-through cache (`ARTIFACT_CACHE_PATH`, by default `DATA_PATH/artifact-cache`)
mirroring the store's layout, so a model is downloaded once per host; a cached copy is
verified against its sha256 on every read like a downloaded one, and a damaged copy is
fetched again. An object whose bytes do not match the sha256 the registry recorded is
refused. Every failure to reach the store is one ArtifactError naming the URL.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from shared.artifacts import (
    ARRAYS,
    MANIFEST,
    OBJECT_STORE_SCHEME,
    ArtifactError,
    checksum_mismatch,
    read_whole,
    write_whole,
)
from shared.settings import Settings, get_settings

CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                    "InvalidToken", "ExpiredToken", "InvalidSecurity", "Forbidden"}
MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
log = logging.getLogger(__name__)
CHUNK = 4 << 20  # the download's unit of hashing and writing


def write_all(handle: BinaryIO, chunk: memoryview) -> None:
    """Write all of `chunk` to an unbuffered file (one write may take only part of it)."""
    while chunk:
        chunk = chunk[handle.write(chunk):]


def split_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; the prefix without slashes at its ends."""
    bucket, _, prefix = url[len(OBJECT_STORE_SCHEME):].partition("/")
    if not bucket:
        raise ArtifactError(f"MODEL_PATH {url}: an s3:// URL names a bucket (s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client from the settings: endpoint, keys and region when set, boto3's own
    lookup otherwise. Few retries and short connect timeouts: a store that cannot be
    reached is reported in seconds, not minutes."""
    key, secret = (settings.aws_access_key_id.get_secret_value(),
                   settings.aws_secret_access_key.get_secret_value())
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url or None,
        aws_access_key_id=key or None, aws_secret_access_key=secret or None,
        region_name=settings.aws_default_region or "us-east-1",
        config=Config(connect_timeout=5, read_timeout=60,
                      retries={"max_attempts": 2, "mode": "standard"},
                      s3={"addressing_style": "path"}, max_pool_connections=16))


class S3Store:
    """Artifacts as objects `<prefix>/<kind>/<sha[:2]>/<sha>/{arrays.npz,manifest.json}`."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url.rstrip("/")
        self.bucket, self.prefix = split_url(url)
        self.endpoint = settings.s3_endpoint_url or "AWS S3"
        self.cache = settings.resolved_artifact_cache_path / self.bucket / self.prefix
        self.client = s3_client(settings)
        part = settings.artifact_part_mb * 2**20
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="artifact-cache")
        self._writes: dict[str, Future[None]] = {}
        self._lock = threading.Lock()
        self.transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                                       max_concurrency=8, use_threads=True)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    @contextmanager
    def reaching(self, relative: str) -> Iterator[None]:
        """Every boto3 failure as one ArtifactError naming the URL and what went wrong."""
        where = f"{self.url}/{relative}" if relative else self.url
        try:
            yield
        except S3UploadFailedError as error:
            cause = error.__cause__ or error.__context__
            if isinstance(cause, ClientError):
                raise self._client_error(cause, where) from None
            raise ArtifactError(f"artifact store {self.url}: upload of {where} failed "
                                f"({error})") from None
        except ClientError as error:
            raise self._client_error(error, where) from None
        except NoCredentialsError:
            raise ArtifactError(f"artifact store {self.url}: no credentials; set "
                                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
        except BotoCoreError as error:
            raise ArtifactError(f"artifact store {self.url}: endpoint {self.endpoint} "
                                f"unreachable ({error})") from None

    def _client_error(self, error: ClientError, where: str) -> ArtifactError:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket" or (code in MISSING_CODES and not self._bucket_exists()):
            return ArtifactError(f"artifact store {self.url}: bucket {self.bucket!r} does not "
                                 f"exist at {self.endpoint}; create it or correct MODEL_PATH")
        if code in CREDENTIAL_CODES:
            return ArtifactError(f"artifact store {self.url}: credentials refused at "
                                 f"{self.endpoint} ({code}); check AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY")
        if code in MISSING_CODES:
            return ArtifactError(f"artifact {where} is missing")
        message = error.response.get("Error", {}).get("Message", "")
        return ArtifactError(f"artifact store {self.url}: {where}: {code} {message}".strip())

    def _bucket_exists(self) -> bool:
        # A HEAD answers 404 for a missing key and a missing bucket alike: ask the bucket.
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            return str(error.response.get("Error", {}).get("Code", "")) not in MISSING_CODES
        except BotoCoreError:
            return True
        return True

    def check(self) -> str:
        """What `recsys doctor` says of a store it reached; ArtifactError otherwise."""
        with self.reaching(""):
            self.client.head_bucket(Bucket=self.bucket)
        return f"{self.url} at {self.endpoint} reached (bucket exists); cache {self.cache}"

    def staging(self) -> Path:
        folder = self.cache / ".staging"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def exists(self, path: str) -> bool:
        if (self.cache / path / MANIFEST).exists():
            return True  # cached only after the store held it
        try:
            with self.reaching(f"{path}/{MANIFEST}"):
                self.client.head_object(Bucket=self.bucket, Key=self.key(f"{path}/{MANIFEST}"))
        except ArtifactError as error:
            if str(error).endswith(" is missing"):
                return False
            raise
        return True

    def publish(self, path: str, arrays_file: Path, manifest_text: str) -> None:
        with self.reaching(path):
            self.client.upload_file(str(arrays_file), self.bucket, self.key(f"{path}/{ARRAYS}"),
                                    Config=self.transfer)
            # The manifest goes last: a reader that sees it finds the arrays in place.
            self.client.put_object(Bucket=self.bucket, Key=self.key(f"{path}/{MANIFEST}"),
                                   Body=manifest_text.encode())
        cached = self.cache / path
        cached.mkdir(parents=True, exist_ok=True)
        shutil.move(arrays_file, cached / ARRAYS)  # the writer's host never downloads it
        write_whole(cached / MANIFEST, manifest_text)

    def arrays_data(self, path: str, sha256: str) -> bytearray:
        cached = self.cache / path / ARRAYS
        self._settle(path)
        if cached.exists():
            data = read_whole(cached)
            if hashlib.sha256(data).hexdigest() == sha256:
                return data
            cached.unlink(missing_ok=True)  # damaged on this host: the store has it whole
        data, actual = self._download(f"{path}/{ARRAYS}")
        if actual != sha256:
            raise checksum_mismatch(f"{self.url}/{path}", sha256, actual)
        # The cache's copy is written behind the read: the caller has the verified bytes
        # now, and the next read of `path` here waits for the copy (a copy cut short by the
        # process's end is a .part file, never read).
        with self._lock:
            self._writes[path] = self._writer.submit(self._keep, cached, data)
        return data

    def _keep(self, cached: Path, data: bytearray) -> None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{ARRAYS}.{uuid.uuid4().hex}.part")
        try:
            with partial.open("wb", buffering=0) as handle:
                write_all(handle, memoryview(data))
            os.replace(partial, cached)
        finally:
            partial.unlink(missing_ok=True)

    def _settle(self, path: str | None = None) -> None:
        """Wait for the cache copy of `path` (every path: None) written behind a read; a
        copy that failed (a full disk) only means the next read downloads again."""
        with self._lock:
            if path is None:
                pending, self._writes = list(self._writes.values()), {}
            else:
                pending = [self._writes.pop(path)] if path in self._writes else []
        for write in pending:
            try:
                write.result()
            except OSError as error:
                log.warning("artifact cache %s: copy not kept (%s)", self.cache, error)

    def settle(self) -> None:
        """Wait until every copy written behind a read is in the cache."""
        self._settle()

    def _download(self, relative: str) -> tuple[bytearray, str]:
        """An object's bytes and their sha256, hashed in a thread of its own as they
        arrive (hashlib releases the GIL), so hashing adds little after the download.
        The body is read straight into the buffer where the HTTP response allows it."""
        digest = hashlib.sha256()
        with self.reaching(relative):
            response = self.client.get_object(Bucket=self.bucket, Key=self.key(relative))
            size, body = int(response["ContentLength"]), response["Body"]
            # http.client's readinto fills the buffer from the socket, no copy in between;
            # botocore's body (read(), then a copy) where the response is not http.client's.
            raw = getattr(getattr(body, "_raw_stream", None), "_fp", None)
            readinto = getattr(raw, "readinto", None)
            data = bytearray(size)
            view = memoryview(data)
            received = 0
            with ThreadPoolExecutor(1) as hashing:
                steps = []
                try:
                    while received < size:
                        end = min(size, received + CHUNK)
                        if readinto is not None:
                            got = readinto(view[received:end])
                        else:
                            piece = body.read(end - received)
                            got = len(piece)
                            view[received:received + got] = piece
                        if not got:
                            break
                        steps.append(hashing.submit(digest.update,
                                                    view[received:received + got]))
                        received += got
                except (OSError, http.client.HTTPException) as error:  # the socket's own
                    raise ArtifactError(f"artifact {self.url}/{relative}: the download "
                                        f"failed after {received} of {size} bytes "
                                        f"({type(error).__name__}: {error})") from None
                finally:
                    for step in steps:
                        step.result()
            if received < size:
                raise ArtifactError(f"artifact {self.url}/{relative}: the download ended after "
                                    f"{received} of {size} bytes")
        return data, digest.hexdigest()

    def manifest_text(self, path: str) -> str:
        cached = self.cache / path / MANIFEST
        if cached.exists():
            return cached.read_text()
        with self.reaching(f"{path}/{MANIFEST}"):
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(f"{path}/{MANIFEST}"))
            text = body["Body"].read().decode()
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_whole(cached, text)
        return text

    def local_file(self, key: str) -> Path:
        return self.cache / key

    def put_file(self, local: Path, key: str) -> str:
        with self.reaching(key):
            self.client.upload_file(str(local), self.bucket, self.key(key), Config=self.transfer)
        return f"{self.url}/{key}"


@lru_cache(maxsize=8)
def _cached_store(url: str, settings_key: tuple[Any, ...]) -> S3Store:
    return S3Store(url, get_settings())


def object_store(url: str) -> S3Store:
    """The store at `url` for the settings in force; one client per store and settings."""
    settings = get_settings()
    key = (settings.s3_endpoint_url, settings.aws_access_key_id.get_secret_value(),
           settings.aws_secret_access_key.get_secret_value(), settings.aws_default_region,
           str(settings.resolved_artifact_cache_path), settings.artifact_part_mb)
    return _cached_store(url, key)
