"""`recsys ab`, `recsys policy` and `recsys beat`: the commands of the closed loop.

Registered on the `recsys` app by recsys/cli.py, whose output helpers they use.
"""

from __future__ import annotations

import typer
from rich.table import Table

from shared.settings import get_settings

ab_app = typer.Typer(help="A/B test of champion against challenger.", no_args_is_help=True)


@ab_app.command("status")
def ab_status_command(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object last."),
) -> None:
    """Per-arm CTR since the challenger was set, the z-test and the sample it needs."""
    from recsys.cli import emit_json, ensure_schema, out
    from services.eval.ab import ab_status, promote_winner

    ensure_schema()
    status = ab_status()
    if get_settings().ab_auto_promote:
        moved = promote_winner(status)
        status["promoted"] = moved["version"] if moved else None
    if as_json:
        emit_json(status)
        return
    table = Table(title=f"A/B since {status['since'][:19]} (CTR@{status['k']})")
    for column in ("arm", "versions", "lists", "impressions", "clicks", "CTR"):
        table.add_column(column)
    for name, arm in sorted(status["arms"].items()):
        table.add_row(name, ",".join(map(str, sorted(set(arm["versions"])))), str(arm["lists"]),
                      str(arm["impressions"]), str(arm["clicks"]), f"{arm['ctr']:.4f}")
    out.print(table)
    out.print(f"z = {status['z']:.3f}, p = {status['p_value']:.4g} (alpha {status['alpha']}); "
              f"each arm needs {status['min_sample_per_arm']} impressions; "
              f"winner: {status['winner']}")


@ab_app.command("promote")
def ab_promote_command(
    force: bool = typer.Option(False, "--force", help="Promote the challenger even without a "
                               "significant win."),
) -> None:
    """Promote the challenger to champion when it won the A/B test."""
    from recsys.cli import ensure_schema, fail, out
    from services.eval.ab import ab_status, promote_winner

    ensure_schema()
    status = ab_status()
    moved = promote_winner(status, force=force)
    if moved is None:
        fail(f"nothing promoted: the A/B verdict is '{status['winner']}' (use --force)")
    out.print(f"champion: v{moved['previous']} -> v{moved['version']}")


def policy_command() -> None:
    """Run the retrain policy: consume metrics.online and feedback.received events."""
    import logging

    from recsys.cli import ensure_schema, fail
    from services.eval.policy import consume_forever

    if not get_settings().broker_url:
        fail("BROKER_URL is not set: the policy consumes events from RabbitMQ (in embedded "
             "mode it runs in-process)", 2)
    ensure_schema(server_may_be_down=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    consume_forever()


def beat_command() -> None:
    """Run Celery beat: eval.online every ONLINE_INTERVAL_SECONDS on the eval queue."""
    from recsys.cli import fail
    from shared.celery_app import configure_app

    settings = get_settings()
    if not settings.broker_url:
        fail("BROKER_URL is not set: beat sends tasks through RabbitMQ", 2)
    settings.data_path.mkdir(parents=True, exist_ok=True)
    configure_app().start(["beat", "--loglevel=INFO",
                           f"--schedule={settings.data_path / 'celerybeat-schedule'}"])
