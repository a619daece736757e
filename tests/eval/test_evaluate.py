"""`eval.evaluate` / `recsys eval`: one version beside the most-popular baseline, stored."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from services.eval.offline import EvaluationError
from services.eval.versions import UnknownVersionError, evaluate_version
from services.ingest.ingest import ingest_source
from services.registry import registry
from services.train.training import fit_on_snapshot, load_snapshot
from services.transform.snapshot import SnapshotParams, build_snapshot
from shared.celery_app import run_task
from shared.errors import RecsysError
from shared.metrics import METRIC_NAMES
from tests.conftest import recsys_command
from tests.ingest.test_embedded import embedded_env

K_VALUES = [5, 10, 20]


def every_metric(metrics: dict[str, float], ks: list[int] = K_VALUES) -> None:
    missing = [f"{n}@{k}" for n in METRIC_NAMES for k in ks if f"{n}@{k}" not in metrics]
    assert not missing, missing


def fit_and_register(snapshot: dict, algorithm: str, params: dict | None = None) -> int:  # type: ignore[type-arg]
    trained = fit_on_snapshot(load_snapshot(snapshot), algorithm, params)
    return registry.register(snapshot["snapshot_id"], algorithm, trained["params"],
                             trained["artifact_path"], trained["sha256"],
                             # figures registered earlier must survive the evaluation
                             metrics={"validation_ndcg@10": 0.3})["version"]


@pytest.fixture
def champion(pg_url: str, use_settings, tmp_path: Path, ml100k: Path) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """ml-100k in a fresh Postgres: a random-split snapshot and a small ALS as champion."""
    use_settings(DATABASE_URL=pg_url, MODEL_PATH=str(tmp_path / "models"),
                 EVAL_K_VALUES="5,10,20")
    ingest_source(str(ml100k))
    snapshot = build_snapshot(SnapshotParams.from_settings(protocol="random"))
    version = fit_and_register(snapshot, "als", {"factors": 16, "iterations": 5})
    registry.promote(version, reason="first model")
    return snapshot


def test_latest_is_the_champion_measured_beside_the_baseline_and_stored(champion: dict  # type: ignore[type-arg]
                                                                        ) -> None:
    result = evaluate_version("latest")
    assert (result["version"], result["algorithm"], result["aliases"]) == (1, "als",
                                                                           ["champion"])
    assert result["snapshot"] == champion["snapshot_id"] and result["protocol"] == "random"
    assert result["params"]["factors"] == 16 and result["k_values"] == K_VALUES
    every_metric(result["metrics"])
    baseline = result["baseline"]
    every_metric(baseline["metrics"])
    # No `popular` version on this snapshot: the baseline is counted from its train split.
    assert (baseline["algorithm"], baseline["version"]) == ("popular", None)
    assert result["metrics"]["ndcg@10"] > baseline["metrics"]["ndcg@10"] + 0.05
    assert 0.2 < baseline["metrics"]["ndcg@10"] < 0.3  # most-popular on ml-100k, random split
    assert baseline["metrics"]["coverage@10"] < result["metrics"]["coverage@10"]
    stored = registry.get_version(1)["metrics"]
    assert stored["ndcg@10"] == result["metrics"]["ndcg@10"]
    assert stored["baseline_ndcg@10"] == baseline["metrics"]["ndcg@10"]
    assert "validation_ndcg@10" in stored  # merged, not replaced
    every_metric(stored)

    # Through the task, by number, at other k: the same figures, deterministically.
    again = run_task("eval.evaluate", {"model": "1", "k_values": [10, 3]})
    assert again["k_values"] == [3, 10]
    assert again["metrics"]["ndcg@10"] == pytest.approx(result["metrics"]["ndcg@10"])
    assert "ndcg@3" in registry.get_version(1)["metrics"]

    # A registered most-popular version on the same snapshot becomes the baseline; its
    # counts are the snapshot's train counts, so the figures do not change.
    popular = fit_and_register(champion, "popular")
    beside = evaluate_version(1)["baseline"]
    assert (beside["version"], beside["source"]) == (popular, "registered")
    assert beside["metrics"]["ndcg@10"] == pytest.approx(baseline["metrics"]["ndcg@10"])
    registry.promote(popular, alias="challenger", reason="test")
    challenger = evaluate_version("challenger")
    assert (challenger["version"], challenger["algorithm"]) == (popular, "popular")
    assert challenger["baseline"]["metrics"] == challenger["metrics"]


def test_a_seeded_sample_of_users_with_confidence_intervals(champion: dict  # type: ignore[type-arg]
                                                            ) -> None:
    whole = evaluate_version("latest")
    assert "sample" not in whole and "intervals" not in whole
    sampled = evaluate_version("latest", sample_users=300)
    assert sampled["sample"] == {"users": 300, "test_users": champion["counts"]["test_users"],
                                 "seed": 42}
    for name in ("ndcg", "precision", "recall", "map", "hit_rate", "mrr"):
        for k in K_VALUES:
            low, high = sampled["intervals"][f"{name}@{k}"]
            assert low < sampled["metrics"][f"{name}@{k}"] < high
            assert high - low < 0.15
    # The estimate brackets the figure over every user, and the same seed draws the same users.
    low, high = sampled["intervals"]["ndcg@10"]
    assert low <= whole["metrics"]["ndcg@10"] <= high
    assert sampled["metrics"]["ndcg@10"] != whole["metrics"]["ndcg@10"]
    again = run_task("eval.evaluate", {"model": "latest", "sample_users": 300})
    assert again["metrics"] == sampled["metrics"]
    with pytest.raises(EvaluationError, match="sample of users must be 0"):
        evaluate_version("latest", sample_users=-1)


def test_unknown_versions_are_clear_errors(champion: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(UnknownVersionError, match=r"model 'recsys' has no version 99; "
                                                  r"versions are 1") as error:
        evaluate_version("99")
    assert isinstance(error.value, RecsysError)
    with pytest.raises(UnknownVersionError, match=r"model version 'best' is not a number"):
        run_task("eval.evaluate", {"model": "best"})
    with pytest.raises(UnknownVersionError, match=r"has no challenger yet"):
        evaluate_version("challenger")


def test_latest_without_a_champion_is_a_clear_error(pg_url: str, use_settings) -> None:  # type: ignore[no-untyped-def]
    use_settings(DATABASE_URL=pg_url)
    with pytest.raises(UnknownVersionError, match=r"has no champion yet, so --model latest"):
        evaluate_version("latest")


def recsys(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*recsys_command(), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_cli_eval_on_embedded_defaults(tmp_path: Path, ml100k: Path) -> None:
    env = embedded_env(tmp_path, DATA_SOURCE=str(ml100k))
    built = recsys("pipeline", "--stages", "all", "--algorithms", "popular,ease", "--trials",
                   "2", "--json", cwd=tmp_path, env=env)
    assert built.returncode == 0, built.stderr
    champion = json.loads(built.stdout.strip().splitlines()[-1])["champion"]

    done = recsys("eval", "--model", "latest", "--json", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["version"], result["algorithm"]) == (champion["version"], "ease")
    for key in ("ndcg@10", "coverage@10", "novelty@10", "popularity_bias@10", "mrr@10"):
        assert key in result["metrics"] and key in result["baseline"]["metrics"]
    assert result["baseline"]["source"] == "registered"  # the pipeline trained `popular`
    assert result["metrics"]["ndcg@10"] > result["baseline"]["metrics"]["ndcg@10"]

    table = recsys("eval", "--model", str(champion["version"]), "--k", "5,10", cwd=tmp_path,
                   env=env)
    assert table.returncode == 0, table.stderr
    assert "popular@10" in table.stdout and "ndcg" in table.stdout
    assert "@20" not in table.stdout
    sampled = recsys("eval", "--sample-users", "200", "--k", "10", cwd=tmp_path, env=env)
    assert sampled.returncode == 0, sampled.stderr
    assert "±" in sampled.stdout and "measured on 200 of 943 test users" in sampled.stdout

    unknown = recsys("eval", "--model", "99", cwd=tmp_path, env=env)
    assert unknown.returncode == 1
    assert "no version 99" in unknown.stderr and "Traceback" not in unknown.stderr
    bad_k = recsys("eval", "--k", "ten", cwd=tmp_path, env=env)
    assert bad_k.returncode == 2 and "--k 'ten'" in bad_k.stderr

    report = recsys("report", "--output", str(tmp_path / "r" / "report.html"), "--json",
                    cwd=tmp_path, env=env)
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout.strip().splitlines()[-1])
    assert summary["champion"] == champion["version"] and summary["versions"] == 2
    assert "No online data yet" in (tmp_path / "r" / "report.html").read_text()
