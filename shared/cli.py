"""The `recsys` command: ingest, pipeline, workers, database and the local stack."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
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
app.add_typer(db_app, name="db")
err = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def emit_json(payload: dict[str, Any]) -> None:
    """One JSON object as the last line of stdout."""
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


def ensure_embedded_schema() -> None:
    """The embedded SQLite database migrates itself; a server database is migrated by
    `recsys db upgrade` (the compose file's one-shot migrate service)."""
    if not get_settings().database_url:
        from shared.db import migrate

        migrate()


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
    if settings.broker_url:
        with err.status(f"ingest.load queued for {source} ..."):
            return run_task("ingest.load", {"source": source, "dataset": dataset,
                                            "lenient": lenient})
    from services.ingest.ingest import ingest_source

    ensure_embedded_schema()
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
    algorithms: str = typer.Option(None, "--algorithms", help="Comma-separated algorithms to "
                                   "train (all when omitted)."),
    trials: int = typer.Option(None, "--trials", min=1, help="Tuning trials per algorithm "
                               "(each algorithm's own budget when omitted)."),
    cv_folds: int = typer.Option(None, "--cv-folds", min=2, help="Also report k-fold "
                                 "cross-validation (mean, spread) of each tuned model."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds to wait for the chain."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object last."),
) -> None:
    """Run the pipeline's stages in order as a Celery chain (every stage, with --stages all)."""
    from shared.pipeline import PipelineError, run_pipeline
    from shared.settings import EvalProtocol

    if protocol and protocol not in {p.value for p in EvalProtocol}:
        fail(f"--protocol {protocol!r} is not one of random, temporal, leave-last-n", 2)
    ensure_embedded_schema()
    options = {"source": source or get_settings().data_source, "protocol": protocol,
               "algorithms": algorithms.split(",") if algorithms else None, "trials": trials,
               "cv_folds": cv_folds}
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
    out.print(f"pipeline finished in {summary['seconds']} s: {', '.join(summary['stages'])}")


@app.command()
def worker(
    service: str = typer.Argument(..., help="ingest, transform, train, registry or eval."),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1),
    loglevel: str = typer.Option("INFO", "--loglevel"),
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
        "worker", "-Q", queue.value, "-n", f"{queue.value}@%h", f"--concurrency={concurrency}",
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
    ensure_embedded_schema()
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


models_app = typer.Typer(help="The model registry: versions and aliases.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def registry_call(name: str, *args: Any) -> Any:
    """Reads run here; alias moves go through the registry service's queue."""
    from shared.celery_app import run_task

    try:
        if name == "list":
            from services.registry.registry import list_versions

            return list_versions()
        if name == "show":
            from services.registry.registry import resolve

            return resolve(args[0])
        return run_task(f"registry.{name}", dict(zip(("version", "alias", "reason")
                                                       if name == "promote" else
                                                       ("alias", "reason"), args, strict=False)),
                        timeout=120)
    except RecsysError as error:
        fail(str(error))


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every registered version with its aliases and test nDCG@10."""
    ensure_embedded_schema()
    versions = registry_call("list")
    if as_json:
        emit_json({"models": versions})
        return
    table = Table(title="model versions")
    for column in ("version", "algorithm", "aliases", "ndcg@10", "precision@10", "snapshot",
                   "created"):
        table.add_column(column)
    for v in versions:
        metrics = v["metrics"]
        table.add_row(str(v["version"]), v["algorithm"], ",".join(v["aliases"]),
                      f"{metrics.get('ndcg@10', float('nan')):.4f}",
                      f"{metrics.get('precision@10', float('nan')):.4f}", v["snapshot"][:12],
                      (v["created_at"] or "")[:19])
    out.print(table)


@models_app.command("show")
def models_show(version: str = typer.Argument("latest", help="A number, 'latest' (the "
                                             "champion) or 'challenger'.")) -> None:
    """One version in full, as JSON."""
    ensure_embedded_schema()
    emit_json(registry_call("show", version))


@models_app.command("promote")
def models_promote(version: int = typer.Argument(...),
                   alias: str = typer.Option("champion", "--alias"),
                   reason: str = typer.Option("promoted by hand", "--reason")) -> None:
    """Point an alias at a version (publishes model.promoted)."""
    ensure_embedded_schema()
    moved = registry_call("promote", version, alias, reason)
    out.print(f"{moved['alias']}: v{moved['previous']} -> v{moved['version']}")


@models_app.command("rollback")
def models_rollback(alias: str = typer.Option("champion", "--alias"),
                    reason: str = typer.Option("rolled back by hand", "--reason")) -> None:
    """Move an alias back to the version it held before its last promotion."""
    ensure_embedded_schema()
    moved = registry_call("rollback", alias, reason)
    out.print(f"{moved['alias']}: v{moved['previous']} -> v{moved['version']}")


def parse_k_values(text: str | None) -> list[int] | None:
    """`--k 5,10,20` as whole numbers; None keeps EVAL_K_VALUES."""
    if not text:
        return None
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        fail(f"--k {text!r} is not a comma-separated list of positive whole numbers, "
             "e.g. 5,10,20", 2)
    return values


@app.command("eval")
def eval_command(
    model: str = typer.Option("latest", "--model", help="A version number, 'latest' (the "
                              "champion) or 'challenger'."),
    k: str = typer.Option(None, "--k", help="Comma-separated k values (EVAL_K_VALUES when "
                          "omitted)."),
    timeout: float = typer.Option(1800.0, "--timeout", help="Seconds to wait for the task."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object last."),
) -> None:
    """Measure a version beside the most-popular baseline on its snapshot's test split."""
    # Through a broker, Celery rebuilds a task's exception as its own class only when the
    # class's module is loaded here; otherwise a RecsysError would escape as a traceback.
    import services.eval.versions  # noqa: F401
    from shared.celery_app import run_task

    k_values = parse_k_values(k)
    ensure_embedded_schema()
    try:
        status = err.status(f"eval.evaluate: version {model} ...")
        with status if err.is_terminal else nullcontext():
            result = run_task("eval.evaluate", {"model": model, "k_values": k_values},
                              timeout=timeout)
    except RecsysError as error:
        fail(str(error))
    if as_json:
        emit_json(result)
        return
    print_evaluation(result)


def print_evaluation(result: dict[str, Any]) -> None:
    """Rows are metrics; each k has the version's column and the baseline's beside it."""
    aliases = f" ({', '.join(result['aliases'])})" if result.get("aliases") else ""
    baseline = result["baseline"]
    table = Table(title=f"v{result['version']} {result['algorithm']}{aliases} on snapshot "
                  f"{result['snapshot'][:12]} ({result['protocol']} protocol, test split)")
    table.add_column("metric")
    for k in result["k_values"]:
        table.add_column(f"@{k}", justify="right")
        table.add_column(f"popular@{k}", justify="right", style="dim")
    names = list(dict.fromkeys(key.split("@")[0] for key in result["metrics"]))
    for name in names:
        cells = []
        for k in result["k_values"]:
            cells += [f"{result['metrics'].get(f'{name}@{k}', float('nan')):.4f}",
                      f"{baseline['metrics'].get(f'{name}@{k}', float('nan')):.4f}"]
        table.add_row(name, *cells)
    out.print(table)
    source = (f"registered v{baseline['version']}" if baseline.get("version")
              else baseline.get("source", "train split counts"))
    out.print(f"baseline: most-popular ({source}); figures stored on v{result['version']}")


@app.command()
def report(
    output: str = typer.Option(..., "--output", "-o", help="HTML file to write."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object last."),
) -> None:
    """Write a self-contained HTML page of offline and online metrics with plots."""
    from services.eval.report import write_report

    ensure_embedded_schema()
    try:
        summary = write_report(output)
    except RecsysError as error:
        fail(str(error))
    except OSError as error:
        fail(f"--output {output}: {error.strerror or error}")
    if as_json:
        emit_json(summary)
        return
    out.print(f"report written to {summary['output']} ({summary['versions']} versions, "
              f"{summary['online_windows']} online windows, {summary['bytes'] // 1024} KB)")


stack_app = typer.Typer(help="Run docker-compose.yml's app services as local processes.",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")
STATE_DIR_HELP = "Logs, pid files and records; DATA_PATH/stack when omitted."


def print_stack(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    for column in ("service", "state", "pid", "command", "log"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["state"], str(row["pid"]), row["command"], row["log"])
    out.print(table)


@stack_app.command("up")
def stack_up(
    # typer's idiom: the call declares the argument, it is not a shared mutable default.
    services: list[str] = typer.Argument(None, help="Services to start (with their "  # noqa: B008
                                         "dependencies); all app services when omitted."),
    state_dir: str = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
) -> None:
    """Run the one-shot services, then start the workers, as compose would."""
    from pathlib import Path

    from shared.stack import StackError, up

    try:
        rows = up(services or None, Path(state_dir) if state_dir else None)
    except StackError as error:
        fail(str(error))
    print_stack("stack up", rows)


@stack_app.command("down")
def stack_down(
    state_dir: str = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
    timeout: float = typer.Option(10.0, "--timeout", min=0, help="Seconds from SIGTERM "
                                  "to SIGKILL."),
) -> None:
    """Stop the services `stack up` started."""
    from pathlib import Path

    from shared.stack import StackError, down

    try:
        rows = down(Path(state_dir) if state_dir else None, timeout=timeout)
    except StackError as error:
        fail(str(error))
    for row in rows:
        out.print(f"stopped {row['name']} (pid {row['pid']}, {row['stopped_by']})")
    if not rows:
        out.print("nothing was running")


@stack_app.command("status")
def stack_status(
    state_dir: str = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object last."),
) -> None:
    """Show the services `stack up` started and whether they run."""
    from pathlib import Path

    from shared.stack import StackError, status

    try:
        rows = status(Path(state_dir) if state_dir else None)
    except StackError as error:
        fail(str(error))
    if as_json:
        emit_json({"services": rows})
    else:
        print_stack("stack status", rows)


def _register_loop_commands() -> None:
    from shared.cli_loop import ab_app, beat_command, policy_command

    app.add_typer(ab_app, name="ab")
    app.command("policy")(policy_command)
    app.command("beat")(beat_command)


_register_loop_commands()


def main() -> None:
    try:
        get_settings()
    except SettingsError as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False)
        sys.exit(2)
    app()


if __name__ == "__main__":
    main()
