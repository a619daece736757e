"""`recsys models`, `recsys eval` and `recsys report`: the registry and its measurements.

Registered on the `recsys` app by recsys/cli.py, whose output helpers they use.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import typer
from rich.table import Table

from recsys.cli import app, emit_json, ensure_schema, err, fail, out
from shared.errors import RecsysError

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
    ensure_schema()
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
    ensure_schema()
    emit_json(registry_call("show", version))


@models_app.command("promote")
def models_promote(version: int = typer.Argument(...),
                   alias: str = typer.Option("champion", "--alias"),
                   reason: str = typer.Option("promoted by hand", "--reason")) -> None:
    """Point an alias at a version (publishes model.promoted)."""
    ensure_schema()
    moved = registry_call("promote", version, alias, reason)
    out.print(f"{moved['alias']}: v{moved['previous']} -> v{moved['version']}")


@models_app.command("rollback")
def models_rollback(alias: str = typer.Option("champion", "--alias"),
                    reason: str = typer.Option("rolled back by hand", "--reason")) -> None:
    """Move an alias back to the version it held before its last promotion."""
    ensure_schema()
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
    sample_users: int = typer.Option(None, "--sample-users", min=0, help="Measure a seeded "
                                     "sample of this many test users, with 95% confidence "
                                     "intervals (EVAL_SAMPLE_USERS when omitted; 0: all)."),
    timeout: float = typer.Option(1800.0, "--timeout", help="Seconds to wait for the task."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object last."),
) -> None:
    """Measure a version beside the most-popular baseline on its snapshot's test split."""
    # Through a broker, Celery rebuilds a task's exception as its own class only when the
    # class's module is loaded here; otherwise a RecsysError would escape as a traceback.
    import services.eval.versions  # noqa: F401
    from shared.celery_app import run_task

    k_values = parse_k_values(k)
    ensure_schema()
    try:
        status = err.status(f"eval.evaluate: version {model} ...")
        with status if err.is_terminal else nullcontext():
            result = run_task("eval.evaluate", {"model": model, "k_values": k_values,
                                                "sample_users": sample_users}, timeout=timeout)
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
            value = f"{result['metrics'].get(f'{name}@{k}', float('nan')):.4f}"
            interval = result.get("intervals", {}).get(f"{name}@{k}")
            if interval:
                value += f" ±{(interval[1] - interval[0]) / 2:.4f}"
            cells += [value, f"{baseline['metrics'].get(f'{name}@{k}', float('nan')):.4f}"]
        table.add_row(name, *cells)
    out.print(table)
    if "sample" in result:
        sample = result["sample"]
        out.print(f"measured on {sample['users']:,} of {sample['test_users']:,} test users "
                  f"(seed {sample['seed']}); ± is the half-width of a 95% confidence interval")
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

    ensure_schema()
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
