"""`recsys recommend`: every asked user's top k written to Parquet, CSV or JSON Lines.

Registered on the `recsys` app by recsys/cli.py. It runs in this process (reading the
registry's tables, the database and the artifact store), so the file lands where asked and
a progress bar follows the chunks; `POST /recommendations/batch` runs the same on the eval
worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from recsys.cli import app, emit_json, ensure_schema, err, fail, out
from shared.errors import RecsysError


@contextmanager
def user_progress() -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar over users on a terminal; nothing when output is redirected."""
    if not err.is_terminal:
        yield None
        return
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), console=err,
                  transient=True) as progress:
        task = progress.add_task("users", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield advance


@app.command("recommend")
def recommend_command(
    users: str = typer.Option(..., "--users", help="'all' (every user the model knows and "
                              "every user with interactions), a file of user ids (one a "
                              "line), or ID,ID."),
    k: int = typer.Option(10, "--k", help="Items per user."),
    model: str = typer.Option("latest", "--model", help="A version number, 'latest' (the "
                              "champion) or 'challenger'."),
    exclude_seen: bool = typer.Option(True, "--exclude-seen/--include-seen", help="Leave out "
                                      "what each user rated or gave feedback on, as serve "
                                      "does."),
    genres: str = typer.Option(None, "--genres", help="Comma-separated genres: keep items "
                               "of any of them."),
    output: str = typer.Option(..., "--output", "-o", help="File to write: .parquet, .csv or "
                               ".jsonl."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object last."),
) -> None:
    """Write recommendations for many users to a file, resumably, in chunks of users."""
    from services.eval.batch import recommend_batch

    ensure_schema()
    wanted = [g.strip() for g in genres.split(",") if g.strip()] if genres else []
    try:
        with user_progress() as bar:
            summary = recommend_batch(users, k, output, model, exclude_seen, wanted,
                                      progress=bar)
    except RecsysError as error:
        fail(str(error))
    except OSError as error:
        fail(f"--output {output}: {error.strerror or error}")
    if "restarted" in summary:
        err.print(f"note: {summary['restarted']}", highlight=False)
    if as_json:
        emit_json(summary)
        return
    resumed = (f", {summary['resumed_chunks']} of {summary['chunks']} chunks from an "
               "earlier run" if summary["resumed_chunks"] else "")
    out.print(f"{summary['rows']:,} recommendations for {summary['users']:,} users from "
              f"v{summary['model_version']} written to {summary['output']} in "
              f"{summary['seconds']} s{resumed}", highlight=False)
