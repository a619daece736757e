"""The artifact store: npz + manifest, content-addressed, verified on every read."""

from __future__ import annotations

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


def test_round_trip_and_content_addressing(tmp_path: Path) -> None:
    matrix = sp.random(20, 30, density=0.2, format="csr", random_state=3, dtype=np.float32)
    arrays = {"ids": np.arange(5), "names": np.array(["a", "bé"]), **csr_to_arrays("m", matrix)}
    ref = write_artifact("models", arrays, {"algorithm": "x"}, root=tmp_path)
    again = write_artifact("models", arrays, {"algorithm": "x"}, root=tmp_path)
    loaded, manifest = read_artifact(ref.path, ref.sha256, root=tmp_path)
    assert again == ref and ref.path.endswith(ref.sha256)
    assert manifest["algorithm"] == "x" and manifest["sha256"] == ref.sha256
    assert manifest["arrays"]["ids"] == {"dtype": "int64", "shape": [5]}
    assert (arrays_to_csr("m", loaded) != matrix).nnz == 0
    assert loaded["names"].tolist() == ["a", "bé"]


def test_tampered_artifact_is_refused(tmp_path: Path) -> None:
    ref = write_artifact("models", {"w": np.ones(100)}, {}, root=tmp_path)
    path = tmp_path / ref.path / "arrays.npz"
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"checksum mismatch \(expected sha256 "):
        read_artifact(ref.path, ref.sha256, root=tmp_path)


def test_wrong_expected_checksum_and_missing_files(tmp_path: Path) -> None:
    ref = write_artifact("models", {"w": np.ones(3)}, {}, root=tmp_path)
    with pytest.raises(ArtifactError, match="refusing to load a modified artifact"):
        read_artifact(ref.path, "0" * 64, root=tmp_path)
    with pytest.raises(ArtifactError, match="is missing"):
        read_artifact("models/00/nothing", "0" * 64, root=tmp_path)
    with pytest.raises(ArtifactError, match="manifest unreadable"):
        read_manifest("models/00/nothing", root=tmp_path)


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="dtype object, which would need pickle"):
        write_artifact("models", {"bad": np.array([{"a": 1}], dtype=object)}, {}, root=tmp_path)
