"""Online figures computed by eval, served at /metrics/online and on /metrics."""

from __future__ import annotations

import datetime as dt

from fastapi.testclient import TestClient

from services.eval.online import store_window
from shared.db import get_engine

END = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def figures(version: int, variant: str, ctr: float) -> dict:
    return {"model_version": version, "variant": variant, "k": 10, "lists": 50,
            "impressions": 500, "clicks": int(ctr * 500), "ctr": ctr, "hit_rate": 0.4,
            "mean_click_position": 3.5, "feedback": 40, "satisfaction": None}


def test_online_metrics_endpoint_and_gauges(client: TestClient) -> None:
    assert client.get("/metrics/online").json() == {"windows": []}
    engine = get_engine()
    store_window(END - dt.timedelta(hours=2), END - dt.timedelta(hours=1),
                 [figures(1, "champion", 0.05)], engine)
    store_window(END - dt.timedelta(hours=1), END,
                 [figures(1, "champion", 0.08), figures(2, "challenger", 0.11)], engine)
    latest = client.get("/metrics/online").json()["windows"]
    assert [(w["variant"], w["model_version"], w["ctr"]) for w in latest] == [
        ("challenger", 2, 0.11), ("champion", 1, 0.08)]
    assert len(client.get("/metrics/online?windows=2").json()["windows"]) == 3
    assert client.get("/metrics/online?windows=0").status_code == 422
    body = client.get("/metrics").text
    assert 'recsys_online_ctr{model_version="2",variant="challenger"} 0.11' in body
    assert "recsys_online_satisfaction" in body  # the family exists even without values
