"""`recsys stack up|down|status`: docker-compose.yml's app services as local processes.

Registered on the `recsys` app by recsys/cli.py, whose output helpers they use.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from recsys.cli import app, emit_json, fail, out

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

    from recsys.stack import StackError, up

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

    from recsys.stack import StackError, down

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

    from recsys.stack import StackError, status

    try:
        rows = status(Path(state_dir) if state_dir else None)
    except StackError as error:
        fail(str(error))
    if as_json:
        emit_json({"services": rows})
    else:
        print_stack("stack status", rows)
