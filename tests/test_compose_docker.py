"""`docker compose up` on a real Docker engine: the project's Dockerfile and compose file
as a user runs them, with only the data sets mounted (deploy/compose.datasets.yml), a
project name and host ports of this test's own.

One compose project for the whole module: one build and `up`, then the scenarios in order
(they share its state: the feedback row counted after `down`/`up`, ...), and `down -v`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.chaos import Load, one_each, recommendations_noting_versions, send_malformed
from tests.compose_stack import (
    API_KEY,
    COMPOSE_FILES,
    FLOWER,
    PROJECT_DIR,
    Stack,
    compose_stack,
    images,
)
from tests.conftest import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]

PROJECT = os.environ.get("RECSYS_COMPOSE_TEST_PROJECT", "recsys-compose-test")
IMAGES = images(PROJECT)
ONE_SHOTS = ("migrate", "bootstrap")
WORKERS = ("ingest", "transform", "train", "registry", "eval")


@pytest.fixture(scope="module")
def stack(ml100k: Path, pytestconfig: pytest.Config) -> Iterator[Stack]:
    with compose_stack(ml100k, pytestconfig, PROJECT, COMPOSE_FILES) as stack:
        yield stack


def test_first_up_serves_a_champion_and_every_service_is_healthy(stack: Stack) -> None:
    served = stack.up_until_champion()
    assert served["variant"] == "champion" and served["items"], served
    assert served["model_version"] >= 1

    def all_healthy() -> bool:
        states = {s["Service"]: s for s in stack.services()}
        return all(s["Health"] == "healthy" for name, s in states.items()
                   if name not in ONE_SHOTS) and all(
            states[name]["State"] == "exited" and states[name]["ExitCode"] == 0
            for name in ONE_SHOTS)

    wait_for(all_healthy, timeout=180, interval=5,
             what="every long-running service healthy, migrate and bootstrap exited 0")
    assert {s["Service"] for s in stack.services() if s["State"] == "running"} >= {
        *WORKERS, "serve", "flower", "prometheus", "beat", "policy", "dashboard"}
    # Serve and its fellows run the serve image, which has no training libraries.
    for service, image in (("serve", "RECSYS_SERVE_IMAGE"), ("train", "RECSYS_IMAGE")):
        (container,) = stack.compose("ps", "-q", service).stdout.split()
        used = subprocess.run(["docker", "inspect", "-f", "{{.Config.Image}}", container],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert used == IMAGES[image], (service, used)
    missing = stack.compose("exec", "-T", "serve", "python", "-c", "import sansa",
                            check=False)
    assert missing.returncode != 0 and "No module named" in missing.stderr, missing.stderr


def test_feedback_with_the_api_key_is_stored_in_the_compose_postgres(stack: Stack) -> None:
    event = {"event_id": str(uuid.uuid4()), "user_id": 1, "movie_id": 1, "type": "rating",
             "value": 4.0}
    refused = httpx.post(stack.url("serve", "/feedback"), json=event, timeout=10)
    assert refused.status_code == 401, refused.text
    accepted = httpx.post(stack.url("serve", "/feedback"), json=event, timeout=10,
                          headers={"X-API-Key": API_KEY})
    assert accepted.status_code == 202, accepted.text
    query = f"SELECT user_id, movie_id, type, value FROM feedback WHERE event_id = " \
            f"'{event['event_id']}'"
    row = wait_for(lambda: stack.sql(query), timeout=60, interval=1,
                   what="the feedback row in the compose Postgres")
    assert row == "1|1|rating|4"


def counts_by(stack: Stack, column: str, table: str, where: str = "TRUE") -> dict[str, int]:
    """Rows of a compose Postgres `table` per value of `column`."""
    text = stack.sql(f"SELECT {column} || ':' || count(*) FROM {table} WHERE {where} "
                     f"GROUP BY {column}")
    return {value: int(count) for value, count in
            (line.rsplit(":", 1) for line in text.splitlines() if ":" in line)}


def stored_per_user(stack: Stack, first_user: int) -> dict[int, int]:
    """Feedback rows per user from `first_user` on, in the compose Postgres."""
    return {int(user): count for user, count in
            counts_by(stack, "user_id", "feedback", f"user_id >= {first_user}").items()}


def wait_healthy(stack: Stack, service: str) -> None:
    wait_for(lambda: {s["Service"]: s["Health"] for s in stack.services()}[service]
             == "healthy", timeout=180, interval=5, what=f"the restarted {service} healthy")


def restart_under_feedback(stack: Stack, service: str, first_user: int,
                           outage: float = 8.0) -> dict[str, Any]:
    """POST /feedback (one event per request, user `first_user` + request number) while
    the compose `service` stops for `outage` seconds and starts again; the counts once
    every accepted event is stored or two minutes have passed."""
    url = stack.url("serve", "")

    def request(client: httpx.Client, number: int) -> httpx.Response:
        return client.post(url + "/feedback", json={"user_id": first_user + number,
                                                    "movie_id": 1 + number % 1000,
                                                    "type": "click"})

    # Ten events a second: through both restarts fewer than RETRAIN_MIN_FEEDBACK (1,000),
    # so the policy starts no retrain under the tests that follow.
    with Load(request, API_KEY, interval=0.1) as load:
        time.sleep(3)
        began = time.monotonic()
        stack.compose("stop", service, timeout=300)
        time.sleep(outage)
        stack.compose("start", service, timeout=300)
        outage_s = time.monotonic() - began
        time.sleep(3)
    accepted = {first_user + n for n in load.accepted}
    stored = wait_for(lambda: (lambda rows: rows if accepted <= rows.keys() else None)(
        stored_per_user(stack, first_user)), timeout=120, interval=2,
        what=f"every feedback event accepted across the {service} restart stored")
    counts = {"sent": load.sent, "accepted": len(accepted),
              "persisted": sum(1 for user in accepted if user in stored),
              "lost": sum(1 for user in accepted if user not in stored),
              "duplicated": sum(stored[user] - 1 for user in accepted if user in stored),
              "5xx": load.server_errors, "outage_s": round(outage_s, 1)}
    stack.say({"compose_chaos": f"feedback_{service}_restart", **counts})
    return counts


@pytest.mark.parametrize(("service", "first_user"), [("rabbitmq", 2_000_000),
                                                      ("postgres", 3_000_000)])
def test_feedback_across_a_restart_in_compose(stack: Stack, service: str,
                                              first_user: int) -> None:
    counts = restart_under_feedback(stack, service, first_user)
    assert counts["accepted"] > 0 and counts["persisted"] == counts["accepted"], counts
    assert (counts["lost"], counts["duplicated"], counts["5xx"]) == (0, 0, 0), counts
    wait_healthy(stack, service)


def test_recommendations_across_a_redis_restart_in_compose(stack: Stack) -> None:
    url = stack.url("serve", "")

    def request(client: httpx.Client, number: int) -> httpx.Response:
        return client.get(url + f"/recommendations/{1 + number % 900}", params={"k": 10})

    with Load(request, API_KEY) as load:
        time.sleep(3)
        began = time.monotonic()
        stack.compose("stop", "redis", timeout=300)
        time.sleep(8)
        stack.compose("start", "redis", timeout=300)
        outage_s = time.monotonic() - began
        time.sleep(3)
    counts = {"sent": load.sent, "answered": len(load.accepted), "5xx": load.server_errors,
              "connection_errors": load.connection_errors, "outage_s": round(outage_s, 1)}
    stack.say({"compose_chaos": "recommendations_redis_restart", **counts})
    assert counts["answered"] == counts["sent"] > 0, counts
    assert counts["5xx"] == counts["connection_errors"] == 0, counts


def test_flower_asks_for_credentials(stack: Stack) -> None:
    assert httpx.get(stack.url("flower", "/"), timeout=10).status_code == 401
    assert httpx.get(stack.url("flower", "/"), auth=("admin", "wrong"),
                     timeout=10).status_code == 401
    assert httpx.get(stack.url("flower", "/"), auth=FLOWER, timeout=10).status_code == 200


def test_the_dashboard_answers_on_its_port_behind_the_login(stack: Stack) -> None:
    assert httpx.get(stack.url("dashboard", "/login"), timeout=10).status_code == 200
    page = httpx.get(stack.url("dashboard", "/"), timeout=10)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")


def test_prometheus_scrapes_every_worker(stack: Stack) -> None:
    def targets() -> dict[str, str]:
        response = httpx.get(stack.url("prometheus", "/api/v1/targets"), timeout=10)
        return {t["labels"]["instance"].split(":")[0]: t["health"]
                for t in response.json()["data"]["activeTargets"]}

    wait_for(lambda: set(targets().values()) == {"up"}, timeout=120, interval=3,
             what="Prometheus to report every worker target up")
    assert targets() == dict.fromkeys(WORKERS, "up")


def active_tasks(stack: Stack, service: str, task: str) -> list[dict[str, Any]]:
    """The `task`s a worker's pool runs now, asked of the worker's own node."""
    result = stack.compose("exec", "-T", service, "sh", "-c",
                           "celery -A shared.celery_app:app inspect active -j "
                           f"-d {service}@$HOSTNAME --timeout 10", check=False)
    if result.returncode != 0:
        return []
    start = result.stdout.find("{")
    replies = json.loads(result.stdout[start:]) if start >= 0 else {}
    return [t for tasks in replies.values() for t in tasks if t["name"] == task]


def restarts(container: str) -> int:
    text = subprocess.run(["docker", "inspect", "-f", "{{.RestartCount}}", container],
                          capture_output=True, text=True).stdout.strip()
    return int(text) if text.isdigit() else 0


def crash(stack: Stack, service: str) -> None:
    """SIGKILL to the service container's init from the host, then Docker's restart of it.
    Docker sees a crash (a `docker kill` would count as a stop, which the restart policy
    honours); the worker's unacknowledged task goes back to its queue with its connection."""
    (container,) = stack.compose("ps", "-q", service).stdout.split()
    before = restarts(container)
    pid = int(subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", container],
                             capture_output=True, text=True, check=True).stdout)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: restarts(container) > before, timeout=60, interval=1,
             what=f"Docker to restart the killed {service} container")


class Hold:
    """A transaction of the test's own in the compose Postgres (psql kept open in its
    container) that makes a task wait half-way, so the kill lands mid-task whatever the
    machine's speed; rolled back on release."""

    def __init__(self, stack: Stack, sql: str) -> None:
        self.process = subprocess.Popen(
            stack.argv("exec", "-T", "postgres", "psql", "-U", "recsys", "-d", "recsys",
                       "-q", "-v", "ON_ERROR_STOP=1"),
            env=stack.env, cwd=PROJECT_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"\\o /dev/null\nBEGIN;\n{sql};\n\\echo held\n")
        self.process.stdin.flush()
        if self.process.stdout.readline().strip() != "held":
            _, err = self.process.communicate(timeout=30)
            pytest.fail(f"the hold `{sql}` was refused: {err}")

    def release(self) -> None:
        if self.process.poll() is None:
            self.process.communicate("ROLLBACK;\n", timeout=60)


def kill_mid_task(stack: Stack, service: str, task: str, command: list[str],
                  runner: str = "ingest", hold: str | None = None,
                  half_done: str | None = None) -> tuple[str, float]:
    """Run `command` in the `runner` container (it sends `task` to `service`'s queue and
    waits for it), crash `service`'s container while the task runs (behind `hold`, once
    the SQL `half_done` is true), and wait for the command: its stdout and the seconds
    from the kill to its end."""
    held = Hold(stack, hold) if hold else None
    process = subprocess.Popen(stack.argv("exec", "-T", runner, *command), env=stack.env,
                               cwd=PROJECT_DIR, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        running = wait_for(lambda: active_tasks(stack, service, task), timeout=600,
                           interval=1, what=f"{task} to run on the {service} worker")
        assert running, running
        if half_done:
            wait_for(lambda: stack.sql(half_done) == "t", timeout=300, interval=1,
                     what=f"{task} to be half done")
        began = time.monotonic()
        crash(stack, service)
        if held:
            held.release()
        out, err = process.communicate(timeout=1200)
        recovered = time.monotonic() - began
    finally:
        if held:
            held.release()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, f"{task} failed after the kill:\n{err[-3000:]}"
    wait_healthy(stack, service)
    return out, recovered


def say_killed(stack: Stack, service: str, counts: dict[str, int], outage_s: float) -> None:
    stack.say({"compose_chaos": f"{service}_worker_killed", "sent": 1, "accepted": 1,
               **counts, "5xx": 0, "outage_s": round(outage_s, 1)})


def offset_ml100k(source: Path, target: Path, offset: int) -> Path:
    """A copy of ML-100K whose users are `offset` further on: a new batch for ingest."""
    shutil.copytree(source, target)
    for name, separator in (("u.data", "\t"), ("u.user", "|")):
        lines = (source / name).read_text(encoding="latin-1").splitlines()
        (target / name).write_text("".join(
            separator.join([str(int(first) + offset), rest]) + "\n"
            for first, rest in (line.split(separator, 1) for line in lines if line)),
            encoding="latin-1")
    return target


def test_the_ingest_worker_killed_during_a_load_loads_the_batch_once(
        stack: Stack, ml100k: Path, tmp_path: Path) -> None:
    copy = offset_ml100k(ml100k, tmp_path / "ml-100k-more", offset=10_000)
    stack.compose("cp", str(copy), "ingest:/tmp/ml-100k-more")
    before = stack.counts()
    # The ratings table held in SHARE mode: the load waits at its COPY, inside its one
    # transaction, after the batch row and the movies.
    out, outage = kill_mid_task(
        stack, "ingest", "ingest.load",
        ["recsys", "ingest", "--source", "/tmp/ml-100k-more", "--json"], runner="transform",
        hold="LOCK TABLE rating IN SHARE MODE")
    loaded = json.loads(out[out.index("{"):])
    after = stack.counts()
    batches = after["ingest_batch"] - before["ingest_batch"]
    say_killed(stack, "ingest", one_each({"batch": batches}, ["batch"]), outage)
    assert loaded["status"] == "loaded" and loaded["ratings"] == 100_000, loaded
    assert batches == 1 and after["rating"] - before["rating"] == 100_000, (before, after)
    assert stack.sql("SELECT count(*) FROM ingest_batch WHERE status <> 'loaded'") == "0"


def test_the_transform_worker_killed_mid_snapshot_records_it_once(stack: Stack) -> None:
    before = int(stack.sql("SELECT count(*) FROM snapshot"))
    # The snapshot table locked against inserts: the task waits with its arrays written.
    out, outage = kill_mid_task(stack, "transform", "transform.snapshot",
                                ["recsys", "pipeline", "--stages", "transform", "--json"],
                                hold="LOCK TABLE snapshot IN EXCLUSIVE MODE")
    made = int(stack.sql("SELECT count(*) FROM snapshot")) - before
    say_killed(stack, "transform", one_each({"snapshot": made}, ["snapshot"]), outage)
    latest = stack.sql("SELECT id FROM snapshot ORDER BY created_at DESC LIMIT 1")
    assert made == 1 and json.loads(out[out.index("{"):])["snapshot"] == latest, out


def test_a_worker_killed_mid_task_comes_back_and_the_task_completes_once(
        stack: Stack) -> None:
    """kill -9 of the train worker mid-tuning: the retrain registers one version."""
    before = int(stack.sql("SELECT count(*) FROM model_version"))
    # A retrain of one algorithm on the newest snapshot, with enough trials that the kill
    # lands inside train.tune.
    out, outage = kill_mid_task(stack, "train", "train.tune", [
        "recsys", "pipeline", "--stages", "train,register", "--algorithms", "als",
        "--trials", "40", "--json"])
    made = int(stack.sql("SELECT count(*) FROM model_version")) - before
    say_killed(stack, "train", one_each({"version": made}, ["version"]), outage)
    summary = json.loads(out[out.index("{"):])
    assert [t["algorithm"] for t in summary["trained"]] == ["als"]
    assert made == 1


REGISTERED = ("popular", "itemknn_cosine")


def test_the_registry_worker_killed_between_two_versions_registers_each_once(
        stack: Stack) -> None:
    before = counts_by(stack, "algorithm", "model_version")
    top = int(stack.sql("SELECT coalesce(max(version), 0) FROM model_version"))
    snapshot = stack.sql("SELECT id FROM snapshot ORDER BY created_at DESC LIMIT 1")
    # An uncommitted version top + 2: the task registers its first model as top + 1 and
    # commits, then its second waits on the unique (name, version) index.
    hold = ("INSERT INTO model_version (name, version, algorithm, params, snapshot_id, "
            "metrics, artifact_path, sha256, fit_key, created_at) VALUES ('recsys', "
            f"{top + 2}, 'hold', '{{}}', '{snapshot}', '{{}}', '', '', 'compose-chaos-hold', "
            "now())")
    _, outage = kill_mid_task(
        stack, "registry", "registry.register",
        ["recsys", "pipeline", "--stages", "train,register", "--algorithms",
         ",".join(REGISTERED), "--trials", "1", "--json"],
        hold=hold, half_done=f"SELECT count(*) > {top} FROM model_version")
    after = counts_by(stack, "algorithm", "model_version")
    made = {name: after.get(name, 0) - before.get(name, 0) for name in REGISTERED}
    say_killed(stack, "registry", one_each(made, list(REGISTERED)), outage)
    assert made == dict.fromkeys(REGISTERED, 1), (before, after)
    assert sum(after.values()) == sum(before.values()) + 2, (before, after)


# eval.offline sent straight to the eval queue with the given versions, as the pipeline's
# register stage hands them on; it prints what the task returned.
EVALUATE = """
import json, sys
from services.registry.registry import get_version
from services.transform.snapshot import describe
from shared.celery_app import app
from shared.db import Snapshot, session_scope
versions = [get_version(int(v)) for v in sys.argv[1:]]
with session_scope() as session:
    snapshot = describe(session.get(Snapshot, versions[0]["snapshot"]))
registered = [v | {"snapshot_artifact": snapshot} for v in versions]
result = app.signature("eval.offline", args=(registered,), queue="eval").apply_async()
print(json.dumps(result.get(timeout=900)))
"""


def test_the_eval_worker_killed_between_two_versions_stores_each_figure_once(
        stack: Stack) -> None:
    first, second = sorted(int(v) for v in stack.sql(
        "SELECT version FROM model_version ORDER BY version DESC LIMIT 2").split())
    figures = f"SELECT metrics::text FROM model_version WHERE version = {first}"
    before_first = stack.sql(figures)
    versions = int(stack.sql("SELECT count(*) FROM model_version"))
    moves = int(stack.sql("SELECT count(*) FROM alias_change"))
    # The second version's row locked: its figures wait, the first version's are stored.
    out, outage = kill_mid_task(
        stack, "eval", "eval.offline",
        ["python", "-c", EVALUATE, str(first), str(second)],
        hold=f"SELECT 1 FROM model_version WHERE version = {second} FOR UPDATE",
        half_done=f"SELECT metrics::text <> {quote(before_first)} FROM model_version "
                  f"WHERE version = {first}")
    returned = {m["version"]: m["metrics"] for m in json.loads(out.splitlines()[-1])["models"]}
    stored = {v: json.loads(stack.sql(f"SELECT metrics::text FROM model_version WHERE "
                                      f"version = {v}")) for v in returned}
    kept = {v: all(stored[v].get(key) == value for key, value in returned[v].items())
            for v in returned}
    extra = (int(stack.sql("SELECT count(*) FROM model_version")) - versions
             + int(stack.sql("SELECT count(*) FROM alias_change")) - moves)
    counts = one_each({v: int(k) for v, k in kept.items()}, list(kept))
    counts["duplicated"] += extra
    say_killed(stack, "eval", counts, outage)
    assert sorted(returned) == [first, second] and all(kept.values()), (returned, stored)
    assert extra == 0, counts


def quote(text: str) -> str:
    """`text` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def test_malformed_requests_get_no_5xx_in_compose(stack: Stack) -> None:
    counts, failing = send_malformed(stack.url("serve", ""), API_KEY)
    stack.say({"compose_chaos": "malformed_requests", **counts, "failing": len(failing)})
    assert counts["sent"] > 100 and not failing, failing


def test_hot_swap_under_load_in_compose(stack: Stack) -> None:
    """Recommendations answer 200 throughout while another version is promoted (the kill
    tests registered others: the newest is not the champion)."""
    champion = stack.champion()
    assert champion is not None
    other = int(stack.sql("SELECT max(version) FROM model_version WHERE version <> "
                          f"{champion['model_version']}"))
    url = stack.url("serve", "")
    served: set[int] = set()
    with Load(recommendations_noting_versions(url, served), API_KEY) as load:
        time.sleep(3)
        moved = httpx.post(f"{url}/models/{other}/promote", json={"reason": "compose chaos"},
                           headers={"X-API-Key": API_KEY}, timeout=60)
        assert moved.status_code < 300, moved.text
        wait_for(lambda: other in served, timeout=120, interval=0.5,
                 what=f"serve to answer with v{other}")
        time.sleep(3)
    counts = {"sent": load.sent, "answered": len(load.accepted), "5xx": load.server_errors,
              "connection_errors": load.connection_errors, "versions_served": sorted(served)}
    stack.say({"compose_chaos": "hot_swap_under_load", **counts})
    assert served == {champion["model_version"], other}, counts
    assert counts["answered"] == counts["sent"] and counts["5xx"] == 0, counts
    assert counts["connection_errors"] == 0, counts


def test_down_then_up_keeps_the_champion_and_the_rows(stack: Stack) -> None:
    champion, counts = stack.champion(), stack.counts()
    assert champion is not None
    stack.compose("down", timeout=600)
    assert not stack.compose("ps", "--all", "-q").stdout.strip()
    served = stack.up_until_champion("second_up_to_champion")
    assert served["model_version"] == champion["model_version"]
    assert served["variant"] == "champion"
    # Same rows, so bootstrap found the champion and trained nothing on the second `up`.
    assert stack.counts() == counts


def test_down_v_leaves_nothing_behind(stack: Stack) -> None:
    stack.compose("down", "-v", "--remove-orphans", timeout=600)
    label = f"label=com.docker.compose.project={PROJECT}"
    for kind in ("container", "volume", "network"):
        listed = subprocess.run(["docker", kind, "ls", *(["--all"] if kind == "container"
                                                        else []), "-q", "--filter", label],
                                capture_output=True, text=True, check=True).stdout.split()
        assert not listed, f"`down -v` left {kind}s of {PROJECT}: {listed}"
