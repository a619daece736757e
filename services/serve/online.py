"""The online figures eval computes, as served by `/metrics/online` and on `/metrics`."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from services.serve.schemas import OnlineWindow
from shared.db import OnlineMetric, session_scope

GAUGES = {
    "ctr": "Online CTR@k of the latest window.",
    "hit_rate": "Share of served lists with at least one engaged item, latest window.",
    "mean_click_position": "Mean position of engaged items, latest window.",
    "satisfaction": "Mean rating given to served items, latest window.",
    "lists": "Lists served in the latest window.",
}


def latest_windows(engine: Engine, windows: int = 1) -> list[OnlineWindow]:
    """The newest `windows` windows' figures per model version and variant, newest first."""
    with session_scope(engine) as session:
        ends = list(session.scalars(select(OnlineMetric.window_end).group_by(
            OnlineMetric.window_end).order_by(OnlineMetric.window_end.desc()).limit(windows)))
        if not ends:
            return []
        rows = session.scalars(select(OnlineMetric).where(OnlineMetric.window_end.in_(ends))
                               .order_by(OnlineMetric.window_end.desc(), OnlineMetric.variant,
                                         OnlineMetric.model_version))
        return [OnlineWindow.model_validate(row, from_attributes=True) for row in rows]


class OnlineCollector(Collector):
    """Gauges of the latest online window, read at scrape time; nothing when the database
    cannot answer (the scrape must not fail with it)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with session_scope(self.engine) as session:
                latest = session.scalar(select(func.max(OnlineMetric.window_end)))
            rows = latest_windows(self.engine) if latest is not None else []
        except SQLAlchemyError:
            return
        for name, description in GAUGES.items():
            family = GaugeMetricFamily(f"recsys_online_{name}", description,
                                       labels=["model_version", "variant"])
            for row in rows:
                value = getattr(row, name)
                if value is not None:
                    family.add_metric([str(row.model_version), row.variant], float(value))
            yield family
