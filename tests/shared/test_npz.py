"""npz files whose arrays are read in place (shared/npz.py)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from shared.npz import NpzError, npz_arrays, write_npz


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {"factors": rng.standard_normal((300, 7), dtype=np.float32),
            "ids": np.arange(9, dtype=np.int64), "names": np.array(["a", "bé"]),
            "fortran": np.asfortranarray(rng.random((4, 3))), "empty": np.zeros((0, 3)),
            "scalar": np.float64(2.5)}


def test_aligned_npz_reads_in_place_and_with_np_load(tmp_path: Path) -> None:
    arrays = sample()
    target = tmp_path / "a.npz"
    write_npz(target, arrays)
    data = bytearray(target.read_bytes())
    loaded = npz_arrays(data)
    with np.load(target, allow_pickle=False) as numpy_loaded:
        assert sorted(numpy_loaded.files) == sorted(arrays)
        for name, array in arrays.items():
            assert np.array_equal(numpy_loaded[name], array)
    whole = np.frombuffer(data, dtype=np.uint8)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name], array), name
        assert loaded[name].flags.aligned and loaded[name].flags.writeable, name
        if array.size:
            assert np.shares_memory(loaded[name], whole), name  # a view, not a copy
    write_npz(tmp_path / "b.npz", arrays)
    assert (tmp_path / "b.npz").read_bytes() == target.read_bytes()  # same arrays, same bytes


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_numpy_written_npz_still_reads(tmp_path: Path, save) -> None:  # type: ignore[no-untyped-def]
    arrays = sample()
    save(tmp_path / "a.npz", **arrays)
    loaded = npz_arrays(bytearray((tmp_path / "a.npz").read_bytes()))
    for name, array in arrays.items():
        assert np.array_equal(loaded[name], array), name


def test_what_is_not_an_npz_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NpzError, match="not an npz file"):
        npz_arrays(bytearray(b"plain text, no zip"))
    with zipfile.ZipFile(tmp_path / "o.npz", "w") as archive:
        with archive.open("o.npy", "w") as stream:
            np.lib.format.write_array(stream, np.array([{"a": 1}], dtype=object),
                                      allow_pickle=True)
    with pytest.raises(NpzError, match="dtype object"):
        npz_arrays(bytearray((tmp_path / "o.npz").read_bytes()))
