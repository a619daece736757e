"""Hot swap under load on a real uvicorn, and refusal of an artifact that fails its checksum."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from fastapi.testclient import TestClient

from services.registry import registry
from services.serve.app import create_app
from shared.artifacts import read_artifact, store_root, write_artifact
from tests.conftest import wait_for
from tests.serve.conftest import World, live_server

USERS = [1, 2, 3, 50, 400, 888_888]  # known users, and one the model has never seen


def as_list(body: dict) -> tuple[int, tuple[int, ...]]:
    return body["model_version"], tuple(item["movie_id"] for item in body["items"])


def test_hot_swap_while_clients_loop(serve_env: dict[str, str], world: World) -> None:
    wide = world.versions["als_wide"]
    with live_server(create_app()) as url, httpx.Client(base_url=url, timeout=10) as http:
        wait_for(lambda: http.get("/readyz").json()["dependencies"]["broker"]["detail"]
                 .endswith("subscribed to model.promoted"), timeout=20, what="the listener")
        before = {u: as_list(http.get(f"/recommendations/{u}").json()) for u in USERS}
        failures: list[str] = []
        seen: list[list[tuple[int, int, tuple[int, ...]]]] = [[], []]
        stop = threading.Event()

        def loop(log: list[tuple[int, int, tuple[int, ...]]]) -> None:
            with httpx.Client(base_url=url, timeout=10) as own:
                while not stop.is_set():
                    for user in USERS:
                        try:
                            response = own.get(f"/recommendations/{user}")
                        except httpx.HTTPError as error:
                            failures.append(f"user {user}: {error!r}")
                            continue
                        if response.status_code != 200:
                            failures.append(f"user {user}: {response.status_code} "
                                            f"{response.text}")
                        else:
                            log.append((user, *as_list(response.json())))

        threads = [threading.Thread(target=loop, args=(log,)) for log in seen]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            registry.promote(wide, reason="hot swap test")  # model.promoted over RabbitMQ
            wait_for(lambda: any(v == wide for log in seen for _, v, _ in log[-20:]),
                     timeout=30, what="answers from the new version")
            time.sleep(1.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        after = {u: as_list(http.get(f"/recommendations/{u}").json()) for u in USERS}

    assert not failures, failures[:5]
    assert all(version == 1 for version, _ in before.values())
    assert all(version == wide for version, _ in after.values())
    for log in seen:
        versions = [version for _, version, _ in log]
        assert versions[0] == 1 and versions[-1] == wide
        switch = versions.index(wide)
        assert set(versions[switch:]) == {wide}, "an answer from the old version came back"
        for user, version, movies in log:
            # Never a mix: every answer is exactly one version's whole list.
            assert (version, movies) == (before if version == 1 else after)[user]
    assert sum(len(log) for log in seen) > 4 * len(USERS)


def test_an_artifact_failing_its_checksum_is_refused(client: TestClient, world: World) -> None:
    champion = registry.resolve("latest")
    arrays, _ = read_artifact(champion["artifact_path"], champion["sha256"])
    arrays["nonce"] = np.frombuffer(uuid.uuid4().bytes, dtype=np.uint8)  # a new artifact
    ref = write_artifact("models", arrays, {"kind": "model", "algorithm": "als"})
    tampered = registry.register(champion["snapshot"], "als", {"nonce": ref.sha256},
                                 ref.path, ref.sha256)["version"]
    with (Path(store_root()) / ref.path / "arrays.npz").open("ab") as handle:
        handle.write(b"tampered")
    registry.promote(tampered, reason="checksum test")
    wait_for(lambda: client.get("/readyz").json()["last_error"], timeout=20,
             what="the refused load to be reported")
    ready = client.get("/readyz").json()
    assert "checksum mismatch" in ready["last_error"] and ready["models"] == {"champion": 1}
    assert client.get("/recommendations/1").json()["model_version"] == 1
