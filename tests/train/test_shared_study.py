"""Trials of one search spread over real `recsys worker train` processes through a study in
Postgres: every worker draws trials, the study holds the cap, the result is its best."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pytest
import scipy.sparse as sp

from services.train.studies import study_storage
from services.train.training import study_name
from shared.artifacts import csr_to_arrays, write_artifact
from shared.celery_app import ServiceQueue, answering_workers, run_task
from tests.conftest import purge_service_queues, recsys_command, wait_for


@pytest.fixture
def env(pg_url: str, broker_url: str, redis_url: str, use_settings,  # type: ignore[no-untyped-def]
        tmp_path: Path) -> dict[str, str]:
    values = {"DATABASE_URL": pg_url, "BROKER_URL": broker_url, "REDIS_URL": redis_url,
              "DATA_PATH": str(tmp_path / "data"), "MODEL_PATH": str(tmp_path / "models"),
              "TUNE_WORKERS": "2", "TRAIN_THREADS": "1"}
    use_settings(**values)
    purge_service_queues()
    return values


@pytest.fixture
def start_worker(env: dict[str, str], tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> None:
        path = tmp_path / f"{name}.log"
        log = path.open("wb")
        started.append(subprocess.Popen([*recsys_command(), "worker", "train", "--hostname",
                                         f"train@{name}.%h"],
                                        env={**os.environ, **env}, cwd=tmp_path,
                                        stdout=log, stderr=subprocess.STDOUT))
        count = len(started)
        wait_for(lambda: answering_workers(ServiceQueue.TRAIN) >= count, timeout=90,
                 what=f"{count} train worker(s) to answer")

    yield start
    for process in started:
        process.terminate()
    for process in started:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def snapshot(env: dict[str, str]) -> dict:
    rng = np.random.default_rng(12)
    taste = np.where(np.arange(400)[:, None] < 200, np.arange(300) < 150, np.arange(300) >= 150)
    matrix = sp.csr_matrix((rng.random((400, 300)) < np.where(taste, 0.2, 0.03)
                            ).astype(np.float32) * 4.0)
    held = sp.csr_matrix((rng.random((400, 300)) < np.where(taste, 0.05, 0.01)
                          ).astype(np.float32) * 4.0)
    held = held - held.multiply(matrix > 0)
    held.eliminate_zeros()
    arrays = {"user_ids": np.arange(1, 401), "item_ids": np.arange(1, 301)}
    for name, part in (("train", matrix), ("validation_train", matrix),
                       ("validation_test", held), ("test", held)):
        arrays.update(csr_to_arrays(name, sp.csr_matrix(part)))
    ref = write_artifact("snapshots", arrays, {"kind": "snapshot"})
    return {"snapshot_id": "shared-study", "artifact_path": ref.path, "sha256": ref.sha256}


def _study(env: dict[str, str], run: dict) -> optuna.Study:
    name = run["tuning"]["study"]
    assert name == study_name(run["snapshot"], "als", run["task_id"])
    return optuna.load_study(study_name=name, storage=study_storage(env["DATABASE_URL"]))


def test_trials_spread_over_train_workers(env: dict[str, str], start_worker,  # type: ignore[no-untyped-def]
                                          snapshot: dict) -> None:
    # One worker: it draws every trial itself; the task asking a second worker waits.
    start_worker("first")
    (alone,) = run_task("train.tune", {"snapshot": snapshot, "algorithms": ["als"],
                                       "n_trials": 10}, timeout=600)
    study = _study(env, alone)
    assert len(study.trials) == 10 and alone["tuning"]["trials_run"] == 10
    assert len(alone["tuning"]["workers"]) == 1

    # Two workers: the second takes the waiting task (the full study: it returns at once)
    # and then the new search's, and both draw trials of that one study.
    start_worker("second")
    (both,) = run_task("train.tune", {"snapshot": snapshot, "algorithms": ["als"],
                                      "n_trials": 20}, timeout=600)
    study = _study(env, both)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 20 and both["tuning"]["trials_run"] == 20
    assert sorted({t.number for t in trials}) == list(range(20))
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2 and sorted(workers) == both["tuning"]["workers"]
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in trials)
    best = study.best_trial
    assert both["validation"] == {"validation_ndcg@10": best.value}
    assert {k: both["params"][k] for k in best.params} == best.params
