"""The artifact store: npz arrays plus a JSON manifest, content-addressed by sha256.

No pickle anywhere: arrays are read with `allow_pickle=False`, and every read checks
the file's sha256 against the one the caller expects before loading a byte of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from shared.errors import RecsysError
from shared.settings import get_settings

ARRAYS, MANIFEST = "arrays.npz", "manifest.json"


class ArtifactError(RecsysError):
    """An artifact is missing, damaged or does not match its recorded checksum."""


@dataclass(frozen=True)
class ArtifactRef:
    path: str  # relative to MODEL_PATH: <kind>/<sha[:2]>/<sha>
    sha256: str


def store_root(root: Path | None = None) -> Path:
    return Path(root or get_settings().model_path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_artifact(kind: str, arrays: dict[str, np.ndarray], manifest: dict[str, Any],
                   root: Path | None = None) -> ArtifactRef:
    """Store arrays and a manifest; the same bytes always land at the same path."""
    base = store_root(root) / kind
    base.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise ArtifactError(f"array {name!r} has dtype object, which would need pickle")
    handle, temp_name = tempfile.mkstemp(dir=base, suffix=".npz")
    os.close(handle)
    temp = Path(temp_name)
    try:
        np.savez(temp, **arrays)
        sha256 = file_sha256(temp)
        target = base / sha256[:2] / sha256
        if not (target / MANIFEST).exists():
            target.mkdir(parents=True, exist_ok=True)
            shutil.move(temp, target / ARRAYS)
            described = {
                **manifest,
                "sha256": sha256,
                "arrays": {n: {"dtype": str(a.dtype), "shape": list(a.shape)}
                           for n, a in arrays.items()},
            }
            partial = target / (MANIFEST + ".part")
            partial.write_text(json.dumps(described, indent=2, sort_keys=True, default=str))
            partial.replace(target / MANIFEST)  # the manifest appears last, whole
    finally:
        temp.unlink(missing_ok=True)
    return ArtifactRef(f"{kind}/{sha256[:2]}/{sha256}", sha256)


def read_manifest(path: str, root: Path | None = None) -> dict[str, Any]:
    where = store_root(root) / path / MANIFEST
    try:
        return json.loads(where.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"artifact {path}: manifest unreadable ({error})") from None


def read_artifact(path: str, sha256: str, root: Path | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and manifest of an artifact, refused unless its sha256 is the expected one."""
    folder = store_root(root) / path
    arrays_file = folder / ARRAYS
    if not arrays_file.exists():
        raise ArtifactError(f"artifact {path}: {arrays_file} is missing")
    actual = file_sha256(arrays_file)
    if actual != sha256:
        raise ArtifactError(
            f"artifact {path}: checksum mismatch (expected sha256 {sha256}, file has {actual}); "
            "refusing to load a modified artifact"
        )
    manifest = read_manifest(path, root)
    if manifest.get("sha256") != sha256:
        raise ArtifactError(f"artifact {path}: manifest names sha256 {manifest.get('sha256')}, "
                            f"expected {sha256}")
    with np.load(arrays_file, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    return arrays, manifest


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
