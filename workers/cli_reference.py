"""docs/cli.md, generated from the `distill` typer app: `python -m workers.cli_reference`.

typer ships a generator (`typer ... utils docs`), but it documents hidden commands (the old
`distill teacher` alias) and prints rich's type placeholders; this one walks the same click
tree and writes only what `--help` shows. tests/unit/test_cli_help.py checks the file is
current.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
import typer.main

from workers.cli import app

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

HEADER = """# CLI reference

Every `distill` command, as `distill COMMAND --help` shows it. Generated from the code by
`python -m workers.cli_reference` (a test fails when this file is out of date); edit the help
texts in `service/cli.py`, `service/export_cli.py`, `service/refresh_cli.py` and
`workers/cli.py`, not this file.

The operator commands (`db`, `keys`, `datasets`, `teachers`, `jobs`, `exports`, `export`)
work on the configured database directly: `DATABASE_URL`, or the embedded SQLite database in
`DISTILL_HOME` when none is set. They act for one tenant, `--tenant` (default `default`);
naming a job, dataset, teacher, key or export of another tenant is an error that says which
tenant holds it. Errors go to stderr as `error CODE: message`, with exit code 2 for a bad
command line, file or request and 1 for a job that did not succeed or a database that cannot
be reached. `datasets upload`, `teachers create` and `jobs create` print the new id on the
last line of stdout (`keys create` the key), so `ID=$(distill datasets upload seed.jsonl |
tail -n1)` works. `distill refresh` is a client of a server, for CI (see [ci.md](ci.md)).
"""


def _visible(command: Any) -> Iterator[tuple[str, Any]]:
    """A group's commands as `--help` lists them: in the order they were added."""
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            yield name, sub


def _section(command: Any, ctx: typer.Context, depth: int) -> list[str]:
    path = ctx.command_path
    lines = [f"{'#' * min(depth + 1, 4)} `{path}`", ""]
    if command.help:
        lines += [inspect.cleandoc(command.help), ""]
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines += ["```console", f"$ {path} {usage}".rstrip(), "```", ""]
    records = [
        (param.param_type_name, param.get_help_record(ctx)) for param in command.get_params(ctx)
    ]
    for kind, title in (("argument", "Arguments"), ("option", "Options")):
        rows = [record for k, record in records if k == kind and record is not None]
        if rows:
            lines += [f"**{title}**:", ""]
            lines += [f"* `{name}`: {' '.join(text.split())}" for name, text in rows]
            lines.append("")
    subcommands = list(_visible(command))
    if subcommands:
        lines += ["**Commands**:", ""]
        lines += [f"* `{name}`: {sub.get_short_help_str(limit=200)}" for name, sub in subcommands]
        lines.append("")
        for name, sub in subcommands:
            lines += _section(sub, typer.Context(sub, info_name=name, parent=ctx), depth + 1)
    return lines


def render_reference() -> str:
    root = typer.main.get_command(app)
    lines = _section(root, typer.Context(root, info_name="distill"), 1)
    return HEADER + "\n" + "\n".join(lines).rstrip() + "\n"


def main() -> None:
    DOC.write_text(render_reference())
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
