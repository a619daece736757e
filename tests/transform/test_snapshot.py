"""Snapshots from the real Postgres: streaming load, splits, idempotency, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from services.ingest.ingest import ingest_source
from services.transform.loading import load_ratings
from services.transform.snapshot import SnapshotError, SnapshotParams, build_snapshot
from shared.artifacts import arrays_to_csr, read_artifact
from shared.db import Snapshot, session_scope
from shared.db.session import engine_for


@pytest.fixture
def loaded(pg_url: str, use_settings, tmp_path: Path, ml100k: Path) -> str:  # type: ignore[no-untyped-def]
    use_settings(DATABASE_URL=pg_url, MODEL_PATH=str(tmp_path / "models"))
    ingest_source(str(ml100k))
    return pg_url


def test_binary_copy_reads_every_rating(loaded: str, ml100k: Path) -> None:
    frame = load_ratings(engine_for(loaded))
    raw = np.loadtxt(ml100k / "u.data", dtype=np.int64)
    assert len(frame) == 100_000
    assert frame["rating"].sum() == raw[:, 2].sum()
    assert frame["rated_at"].sum() == raw[:, 3].sum()
    assert frame["user_id"].nunique() == 943 and frame["movie_id"].nunique() == 1682


def test_random_snapshot_contents_and_idempotency(loaded: str) -> None:
    params = SnapshotParams.from_settings(protocol="random")
    first = build_snapshot(params)
    again = build_snapshot(params)
    assert first["created"] and not again["created"]
    assert again["snapshot_id"] == first["snapshot_id"]
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Snapshot)) == 1
    arrays, manifest = read_artifact(first["artifact_path"], first["sha256"])
    train, test = arrays_to_csr("train", arrays), arrays_to_csr("test", arrays)
    assert train.shape == test.shape == (943, 1682)
    assert train.nnz + test.nnz == 100_000
    assert train.multiply(test).nnz == 0  # no rating both trains and tests
    val_train = arrays_to_csr("validation_train", arrays)
    val_test = arrays_to_csr("validation_test", arrays)
    assert val_train.nnz + val_test.nnz == train.nnz  # validation is carved from train only
    assert (val_test.multiply(test)).nnz == 0
    assert manifest["params"]["seed"] == 42 and manifest["split"]["policy"] == "random"
    assert arrays["item_genres"].shape == (1682, len(arrays["genre_names"]))
    other = build_snapshot(SnapshotParams.from_settings(protocol="random", seed=7))
    assert other["snapshot_id"] != first["snapshot_id"]


def test_item_stratified_snapshot_cuts_each_item(loaded: str, use_settings) -> None:  # type: ignore[no-untyped-def]
    """EVAL_STRATIFY=item: every item keeps round(0.75 x its ratings) in train, validation
    is carved per item from train, and the snapshot is another than the per-user one."""
    by_user = build_snapshot(SnapshotParams.from_settings(protocol="random"))
    use_settings(EVAL_STRATIFY="item")
    by_item = build_snapshot(SnapshotParams.from_settings(protocol="random"))
    assert by_item["snapshot_id"] != by_user["snapshot_id"]
    arrays, manifest = read_artifact(by_item["artifact_path"], by_item["sha256"])
    assert manifest["split"]["params"]["stratify"] == "item"
    assert manifest["validation"]["params"]["stratify"] == "item"
    train, test = arrays_to_csr("train", arrays), arrays_to_csr("test", arrays)
    per_item = np.diff(train.tocsc().indptr) + np.diff(test.tocsc().indptr)
    expected = np.maximum(np.array([round(0.75 * n) for n in per_item]), 1)
    assert (np.diff(train.tocsc().indptr) == expected).all()


def test_unknown_stratify_is_a_clear_error(loaded: str) -> None:
    with pytest.raises(SnapshotError, match="stratify 'movie' is not one of user, item"):
        SnapshotParams.from_settings(stratify="movie")


def test_leave_last_n_and_temporal(loaded: str) -> None:
    last = build_snapshot(SnapshotParams.from_settings(protocol="leave-last-n"))
    assert last["counts"]["test"] == 943
    temporal = build_snapshot(SnapshotParams.from_settings(protocol="temporal",
                                                           split_date="1998-03-01"))
    assert 0 < temporal["counts"]["test"] < 100_000


def test_temporal_date_outside_the_data_is_a_clear_error(loaded: str) -> None:
    with pytest.raises(SnapshotError, match=r"EVAL_SPLIT_DATE 2000-11-01: .*outside the data: "
                                            r"ratings run from 1997-09-20.* to 1998-04-22"):
        build_snapshot(SnapshotParams.from_settings(protocol="temporal"))


def test_no_ratings_is_a_clear_error(pg_url: str, use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings(DATABASE_URL=pg_url)
    with pytest.raises(SnapshotError, match="no ratings to snapshot; run `recsys ingest`"):
        build_snapshot(SnapshotParams.from_settings())


def test_statistics_match_the_train_split(loaded: str) -> None:
    snapshot = build_snapshot(SnapshotParams.from_settings())
    arrays, _ = read_artifact(snapshot["artifact_path"], snapshot["sha256"])
    train = arrays_to_csr("train", arrays)
    assert (arrays["item_train_count"] == np.diff(train.tocsc().indptr)).all()
    assert (arrays["user_train_count"] == np.diff(train.indptr)).all()
    user0 = train[0].data
    assert arrays["user_mean_rating"][0] == pytest.approx(user0.mean(), rel=1e-5)
