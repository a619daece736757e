"""The artifact store: npz arrays plus a JSON manifest, content-addressed by sha256.

`MODEL_PATH` names the store: a directory (one host, or a volume every container on it
shares) or `s3://bucket/prefix`, an S3-compatible object store every host reaches
(shared/object_store.py), read through a cache on each host. Either way an artifact lives
at `<kind>/<sha[:2]>/<sha>/` and the registry records that path and the sha256.

No pickle anywhere: arrays are read with `allow_pickle=False`, and every read checks
the file's sha256 against the one the caller expects before loading a byte of it. The
arrays a read returns are views of the verified bytes (shared/npz.py), not copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from shared.errors import RecsysError
from shared.npz import NpzError, npz_arrays, write_npz
from shared.settings import get_settings

ARRAYS, MANIFEST = "arrays.npz", "manifest.json"
OBJECT_STORE_SCHEME = "s3://"


class ArtifactError(RecsysError):
    """An artifact is missing, damaged or does not match its recorded checksum, or the
    store holding it cannot be reached."""


@dataclass(frozen=True)
class ArtifactRef:
    path: str  # relative to MODEL_PATH: <kind>/<sha[:2]>/<sha>
    sha256: str


class ArtifactStore(Protocol):
    """Where artifacts live; `write_artifact` and `read_artifact` are its only callers."""

    url: str

    def staging(self) -> Path:
        """A local directory to write an artifact in before it is published."""

    def exists(self, path: str) -> bool:
        """Whether the artifact at `path` is published (its manifest is there)."""

    def publish(self, path: str, arrays_file: Path, manifest_text: str) -> None:
        """Store the arrays (moved from `arrays_file`), then the manifest, at `path`."""

    def arrays_data(self, path: str, sha256: str) -> bytearray:
        """The artifact's arrays file in memory, its sha256 verified."""

    def manifest_text(self, path: str) -> str:
        """The artifact's manifest as stored."""

    def local_file(self, key: str) -> Path:
        """A local file to write `key` (relative to the store) before `put_file`."""

    def put_file(self, local: Path, key: str) -> str:
        """Publish a file made with `local_file` under `key`; returns where it now lives."""


def is_object_store(location: str | Path) -> bool:
    return str(location).startswith(OBJECT_STORE_SCHEME)


def open_store(root: str | Path | None = None) -> ArtifactStore:
    """The store at `root` (a directory or an s3:// URL); MODEL_PATH when None."""
    location = str(root) if root is not None else get_settings().model_path
    if is_object_store(location):
        from shared.object_store import object_store

        return object_store(location)
    return LocalStore(Path(location))


def store_root(root: str | Path | None = None) -> Path:
    """The directory of a local store (MODEL_PATH when None)."""
    location = str(root) if root is not None else get_settings().model_path
    if is_object_store(location):
        raise ArtifactError(f"MODEL_PATH {location} is an object store, not a directory")
    return Path(location)


def read_whole(path: Path) -> bytearray:
    """A file's bytes in a buffer of their own (writable: arrays viewing it are too)."""
    with path.open("rb", buffering=0) as handle:
        data = bytearray(os.fstat(handle.fileno()).st_size)
        view, done = memoryview(data), 0
        while done < len(data) and (read := handle.readinto(view[done:])):
            done += read
    return data[:done] if done < len(data) else data


def checksum_mismatch(path: str, expected: str, actual: str) -> ArtifactError:
    return ArtifactError(
        f"artifact {path}: checksum mismatch (expected sha256 {expected}, file has {actual}); "
        "refusing to load a modified artifact"
    )


class LocalStore:
    """A directory: the single-host store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def staging(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def exists(self, path: str) -> bool:
        return (self.root / path / MANIFEST).exists()

    def publish(self, path: str, arrays_file: Path, manifest_text: str) -> None:
        target = self.root / path
        target.mkdir(parents=True, exist_ok=True)
        shutil.move(arrays_file, target / ARRAYS)
        write_whole(target / MANIFEST, manifest_text)  # the manifest appears last, whole

    def arrays_data(self, path: str, sha256: str) -> bytearray:
        arrays_file = self.root / path / ARRAYS
        if not arrays_file.exists():
            raise ArtifactError(f"artifact {path}: {arrays_file} is missing")
        data = read_whole(arrays_file)
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise checksum_mismatch(path, sha256, actual)
        return data

    def manifest_text(self, path: str) -> str:
        try:
            return (self.root / path / MANIFEST).read_text()
        except OSError as error:
            raise ArtifactError(f"artifact {path}: manifest unreadable ({error})") from None

    def local_file(self, key: str) -> Path:
        return self.root / key

    def put_file(self, local: Path, key: str) -> str:
        return str(local.resolve())


def write_whole(target: Path, text: str) -> None:
    """Write `text` beside `target`, then rename it into place: readers see all or nothing."""
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    partial.write_text(text)
    partial.replace(target)


def write_artifact(kind: str, arrays: dict[str, np.ndarray], manifest: dict[str, Any],
                   root: str | Path | None = None) -> ArtifactRef:
    """Store arrays and a manifest; the same bytes always land at the same path."""
    for name, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise ArtifactError(f"array {name!r} has dtype object, which would need pickle")
    store = open_store(root)
    handle, temp_name = tempfile.mkstemp(dir=store.staging(), suffix=".npz")
    os.close(handle)
    temp = Path(temp_name)
    try:
        sha256 = write_npz(temp, arrays)
        path = f"{kind}/{sha256[:2]}/{sha256}"
        if not store.exists(path):
            described = {
                **manifest,
                "sha256": sha256,
                "arrays": {n: {"dtype": str(a.dtype), "shape": list(a.shape)}
                           for n, a in arrays.items()},
            }
            store.publish(path, temp, json.dumps(described, indent=2, sort_keys=True,
                                                 default=str))
    finally:
        temp.unlink(missing_ok=True)
    return ArtifactRef(path, sha256)


def read_manifest(path: str, root: str | Path | None = None) -> dict[str, Any]:
    return parse_manifest(path, open_store(root).manifest_text(path))


def parse_manifest(path: str, text: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except ValueError as error:
        raise ArtifactError(f"artifact {path}: manifest unreadable ({error})") from None


def read_artifact(path: str, sha256: str, root: str | Path | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and manifest of an artifact, refused unless its sha256 is the expected one."""
    store = open_store(root)
    with ThreadPoolExecutor(1) as beside:  # the manifest's round trip during the arrays'
        manifest_text = beside.submit(store.manifest_text, path)
        data = store.arrays_data(path, sha256)
        manifest = parse_manifest(path, manifest_text.result())
    if manifest.get("sha256") != sha256:
        raise ArtifactError(f"artifact {path}: manifest names sha256 {manifest.get('sha256')}, "
                            f"expected {sha256}")
    try:
        return npz_arrays(data), manifest  # views of `data`: no copy of the verified bytes
    except (NpzError, ValueError) as error:
        raise ArtifactError(f"artifact {path}: arrays unreadable ({error})") from None


def csr_to_arrays(prefix: str, matrix: sp.csr_matrix) -> dict[str, np.ndarray]:
    """A CSR matrix as plain arrays named `<prefix>.data`, `.indices`, `.indptr`, `.shape`."""
    matrix = sp.csr_matrix(matrix)
    return {f"{prefix}.data": matrix.data, f"{prefix}.indices": matrix.indices,
            f"{prefix}.indptr": matrix.indptr,
            f"{prefix}.shape": np.asarray(matrix.shape, dtype=np.int64)}


def arrays_to_csr(prefix: str, arrays: dict[str, np.ndarray]) -> sp.csr_matrix:
    """The CSR matrix `csr_to_arrays` stored under `prefix`."""
    try:
        shape = tuple(int(n) for n in arrays[f"{prefix}.shape"])
        return sp.csr_matrix((arrays[f"{prefix}.data"], arrays[f"{prefix}.indices"],
                              arrays[f"{prefix}.indptr"]), shape=shape)
    except KeyError as error:
        missing = error.args[0]
        raise ArtifactError(f"artifact has no matrix {prefix!r} ({missing} missing)") from None
