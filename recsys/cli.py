"""The `recsys` command: ingest, pipeline, workers, database and the local stack."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from shared.errors import RecsysError
from shared.settings import SettingsError, get_settings

app = typer.Typer(help="MovieLens recommender: ingest, train, serve, evaluate.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
PLAIN_WIDTH = 400
app.add_typer(db_app, name="db")
err = Console(stderr=True)
# Piped to a file or a CI log, tables keep their full width instead of rich's 80 columns.
out = Console() if sys.stdout.isatty() else Console(width=PLAIN_WIDTH)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # one line
    raise typer.Exit(code)


def emit_json(payload: dict[str, Any]) -> None:
    """One JSON object as the last line of stdout."""
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


def ensure_schema(server_may_be_down: bool = False) -> None:
    """The embedded SQLite database migrates itself; a server database must have been
    migrated by `recsys db upgrade` (the compose file's one-shot migrate service), and a
    command that needs it stops with one line saying so. Long-running services that ride
    out a database outage (serve, the workers, the policy) start while it does not answer
    (`server_may_be_down`), with a warning; a missing schema stops them too."""
    if not get_settings().database_url:
        from shared.db import migrate

        migrate()
        return
    from shared.db.session import DatabaseUnavailable, SchemaNotReady, require_schema

    try:
        require_schema()
    except DatabaseUnavailable as error:
        if not server_may_be_down:
            fail(str(error))
        err.print(f"[yellow]warning:[/] {error}; starting anyway", highlight=False,
                  soft_wrap=True)
    except SchemaNotReady as error:
        fail(str(error))


@contextmanager
def byte_progress(description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar over bytes on a terminal; nothing when output is redirected."""
    if not err.is_terminal:
        yield None
        return
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err,
                  transient=True) as progress:
        task = progress.add_task(description, total=None)

        def advance(amount: int, total: int = 0) -> None:
            if total:
                progress.update(task, total=total)
            else:
                progress.advance(task, amount)

        yield advance


def run_ingest(source: str, dataset: str | None, lenient: bool) -> dict[str, Any]:
    """Ingest in-process (embedded) or through the `ingest` queue (broker configured)."""
    from shared.celery_app import run_task

    settings = get_settings()
    ensure_schema()
    if settings.broker_url:
        with err.status(f"ingest.load queued for {source} ..."):
            return run_task("ingest.load", {"source": source, "dataset": dataset,
                                            "lenient": lenient})
    from services.ingest.ingest import ingest_source

    with byte_progress(f"ingest {source}") as bar:
        result = ingest_source(
            source, dataset, lenient,
            progress=(lambda n: bar(n, 0)) if bar else None,
            on_layout=(lambda layout, size: bar(0, size)) if bar else None,
        )
    return result.to_dict()


def print_summary(title: str, rows: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        if not isinstance(value, dict | list):
            table.add_row(key, str(value))
    out.print(table)


@app.command()
def ingest(
    source: str = typer.Option(None, "--source", help="Directory, .zip or URL; "
                               "DATA_SOURCE when omitted."),
    dataset: str = typer.Option(None, "--dataset", help="Override layout detection "
                                "(ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-32m, ml-latest, "
                                "ml-latest-small)."),
    lenient: bool = typer.Option(False, "--lenient", help="Load good rows, store rejects."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object last."),
) -> None:
    """Load MovieLens ratings and movies into the database."""
    source = source or get_settings().data_source
    try:
        result = run_ingest(source, dataset, lenient)
    except RecsysError as error:
        fail(str(error))
    if as_json:
        emit_json(result)
    else:
        print_summary(result["message"], result)


@app.command()
def pipeline(
    stages: str = typer.Option(None, "--stages", help="'all', or a comma-separated list of "
                               "ingest, transform, train, register, evaluate, promote."),
    stage: str = typer.Option(None, "--stage", help="Run one stage."),
    source: str = typer.Option(None, "--source", help="Data source for ingest (DATA_SOURCE)."),
    protocol: str = typer.Option(None, "--protocol", help="random, temporal or leave-last-n "
                                 "(EVAL_PROTOCOL)."),
    stratify: str = typer.Option(None, "--stratify", help="Random protocol: user or item, "
                                 "the group each 75/25 cut is made within (EVAL_STRATIFY)."),
    algorithms: str = typer.Option(None, "--algorithms", help="Comma-separated algorithms to "
                                   "train (all when omitted)."),
    trials: int = typer.Option(None, "--trials", min=1, help="Tuning trials per algorithm "
                               "(each algorithm's own budget when omitted)."),
    cv_folds: int = typer.Option(None, "--cv-folds", min=2, help="Also report k-fold "
                                 "cross-validation (mean, spread) of each tuned model."),
    tune_budget: float = typer.Option(None, "--tune-budget", help="Seconds the tuning of "
                                      "every algorithm together may take; trial counts become "
                                      "caps (TUNE_BUDGET_SECONDS; unlimited when 0)."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds to wait for the chain."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object last."),
) -> None:
    """Run the pipeline's stages in order as a Celery chain (every stage, with --stages all)."""
    from shared.pipeline import PipelineError, run_pipeline
    from shared.settings import EvalProtocol, EvalStratify

    if protocol and protocol not in {p.value for p in EvalProtocol}:
        fail(f"--protocol {protocol!r} is not one of random, temporal, leave-last-n", 2)
    if stratify and stratify not in {s.value for s in EvalStratify}:
        fail(f"--stratify {stratify!r} is not one of user, item", 2)
    if tune_budget is not None and not tune_budget > 0:
        fail(f"--tune-budget must be a positive number of seconds, got {tune_budget}", 2)
    ensure_schema()
    options = {"source": source or get_settings().data_source, "protocol": protocol,
               "stratify": stratify,
               "algorithms": algorithms.split(",") if algorithms else None, "trials": trials,
               "cv_folds": cv_folds, "tune_budget": tune_budget}
    try:
        with pipeline_status():
            summary = run_pipeline(stages, stage, timeout=timeout, **options)
    except PipelineError as error:
        fail(str(error), 2)
    except RecsysError as error:
        fail(str(error))
    if as_json:
        emit_json(summary)
        return
    print_pipeline(summary)


@app.command("bootstrap")
def bootstrap_command(
    source: str = typer.Option(None, "--source", help="Data source (DATA_SOURCE when "
                               "omitted)."),
    algorithms: str = typer.Option(None, "--algorithms", help="Comma-separated algorithms to "
                                   "train (all when omitted)."),
    trials: int = typer.Option(None, "--trials", min=1, help="Tuning trials per algorithm "
                               "(each algorithm's own budget when omitted)."),
    timeout: float = typer.Option(3600.0, "--timeout", min=1, help="Seconds to wait for the "
                                  "pipeline (and for another bootstrap's lock)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object last."),
) -> None:
    """Run the whole pipeline on DATA_SOURCE when the registry has no champion; else nothing."""
    from shared.bootstrap import bootstrap

    ensure_schema()
    source = source or get_settings().data_source
    try:
        with pipeline_status():
            result = bootstrap(source, timeout, algorithms.split(",") if algorithms else None,
                               trials, waiting=lambda: err.print(
                                   "another bootstrap is running; waiting for it",
                                   highlight=False))
    except RecsysError as error:
        fail(str(error))
    if as_json:
        emit_json(result)
    elif result["status"] == "present":
        out.print(f"champion v{result['champion']} is in the registry; nothing to do"
                  + (" (another bootstrap made it)" if result["waited"] else ""))
    else:
        print_pipeline(result["pipeline"])
        out.print(f"bootstrap: champion v{result['champion']} from {source}")


@contextmanager
def pipeline_status() -> Iterator[None]:
    """A live status line on a terminal: the stage, and each tuning trial as it ends."""
    if not err.is_terminal:
        yield
        return
    from shared.progress import listening

    with err.status("pipeline running ...") as status:

        def show(stage: str, meta: dict[str, Any]) -> None:
            if stage == "trial":
                status.update(f"train: {meta['algorithm']} trial {meta['trial']}/"
                              f"{meta['trials']} (validation {meta['value']:.4f})")
            else:
                status.update(f"train: fitting {meta['algorithm']} on the train split")

        with listening(show):
            yield


def print_pipeline(summary: dict[str, Any]) -> None:
    if "ingest" in summary:
        out.print(f"ingest: {summary['ingest']['message']}")
    if "snapshot" in summary:
        out.print(f"snapshot: {summary['snapshot']}")
    if "models" in summary:
        table = Table(title="models on the snapshot's test split")
        for column in ("version", "algorithm", "ndcg@10", "precision@10", "recall@10",
                       "map@10", "coverage@10"):
            table.add_column(column)
        for model in summary["models"]:
            m = model["metrics"]
            table.add_row(str(model["version"]), model["algorithm"],
                          *(f"{m.get(key, float('nan')):.4f}" for key in (
                              "ndcg@10", "precision@10", "recall@10", "map@10", "coverage@10")))
        out.print(table)
    if "champion" in summary:
        champion = summary["champion"]
        verdict = "promoted" if summary["promoted"] else "not promoted"
        out.print(f"champion: v{champion['version']} {champion['algorithm']} "
                  f"({verdict}: {summary['reason']})")
    gate = summary.get("gate")
    if gate and gate.get("champion") is not None:
        on = gate["evaluated_on"]
        out.print(f"gate: {gate['metric']} candidate v{gate['candidate']} "
                  f"{gate['candidate_score']:.4f}, champion v{gate['champion']} "
                  f"{gate['champion_score']:.4f}, on {on.get('interactions')} test interactions "
                  f"of {on.get('users')} users ({on.get('excluded_champion_train', 0)} the "
                  "champion trained on left out)")
    out.print(f"pipeline finished in {summary['seconds']} s: {', '.join(summary['stages'])}")


@app.command()
def worker(
    service: str = typer.Argument(..., help="ingest, transform, train, registry or eval."),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1),
    loglevel: str = typer.Option("INFO", "--loglevel"),
    hostname: str = typer.Option(None, "--hostname", "-n", help="The worker's node name "
                                 "(SERVICE@%h when omitted); two workers on one host need "
                                 "different ones."),
) -> None:
    """Start a Celery worker consuming that service's queue."""
    from shared.celery_app import ServiceQueue, configure_app, import_tasks

    try:
        queue = ServiceQueue(service)
    except ValueError:
        fail(f"unknown service {service!r}; one of {', '.join(q.value for q in ServiceQueue)}", 2)
    if not get_settings().broker_url:
        fail("BROKER_URL is not set: a worker needs RabbitMQ (embedded mode runs tasks "
             "in-process)", 2)
    ensure_schema(server_may_be_down=True)
    if get_settings().worker_metrics_port:  # before the pool forks: see shared/worker_metrics
        from shared.worker_metrics import serve_worker_metrics

        try:
            port = serve_worker_metrics(queue, get_settings().worker_metrics_port)
        except RecsysError as error:
            fail(str(error), 2)
        if port:
            err.print(f"worker metrics on http://0.0.0.0:{port}/metrics", highlight=False)
    celery = configure_app()
    import_tasks(queue)
    celery.worker_main([
        "worker", "-Q", queue.value, "-n", hostname or f"{queue.value}@%h",
        f"--concurrency={concurrency}",
        "--prefetch-multiplier=1", f"--loglevel={loglevel}", "-E", "--without-mingle",
        "--without-gossip",
    ])


@app.command()
def flower(
    port: int = typer.Option(None, "--port", min=1, max=65535, help="FLOWER_PORT when "
                             "omitted."),
) -> None:
    """Start Flower, the Celery monitor, behind basic auth (FLOWER_USER, FLOWER_PASSWORD)."""
    import os

    settings = get_settings()
    if not settings.broker_url:
        fail("BROKER_URL is not set: Flower watches the workers through RabbitMQ", 2)
    if not settings.flower_password.get_secret_value().strip():
        # Production refused this at start-up (shared/settings.py); this is development.
        err.print("[yellow]warning:[/] FLOWER_PASSWORD is not set: Flower accepts "
                  f"{settings.flower_user} with the development password; set "
                  "FLOWER_PASSWORD before anyone else can reach it", highlight=False)
    # The credentials go in Flower's own environment variable, not the command line,
    # where every local user could read them; the broker and result backend come from
    # the settings, which the Celery app reads when Flower imports it.
    env = {**os.environ, "FLOWER_BASIC_AUTH": settings.flower_basic_auth,
           "FLOWER_PORT": str(port or settings.flower_port)}
    argv = [sys.executable, "-m", "celery", "-A", "shared.celery_app:app", "flower"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)  # the process becomes Flower: signals reach it directly


@app.command()
def dashboard(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(None, "--port", min=1, max=65535, help="DASHBOARD_PORT when "
                             "omitted."),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Start the dashboard: the recommender's state and decisions in the browser, behind a
    login (DASHBOARD_USER, DASHBOARD_PASSWORD)."""
    import uvicorn

    settings = get_settings()
    ensure_schema(server_may_be_down=True)
    if not settings.dashboard_password.get_secret_value().strip():
        # Production refused this at start-up (shared/settings.py); this is development.
        err.print("[yellow]warning:[/] DASHBOARD_PASSWORD is not set: the dashboard accepts "
                  f"{settings.dashboard_user} with the development password; set "
                  "DASHBOARD_PASSWORD before anyone else can reach it", highlight=False)
    # One process: its sessions are signed with a key made at start-up.
    uvicorn.run("dashboard.app:create_app", factory=True, host=host,
                port=port or settings.dashboard_port, workers=1, log_level=log_level)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(None, "--port", min=1, max=65535, help="SERVE_PORT when omitted."),
    workers: int = typer.Option(None, "--workers", min=1, help="uvicorn worker processes; "
                                "SERVE_WORKERS when omitted."),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Start the REST API (FastAPI under uvicorn), serving the registry's champion."""
    import os
    import shutil

    import uvicorn

    settings = get_settings()
    workers = workers or settings.serve_workers
    ensure_schema(server_may_be_down=True)
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its metrics here and /metrics adds them up; a fresh
        # directory per start, so a dead worker's counters do not linger.
        metrics_dir = settings.data_path.resolve() / "prometheus" / str(port or
                                                                        settings.serve_port)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    uvicorn.run("services.serve.app:create_app", factory=True, host=host,
                port=port or settings.serve_port, workers=workers, log_level=log_level,
                timeout_graceful_shutdown=10)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply Alembic migrations to DATABASE_URL (or the embedded SQLite file)."""
    from shared.db import migrate

    migrate(revision=revision)
    out.print(f"database at revision {revision}")


def _register_more_commands() -> None:
    """The registry, stack and loop commands live in their own modules."""
    import recsys.cli_batch  # noqa: F401  (registers recommend)
    import recsys.cli_models  # noqa: F401  (registers models, eval, report)
    import recsys.cli_stack  # noqa: F401  (registers stack)
    from recsys.cli_loop import ab_app, beat_command, policy_command

    app.add_typer(ab_app, name="ab")
    app.command("policy")(policy_command)
    app.command("beat")(beat_command)


_register_more_commands()


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object last."),
) -> None:
    """Check settings, servers, schema, workers, models and disk; name the first fix."""
    from shared.doctor import diagnose

    report = diagnose()
    if as_json:
        emit_json(report)
    else:
        table = Table(title="recsys doctor")
        for column in ("check", "status", "detail"):
            table.add_column(column)
        marks = {True: "[green]ok[/]", False: "[bold red]FAIL[/]", None: "[dim]skip[/]"}
        for check in report["checks"]:
            table.add_row(check["name"], marks[check["ok"]], check["detail"])
        out.print(table)
        if report["settings"]:
            out.print("settings in force (secrets masked):", highlight=False)
            for name, value in sorted(report["settings"].items()):
                out.print(f"  {name}={value}", highlight=False)
        problem = report["first_problem"]
        if problem:
            out.print(f"first thing to fix: {problem['name']}: {problem['detail']}"
                      + (f" -> {problem['fix']}" if problem["fix"] else ""), highlight=False)
        else:
            out.print("all is well")
    raise typer.Exit(0 if report["ok"] else 1)


def main() -> None:
    # The doctor reports invalid settings itself, with everything else it can check.
    if sys.argv[1:2] != ["doctor"]:
        try:
            get_settings()
        except SettingsError as error:
            err.print(f"[bold red]error:[/] {error}", highlight=False)
            sys.exit(2)
    app()


if __name__ == "__main__":
    main()
